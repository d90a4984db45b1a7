"""Update sparsity between two checkpoints of one tensor, three ways, and ULP distances.

Definitions (docs/metrics.md, "Update sparsity"):

* **bitwise** (the paper's "bf16-aware" sparsity, Zhu et al. 2511.08567): the fraction of
  entries whose stored bits are identical in ``w0`` and ``w1``; +0 and -0 count as equal,
  a NaN never equals anything (not even the same NaN bits).
* **relative probe** (same paper): ``|w1 - w0| <= eta * max(|w0|, |w1|)``, ``eta = 1e-3``;
  both zero counts as equal. gatesim evaluates it in float64 on the exactly converted
  stored values, and counts *exactly equal values* as equal before applying the formula.
  That clause only matters for infinities: the bare formula gives ``|inf - inf| = NaN``
  (so +inf vs +inf would be "changed") and ``inf <= eta * inf`` (so any finite value vs
  an infinity, and +inf vs -inf, would be "unchanged"). With the clause the probe equals
  bitwise equality for *every* pair of bf16 values (``tests/test_metrics_probe.py`` checks
  all 2**32 pairs); for finite bf16 pairs the bare formula already agrees, because two
  different bf16 values differ by at least ``2**-8 * max(|w0|, |w1|)`` (and subnormals by
  at least ``1/128`` of it), far above ``1e-3``.
* **absolute tolerance** (Mukherjee et al. 2505.11711): ``|w1 - w0| <= atol``, default
  ``atol = 1e-5``, on the stored values (float64, exact), exactly equal values counting
  as equal (again only matters for infinities). It over-reports sparsity for small
  weights; report it next to the bitwise number, as :func:`sparsity` does.

Sparsity is the fraction *unchanged*; the update density (the random baseline of every
mask overlap in :mod:`gatesim.metrics.masks`) is ``1 - sparsity``.

**ULP distance.** Each stored bit pattern maps to a monotone integer key: with ``mag`` the
pattern without its sign bit, ``key = mag`` for a positive sign and ``-mag`` for a negative
one (sign-magnitude to two's complement). +0 and -0 both get key 0, consecutive
representable values get consecutive keys, and an infinity is the key just past the largest
finite value. The distance ``|key(w1) - key(w0)|`` is the number of representable steps
between the two stored values, computed on integers only (no float round trip). Pairs
where either side is NaN have no distance and are counted separately.

Histogram bins (:func:`ulp_bin_labels`): bin 0 is distance 0, bin 1 is 1, bin 2 is 2, and
bin ``j >= 3`` holds distances in ``(2**(j-2), 2**(j-1)]`` (3-4, 5-8, 9-16, ...); a format of
``w`` bits has ``w + 2`` bins (its largest distance is below ``2**w``), then one ``nan``
count. Bitwise-equal pairs are exactly the pairs in bin 0.

All functions take torch tensors of the same shape, dtype (fp32, bf16, fp16, e4m3fn,
e5m2) and device (CPU or CUDA). CPU tensors go through one parallel numba pass without
temporaries (``_sparsity_cpu.py``); CUDA tensors (or ``backend="torch"``) through torch
ops in chunks of ``chunk`` elements, so the temporaries stay at about ``100 * chunk``
bytes whatever the tensor size. The two paths give identical counts (tested).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Union

import numpy as np
import torch

from gatesim.formats import STORAGE_DTYPES, Format, as_format
from gatesim.metrics._checks import check_pair, check_positive

__all__ = ["SparsityResult", "sparsity", "update_mask", "ulp_keys", "ulp_distance",
           "ulp_histogram", "ulp_bin_edges", "ulp_bin_labels", "DEFAULT_ETA",
           "DEFAULT_ATOL", "DEFAULT_CHUNK", "RULES", "update_mask_core"]

DEFAULT_ETA = 1e-3
DEFAULT_ATOL = (1e-5,)
DEFAULT_CHUNK = 1 << 21
#: Rules for "unchanged" that :func:`update_mask` accepts.
RULES = ("bitwise", "relative", "atol")


def _layout(dtype: torch.dtype, name: str) -> Format:
    """The format stored in ``dtype``: its width (``bits``), bit view (``view_dtype``) and
    first NaN magnitude (``nan_code``) are what the passes below use."""
    if dtype not in STORAGE_DTYPES:
        raise TypeError(f"{name} has dtype {dtype}; sparsity and ULP distances need one of "
                        f"{[str(d) for d in STORAGE_DTYPES]}")
    return as_format(dtype)


def ulp_bin_edges(width: int) -> tuple[int, ...]:
    """Upper edges of the ULP-distance bins for a ``width``-bit format:
    ``(0, 1, 2, 4, ..., 2**width)``; bin ``j`` holds ``edges[j-1] < d <= edges[j]``."""
    return (0,) + tuple(1 << i for i in range(width + 1))


def ulp_bin_labels(width: int) -> tuple[str, ...]:
    """Labels of the ULP-distance bins: ``"0", "1", "2", "3-4", "5-8", ...``."""
    e = ulp_bin_edges(width)
    out = ["0", "1", "2"]
    out += [f"{e[j - 1] + 1}-{e[j]}" for j in range(3, len(e))]
    return tuple(out)


def _bits(x: torch.Tensor, lay: Format) -> torch.Tensor:
    """Unsigned bit patterns as int64."""
    u = x.view(lay.view_dtype).to(torch.int64)
    return u & (lay.sign_bit | lay.magnitude_mask)


def _keys_from_bits(u: torch.Tensor, lay: Format) -> tuple[torch.Tensor, torch.Tensor]:
    """(monotone key, magnitude) of unsigned patterns."""
    mag = u & lay.magnitude_mask
    neg = (u & lay.sign_bit) != 0
    return torch.where(neg, -mag, mag), mag


def ulp_keys(x: torch.Tensor) -> torch.Tensor:
    """Monotone int64 keys of the stored bit patterns of ``x`` (module docstring): +0 and -0
    give 0, adjacent representable values differ by 1. NaN patterns get keys beyond
    the infinities' (they are meaningless; mask them out)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    lay = _layout(x.dtype, "x")
    return _keys_from_bits(_bits(x, lay), lay)[0]


