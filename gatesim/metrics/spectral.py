"""Spectral metrics of an update ``W0 -> W1`` (``Delta = W1 - W0``), each with its source.

Definitions from docs/metrics.md, in float64 on the exactly
converted stored values; every SVD comes from :func:`gatesim.metrics.base_svd` (exact and
cached by default; see :mod:`gatesim.metrics.svd`):

* singular values ``sigma(W)``, descending: :func:`singular_values`;
* normalized spectral shift ``NSS = ||sigma(W1) - sigma(W0)||_2 / ||sigma(W0)||_2``:
  :func:`nss`;
* principal angles between the top-``k`` left (right) singular subspaces,
  ``cos(theta_i) = sigma_i(U0_k^T U1_k)`` (likewise ``V``): :func:`principal_angles`;
* energy of the update in the top-``k`` subspace of ``W0``,
  ``||U0_k^T Delta V0_k||_F^2 / ||Delta||_F^2``, random baseline ``(k/m)(k/n)``:
  :func:`update_energy`;
* effective (entropy) rank of ``Delta`` (Roy & Vetterli 2007): with ``s`` the singular
  values of ``Delta`` and ``p_i = s_i / sum_j s_j``, ``erank = exp(-sum_i p_i ln p_i)``
  (terms with ``p_i = 0`` contribute 0), between 1 and ``rank(Delta)``:
  :func:`effective_rank`;
* stable rank ``||Delta||_F^2 / ||Delta||_2^2`` (``||Delta||_F`` from the entries):
  :func:`stable_rank`;
* :func:`spectral` gathers all of them (and the Wedin bound of the angles) in one
  :class:`SpectralResult`.

A zero update has no direction: energy, effective and stable rank are NaN for it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from gatesim.metrics._checks import check_k, check_matrix, check_pair
from gatesim.metrics.svd import BaseSVD, base_svd, compute_svd, singular_values

__all__ = ["nss", "principal_angles", "subspace_angles", "update_energy", "energy_baseline",
           "effective_rank", "stable_rank", "spectral", "PrincipalAngles", "Energy",
           "SpectralResult", "singular_values", "nss_core", "principal_angles_core",
           "update_energy_core"]


def _pair(W0, W1) -> tuple[torch.Tensor, torch.Tensor]:
    check_pair(W0, W1, ("W0", "W1"))
    check_matrix(W0, "W0")
    check_matrix(W1, "W1")
    return W0, W1


def _svd_arg(svd: Optional[BaseSVD], W: torch.Tensor, name: str) -> Optional[BaseSVD]:
    if svd is None:
        return None
    if not isinstance(svd, BaseSVD):
        raise TypeError(f"{name} must be a BaseSVD, got {type(svd).__name__}")
    if tuple(svd.shape) != tuple(W.shape):
        raise ValueError(f"{name} is the SVD of a {svd.shape[0]}x{svd.shape[1]} matrix, "
                         f"the matrix is {W.shape[0]}x{W.shape[1]}")
    return svd


def nss(W0: torch.Tensor, W1: torch.Tensor, *, svd0: Optional[BaseSVD] = None,
        svd1: Optional[BaseSVD] = None) -> float:
    """Normalized spectral shift ``||sigma(W1) - sigma(W0)||_2 / ||sigma(W0)||_2``
    (docs/metrics.md, "Normalized spectral shift").

    With randomized ``svd0``/``svd1`` only their top ``q`` values enter (both sides use
    the same count, the smaller of the two). With Gram decompositions
    (:func:`gatesim.metrics.gram.gram_svd`) the spectra come from ``gesdd`` instead when
    the Gram error bound could exceed ``1e-4`` of NSS
    (:func:`gatesim.metrics.gram.nss_checked`).

    Raises:
        ValueError: shape/device/dtype mismatch, non-2-D or non-finite inputs, ``W0 = 0``.
    """
    _pair(W0, W1)
    svd0, svd1 = _svd_arg(svd0, W0, "svd0"), _svd_arg(svd1, W1, "svd1")
    if svd0 is not None and svd1 is not None and "gram" in (svd0.values, svd1.values):
        from gatesim.metrics.gram import nss_checked
        return nss_checked(W0, W1, svd0, svd1)[0]       # guarded: gatesim.metrics.gram
    s0 = singular_values(W0, svd=svd0)
    s1 = singular_values(W1, svd=svd1)
    return nss_core(s0, s1)


def nss_core(s0: torch.Tensor, s1: torch.Tensor) -> float:
    """Core of :func:`nss`, unchecked: NSS from the two spectra (descending float64 singular
    values; over the first ``min`` of their lengths).

    Raises:
        ValueError: ``s0`` is all zero (``W0 = 0``).
    """
    r = min(s0.numel(), s1.numel())
    s0, s1 = s0[:r], s1[:r].to(s0.device)
    den = torch.linalg.vector_norm(s0)
    if den == 0:
        raise ValueError("W0 is the zero matrix; NSS divides by ||sigma(W0)|| = 0")
    return float(torch.linalg.vector_norm(s1 - s0) / den)


def subspace_angles(Q0: torch.Tensor, Q1: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees, ascending, between the spans of two matrices with
    orthonormal columns of the same shape ``(m, k)``.

    ``cos(theta_i) = sigma_i(Q0^T Q1)``; angles below 45 degrees come from the sines
    ``sigma(Q1 - Q0 Q0^T Q1)`` instead, which keeps small angles accurate (arccos of a
    cosine near 1 loses half the digits; Knyazev & Argentati 2002, as in
    ``scipy.linalg.subspace_angles``).
    """
    if Q0.dim() != 2 or Q0.shape != Q1.shape or Q0.shape[1] > Q0.shape[0]:
        raise ValueError(f"bases must be (m, k) matrices of one shape with k <= m, got "
                         f"{tuple(Q0.shape)} and {tuple(Q1.shape)}")
    Q0, Q1 = Q0.to(torch.float64), Q1.to(torch.float64).to(Q0.device)
    M = Q0.T @ Q1
    cos = torch.linalg.svdvals(M).clamp(0.0, 1.0)               # descending
    sin = torch.linalg.svdvals(Q1 - Q0 @ M).clamp(0.0, 1.0).flip(0)  # ascending
    theta = torch.where(cos.square() >= 0.5, torch.asin(sin), torch.acos(cos))
    return torch.rad2deg(theta)


