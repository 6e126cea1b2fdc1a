"""Figures: radius curves, noisy samples, and atomic PNG + PDF saving.

Plotting only: every number shown comes from rslib's computing modules. Nothing here calls
``plt.show``, so it runs headless (papermill, CI); notebooks display the returned figures.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from rslib.core.noises import noise_from_params
from rslib.core.noises.curves import spec_label
from rslib.util.files import atomic_write_bytes

FIGURE_FORMATS = ("png", "pdf")
PNG_DPI = 150
_NORM_TEX = {"l1": r"$\ell_1$", "l2": r"$\ell_2$", "linf": r"$\ell_\infty$"}


def style() -> None:
    """The seaborn look used by rslib figures (white grid, notebook-sized fonts)."""
    sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig: Figure, path_without_suffix: str | os.PathLike[str]) -> list[Path]:
    """Save ``fig`` as ``<path>.png`` (dpi 150) and ``<path>.pdf``; return both paths.

    Each file is rendered in memory, then written atomically (temporary file + rename), so a
    crash never leaves a half-written figure; missing folders are created."""
    base = Path(path_without_suffix)
    paths = []
    for fmt in FIGURE_FORMATS:
        buffer = BytesIO()
        # pdf without CreationDate: identical bytes for identical figures
        options = {"dpi": PNG_DPI} if fmt == "png" else {"metadata": {"CreationDate": None}}
        fig.savefig(buffer, format=fmt, bbox_inches="tight", **options)
        paths.append(base.with_name(f"{base.name}.{fmt}"))
        atomic_write_bytes(paths[-1], buffer.getvalue())
    return paths


# After tab10: colours that no tab10 colour resembles (black, navy, dark goldenrod, ...).
_EXTRA_COLORS = ["#000000", "#000080", "#b8860b", "#8b008b", "#556b2f", "#ff00ff", "#00ff7f",
                 "#4682b4", "#a0522d", "#708090"]
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def noise_palette(labels: Sequence[str]) -> dict[str, Any]:
    """A fixed, distinct colour per noise label, so a noise keeps its colour across figures."""
    labels = list(dict.fromkeys(labels))
    colors = sns.color_palette("tab10") + sns.color_palette(_EXTRA_COLORS)
    return {label: colors[i % len(colors)] for i, label in enumerate(labels)}


def _segments(rho: np.ndarray, radius: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``radius`` where ``mask`` (extended one point to the left so pieces join), NaN elsewhere."""
    keep = mask.copy()
    keep[:-1] |= mask[1:]
    return rho, np.where(keep, radius, np.nan)