def ulp_distance(w0: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """Number of representable steps between the stored values, ``|key(w1) - key(w0)|``
    (int64, same shape), and -1 where either value is NaN. Not chunked: it returns one
    int64 per element; use :func:`ulp_histogram` for big tensors."""
    check_pair(w0, w1)
    lay = _layout(w0.dtype, "w0")
    u0, u1 = _bits(w0, lay), _bits(w1, lay)
    k0, m0 = _keys_from_bits(u0, lay)
    k1, m1 = _keys_from_bits(u1, lay)
    d = (k1 - k0).abs()
    return torch.where((m0 >= lay.nan_code) | (m1 >= lay.nan_code), torch.full_like(d, -1), d)


@dataclasses.dataclass
class SparsityResult:
    """Update sparsity of one tensor pair, every definition side by side.

    Attributes:
        n: number of elements.
        dtype: storage dtype compared (a string, e.g. ``"torch.bfloat16"``).
        bitwise: fraction of entries with identical stored bits (+0 == -0, NaN never
            equal); ``1 - bitwise`` is the update density.
        relative: fraction passing ``|w1 - w0| <= eta * max(|w0|, |w1|)`` (or exactly equal).
        eta: the relative probe's eta.
        atol: ``{atol: fraction with |w1 - w0| <= atol (or exactly equal)}``.
        counts: the integer counts behind the fractions (``bitwise``, ``relative``,
            ``atol=<value>``).
        nan_pairs: pairs where either value is NaN (never equal, no ULP distance).
        inf_pairs: pairs without NaN where either value is infinite.
        ulp_hist: counts per ULP-distance bin (:func:`ulp_bin_labels`); ``ulp_hist[0]``
            equals ``counts["bitwise"]``.
        ulp_labels: the bin labels.
    """

    n: int
    dtype: str
    bitwise: float
    relative: float
    eta: float
    atol: dict
    counts: dict
    nan_pairs: int
    inf_pairs: int
    ulp_hist: list
    ulp_labels: tuple

    @property
    def density(self) -> float:
        """Update density by the bitwise rule: ``1 - bitwise``."""
        return 1.0 - self.bitwise

    def to_dict(self, prefix: str = "sparsity_") -> dict:
        """Flat dict of plain numbers (for a DataFrame row)."""
        out = {f"{prefix}bitwise": self.bitwise,
               f"{prefix}relative_eta={self.eta:g}": self.relative}
        for a, v in self.atol.items():
            out[f"{prefix}atol={a:g}"] = v
        out["update_density"] = self.density
        out["numel"] = self.n
        out["nan_pairs"] = self.nan_pairs
        out["inf_pairs"] = self.inf_pairs
        for lab, c in zip(self.ulp_labels, self.ulp_hist):
            out[f"ulp_{lab}"] = c
        return out


def _atol_list(atol) -> tuple[float, ...]:
    if isinstance(atol, (int, float)) and not isinstance(atol, bool):
        atol = (atol,)
    try:
        atols = tuple(atol)
    except TypeError:
        raise TypeError(f"atol must be a number or a sequence of numbers, got "
                        f"{type(atol).__name__}") from None
    return tuple(check_positive(a, "atol") for a in atols)


def _check_chunk(chunk) -> int:
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    return chunk


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1)


