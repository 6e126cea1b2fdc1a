"""Pure-torch samplers for the unit-scale (lambda = 1) smoothing noises.

Everything runs on the device of the output with torch ops: no numpy/scipy, no host copies of the
samples. All randomness is drawn by torch RNG calls that receive ``generator=``, so the same seeded
generator gives the same samples (``torch._standard_gamma`` and ``torch.distributions`` take no
generator and are not used). The rejection samplers (Marsaglia-Tsang gamma, the ziggurat's
slow path) loop over rejection rounds, each on the positions still rejected, never over elements;
their "anything left?" checks are the only host synchronisations (a few per call on GPU).

Elementwise fillers (``laplace_``, ``symmetric_pareto_``, ``symmetric_generalized_gamma_``) work in
place on float32/float64 outputs; float16/bfloat16 or non-contiguous outputs are computed in a
float32/float64 buffer and copied. Per-row radii (``standard_gamma``, ``betaprime``) default to
float64. Uniforms have 24 (float32) or 53 (float64) random bits, so e.g. Laplace tails stop near
|x| = 17 in float32 (probability 6e-8 beyond) and the ziggurat's positions have 22 random bits.
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = ["betaprime", "l1_sphere_", "l2_sphere_", "laplace_", "linf_sphere_", "standard_gamma",
           "symmetric_generalized_gamma_", "symmetric_pareto_"]

# Above this concentration the Marsaglia-Tsang acceptance test is done in float64 with log1p: the
# log-acceptance is a sum of terms of size ~d that cancel down to O(1) (float32 would lose it).
_PRECISE_CONCENTRATION = 16.0
_MAX_ROUNDS = 10_000


# ----------------------------------------------------------------------------------------- helpers

def _check_positive(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
    return value


def _as_size(size) -> tuple[int, ...]:
    return (int(size),) if isinstance(size, int) else tuple(int(s) for s in size)


def _work(out: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous float32/float64 buffer to compute ``out`` in (``out`` itself when it qualifies)."""
    if not out.is_floating_point():
        raise TypeError(f"out must be a floating-point tensor; got {out.dtype}")
    if dtype is None:
        dtype = out.dtype if out.dtype in (torch.float32, torch.float64) else torch.float32
    if out.dtype == dtype and out.is_contiguous():
        return out
    return torch.empty(out.shape, dtype=dtype, device=out.device)


