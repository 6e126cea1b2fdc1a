"""Noise-batch size and memory format chosen per model, input shape, device and dtype.

``choose(model, x)`` returns a :class:`Choice`: the rows per forward (and whether the model runs in
``channels_last``) with the best forward throughput, from a short time-boxed measurement the first
time (random rows shaped like ``x``, eval mode; see :func:`measure`), then from a JSON cache on disk
(``$RSLIB_CACHE_DIR/autotune`` or the user cache dir) and from memory. An integer batch size or an
explicit memory format overrides the measurement; with both given nothing is measured. The model runs
in the chosen format inside ``with memory_format(model, choice.channels_last)``; ``with tuned(model, x)
as choice`` does both, and :func:`in_format` puts a batch of inputs in the chosen layout. Every
Monte-Carlo loop of rslib uses it by default (``batch_size="auto"``): ``Smooth.certify`` and
``Smooth.predict``, the attacks' judges and ``certify.soft_average``.

The cache key holds the architecture (module classes, parameter and buffer shapes and dtypes, not the
weights), the per-sample input shape and dtype, autocast, inference or gradient, the device type and
name, the torch version, the thread count and the candidates. A corrupt or foreign cache file is
reported and re-measured.
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rslib.core.modules import eval_mode
from rslib.core.noises.tables import cache_dir as tables_cache_dir
from rslib.util.digest import canonical_json, digest
from rslib.util.files import atomic_write_json, read_json_dict
from rslib.util.provenance import cpu_name

AUTO = "auto"
CACHE_FORMAT = 2
#: Rows per forward tried, ascending (a sweep stops early; see :func:`measure`).
CANDIDATES = tuple(2**k for k in range(4, 14))
#: Seconds a measurement may take in all (the first size is always measured): a sweep in ``SWEEP_SHARE``
#: of it, then the ``CONFIRM`` fastest trials are measured again in the rest.
TIME_BUDGET_S = 1.5
SWEEP_SHARE = 0.75
CONFIRM = 3
#: A memory format leaves the sweep once its last ``PATIENCE`` sizes ran below ``STOP_RATIO`` of its best.
STOP_RATIO = 0.9
PATIENCE = 2
#: The choice is the largest size within this fraction of the best throughput.
TOLERANCE = 0.05
#: Timed forwards per size after one warm-up (at least this many, and at least ``MIN_TIMED_S`` seconds in
#: all); the fastest counts, which is robust to other load on the machine.
TIMED_REPEATS = 2
MIN_TIMED_S = 0.02
#: Seconds added to each forward's time for the Monte-Carlo loop's per-chunk work outside the model. Quiet,
#: that work is small (0.07 ms per 16-row MNIST LeNet chunk on the 2-core development CPU); but when other
#: processes compete for the cores every parallel region of a chunk may wait on a descheduled thread (21 ms
#: per 16-row chunk there under load, where 1024-row chunks ran 6x faster). 1 ms keeps tiny chunks from
#: winning on forward speed alone and costs large ones nothing.
CHUNK_OVERHEAD_S = 1e-3

#: ``(batch_size, channels_last, images_per_second)``: one measurement.
Trial = tuple[int, bool, float]

_memo: dict[str, Choice] = {}
_memo_lock = threading.Lock()


@dataclass(frozen=True)
class Choice:
    """Rows per forward and memory format for one (model, input shape, device, dtype).

    ``source``: ``"given"`` (both overridden, nothing measured), ``"measured"`` (measured by this call)
    or ``"cache"`` (from disk or memory). ``images_per_second`` is the throughput measured for this
    choice (see :func:`measure`; nan when given); ``key`` the cache key ('' when given).
    """

    batch_size: int
    channels_last: bool
    images_per_second: float
    source: Literal["given", "measured", "cache"]
    key: str

    @property
    def measured(self) -> bool:
        """Whether this call ran the measurement."""
        return self.source == "measured"

    def metadata(self) -> dict[str, Any]:
        """The choice, how it was made and its cache key, for a certificate's metadata (JSON-ready)."""
        rate = self.images_per_second
        return {"batch_size": self.batch_size, "channels_last": self.channels_last, "source": self.source,
                "images_per_second": None if math.isnan(rate) else rate,
                "key": json.loads(self.key) if self.key else None}


