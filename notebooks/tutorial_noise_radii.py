# %% [markdown]
# # Noise radii: how far does each smoothing noise certify?
#
# A walkthrough of *Randomized Smoothing of All Shapes and Sizes* (Yang et al., ICML 2020) with
# `rslib`: what a certificate says, what `sigma` and `lambd` mean, what the noises look like on a
# real image, and how the certified radius grows with the confidence `rho` for many noises against
# $\ell_1$, $\ell_2$ and $\ell_\infty$ adversaries, all at the same dimension and noise level
# (CIFAR-10's $d = 3 \times 32 \times 32 = 3072$ and $\sigma = 1$ by default).
#
# Run it with `rslib run params/tutorial.yaml` (parameters in the `tutorial:` section of that file),
# or open it in JupyterLab from `notebooks/`. No model and no download are needed.

# %% tags=["parameters"]
params_file = "../params/tutorial.yaml"
output_dir = "../outputs/tutorial"

# %%
from pathlib import Path

import numpy as np
import pandas as pd
from IPython.display import display

import rslib.pipeline.params
from rslib.core.noises import NORM_LABELS, conversion_factor
from rslib.core.noises.curves import (
    certificate_sources,
    noise_summary,
    radii_at,
    radius_curves,
    spec_label,
    winners,
)
from rslib.core.noises.tables import cache_dir
from rslib.nn.data.digits import load_digits
from rslib.report import plots
from rslib.util.files import atomic_write_json
from rslib.util.provenance import provenance
from rslib.util.tables import write_csv

experiment = rslib.pipeline.params.load(params_file)
cfg = experiment.tutorial
figures_dir = Path(output_dir) / "figures"
results_dir = Path(output_dir) / "results"
written: list[Path] = []
noise_lists = {"l1": cfg.l1_noises, "l2": cfg.l2_noises, "linf": cfg.linf_noises}

plots.style()
pd.set_option("display.max_colwidth", None)
pd.set_option("display.width", 160)
print(f"experiment {experiment.experiment!r}: d = {cfg.dim}, sigma = {cfg.sigma}, "
      f"{cfg.num_rho} values of rho in [{cfg.rho_min}, {cfg.rho_max}]")

# %% [markdown]
# ## 1. What randomized smoothing certifies
#
# Take any classifier $f$ (a neural network, say) and a noise distribution $\delta$. The
# **smoothed classifier** $g(x)$ predicts the class that $f$ returns most often on $x + \delta$.
# Sampling $f(x + \delta)$ many times gives $\rho$, a **lower confidence bound** (Clopper-Pearson,
# at level $\alpha$) on $p_A = P[f(x + \delta) = c_A]$, the probability of the top class $c_A$.
#
# If $\rho > 1/2$, then $g(x + v) = c_A$ for every perturbation $v$ with $\|v\| < R(\rho)$: the
# top class keeps more than half of the probability wherever the adversary moves the input inside
# that ball. The **certified radius** $R$ depends on the noise, on the norm of the adversary and on
# $\rho$ only, not on $f$; that is why we can compare noises here without training anything.
# With probability at least $1 - \alpha$ over the sampling, the certificate is correct.
#
# If $\rho \le 1/2$ there is **no certificate**: the radius is 0 and the smoothed classifier
# abstains. Every curve below therefore starts at radius 0 at $\rho = 1/2$.

# %% [markdown]
# ## 2. `sigma` and `lambd`
#
# Each noise has a **scale parameter** `lambd` ($\lambda$; e.g. the half-width of the uniform cube,
# the radius of the uniform ball). Scales of different families are not comparable, so noises are
# compared at equal **`sigma`**, the per-coordinate RMS:
# $\sigma^2 = E\|\delta\|_2^2 / d$. For the Gaussian $\lambda = \sigma$; for Laplace
# $\lambda = \sigma/\sqrt{2}$; for the cube $[-\lambda, \lambda]^d$, $\lambda = \sqrt{3}\,\sigma$; a
# uniform ball needs radius $\lambda = \sigma\sqrt{d + 2}$. Radii scale linearly with $\lambda$
# (hence with $\sigma$ within a family). `make_noise(name, dim, sigma=..., **params)` converts one
# into the other; the table below is what it gives at this notebook's $d$ and $\sigma$.

# %%
summary = noise_summary([s for norm in NORM_LABELS for s in noise_lists[norm]], cfg.dim, cfg.sigma)
summary[["noise", "dim", "sigma", "lambd", "direct"]]

# %% [markdown]
# `direct` lists the norms for which a noise has its own certificate. For any other norm the radius
# is obtained by **norm conversion**: an $\ell_q$ ball of radius $R$ contains the $\ell_p$ ball of
# radius $R$ when $p < q$, and of radius $R / d^{1/q - 1/p}$ when $p > q$; the best available
# conversion is used. `describe_certificate` says how each radius is computed:

