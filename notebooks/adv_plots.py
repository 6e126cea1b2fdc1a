# %% [markdown]
# # Attacks across a study
#
# Compares the adversarial attacks (DDN, minimal-distance PGD) of a study's experiments, group by
# group (groups from the `report` section of the study file):
#
# - the **empirical CDF of the minimal adversarial l2 distance** per model and attack, with the
#   percentage of inputs **not certified** overlaid where the model was also certified;
# - a table of **success rates and median distances**;
# - the distribution of HeatSmoothing's **L-bound** (approximate) and how it compares with the attacks.
#
# Every number comes from the experiments' `results/attack_<name>.csv` (one row per input: success
# and the l0, l1, l2, linf norms of the smallest successful perturbation; a failed attack has distance
# inf), `results/lbound.csv` and `results/certify.csv`. An experiment without results (failed, or
# without an attack stage) is skipped with a note. Figures go to `<study>/figures/` (PNG and PDF),
# tables to `<study>/results/`.

# %% tags=["parameters"]
params_file = ""  # unused: the study (or experiment) folder holds its parameters
output_dir = ""  # a study or experiment folder; empty: ../outputs/demo after `make demo`, else ../outputs/demo_experiment

# %%
from IPython.display import Markdown, display

from rslib.report import plots, results

study, data, out = results.open_study(output_dir, results.load_attack_group)


# %% [markdown]
# ## Empirical CDF of the minimal adversarial distance
#
# One panel per attack, one colour per model. A solid point (r, p) means: the attack fooled p% of
# **all** attacked inputs with a perturbation of l2 norm at most r. Failed attacks are never counted,
# so each curve levels off at the attack's success rate; inputs the model already misclassifies count
# at distance 0. A curve further right (and lower) means a more robust model against that attack.
#
# Dashed, for models that were also certified: the percent of the same inputs **not** certified at
# l2 radius r, i.e. 100 (1 - certified accuracy). A certificate at radius r rules out every attack of
# size <= r, so for a sound certificate (up to its failure probability alpha) the solid curve of an
# attack on the smoothed classifier stays below the dashed one; the gap measures how loose the
# certificate or how weak the attack is. Attacks on the base model (column `target` below) are not
# bounded by the smoothed classifier's certificate. PGD minimizes the norm in `search_norm`: its l2
# distances are minimal only when that is l2. Tables: `adv_cdf_<group>.csv`, `adv_not_certified_<group>.csv`.

# %%
for adv in data.values():
    group = adv.group
    cdf = results.attack_cdf(study, adv.tables)
    overlay = results.not_certified(study, adv.cert_tables, adv.tables)
    out.tables(group, {"adv_cdf": cdf, "adv_not_certified": overlay})
    display(Markdown(f"### {group.title}"))
    out.figure(plots.plot_study_attack_cdf(cdf, overlay, title=group.title), "adv_cdf", group)

# %% [markdown]
# ## Success rates and distances
#
# Per model and attack: the number of attacked inputs, the success rate, the fraction already
# misclassified without perturbation, and the l2 distances. `median_l2` is over **all** inputs with
# failures counted as inf: it is the distance at which half of the inputs are fooled, and inf when
# fewer than half are. `median_l2_successful` and `mean_l2_successful` are over the successes only
# (they flatter a weak attack, which only succeeds on easy inputs).

# %%
for adv in data.values():
    group = adv.group
    table = results.attack_summary(study, adv.tables)
    out.tables(group, {"adv_summary": table})
    display(Markdown(f"### {group.title}"))
    display(table.round(4))

# %% [markdown]
# ## The L-bound distribution
#
# HeatSmoothing's L-bound, sigma sqrt(pi/2) (p_top - p_runner_up), from each model's softmax (for
# smoothed targets, averaged over noise draws). It bounds the l2 distance to the decision boundary
# only for an exact Gaussian average: for a trained averaged network it is an **approximation**, for
# a plain model no bound at all. Left: its distribution over correctly classified inputs (further
# right = larger predicted robustness). Right: L-bound against the smallest distance any attack
# found on the same input; points below the diagonal are inputs where an attack beat the bound.
# Per-image values in `lbound_<group>.csv`.

# %%
for adv in data.values():
    group = adv.group
    if not len(adv.lbound):
        print(f"group {group.name!r}: no experiment has results/lbound.csv; no L-bound figure")
        continue
    out.tables(group, {"lbound": adv.lbound})
    display(Markdown(f"### {group.title}"))
    display(results.lbound_summary(adv.lbound).round(4))
    out.figure(plots.plot_lbound_distribution(adv.lbound, title=f"{group.title}: L-bound (approximate)"),
         "adv_lbound", group)

# %% [markdown]
# ## Files written

# %%
if not data:
    print("no group has attack results: nothing was written")
for path in out.produced:
    print(path.relative_to(study.dir))
