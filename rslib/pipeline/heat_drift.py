"""Which Gaussian does a heat-averaged model approximate? The per-step drift table of a heat experiment.

Heat smoothing trains models ``v_1, ..., v_T`` (one per step) meant to approximate the Gaussian average
``A_sigma(x) = E[softmax(u0(x + sigma z))]`` of the base ``u0`` at the certified ``sigma``. For a grid
of widths ``s`` this module measures, on test images ``x_i``,

    distance_s(v) = mean_i || softmax(v(x_i)) - A_s(x_i) ||_2 ,

with ``A_s`` estimated by Monte Carlo (``certify.soft_average``, ``draws`` per image; its standard
error is about ``sqrt(tr Cov / draws)``, below 0.02 per image for 512 draws), for the base (step 0) and
after every step. The width with the smallest distance is the Gaussian the model is closest to; a
setting *tracks* ``sigma`` when the distance at ``sigma`` falls at every step, and meets rslib's target
when it ends at most half the base's (:func:`verdict`). Each row also holds the clean accuracy and
the mean estimate of ``||J||_F^2`` of the softmax output (``heat.jacobian_penalty``) at the images and at
``x + sigma z`` (the points the Gaussian average at ``sigma`` sees; training penalizes only the former
unless the student gets input noise), and how far the step moved the model (``step_change``, to
compare with the base's distance at ``sigma``: what the whole average has to cover). The summary also
gives the Monte-Carlo floor at ``sigma`` (:func:`monte_carlo_floor`): the distance the exact Gaussian
average itself would score, below which no setting can be measured.

The base's averages cost ``len(widths) * draws`` forwards per image; they are computed once per base
checkpoint, image selection, draw count, widths and seed and cached beside the base
(``results/gaussian_averages_<key>.pt``), so every setting averaged from the same base reuses them.
``rslib heat-drift FOLDER`` writes ``results/heat_drift.csv`` and ``heat_drift.json`` of a finished
heat experiment.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from rslib.core.certify import soft_average
from rslib.core.modules import eval_mode
from rslib.core.noises import make_noise
from rslib.nn import checkpoints, heat
from rslib.nn.data import batch_of
from rslib.pipeline import inputs, layout, params
from rslib.util.digest import canonical_json, digest
from rslib.util.files import atomic_write_json, atomic_writer, file_sha256
from rslib.util.tables import write_csv

#: Widths of the Gaussian averages compared (the certified sigma is added when missing).
DEFAULT_WIDTHS = (0.25, 0.3, 0.35, 0.4, 0.5, 0.6, 0.75, 1.0)
#: The target: the distance at sigma ends at most this fraction of the base's distance.
TARGET_RATIO = 0.5
DRIFT_TABLE = "heat_drift"


def distance_column(width: float) -> str:
    """The table column of the distance to the average at ``width``."""
    return f"distance_s{width:g}"


def gaussian_averages(base: nn.Module, x: torch.Tensor, widths: Sequence[float], draws: int,
                      seed: int = 0) -> torch.Tensor:
    """``(W, B, K)``: Monte-Carlo ``E[softmax(base(x + s z))]`` for each width ``s`` (``draws`` per image)."""
    dim = math.prod(x.shape[1:])
    out = []
    for j, width in enumerate(widths):
        generator = torch.Generator(device=x.device).manual_seed(seed * 1_000 + j)
        out.append(soft_average(base, x, make_noise("Gaussian", dim, sigma=float(width)), draws,
                                generator=generator).float())
    return torch.stack(out)


def softmax_of(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``softmax(model(x))`` in float32, without gradients, in eval mode."""
    with torch.no_grad(), eval_mode(model):
        return torch.softmax(model(x), dim=-1).float()


def distances_to(probs: torch.Tensor, averages: torch.Tensor) -> torch.Tensor:
    """``(W,)``: mean over images of ``||probs_i - averages[w, i]||_2`` for every width."""
    return (probs.unsqueeze(0) - averages).norm(dim=-1).mean(dim=1)


