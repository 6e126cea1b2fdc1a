"""Experiment YAML files: the sections, the validated ``Experiment``, its digests and the checkpoints it reads.

An experiment file has top-level keys (``experiment``, ``description``, ``seed``, ``device``,
``stages``) and one section per topic. Each section is a frozen dataclass listed in ``SECTIONS``,
validated by ``rslib.pipeline.schema`` from its fields, their type hints and their ``param``
metadata, so a new section is one dataclass plus one ``SECTIONS`` entry. The stages an experiment
may list are those of ``rslib.pipeline.stage.STAGES``; what enters a stage's digest is declared on
the fields (``speed_only``, ``digest=False``, ``neutral``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rslib.core.attacks import ATTACKS
from rslib.nn.objectives import OBJECTIVES
from rslib.pipeline import layout
from rslib.pipeline.schema import (
    ParamsError,
    apply_overrides,
    build,
    check_keys,
    has_defaults,
    param,
    read_yaml_mapping,
    yaml_fields,
)
from rslib.pipeline.stage import STAGES, experiment_stages
from rslib.util.digest import digest


def noise_problem(spec: Mapping[str, Any], dim: int, sigma: float) -> str | None:
    """Why ``spec`` (``{name: ..., **params}``) is not a valid noise at this dim and sigma, or None."""
    from rslib.core.noises import noise_from_params

    try:
        noise_from_params(spec, dim, sigma)
    except (ValueError, TypeError) as err:
        return f"is not a valid noise ({spec.get('name')}): {err}"
    return None


@dataclass(frozen=True)
class TutorialParams:
    """Noise-radii tutorial: certified radius versus rho for many noises, and noisy samples."""

    dim: int = param(3072, ge=1)
    sigma: float = param(1.0, gt=0)
    rho_min: float = param(0.5, ge=0.5, lt=1)
    rho_max: float = param(0.999, gt=0.5, lt=1)
    num_rho: int = param(200, ge=2)
    sample_sigmas: list[float] = param([0.1, 0.25, 0.5, 1.0], gt=0, nonempty=True)
    image_index: int = param(0, ge=0)
    l1_noises: list[dict] = param([{"name": "Uniform"}, {"name": "Gaussian"}, {"name": "Laplace"},
                                   {"name": "ExpInf", "k": 1, "j": 0}, {"name": "PowInf", "a": 3082},
                                   {"name": "Exp1", "k": 1}, {"name": "Pareto", "a": 3}, {"name": "Expp", "p": 0.5}])
    l2_noises: list[dict] = param([{"name": "Gaussian"}, {"name": "Exp2", "k": 1, "j": 0}, {"name": "UniformBall"},
                                   {"name": "Pow2", "k": 2, "a": 1546}, {"name": "Exp2", "k": 4, "j": 0}])
    linf_noises: list[dict] = param([{"name": "Uniform"}, {"name": "Gaussian"}, {"name": "Laplace"},
                                     {"name": "ExpInf", "k": 1, "j": 0}, {"name": "ExpInf", "k": 10, "j": 0},
                                     {"name": "PowInf", "a": 3082}])

    def check(self) -> Iterator[tuple[str, str]]:
        """Cross-field checks: yields (field, problem)."""
        if self.rho_min >= self.rho_max:
            yield "rho_max", f"must be > rho_min ({self.rho_min}), got {self.rho_max}"
        for norm in ("l1", "l2", "linf"):
            for i, spec in enumerate(getattr(self, f"{norm}_noises")):
                problem = noise_problem(spec, self.dim, self.sigma)
                if problem:
                    yield f"{norm}_noises[{i}]", problem


@dataclass(frozen=True)
class DataParams:
    """Which dataset, where it lives and how it is batched."""

    dataset: str = param("digits", expect="a dataset name from rslib.nn.data.DATASETS (e.g. digits, mnist)")
    data_dir: str | None = param(None, digest=False,
                                 expect="a folder (default: $RSLIB_DATA_DIR, else ./data where rslib runs)")
    download: bool = param(False, digest=False)
    batch_size: int = param(128, ge=1)
    eval_batch_size: int = param(512, ge=1, digest=False)
    num_workers: int = param(0, ge=0, digest=False)

    def check(self) -> Iterator[tuple[str, str]]:
        from rslib.nn.data import DATASETS

        if self.dataset not in DATASETS:
            yield "dataset", f"must be one of {', '.join(repr(name) for name in DATASETS)}, got {self.dataset!r}"


@dataclass(frozen=True)
class ModelParams:
    """The architecture (normalization for the dataset is built into the model)."""

    arch: str = param("small_cnn", expect="an architecture name from rslib.nn.architectures (e.g. small_cnn)")


@dataclass(frozen=True)
class NoiseParams:
    """The smoothing noise: an rs4a name, its sigma and any distribution parameters."""

    name: str = param("Gaussian")
    sigma: float = param(0.25, gt=0)
    params: dict = param({})


@dataclass(frozen=True)
class TrainParams:
    """Training: one loop, the loss chosen by ``mode``; heat_* apply to mode 'heat' only.

    ``stability_divergence``: KL (rs4a) or the cross-entropy of the published consistency protocols.
    ``channels_last``: keep the model's convolutions in NHWC memory format (faster on CPU for small
    conv nets such as ``lenet_caffe``; results equal up to float rounding). ``eval_every``: test
    accuracy (clean, and noisy for noise-based modes) every this many epochs and after the last."""

    mode: str = param("standard", expect="a training objective from rslib.nn.objectives.OBJECTIVES (standard, noise, "
                                          "stability, smoothadv, direct, heat)")
    epochs: int = param(30, ge=1)
    lr: float = param(0.1, gt=0)
    momentum: float = param(0.9, ge=0, lt=1)
    nesterov: bool = param(False)
    weight_decay: float = param(1e-4, ge=0)
    schedule: Literal["cosine", "step", "constant"] = param("cosine")
    step_size: int = param(30, ge=1)
    lr_decay: float = param(0.1, gt=0, le=1)
    max_batches: int | None = param(None, ge=1)
    stability_weight: float = param(6.0, ge=0)
    stability_divergence: Literal["kl", "cross_entropy"] = param("kl", neutral="kl")
    channels_last: bool = param(False, neutral=False)
    eval_every: int = param(1, ge=1, digest=False)
    noise_draws: int = param(1, ge=1)
    adv_eps: float = param(0.25, ge=0)
    adv_steps: int = param(1, ge=1)
    adv_warmup_epochs: int = param(10, ge=0)
    heat_base: str | None = param(None)
    heat_steps: int = param(5, ge=1)
    heat_gamma: float = param(5.0, ge=0)
    heat_draws: int = param(10, ge=1)
    heat_eps: float = param(0.1, gt=0)
    heat_fidelity: Literal["logits", "softmax"] = param("logits")
    heat_reinit: bool = param(True)
    heat_student_noise: float = param(0.0, ge=0)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.mode not in OBJECTIVES:
            yield "mode", f"must be one of {', '.join(OBJECTIVES)}, got {self.mode!r}"
        if self.mode == "heat" and not self.heat_base:
            yield "heat_base", "is required for mode 'heat' (a checkpoint path or an experiment name)"


@dataclass(frozen=True)
class CertifyParams:
    """Monte-Carlo certification of the test subset (Cohen et al.'s ``certify.py`` settings).

    ``batch_size`` counts noise samples per model forward (they may span several images): ``auto``
    measures the fastest size once per model, input shape, device and dtype (``rslib.core.autotune``, cached
    on disk, recorded in ``certify.json``); ``channels_last`` (``auto``: measured with it) sets the
    model's memory format. ``images_per_batch`` images are certified per call and their rows appended to disk together.
    ``skip``/``max``: every ``skip``-th test image, at most ``max`` images. ``checkpoint``: a ``.pt``
    path or a sibling experiment's name (default: this experiment's ``checkpoints/model.pt``).
    ``deterministic``: the model is a Gaussian-averaged (heat) model; also compute HeatSmoothing's
    approximate L-bound (Gaussian noise only). ``autocast``: a GPU speed lever.
    ``radii_of_interest`` (e.g. ``{l2: [0.25, 0.5]}``) with ``looks = K > 1``: sequential
    certification (``rslib.core.certify.Smooth.certify``): the ``n`` estimation draws come in K doubling
    looks at level ``alpha / K`` each, and an input stops once more draws cannot change which of these
    radii it certifies; rows then record the draws used (``n``) and the stopping look."""

    n0: int = param(100, ge=1)
    n: int = param(100_000, ge=1)
    alpha: float = param(0.001, gt=0, lt=1)
    batch_size: int | Literal["auto"] = param("auto", ge=1, speed_only=4096)
    images_per_batch: int = param(32, ge=1)
    skip: int = param(1, ge=1)
    max: int | None = param(None, ge=1)
    topk: int = param(1, ge=1)
    checkpoint: str | None = param(None)
    deterministic: bool = param(False)
    autocast: Literal["none", "bf16", "fp16"] = param("none")
    channels_last: bool | Literal["auto"] = param("auto", speed_only=False)
    radii_of_interest: dict | None = param(None, neutral=None,
                                           expect="a mapping of norms (l1, l2, linf) to lists of radii >= 0")
    looks: int = param(1, ge=1, neutral=1)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.radii_of_interest is not None:
            for norm, radii in self.radii_of_interest.items():
                numbers = isinstance(radii, list) and radii and all(
                    isinstance(r, int | float) and not isinstance(r, bool) and math.isfinite(r) and r >= 0
                    for r in radii)
                if norm not in ("l1", "l2", "linf") or not numbers:
                    yield "radii_of_interest", (f"must map norms (l1, l2, linf) to non-empty lists of radii >= 0, "
                                                f"got {norm!r}: {radii!r}")
        if self.looks > 1 and self.radii_of_interest is None:
            yield "looks", "> 1 needs certify.radii_of_interest (sequential certification stops on them)"
        if self.n < 2 ** (self.looks - 1):
            yield "looks", f"is too many for n = {self.n}: the first of {self.looks} doubling looks would be empty"


@dataclass(frozen=True)
class AttackParams:
    """Adversarial attacks on the test subset (``rslib.pipeline.stages.attack``): the settings every attack
    shares; each registered attack (``rslib.core.attacks.ATTACKS``) adds its own options as fields of
    the section (:func:`attack_section`).

    ``target``: 'base' attacks the model as a plain classifier (a heat-averaged model is one: it is
    deterministic); 'smoothed' attacks the randomized-smoothing classifier: the loss is taken on
    the mean softmax over ``draws`` noise draws (fresh at every step with ``fresh_draws``) and a
    success must convince the smoothed prediction (``judge`` 'predict': ``Smooth.predict`` with
    ``judge_n`` draws and its abstain test at ``judge_alpha``; 'vote': a majority vote over
    ``judge_n`` draws). ``batch_size`` counts noise samples per forward of the judge (``auto``: measured).
    With several attacks, the stage also writes ``best``: per input, the smallest l2 distance any
    attack found.
    ``skip``/``max``: every ``skip``-th test image, at most ``max``. ``checkpoint``: a ``.pt``
    path or a sibling experiment's name (default: this experiment's model). ``lbound.csv`` holds
    HeatSmoothing's test statistics with top-k margin ``lbound_topk``; for smoothed targets the
    softmax is averaged over ``lbound_draws`` noise draws (default: ``draws``)."""

    target: Literal["base", "smoothed"] = param("base")
    attacks: list[str] = param(["ddn", "pgd", "alma"], nonempty=True,
                               expect="an attack name from rslib.core.attacks.ATTACKS (ddn, pgd, alma, ...)")
    draws: int = param(16, ge=1)
    fresh_draws: bool = param(True)
    judge: Literal["predict", "vote"] = param("predict")
    judge_n: int = param(1000, ge=1)
    judge_alpha: float = param(0.001, gt=0, lt=1)
    batch_size: int | Literal["auto"] = param("auto", ge=1, speed_only=4096)
    skip: int = param(5, ge=1)
    max: int | None = param(None, ge=1)
    images_per_batch: int = param(64, ge=1)
    checkpoint: str | None = param(None)
    lbound_topk: int = param(1, ge=1)
    lbound_draws: int | None = param(None, ge=1)

    def check(self) -> Iterator[tuple[str, str]]:
        for i, name in enumerate(self.attacks):
            if name not in ATTACKS:
                yield f"attacks[{i}]", f"must be one of {', '.join(ATTACKS)}, got {name!r}"
            elif name in self.attacks[:i]:
                yield f"attacks[{i}]", f"repeats attack {name!r}"

    def options(self, attack: str) -> dict[str, Any]:
        """The values of the options of attack ``attack`` (its YAML keys in this section)."""
        return {option.key: getattr(self, option.key) for option in ATTACKS[attack].options}


_ATTACK_SECTIONS: dict[tuple[str, ...], type] = {}


def attack_section() -> type:
    """:class:`AttackParams` with one field per option of every registered attack (built again when an
    attack is registered, so an attack's module alone declares its YAML keys)."""
    key = tuple(ATTACKS.names())
    if key not in _ATTACK_SECTIONS:
        fields = [(option.key, option.type, param(option.default, **option.bounds(),
                                                  **({"neutral": option.default} if option.neutral else {})))
                  for spec in ATTACKS.values() for option in spec.options]
        keys = [name for name, _, _ in fields]
        clash = sorted({k for k in keys if keys.count(k) > 1} | (set(keys) & {f.name for f in dataclasses.fields(AttackParams)}))
        if clash:
            raise ValueError(f"attack options clash: {', '.join(clash)} (each attack needs keys of its own)")
        _ATTACK_SECTIONS[key] = dataclasses.make_dataclass(
            "AttackParams", fields, bases=(AttackParams,), frozen=True,
            namespace={"__doc__": AttackParams.__doc__, "__module__": __name__})
    return _ATTACK_SECTIONS[key]


#: The sections of an experiment file (``attack``: its shared settings; :func:`section_class` adds the
#: registered attacks' options).
SECTIONS: dict[str, type] = {"tutorial": TutorialParams, "data": DataParams, "model": ModelParams, "noise": NoiseParams,
                             "train": TrainParams, "certify": CertifyParams, "attack": AttackParams}


def cross_check(sections: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Checks that span sections: the noise fits the dataset, the architecture exists."""
    data, noise, model = sections.get("data"), sections.get("noise"), sections.get("model")
    if data is not None and noise is not None:
        from rslib.nn.data import DATASETS

        dim = math.prod(DATASETS[data.dataset].shape)
        problem = noise_problem({"name": noise.name, **noise.params}, dim, noise.sigma)
        if problem:
            yield "noise", problem
    if model is not None:
        from rslib.nn.architectures import ARCHITECTURES

        if model.arch not in ARCHITECTURES:
            yield "model.arch", f"must be one of {', '.join(ARCHITECTURES)}, got {model.arch!r}"


# --------------------------------------------------------------------------- experiment

_NOT_IN_DIGEST = ("description", "stages")


def section_class(name: str) -> type:
    """The dataclass of section ``name`` (for ``attack``, with the registered attacks' options)."""
    return attack_section() if name == "attack" else SECTIONS[name]


def section_digest(name: str, values: Mapping[str, Any], *, neutral: bool = True) -> dict[str, Any]:
    """What of a section's values enters a digest, by its fields' declarations (:func:`param`): fields
    with ``digest=False`` are left out, ``speed_only`` fields count as their fixed value, and (with
    ``neutral``) a field at its neutral value is left out."""
    out = {}
    for f in dataclasses.fields(section_class(name)):
        meta, value = f.metadata, values.get(f.name)
        if f.name not in values or meta.get("digest", True) is False:
            continue
        if neutral and "neutral" in meta and value == meta["neutral"]:
            continue
        out[f.name] = meta.get("speed_only", value)
    return out


@dataclass(frozen=True)
class Experiment:
    """A validated experiment; sections are attributes (``exp.tutorial``), None when absent."""

    experiment: str = param(pattern=r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
                            expect="a name of letters, digits, '_', '.' and '-' (not starting with '.' or '-')")
    stages: list[str] = param(nonempty=True)
    description: str = param("")
    seed: int = param(0, ge=0)
    device: str = param("auto", pattern=r"auto|cpu|cuda(:\d+)?", expect="'auto', 'cpu', 'cuda' or 'cuda:N'")
    sections: dict[str, Any] = field(default_factory=dict, metadata={"yaml": False})
    source: Path | None = field(default=None, metadata={"yaml": False})

    def __getattr__(self, name: str) -> Any:
        if name in SECTIONS:
            return self.__dict__.get("sections", {}).get(name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def check(self) -> Iterator[tuple[str, str]]:
        """Stage names must be registered and not repeated."""
        for i, name in enumerate(self.stages):
            if name not in experiment_stages():
                yield f"stages[{i}]", f"must be one of {', '.join(experiment_stages())}, got {name!r}"
            elif name in self.stages[:i]:
                yield f"stages[{i}]", f"repeats stage {name!r}"

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-able parameters with every default filled in."""
        header = {"experiment": self.experiment, "description": self.description, "seed": self.seed,
                  "device": self.device, "stages": list(self.stages)}
        return header | {name: dataclasses.asdict(section) for name, section in self.sections.items()}

    def digest(self) -> str:
        """sha256 of the canonical JSON of the parameters that can change results: ``description`` and
        ``stages`` are left out (editing them does not make finished stages stale)."""
        return digest({k: v for k, v in self.to_dict().items() if k not in _NOT_IN_DIGEST})

    def stage_digest(self, stage: str, salt: str = "") -> str:
        """sha256 of what can change the results of ``stage``: seed, device, the sections it needs
        and those of the stages whose outputs it reads (``Stage.reads``, e.g. certification reads
        training), without fields that only set where data lives or how fast it loads. So editing
        ``certify`` leaves a finished ``train`` and ``attack`` valid, while editing ``train`` makes
        both stale. ``salt`` mixes in outside inputs (a sibling's digest, a checkpoint file's stamp)."""
        STAGES[stage]  # an unknown stage names the choices
        upstream = [stage, *(s for s in STAGES[stage].reads if s in self.stages)]
        names = sorted({section for name in upstream for section in STAGES[name].requires})
        full = self.to_dict()
        data = {"seed": self.seed, "device": self.device, "salt": salt}
        data |= {name: section_digest(name, full[name]) for name in names if name in full}
        return digest(data)


def read_checkpoints(exp: Experiment) -> Iterator[tuple[str, str, str]]:
    """(section, key, reference) of every checkpoint the experiment's stages read (their declared
    ``Stage.checkpoint`` fields: the base of a heat training, ``certify.checkpoint``, ...)."""
    for stage in STAGES.values():
        read = stage.checkpoint
        if read is None or stage.name not in exp.stages:
            continue
        values = exp.sections.get(read.section)
        reference = getattr(values, read.key) if values is not None else None
        if reference is not None and read.when(values):
            yield read.section, read.key, reference


def checkpoint_files_stamp(exp: Experiment) -> str:
    """Path, size and modification time of every checkpoint FILE the experiment's stages read
    ("" when none), so that replacing such a file makes the stages that read it stale."""
    stamps = []
    for section, key, reference in read_checkpoints(exp):
        if not layout.is_checkpoint_path(reference):
            continue
        path = Path(reference).resolve()
        stat = path.stat() if path.is_file() else None
        stamps.append(f"{section}.{key}={path}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"{path}:missing")
    return ";".join(stamps)


def with_absolute_paths(exp: Experiment, base: str | os.PathLike[str] | None = None) -> Experiment:
    """``exp`` with ``data.data_dir`` (default: the data root, ``$RSLIB_DATA_DIR`` else ``./data``) and
    relative checkpoint paths made absolute.

    Stage notebooks run inside the experiment's output folder, so paths written relative to the
    folder ``rslib run`` was started from (``base``, default: the current directory) are resolved
    before they are handed over. Sibling experiment names are left alone."""
    root = Path(base) if base is not None else Path.cwd()
    sections = dict(exp.sections)

    def absolute(value: str) -> str:
        return value if Path(value).is_absolute() else str((root / value).resolve())

    data = sections.get("data")
    if data is not None:
        from rslib.nn.data import DATASETS, default_data_dir

        data_dir = data.data_dir or (None if DATASETS[data.dataset].embedded else str(default_data_dir()))
        if data_dir:
            sections["data"] = dataclasses.replace(data, data_dir=absolute(data_dir))
    for name, key in ((s.checkpoint.section, s.checkpoint.key) for s in STAGES.values() if s.checkpoint):
        section = sections.get(name)
        value = getattr(section, key) if section is not None else None
        if value and layout.is_checkpoint_path(value):
            sections[name] = dataclasses.replace(section, **{key: absolute(value)})
    return dataclasses.replace(exp, sections=sections)


def validate(raw: Any, source: str | os.PathLike[str] | None = None, label: str | None = None) -> Experiment:
    """Validate a parsed experiment mapping and return the resolved ``Experiment``; ``label`` names the input
    in error messages (default: ``source``)."""
    label = label or (str(source) if source is not None else "<params>")
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{label}: the file must be a mapping of keys to values, got {raw!r}")
    header = [f.name for f in yaml_fields(Experiment)]
    check_keys(raw, header + list(SECTIONS), "", label)
    exp = build(Experiment, {k: v for k, v in raw.items() if k in header}, "", label)
    needed = {sec: stage for stage in exp.stages for sec in STAGES[stage].requires}
    sections = {}
    for name in SECTIONS:
        cls = section_class(name)
        if name in raw:
            sections[name] = build(cls, raw[name], name, label)
        elif name in needed:
            if not has_defaults(cls):
                raise ParamsError(f"{label}: stage '{needed[name]}' needs section '{name}', which is missing")
            sections[name] = build(cls, {}, name, label)
    for key, problem in cross_check(sections):
        raise ParamsError(f"{label}: {key} {problem}")
    return dataclasses.replace(exp, sections=sections, source=Path(source) if source is not None else None)


def load(path: str | os.PathLike[str], **overrides: Any) -> Experiment:
    """Read, override (dotted keys, e.g. ``**{"tutorial.dim": 64}``) and validate an experiment file."""
    path = Path(path)
    label = str(path) + (f" (overrides: {', '.join(overrides)})" if overrides else "")
    return validate(apply_overrides(read_yaml_mapping(path), overrides, label), source=path, label=label)


