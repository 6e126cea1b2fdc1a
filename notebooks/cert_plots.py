# %% [markdown]
# # Certification across a study
#
# Compares the certification results of a study's experiments, group by group (the groups and
# their radii come from the `report` section of the study file):
#
# - **certified accuracy vs radius** per model and norm (HeatSmoothing's figure: baseline, Cohen,
#   Salman and the Gaussian-averaged model, whose approximate L-bound is dashed);
# - for noises trained at several sigmas, **per-sigma facets** and the **envelope over sigma** per
#   noise (rs4a's figure);
# - a table of certified accuracy at the group's standard radii, best sigma per radius per noise
#   (rs4a's table), and the **average certified radius** (ACR);
# - the **cost** of classification and certification per image, deterministic vs Monte Carlo.
#
# Certified accuracy at radius r is the fraction of **all** evaluated test inputs that the smoothed
# classifier gets right with a certified radius >= r: abstentions count as failures. Every number
# comes from the experiments' `results/certify.csv` (and `results/lbound_certify.csv` for
# deterministic models); nothing is sampled here. An experiment without results (failed, or without
# a certify stage) is skipped with a note. Figures go to `<study>/figures/` (PNG and PDF), tables
# to `<study>/results/`.

# %% tags=["parameters"]
params_file = ""  # unused: the study (or experiment) folder holds its parameters
output_dir = ""  # a study or experiment folder; empty: ../outputs/demo after `make demo`, else ../outputs/demo_experiment

# %%
from IPython.display import Markdown, display

from rslib.core import metrics
from rslib.report import plots, results

study, data, out = results.open_study(output_dir, results.load_certify_group)


# %% [markdown]
# ## Certified accuracy versus radius
#
# One panel per norm of the group, one colour per model. A point (r, a) means: a fraction a of all
# test inputs is classified correctly **and** certified robust to every perturbation of norm <= r.
# The curve at r = 0 is the smoothed classifier's clean accuracy (abstentions are errors); it can
# only decrease with r. Solid lines are Monte-Carlo certificates, valid with probability at least
# 1 - alpha; dashed lines are HeatSmoothing's L-bound of a deterministic (Gaussian-averaged) model,
# an **approximation** that is not a certificate. A legend entry "[from l2]" means the radii of that
# norm come from converting another norm's certificate. The curves are saved as `cert_curves_<group>.csv`.
# When the study names published numbers (`report.reference`), they are drawn dotted with markers in
# the model's colour.

# %%
for cert in data.values():
    group = cert.group
    display(Markdown(f"### {group.title}"))
    out.tables(group, {"cert_curves": cert.curves})
    out.figure(plots.plot_study_certified_accuracy(cert.curves, title=group.title, reference=cert.reference),
               "cert_accuracy", group)

# %% [markdown]
# ## Draws per image (sequential certification)
#
# Only for experiments certified with `certify.radii_of_interest` and `certify.looks > 1`: how many
# estimation draws each input used before its answer at the radii of interest was settled.

# %%
for cert in data.values():
    draws = results.draws_per_image(study, cert.tables)
    if not len(draws):
        continue
    group = cert.group
    display(Markdown(f"### {group.title}"))
    out.tables(group, {"cert_draws": draws})
    out.figure(plots.plot_draws_per_image(draws, title=group.title), "cert_draws", group)
    display(draws.groupby("label", sort=False)[["n", "n_max"]].mean().round(1))

# %% [markdown]
# ## Ours against the published numbers
#
# Only for studies with `report.reference`: at every published l2 radius, our certified accuracy, the
# published one and the difference in percentage points (ours minus published), saved as
# `cert_reference_<group>.csv`.

# %%
for cert in data.values():
    if not len(cert.reference):
        continue
    group = cert.group
    table = results.reference_comparison(cert.tables, cert.reference)
    out.tables(group, {"cert_reference": table})
    display(Markdown(f"### {group.title}"))
    display(table.pivot_table(index="radius", columns="label", values=["ours", "published", "difference_points"],
                              sort=False).round(4))

# %% [markdown]
# ## Certified accuracy at standard radii, best sigma per noise
#
# rs4a's table: for each norm and radius of the group, the certified accuracy; for a noise trained at
# several sigmas, the best over its sigmas and (in parentheses) the sigma that achieves it, so
# different radii may use different models. Rows without a sigma are single models. Long format
# with the winning experiment in `cert_accuracy_at_radii_<group>.csv`.

# %%
for cert in data.values():
    group = cert.group
    table = results.accuracy_at_radii(study, cert.tables, group.radii)
    out.tables(group, {"cert_accuracy_at_radii": table})
    display(Markdown(f"### {group.title}"))
    display(results.accuracy_at_radii_wide(table))

# %% [markdown]
# ## Average certified radius
#
# ACR is the mean over all inputs of the certified radius, counting 0 for misclassified inputs and
# abstentions: the area under the certified-accuracy curve. `certified_accuracy_r0` is the clean
# accuracy of the smoothed classifier, `abstain_rate` the fraction of abstentions, and the median and
# largest radii are over correctly classified inputs.

# %%
for cert in data.values():
    group = cert.group
    table = results.acr_table(study, cert.tables, group.norms)
    out.tables(group, {"cert_acr": table})
    display(Markdown(f"### {group.title}"))
    display(table.round(4))

# %% [markdown]
# ## Per-sigma facets and the envelope over sigma
#
# Only for groups where some noise was trained and certified at two or more sigmas. Facets: one
# panel per noise, one line per sigma; a small sigma gives high accuracy at small radii, a large one
# reaches larger radii at a lower clean accuracy. The grey band and the envelope figure show, at
# every radius, the best accuracy over sigma of that noise: the fair way to compare noises (rs4a).
# The envelope is exact (every sigma's step curve evaluated on the union of their radii) and names
# the winning sigma at every radius in `cert_envelope_<group>.csv`.

# %%
for cert in data.values():
    group = cert.group
    if not cert.sweeps:
        print(f"group {group.name!r}: no noise has two or more sigmas; no facets or envelope")
        continue
    display(Markdown(f"### {group.title}"))
    swept = cert.curves[cert.curves["family"].isin(cert.sweeps)]
    env = metrics.envelope(swept)
    out.tables(group, {"cert_envelope": env})
    for norm in group.norms:
        figure = plots.plot_sigma_facets(cert.curves, norm, list(cert.sweeps), env,
                                         title=f"{group.title}: {norm} certified accuracy per sigma")
        out.figure(figure, f"cert_sigma_{norm}", group)
    out.figure(plots.plot_envelopes(env, title=f"{group.title}: envelope over sigma"), "cert_envelope", group)

# %% [markdown]
# ## Cost per image
#
# Seconds per image, averaged over the certified inputs: Monte-Carlo **prediction** (selecting the
# top class from `n0` noisy draws), **estimation** (`n` draws) and **certification** (both, n0 + n).
# For deterministic (Gaussian-averaged) models, `deterministic_s_per_image` is the one clean forward
# pass that classifies and gives the L-bound, and the ratios say how many times slower the Monte-Carlo
# prediction and certification are. Timings depend on the device (column `device`) and batch sizes.

# %%
for cert in data.values():
    group = cert.group
    table = results.timing_table(study, cert.tables, cert.lbounds)
    out.tables(group, {"cert_timing": table})
    display(Markdown(f"### {group.title}"))
    display(table)

# %% [markdown]
# ## Files written

# %%
if not data:
    print("no group has certification results: nothing was written")
for path in out.produced:
    print(path.relative_to(study.dir))
