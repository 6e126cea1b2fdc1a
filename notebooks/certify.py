# %% [markdown]
# # Certify
#
# Monte-Carlo certification (Cohen et al.) of the experiment's trained model, smoothed with the
# experiment's noise, on every `certify.skip`-th test image (at most `certify.max`):
#
# - the top class is selected from `n0` noisy draws, its probability estimated from `n` independent
#   draws; rho is the one-sided Clopper-Pearson lower bound at level `alpha`, and the noise turns rho
#   into a certified radius for every norm (l1, l2, linf); rho <= 1/2 abstains (radius 0);
# - certified accuracy at radius r is the fraction of **all** evaluated images that are correct with
#   radius >= r: abstains count as failures;
# - rows are appended to disk as they are computed, so an interrupted run resumes where it stopped;
#   under `torchrun -m rslib stage certify` the images are sharded across processes.
#
# With `certify.deterministic: true` (a heat-averaged model) the notebook also shows HeatSmoothing's
# **approximate** L-bound, R = sigma sqrt(pi/2) (p_top - p_runner_up), from one clean forward pass,
# and its cost against Monte-Carlo prediction.
#
# Outputs: `results/certify.csv` (one row per image, raw counts included), `results/certify.json`
# (parameters, noise, checkpoint, timing, provenance), `results/certified_accuracy.csv` (the curves),
# `figures/certified_accuracy.{png,pdf}`, and for deterministic models `results/lbound_certify.csv`.

# %% tags=["parameters"]
params_file = "../params/demo/experiment.yaml"  # the stage notebooks chain through this experiment
output_dir = "../outputs/demo_experiment"  # ... and this folder (rslib run sets both)

# %%
from pathlib import Path

import pandas as pd
from IPython.display import display

import rslib.pipeline.params
from rslib.core import metrics
from rslib.pipeline import layout
from rslib.pipeline.stages import certify as certify_stage
from rslib.report import plots
from rslib.util.tables import write_csv

experiment = rslib.pipeline.params.load(params_file)
output_dir = Path(output_dir)
spec = experiment.certify
print(f"experiment {experiment.experiment}: {experiment.model.arch} on {experiment.data.dataset}, "
      f"noise {experiment.noise.name}(sigma={experiment.noise.sigma}); n0={spec.n0}, n={spec.n}, "
      f"alpha={spec.alpha}; test images 0, {spec.skip}, {2 * spec.skip}, ... (at most {spec.max or 'all'})")

# %%
csv_path = certify_stage.certify_experiment(experiment, output_dir)
table, meta, lbound = certify_stage.read_results(output_dir)
checkpoint = meta["checkpoint"]
print(f"model: {checkpoint['path']} ({checkpoint['arch']}, trained by {checkpoint['train_experiment']!r} "
      f"in mode {checkpoint['train_mode']!r})")
print(f"noise: {meta['noise_description']}")
print(f"{len(table)} images certified -> {csv_path}")

# %% [markdown]
# ## Per-image results
# `count_top` of `n` estimation draws gives `prob_lb` (rho); `prediction` is -1 where the smoothed
# classifier abstains; `source_*` names the norm each radius was certified in (conversion otherwise).

# %%
display(table)

# %% [markdown]
# ## Certified accuracy
# Per norm: accuracy at radius 0 (the smoothed classifier's accuracy, abstains counted as errors),
# the abstain rate, the average certified radius (ACR), then certified accuracy on a grid of radii.

# %%
display(metrics.certify_summary(table).round(4))
grid = metrics.accuracy_table(table)
display(grid.pivot(index="point", columns="norm", values=["radius", "certified_accuracy"]).round(4))

# %%
curves = metrics.accuracy_curves(table)
if lbound is not None:
    curves = pd.concat([curves, metrics.accuracy_curves(metrics.lbound_as_table(lbound), ["l2"],
                                                            metrics.LBOUND_METHOD)], ignore_index=True)
write_csv(layout.results_dir(output_dir) / layout.CERTIFY_CURVES, curves)
figure = plots.plot_certified_accuracy(
    curves, title=f"{experiment.experiment}: {meta['noise_description']}, n = {spec.n}, alpha = {spec.alpha}")
written = plots.save_figure(figure, output_dir / "figures" / "certified_accuracy")
print("figures:", ", ".join(str(p) for p in written))

# %% [markdown]
# ## Cost
# Seconds per image of selection (`n0` draws) and estimation (`n` draws), measured inside the
# certification calls, and the wall time of the last call (all processes, loading included).

# %%
display(pd.Series(meta["timing"], name="value").to_frame())
print(f"device: {meta['device']} ({meta['provenance']['device']}), processes: {meta['world_size']}, "
      f"rslib {meta['provenance']['rslib_version']}, git {meta['provenance']['git_commit']}, "
      f"torch {meta['provenance']['torch_version']}")

# %% [markdown]
# ## Deterministic model: the approximate L-bound
# Only with `certify.deterministic: true`. The L-bound holds for an exact Gaussian average; a trained
# averaged network only approximates one, so these radii are **approximate** (dashed in the figure).
# The rigorous certificate of the same model is the Monte-Carlo one above.

# %%
if lbound is None:
    print("certify.deterministic is false: no L-bound for this experiment")
else:
    info = meta["lbound"]
    display(lbound)
    print(f"APPROXIMATE L-bound (l2): accuracy {info['certified_accuracy_r0']:.4f}, "
          f"mean radius of correct images {lbound.loc[lbound['correct'], 'radius'].mean():.4f}")
    print(f"time per image: one-pass classification {info['seconds_per_image_one_pass'] * 1e3:.4g} ms, "
          f"Monte-Carlo prediction with n0 = {info['monte_carlo_n0']} draws "
          f"{info['seconds_per_image_monte_carlo_prediction'] * 1e3:.4g} ms "
          f"(ratio {info['speedup_one_pass_vs_monte_carlo']:.3g}x)")
