# %% [markdown]
# # Attack
#
# Adversarial attacks on the experiment's trained model, on every `attack.skip`-th test image (at
# most `attack.max`), with the attacks in `attack.attacks`:
#
# - **DDN** (decoupled direction and norm, Rony et al. 2019; l2) and **PGD** in minimal-distance mode
#   (a bisection over the budget in `[0, eps_max]`, in `attack.norm`): both report the smallest
#   successful perturbation they found, with its l0, l1, l2 and linf norms;
# - `attack.target: base` attacks the model as a plain classifier; a heat-averaged (HeatSmoothing)
#   model is such a deterministic classifier. `attack.target: smoothed` attacks the randomized-smoothing
#   classifier: the loss is taken on the mean softmax over `attack.draws` noise draws, and a success
#   must convince the smoothed prediction (`Smooth.predict` with `judge_n` draws, where an abstention
#   is **not** a success, or a majority vote);
# - a failed attack is recorded with distance **inf** (never 0, never the budget); an image the target
#   already misclassifies is a success at distance 0. Rates and the distance CDF are fractions of
#   **all** attacked images.
#
# `results/lbound.csv` holds HeatSmoothing's test statistics (softmax margins, their input-gradient
# norms, and the **approximate** L-bound sigma sqrt(pi/2) (p_top - p_runner_up)); for smoothed targets
# the softmax is averaged over R noise draws.
#
# Outputs: `results/attack_<name>.csv` and `.json` per attack, `results/lbound.csv`,
# `results/attack.json` (parameters, seed, checkpoint, timing per image, provenance),
# `results/attack_cdf.csv` and `figures/attack_cdf.{png,pdf}`. A finished attack is reused when its
# parameters and checkpoint are unchanged; an interrupted one resumes from its appended rows.

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
from rslib.pipeline.stages import attack as attack_stage
from rslib.report import plots
from rslib.util.tables import write_csv

experiment = rslib.pipeline.params.load(params_file)
output_dir = Path(output_dir)
spec = experiment.attack
print(f"experiment {experiment.experiment}: {spec.target} target, attacks {', '.join(spec.attacks)} "
      f"(PGD norm {spec.norm}, eps_max {spec.eps_max}); test images 0, {spec.skip}, {2 * spec.skip}, ... "
      f"(at most {spec.max or 'all'})")

# %%
paths = attack_stage.attack_experiment(experiment, output_dir)
tables, meta, lbound = attack_stage.read_results(output_dir)
checkpoint = meta["checkpoint"]
print(f"model: {checkpoint['path']} ({checkpoint['arch']}, trained by {checkpoint['train_experiment']!r} "
      f"in mode {checkpoint['train_mode']!r})")
print(f"target: {meta['target']['description']}")
print(f"success judged by: {meta['target']['judge']}")
for name, path in paths.items():
    print(f"{name}: {path}")

# %% [markdown]
# ## Per-image results
# One row per image and attack; `success` False rows carry `inf` distances.

# %%
display(pd.concat(tables.values(), ignore_index=True))

# %% [markdown]
# ## Distances and success rates
# `median_<norm>` is over **all** images (failures count as inf, so it is inf when fewer than half are
# fooled); `median_<norm>_successful` and `mean_<norm>_successful` are over the successful images only.
# `misclassified_clean` is the fraction already misclassified without perturbation.

# %%
norms = ["l2"] + ([spec.norm] if spec.norm != "l2" else [])
display(metrics.attack_summary(tables, norms=["l0", "l1", "l2", "linf"]).T.round(4))

# %% [markdown]
# ## Empirical CDF of the adversarial distance
# For each attack, the fraction of **all** images attacked successfully at a distance <= r: failures
# are never counted, so each curve levels off at its success rate.

# %%
cdf = pd.concat([metrics.distance_cdf(tables, norm) for norm in norms], ignore_index=True)
write_csv(layout.results_dir(output_dir) / layout.ATTACK_CDF, cdf)
figure = plots.plot_attack_cdf(cdf, title=f"{experiment.experiment}: {spec.target} target, "
                                          f"{meta['selection']['images']} test images")
written = plots.save_figure(figure, output_dir / layout.FIGURES / layout.ATTACK_FIGURE)
print("figures:", ", ".join(str(p) for p in written))

# %% [markdown]
# ## Test statistics and the approximate L-bound
# Margins, margin-gradient norms and first-order distance estimates per image. The L-bound holds for
# an exact Gaussian average; a trained averaged network (or a finite-R Monte-Carlo average) only
# approximates one, and for a plain model it is no bound at all. Below: how often a successful attack
# found a perturbation smaller than the L-bound on a correctly classified image.

# %%
info = meta["lbound"]
print(f"L-bound ({info['softmax']}), sigma = {info['sigma']}, top-{info['topk']}: APPROXIMATE")
display(lbound.describe().T.round(4))
comparison = metrics.lbound_comparison(tables, lbound)
correct = comparison["correct"].astype(bool)
print(f"clean accuracy (top-1 of this softmax): {correct.mean():.4f}; correctly classified images whose "
      f"L-bound exceeds the smallest attack distance: {int(comparison['lbound_exceeds_attack'].sum())} of "
      f"{int(correct.sum())}")
display(comparison.round(4))

# %% [markdown]
# ## Cost
# Seconds per image of each attack (measured around the attack calls), and the wall time of the last
# call (loading included).

# %%
timing = pd.DataFrame({name: entry["timing"] for name, entry in meta["attacks"].items()})
display(timing)
print(f"device: {meta['device']} ({meta['provenance']['device']}), processes: {meta['world_size']}, "
      f"rslib {meta['provenance']['rslib_version']}, git {meta['provenance']['git_commit']}, "
      f"torch {meta['provenance']['torch_version']}")
