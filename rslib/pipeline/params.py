"""Experiment YAML files: schema, validation, overrides and the stage registry.

An experiment file has top-level keys (``experiment``, ``description``, ``seed``, ``device``,
``stages``) and one section per topic. Each section is a frozen dataclass listed in ``SECTIONS``;
the validator is driven by the dataclass fields, their type hints and their ``param`` metadata,
so a new section is one dataclass plus one ``SECTIONS`` entry. The stages an experiment may list are
those of ``rslib.pipeline.stage.STAGES``; what enters a stage's digest is declared on the fields.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from rslib.core.attacks import ATTACKS
from rslib.nn.objectives import OBJECTIVES
from rslib.pipeline import layout
from rslib.pipeline.stage import STAGES, experiment_stages
from rslib.util.digest import digest


class ParamsError(ValueError):
    """Invalid experiment parameters; the message names the file, the dotted key and the fix."""


_UNSET = object()


def param(
    default: Any = dataclasses.MISSING,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    pattern: str | None = None,
    nonempty: bool = False,
    expect: str | None = None,
    digest: bool = True,
    neutral: Any = _UNSET,
    speed_only: Any = _UNSET,
) -> Any:
    """A dataclass field with validation metadata and its place in stage digests.

    Bounds (``ge``/``gt``/``le``/``lt``) apply to numbers and to every number of a list;
    ``pattern`` is a full-match regex for strings; ``expect`` replaces the generated
    description of valid values in error messages. Mutable defaults are copied per instance.

    Digests (:func:`section_digest`): ``digest=False`` leaves the field out (it only says where inputs
    live or how fast they load); ``speed_only=v`` makes every value count as ``v`` (the field sets how
    fast a stage runs, not what it computes; ``v`` is what it counted as before it was declared so);
    ``neutral=v`` leaves it out while it holds ``v`` (a field added after digests were first written,
    at the value that reproduces what rslib did before it existed).
    """
    bounds = {"ge": ge, "gt": gt, "le": le, "lt": lt, "pattern": pattern, "expect": expect}
    meta = {k: v for k, v in bounds.items() if v is not None}
    if nonempty:
        meta["nonempty"] = True
    if not digest:
        meta["digest"] = False
    if neutral is not _UNSET:
        meta["neutral"] = neutral
    if speed_only is not _UNSET:
        meta["speed_only"] = speed_only
    if isinstance(default, list | dict):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- sections


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
    l1_noises: list[dict] = param([
        {"name": "Uniform"},
        {"name": "Gaussian"},
        {"name": "Laplace"},
        {"name": "ExpInf", "k": 1, "j": 0},
        {"name": "PowInf", "a": 3082},
        {"name": "Exp1", "k": 1},
        {"name": "Pareto", "a": 3},
        {"name": "Expp", "p": 0.5},
    ])
    l2_noises: list[dict] = param([
        {"name": "Gaussian"},
        {"name": "Exp2", "k": 1, "j": 0},
        {"name": "UniformBall"},
        {"name": "Pow2", "k": 2, "a": 1546},
        {"name": "Exp2", "k": 4, "j": 0},
    ])
    linf_noises: list[dict] = param([
        {"name": "Uniform"},
        {"name": "Gaussian"},
        {"name": "Laplace"},
        {"name": "ExpInf", "k": 1, "j": 0},
        {"name": "ExpInf", "k": 10, "j": 0},
        {"name": "PowInf", "a": 3082},
    ])

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
    accuracy (clean, and noisy for noise-based modes) every this many epochs and after the last.
    """

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
    radii it certifies; rows then record the draws used (``n``) and the stopping look.
    """

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
    softmax is averaged over ``lbound_draws`` noise draws (default: ``draws``).
    """

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
SECTIONS: dict[str, type] = {
    "tutorial": TutorialParams,
    "data": DataParams,
    "model": ModelParams,
    "noise": NoiseParams,
    "train": TrainParams,
    "certify": CertifyParams,
    "attack": AttackParams,
}


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

    experiment: str = param(
        pattern=r"[A-Za-z0-9_][A-Za-z0-9_.-]*",
        expect="a name of letters, digits, '_', '.' and '-' (not starting with '.' or '-')",
    )
    stages: list[str] = param(nonempty=True)
    description: str = param("")
    seed: int = param(0, ge=0)
    device: str = param(
        "auto", pattern=r"auto|cpu|cuda(:\d+)?", expect="'auto', 'cpu', 'cuda' or 'cuda:N'"
    )
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
        out: dict[str, Any] = {
            "experiment": self.experiment,
            "description": self.description,
            "seed": self.seed,
            "device": self.device,
            "stages": list(self.stages),
        }
        for name, section in self.sections.items():
            out[name] = dataclasses.asdict(section)
        return out

    def digest(self) -> str:
        """sha256 of the canonical JSON of the parameters that can change results.

        ``description`` and ``stages`` are left out: editing them does not make finished
        stages stale.
        """
        data = {k: v for k, v in self.to_dict().items() if k not in _NOT_IN_DIGEST}
        return digest(data)

    def stage_digest(self, stage: str, salt: str = "") -> str:
        """sha256 of what can change the results of ``stage``: seed, device, the sections it needs
        and those of the stages whose outputs it reads (``Stage.reads``, e.g. certification reads
        training), without fields that only set where data lives or how fast it loads. So editing
        ``certify`` leaves a finished ``train`` and ``attack`` valid, while editing ``train`` makes
        both stale. ``salt`` mixes in outside inputs (a sibling's digest, a checkpoint file's stamp).
        """
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
    before they are handed over. Sibling experiment names are left alone.
    """
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


# --------------------------------------------------------------------------- validation

_BAD = object()
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)]


def _dotted(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _bounds_text(meta: Mapping[str, Any]) -> str:
    ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
    parts = [f"{op} {meta[k]}" for k, op in ops.items() if k in meta]
    return (" " + " and ".join(parts)) if parts else ""


def _describe(tp: Any, meta: Mapping[str, Any]) -> str:
    """Human description of the values a field accepts."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        inner = " or ".join(_describe(a, meta) for a in args if a is not type(None))
        return f"{inner} or null" if type(None) in args else inner
    if origin is list:
        head = "a non-empty list" if meta.get("nonempty") else "a list"
        return f"{head}, each item {_describe(args[0], meta)}"
    if "expect" in meta:
        return meta["expect"]
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if tp is dict or origin is dict:
        return "a mapping"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer" + _bounds_text(meta)
    if tp is float:
        return "a number" + _bounds_text(meta)
    if tp is str:
        return "a string" + (f" matching {meta['pattern']}" if "pattern" in meta else "")
    raise TypeError(f"unsupported parameter type {tp!r}")


