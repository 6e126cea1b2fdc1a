"""Progress that fits where it runs: in a batch run (``RSLIB_PROGRESS_LOG`` set) bars become a few whole lines
in a log file, rate-limited; by hand they are tqdm.auto bars."""

from __future__ import annotations

from tqdm.auto import tqdm

from rslib.util import progress


def test_a_logged_bar_writes_few_whole_lines(tmp_path, monkeypatch):
    log = tmp_path / "certify.log"
    monkeypatch.setenv(progress.LOG_ENV, str(log))
    bar = progress.progress_bar(total=1000, desc="certify", unit="img")
    assert isinstance(bar, progress.LogBar)
    for _ in range(1000):
        bar.update(1)
        bar.set_postfix({"images/s": "12"})  # never forces a line
    bar.close()
    lines = log.read_text().splitlines()
    assert 2 <= len(lines) <= 3  # the start, at most one timed line (10 s apart), the end
    assert lines[0].startswith("certify:   0%") and "1000/1000" in lines[-1] and "images/s=12" in lines[-1]
    assert "\r" not in log.read_text()
    for _ in progress.progress_bar(range(3), desc="epoch 1/2"):
        pass
    assert log.read_text().splitlines()[-1].startswith("epoch 1/2: 100%")


def test_without_the_log_it_is_tqdm_auto(monkeypatch):
    monkeypatch.delenv(progress.LOG_ENV, raising=False)
    bar = progress.progress_bar(total=3, disable=True)
    assert isinstance(bar, tqdm) and not isinstance(bar, progress.LogBar)
    bar.close()
