"""Scheduling a study's experiments: shards along dependency chains, and lanes that run experiments side
by side as their dependencies finish."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from rslib.pipeline.params import ParamsError
from rslib.pipeline.study.spec import Study, StudyExperiment


def parse_shard(text: str) -> tuple[int, int]:
    """``"2/3"`` -> (2, 3): the second of three shards (1-based)."""
    index, sep, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i = n = 0
    if not sep or n < 1 or not 1 <= i <= n:
        raise ParamsError(f"--shard {text!r} must be i/n with 1 <= i <= n, e.g. --shard 1/4")
    return i, n


def shard_of(study: Study, count: int) -> dict[str, int]:
    """Shard (1-based) of every experiment: dependency chains stay together, stages balanced greedily."""
    return partition(study.experiments, count)


def partition(experiments: Sequence[StudyExperiment], count: int) -> dict[str, int]:
    """Part (1-based, of ``count``) of every experiment: dependency chains among ``experiments`` stay in
    one part, and parts are balanced greedily by number of stages."""
    parent = {e.name: e.name for e in experiments}

    def root(name: str) -> str:
        while parent[name] != name:
            name = parent[name]
        return name

    for e in experiments:
        for dep in e.depends_on:
            if dep in parent:
                parent[root(e.name)] = root(dep)
    components: dict[str, list[StudyExperiment]] = {}
    for e in experiments:
        components.setdefault(root(e.name), []).append(e)
    load = [0] * count
    assignment = {}
    for members in sorted(components.values(), key=lambda m: -sum(len(e.experiment.stages) for e in m)):
        target = load.index(min(load))
        load[target] += sum(len(e.experiment.stages) for e in members)
        assignment.update({e.name: target + 1 for e in members})
    return assignment


def schedule_lanes(experiments: Sequence[StudyExperiment], workers: int,
                   run: Callable[[StudyExperiment], None]) -> None:
    """Call ``run`` on every experiment from ``workers`` threads at once, each taking the first one (in
    study order) whose dependencies among ``experiments`` have been handled, so experiments that share a
    finished dependency run side by side. An exception in one stops the others from starting new ones
    and is raised once the running ones end."""
    names = {e.name for e in experiments}
    pending, handled = list(experiments), set()
    state = threading.Condition()
    stop = threading.Event()

    def next_ready() -> StudyExperiment | None:
        with state:
            while pending and not stop.is_set():
                ready = next((e for e in pending if all(d in handled or d not in names for d in e.depends_on)), None)
                if ready is not None:
                    pending.remove(ready)
                    return ready
                state.wait()
            return None

    def worker() -> None:
        while (e := next_ready()) is not None:
            try:
                run(e)
            except BaseException:
                stop.set()
                raise
            finally:
                with state:
                    handled.add(e.name)
                    state.notify_all()

    with ThreadPoolExecutor(workers, thread_name_prefix="lane") as pool:
        futures = [pool.submit(worker) for _ in range(workers)]
        try:
            for future in futures:
                future.result()
        except BaseException:
            stop.set()   # no worker starts another experiment; running notebooks end with the interrupt
            with state:
                state.notify_all()
            raise


@contextmanager
def threads_per_job(jobs: int) -> Iterator[None]:
    """``OMP_NUM_THREADS = cpu_count // jobs`` for the kernels started inside (unless already set)."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // jobs))
    try:
        yield
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
