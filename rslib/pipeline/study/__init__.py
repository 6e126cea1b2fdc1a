"""Studies: many experiments (listed, or swept over a grid) run stage by stage, then the plot notebooks.

A study file has the top-level key ``study`` instead of ``experiment``::

    study: demo                      # output folder outputs/demo/
    description: ...
    defaults: {seed: 0, data: {dataset: digits}, ...}   # merged under every experiment
    experiments:                     # each entry: name, label, and experiment keys over the defaults
      - {name: baseline, label: Baseline, stages: [train, certify, attack], train: {mode: standard}}
    sweeps:                          # each combination of `over` is one experiment
      - name: "rs4a_{noise.name}_{noise.sigma}"
        label: "{noise.name} sigma={noise.sigma}"
        over: {noise.name: [Uniform, Gaussian], noise.sigma: [0.25, 0.5]}
        base: {stages: [train, certify], train: {mode: noise}}
    report:                          # what the plot notebooks compare (reference: published numbers, a CSV)
      groups:
        - {name: heat, title: ..., experiments: [baseline, "rs4a_*"], radii: {l2: [0, 0.25, 0.5]}}

Experiments run into ``outputs/<study>/<name>/`` in dependency order (a ``train.heat_base``,
``certify.checkpoint`` or ``attack.checkpoint`` naming a sibling makes it a dependency); a failed
experiment is reported, its dependents are not run, the rest of the study continues. The plot
notebooks (``cert_plots``, ``adv_plots``) then run over the whole study into ``outputs/<study>/``.
``--shard i/n`` splits the experiments into n parts along dependency chains (a chain never spans
two shards); the plots run once every experiment of the study has finished. ``--jobs N`` runs N
experiments at once in one process, each once its dependencies have run (see :func:`run_study`). The run writes the
resolved study as ``outputs/<study>/study.json``; ``load_written`` reads it back (the plot notebooks,
through ``rslib.report.results``) with the same validation as the study file.
"""

from rslib.pipeline.study.load import (
    REFERENCE_COLUMNS,
    deep_merge,
    is_study,
    load,
    load_experiment_folder,
    load_written,
)
from rslib.pipeline.study.run import (
    StudyReport,
    all_finished,
    check_only,
    format_plan,
    plan_plots,
    produced_files,
    run_study,
    study_dir,
)
from rslib.pipeline.study.schedule import parse_shard, partition, schedule_lanes, shard_of
from rslib.pipeline.study.spec import DEFAULT_RADII, ReportGroup, Study, StudyExperiment

__all__ = ["DEFAULT_RADII", "REFERENCE_COLUMNS", "ReportGroup", "Study", "StudyExperiment", "StudyReport",
           "all_finished", "check_only", "deep_merge", "format_plan", "is_study", "load", "load_experiment_folder", "load_written",
           "parse_shard", "partition", "plan_plots", "produced_files", "run_study", "schedule_lanes", "shard_of",
           "study_dir"]
