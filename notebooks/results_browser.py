# %% [markdown]
# # Results browser
#
# Every finished experiment and study under an outputs folder, found on disk: an experiment is a
# folder `<root>/<name>/` or `<root>/<study>/<name>/` whose certify stage has written
# `results/certify.csv` (unfinished ones are listed apart and left out), a study a folder with
# `study.json` (written by `rslib run` on a study file, e.g. `make demo`). Pick experiments and see:
#
# 1. their certified-accuracy curves overlaid (abstains count as failures), with the published numbers
#    when the study names a reference;
# 2. the per-image certify table, filtered by class, outcome (correct, wrong, abstain) and radius;
# 3. one image with a few draws of the experiment's noise (the model's prediction on each), the counts,
#    the p_A lower bound and the radii the certify stage recorded for it;
# 4. with an attack, its adversarial example for that image, recomputed with the registered attack and
#    the experiment's attack options, its distance beside the certified radius.
#
# The adversarial example is recomputed against the classifier the attack stage attacked
# (`attack.target`: `smoothed` means the loss averaged over `attack.draws` noise draws and every success
# checked by `Smooth.predict`), or against the **base** model when you switch the target (faster, but
# then a distance below the certified radius contradicts nothing: the base model is not the smoothed
# classifier). Measured for one digits image on a 2-core CPU: DDN about 0.1 s (base) or 0.3 s
# (smoothed), minimal-distance PGD 0.1 to 0.5 s, ALMA 2 to 3 s; every result is kept, so coming back to an
# image is instant. On bigger models, prefer the base target. The browser writes nothing; all computation is in
# `rslib.report.explore_results`.

# %% tags=["parameters"]
params_file = ""  # unused: every experiment folder holds its parameters
output_dir = "../outputs"  # the outputs folder to browse (relative to notebooks/)
experiment = ""  # the experiment shown first, e.g. "demo/cohen" ("": the first with an attack)
image_index = -1  # its test image shown first (-1: the first correct one the attack stage attacked)

# %%
from rslib.report import explore_results

found = explore_results.discover(output_dir)
print(found.summary())
browser = explore_results.ResultsBrowser(found, experiment=experiment, image=image_index)

# %% [markdown]
# ## Browse
#
# The overlay shows the chosen experiment and those selected below it (ctrl- or shift-click);
# sliders apply when released.

# %%
browser.widget()

# %% [markdown]
# ## The default view
#
# The same sections at this notebook's parameters, as static output (what a batch run saves).
#
# ### 1. Certified accuracy against radius

# %%
browser.show("curves")

# %% [markdown]
# ### 2. Per-image certification
#
# Summary of the experiment in the chosen norm, then its rows (all classes, all outcomes, every radius).

# %%
browser.show("table")

# %% [markdown]
# ### 3. One image, its noise and its certificate

# %%
browser.show("image")

# %% [markdown]
# ### 4. An adversarial example for that image

# %%
browser.show("attack")
