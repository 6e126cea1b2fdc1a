"""The noise-radii tutorial as a stage: its notebook alone, driven by the ``tutorial`` section."""

from rslib.pipeline.stage import STAGES, Stage

STAGES.register("tutorial_noise_radii", Stage(
    "tutorial_noise_radii", notebook="tutorial_noise_radii", requires=("tutorial",),
    writes=("results/radius_curves.csv", "results/l1_radii_at_rho.csv", "figures/"),
    description="certified radius against rho for many noises, noisy samples and the norm conversions"))