def _chunk_eq(a: torch.Tensor, b: torch.Tensor, lay: Format, eta: float,
              atols: Sequence[float], want_hist: bool, edges: Optional[torch.Tensor],
              want_values: bool = True):
    """Per-chunk masks: bitwise-equal, relative-equal, atol-equal list, nan, inf, hist."""
    ua, ub = _bits(a, lay), _bits(b, lay)
    ka, ma = _keys_from_bits(ua, lay)
    kb, mb = _keys_from_bits(ub, lay)
    nan = (ma >= lay.nan_code) | (mb >= lay.nan_code)
    bit_eq = ((ua == ub) | ((ma == 0) & (mb == 0))) & ~nan
    if not want_values:
        return bit_eq, None, None, nan, None, None
    va, vb = a.to(torch.float64), b.to(torch.float64)
    same = va == vb                       # +0 == -0, inf == inf, NaN never
    d = (vb - va).abs()
    finite = torch.isfinite(va) & torch.isfinite(vb)
    rel_eq = same | (finite & (d <= eta * torch.maximum(va.abs(), vb.abs())))
    atol_eq = [same | (d <= t) for t in atols]
    inf = ~nan & ~finite
    hist = None
    if want_hist:
        dist = (kb - ka).abs()[~nan]
        idx = torch.searchsorted(edges, dist)
        hist = torch.bincount(idx, minlength=edges.numel())
    return bit_eq, rel_eq, atol_eq, nan, inf, hist



def _use_numba(x: torch.Tensor, backend: Optional[str]) -> bool:
    if backend is None:
        return x.device.type == "cpu"
    if backend not in ("numba", "torch"):
        raise ValueError(f"backend must be 'numba', 'torch' or None, got {backend!r}")
    if backend == "numba" and x.device.type != "cpu":
        raise ValueError(f"backend='numba' needs CPU tensors, got {x.device}")
    return backend == "numba"


def _numba_args(w: torch.Tensor, lay: Format):
    from gatesim.metrics import _sparsity_cpu as k
    w = w.detach().contiguous()
    bits = k.unsigned_numpy(w, lay.view_dtype, lay.bits)
    if lay.bits == 32:
        return bits, bits.view(np.float32)
    if lay.bits == 8:   # one compiled signature (uint16) for every table format
        bits = bits.astype(np.uint16)
    return bits, None