def plot_radius_curves(frame: pd.DataFrame, ax: Axes | None = None, title: str | None = None, *,
                       palette: Mapping[str, Any] | None = None, logy: bool = False, legend_loc: str = "outside",
                       markers: int = 8) -> Axes:
    """Certified radius versus rho, one line per noise, for a ``radius_curves`` frame of one norm.

    Solid where the radius is a direct certificate for the norm, dashed where it comes from norm
    conversion (the legend names the norm converted from). Each line also carries about
    ``markers`` markers, staggered between noises, so curves that coincide stay distinguishable.
    ``logy`` puts radii on a log axis (zero radii, at rho <= 1/2, are then not drawn).
    ``legend_loc`` is a matplotlib location, or 'outside' (right of the axes)."""
    norms = frame["norm"].unique()
    if len(norms) != 1:
        raise ValueError(f"plot_radius_curves needs one norm per axes; the frame has {list(norms)}")
    norm = norms[0]
    if ax is None:
        _, ax = plt.subplots(figsize=(9, 5), layout="constrained")
    labels = list(dict.fromkeys(frame["noise"]))
    colors = dict(palette) if palette is not None else noise_palette(labels)
    any_converted = False
    for i, label in enumerate(labels):
        part = frame[frame["noise"] == label].sort_values("rho")
        rho = part["rho"].to_numpy()
        radius = part["radius"].to_numpy(dtype=float)
        if logy:
            radius = np.where(radius > 0, radius, np.nan)
        # Points without a certificate (rho <= 1/2) are drawn in the style of their neighbours.
        source = part["source"].mask(part["source"] == "none").bfill().ffill().fillna(norm).to_numpy()
        converted = source != norm
        via = sorted(set(source[converted]))
        name = label + (f"  [from {', '.join(via)}]" if via else "")
        any_converted |= bool(via)
        step = max(1, len(rho) // max(1, markers))
        line = {"color": colors.get(label), "lw": 1.8, "marker": _MARKERS[i % len(_MARKERS)],
                "markersize": 5, "markevery": (min(len(rho) - 1, (i * step) // len(labels)), step)}
        if (~converted).any():
            ax.plot(*_segments(rho, radius, ~converted), label=name, **line)
            name = None
        if converted.any():
            ax.plot(*_segments(rho, radius, converted), ls="--", label=name, **line)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(r"$\rho$ = lower bound on P[$f(x + \delta)$ = top class]")
    ax.set_ylabel(f"certified {_NORM_TEX.get(norm, norm)} radius")
    if title is not None:
        ax.set_title(title)
    handles, names = ax.get_legend_handles_labels()
    if any_converted:
        handles += [Line2D([], [], color="0.3", lw=1.8), Line2D([], [], color="0.3", lw=1.8, ls="--")]
        names += ["solid: direct certificate", "dashed: norm conversion"]
    if legend_loc == "outside":
        ax.legend(handles, names, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
                  frameon=False, borderaxespad=0.0)
    else:
        ax.legend(handles, names, loc=legend_loc, fontsize="small", framealpha=0.9)
    ax.set_xlim(frame["rho"].min(), frame["rho"].max())
    return ax


def plot_noise_samples(image: torch.Tensor, noises: Sequence[Mapping[str, Any] | str], sigmas: Sequence[float],
                       generator_seed: int = 0, *, show_clean: bool = True, cmap: str = "gray") -> Figure:
    """A grid of ``image + noise`` (rows: noises, columns: sigmas), clipped to [0, 1] for display.

    ``image`` is one image (C, H, W) or (H, W) in [0, 1]; ``noises`` are specs such as
    ``{"name": "Pareto", "a": 3}`` (or bare names), built at ``dim = image.numel()``. One seeded
    ``torch.Generator`` draws every sample, so the figure is reproducible. With ``show_clean``,
    the first column shows the clean image."""
    image = torch.as_tensor(image, dtype=torch.float32).detach().cpu()
    if image.dim() == 2:
        image = image.unsqueeze(0)
    if image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"image must have shape (H, W), (1, H, W) or (3, H, W); got {tuple(image.shape)}")
    specs = [{"name": n} if isinstance(n, str) else dict(n) for n in noises]
    if not specs or not sigmas:
        raise ValueError("need at least one noise and one sigma")
    generator = torch.Generator().manual_seed(int(generator_seed))
    offset = 1 if show_clean else 0
    ncols = len(sigmas) + offset
    fig, axes = plt.subplots(len(specs), ncols, figsize=(1.7 * ncols + 0.6, 1.8 * len(specs) + 0.4), squeeze=False)

    def show(ax: Axes, picture: torch.Tensor) -> None:
        pixels = picture.clamp(0.0, 1.0).permute(1, 2, 0).numpy()
        if pixels.shape[2] == 1:
            ax.imshow(pixels[:, :, 0], cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(pixels, interpolation="nearest")
        ax.set(xticks=[], yticks=[])
        ax.grid(False)

    for row, spec in enumerate(specs):
        label = spec_label(spec)
        if show_clean:
            show(axes[row, 0], image)
            axes[row, 0].set_title("clean", fontsize="small")
        for col, sigma in enumerate(sigmas):
            noise = noise_from_params(spec, image.numel(), float(sigma))
            noisy = noise.sample(image.unsqueeze(0), generator=generator)[0]
            ax = axes[row, col + offset]
            show(ax, noisy)
            ax.set_title(f"{label}\n$\\sigma$ = {float(sigma):g}", fontsize="small")
        axes[row, 0].set_ylabel(label, fontsize="small")
    fig.tight_layout()
    return fig


def plot_training_curves(metrics: pd.DataFrame) -> Figure:
    """Loss and accuracies per epoch from ``results/train_metrics.csv`` (one line per heat phase)."""
    style()
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    frame = metrics.reset_index(drop=True).assign(step=lambda f: range(1, len(f) + 1))
    ax_loss.plot(frame["step"], frame["train_loss"], marker="o", label="training loss")
    ax_loss.set(xlabel="epoch (all phases)", ylabel="loss", title="training objective")
    for column, label in [("train_acc", "train (inputs the loss saw)"), ("test_acc", "test, clean"),
                          ("test_noisy_acc", "test, with noise")]:
        if column in frame and frame[column].notna().any():
            known = frame[frame[column].notna()]  # test accuracy is measured every train.eval_every epochs
            ax_acc.plot(known["step"], known[column], marker="o", label=label)
    ax_acc.set(xlabel="epoch (all phases)", ylabel="accuracy", ylim=(0, 1.02), title="accuracy")
    for phase_start in frame.index[frame["phase"].diff().fillna(0) != 0]:
        for ax in (ax_loss, ax_acc):
            ax.axvline(frame.loc[phase_start, "step"] - 0.5, color="grey", linestyle=":", linewidth=1)
    ax_loss.legend()
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    return fig


def _titled(fig: Figure, title: str | None) -> Figure:
    """``fig`` with ``title`` above its panels (when given), laid out tight."""
    if title is not None:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def _norm_panels(frame: pd.DataFrame, key: str, width: float, height: float, sharey: bool = False
                 ) -> tuple[Figure, list[tuple[Axes, str, pd.DataFrame]], dict[str, Any]]:
    """A figure with one panel per norm of ``frame`` (in order of appearance): the figure, (axes, norm,
    that norm's rows) per panel, and a color per value of column ``key``."""
    style()
    norms = list(dict.fromkeys(frame["norm"]))
    fig, axes = _panels(len(norms), width, height, sharey=sharey)
    panels = [(ax, norm, frame[frame["norm"] == norm]) for ax, norm in zip(axes, norms, strict=True)]
    return fig, panels, noise_palette(list(dict.fromkeys(frame[key])))


def plot_certified_accuracy(curves: pd.DataFrame, title: str | None = None) -> Figure:
    """Certified accuracy versus radius, one panel per norm, from ``metrics.accuracy_curves`` rows.

    ``curves`` has columns method, norm, radius, certified_accuracy (an exact step function: between
    two points the accuracy is that of the right one, drawn 'steps-pre') and optionally source (the
    norms the radii were certified in; the legend says so when it is not the panel's norm). Each
    method gets a line; methods whose name says 'approximate' are dashed, so the L-bound never
    passes for a certificate."""
    fig, panels, colors = _norm_panels(curves, "method", 4.6, 3.8)
    for ax, norm, part in panels:
        for method, line in part.groupby("method", sort=False):
            line = line.sort_values("radius")
            source = str(line["source"].iloc[0]) if "source" in line else norm
            via = [_NORM_TEX.get(s, s) for s in source.split(",") if s and s != norm]
            label = method + (f" [from {', '.join(via)}]" if via else "")
            ax.plot(line["radius"], line["certified_accuracy"], drawstyle="steps-pre", lw=1.8,
                    color=colors[method], ls="--" if "approximate" in method.lower() else "-", label=label)
        ax.set(xlabel=f"{_NORM_TEX.get(norm, norm)} radius", ylabel="certified accuracy", ylim=(0, 1.02),
               xlim=(0, None), title=f"{_NORM_TEX.get(norm, norm)} adversary")
        ax.legend(loc="upper right", fontsize="small")
    return _titled(fig, title)


def plot_attack_cdf(cdf: pd.DataFrame, title: str | None = None) -> Figure:
    """Empirical CDF of adversarial distances, one panel per norm, from ``metrics.distance_cdf`` rows.

    ``cdf`` has columns attack, norm, distance, fraction (the fraction of ALL inputs attacked
    successfully at a distance <= ``distance``; failures never count, so each curve ends at its
    attack's success rate) and images. Drawn as right-continuous steps ('steps-post'); the legend
    gives each attack's success rate and the distance at which half of all inputs are fooled
    (inf when fewer than half are)."""
    fig, panels, colors = _norm_panels(cdf, "attack", 6.0, 4.2)
    for ax, norm, part in panels:
        for i, (attack, line) in enumerate(part.groupby("attack", sort=False)):
            line = line.sort_values("distance")
            distance, fraction = line["distance"].to_numpy(float), line["fraction"].to_numpy(float)
            rate = fraction[-1]
            crossing = distance[np.argmax(fraction >= 0.5)] if (fraction >= 0.5).any() else np.inf
            label = f"{attack.upper()}: {rate:.0%} fooled, half of all inputs by {crossing:.3g}"
            ax.plot(distance, fraction, drawstyle="steps-post", lw=1.8, color=colors[attack], label=label,
                    ls=("-", "--", "-.", ":")[i % 4])
        tex = _NORM_TEX.get(norm, norm)
        ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
        ax.set(xlabel=f"{tex} distance r", ylabel="fraction of ALL inputs\nfooled at distance <= r",
               ylim=(0, 1.02), xlim=(0, None), title=f"{tex} adversarial distance (failures never count)")
        ax.legend(loc="best", fontsize="small")
    return _titled(fig, title)


# --------------------------------------------------------------------------- study figures


def _caption(fig: Figure, text: str) -> None:
    """A wrapped caption under the figure (kept by ``save_figure``'s tight bounding box)."""
    fig.text(0.01, 0.0, text, ha="left", va="top", fontsize="small", color="0.25", wrap=True)


def _legend_right(fig: Figure, axes: Sequence[Axes], extra: Sequence[tuple[Any, str]] = ()) -> None:
    """One legend right of the last axes with every labelled line of ``axes`` (once) and ``extra``."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            entries.setdefault(label, handle)
    for handle, label in extra:
        entries.setdefault(label, handle)
    axes[-1].legend(list(entries.values()), list(entries), loc="upper left", bbox_to_anchor=(1.02, 1.0),
                    fontsize="small", frameon=False, borderaxespad=0.0)


def _panels(count: int, width: float = 4.6, height: float = 3.8, ncols: int | None = None,
            sharey: bool = True) -> tuple[Figure, list[Axes]]:
    ncols = ncols or count
    nrows = -(-count // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False, sharey=sharey)
    axes = list(grid.ravel())
    for ax in axes[count:]:
        ax.set_visible(False)
    return fig, axes[:count]


def _converted_note(part: pd.DataFrame, norm: str, what: str = "models") -> str:
    """'' or a line saying which models' radii in ``norm`` come from norm conversion (``source`` column)."""
    sources = part.drop_duplicates("label").set_index("label")["source"].astype(str)
    via = {label: [s for s in src.split(",") if s and s != norm] for label, src in sources.items()}
    converted = {label: v for label, v in via.items() if v}
    if not converted:
        return ""
    names = ", ".join(_NORM_TEX.get(s, s) for s in sorted({s for v in converted.values() for s in v}))
    who = f"all {what}" if len(converted) == len(via) else f"{len(converted)} of {len(via)} {what}"
    return f"\n(radii converted from {names} for {who})"


def _finish(fig: Figure, axes: Sequence[Axes], title: str | None, caption: str | None = None,
            extra: Sequence[tuple[Any, str]] = ()) -> None:
    """Title, layout, then the shared legend right of the last axes and the caption below."""
    _titled(fig, title)
    _legend_right(fig, axes, extra)
    if caption:
        _caption(fig, caption)


def plot_study_certified_accuracy(curves: pd.DataFrame, title: str | None = None,
                                  reference: pd.DataFrame | None = None) -> Figure:
    """Certified accuracy vs radius for a study group: one panel per norm, one colour per model.

    ``curves`` are ``rslib.report.results.group_curves`` rows (label, method, norm, source, radius,
    certified_accuracy; exact step functions drawn 'steps-pre'). The Monte-Carlo certificate is
    solid; HeatSmoothing's approximate L-bound (a method whose name says 'approximate') is dashed
    in the model's colour. A panel whose radii come from norm conversion says so in its title.
    ``reference`` (``rslib.report.results.reference_rows``: label, radius, accuracy) adds the published
    numbers to the l2 panel: dotted, with markers, in the model's colour."""
    fig, panels, colors = _norm_panels(curves, "label", 5.0, 4.0, sharey=True)
    for ax, norm, part in panels:
        tex = _NORM_TEX.get(norm, norm)
        for (label, method), line in part.groupby(["label", "method"], sort=False):
            line = line.sort_values("radius")
            approximate = "approximate" in method.lower()
            ax.plot(line["radius"], line["certified_accuracy"], drawstyle="steps-pre", lw=1.8,
                    color=colors[label], ls="--" if approximate else "-",
                    label=label + (": L-bound (approximate)" if approximate else ""))
        if reference is not None and len(reference) and norm == "l2":
            for label, published in reference.groupby("label", sort=False):
                published = published.sort_values("radius")
                ax.plot(published["radius"], published["accuracy"], ls=":", marker="o", ms=3.5, lw=1.2,
                        color=colors.get(label, "0.3"), label=f"{label}: published")
        monte_carlo = part[~part["method"].str.contains("approximate", case=False)]
        ax.set(xlabel=f"{tex} radius r", ylim=(0, 1.02), xlim=(0, None),
               title=f"{tex} adversary" + _converted_note(monte_carlo, norm))
    axes = [ax for ax, _, _ in panels]
    axes[0].set_ylabel("certified accuracy\n(fraction of all inputs)")
    has_lbound = curves["method"].str.contains("approximate", case=False).any()
    _finish(fig, axes, title, certified_accuracy_caption(has_lbound, reference is not None and len(reference) > 0))
    return fig


def certified_accuracy_caption(has_lbound: bool, has_reference: bool) -> str:
    """The caption of a certified-accuracy figure, naming only the line styles it draws."""
    text = ("Certified accuracy at r: fraction of ALL evaluated inputs classified correctly with a certified "
            "radius >= r (abstains count as failures). Solid: Monte-Carlo certificate (holds with probability "
            ">= 1 - alpha).")
    if has_lbound:
        text += " Dashed: HeatSmoothing's L-bound, an approximation, not a certificate."
    if has_reference:
        text += " Dotted with markers: the published numbers (report.reference)."
    return text


def plot_sigma_facets(curves: pd.DataFrame, norm: str, families: Sequence[str],
                      envelope: pd.DataFrame | None = None, title: str | None = None, ncols: int = 4) -> Figure:
    """Monte-Carlo certified accuracy in ``norm``: one panel per noise family, one line per sigma.

    ``curves``: ``group_curves`` rows; ``families``: the families to draw (those with several
    sigmas). With ``envelope`` (``rslib.report.results.envelope`` rows) each panel also shows the family's
    envelope, the best accuracy over sigma at every radius, as a thick grey band. A sigma keeps its
    colour in every panel."""
    style()
    part = curves[(curves["norm"] == norm) & curves["family"].isin(families)
                  & ~curves["method"].str.contains("approximate", case=False)]
    sigmas = sorted(part["sigma"].unique())
    palette = dict(zip(sigmas, sns.color_palette("viridis", len(sigmas)), strict=True))
    ncols = min(ncols, len(families))
    fig, axes = _panels(len(families), width=4.2, height=3.6, ncols=ncols)
    tex = _NORM_TEX.get(norm, norm)
    for i, (ax, family) in enumerate(zip(axes, families, strict=True)):
        if envelope is not None:
            env = envelope[(envelope["family"] == family) & (envelope["norm"] == norm)].sort_values("radius")
            ax.plot(env["radius"], env["certified_accuracy"], drawstyle="steps-pre", lw=6, color="0.6", alpha=0.45,
                    label="envelope (best over σ)")
        lines = part[part["family"] == family]
        for _, line in sorted(lines.groupby("experiment", sort=False), key=lambda item: item[1]["sigma"].iloc[0]):
            line = line.sort_values("radius")
            sigma = line["sigma"].iloc[0]
            ax.plot(line["radius"], line["certified_accuracy"], drawstyle="steps-pre", lw=1.6,
                    color=palette[sigma], label=f"σ = {sigma:g}")
        ax.set(xlabel=f"{tex} radius r", ylim=(0, 1.02), xlim=(0, None), title=family + _converted_note(
            lines.assign(label=lines["experiment"]), norm, "sigmas"))
        if i % ncols == 0:
            ax.set_ylabel("certified accuracy")
    _finish(fig, axes, title)
    return fig


def plot_envelopes(envelope: pd.DataFrame, title: str | None = None) -> Figure:
    """The envelope over sigma per noise family: one panel per norm, one line per family, from
    ``rslib.report.results.envelope`` rows (exact step functions, drawn 'steps-pre')."""
    fig, panels, colors = _norm_panels(envelope, "family", 5.0, 4.0, sharey=True)
    for ax, norm, part in panels:
        tex = _NORM_TEX.get(norm, norm)
        for i, (family, line) in enumerate(part.groupby("family", sort=False)):
            line = line.sort_values("radius")
            ax.plot(line["radius"], line["certified_accuracy"], drawstyle="steps-pre", lw=1.8,
                    color=colors[family], ls=("-", "--", "-.", ":")[i // 10 % 4], label=family)
        ax.set(xlabel=f"{tex} radius r", ylim=(0, 1.02), xlim=(0, None), title=f"{tex} adversary")
    axes = [ax for ax, _, _ in panels]
    axes[0].set_ylabel("best certified accuracy over σ")
    _finish(fig, axes, title, "Envelope: at every radius, the highest certified accuracy reached by any sigma of "
                              "the noise (each sigma is a separately trained and certified model).")
    return fig


def plot_study_attack_cdf(cdf: pd.DataFrame, not_certified: pd.DataFrame | None = None,
                          title: str | None = None) -> Figure:
    """Empirical CDF of the minimal adversarial l2 distance: one panel per attack, one colour per model.

    ``cdf``: ``rslib.report.results.attack_cdf`` rows (percent of ALL inputs attacked successfully at distance
    <= r; failures never count; 'steps-post'). With ``not_certified`` (``rslib.report.results.not_certified``
    rows) each model with a certificate also gets a dashed line in its colour: the percent of inputs
    NOT certified at radius r, which for a sound certificate bounds the attackable percent from above."""
    style()
    attacks = list(dict.fromkeys(cdf["attack"]))
    colors = noise_palette(list(dict.fromkeys(cdf["label"])))
    overlay = not_certified if not_certified is not None and len(not_certified) else None
    right = float(cdf["distance"].max())
    if overlay is not None:
        right = max(right, float(overlay["radius"].max()))
    fig, axes = _panels(len(attacks), width=5.0, height=4.2)
    for ax, attack in zip(axes, attacks, strict=True):
        for label, line in cdf[cdf["attack"] == attack].groupby("label", sort=False):
            line = line.sort_values("distance")
            x = np.append(line["distance"].to_numpy(float), right)
            y = np.append(line["percent_attacked"].to_numpy(float), line["percent_attacked"].iloc[-1])
            ax.plot(x, y, drawstyle="steps-post", lw=1.8, color=colors[label], label=label)
        if overlay is not None:
            for label, line in overlay[overlay["attack"] == attack].groupby("label", sort=False):
                line = line.sort_values("radius")
                x = np.append(line["radius"].to_numpy(float), right)
                y = np.append(line["percent_not_certified"].to_numpy(float), 100.0)
                ax.plot(x, y, drawstyle="steps-pre", lw=1.4, ls="--", color=colors.get(label, "0.3"))
        ax.set(xlabel=r"$\ell_2$ distance r", ylim=(0, 102), xlim=(0, right), title=attack.upper())
    axes[0].set_ylabel("% of inputs attacked\nsuccessfully at distance <= r")
    extra = [(Line2D([], [], color="0.3", lw=1.8), "solid: attacked (empirical CDF)")]
    text = ("Solid: percent of ALL attacked inputs whose attack succeeded at an l2 distance <= r (failed attacks "
            "never count; inputs misclassified without perturbation count at 0).")
    if overlay is not None:
        extra.append((Line2D([], [], color="0.3", lw=1.4, ls="--"),
                      "dashed: NOT certified at radius r\n= 100 (1 - certified accuracy)"))
        text += (" Dashed: percent of the same inputs NOT certified at l2 radius r, 100 (1 - certified accuracy); "
                 "for a sound certificate (up to its alpha) an attack on the smoothed classifier stays below it.")
    _finish(fig, axes, title, text, extra)
    return fig


def plot_lbound_distribution(distribution: pd.DataFrame, title: str | None = None) -> Figure:
    """HeatSmoothing's APPROXIMATE L-bound per model, from ``rslib.report.results.lbound_distribution`` rows.

    Left: ECDF of the L-bound over correctly classified inputs. Right (when some attack succeeded on a
    correct input): L-bound against the smallest successful attack distance; points below the
    diagonal are inputs where the approximate bound does not hold."""
    style()
    correct = distribution[distribution["correct"].astype(bool)]
    attacked = correct[np.isfinite(correct["attack_l2"].to_numpy(float))]
    colors = noise_palette(list(dict.fromkeys(distribution["label"])))
    fig, axes = _panels(2 if len(attacked) else 1, width=5.0, height=4.2, sharey=False)
    for label, part in correct.groupby("label", sort=False):
        values = np.sort(part["lbound"].to_numpy(float))
        percent = 100.0 * np.arange(1, len(values) + 1) / len(values)
        axes[0].plot(np.insert(values, 0, 0.0), np.insert(percent, 0, 0.0), drawstyle="steps-post", lw=1.8,
                     color=colors[label], label=label)
    axes[0].set(xlabel=r"L-bound ($\ell_2$, approximate)", ylabel="% of correctly classified inputs\n"
                "with L-bound <= x", ylim=(0, 102), xlim=(0, None), title="L-bound distribution")
    if len(attacked):
        ax = axes[1]
        for label, part in attacked.groupby("label", sort=False):
            ax.scatter(part["lbound"], part["attack_l2"], s=16, alpha=0.75, color=colors[label], label=label)
        top = float(max(attacked["lbound"].max(), attacked["attack_l2"].max())) * 1.05 or 1.0
        ax.plot([0, top], [0, top], color="0.4", lw=1, ls=":")
        ax.set(xlabel="L-bound (approximate)", ylabel=r"smallest successful attack ($\ell_2$)", xlim=(0, top),
               ylim=(0, top), title="L-bound vs attacks (correct inputs)")
    extra = [(Line2D([], [], color="0.4", lw=1, ls=":"), "attack distance = L-bound")] if len(attacked) else []
    _finish(fig, axes, title, "L-bound = sigma sqrt(pi/2) (p_top - p_runner_up): it holds for an exact Gaussian "
                              "average; a trained averaged network only approximates one, and for a plain model it "
                              "is no bound. Right: points below the diagonal are inputs where an attack beat the "
                              "L-bound.", extra)
    return fig


def plot_draws_per_image(draws: pd.DataFrame, title: str | None = None) -> Figure:
    """Histogram of the estimation draws each input used under sequential certification, one colour
    per model (``rslib.report.results.draws_per_image`` rows: label, n, n_max)."""
    style()
    labels = list(dict.fromkeys(draws["label"]))
    colors = noise_palette(labels)
    fig, axes = _panels(1, width=6.0, height=4.0)
    ax = axes[0]
    bins = np.unique(np.concatenate([[0], np.sort(draws["n"].unique())]))
    edges = np.append(bins, bins[-1] * 1.05) if len(bins) > 1 else np.array([0, 1])
    for label in labels:
        used = draws.loc[draws["label"] == label, "n"].to_numpy()
        ax.hist(used, bins=edges, histtype="step", lw=1.8, color=colors[label],
                label=f"{label} (mean {used.mean():.0f} of {int(draws['n_max'].max())})")
    ax.set(xlabel="estimation draws used per input", ylabel="inputs")
    _finish(fig, axes, title, "Sequential certification: each input stops at the first look where more draws "
                              "cannot change which radii of interest it certifies.")
    return fig