# %%
certificates = summary.set_index("noise")
for norm in NORM_LABELS:
    print(f"--- {norm} adversary")
    for label in map(spec_label, noise_lists[norm]):
        how = certificates.loc[label, f"certificate_{norm}"].split(": ", 1)[1]
        print(f"  {label:<18} {how}")

# %% [markdown]
# ## 3. What the noises look like
#
# Noise is added in $[0, 1]$ pixel space. Here it is on one 8x8 image of scikit-learn's embedded
# digits ($d = 64$, so `ExpInf` needs $j < d - 1 = 63$) at the levels `cfg.sample_sigmas`; pixels
# are clipped to $[0, 1]$ for display only. At equal $\sigma$ the noises differ in shape: the
# heavier the tails (Laplace, and much more Pareto with $a = 3$), the more pixels stay nearly clean
# while a few change a lot; the uniform cube moves every pixel by at most
# $\lambda = \sqrt{3}\,\sigma$.

# %%
SAMPLE_NOISES = [
    {"name": "Gaussian"},
    {"name": "Laplace"},
    {"name": "Uniform"},
    {"name": "UniformBall"},
    {"name": "ExpInf", "k": 10, "j": 0},
    {"name": "Pareto", "a": 3},
]
image, label = load_digits("test")[cfg.image_index]
fig = plots.plot_noise_samples(image, SAMPLE_NOISES, cfg.sample_sigmas, generator_seed=experiment.seed)
fig.suptitle(f"digit {int(label)} (test image {cfg.image_index}) with noise added", y=1.01)
written += plots.save_figure(fig, figures_dir / "noise_samples")

# %% [markdown]
# ## 4. Certified radius versus $\rho$
#
# For each adversary we compute the radius of every configured noise on a grid of $\rho$, at
# $d$ = `cfg.dim` and $\sigma$ = `cfg.sigma`. A solid line is a direct certificate for that norm; a
# dashed line comes from norm conversion (the legend says from which norm). Markers, staggered
# between noises, tell apart curves that coincide (Laplace and `Exp1(k=1)` are the same iid
# Laplace distribution). The $\ell_\infty$ radii span orders of magnitude, so that figure uses a
# log scale.

# %%
rho = np.linspace(cfg.rho_min, cfg.rho_max, cfg.num_rho)
curves = {norm: radius_curves(noise_lists[norm], cfg.dim, cfg.sigma, rho, norm) for norm in NORM_LABELS}
frame = pd.concat(curves.values(), ignore_index=True)
palette = plots.noise_palette(frame["noise"])
norm_names = {"l1": r"$\ell_1$", "l2": r"$\ell_2$", "linf": r"$\ell_\infty$"}
for norm in NORM_LABELS:
    ax = plots.plot_radius_curves(
        curves[norm], palette=palette, logy=(norm == "linf"),
        title=f"{norm_names[norm]} adversary, d = {cfg.dim}, $\\sigma$ = {cfg.sigma:g}",
    )
    written += plots.save_figure(ax.figure, figures_dir / f"radius_{norm}")

write_csv(results_dir / "radius_curves.csv", frame)
atomic_write_json(results_dir / "radius_curves.json", {
    "description": "certified radius vs rho per noise and norm (radius_curves.csv)",
    "experiment": experiment.experiment,
    "parameters": experiment.to_dict()["tutorial"],
    "rows": len(frame),
    "provenance": provenance(),
})
written += [results_dir / "radius_curves.csv", results_dir / "radius_curves.json"]
print(f"{len(frame)} radii ({', '.join(f'{n}: {len(c)}' for n, c in curves.items())}) "
      f"-> {results_dir / 'radius_curves.csv'}")

# %% [markdown]
# ## 5. Who wins, and where
#
# ### $\ell_1$: Uniform, Gaussian and Laplace
#
# The radii at a few values of $\rho$, computed exactly at those values (not read off the grid):

# %%
RHO_TABLE = [0.6, 0.9, 0.99, 0.999]
BASELINES = [{"name": "Uniform"}, {"name": "Gaussian"}, {"name": "Laplace"}]
l1_table = radii_at(radius_curves(BASELINES, cfg.dim, cfg.sigma, RHO_TABLE, "l1"), RHO_TABLE)
write_csv(results_dir / "l1_radii_at_rho.csv", l1_table, index=True)
written.append(results_dir / "l1_radii_at_rho.csv")
print(f"certified l1 radius, d = {cfg.dim}, sigma = {cfg.sigma:g}")
print(l1_table.round(4).to_string())
print("best:", ", ".join(f"rho={r:g}: {l1_table[r].idxmax()}" for r in RHO_TABLE))