def _sparsity_numba(w0, w1, lay: Format, eta: float, atols) -> "SparsityResult":
    from gatesim.metrics import _sparsity_cpu as k
    a, fa = _numba_args(w0, lay)
    b, fb = _numba_args(w1, lay)
    at = np.asarray(atols, dtype=np.float64)
    nb = len(ulp_bin_edges(lay.bits))
    if lay.bits == 32:
        cnt, hist = k.counts_f32(a, b, fa, fb, lay.nan_code, eta, at, nb)
    else:
        table = k.decode_table(w0.dtype, lay.view_dtype, lay.bits)
        cnt, hist = k.counts_table(a, b, table, lay.bits, lay.nan_code, eta, at, nb)
    n = a.size
    counts = {"bitwise": int(cnt[0]), "relative": int(cnt[1])}
    atol_frac = {}
    for j, t in enumerate(atols):
        counts[f"atol={t:g}"] = int(cnt[4 + j])
        atol_frac[t] = int(cnt[4 + j]) / n
    return SparsityResult(n=n, dtype=str(w0.dtype), bitwise=counts["bitwise"] / n,
                          relative=counts["relative"] / n, eta=eta, atol=atol_frac,
                          counts=counts, nan_pairs=int(cnt[3]), inf_pairs=int(cnt[2]),
                          ulp_hist=[int(v) for v in hist],
                          ulp_labels=ulp_bin_labels(lay.bits))


def update_mask_core(w0: torch.Tensor, w1: torch.Tensor) -> np.ndarray:
    """Core of :func:`update_mask` with the bitwise rule, unchecked: CPU tensors of one
    storage dtype (:data:`gatesim.formats.STORAGE_DTYPES`) and shape; returns the flat bool
    numpy mask of changed entries (one serial pass over the integer views)."""
    from gatesim.metrics import _sparsity_cpu as k
    lay = as_format(w0.dtype)
    a = w0.detach().contiguous().reshape(-1).view(lay.view_dtype).numpy()
    b = w1.detach().contiguous().reshape(-1).view(lay.view_dtype).numpy()
    out = np.empty(a.size, dtype=np.bool_)
    k.changed_bits(a, b, lay.magnitude_mask, lay.nan_code, out)
    return out


def _update_mask_numba(w0, w1, lay: Format, rule: str, eta: float, atol: float):
    from gatesim.metrics import _sparsity_cpu as k
    if rule == "bitwise":
        return torch.from_numpy(update_mask_core(w0, w1)).reshape(w0.shape)
    a, fa = _numba_args(w0, lay)
    b, fb = _numba_args(w1, lay)
    out = np.empty(a.size, dtype=np.bool_)
    r = RULES.index(rule)
    if lay.bits == 32:
        k.changed_f32(a, b, fa, fb, lay.nan_code, r, eta, atol, out)
    else:
        table = k.decode_table(w0.dtype, lay.view_dtype, lay.bits)
        k.changed_table(a, b, table, lay.bits, lay.nan_code, r, eta, atol, out)
    return torch.from_numpy(out).reshape(w0.shape)


