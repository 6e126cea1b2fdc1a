"""The layers hold: import-linter's contracts (``pyproject.toml``: util <- core <- nn <- pipeline <- report
<- cli, no torch in util, layout knows paths only) pass, and no module of rslib takes part in an import
cycle. A wrong import fails here, in CI, not only in ``make lint``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe is not None, "lint-imports is missing: `make setup` installs import-linter (the dev extra)"
    done = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "BROKEN" not in done.stdout and done.stdout.count("KEPT") >= 4


def test_no_import_cycles():
    graph = grimp.build_graph("rslib", cache_dir=None)
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if imported != module and graph.chain_exists(imported, module):
                cycles.append(" -> ".join(graph.find_shortest_chain(imported, module)) + f" -> {imported}")
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(cycles))[:20])
