# %% [markdown]
# # Train
#
# Trains the experiment's model with the mode in its `train:` section:
#
# | mode | objective |
# |---|---|
# | `standard` | cross-entropy on clean inputs (the baseline) |
# | `noise` | cross-entropy on `x + delta` with the experiment's noise (Cohen et al. for Gaussian, rs4a otherwise) |
# | `stability` | cross-entropy on `x` + `stability_weight` * KL(p(x) ‖ p(x + delta)) (rs4a used 6) |
# | `smoothadv` | Salman et al.: l2 PGD on the soft smoothed classifier, train on the adversarial points with noise |
# | `direct` | −log of the mean softmax over `noise_draws` noisy copies |
# | `heat` | deterministic Gaussian averaging of `heat_base`: `heat_steps` implicit heat-equation steps |
#
# Checkpoints are written every epoch (`checkpoints/last.pt`), so an interrupted run resumes where it
# stopped; the final model is `checkpoints/model.pt`, metrics are in `results/train_metrics.csv`.

# %% tags=["parameters"]
params_file = "../params/demo/experiment.yaml"  # the stage notebooks chain through this experiment
output_dir = "../outputs/demo_experiment"  # ... and this folder (rslib run sets both)

# %%
from pathlib import Path

import pandas as pd
from IPython.display import display

import rslib.pipeline.params
from rslib.nn import architectures, checkpoints
from rslib.pipeline.stages import train
from rslib.report import plots

experiment = rslib.pipeline.params.load(params_file)
output_dir = Path(output_dir)
print(f"experiment {experiment.experiment}: {experiment.train.mode} training of {experiment.model.arch} "
      f"on {experiment.data.dataset}; noise {experiment.noise.name}(sigma={experiment.noise.sigma})")

# %%
checkpoint = train.fit(experiment, output_dir)
model = checkpoints.load(checkpoint)
print(f"final model: {checkpoint} ({architectures.count_parameters(model):,} parameters)")

# %% [markdown]
# ## Loss and accuracy per epoch
# For heat smoothing, dotted lines separate the implicit steps (each trains a new student).

# %%
metrics = pd.read_csv(output_dir / "results" / "train_metrics.csv")
display(metrics.round(4))
figure = plots.plot_training_curves(metrics)
written = plots.save_figure(figure, output_dir / "figures" / "train_curves")
print("figures:", ", ".join(str(p) for p in written))