def sparsity(w0: torch.Tensor, w1: torch.Tensor, *, eta: float = DEFAULT_ETA,
             atol: Union[float, Sequence[float]] = DEFAULT_ATOL,
             chunk: int = DEFAULT_CHUNK, backend: Optional[str] = None) -> SparsityResult:
    """Update sparsity of ``w0 -> w1`` by every definition, plus the ULP-distance histogram.

    Formulas (docs/metrics.md, "Update sparsity" and "... absolute tolerance"):
    ``bitwise = #{bits(w0) == bits(w1) or both +-0, neither NaN} / n``;
    ``relative = #{w0 == w1 or |w1 - w0| <= eta * max(|w0|, |w1|)} / n`` (both finite for
    the inequality); ``atol[t] = #{w0 == w1 or |w1 - w0| <= t} / n``. Values compare in
    float64 after an exact conversion. See the module docstring for the ULP bins.

    Args:
        w0, w1: tensors of one storage dtype (fp32, bf16, fp16, e4m3fn, e5m2), one shape
            and one device.
        eta: the relative probe's tolerance (default 1e-3, the paper's).
        atol: one absolute tolerance or a list (default ``[1e-5]``, Mukherjee et al.).
        chunk: elements per pass of the torch path (bounds its temporary memory).
        backend: ``"numba"`` (default for CPU tensors: one parallel pass, no temporaries)
            or ``"torch"`` (chunked tensor ops; the only path for CUDA tensors). Both give
            identical counts.

    Raises:
        TypeError: not tensors, different dtypes, or an unsupported dtype.
        ValueError: different shapes or devices, empty tensors, negative eta/atol.
    """
    check_pair(w0, w1)
    lay = _layout(w0.dtype, "w0")
    eta = check_positive(eta, "eta")
    atols = _atol_list(atol)
    chunk = _check_chunk(chunk)
    n = w0.numel()
    if n == 0:
        raise ValueError("w0 and w1 are empty; sparsity of zero elements is undefined")
    if _use_numba(w0, backend):
        return _sparsity_numba(w0, w1, lay, eta, atols)
    a, b = _flat(w0), _flat(w1)
    dev = w0.device
    edges = torch.tensor(ulp_bin_edges(lay.bits), dtype=torch.int64, device=dev)
    z = lambda: torch.zeros((), dtype=torch.int64, device=dev)  # noqa: E731
    c_bit, c_rel, c_nan, c_inf = z(), z(), z(), z()
    c_atol = [z() for _ in atols]
    hist = torch.zeros(edges.numel(), dtype=torch.int64, device=dev)
    for s in range(0, n, chunk):
        bit_eq, rel_eq, atol_eq, nan, inf, h = _chunk_eq(a[s:s + chunk], b[s:s + chunk],
                                                          lay, eta, atols, True, edges)
        c_bit += bit_eq.sum()
        c_rel += rel_eq.sum()
        c_nan += nan.sum()
        c_inf += inf.sum()
        for i, m in enumerate(atol_eq):
            c_atol[i] += m.sum()
        hist += h
    counts = {"bitwise": int(c_bit), "relative": int(c_rel)}
    atol_frac = {}
    for t, c in zip(atols, c_atol):
        counts[f"atol={t:g}"] = int(c)
        atol_frac[t] = int(c) / n
    return SparsityResult(n=n, dtype=str(w0.dtype), bitwise=counts["bitwise"] / n,
                          relative=counts["relative"] / n, eta=eta, atol=atol_frac,
                          counts=counts, nan_pairs=int(c_nan), inf_pairs=int(c_inf),
                          ulp_hist=hist.tolist(), ulp_labels=ulp_bin_labels(lay.bits))


def ulp_histogram(w0: torch.Tensor, w1: torch.Tensor, *,
                  chunk: int = DEFAULT_CHUNK) -> dict:
    """ULP-distance histogram of ``w0 -> w1``: ``{label: count}`` for the bins of the
    module docstring (``"0"``, ``"1"``, ``"2"``, ``"3-4"``, ...) and ``"nan"``."""
    r = sparsity(w0, w1, chunk=chunk, atol=())
    out = dict(zip(r.ulp_labels, r.ulp_hist))
    out["nan"] = r.nan_pairs
    return out


def update_mask(w0: torch.Tensor, w1: torch.Tensor, rule: str = "bitwise", *,
                eta: float = DEFAULT_ETA, atol: float = DEFAULT_ATOL[0],
                chunk: int = DEFAULT_CHUNK, backend: Optional[str] = None) -> torch.Tensor:
    """Bool mask of *changed* entries (the complement of "unchanged" under ``rule``):
    ``"bitwise"`` (default), ``"relative"`` (probe with ``eta``) or ``"atol"`` (``atol``).
    Same shape and device as ``w0``; this is ``M_update`` of the mask metrics.
    ``chunk`` and ``backend`` as in :func:`sparsity`."""
    check_pair(w0, w1)
    lay = _layout(w0.dtype, "w0")
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    eta = check_positive(eta, "eta")
    atols = _atol_list(atol)
    if len(atols) != 1:
        raise ValueError("update_mask takes one atol value")
    chunk = _check_chunk(chunk)
    if _use_numba(w0, backend):
        return _update_mask_numba(w0, w1, lay, rule, eta, atols[0])
    a, b = _flat(w0), _flat(w1)
    out = torch.empty(a.numel(), dtype=torch.bool, device=w0.device)
    for s in range(0, a.numel(), chunk):
        bit_eq, rel_eq, atol_eq, *_ = _chunk_eq(a[s:s + chunk], b[s:s + chunk], lay, eta,
                                                atols, False, None, rule != "bitwise")
        eq = bit_eq if rule == "bitwise" else rel_eq if rule == "relative" else atol_eq[0]
        out[s:s + chunk] = ~eq
    return out.reshape(w0.shape)