@dataclasses.dataclass
class PrincipalAngles:
    """Principal angles (degrees, ascending) between top-``k`` singular subspaces of W0
    and W1: ``left`` for ``U``, ``right`` for ``V``; ``left_max``/``right_max`` the
    largest (docs/metrics.md, "Principal angles")."""

    k: int
    left: torch.Tensor
    right: torch.Tensor

    @property
    def left_max(self) -> float:
        return float(self.left[-1])

    @property
    def right_max(self) -> float:
        return float(self.right[-1])

    def to_dict(self, prefix: str = "angle_") -> dict:
        return {f"{prefix}k": self.k, f"{prefix}left_max_deg": self.left_max,
                f"{prefix}right_max_deg": self.right_max,
                f"{prefix}left_deg": self.left.tolist(),
                f"{prefix}right_deg": self.right.tolist()}


def principal_angles(W0: torch.Tensor, W1: torch.Tensor, k: int, *,
                     svd0: Optional[BaseSVD] = None,
                     svd1: Optional[BaseSVD] = None) -> PrincipalAngles:
    """All ``k`` principal angles between the top-``k`` left singular subspaces of ``W0``
    and ``W1``, and between the right ones (docs/metrics.md: ``cos(theta_i) =
    sigma_i(U0_k^T U1_k)``, likewise ``V``), in degrees, ascending; see
    :func:`subspace_angles` for the numerics.

    Raises:
        ValueError: mismatched or invalid matrices, ``k`` outside ``1..min(m, n)``.
    """
    _pair(W0, W1)
    m, n = W0.shape
    check_k(k, m, n)
    s0 = _svd_arg(svd0, W0, "svd0") or base_svd(W0, name="W0")
    s1 = _svd_arg(svd1, W1, "svd1") or base_svd(W1, name="W1")
    return principal_angles_core(s0, s1, k)


def principal_angles_core(svd0: BaseSVD, svd1: BaseSVD, k: int) -> PrincipalAngles:
    """Core of :func:`principal_angles`, unchecked: the angles from the two decompositions
    (of matrices of one shape, each keeping at least ``k`` singular vectors)."""
    U0, _, V0h = svd0.top(k)
    U1, _, V1h = svd1.top(k)
    return PrincipalAngles(k, subspace_angles(U0, U1).cpu(),
                           subspace_angles(V0h.T, V1h.T).cpu())


def energy_baseline(k: int, m: int, n: int) -> float:
    """Random baseline of :func:`update_energy`: ``(k/m)(k/n)``, the expected share of a
    random (isotropic) update's energy in fixed ``k``-dimensional left and right subspaces."""
    return (k / m) * (k / n)


@dataclasses.dataclass
class Energy:
    """Share of the update's energy in W0's top-``k`` subspace, and its baseline."""

    k: int
    value: float
    baseline: float

    def to_dict(self, prefix: str = "energy_topk") -> dict:
        return {prefix: self.value, f"{prefix}_baseline": self.baseline}


def _delta(W0: torch.Tensor, W1: torch.Tensor) -> torch.Tensor:
    return W1.detach().to(torch.float64) - W0.detach().to(torch.float64)