def parse_batch_size(value: object) -> int | None:
    """``None`` for ``"auto"`` (or ``None``), else the integer >= 1; ValueError for anything else."""
    if value is None or value == AUTO:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"batch_size must be 'auto' or an integer >= 1; got {value!r}")
    return value


def choose(model: nn.Module, example: torch.Tensor, *, batch_size: int | str | None = AUTO,
           channels_last: bool | None = None, autocast: torch.dtype | None = None, grad: bool = False,
           candidates: Sequence[int] = CANDIDATES, time_budget: float = TIME_BUDGET_S) -> Choice:
    """The batch size and memory format for ``model`` on inputs like ``example`` (a batch, on its device).

    ``batch_size``: ``"auto"`` (measure among ``candidates``) or an integer (it wins);
    ``channels_last``: ``None`` (measure both formats where they differ, see :func:`memory_formats`) or a
    bool (it wins). ``autocast``: the dtype the model runs under ``torch.autocast``, if any. ``grad``:
    time a forward and the gradient with respect to the input (attacks) instead of an inference forward.
    """
    given = parse_batch_size(batch_size)
    sizes = (given,) if given is not None else _check_candidates(candidates)
    formats = memory_formats(model, example) if channels_last is None else (bool(channels_last),)
    if len(sizes) == 1 and len(formats) == 1:
        return Choice(sizes[0], formats[0], math.nan, "given", "")
    key = cache_key(model, example, sizes, formats, autocast, grad)
    with _memo_lock:
        if key in _memo:
            return _memo[key]
    path = cache_dir() / f"{digest(key)[:20]}.json"
    choice = _load(path, key, sizes, formats)
    if choice is None:
        trials = measure(model, example, sizes, formats, autocast=autocast, grad=grad, time_budget=time_budget)
        choice = _best(trials, key, sizes)
        _store(path, choice, trials)
    with _memo_lock:
        _memo[key] = replace(choice, source="cache")
    return choice


@contextmanager
def tuned(model: nn.Module, example: torch.Tensor, *, batch_size: int | str | None = AUTO,
          channels_last: bool | None = None, autocast: torch.dtype | None = None) -> Iterator[Choice]:
    """:func:`choose` for inference on inputs like ``example``, with the model in the chosen memory format
    for the duration of the block (restored after)."""
    choice = choose(model, example, batch_size=batch_size, channels_last=channels_last, autocast=autocast)
    with memory_format(model, choice.channels_last):
        yield choice