def mean_penalty(model: nn.Module, x: torch.Tensor, *, draws: int, eps: float, chunk: int,
                 generator: torch.Generator) -> float:
    """Mean estimate of ``||J||_F^2`` of ``softmax(model)`` over the rows of ``x`` (in chunks)."""
    with eval_mode(model):
        total = sum(float(heat.jacobian_penalty(model, x[i:i + chunk], draws=draws, eps=eps, generator=generator,
                                                output="softmax").detach()) * len(x[i:i + chunk])
                    for i in range(0, len(x), chunk))
    return total / len(x)


def step_row(step: int, model: nn.Module, probs: torch.Tensor, x: torch.Tensor, noisy: torch.Tensor,
             y: torch.Tensor, averages: torch.Tensor, widths: Sequence[float], *, penalty_draws: int = 10,
             penalty_eps: float = 0.01, chunk: int = 250, seed: int = 0) -> dict[str, Any]:
    """One row of the drift table from the model's softmax ``probs`` at ``x``: distances per width, the
    closest width, accuracy, and the penalty at the images and at ``noisy`` (``x + sigma z``, where the
    Gaussian average at ``sigma`` looks)."""
    distances = distances_to(probs, averages)
    generator = torch.Generator(device=x.device).manual_seed(seed)
    options = {"draws": penalty_draws, "eps": penalty_eps, "chunk": chunk, "generator": generator}
    at_images = mean_penalty(model, x, **options)
    best = int(distances.argmin())
    return {"step": step, **{distance_column(w): float(d) for w, d in zip(widths, distances, strict=True)},
            "closest_width": float(widths[best]), "accuracy": float((probs.argmax(1) == y).float().mean()),
            "jacobian_penalty": at_images, "jacobian_penalty_noisy": mean_penalty(model, noisy, **options)}


def monte_carlo_floor(first: torch.Tensor, second: torch.Tensor) -> float:
    """The mean distance of one Monte-Carlo average from the exact one, from two independent estimates.

    ``first`` and ``second`` (``(B, K)``) estimate the same averages with independent draws, so
    ``E||first - second||^2 = 2 E||first - A||^2``; ``mean_i ||first_i - second_i|| / sqrt(2)`` is the
    distance a model equal to the exact average ``A`` would score in the table: no setting can be
    measured below it."""
    return float((first - second).norm(dim=-1).mean()) / math.sqrt(2.0)


def drift_table(base: nn.Module, steps: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, widths: Sequence[float],
                averages: torch.Tensor, sigma: float, *, seed: int = 0, **row_options: Any) -> pd.DataFrame:
    """Rows for the base (step 0) and every step's model, with the distance at ``sigma`` relative to the
    base's (``ratio_to_base``) and how far each step moved the model (``step_change``: mean over images of
    ``||softmax(v_k(x)) - softmax(v_{k-1}(x))||_2``; 0 for the base). The penalty off the data is taken at
    ``x + sigma z``, one seeded ``z`` per image, the same for every step."""
    chain = [base, *steps]
    probs = [softmax_of(model, x) for model in chain]
    generator = torch.Generator(device=x.device).manual_seed(seed + 1)
    noisy = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    rows = [step_row(k, model, p, x, noisy, y, averages, widths, seed=seed, **row_options)
            for k, (model, p) in enumerate(zip(chain, probs, strict=True))]
    table = pd.DataFrame(rows)
    at_sigma = table[distance_column(sigma)]
    table["ratio_to_base"] = at_sigma / at_sigma.iloc[0]
    table["step_change"] = [0.0, *(float((after - before).norm(dim=-1).mean())
                                   for before, after in itertools.pairwise(probs))]
    return table


def verdict(table: pd.DataFrame, sigma: float) -> dict[str, Any]:
    """Whether the distance at ``sigma`` falls at every step (``tracks_sigma``) and ends at most
    ``TARGET_RATIO`` of the base's (``meets_target``: both)."""
    at_sigma = table[distance_column(sigma)].to_numpy()
    falls = bool((at_sigma[1:] < at_sigma[:-1]).all())
    final = float(table["ratio_to_base"].iloc[-1])
    return {"tracks_sigma": falls, "final_ratio_to_base": final,
            "meets_target": falls and final <= TARGET_RATIO, "target_ratio": TARGET_RATIO}


def with_sigma(widths: Sequence[float], sigma: float) -> list[float]:
    """The widths, ascending, with ``sigma`` among them."""
    return sorted({float(w) for w in widths} | {float(sigma)})