# %% [markdown]
# The table answers a question on which the three noises disagree. With the default $d = 3072$,
# $\sigma = 1$ it shows:
#
# - At **moderate $\rho$** (0.6 and 0.9) the **uniform** cube certifies the largest $\ell_1$ radius
#   (0.346 and 1.386, against 0.253 and 1.282 for the Gaussian and 0.158 and 1.138 for Laplace).
#   Its certificate $2\lambda(\rho - 1/2)$ is linear in $\rho$ and starts steeply.
# - As **$\rho \to 1$**, **Laplace** wins (2.77 at $\rho = 0.99$ and 4.39 at 0.999, against 2.33 and
#   3.09 for the Gaussian), because $-\lambda \log(2(1 - \rho))$ grows without bound, faster than
#   the Gaussian's $\sigma\Phi^{-1}(\rho)$. The uniform radius can never exceed
#   $\lambda = \sqrt{3}\,\sigma \approx 1.73$, so it is last at $\rho = 0.99$ and 0.999.
# - The Gaussian is never the best of the three at these four values of $\rho$, but it is in
#   between: the table of winners below shows a narrow band (around $\rho \approx 0.93$-$0.95$)
#   where it leads. It has no $\ell_1$ certificate of its own: its $\ell_1$ radius is its
#   $\ell_2$ radius, since an $\ell_1$ ball lies inside the $\ell_2$ ball of the same radius.
#
# The crossings over the whole grid, for every configured noise and norm (noises within 1% of the
# best radius count as tied, joined by `~`):

# %%
winners(frame, rtol=0.01)

# %% [markdown]
# Reading the winners table with the default settings:
#
# - **$\ell_1$**: the cube and `ExpInf(k=1, j=0)` (whose $\ell_1$ certificate is also linear in
#   $\rho$) lead up to $\rho \approx 0.93$; the Gaussian leads briefly; from $\rho \approx 0.95$ on,
#   Laplace and `Exp1(k=1)` (the same iid Laplace distribution) lead, by a widening margin.
# - **$\ell_2$**: the Gaussian is (near) optimal. Over the whole grid no other noise certifies more
#   than 1% beyond it (see the ratio printed below); the other spherical noises with a concentrated
#   norm, `Exp2(k=1, j=0)` and `Exp2(k=4, j=0)`, are essentially tied with it, the uniform ball is
#   tied only near $\rho = 1/2$ and then falls behind (its radius is bounded), and the power law
#   `Pow2` stays a few percent below.
# - **$\ell_\infty$**: the Gaussian wins everywhere, although its radius is a converted one.

# %%
l2_wide = curves["l2"].pivot(index="rho", columns="noise", values="radius")
l2_wide = l2_wide[l2_wide.max(axis=1) > 0]
if "Gaussian" in l2_wide:
    ratio = l2_wide.max(axis=1) / l2_wide["Gaussian"]
    print(f"l2: best radius / Gaussian radius over the grid: at most {ratio.max():.4f} "
          f"(at rho = {ratio.idxmax():.4f}); best other noise at rho = {cfg.rho_max}: "
          f"{l2_wide.drop(columns='Gaussian').iloc[-1].idxmax()} "
          f"({l2_wide.drop(columns='Gaussian').iloc[-1].max() / l2_wide['Gaussian'].iloc[-1]:.4f} x Gaussian)")

# %% [markdown]
# ### $\ell_\infty$ and norm conversion
#
# In $\ell_\infty$, converting an $\ell_2$ radius costs a factor $\sqrt{d}$ and an $\ell_1$ radius a
# factor $d$; at $d = 3072$ these are about 55 and 3072. The Gaussian has only an $\ell_2$
# certificate, yet $\sigma\Phi^{-1}(\rho)/\sqrt{d}$ beats every direct $\ell_\infty$ certificate in
# the list: the direct certificates of Uniform (closed form), `ExpInf(k=1, j=0)` (closed form),
# Laplace, `ExpInf(k=10, j=0)` and `PowInf` (differential method) are themselves of order
# $1/\sqrt{d}$ (Laplace, about $0.71\times$ the Gaussian) or $1/d$ up to logarithmic factors (the
# cube-shaped families). The numbers, computed exactly at a few values of $\rho$:

# %%
print({f"{q} -> linf": round(conversion_factor(cfg.dim, q, "linf"), 2) for q in ("l1", "l2")})
linf_table = radii_at(radius_curves(cfg.linf_noises, cfg.dim, cfg.sigma, RHO_TABLE, "linf"), RHO_TABLE)
display(linf_table)

# %% [markdown]
# ### Where each radius comes from
#
# Every radius above is **sound**: it is either a closed form, or a lookup in a table built by the
# paper's **differential method** (cube, cross-polytope and iid families) or **level-set method**
# (spherical families), whose interpolation never overstates the radius; a norm conversion only
# shrinks a sound radius. (Approximations such as rs4a's Laplace $\ell_\infty$ formula are not
# used.) Tables are built once and cached on disk, so a second run is fast. The method behind every
# row of `radius_curves.csv`, summarized:

# %%
sources = certificate_sources(frame)
print("table cache:", cache_dir())
sources[["norm", "noise", "source", "converted", "method"]]

# %% [markdown]
# ## 6. Files written

# %%
for path in written:
    print(f"{path.relative_to(output_dir)}  ({path.stat().st_size:,} bytes)")
