"""The noise explorer (``notebooks/noise_explorer.ipynb``): every rs4a noise side by side at matched variance.

Pick a noise with its distribution parameters, a scale (``sigma``, the per-coordinate RMS, or the
noise's own ``lambd``), the adversary's norm and the input dimension; see

- the certified radius against rho of ALL noises (each with its own parameters as last set) at that
  norm, dimension and sigma (``rslib.core.noises.curves.radius_curves``), the chosen one drawn thick;
- the chosen noise on a real test image (the embedded digits; MNIST when its data folder exists);
- rs4a's comparison at matched variance: every noise at the same sigma, its empirical RMS, one draw
  of each on the image, the distribution of one coordinate, and the radii at a few values of rho.

Parameters come from small grids (:data:`GRIDS`) so that every radius table the explorer can ask for
is built once by :func:`precompute` and cached on disk by rslib; after that an update is a few
lookups and figures, and each figure is redrawn only when what it shows changes (the laws of one
coordinate are drawn in units of sigma, so sigma never redraws them). Parameters that must exceed the
dimension are given as offsets: PowInf's ``a - d`` and Pow2's ``a - d/k`` (labels show the resulting ``a``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO
from typing import Any

import ipywidgets as widgets
import numpy as np
import pandas as pd
import torch
from IPython.display import Image, Markdown, display
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from rslib.core.noises import NOISES, NORM_LABELS, Noise, make_noise, noise_from_params
from rslib.core.noises.curves import radii_at, radius_curves, spec_label, winners
from rslib.nn.data import DATASETS, DatasetNotFoundError, load_dataset
from rslib.nn.data.digits import load_digits
from rslib.pipeline.params import load as load_params
from rslib.report import plots

#: Input dimensions offered, by the images they stand for.
DIMS: dict[str, int] = {"digits 1x8x8": 64, "MNIST 1x28x28": 784, "CIFAR-10 3x32x32": 3072,
                        "ImageNet 3x224x224": 150528}
#: Values offered for each distribution parameter (the first of each is not always the default: see DEFAULTS).
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "Pareto": {"a": (2.5, 3.0, 4.0, 6.0, 10.0)},
    "ExpInf": {"k": (1.0, 2.0, 5.0, 10.0, 20.0), "j": (0.0, 1.0, 10.0)},
    "PowInf": {"a": (3.0, 10.0, 100.0)},
    "Exp1": {"k": (0.5, 1.0, 2.0, 5.0)},
    "Exp2": {"k": (1.0, 2.0, 4.0), "j": (0.0, 1.0)},
    "Pow2": {"k": (1.0, 2.0, 4.0), "a": (10.0, 100.0)},
    "Expp": {"p": (0.5, 1.0, 2.0)},
}
#: Default parameter values (those of the noise-radii tutorial where it has them).
DEFAULTS: dict[str, dict[str, float]] = {
    "Pareto": {"a": 3.0}, "ExpInf": {"k": 1.0, "j": 0.0}, "PowInf": {"a": 10.0}, "Exp1": {"k": 1.0},
    "Exp2": {"k": 1.0, "j": 0.0}, "Pow2": {"k": 2.0, "a": 10.0}, "Expp": {"p": 0.5},
}
#: Parameters given relative to the dimension: the widget value is ``a - d`` (PowInf) or ``a - d/k`` (Pow2).
OFFSETS: dict[tuple[str, str], str] = {("PowInf", "a"): "a - d", ("Pow2", "a"): "a - d/k"}
RHO = np.linspace(0.5, 0.999, 200)
RHO_POINTS = (0.6, 0.9, 0.99, 0.999)
SCALES = ("sigma", "lambda")
#: Coordinates drawn per noise for the matched-variance statistics (at least one draw of dimension d).
COORDINATES = 2**16


def noise_names() -> list[str]:
    """Every registered noise, in registration order (rs4a's table)."""
    return list(NOISES.names())


def noise_spec(name: str, dim: int, values: Mapping[str, float] | None = None) -> dict[str, Any]:
    """The spec (``{"name": ..., params}``) of noise ``name`` at ``dim``: ``values`` over :data:`DEFAULTS`,
    offsets (:data:`OFFSETS`) turned into absolute parameters."""
    chosen = {**DEFAULTS.get(name, {}), **{k: float(v) for k, v in (values or {}).items()
                                           if k in DEFAULTS.get(name, {})}}
    spec: dict[str, Any] = {"name": name}
    for key, value in chosen.items():
        if (name, key) == ("PowInf", "a"):
            value = dim + value
        elif (name, key) == ("Pow2", "a"):
            value = dim / chosen["k"] + value
        spec[key] = float(value)
    return spec


def all_specs(dim: int, values: Mapping[str, Mapping[str, float]] | None = None) -> list[dict[str, Any]]:
    """One spec per registered noise at ``dim``: its ``values[name]`` (widget values) over its defaults."""
    return [noise_spec(n, dim, (values or {}).get(n)) for n in noise_names()]


def _key(specs: Sequence[Mapping[str, Any]]) -> tuple:
    return tuple(tuple(s.items()) for s in specs)


@lru_cache(maxsize=512)
def _cached_curves(key: tuple, dim: int, sigma: float, norm: str) -> pd.DataFrame:
    return radius_curves([dict(s) for s in key], dim, sigma, RHO, norm)


def curves(specs: Sequence[Mapping[str, Any]], dim: int, sigma: float, norm: str) -> pd.DataFrame:
    """``radius_curves(specs, dim, sigma, RHO, norm)``, memoized (do not modify the returned frame)."""
    return _cached_curves(_key(specs), int(dim), float(sigma), norm)


def grid_specs(dim: int) -> list[dict[str, Any]]:
    """Every spec the widgets can ask for at ``dim`` (each noise at every combination of its grid)."""
    specs = []
    for name in noise_names():
        combos: list[dict[str, float]] = [{}]
        for key, options in GRIDS.get(name, {}).items():
            combos = [{**combo, key: value} for combo in combos for value in options]
        specs += [noise_spec(name, dim, combo) for combo in combos]
    return specs


def precompute(dims: Sequence[int] = tuple(DIMS.values()), full_dims: Sequence[int] = (64,),
               log: Callable[[str], None] = print) -> int:
    """Build (or load from rslib's disk cache) every radius table the explorer can need: each noise's
    defaults at ``dims``, every grid value at ``full_dims``. Returns the number of specs visited.

    The first run on a machine builds the numerical tables (level-set ones take about a second each);
    later runs only read them."""
    todo = [(spec, d) for d in dims for spec in all_specs(d)] + [(s, d) for d in full_dims for s in grid_specs(d)]
    for spec, dim in todo:
        radius_curves([spec], dim, 1.0, np.array([0.9]), "l1")  # builds every direct norm's table
    log(f"radius tables ready for {len(todo)} (noise, dimension) pairs")
    return len(todo)


@dataclass(frozen=True)
class Setting:
    """What the widgets describe, resolved: the chosen noise, every noise's widget values, the dimension,
    the matched sigma (and the chosen noise's lambd there) and the adversary's norm."""

    name: str
    values: tuple[tuple[str, tuple[tuple[str, float], ...]], ...]
    dim: int
    sigma: float
    lambd: float
    norm: str
    scale_note: str

    def spec(self, dim: int | None = None) -> dict[str, Any]:
        """The chosen noise's spec at ``dim`` (default: the setting's)."""
        return self.specs(dim)[noise_names().index(self.name)]

    def specs(self, dim: int | None = None) -> list[dict[str, Any]]:
        """Every noise's spec at ``dim``, each with its widget values."""
        return all_specs(self.dim if dim is None else dim, {n: dict(v) for n, v in self.values})

    @property
    def label(self) -> str:
        return spec_label(self.spec())


def resolve(name: str, values: Mapping[str, Mapping[str, float]], scale: str, value: float, dim: int,
            norm: str) -> Setting:
    """The :class:`Setting` of the widget values (``values``: per noise name, its parameter values);
    ValueError (naming the problem) for an invalid choice."""
    spec = noise_spec(name, dim, values.get(name))
    params = {k: v for k, v in spec.items() if k != "name"}
    if scale == "sigma":
        noise = make_noise(name, dim, sigma=value, **params)
        note = f"sigma = {noise.sigma:g} (lambd = {noise.lambd:.4g} for {spec_label(spec)} at d = {dim})"
    elif scale == "lambda":
        noise = make_noise(name, dim, lambd=value, **params)
        if not math.isfinite(noise.sigma):
            raise ValueError(f"{spec_label(spec)} has no finite variance: there is no sigma to match")
        note = f"lambd = {value:g} gives sigma = {noise.sigma:.4g} for {spec_label(spec)} at d = {dim}"
    else:
        raise ValueError(f"scale must be one of {', '.join(SCALES)}; got {scale!r}")
    frozen = tuple((n, tuple((k, float(v)) for k, v in sorted(values[n].items()) if k in DEFAULTS.get(n, {})))
                   for n in sorted(values))
    return Setting(name, frozen, int(dim), float(noise.sigma), float(noise.lambd), norm, note)


def start_from(params_file: str | os.PathLike[str]) -> dict[str, Any]:
    """:class:`NoiseExplorer` arguments from an experiment's parameter file: its noise (with parameters,
    offsets for PowInf and Pow2), its sigma and its dataset's input dimension."""
    experiment = load_params(params_file)
    dim = math.prod(DATASETS[experiment.data.dataset].shape)
    name = {key.lower(): key for key in NOISES.names()}.get(experiment.noise.name.lower(), experiment.noise.name)
    values = {key: float(value) for key, value in experiment.noise.params.items()}
    if "a" in values and name == "PowInf":
        values["a"] -= dim
    elif "a" in values and name == "Pow2":
        values["a"] -= dim / values.get("k", DEFAULTS["Pow2"]["k"])
    return {"noise": name, "values": values, "value": float(experiment.noise.sigma), "dim": dim}


# --------------------------------------------------------------------------- images and samples


def image_sources() -> dict[str, Any]:
    """The test splits to draw images from: the embedded digits, and MNIST when its data folder exists."""
    sources: dict[str, Any] = {"digits": load_digits("test")}
    try:
        sources["MNIST"] = load_dataset("mnist", "test")
    except (DatasetNotFoundError, OSError, ValueError):
        pass
    return sources


@lru_cache(maxsize=512)
def _unit_samples(key: tuple, dim: int, seed: int, coordinates: int) -> np.ndarray:
    noise = noise_from_params(dict(key), dim, 1.0)
    generator = torch.Generator().manual_seed(seed)
    return noise.sample_noise(max(1, coordinates // dim), dtype=torch.float64, generator=generator).flatten().numpy()


def sample_coordinates(specs: Sequence[Mapping[str, Any]], dim: int, sigma: float, seed: int = 0,
                       coordinates: int = COORDINATES) -> dict[str, np.ndarray]:
    """Per noise (by label): ``max(1, coordinates // dim)`` seeded draws at ``dim`` and ``sigma``, flattened
    (float64). Drawn once at sigma = 1 (memoized) and scaled: with the same generator, a noise's draws
    at sigma are sigma times its draws at 1."""
    names = noise_names()
    return {spec_label(spec): sigma * _unit_samples(tuple(spec.items()), int(dim),
                                                    seed * 1009 + names.index(spec["name"]), coordinates)
            for spec in specs}


def matched_variance(specs: Sequence[Mapping[str, Any]], dim: int, sigma: float, norm: str,
                     samples: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """rs4a's table at matched variance: per noise its lambd, the target sigma, the empirical RMS of
    ``samples`` (and its relative error), how the ``norm`` radius is certified and the radius at
    :data:`RHO_POINTS` (computed at those exact values)."""
    frame = curves(specs, dim, sigma, norm)
    radii = radii_at(radius_curves(specs, dim, sigma, np.array(RHO_POINTS), norm), RHO_POINTS)
    rows = []
    for spec in specs:
        label = spec_label(spec)
        noise = noise_from_params(spec, dim, sigma)
        rms = float(np.sqrt(np.mean(samples[label] ** 2)))
        source = frame.loc[(frame["noise"] == label) & (frame["source"] != "none"), "source"]
        via = source.iloc[-1] if not source.empty else norm
        rows.append({"noise": label, "lambd": noise.lambd, "sigma": sigma, "empirical_rms": rms,
                     "rms_relative_error": rms / sigma - 1.0,
                     "certificate": "direct" if via == norm else f"from {via}",
                     **{f"R at rho={r:g}": radii.loc[label, r] for r in RHO_POINTS}})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- figures


@contextmanager
def single_thread() -> Iterator[None]:
    """Torch on one thread meanwhile: an explorer's work is a few small tensors, and on a busy machine two
    OpenMP threads waiting for each other turn milliseconds into seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def png(fig: Figure, dpi: int = 72) -> Image:
    """``fig`` rendered once to a PNG display object (small, never shown twice by the inline backend)."""
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return Image(data=buffer.getvalue(), format="png")


def mosaic(pictures: Sequence[torch.Tensor], cols: int, pad: int = 1,
           gap: int = 0) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Images (C, H, W) in [0, 1] (clipped) tiled row by row on a white background, ``pad`` pixels apart
    and ``gap`` more between rows (room for labels), and each tile's (x, y) top-left corner in pixels:
    one ``imshow`` draws them all (much faster than one axes each)."""
    channels, height, width = pictures[0].shape
    rows = math.ceil(len(pictures) / cols)
    step_y, step_x = height + pad + gap, width + pad
    out = np.ones((rows * step_y, cols * step_x - pad, channels))
    corners = []
    for i, picture in enumerate(pictures):
        y, x = (i // cols) * step_y + gap, (i % cols) * step_x
        out[y:y + height, x:x + width] = picture.detach().double().clamp(0, 1).permute(1, 2, 0).numpy()
        corners.append((x, y))
    return (out[:, :, 0] if channels == 1 else out), corners


def show_mosaic(ax: Any, pictures: Sequence[torch.Tensor], labels: Sequence[str], cols: int,
                colors: Sequence[Any] | None = None) -> None:
    """:func:`mosaic` on ``ax``, each tile labelled above it (small font, in ``colors`` if given)."""
    size = pictures[0].shape[-1]
    tiles, corners = mosaic(pictures, cols, pad=max(1, size // 8), gap=max(2, size // 3))
    ax.imshow(tiles, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    for i, ((x, y), label) in enumerate(zip(corners, labels, strict=True)):
        ax.text(x - 0.5, y - 0.7, label, fontsize=7, va="bottom", ha="left",
                color=colors[i] if colors is not None else "black")
    ax.set_axis_off()


def curves_figure(frame: pd.DataFrame, chosen: str, title: str) -> Figure:
    """Radius against rho for every noise of ``frame`` (one norm); ``chosen`` (a label) drawn thick."""
    plots.style()
    fig = Figure(figsize=(10.0, 4.2))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.07, right=0.70, bottom=0.13, top=0.91)
    palette = plots.noise_palette(list(dict.fromkeys(frame["noise"])))
    plots.plot_radius_curves(frame, ax=ax, title=title, palette=palette, logy=frame["norm"].iloc[0] == "linf")
    for line in ax.get_lines():
        if line.get_color() == palette.get(chosen):
            line.set(linewidth=3.6, zorder=5)
    return fig


def draws_figure(image: torch.Tensor, noise: Noise, seed: int = 0, draws: int = 5) -> Figure:
    """The clean image and ``draws`` noisy versions (clipped to [0, 1] for display only)."""
    generator = torch.Generator().manual_seed(seed)
    noisy = noise.sample(image.unsqueeze(0).expand(draws, *image.shape).contiguous(), generator=generator)
    fig = Figure(figsize=(1.45 * (draws + 1), 1.75))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=0.88)
    show_mosaic(ax, [image, *noisy], ["clean", *(f"draw {i + 1}" for i in range(draws))], draws + 1)
    return fig


def density_figure(unit: Mapping[str, np.ndarray], colors: Mapping[str, Any], title: str,
                   width: float = 9.5) -> Figure:
    """The law of one coordinate of each noise in units of sigma (samples at sigma = 1; log density), and
    the standard Gaussian dotted; labelled when there is one noise, coloured as elsewhere otherwise."""
    plots.style()
    fig = Figure(figsize=(width, 2.6))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.85 / width, right=0.98, bottom=0.2, top=0.88)
    edges = np.linspace(-4.0, 4.0, 61)
    middle = (edges[1:] + edges[:-1]) / 2
    for label, values in unit.items():
        counts, _ = np.histogram(values, bins=edges)
        ax.plot(middle, counts / (len(values) * np.diff(edges)), color=colors.get(label), lw=1.4, label=label)
    ax.plot(middle, np.exp(-middle**2 / 2) / math.sqrt(2 * math.pi), color="0.2", ls=":", lw=1.6, label="Gaussian")
    ax.set_yscale("log")
    low = 0.5 / (max(len(v) for v in unit.values()) * (edges[1] - edges[0]))
    ticks = [10.0**e for e in range(math.floor(math.log10(low)) + 1, 1)]
    ax.set_yticks(ticks, [f"{t:g}" for t in ticks])  # plain labels, no minor ticks: much faster to draw
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set(ylim=(low, None), xlabel="one coordinate of delta / sigma", ylabel="density")
    ax.set_title(title, fontsize="medium")
    if len(unit) == 1:
        ax.legend(fontsize="x-small", loc="lower center")
    return fig


def comparison_mosaic(image: torch.Tensor, specs: Sequence[Mapping[str, Any]], sigma: float,
                      colors: Mapping[str, Any], seed: int = 0) -> Figure:
    """One draw of every noise (``specs`` at the image's dimension) on ``image`` at the same sigma, each
    labelled in its colour."""
    generator = torch.Generator().manual_seed(seed)
    pictures = [image] + [noise_from_params(spec, image.numel(), sigma).sample(image.unsqueeze(0), generator=generator)[0]
                          for spec in specs]
    labels = ["clean", *(spec_label(s) for s in specs)]
    fig = Figure(figsize=(8.4, 3.3))
    ax = fig.subplots()
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=0.94)
    show_mosaic(ax, pictures, labels, 6, ["black", *(colors.get(label) for label in labels[1:])])
    return fig


# --------------------------------------------------------------------------- the explorer


def _parameter_label(name: str, key: str) -> str:
    return f"{name} {OFFSETS.get((name, key), key)}"


class NoiseExplorer:
    """The explorer's widgets and views. ``widget()`` is the interactive UI (one ``interactive_output``
    per section, each watching only the controls it depends on); ``show(section)`` displays one section
    statically at the controls' current values. Every figure is memoized by exactly what it shows."""

    SECTIONS = ("curves", "image", "comparison")
    _NEEDS = {"curves": ("noise", "scale", "value", "norm", "dim"),
              "image": ("noise", "scale", "value", "dim", "source", "index"),
              "comparison": ("noise", "scale", "value", "norm", "dim", "source", "index")}

    def __init__(self, noise: str = "Gaussian", values: Mapping[str, float] | None = None, scale: str = "sigma",
                 value: float = 0.5, norm: str = "l2", dim: int = 64, source: str = "digits", index: int = 0,
                 seed: int = 0) -> None:
        self.images = image_sources()
        self.seed = seed
        self._cache: dict[tuple, Any] = {}
        slider = {"continuous_update": False, "style": {"description_width": "initial"}}
        dims = dict(DIMS) if dim in DIMS.values() else {**DIMS, f"d = {dim}": dim}
        self.controls: dict[str, widgets.ValueWidget] = {
            "noise": widgets.Dropdown(options=noise_names(), value=noise, description="noise"),
            "scale": widgets.ToggleButtons(options=[("sigma (RMS)", "sigma"), ("lambda (scale)", "lambda")],
                                           value=scale, description="scale"),
            "value": widgets.FloatSlider(value=value, min=0.05, max=2.0, step=0.05, description="sigma or lambda",
                                         **slider),
            "norm": widgets.ToggleButtons(options=list(NORM_LABELS), value=norm, description="adversary"),
            "dim": widgets.Dropdown(options=[(f"{d} ({what})", d) for what, d in dims.items()], value=dim,
                                    description="dimension d"),
            "source": widgets.Dropdown(options=list(self.images), value=source, description="test images"),
            "index": widgets.IntSlider(value=index, min=0, max=len(self.images["digits"]) - 1,
                                       description="test image", **slider),
        }
        self.parameters: dict[str, widgets.ValueWidget] = {}
        for name, grid in GRIDS.items():
            own = {**DEFAULTS[name], **(values or {})} if name == noise else DEFAULTS[name]
            for key, options in grid.items():
                choices = sorted({*options, float(own[key])})
                self.parameters[f"{name}_{key}"] = widgets.SelectionSlider(
                    options=[(f"{v:g}", v) for v in choices], value=float(own[key]),
                    description=_parameter_label(name, key), **slider)
        self.controls.update(self.parameters)
        self.controls["noise"].observe(lambda change: self._show_parameters(change["new"]), "value")
        self.controls["source"].observe(lambda change: self._fit_index(change["new"]), "value")
        self._show_parameters(noise)
        self._fit_index(source)

    def _show_parameters(self, noise: str) -> None:
        for key, control in self.parameters.items():
            control.layout.display = "" if key.split("_")[0] == noise else "none"

    def _fit_index(self, source: str) -> None:
        self.controls["index"].max = len(self.images[source]) - 1

    def values(self) -> dict[str, Any]:
        """The controls' current values."""
        return {key: control.value for key, control in self.controls.items()}

    def setting(self, values: Mapping[str, Any]) -> Setting:
        """The :class:`Setting` of control values (ValueError for an invalid choice)."""
        per_noise: dict[str, dict[str, float]] = {}
        for key in self.parameters:
            name, parameter = key.split("_")
            per_noise.setdefault(name, {})[parameter] = values.get(key, self.parameters[key].value)
        return resolve(values["noise"], per_noise, values["scale"], values["value"], values["dim"],
                       values.get("norm", "l2"))

    def render(self, section: str, **values: Any) -> list[Any]:
        """The display objects of ``section`` for control ``values``."""
        try:
            setting = self.setting(values)
        except ValueError as err:
            return [Markdown(f"**This choice has no noise to show:** {err}")]
        draw = {"curves": self._curves, "image": self._image, "comparison": self._comparison}[section]
        with single_thread():
            return draw(setting, values)

    def _memo(self, key: tuple, make: Callable[[], Any]) -> Any:
        return self._cache[key] if key in self._cache else self._cache.setdefault(key, make())

    def show(self, section: str) -> None:
        """Display ``section`` at the controls' current values (static output)."""
        for item in self.render(section, **self.values()):
            display(item)

    def _image_of(self, values: Mapping[str, Any]) -> tuple[torch.Tensor, int, int]:
        dataset = self.images[values["source"]]
        index = int(values["index"]) % len(dataset)
        image, label = dataset[index]
        return image, int(label), index

    def _curves(self, setting: Setting, values: Mapping[str, Any]) -> list[Any]:
        specs, dim, sigma, norm = setting.specs(), setting.dim, setting.sigma, setting.norm
        title = f"{norm} adversary, d = {dim}, every noise at sigma = {sigma:.4g}"
        figure = self._memo(("curves", _key(specs), dim, sigma, norm, setting.label), lambda: png(
            curves_figure(curves(specs, dim, sigma, norm), setting.label, title)))
        text = (f"**{len(specs)} noises at matched variance** ({setting.scale_note}). Thick: **{setting.label}**; "
                "dashed: radius by norm conversion; rho = lower confidence bound on p_A. Radii scale with sigma.")
        return [Markdown(text), figure]

    def _image(self, setting: Setting, values: Mapping[str, Any]) -> list[Any]:
        image, label, index = self._image_of(values)
        dim = image.numel()
        spec = setting.spec(dim)
        noise = noise_from_params(spec, dim, setting.sigma)
        draws = self._memo(("draws", tuple(spec.items()), setting.sigma, values["source"], index),
                           lambda: png(draws_figure(image, noise, self.seed)))
        unit = sample_coordinates([spec], dim, 1.0, self.seed)
        law = self._memo(("law", tuple(spec.items()), dim), lambda: png(density_figure(
            unit, {spec_label(spec): "C0"}, f"one coordinate of {spec_label(spec)}, d = {dim}", width=5.0)))
        text = (f"**{spec_label(spec)}** on {values['source']} test image {index} (label {label}), d = {dim}: "
                f"sigma = {noise.sigma:.4g}, lambd = {noise.lambd:.4g}. Pixels are clipped to [0, 1] for display "
                "only; below, the law of one coordinate of the noise (dotted: the Gaussian of the same sigma).")
        return [Markdown(text), draws, law]

    def _comparison(self, setting: Setting, values: Mapping[str, Any]) -> list[Any]:
        specs, dim, sigma, norm = setting.specs(), setting.dim, setting.sigma, setting.norm
        image, _, index = self._image_of(values)
        image_specs = setting.specs(image.numel())
        colors = plots.noise_palette([spec_label(s) for s in specs])
        colors |= dict(zip([spec_label(s) for s in image_specs], colors.values(), strict=True))
        tiles = self._memo(("tiles", _key(image_specs), sigma, values["source"], index),
                           lambda: png(comparison_mosaic(image, image_specs, sigma, colors, self.seed)))
        law = self._memo(("laws", _key(specs), dim), lambda: png(density_figure(
            sample_coordinates(specs, dim, 1.0, self.seed), colors,
            f"one coordinate of every noise (colours as above), d = {dim}: same RMS, different shapes")))

        def tables() -> list[Any]:
            samples = sample_coordinates(specs, dim, sigma, self.seed)
            table = matched_variance(specs, dim, sigma, norm, samples)
            lines = [f"- rho {r.rho_from:.3g} to {r.rho_to:.3g}: **{r.best}** (radius up to {r.radius_to:.4g}; "
                     f"next: {r.runner_up})" for r in winners(curves(specs, dim, sigma, norm)).itertuples()]
            count = len(next(iter(samples.values())))
            return [Markdown(f"Per noise: its lambd at this sigma, the RMS of {count} sampled coordinates "
                             f"(target {sigma:.4g}), and the certified {norm} radius at a few rho:"),
                    table.set_index("noise").round(4),
                    Markdown(f"**Largest certified {norm} radius** (within 1%) at d = {dim}:\n" + "\n".join(lines))]

        text = (f"**Every noise at sigma = {sigma:.4g}**, one draw each on {values['source']} test image {index} "
                f"(d = {image.numel()}), then the law of one coordinate at d = {dim}.")
        return [Markdown(text), tiles, law, *self._memo(("tables", _key(specs), dim, sigma, norm), tables)]

    def view(self, section: str) -> Callable[..., None]:
        """The function ``interactive_output`` calls for ``section``."""
        def update(**values: Any) -> None:
            for item in self.render(section, **values):
                display(item)
        return update

    def widget(self) -> widgets.Widget:
        """The interactive explorer: the controls above one live output per section."""
        rows = [widgets.HBox([self.controls[k] for k in ("noise", "scale", "value")]),
                widgets.HBox([self.controls[k] for k in ("norm", "dim")]),
                widgets.HBox(list(self.parameters.values()), layout=widgets.Layout(flex_flow="row wrap")),
                widgets.HBox([self.controls[k] for k in ("source", "index")])]
        outputs = []
        for section in self.SECTIONS:
            needs = {k: c for k, c in self.controls.items() if k in self._NEEDS[section] or k in self.parameters}
            outputs.append(widgets.interactive_output(self.view(section), needs))
        return widgets.VBox([*rows, *outputs])
