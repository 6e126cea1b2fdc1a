"""The noise-radii tutorial: its helpers (radius curves, figures) and a full run through the runner."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from rslib.core.noises import make_noise  # noqa: E402
from rslib.core.noises.curves import (  # noqa: E402
    COLUMNS,
    certificate_sources,
    radii_at,
    radius_curves,
    spec_label,
    winners,
)
from rslib.pipeline import params  # noqa: E402
from rslib.pipeline.runner import run_file as run  # noqa: E402
from rslib.report import plots

REPO = Path(__file__).resolve().parents[1]
FIGURES = ("noise_samples", "radius_l1", "radius_l2", "radius_linf")


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# --------------------------------------------------------------------------- curves


def test_spec_label() -> None:
    assert spec_label({"name": "ExpInf", "k": 10, "j": 0}) == "ExpInf(k=10, j=0)"
    assert spec_label({"name": "Gaussian"}) == "Gaussian"
    assert spec_label({"name": "Pareto", "a": 3.0}) == "Pareto(a=3)"
    assert spec_label({"name": "Expp", "p": 0.5}) == "Expp(p=0.5)"
    with pytest.raises(ValueError, match="name"):
        spec_label({"k": 1})


def test_radius_curves_matches_certify_and_names_sources() -> None:
    specs = [{"name": "Uniform"}, {"name": "Gaussian"}, {"name": "Pareto", "a": 3}]
    rho = np.array([0.3, 0.5, 0.6, 0.9, 0.99])
    frame = radius_curves(specs, dim=64, sigma=0.5, rho=rho, adv=math.inf)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == len(specs) * len(rho)
    assert set(frame["noise"]) == {"Uniform", "Gaussian", "Pareto(a=3)"}
    assert set(frame["norm"]) == {"linf"}
    for spec in specs:
        label = spec_label(spec)
        noise = make_noise(spec["name"], 64, sigma=0.5, **{k: v for k, v in spec.items() if k != "name"})
        rows = frame[frame["noise"] == label]
        np.testing.assert_array_equal(rows["rho"], rho)
        np.testing.assert_allclose(rows["radius"], noise.certify(rho, math.inf), rtol=0, atol=0)
    by = frame.set_index(["noise", "rho"])
    # No certificate at rho <= 1/2.
    assert (frame.loc[frame["rho"] <= 0.5, "radius"] == 0).all()
    assert (frame.loc[frame["rho"] <= 0.5, "source"] == "none").all()
    # Uniform has a direct linf certificate; the Gaussian's linf radius is its l2 radius / sqrt(d);
    # Pareto only has l1, converted with a factor d.
    assert by.loc[("Uniform", 0.9), "source"] == "linf"
    assert by.loc[("Gaussian", 0.9), "source"] == "l2"
    assert "converted from l2 (radius / 8)" in by.loc[("Gaussian", 0.9), "method"]
    assert by.loc[("Gaussian", 0.9), "radius"] == pytest.approx(
        make_noise("Gaussian", 64, sigma=0.5).certify(0.9, 2) / 8)
    assert by.loc[("Pareto(a=3)", 0.9), "source"] == "l1"
    assert by.loc[("Uniform", 0.9), "method"].startswith("closed form")


def test_radius_curves_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="distinct"):
        radius_curves([{"name": "Gaussian"}, {"name": "Gaussian"}], 8, 1.0, np.array([0.9]), 2)
    with pytest.raises(ValueError, match="prob_lb"):
        radius_curves([{"name": "Gaussian"}], 8, 1.0, np.array([1.5]), 2)
    with pytest.raises(ValueError, match="j"):
        radius_curves([{"name": "ExpInf", "k": 10, "j": 63}], 64, 1.0, np.array([0.9]), 1)
    empty = radius_curves([], 8, 1.0, np.array([0.9]), 2)
    assert list(empty.columns) == COLUMNS and empty.empty


def test_radii_at_winners_and_sources() -> None:
    specs = [{"name": "Uniform"}, {"name": "Gaussian"}, {"name": "Laplace"}]
    rho = np.array([0.5, 0.6, 0.9, 0.99, 0.999])
    frame = radius_curves(specs, 3072, 1.0, rho, 1)
    table = radii_at(frame, [0.6, 0.999])
    assert list(table.index) == ["Uniform", "Gaussian", "Laplace"]
    assert list(table.columns) == [0.6, 0.999]
    assert table.loc["Uniform", 0.6] == pytest.approx(2 * math.sqrt(3) * 0.1)
    assert table.loc["Laplace", 0.999] == pytest.approx(-math.log(0.002) / math.sqrt(2))
    best = winners(frame, rtol=0.0)
    assert list(best["best"]) == ["Uniform", "Laplace"]
    assert best["rho_from"].iloc[0] == 0.6 and best["rho_to"].iloc[-1] == 0.999
    sources = certificate_sources(frame).set_index("noise")
    assert sources.loc["Gaussian", "source"] == "l2" and sources.loc["Gaussian", "converted"]
    assert not sources.loc["Laplace", "converted"]


# --------------------------------------------------------------------------- figures


def test_save_figure_writes_png_and_pdf_atomically(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    base = tmp_path / "deep" / "folder" / "curve_rho0.5"
    paths = plots.save_figure(fig, base)
    assert paths == [base.with_name("curve_rho0.5.png"), base.with_name("curve_rho0.5.pdf")]
    assert paths[0].read_bytes().startswith(b"\x89PNG")
    assert paths[1].read_bytes().startswith(b"%PDF")
    assert sorted(p.name for p in base.parent.iterdir()) == ["curve_rho0.5.pdf", "curve_rho0.5.png"]
    # Same figure, same PDF bytes (no creation date inside).
    first = paths[1].read_bytes()
    plots.save_figure(fig, base)
    assert paths[1].read_bytes() == first


def test_plot_radius_curves_dashes_converted_radii() -> None:
    rho = np.linspace(0.5, 0.99, 30)
    frame = radius_curves([{"name": "Uniform"}, {"name": "Gaussian"}], 3072, 1.0, rho, "linf")
    ax = plots.plot_radius_curves(frame, title="linf", logy=True)
    styles = {line.get_label(): line.get_linestyle() for line in ax.get_lines()}
    assert styles["Uniform"] == "-"
    assert styles["Gaussian  [from l2]"] == "--"
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "dashed: norm conversion" in legend
    assert ax.get_yscale() == "log" and ax.get_title() == "linf"
    with pytest.raises(ValueError, match="one norm"):
        plots.plot_radius_curves(pd.concat([frame, frame.assign(norm="l1")]))


def test_plot_noise_samples_grid_is_reproducible() -> None:
    image = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0))
    noises = [{"name": "Gaussian"}, {"name": "ExpInf", "k": 10, "j": 0}, "Laplace"]

    def pixels(fig):
        return [im.get_array().copy() for ax in fig.axes for im in ax.get_images()]

    a = plots.plot_noise_samples(image, noises, [0.1, 1.0], generator_seed=3)
    b = plots.plot_noise_samples(image, noises, [0.1, 1.0], generator_seed=3)
    c = plots.plot_noise_samples(image, noises, [0.1, 1.0], generator_seed=4)
    assert len(a.axes) == 3 * 3  # clean column + two sigmas
    assert all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(b), strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(pixels(a), pixels(c), strict=True))
    assert all(p.min() >= 0 and p.max() <= 1 for p in pixels(a))
    assert a.axes[0].get_ylabel() == "Gaussian" and "sigma" in a.axes[1].get_title()
    assert a.axes[3].get_ylabel() == "ExpInf(k=10, j=0)"


# --------------------------------------------------------------------------- the notebook


@pytest.mark.slow
def test_tutorial_runs_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real notebook through the real runner, from an empty table cache (about 15 s)."""
    monkeypatch.setenv("RSLIB_CACHE_DIR", str(tmp_path / "cache"))  # the kernel inherits it
    overrides = {"tutorial.num_rho": 20}
    report = run(REPO / "params" / "tutorial.yaml", overrides=overrides,
                 output_root=tmp_path / "out", log=lambda *a: None)
    assert report.ok, [s.error for s in report.stages]
    out = report.output_dir
    assert (out / "notebooks" / "tutorial_noise_radii.ipynb").is_file()
    for name in FIGURES:
        for suffix in ("png", "pdf"):
            assert (out / "figures" / f"{name}.{suffix}").stat().st_size > 1000, (name, suffix)
    assert list((tmp_path / "cache" / "tables").glob("*.npz")), "tables were not cached"

    cfg = params.load(REPO / "params" / "tutorial.yaml", **overrides).tutorial
    frame = pd.read_csv(out / "results" / "radius_curves.csv")
    assert list(frame.columns) == COLUMNS
    for norm in ("l1", "l2", "linf"):
        expected = {spec_label(s) for s in getattr(cfg, f"{norm}_noises")}
        assert set(frame.loc[frame["norm"] == norm, "noise"]) == expected
    assert (frame["radius"] >= 0).all() and frame["radius"].notna().all()
    for (norm, noise), part in frame.groupby(["norm", "noise"]):
        assert len(part) == cfg.num_rho, (norm, noise)
        radius = part.sort_values("rho")["radius"].to_numpy()
        assert np.all(np.diff(radius) >= 0), f"{noise} {norm}: radius decreases in rho"
        assert radius[-1] > 0, f"{noise} {norm}: no certificate at rho_max"
    l1 = pd.read_csv(out / "results" / "l1_radii_at_rho.csv", index_col="noise")
    assert l1.loc["Uniform", "0.6"] > l1.loc["Gaussian", "0.6"] > l1.loc["Laplace", "0.6"]
    assert l1.loc["Laplace", "0.999"] > l1.loc["Gaussian", "0.999"] > l1.loc["Uniform", "0.999"]
