"""Every parameter file shipped in params/ validates and has a stage plan (a dry run: nothing executes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rslib import cli
from rslib.pipeline import study

PARAMS = Path(__file__).resolve().parents[1] / "params"
FILES = sorted(PARAMS.rglob("*.yaml"))


def test_the_shipped_files_are_all_found() -> None:
    names = {str(p.relative_to(PARAMS)) for p in FILES}
    assert {"demo.yaml", "tutorial.yaml", "cifar10/heat_smoothing.yaml", "cifar10/rs4a_l1.yaml",
            "imagenet/heat_smoothing.yaml", "imagenet/rs4a_l1.yaml", "cifar10/cohen_pretrained.yaml",
            "imagenet/cohen_pretrained.yaml", "cifar10/rs4a_pretrained.yaml", "mnist/cohen.yaml",
            "mnist/cohen_cpu.yaml", "mnist/stability_cpu.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(PARAMS)) for p in FILES])
def test_validates_and_plans(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", str(path), "--output-root", str(tmp_path)]) == 0
    plan = capsys.readouterr().out
    if study.is_study(path):  # a study trains, or certifies imported checkpoints
        assert "train run" in plan or "certify run" in plan
    else:
        assert "run (not run yet)" in plan
    if study.is_study(path):
        loaded = study.load(path)
        assert "cert_plots run" in plan  # every shipped study certifies and draws its figures
        assert cli.main(["validate", str(path), "--shard", "2/2", "--output-root", str(tmp_path)]) == 0
        shard = capsys.readouterr().out
        assert "[shard 2/2]" in shard or len(loaded.experiments) == 1
        assert all(e.experiment.stages for e in loaded.experiments)
    assert not any(tmp_path.iterdir())  # validating writes nothing


def test_the_readme_study_example_is_valid(tmp_path: Path) -> None:
    readme = (PARAMS.parent / "README.md").read_text(encoding="utf-8")
    blocks = [b.split("```", 1)[0] for b in readme.split("```yaml\n")[1:]]
    example = next(b for b in blocks if b.startswith("study: my_study"))
    path = tmp_path / "my_study.yaml"
    path.write_text(example)
    loaded = study.load(path)
    assert [e.name for e in loaded.experiments] == ["baseline", "heat", "Uniform_0.25", "Uniform_0.5",
                                                     "Laplace_0.25", "Laplace_0.5"]
    assert loaded.get("heat").depends_on == ("baseline",)
    assert loaded.groups[0].experiments == ("Uniform_0.25", "Uniform_0.5", "Laplace_0.25", "Laplace_0.5")