def in_format(batch: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``batch`` in ``channels_last`` layout when asked and 4-D, else unchanged."""
    return batch.contiguous(memory_format=torch.channels_last) if channels_last and batch.dim() == 4 else batch


def _check_candidates(candidates: Sequence[int]) -> tuple[int, ...]:
    """The distinct candidate batch sizes, ascending; ValueError unless integers >= 1."""
    if not candidates or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in candidates):
        raise ValueError(f"candidates must be integers >= 1; got {candidates!r}")
    return tuple(sorted(set(candidates)))


def memory_formats(model: nn.Module, example: torch.Tensor) -> tuple[bool, ...]:
    """``(False, True)`` where ``channels_last`` may help (4-D inputs and a 4-D weight), else ``(False,)``."""
    has_conv = any(p.dim() == 4 for p in model.parameters())
    return (False, True) if example.dim() == 4 and has_conv else (False,)


@contextmanager
def memory_format(model: nn.Module, channels_last: bool) -> Iterator[None]:
    """Run ``model`` with its 4-D parameters and buffers in ``channels_last`` (or contiguous) layout,
    then put back the very tensors it had (parameters stay the same objects)."""
    target = torch.channels_last if channels_last else torch.contiguous_format
    saved = [(module, name, tensor, tensor.data)
             for module in model.modules()
             for name, tensor in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False))
             if tensor.dim() == 4]
    if all(tensor.is_contiguous(memory_format=target) for _, _, tensor, _ in saved):
        yield
        return
    model.to(memory_format=target)
    try:
        yield
    finally:
        for module, name, tensor, data in saved:
            if isinstance(tensor, nn.Parameter):
                tensor.data = data
            else:
                setattr(module, name, tensor)


# --------------------------------------------------------------------------- measurement

def measure(model: nn.Module, example: torch.Tensor, sizes: Sequence[int], formats: Sequence[bool], *,
            autocast: torch.dtype | None = None, grad: bool = False, time_budget: float = TIME_BUDGET_S) -> list[Trial]:
    """Throughput (images/s) per (batch size, memory format) of the model's forward in eval and inference
    mode (with ``grad``: forward and input gradient, in eval mode), net of ``CHUNK_OVERHEAD_S``: a sweep
    (:func:`_sweep`) in ``SWEEP_SHARE`` of ``time_budget``, then :func:`_confirm` in the rest. The model's
    layout is switched and restored for each measurement."""
    start = time.perf_counter()
    timers = {last: _timer(model, example, last, autocast, grad) for last in formats}

    def rate(size: int, last: bool) -> float | None:
        return _rate(model, timers[last], size, last, grad)
    with eval_mode(model):
        trials = _sweep(rate, sizes, formats, start + SWEEP_SHARE * time_budget)
        return _confirm(rate, trials, start + time_budget)


def _sweep(rate: Callable[[int, bool], float | None], sizes: Sequence[int], formats: Sequence[bool],
           deadline: float) -> list[Trial]:
    """Ascending ``sizes``, every format still in the race at each size. A format leaves once its last
    ``PATIENCE`` sizes fell below ``STOP_RATIO`` of its best or memory runs out; the sweep ends before a
    size whose predicted cost (the last size's, in proportion to the size) would pass ``deadline``. The
    first size is always measured."""
    trials: list[Trial] = []
    active = list(formats)
    cost, previous = 0.0, 1
    for size in sizes:
        if not active or (trials and time.perf_counter() + cost * size / previous > deadline):
            break
        tic = time.perf_counter()
        for last in tuple(active):
            measured = rate(size, last)
            if measured is not None:
                trials.append((size, last, measured))
            if measured is None or _declining([r for _, f, r in trials if f == last]):
                active.remove(last)
        cost, previous = time.perf_counter() - tic, size
    return trials


def _confirm(rate: Callable[[int, bool], float | None], trials: Sequence[Trial], deadline: float) -> list[Trial]:
    """Re-measure the ``CONFIRM`` fastest trials while time remains; each keeps its faster measurement,
    so that a size slowed once by other load on the machine is not lost."""
    out = list(trials)
    for i in sorted(range(len(out)), key=lambda i: out[i][2])[-CONFIRM:]:
        if time.perf_counter() > deadline:
            break
        size, last, first = out[i]
        out[i] = (size, last, max(first, rate(size, last) or 0.0))
    return out


def _rate(model: nn.Module, seconds: Callable[[int], float], size: int, channels_last: bool,
          grad: bool) -> float | None:
    """Images/s of chunks of ``size`` rows in the given layout; ``None`` when memory runs out."""
    try:
        with memory_format(model, channels_last), nullcontext() if grad else torch.inference_mode():
            return size / (seconds(size) + CHUNK_OVERHEAD_S)
    except torch.OutOfMemoryError:
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        return None


def _declining(rates: Sequence[float]) -> bool:
    """Whether the last ``PATIENCE`` rates all fall below ``STOP_RATIO`` of the best."""
    return len(rates) >= PATIENCE and all(rate < STOP_RATIO * max(rates) for rate in rates[-PATIENCE:])


def _timer(model: nn.Module, example: torch.Tensor, channels_last: bool, autocast: torch.dtype | None,
           grad: bool) -> Callable[[int], float]:
    """``seconds(rows)``: the fastest timed forward (see ``TIMED_REPEATS``), after a warm-up, of ``rows``
    random inputs shaped, placed and typed like ``example`` (with ``grad``: and the input gradient)."""
    device = example.device

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def forward(batch: torch.Tensor) -> float:
        tic = time.perf_counter()
        with torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext():
            out = model(batch)
        if grad:
            torch.autograd.grad(out.logsumexp(1).sum(), batch)
        else:
            out.argmax(1)
        sync()
        return time.perf_counter() - tic

    def seconds(rows: int) -> float:
        batch = in_format(torch.randn(rows, *example.shape[1:], device=device, dtype=example.dtype), channels_last)
        batch.requires_grad_(grad)
        sync()
        forward(batch)
        times: list[float] = []
        while len(times) < TIMED_REPEATS or sum(times) < MIN_TIMED_S:
            times.append(forward(batch))
        return min(times)
    return seconds


def _best(trials: Sequence[Trial], key: str, sizes: Sequence[int]) -> Choice:
    """The largest size within ``TOLERANCE`` of the best throughput (larger chunks amortize the per-chunk
    work of the Monte-Carlo loop); the smallest size, contiguous, when nothing could be measured."""
    if not trials:
        return Choice(min(sizes), False, math.nan, "measured", key)
    fastest = max(rate for _, _, rate in trials)
    size, last, rate = max((t for t in trials if t[2] >= (1 - TOLERANCE) * fastest), key=lambda t: (t[0], t[2]))
    return Choice(size, last, rate, "measured", key)


# --------------------------------------------------------------------------- cache

def cache_dir() -> Path:
    """Folder of cached choices: ``autotune`` beside the radius tables' folder."""
    return tables_cache_dir().parent / "autotune"


def clear_memory_cache() -> None:
    """Forget choices held in memory (the disk cache is untouched)."""
    with _memo_lock:
        _memo.clear()


def model_fingerprint(model: nn.Module) -> str:
    """Class name and digest of the architecture: module classes, parameter and buffer names, shapes and
    dtypes (not the weights, nor their memory format)."""
    parts = [type(module).__name__ for module in model.modules()]
    parts += [f"{name}:{tuple(tensor.shape)}:{tensor.dtype}"
              for name, tensor in (*model.named_parameters(), *model.named_buffers())]
    return f"{type(model).__name__}-{digest(parts)[:16]}"


def device_name(device: torch.device) -> str:
    """The CUDA device name, the CPU model name, or the device type."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name() if device.type == "cpu" else device.type


def cache_key(model: nn.Module, example: torch.Tensor, sizes: Sequence[int], formats: Sequence[bool],
              autocast: torch.dtype | None, grad: bool = False) -> str:
    """Canonical JSON key of a choice (see the module docstring)."""
    return canonical_json({
        "format": CACHE_FORMAT, "model": model_fingerprint(model), "input": list(example.shape[1:]),
        "dtype": str(example.dtype), "autocast": None if autocast is None else str(autocast), "grad": grad,
        "device": example.device.type, "device_name": device_name(example.device), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "sizes": list(sizes), "formats": list(formats)})


def _load(path: Path, key: str, sizes: Sequence[int], formats: Sequence[bool]) -> Choice | None:
    """The cached choice for ``key``; ``None`` when missing. An unusable file is reported and ignored."""
    if not path.exists():
        return None
    data = read_json_dict(path) or {}
    size, last, rate = data.get("batch_size"), data.get("channels_last"), data.get("images_per_second")
    if (data.get("key") == key and type(size) is int and size in sizes and type(last) is bool
            and last in formats and type(rate) is float):
        return Choice(size, last, rate, "cache", key)
    warnings.warn(f"re-measuring autotune choice {path.name}: cached file unusable", stacklevel=3)
    return None


def _store(path: Path, choice: Choice, trials: Sequence[Trial]) -> None:
    """Write the choice and its trials atomically (nothing when nothing was measured)."""
    if not trials:
        return
    record = {"key": choice.key, "batch_size": choice.batch_size, "channels_last": choice.channels_last,
              "images_per_second": choice.images_per_second, "trials": [list(trial) for trial in trials]}
    try:
        atomic_write_json(path, record)
    except OSError as error:
        warnings.warn(f"could not cache the autotune choice at {path}: {error}", stacklevel=3)