def _in_bounds(value: float, meta: Mapping[str, Any]) -> bool:
    return (
        ("ge" not in meta or value >= meta["ge"])
        and ("gt" not in meta or value > meta["gt"])
        and ("le" not in meta or value <= meta["le"])
        and ("lt" not in meta or value < meta["lt"])
    )


def _coerce(value: Any, tp: Any, meta: Mapping[str, Any], key: str, source: str) -> Any:
    """Converted value, or _BAD when it does not fit ``tp`` and ``meta``."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None:
            return None if type(None) in args else _BAD
        for inner in (a for a in args if a is not type(None)):
            result = _coerce(value, inner, meta, key, source)
            if result is not _BAD:
                return result
        return _BAD
    if origin is Literal:
        return value if any(value == a and type(value) is type(a) for a in args) else _BAD
    if origin is list:
        if not isinstance(value, list) or (meta.get("nonempty") and not value):
            return _BAD
        return [_value(v, args[0], meta, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        ok = isinstance(value, Mapping) and all(isinstance(k, str) for k in value)
        return copy.deepcopy(dict(value)) if ok else _BAD
    if tp is bool:
        return value if isinstance(value, bool) else _BAD
    if tp is str:
        ok = isinstance(value, str) and ("pattern" not in meta or re.fullmatch(meta["pattern"], value))
        return value if ok else _BAD
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        # PyYAML (YAML 1.1) reads exponent-only numbers such as 1e-3 as strings.
        if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
            value = float(value)
        ok = isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)
        value = float(value) if ok else value
    else:
        raise TypeError(f"unsupported parameter type {tp!r} for {key}")
    return value if ok and _in_bounds(value, meta) else _BAD


def _value(value: Any, tp: Any, meta: Mapping[str, Any], key: str, source: str) -> Any:
    """Convert and check one value; raise ParamsError naming ``key`` if it does not fit."""
    result = _coerce(value, tp, meta, key, source)
    if result is _BAD:
        raise ParamsError(f"{source}: {key} must be {_describe(tp, meta)}, got {value!r}")
    return result


def _check_keys(raw: Mapping[Any, Any], valid: list[str], prefix: str, source: str) -> None:
    for key in raw:
        if key not in valid:
            raise ParamsError(
                f"{source}: unknown key '{_dotted(prefix, str(key))}' (valid keys: {', '.join(valid)})"
            )


def _build(cls: type, raw: Any, prefix: str, source: str, **extra: Any) -> Any:
    """Validate mapping ``raw`` against dataclass ``cls``; run its ``check()`` if it has one."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        what = f"'{prefix}'" if prefix else "the file"
        raise ParamsError(f"{source}: {what} must be a mapping of keys to values, got {raw!r}")
    fields = _yaml_fields(cls)
    _check_keys(raw, [f.name for f in fields], prefix, source)
    hints = get_type_hints(cls)
    values = {}
    for f in fields:
        key = _dotted(prefix, f.name)
        if f.name in raw:
            values[f.name] = _value(raw[f.name], hints[f.name], f.metadata, key, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{source}: missing required key '{key}' ({_describe(hints[f.name], f.metadata)})")
    obj = cls(**values, **extra)
    for sub, problem in getattr(obj, "check", lambda: ())():
        raise ParamsError(f"{source}: {_dotted(prefix, sub)} {problem}")
    return obj


def _has_defaults(cls: type) -> bool:
    return all(
        f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        for f in _yaml_fields(cls)
    )


def validate(
    raw: Any, source: str | os.PathLike[str] | None = None, label: str | None = None
) -> Experiment:
    """Validate a parsed experiment mapping and return the resolved ``Experiment``.

    ``label`` names the input in error messages (default: ``source``).
    """
    label = label or (str(source) if source is not None else "<params>")
    if not isinstance(raw, Mapping):
        raise ParamsError(f"{label}: the file must be a mapping of keys to values, got {raw!r}")
    header = [f.name for f in _yaml_fields(Experiment)]
    _check_keys(raw, header + list(SECTIONS), "", label)
    exp = _build(Experiment, {k: v for k, v in raw.items() if k in header}, "", label)
    needed = {sec: stage for stage in exp.stages for sec in STAGES[stage].requires}
    sections = {}
    for name in SECTIONS:
        cls = section_class(name)
        if name in raw:
            sections[name] = _build(cls, raw[name], name, label)
        elif name in needed:
            if not _has_defaults(cls):
                raise ParamsError(f"{label}: stage '{needed[name]}' needs section '{name}', which is missing")
            sections[name] = _build(cls, {}, name, label)
    for key, problem in cross_check(sections):
        raise ParamsError(f"{label}: {key} {problem}")
    return dataclasses.replace(
        exp, sections=sections, source=Path(source) if source is not None else None
    )


def apply_overrides(raw: dict[str, Any], overrides: Mapping[str, Any], label: str) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for key, value in overrides.items():
        *parents, last = key.split(".")
        node = raw
        for i, part in enumerate(parents):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(parents[: i + 1])
                raise ParamsError(f"{label}: cannot apply override '{key}': '{where}' is not a mapping")
            node = child
        node[last] = value
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``"tutorial.dim=64"`` into ``("tutorial.dim", 64)``; the value is read as YAML."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ParamsError(f"override {text!r} must look like key=value, e.g. tutorial.dim=64")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError as err:
        raise ParamsError(f"override {text!r}: the value is not valid YAML ({err})") from None


def load(path: str | os.PathLike[str], **overrides: Any) -> Experiment:
    """Read, override (dotted keys, e.g. ``**{"tutorial.dim": 64}``) and validate an experiment file."""
    path = Path(path)
    label = str(path)
    if overrides:
        label += f" (overrides: {', '.join(overrides)})"
    raw = read_yaml_mapping(path)
    return validate(apply_overrides(raw, overrides, label), source=path, label=label)


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The parsed YAML mapping of a parameter file; ParamsError naming the file otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such parameter file") from None
    except OSError as err:
        raise ParamsError(f"{path}: cannot read the parameter file ({err.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: the file must be a mapping of keys to values, got {raw!r}")
    return raw
