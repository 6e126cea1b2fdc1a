"""The study-level stages: the plot notebooks, run once over a whole study after its experiments."""

from rslib.pipeline.stage import STAGES, Stage

STAGES.register("cert_plots", Stage(
    "cert_plots", notebook="cert_plots", reads=("certify",), study=True,
    writes=("results/cert_*.csv", "figures/cert_*"),
    description="certified-accuracy curves, envelopes over sigma and tables of every report group"))
STAGES.register("adv_plots", Stage(
    "adv_plots", notebook="adv_plots", reads=("attack",), study=True,
    writes=("results/adv_*.csv", "figures/adv_*"),
    description="attack distance CDFs, the L-bound distributions and tables of every report group"))
