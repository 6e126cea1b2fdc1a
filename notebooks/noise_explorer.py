# %% [markdown]
# # Noise explorer
#
# Every smoothing noise of *Randomized Smoothing of All Shapes and Sizes* (Yang et al. 2020, "rs4a")
# side by side. Choose a noise and its distribution parameters (k, j, a, p where it has them), its
# scale (`sigma`, the per-coordinate RMS, or the noise's own `lambd`), the adversary's norm and the
# input dimension d, and see:
#
# 1. the certified radius against rho (the lower confidence bound on p_A) of **all** noises at that
#    norm, d and sigma, each with its own parameters (as last set with its sliders), the chosen one thick;
# 2. the chosen noise on a real test image (the embedded digits; MNIST too when its data folder exists);
# 3. rs4a's comparison **at matched variance**: every noise at the same sigma, whatever its family.
#    Scale parameters of different families are not comparable, the RMS is: at equal sigma the noises
#    look different, have very different tails, and certify different radii.
#
# Parameters come from small grids, so the radius tables behind every choice are built once (the first
# run on a machine: about 15 s) and then read from rslib's disk cache; an update redraws only the
# figures whose content changed (well under a second on a CPU), and views already seen come back from
# memory.
# PowInf needs a > d and Pow2 a > d/k: their `a` is set as an offset (`a - d`, `a - d/k`).
# The explorer writes nothing; all computation is in `rslib.report.explore_noise`.

# %% tags=["parameters"]
params_file = ""  # optional: an experiment YAML to start from (its noise, sigma and input dimension)
output_dir = ""  # unused: the explorer reads only (every notebook takes the same two parameters)
noise = "Gaussian"  # a name of rslib.core.noises.NOISES
sigma = 0.5  # per-coordinate RMS of the noise
norm = "l2"  # the adversary's norm: l1, l2 or linf
dim = 64  # input dimension of the radius curves (64: the embedded 8x8 digits)
image_index = 0  # test image shown with noise

# %%
from rslib.report import explore_noise

start = {"noise": noise, "value": sigma, "dim": dim}
if params_file:
    start = explore_noise.start_from(params_file)
    print(f"starting from {params_file}: {start}")
explore_noise.precompute()
explorer = explore_noise.NoiseExplorer(**start, norm=norm, index=image_index)

# %% [markdown]
# ## Explore
#
# Sliders apply when released. The parameter sliders shown are those of the chosen noise; the other
# noises keep theirs. Each section below the controls redraws only when a control it depends on changes.

# %%
explorer.widget()

# %% [markdown]
# ## The default view
#
# The same three sections at this notebook's parameters, as static output (what a batch run saves).
#
# ### 1. Certified radius against rho, all noises at the same sigma
#
# Radii grow with rho from 0 at rho = 1/2 (no certificate: the smoothed classifier abstains). A dashed
# line is a radius obtained by norm conversion from another norm's certificate (the legend says which);
# against l2 the Gaussian is hard to beat, against l1 Uniform and Laplace take turns, against linf
# every radius shrinks with d.

# %%
explorer.show("curves")

# %% [markdown]
# ### 2. The chosen noise on a test image
#
# A few draws at the same sigma, then the law of one coordinate in units of sigma against the Gaussian:
# at equal variance, light tails (Uniform, ExpInf) spread every pixel a little, heavy tails (Pareto,
# Laplace-like) leave most pixels nearly clean and move a few a lot.

# %%
explorer.show("image")

# %% [markdown]
# ### 3. Matched variance: every noise at the same sigma
#
# The empirical RMS of the sampled coordinates matches sigma for every noise (the heavy-tailed ones,
# Pareto and PowInf, converge slowly); the radii at a few rho and the intervals of rho where each noise
# certifies the largest radius follow.

# %%
explorer.show("comparison")
