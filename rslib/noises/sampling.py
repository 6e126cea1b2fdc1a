"""Pure-torch samplers for the unit-scale (lambda = 1) smoothing noises.

Everything runs on the device of the output with torch ops: no numpy/scipy, no host copies of the
samples. All randomness is drawn by torch RNG calls that receive ``generator=``, so the same seeded
generator gives the same samples (``torch._standard_gamma`` and ``torch.distributions`` take no
generator and are not used). The only host synchronisation is the "anything left?" check between
rounds of the vectorised rejection sampler (a handful of rounds, each on the still-rejected positions).

Elementwise fillers (``laplace_``, ``symmetric_pareto_``, ``symmetric_generalized_gamma_``) work in
place on float32/float64 outputs; float16/bfloat16 outputs are computed in float32 and copied.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "betaprime",
    "l1_sphere_",
    "l2_sphere_",
    "laplace_",
    "linf_sphere_",
    "standard_gamma",
    "symmetric_generalized_gamma_",
    "symmetric_pareto_",
]

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
    if work is not out:
        out.copy_(work)
    return out


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


def _mt_log_gamma(concentration: float, n: int, generator, device, dtype: torch.dtype,
                  precise: bool):
    """One Marsaglia-Tsang round: ``n`` candidates for ``log Gamma(concentration)``.

    Returns ``(log_g, u, accepted)`` where ``u`` is the signed uniform of the acceptance test; its
    sign is independent of the accepted value (free random sign for symmetric samplers).

    With ``d = a - 1/3``, ``t = x / sqrt(9 d)`` (``x`` standard normal), the candidate is
    ``d (1 + t)^3`` and the log-acceptance ratio is ``h = d (3 log(1+t) - 3t + 3t^2/2 - t^3) <= 0``
    (the textbook ``x^2/2 + d - d v + d log v`` rewritten without its O(d) terms). For ``a < 1`` the
    sample of Gamma(a + 1) is multiplied by ``W^(1/a)``, in log space; ``W = |u| exp(-h)`` is the
    acceptance uniform recycled: given acceptance and ``x``, ``|u|`` is uniform on ``(0, exp(h))``,
    so ``W`` is uniform on (0, 1) and independent of the candidate.
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
    return log_g, u, ok


def _log_standard_gamma(concentration: float, n: int, generator, device,
                        dtype: torch.dtype) -> torch.Tensor:
    """``log`` of ``n`` Gamma(concentration) samples (flat, in the working dtype)."""
    wd, precise = _gamma_dtype(concentration, dtype, device)

    def propose(m, buf):
        log_g, _, ok = _mt_log_gamma(concentration, m, generator, device, wd, precise)
        return log_g, ok

    return _accept_reject(torch.empty(n, device=device, dtype=wd), propose)


def _default_device(device, generator):
    if device is None and generator is not None:
        return generator.device
    return device


def standard_gamma(concentration: float, size: tuple[int, ...], *,
                   generator: torch.Generator | None = None, device=None,
                   dtype: torch.dtype = torch.float64) -> torch.Tensor:
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


def betaprime(alpha: float, beta: float, size: tuple[int, ...], *,
              generator: torch.Generator | None = None, device=None,
              dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """BetaPrime(alpha, beta) samples: ``Gamma(alpha) / Gamma(beta)``, the ratio taken in log space."""
    alpha = _check_positive("alpha", alpha)
    beta = _check_positive("beta", beta)
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


def symmetric_pareto_(out: torch.Tensor, a: float, *,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``out`` with ``sign * (U^(-1/a) - 1)``: density ``(a/2) (1 + |x|)^-(a+1)``."""
    a = _check_positive("a", a)
    w = _uniform_pm1_(_work(out), generator)
    m = w.abs().clamp_min_(torch.finfo(w.dtype).eps / 2).pow_(-1.0 / a).sub_(1.0)
    torch.copysign(m, w, out=w)
    return _finish(out, w)


def symmetric_generalized_gamma_(out: torch.Tensor, p: float, *,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Fill ``out`` with samples of density proportional to ``exp(-|x|^p)``: ``sign * Gamma(1/p)^(1/p)``.

    ``p = 1`` is Laplace and ``p = 2`` is ``N(0, 1/2)``. Otherwise one Marsaglia-Tsang round over all
    elements (a normal and a uniform each) plus small rounds for the few rejected; for ``p > 1`` the
    Gamma(1/p) boost ``Gamma(1 + 1/p) * W^p`` becomes ``Gamma(1 + 1/p)^(1/p) * W``, the recycled
    acceptance uniform ``W`` (no third draw), and the sign comes from the acceptance uniform too.
    """
    p = _check_positive("p", p)
    if p == 1.0:
        return laplace_(out, generator=generator)
    if p == 2.0:
        w = _work(out)
        w.normal_(generator=generator).mul_(math.sqrt(0.5))
        return _finish(out, w)
    concentration = 1.0 / p
    wd, precise = _gamma_dtype(concentration, out.dtype, out.device)
    w = _work(out, wd)
    flat = w.view(-1)

    def propose(m, buf):
        log_g, u, ok = _mt_log_gamma(concentration, m, generator, out.device, wd, precise)
        y = log_g.mul_(concentration).exp_()  # Gamma^(1/p) = exp(log_g / p)
        return torch.copysign(y, u, out=y if buf is None else buf), ok

    _accept_reject(flat, propose)
    return _finish(out, w)


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


def l2_sphere_(out2d: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row uniform on the unit l2 sphere (a normalised standard Gaussian vector)."""
    w = _rows(out2d).normal_(generator=generator)
    norms = torch.linalg.vector_norm(w, ord=2, dim=1, keepdim=True)
    w.div_(norms.clamp_min_(torch.finfo(w.dtype).tiny))
    return _finish(out2d, w)


def l1_sphere_(out2d: torch.Tensor, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each row uniform on the unit l1 sphere (a normalised iid Laplace vector).

    ``|x_i| / sum |x_j|`` for iid Exp(1) ``|x_i|`` is Dirichlet(1, ..., 1), uniform on the simplex,
    and the independent signs spread it uniformly over the faces.
    """
    w = laplace_(_rows(out2d), generator=generator)
    norms = torch.linalg.vector_norm(w, ord=1, dim=1, keepdim=True)
    w.div_(norms.clamp_min_(torch.finfo(w.dtype).tiny))
    return _finish(out2d, w)