def _finish(out: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    return out if work is out else out.copy_(work)


def _rows(out2d: torch.Tensor) -> torch.Tensor:
    if out2d.dim() != 2:
        raise ValueError(f"out2d must have shape (batch, dim); got shape {tuple(out2d.shape)}")
    return _work(out2d)


def _uniform_pm1_(w: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform on the open interval (-1, 1), in place.

    ``uniform_(-1, 1)`` is ``-1 + 2U`` with ``U`` on a grid of step ``eps/2`` starting at 0, so its
    values are ``-1, -1 + eps, ..., 1 - eps``: shifting by half a step makes the grid symmetric about
    0 (equal mass on each sign, neither -1 nor 0 reachable on CPU). Callers that take a log of
    ``|u|`` still clamp it, because other devices use a finer grid near 0.5.
    """
    return w.uniform_(-1.0, 1.0, generator=generator).add_(torch.finfo(w.dtype).eps / 2)


def _log_abs_(u: torch.Tensor, into: torch.Tensor | None = None) -> torch.Tensor:
    """``log|u|`` with ``|u|`` clamped to half a grid step of the uniform (never -inf)."""
    a = torch.abs(u, out=into) if into is not None else u.abs()
    return a.clamp_min_(torch.finfo(u.dtype).eps / 2).log_()


def _accept_reject(flat: torch.Tensor, propose) -> torch.Tensor:
    """Fill the 1-D tensor ``flat`` by vectorised rejection sampling.

    ``propose(m, buf)`` draws ``m`` candidates and returns ``(values, accepted)``; it may write the
    values into ``buf`` (``flat`` itself in the first round). Later rounds redraw only the positions
    still rejected, so the loop runs over rejection rounds (a few), never over elements.
    """
    values, ok = propose(flat.numel(), flat)
    if values is not flat:
        flat.copy_(values)
    todo = torch.nonzero(ok.logical_not_()).squeeze(1)
    rounds = 0
    while todo.numel():
        rounds += 1
        if rounds > _MAX_ROUNDS:  # pragma: no cover - acceptance rates are above 0.9
            raise RuntimeError("rejection sampler did not converge")
        values, ok = propose(todo.numel(), None)
        flat[todo[ok]] = values[ok].to(flat.dtype)
        todo = todo[ok.logical_not_()]
    return flat


# ------------------------------------------------------------------------------------------ gamma

def _gamma_dtype(concentration: float, dtype: torch.dtype, device) -> tuple[torch.dtype, bool]:
    """(working dtype, precise?) for Gamma(concentration) candidates."""
    if concentration > _PRECISE_CONCENTRATION:
        mps = torch.device(device).type == "mps" if device is not None else False
        return (torch.float32 if mps else torch.float64), True
    return (torch.float64 if dtype == torch.float64 else torch.float32), False


def _mt_log_gamma(concentration: float, n: int, generator, device, dtype: torch.dtype, precise: bool):
    """One Marsaglia-Tsang round: ``n`` candidates for ``log Gamma(concentration)``.

    Returns ``(log_g, accepted)``. With ``d = a - 1/3``, ``t = x / sqrt(9 d)`` (``x`` standard normal), the candidate is
    ``d (1 + t)^3`` and the log-acceptance ratio is ``h = d (3 log(1+t) - 3t + 3t^2/2 - t^3) <= 0``
    (the textbook ``x^2/2 + d - d v + d log v`` rewritten without its O(d) terms). For ``a < 1`` the
    sample of Gamma(a + 1) is multiplied by ``W^(1/a)``, in log space; ``W = |u| exp(-h)`` is the
    acceptance uniform recycled: given acceptance and ``x``, ``|u|`` is uniform on ``(0, exp(h))``,
    so ``W`` is uniform on (0, 1) and independent of the candidate (no third random draw).
    """
    boost = concentration < 1
    a = concentration + 1 if boost else concentration
    d = a - 1.0 / 3.0
    t = torch.randn(n, generator=generator, device=device, dtype=dtype).mul_(1.0 / math.sqrt(9 * d))
    u = _uniform_pm1_(torch.empty(n, device=device, dtype=dtype), generator)
    log_s = torch.log1p(t) if precise else torch.add(t, 1.0).log_()  # NaN/-inf where t <= -1
    h = torch.rsub(t, 1.5).mul_(t).sub_(3.0).mul_(t).add_(log_s, alpha=3.0).mul_(d)
    log_u = _log_abs_(u, into=t)  # t is no longer needed
    ok = log_u < h  # False where h is NaN
    log_g = log_s.mul_(3.0).add_(math.log(d))
    if boost:
        log_g.add_(log_u.sub_(h), alpha=1.0 / concentration)
    return log_g, ok


def _log_standard_gamma(concentration: float, n: int, generator, device, dtype: torch.dtype) -> torch.Tensor:
    """``log`` of ``n`` Gamma(concentration) samples (flat, in the working dtype)."""
    wd, precise = _gamma_dtype(concentration, dtype, device)
    return _accept_reject(torch.empty(n, device=device, dtype=wd),
                          lambda m, buf: _mt_log_gamma(concentration, m, generator, device, wd, precise))


def _default_device(device, generator):
    return generator.device if device is None and generator is not None else device


def standard_gamma(concentration: float, size: tuple[int, ...], *, generator: torch.Generator | None = None,
                   device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Gamma(concentration, rate 1) samples of shape ``size`` (Marsaglia-Tsang, vectorised).

    Exact for any concentration > 0: below 1 the Gamma(c + 1) boost is applied in log space; above
    16 the acceptance test runs in float64. In float32 a sample below ~1e-38 (likely only for
    concentrations below ~0.1) underflows to 0, as it must.
    """
    concentration = _check_positive("concentration", concentration)
    size = _as_size(size)
    device = _default_device(device, generator)
    log_g = _log_standard_gamma(concentration, math.prod(size), generator, device, dtype)
    return log_g.exp_().to(dtype).reshape(size)


def betaprime(alpha: float, beta: float, size: tuple[int, ...], *, generator: torch.Generator | None = None,
              device=None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """BetaPrime(alpha, beta) samples: ``Gamma(alpha) / Gamma(beta)``, the ratio taken in log space."""
    alpha, beta = _check_positive("alpha", alpha), _check_positive("beta", beta)
    size = _as_size(size)
    device = _default_device(device, generator)
    n = math.prod(size)
    num = _log_standard_gamma(alpha, n, generator, device, dtype)
    den = _log_standard_gamma(beta, n, generator, device, dtype)
    wd = torch.promote_types(num.dtype, den.dtype)
    return num.to(wd).sub_(den.to(wd)).exp_().to(dtype).reshape(size)


# ------------------------------------------------------------------------------------ elementwise

def laplace_(out: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``out`` with standard Laplace samples (density ``exp(-|x|)/2``): ``sign(u) (-log|u|)``."""
    w = _uniform_pm1_(_work(out), generator)
    torch.copysign(_log_abs_(w), w, out=w)  # |log|u|| = -log|u|, with the sign of u
    return _finish(out, w)


def symmetric_pareto_(out: torch.Tensor, a: float, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``out`` with ``sign * (U^(-1/a) - 1)``: density ``(a/2) (1 + |x|)^-(a+1)``."""
    a = _check_positive("a", a)
    w = _uniform_pm1_(_work(out), generator)
    m = w.abs().clamp_min_(torch.finfo(w.dtype).eps / 2).pow_(-1.0 / a).sub_(1.0)
    torch.copysign(m, w, out=w)
    return _finish(out, w)


def symmetric_generalized_gamma_(out: torch.Tensor, p: float, *,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``out`` with samples of density proportional to ``exp(-|x|^p)``: ``sign * Gamma(1/p)^(1/p)``.

    ``p = 1`` is Laplace and ``p = 2`` is ``N(0, 1/2)``. For ``p`` in ``[0.05, 50]``: an exact
    ziggurat over ``exp(-x^p)``, which settles 93% (p = 0.1) to 99% (p = 10) of the elements with
    half a 64-bit random word and a table lookup (see ``_ziggurat_fill_``); about twice as fast as
    the gamma route. Outside that range: ``sign * exp(log Gamma(1/p) / p)`` with Marsaglia-Tsang.
    Below p ~ 0.06 typical values exceed the float32 range (they become +-inf there; use float64).
    """
    p = _check_positive("p", p)
    w = _work(out)
    if p == 1.0:
        laplace_(w, generator=generator)
    elif p == 2.0:
        w.normal_(generator=generator).mul_(math.sqrt(0.5))
    elif _ZIG_P_RANGE[0] <= p <= _ZIG_P_RANGE[1]:
        _ziggurat_fill_(w.view(-1), p, generator)
    else:
        flat = w.view(-1)
        log_g = _log_standard_gamma(1.0 / p, flat.numel(), generator, w.device, w.dtype)
        signs = torch.randint(0, 2, flat.shape, generator=generator, device=w.device, dtype=w.dtype)
        flat.copy_(log_g.mul_(1.0 / p).exp_()).mul_(signs.mul_(2.0).sub_(1.0))
    return _finish(out, w)


# -------------------------------------------------------------------------------------- ziggurat
#
# Ziggurat (Marsaglia & Tsang, 2000) for the density f(x) = exp(-x^p) on x > 0, with 256 layers
# of equal area v: layer i >= 1 is [0, x_i] x [f(x_i), f(x_{i+1})], layer 0 is [0, r] x [0, f(r)]
# plus the tail x > r (drawn as the box [0, x_0] x [0, f(r)], x_0 = v / f(r)), and x_256 = 0.
# A point uniform in a uniformly chosen layer, kept when under f, has density f. One random word
# gives the layer (8 bits), a sign and the position x = U x_i; when x < x_{i+1} the point is under f
# for sure (most draws); otherwise the layer-0 draws come from the tail and the others are tested
# against f ("wedges") and drawn again when above it.

_ZIG_LAYERS = 256
_ZIG_P_RANGE = (0.05, 50.0)
_CPU_BLOCK = 1 << 18


@functools.lru_cache(maxsize=32)
def _ziggurat_layers(p: float) -> tuple[tuple[float, ...], tuple[float, ...], float]:
    """``(x_0..x_256, f(x_0..x_256), r^p)`` for ``exp(-x^p)``, in float64 on the host."""
    n, a = _ZIG_LAYERS, 1.0 / p

    def f(x):
        return math.exp(-(x ** p))

    def tail(r):  # integral of f over (r, inf) = Gamma(1 + 1/p) Q(1/p, r^p)
        q = torch.special.gammaincc(torch.tensor(a, dtype=torch.float64), torch.tensor(r ** p, dtype=torch.float64))
        return math.gamma(1.0 + a) * float(q)

    def layers(r):
        v = r * f(r) + tail(r)
        xs = [v / f(r), r]
        for _ in range(n - 2):
            y = f(xs[-1]) + v / xs[-1]
            if y >= 1.0:
                return v, None
            xs.append((-math.log(y)) ** a)
        return v, xs

    def excess(log_y0):  # > 0 when layers of area v(r) close before the n-th: r too small
        v, xs = layers(math.exp(log_y0 / p))
        return 1.0 if xs is None else f(xs[-1]) + v / xs[-1] - 1.0

    lo, hi = math.log(1e-8), math.log(a + 100.0 + 40.0 * math.sqrt(a))
    if not (excess(lo) > 0 > excess(hi)):  # pragma: no cover - guarded by _ZIG_P_RANGE
        raise RuntimeError(f"ziggurat setup failed for p={p}")
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    y0 = math.exp(hi)
    v, xs = layers(y0 ** a)
    xs.append(0.0)
    top = xs[-2] * (1.0 - f(xs[-2]))  # area of the top layer, which closes on f(0) = 1
    if abs(top / v - 1.0) > 1e-9 or y0 <= a - 1.0:  # pragma: no cover
        raise RuntimeError(f"ziggurat setup for p={p} is not accurate enough")
    return tuple(xs), tuple(f(x) for x in xs), y0


class _ZigTables:
    """Device copies of the ziggurat layers for one ``(p, device, dtype)``."""

    def __init__(self, p: float, device: torch.device, dtype: torch.dtype):
        xs, fs, self.y0 = _ziggurat_layers(p)
        n = _ZIG_LAYERS
        # float32 draws 31-bit int32 words (8 layer bits, 23 position/sign bits), float64 63-bit
        # int64 words (55 position/sign bits).
        self.int_dtype, self.bits = (torch.int32, 23) if dtype == torch.float32 else (torch.int64, 55)
        self.width = torch.tensor([math.ldexp(x, -self.bits) for x in xs[:n]], dtype=dtype, device=device)
        # fast acceptance iff |t| < ceil(2^bits x_{i+1} / x_i), t the signed odd position
        self.limit = torch.tensor([math.ceil(math.ldexp(xs[i + 1] / xs[i], self.bits)) for i in range(n)],
                                  dtype=self.int_dtype, device=device)
        exact = torch.float32 if device.type == "mps" else torch.float64
        self.x_unit = torch.tensor([math.ldexp(x, -self.bits) for x in xs[:n]], dtype=exact, device=device)
        self.f = torch.tensor(fs[:n], dtype=exact, device=device)
        self.f_step = torch.tensor([fs[i + 1] - fs[i] for i in range(n)], dtype=exact, device=device)


@functools.lru_cache(maxsize=32)
def _zig_tables(p: float, device: torch.device, dtype: torch.dtype) -> _ZigTables:
    return _ZigTables(p, device, dtype)


def _ziggurat_fill_(flat: torch.Tensor, p: float, generator) -> torch.Tensor:
    """Fill the contiguous 1-D float32/float64 ``flat`` with signed draws of density ``~exp(-|x|^p)``.

    On CPU the fast pass runs over blocks of ``_CPU_BLOCK`` elements with scratch buffers allocated
    once, so that they stay in cache (and large temporaries are not re-faulted in on every call).
    """
    n = flat.numel()
    if n == 0:
        return flat
    tab = _zig_tables(p, flat.device, flat.dtype)
    step = min(n, _CPU_BLOCK) if flat.device.type == "cpu" else n
    # Random words: int64 from random_() (63 random bits); for float32 each is viewed as two int32
    # words (31 and 32 random bits), which is cheaper than drawing int32 words one by one.
    per_word = 2 if tab.int_dtype == torch.int32 else 1
    raw = torch.empty(-(-step // per_word), dtype=torch.int64, device=flat.device)
    words = raw.view(tab.int_dtype)
    layer, limit = torch.empty_like(words), torch.empty_like(words)
    width = torch.empty(words.shape, dtype=flat.dtype, device=flat.device)
    missed = torch.empty(words.shape, dtype=torch.bool, device=flat.device)
    found = []
    for start in range(0, n, step):
        m = min(step, n - start)
        raw[:-(-m // per_word)].random_(generator=generator)
        w, lay, lim, wid, miss = words[:m], layer[:m], limit[:m], width[:m], missed[:m]
        torch.bitwise_and(w, _ZIG_LAYERS - 1, out=lay)  # bits 0-7: the layer
        torch.index_select(tab.width, 0, lay, out=wid)
        torch.index_select(tab.limit, 0, lay, out=lim)
        # bits 8 to 30 (or 62): t = 2 s + 1 - 2^bits, odd, |t| < 2^bits; x = t x_i / 2^bits.
        # (w << 1) >> 8 drops bit 31 (63) and sign-extends bits 7-30 (7-62); | 1 overwrites bit 7.
        w.bitwise_left_shift_(1).bitwise_right_shift_(8).bitwise_or_(1)
        flat[start:start + m].copy_(w).mul_(wid)
        torch.ge(w.abs_(), lim, out=miss)  # fast test failed: |x| >= x_{i+1}
        idx = torch.nonzero(miss).squeeze(1)
        found.append((idx + start, lay[idx], w[idx]))
    idx, lay, abs_t = (torch.cat(parts) for parts in zip(*found, strict=True))
    if idx.numel():
        values, redo = _ziggurat_slow(lay.long(), abs_t, flat[idx], tab, p, generator)
        flat[idx] = values.to(flat.dtype)
        again = idx[redo]
        if again.numel():
            flat[again] = _ziggurat_fill_(flat.new_empty(again.shape), p, generator)
    return flat


def _ziggurat_slow(layer: torch.Tensor, abs_t: torch.Tensor, signs: torch.Tensor, tab: _ZigTables,
                   p: float, generator):
    """Resolve the draws that missed the fast test: ``(signed values, needs a new draw)``."""
    ax = abs_t.to(tab.x_unit.dtype).mul_(torch.index_select(tab.x_unit, 0, layer))
    u = torch.rand(ax.shape, generator=generator, device=ax.device, dtype=ax.dtype)
    # wedge of layer i: keep x iff f(x_i) + u (f(x_{i+1}) - f(x_i)) < f(x)
    u.mul_(torch.index_select(tab.f_step, 0, layer)).add_(torch.index_select(tab.f, 0, layer))
    ok = u < torch.pow(ax, p).neg_().exp_()
    tail = layer == 0  # layer 0 beyond r: a draw from the tail
    if n_tail := int(tail.sum()):
        ax[tail] = _ziggurat_tail(n_tail, p, tab.y0, generator, ax.device, ax.dtype)
        ok |= tail
    return torch.copysign(ax, signs.to(ax.dtype)), ok.logical_not_()


def _ziggurat_tail(m: int, p: float, y0: float, generator, device, dtype) -> torch.Tensor:
    """``m`` draws of ``x > r`` with density ~ ``exp(-x^p)``: ``y = x^p`` is Gamma(1/p) beyond ``y0``.

    Envelope ``y = y0 + E / lam`` (E ~ Exp(1)), ``lam = 1 - max(a - 1, 0) / y0``: the target over the
    envelope is ``(1 + z/y0)^(a-1) exp(-(1 - lam) z) <= 1`` for ``z = y - y0 > 0``.
    """
    a = 1.0 / p
    slope = max(a - 1.0, 0.0) / y0
    lam = 1.0 - slope

    def propose(k, buf):
        z = torch.rand(k, generator=generator, device=device, dtype=dtype).neg_().log1p_().div_(-lam)
        u = torch.rand(k, generator=generator, device=device, dtype=dtype)
        log_ratio = torch.div(z, y0).log1p_().mul_(a - 1.0).sub_(z, alpha=slope)
        return z.add_(y0).log_().mul_(a).exp_(), u.log_() < log_ratio

    return _accept_reject(torch.empty(m, device=device, dtype=dtype), propose)


# ------------------------------------------------------------------------------------------ rows

def linf_sphere_(out2d: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row uniform on the surface of the cube ``[-1, 1]^d``.

    All coordinates uniform on (-1, 1), then one coordinate per row, uniform over the ``d``, set to a
    random sign (one ``randint`` over ``2d`` values gives both the index and the sign).
    """
    w = _uniform_pm1_(_rows(out2d), generator)
    b, d = w.shape
    if b and d:
        k = torch.randint(0, 2 * d, (b, 1), generator=generator, device=w.device)
        signs = (k % 2).to(w.dtype).mul_(2.0).sub_(1.0)
        w.scatter_(1, k // 2, signs)
    return _finish(out2d, w)


def _normalize_rows_(out2d: torch.Tensor, w: torch.Tensor, ord: float) -> torch.Tensor:
    """Divide each row of ``w`` by its ``ord``-norm (floored at the dtype's tiny) and store it in ``out2d``."""
    w.div_(torch.linalg.vector_norm(w, ord=ord, dim=1, keepdim=True).clamp_min_(torch.finfo(w.dtype).tiny))
    return _finish(out2d, w)


def l2_sphere_(out2d: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row uniform on the unit l2 sphere (a normalised standard Gaussian vector)."""
    return _normalize_rows_(out2d, _rows(out2d).normal_(generator=generator), 2)


def l1_sphere_(out2d: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row uniform on the unit l1 sphere (a normalised iid Laplace vector).

    ``|x_i| / sum |x_j|`` for iid Exp(1) ``|x_i|`` is Dirichlet(1, ..., 1), uniform on the simplex,
    and the independent signs spread it uniformly over the faces.
    """
    return _normalize_rows_(out2d, laplace_(_rows(out2d), generator=generator), 1)