def cached_averages(base_path: Path, base: nn.Module, x: torch.Tensor, selection: Sequence[int],
                    widths: Sequence[float], draws: int, seed: int, folder: Path) -> torch.Tensor:
    """:func:`gaussian_averages`, read from ``folder`` when computed before for the same base weights,
    images, widths, draws and seed (an unreadable or foreign file is recomputed and replaced)."""
    key = canonical_json({"base_sha256": file_sha256(base_path), "images": list(map(int, selection)),
                          "widths": list(widths), "draws": draws, "seed": seed})
    path = folder / f"gaussian_averages_{digest(key)[:16]}.pt"
    if path.exists():
        try:
            saved = torch.load(path, map_location=x.device, weights_only=True)
            if saved.get("key") == key:
                return saved["averages"]
        except Exception:  # noqa: BLE001 -- any unreadable cache is recomputed
            pass
    averages = gaussian_averages(base, x, widths, draws, seed)
    with atomic_writer(path, "wb") as handle:
        torch.save({"key": key, "averages": averages.cpu()}, handle)
    return averages


def experiment_drift(exp_dir: str | Path, *, images: int = 1000, skip: int = 10, draws: int = 512,
                     widths: Sequence[float] = DEFAULT_WIDTHS, device: str = "cpu",
                     log: Any = print) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The drift table of the finished heat experiment in ``exp_dir`` on every ``skip``-th test image (at
    most ``images``), written to its ``results/heat_drift.csv`` with ``heat_drift.json`` (settings, verdict)."""
    exp_dir = Path(exp_dir)
    source = exp_dir / layout.PARAMS_FILE
    if not source.is_file():
        raise FileNotFoundError(f"no {source}: give the folder of a heat experiment run by rslib")
    experiment = params.load(source)
    train = experiment.train
    if train is None or train.mode != "heat":
        raise ValueError(f"{exp_dir} is not a heat experiment (train.mode is "
                         f"{None if train is None else train.mode!r}); the drift table needs heat steps")
    step_paths = [layout.heat_step_checkpoint(exp_dir, k) for k in range(1, train.heat_steps + 1)]
    missing = [str(p) for p in step_paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"heat steps not trained yet: {', '.join(missing)} (run the train stage first)")
    sigma = float(experiment.noise.sigma)
    widths = with_sigma(widths, sigma)
    base_path = layout.resolve_checkpoint(train.heat_base, exp_dir)
    base = checkpoints.load(base_path, device=device)
    dataset, selection = inputs.test_selection(experiment, skip, images)
    x, y = batch_of(dataset, selection, torch.device(device))
    log(f"Gaussian averages of {base_path} at s = {widths} ({draws} draws, {len(selection)} images)")
    # beside the base when it is an experiment's checkpoint, so every setting averaged from it shares them
    cache = layout.results_dir(base_path.parent.parent if base_path.parent.name == layout.CHECKPOINTS else exp_dir)
    averages = cached_averages(base_path, base, x, selection, widths, draws, experiment.seed, cache)
    # a second, independent estimate at sigma: how far Monte-Carlo error alone puts the exact average
    second = cached_averages(base_path, base, x, selection, [sigma], draws, experiment.seed + 1, cache)
    floor = monte_carlo_floor(averages[widths.index(sigma)], second[0])
    steps = [checkpoints.load(path, device=device) for path in step_paths]
    table = drift_table(base, steps, x, y, widths, averages, sigma, seed=experiment.seed)
    summary = {"experiment": experiment.experiment, "sigma": sigma, "widths": widths, "draws": draws,
               "images": len(selection), "skip": skip, "base": str(base_path),
               "settings": {k: getattr(train, k) for k in ("heat_steps", "heat_gamma", "heat_fidelity", "heat_reinit",
                                                          "heat_student_noise", "heat_draws", "epochs", "lr",
                                                          "weight_decay")},
               "monte_carlo_floor": floor, "floor_ratio_to_base": floor / float(table[distance_column(sigma)].iloc[0]),
               **verdict(table, sigma)}
    results = layout.results_dir(exp_dir)
    write_csv(results / f"{DRIFT_TABLE}.csv", table)
    atomic_write_json(results / f"{DRIFT_TABLE}.json", summary)
    return table, summary