def update_energy(W0: torch.Tensor, W1: torch.Tensor, k: int, *,
                  svd0: Optional[BaseSVD] = None) -> Energy:
    """``||U0_k^T Delta V0_k||_F^2 / ||Delta||_F^2`` with ``Delta = W1 - W0`` and its random
    baseline ``(k/m)(k/n)`` (docs/metrics.md, "Energy in the top-k subspace").
    NaN for a zero update."""
    _pair(W0, W1)
    m, n = W0.shape
    check_k(k, m, n)
    s0 = _svd_arg(svd0, W0, "svd0") or base_svd(W0, name="W0")
    val, _ = update_energy_core(W0, W1, s0, k)
    return Energy(k, val, energy_baseline(k, m, n))


#: Elements of ``Delta`` per row block of :func:`update_energy_core` (16 MiB of float64).
_ENERGY_BLOCK = 1 << 21


def _rows_float64(W: torch.Tensor, s: int, e: int, slot: str) -> torch.Tensor:
    """Rows ``s:e`` of ``W`` as a new float64 tensor (``slot`` names a reusable buffer in
    :func:`gatesim.metrics.gram._rows64`; here every call allocates)."""
    return W[s:e].to(torch.float64, copy=True)


def update_energy_core(W0: torch.Tensor, W1: torch.Tensor, svd0: BaseSVD, k: int, *,
                       rows64: Callable = _rows_float64) -> tuple:
    """``(energy, ||Delta||_F)`` of :func:`update_energy`, unchecked: ``Delta`` is formed in
    float64 one block of rows at a time (no full-size float64 copy), the projection
    ``U0_k^T Delta V0_k`` summed over the blocks. ``rows64(W, s, e, slot)`` gives rows
    ``s:e`` of ``W`` as a float64 tensor it may overwrite, ``slot`` ``"rows64"`` for ``W1``
    and ``"rows64b"`` for ``W0`` (``gatesim.diff`` passes one that reuses a buffer per
    slot)."""
    U, _, Vh = svd0.top(k)
    m, n = W0.shape
    step = max(1, _ENERGY_BLOCK // n)
    P = torch.zeros(k, k, dtype=torch.float64)
    V = Vh.T.contiguous()
    tot = 0.0
    for s in range(0, m, step):
        e = min(m, s + step)
        D = rows64(W1, s, e, "rows64").sub_(rows64(W0, s, e, "rows64b"))
        tot += float(torch.linalg.vector_norm(D).square())
        P += U[s:e].T @ (D @ V)
    val = float(P.square().sum()) / tot if tot > 0 else math.nan
    return val, math.sqrt(tot)


def _erank_from_values(s: torch.Tensor) -> float:
    tot = s.sum()
    if tot <= 0:
        return math.nan
    p = s / tot
    p = p[p > 0]
    return float(torch.exp(-(p * torch.log(p)).sum()))


def effective_rank(D: torch.Tensor, *, svd: Optional[BaseSVD] = None) -> float:
    """Entropy rank of ``D`` (Roy & Vetterli 2007): ``exp(-sum_i p_i ln p_i)``,
    ``p_i = s_i / sum_j s_j`` over the singular values ``s`` of ``D`` (``0 ln 0 = 0``).
    NaN for ``D = 0``. With a randomized ``svd`` only its top ``q`` values enter."""
    check_matrix(D, "D")
    return _erank_from_values(singular_values(D, svd=_svd_arg(svd, D, "svd")))


def stable_rank(D: torch.Tensor, *, svd: Optional[BaseSVD] = None) -> float:
    """Stable rank ``||D||_F^2 / ||D||_2^2`` (``||D||_F`` from the entries, ``||D||_2`` the
    largest singular value). NaN for ``D = 0``."""
    check_matrix(D, "D")
    s = singular_values(D, svd=_svd_arg(svd, D, "svd"))
    s1 = float(s[0])
    fro2 = float(torch.linalg.matrix_norm(D.detach().to(torch.float64)).square())
    return fro2 / (s1 * s1) if s1 > 0 else math.nan


@dataclasses.dataclass
class SpectralResult:
    """Every spectral metric of one update (module docstring).

    Attributes:
        k: subspace dimension of the angles and the energy.
        nss: normalized spectral shift (over ``nss_values`` singular values).
        angles: :class:`PrincipalAngles`.
        energy: :class:`Energy`.
        update_erank, update_srank: effective and stable rank of ``Delta`` (over
            ``update_values`` singular values of ``Delta``).
        update_norm2, update_normF: ``||Delta||_2`` and ``||Delta||_F``.
        gap_k: ``sigma_k(W0) - sigma_{k+1}(W0)`` (NaN when ``k = min(m, n)`` or unknown).
        wedin_bound: ``||Delta||_2 / (sigma_k(W1) - sigma_{k+1}(W0))``, Wedin's bound on
            ``sin(theta_max)`` (``inf`` when the denominator is not positive).
        method: ``"exact"`` or ``"randomized"``.
        nss_bound: bound on NSS's absolute error from the exact spectra's per-value error
            bounds (:func:`gatesim.metrics.gram.nss_bound`); None for randomized.
        values: where the singular values of W0 / W1 / Delta came from (``"gram"``,
            ``"gesdd"``, ``"randomized"``), e.g. ``"gram/gram/gram"``.
    """

    k: int
    nss: float
    nss_values: int
    angles: PrincipalAngles
    energy: Energy
    update_erank: float
    update_srank: float
    update_values: int
    update_norm2: float
    update_normF: float
    gap_k: float
    wedin_bound: float
    method: str
    nss_bound: Optional[float] = None
    values: Optional[str] = None

    def to_dict(self) -> dict:
        out = {"k": self.k, "nss": self.nss, "nss_values": self.nss_values}
        out.update(self.angles.to_dict())
        out.update(self.energy.to_dict())
        out.update({"update_erank": self.update_erank, "update_srank": self.update_srank,
                    "update_values": self.update_values, "update_norm2": self.update_norm2,
                    "update_normF": self.update_normF, "gap_k": self.gap_k,
                    "wedin_bound": self.wedin_bound, "spectral_method": self.method,
                    "nss_bound": self.nss_bound, "spectral_values": self.values})
        return out


def spectral(W0: torch.Tensor, W1: torch.Tensor, k: int, *, method: str = "exact",
             q: Optional[int] = None, niter: Optional[int] = None, seed: int = 0,
             unsafe: bool = False, svd0: Optional[BaseSVD] = None,
             svd1: Optional[BaseSVD] = None) -> SpectralResult:
    """All spectral metrics of ``W0 -> W1`` at subspace dimension ``k``.

    ``method="exact"`` uses full SVDs of ``W0`` and ``W1`` (cached) and the singular
    values of ``Delta`` (with Gram decompositions passed in, as :func:`gatesim.metrics.compare`
    does, ``Delta``'s values come from its Gram matrix too, and NSS and the effective rank
    fall back to ``gesdd`` values where the Gram bound is above ``1e-4`` relative:
    :mod:`gatesim.metrics.gram`); ``method="randomized"`` uses guarded randomized SVDs (``q``,
    ``niter``, ``seed``, ``unsafe`` as in :func:`base_svd`) of all three, so NSS and the
    update's ranks then cover only the top ``q`` singular values (``nss_values``,
    ``update_values`` say how many).
    """
    _pair(W0, W1)
    m, n = W0.shape
    check_k(k, m, n)
    kw = dict(method=method, k=k, q=q, niter=niter, seed=seed, unsafe=unsafe)
    s0 = _svd_arg(svd0, W0, "svd0") or base_svd(W0, name="W0", **kw)
    s1 = _svd_arg(svd1, W1, "svd1") or base_svd(W1, name="W1", **kw)
    D = _delta(W0, W1)
    normF = float(torch.linalg.matrix_norm(D))
    nss_b, dsrc = None, None
    fast = "gram" in (s0.values, s1.values)
    if method == "exact" and fast and D.device.type == "cpu":
        from gatesim.metrics.gram import gram_values
        sD, dsrc = gram_values(D)
    elif method == "exact":
        sD, dsrc = singular_values(D), "gesdd"
    elif normF > 0:
        sD = compute_svd(D, name="Delta", keep=1, **kw).S
    else:
        sD = torch.zeros(1, dtype=torch.float64)
    r = min(s0.S.numel(), s1.S.numel())
    try:
        if method == "exact":
            from gatesim.metrics.gram import nss_checked
            nss_v, nss_b, s0, s1 = nss_checked(W0, W1, s0, s1)
        else:
            nss_v = nss_core(s0.S, s1.S)
    except ValueError:           # W0 = 0: spectral() reports NaN instead of raising
        nss_v = math.nan
    norm2 = float(sD[0])
    gap = float(s0.S[k - 1] - s0.S[k]) if k < s0.S.numel() else math.nan
    wden = float(s1.S[k - 1] - s0.S[k]) if k < s0.S.numel() else math.nan
    wedin = norm2 / wden if wden > 0 else math.inf
    return SpectralResult(
        k=k, nss=nss_v, nss_values=r,
        angles=principal_angles(W0, W1, k, svd0=s0, svd1=s1),
        energy=update_energy(W0, W1, k, svd0=s0),
        update_erank=_erank_from_values(sD), update_srank=(normF ** 2 / norm2 ** 2
                                                           if norm2 > 0 else math.nan),
        update_values=sD.numel(), update_norm2=norm2, update_normF=normF, gap_k=gap,
        wedin_bound=wedin, method=method, nss_bound=nss_b,
        values=f"{s0.values}/{s1.values}/{dsrc or 'randomized'}")
