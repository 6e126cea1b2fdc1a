"""Progress that fits where it runs: widget bars in JupyterLab, a compact log in batch runs.

:func:`progress_bar` takes tqdm's arguments. By hand, ``tqdm.auto`` draws an ipywidgets bar in a
notebook (a text bar in a terminal). In a batch run, ``rslib run`` starts every stage notebook's kernel
with ``RSLIB_PROGRESS_LOG`` naming ``<experiment>/notebooks/<stage>.log``: then nothing is drawn in the
notebook (an executed notebook keeps no bar updates) and one line per update goes to that file, at most
every :data:`LOG_INTERVAL` seconds and once at the end, so ``tail -f`` and ``rslib status`` show how far
the stage got while it runs.
"""

from __future__ import annotations

import os
from typing import Any

from tqdm import std
from tqdm.auto import tqdm

#: The environment variable naming the progress log of a batch-run stage.
LOG_ENV = "RSLIB_PROGRESS_LOG"
#: Seconds between two lines of the same bar in a progress log.
LOG_INTERVAL = 10.0


class LogBar(std.tqdm):
    """A tqdm bar that appends whole lines (``desc: 40%|... | 12/30 [00:05<00:07, 2.4img/s]``) to a log file."""

    def __init__(self, *args: Any, log: str, **kwargs: Any) -> None:
        self._log = open(log, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close()
        kwargs.update(file=self._log, mininterval=LOG_INTERVAL, ascii=True, dynamic_ncols=False, ncols=100)
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        """Write the bar as one line (tqdm would redraw it in place with carriage returns), unless unchanged."""
        line = (msg if msg is not None else self.__str__()).strip()
        if line and line != getattr(self, "_last", None) and not self._log.closed:
            self._log.write(line + "\n")
            self._log.flush()
            self._last = line

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = True, **kwargs: Any) -> None:
        """Update the postfix; it shows with the next timed line instead of forcing one."""
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def close(self) -> None:
        """Write the final state once, then close the file."""
        if not self.disable and not self._log.closed:
            self.display()
        self.disable = True
        super().close()
        self._log.close()


def progress_bar(*args: Any, **kwargs: Any) -> std.tqdm:
    """A progress bar: logged to ``$RSLIB_PROGRESS_LOG`` when it is set (batch runs), else ``tqdm.auto``."""
    log = os.environ.get(LOG_ENV)
    if log and not kwargs.get("disable"):
        kwargs.pop("leave", None)
        return LogBar(*args, log=log, **kwargs)
    return tqdm(*args, **kwargs)
