"""The checkpoint diff: one row of metrics per tensor pair, computed one pair at a time.

:func:`diff` validates both checkpoints (:func:`gatesim.diff.io.open_checkpoint`), pairs the
tensors by name (through the prefix map of :mod:`gatesim.diff.names`), and runs the pure
function :func:`diff_tensor` over the pairs with an executor of :mod:`gatesim.executor`
(serial, a local process pool with ``workers > 1``, or anything with the same ``map``).
Each worker reads its own two tensors from the validated byte ranges, so nothing but a small
:class:`TensorTask` is sent to it, and only one pair per worker is in memory.

**Row** (:data:`COLUMNS`; one per tensor name, paired or not): identity (``name`` after the
map, ``base_name``, ``tuned_name``, ``status``, ``layer``, ``module``, ``param``, ``expert``,
``shape``, ``dtype``...), then

* sparsity, docs/metrics.md "Update sparsity": ``changed`` (entries whose stored bits differ;
  +0 == -0, NaN never equal) and ``sparsity_bitwise = 1 - changed / numel``;
  ``changed_relative`` / ``sparsity_relative`` (the paper's probe, ``eta``);
  ``changed_atol`` / ``sparsity_atol`` (Mukherjee et al., ``atol``); ``update_density``
  (``changed / numel``, the random baseline of the overlaps);
* non-finite values, counted, never fatal: ``nan_base``, ``inf_base``, ``nan_tuned``,
  ``inf_tuned``, ``nan_pairs``, ``inf_pairs``;
* ULP distances (:mod:`gatesim.metrics.sparsity` bins) as a JSON object ``ulp_hist``
  (``{"0": ..., "1": ..., "2": ..., "3-4": ...}``), and ``ulp_1``: changed entries that
  moved by exactly one ULP of the compared format, ``ulp_1_frac = ulp_1 / changed``;
* the precision question for fp32 pairs: ``if_bf16_changed`` / ``if_bf16_sparsity`` /
  ``if_bf16_ulp_1`` (and ``if_fp16_*``): the same two checkpoints rounded to bf16 (fp16)
  with round-to-nearest-even (:func:`gatesim.to_dtype`) before comparing, i.e. what they
  would show if they had been saved in that format;
* for 2-D floating matrices with finite values (unless ``sparsity_only``): ``k``, ``nss``
  (all singular values), ``angle_left_max_deg`` / ``angle_right_max_deg`` and the full
  ``angles_*_deg`` lists (top-``k`` subspaces), ``energy_topk`` with
  ``energy_topk_baseline = (k/m)(k/n)``, and the overlaps of the bitwise update mask with the
  principal mask ``Top_alpha(|W0^(k)|)``, the low-magnitude mask ``Bottom_alpha(|W0|)`` and
  the principal-without-low mask, each with ``_baseline`` (the update density) and
  ``_ratio``; ``spectral`` says ``ok`` or why the block was skipped;
* ``base_checksum`` / ``tuned_checksum``: checksums of the two tensors' stored bytes
  (paired rows; what ties a stored row to its data when resuming).

**k and alpha.** Default ``k = min(64, max(1, min(m, n) // 4))`` per matrix (64 for every
Qwen2/Llama projection; small matrices get a quarter of their rank, so the subspace stays
a small part of the space); ``k=`` fixes it (capped at ``min(m, n)``). Default
``alpha = 0.05`` (the 5% largest / smallest entries), the default of
:func:`gatesim.metrics.compare`.

**SVD** (``svd=``): ``"gram"`` (default) is :func:`gatesim.metrics.gram.gram_svd` (one home
with :func:`gatesim.metrics.compare`): every singular value and the top-``k`` vectors from a
direct eigendecomposition of the smaller Gram matrix, no sampling (see its docstring for the
error bound per singular value, which the tests check, and the guards: NSS takes both
spectra from ``gesdd`` where that bound could exceed 1e-4 of it); ``"full"`` uses the full LAPACK SVD of :func:`gatesim.metrics.compute_svd`
(about 5..15x slower here). Randomized SVD is not offered (docs/metrics.md, "SVD
engine").

**Output and resume** (``out=``): ``config.json`` (both inputs' absolute paths, every
file's name, size and header hash, the map and the settings), ``rows.jsonl`` (a
:class:`gatesim.executor.ResultStore`: each row appended and fsynced as soon as it is
computed, rewritten in checkpoint order at the end), ``rows.csv`` (the same rows, appended
as they come, rewritten in checkpoint order at the end), ``timings.jsonl`` /
``timings.csv`` (per-tensor wall times, :data:`TIMING_COLUMNS`), then
``summary_module.csv``, ``summary_layer.csv``, ``summary_model.csv``, the figures and
``report.md`` (:mod:`gatesim.diff.report`). Every file but the timings is the same bytes
for the same inputs, whatever the worker count and however often the run was resumed.
A run that is interrupted resumes from ``rows.jsonl``: rerunning the same command
computes only the missing rows. A stored row is reused only if ``config.json`` matches and
the row's ``base_checksum`` / ``tuned_checksum`` (:mod:`gatesim.integrity` checksums of
the two tensors' stored bytes) equal those of the tensors now at those paths (read again
when resuming); otherwise :class:`~gatesim.diff.errors.ResumeError` names the difference
(pass ``overwrite=True`` to start over). Nothing is written before the options, both
checkpoints and the stored rows have been checked.

**Memory.** Each worker maps the two tensors it compares (L bytes each at most) and
unmaps them before the next pair; the sparsity pass adds the changed entries; the spectral
block works in float64 (8 bytes per entry, 4x a bf16 entry): the Gram matrix and the energy
over row blocks, but the principal and low-magnitude masks need the magnitudes of the whole
matrix and a selection copy. Measured peak increase of the resident set
(``tests/test_diff_memory.py``, largest tensor L bytes of bf16): at most ``4 L + 64 MiB`` for
a sparsity-only pass and ``24 L + 64 MiB`` for a full diff, per worker process (half the
multiple for fp32 tensors). Float64 buffers up to 512 MiB are kept between tensors for
speed (:mod:`gatesim.diff._scratch`) and freed at the end of :func:`diff`.

**Casting.** ``cast`` rounds with :func:`gatesim.to_dtype` (nearest-even) from fp32; a
float64 tensor is first rounded to fp32 (so it is rounded twice).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional, Union

import torch

from gatesim.checks import check_bool, check_fields, check_int, check_real
from gatesim.integrity import checksum_tensor, checksum_tensors_async
from gatesim.diff.errors import ResumeError
from gatesim.diff.io import Checkpoint, TensorRef, open_checkpoint, read_tensor, torch_dtype
from gatesim.diff.names import MapLike, apply_map, parse_map, parse_name
from gatesim.diff.resume import check_out, init_out, make_config, verify_stored
from gatesim.diff.scan import sparsity_fast
from gatesim.executor import Executor, ResultStore, make_executor, show_status
from gatesim.formats import FORMATS, STORAGE_DTYPES
from gatesim.metrics.sparsity import DEFAULT_ATOL, DEFAULT_ETA, sparsity
from gatesim.precision import to_dtype

__all__ = ["diff", "diff_tensor", "tensor_checksums", "DiffOptions", "TensorTask",
           "DiffResult", "COLUMNS", "TIMING_COLUMNS",
           "default_k", "pair_tensors", "CASTS", "SVD_METHODS"]

CASTS = {name: FORMATS[name].torch_dtype for name in ("bf16", "fp16", "fp32")}
SVD_METHODS = ("gram", "full")
_SPECTRAL_DTYPES = STORAGE_DTYPES + (torch.float64,)

COLUMNS = (
    "name", "base_name", "tuned_name", "status", "layer", "module", "param", "expert",
    "shape", "dtype", "tuned_dtype", "compared_dtype", "numel", "bytes",
    "changed", "sparsity_bitwise", "update_density",
    "changed_relative", "sparsity_relative", "eta", "changed_atol", "sparsity_atol", "atol",
    "nan_base", "inf_base", "nan_tuned", "inf_tuned", "nan_pairs", "inf_pairs",
    "ulp_1", "ulp_1_frac", "ulp_hist",
    "if_bf16_changed", "if_bf16_sparsity", "if_bf16_ulp_1",
    "if_fp16_changed", "if_fp16_sparsity", "if_fp16_ulp_1",
    "spectral", "k", "alpha", "nss", "angle_left_max_deg", "angle_right_max_deg",
    "angles_left_deg", "angles_right_deg", "energy_topk", "energy_topk_baseline",
    "overlap_principal", "overlap_principal_baseline", "overlap_principal_ratio",
    "overlap_low", "overlap_low_baseline", "overlap_low_ratio",
    "overlap_principal_not_low", "overlap_principal_not_low_baseline",
    "overlap_principal_not_low_ratio", "overlap_principal_not_low_cond_baseline",
    "update_normF", "svd", "base_checksum", "tuned_checksum", "note",
)
#: Per-tensor timings: not part of a row (rows are byte-reproducible; timings are not),
#: kept in ``timings.csv`` and :attr:`DiffResult.timings`.
TIMING_COLUMNS = ("seconds", "svd_seconds")


#: Statuses of a row.
STATUSES = ("paired", "only_base", "only_tuned", "shape_mismatch", "dtype_mismatch")


def default_k(m: int, n: int) -> int:
    """``min(64, max(1, min(m, n) // 4))`` (module docstring)."""
    return min(64, max(1, min(m, n) // 4))


@dataclasses.dataclass(frozen=True)
class DiffOptions:
    """Settings of one diff (see :func:`diff` for their meaning)."""

    k: Optional[int] = None
    alpha: float = 0.05
    eta: float = DEFAULT_ETA
    atol: float = DEFAULT_ATOL[0]
    sparsity_only: bool = False
    bitwise_only: bool = False
    cast: Optional[str] = None
    svd: str = "gram"
    max_svd_numel: Optional[int] = None

    def check(self) -> "DiffOptions":
        check_fields(self)                 # bools are bools, numpy scalars are numbers
        if self.k is not None:
            check_int(self.k, "k", lo=1)
        check_real(self.alpha, "alpha", lo=0, lo_open=True, hi=1)
        for nm in ("eta", "atol"):
            check_real(getattr(self, nm), nm, lo=0)
        if self.cast is not None and self.cast not in CASTS:
            raise ValueError(f"cast must be None or one of {sorted(CASTS)}, got {self.cast!r}")
        if self.svd not in SVD_METHODS:
            raise ValueError(f"svd must be one of {SVD_METHODS}, got {self.svd!r}")
        if self.max_svd_numel is not None:
            check_int(self.max_svd_numel, "max_svd_numel", lo=1)
        return self


@dataclasses.dataclass(frozen=True)
class TensorTask:
    """One unit of work: the pair's key (mapped name), where both sides live, and what
    pairing found (``status``)."""

    key: str
    base: Optional[TensorRef]
    tuned: Optional[TensorRef]
    status: str
    opts: DiffOptions

    @property
    def nbytes(self) -> int:
        return (self.base.nbytes if self.base else 0) + (self.tuned.nbytes if self.tuned else 0)

    def paths(self) -> list[str]:
        """The files a worker reads (a cluster executor checks every node sees them)."""
        return [r.path for r in (self.base, self.tuned) if r is not None]

    def resources(self) -> dict:
        """Peak memory of :func:`diff_tensor` on this pair, from the bounds measured in
        ``tests/test_diff_memory.py`` (module docstring, "Memory"): 48 bytes per entry
        with the spectral block (float64 work), 8 without, plus 64 MiB."""
        if self.status != "paired":
            return {"memory": 64 * 2 ** 20}
        o, shape = self.opts, self.base.shape
        spectral = not (o.sparsity_only or o.bitwise_only) and len(shape) == 2 \
            and min(shape) >= 2 and (o.max_svd_numel is None
                                     or self.base.numel <= o.max_svd_numel)
        return {"memory": (48 if spectral else 8) * self.base.numel + 64 * 2 ** 20}


# ------------------------------------------------------------------------------------------
# per tensor (pure)
# ------------------------------------------------------------------------------------------
def _cast(x: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    if x.dtype == target or not x.is_floating_point():
        return x
    if target == torch.float32:
        return x.to(torch.float32)      # exact from bf16/fp16/fp8; RNE from float64
    return to_dtype(x.to(torch.float32).contiguous(), target)


def _sparsity_block(row: dict, W0: torch.Tensor, W1: torch.Tensor, o: DiffOptions, *,
                    checksums: bool = False):
    fs = sparsity_fast(W0, W1, eta=o.eta, atol=o.atol, bitwise_only=o.bitwise_only,
                       checksums=checksums)
    c = fs.counts
    n = c.n
    changed = n - fs.bitwise_equal
    row.update(changed=changed, sparsity_bitwise=fs.bitwise_equal / n,
               update_density=changed / n, nan_base=c.nan_a, inf_base=c.inf_a,
               nan_tuned=c.nan_b, inf_tuned=c.inf_b, nan_pairs=fs.nan_pairs,
               inf_pairs=fs.inf_pairs)
    if fs.relative_equal is not None:
        row.update(changed_relative=n - fs.relative_equal,
                   sparsity_relative=fs.relative_equal / n, eta=o.eta,
                   changed_atol=n - fs.atol_equal, sparsity_atol=fs.atol_equal / n,
                   atol=o.atol, ulp_1=fs.ulp_hist[1],
                   ulp_1_frac=fs.ulp_hist[1] / changed if changed else math.nan,
                   ulp_hist=json.dumps(dict(zip(fs.ulp_labels, fs.ulp_hist))))
    elif not o.bitwise_only:
        row["note"] = _add(row.get("note"), f"{W0.dtype} pairs get bitwise sparsity only")
    if W0.dtype == torch.float32 and not o.bitwise_only:
        same = n - c.n_diff - c.eq_nan         # identical non-NaN bits stay identical
        for tag in ("bf16", "fp16"):
            dt = CASTS[tag]
            eq = one = 0
            if c.n_diff:
                ca = to_dtype(c.changed_a.contiguous(), dt)
                cb = to_dtype(c.changed_b.contiguous(), dt)
                s = sparsity(ca, cb, atol=())
                eq, one = s.counts["bitwise"], s.ulp_hist[1]
            row[f"if_{tag}_changed"] = n - (same + eq)
            row[f"if_{tag}_sparsity"] = (same + eq) / n
            row[f"if_{tag}_ulp_1"] = one
    return fs


def _add(note: Optional[str], text: str) -> str:
    return text if not note else f"{note}; {text}"


def _spectral_block(row: dict, W0: torch.Tensor, W1: torch.Tensor, o: DiffOptions) -> None:
    from gatesim.diff.matrix import matrix_metrics
    m, n = W0.shape
    k = default_k(m, n) if o.k is None else min(o.k, min(m, n))
    if o.k is not None and o.k > min(m, n):
        row["note"] = _add(row.get("note"), f"k={o.k} capped at min(m, n)={min(m, n)}")
    row.update(matrix_metrics(W0, W1, k, o.alpha, svd=o.svd))


def _spectral_skip(W0: torch.Tensor, row: dict, o: DiffOptions) -> Optional[str]:
    if o.bitwise_only:
        return "skipped: bitwise-only"
    if o.sparsity_only:
        return "skipped: sparsity-only"
    if W0.dim() != 2:
        return f"skipped: {W0.dim()}-D"
    if W0.dtype not in _SPECTRAL_DTYPES:
        return f"skipped: dtype {str(W0.dtype).replace('torch.', '')}"
    if min(W0.shape) < 2:
        return "skipped: a vector"
    if o.max_svd_numel is not None and W0.numel() > o.max_svd_numel:
        return f"skipped: numel > max_svd_numel={o.max_svd_numel}"
    if row["nan_base"] or row["inf_base"] or row["nan_tuned"] or row["inf_tuned"]:
        return "skipped: non-finite values"
    return None


def diff_tensor(task: TensorTask) -> dict:
    """One row (module docstring) for one pair: a pure function of ``task`` and the files
    it names, run by the executor (in another process with ``workers > 1``). The row also
    holds the :data:`TIMING_COLUMNS` (wall seconds), which :func:`diff` moves to
    ``timings.csv``; every other value is the same bits on every run.

    ``base_checksum`` / ``tuned_checksum``: :mod:`gatesim.integrity` checksums of the two
    tensors' stored bytes, computed in the pass that reads them (bitwise-only: inside the
    scan's own loop; otherwise in a helper thread beside the metrics), so a resumed run
    can prove its stored rows came from the same bytes."""
    t0 = time.perf_counter()
    o = task.opts
    ref = task.base or task.tuned
    info = parse_name(task.key)
    row: dict[str, Any] = {c: None for c in COLUMNS}
    row.update(name=task.key, base_name=task.base.name if task.base else None,
               tuned_name=task.tuned.name if task.tuned else None, status=task.status,
               layer=info.layer, module=info.module, param=info.param, expert=info.expert,
               shape=json.dumps(list(ref.shape)), dtype=ref.dtype,
               tuned_dtype=task.tuned.dtype if task.tuned else None,
               numel=ref.numel, bytes=task.nbytes, svd_seconds=None)
    if task.status != "paired":
        if task.status == "shape_mismatch":
            row["note"] = f"tuned shape {list(task.tuned.shape)}"
        elif task.status == "dtype_mismatch":
            row["note"] = f"tuned dtype {task.tuned.dtype}; pass cast='bf16' (--cast) to " \
                          "compare both rounded to one format"
        row["seconds"] = time.perf_counter() - t0
        return row
    W0 = read_tensor(task.base)
    W1 = read_tensor(task.tuned)
    raw = (W0, W1)
    # the checksums of the stored bytes: inside the bitwise pass itself when it reads the
    # stored bytes (bitwise-only, no cast), else in a helper thread beside the metrics
    fused = o.bitwise_only and o.cast is None
    waiter = None if fused else checksum_tensors_async(W0, W1)
    fs = cks = None
    try:
        if o.cast is not None:
            W0, W1 = _cast(W0, CASTS[o.cast]), _cast(W1, CASTS[o.cast])
            cks, waiter, raw = waiter(), None, ()   # the stored bytes may go now
        row["compared_dtype"] = str(W0.dtype).replace("torch.", "")
        if W0.numel() == 0:
            row["note"] = "empty tensor"
            row["spectral"] = "skipped: empty"
        else:
            fs = _metrics(row, W0, W1, o, checksums=fused)
    finally:
        if waiter is not None:
            cks = waiter()
        elif cks is None and fs is not None and fs.counts.checksums is not None:
            cks = fs.counts.checksums
        elif cks is None:              # integer dtypes, empty tensors: not in the pass
            cks = [checksum_tensor(t) for t in raw]
        row["base_checksum"], row["tuned_checksum"] = cks
    del W0, W1, raw
    _trim()
    row["seconds"] = time.perf_counter() - t0
    return row


def _metrics(row: dict, W0: torch.Tensor, W1: torch.Tensor, o: DiffOptions, *,
             checksums: bool = False):
    fs = _sparsity_block(row, W0, W1, o, checksums=checksums)
    skip = _spectral_skip(W0, row, o)
    if skip is None:
        try:
            _spectral_block(row, W0, W1, o)
        except (ValueError, torch.linalg.LinAlgError) as exc:
            # e.g. W0 == 0 (NSS undefined) or a LAPACK failure: reported, not fatal
            row["spectral"] = f"error: {exc}"
    else:
        row["spectral"] = skip
    return fs


def tensor_checksums(task: TensorTask) -> tuple:
    """``(base_checksum, tuned_checksum)`` of a paired task's stored bytes (what a resumed
    :func:`diff` compares with its stored rows; an executor task like :func:`diff_tensor`)."""
    W0, W1 = read_tensor(task.base), read_tensor(task.tuned)
    return tuple(checksum_tensors_async(W0, W1)())


_LIBC: Any = None


def _release() -> None:
    """Frees this process's scratch buffers (read buffers, float64 blocks, masks)."""
    from gatesim.diff import _scratch, io as _io
    _scratch.release()
    _io.release_scratch()
    _trim()


def _trim() -> None:
    """Gives freed heap memory back to the OS (glibc ``malloc_trim``): metric temporaries
    below glibc's (dynamic, up to 32 MiB) mmap threshold otherwise stay in the heap and a
    long run's resident set creeps up. No-op elsewhere."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


# ------------------------------------------------------------------------------------------
# pairing
# ------------------------------------------------------------------------------------------
def pair_tensors(base: Checkpoint, tuned: Checkpoint, rules=(), opts: DiffOptions = DiffOptions()
                 ) -> list[TensorTask]:
    """The tasks of a diff: base tensors in checkpoint order (paired or ``only_base``), then
    the ``only_tuned`` ones. Statuses: ``paired``, ``only_base``, ``only_tuned``,
    ``shape_mismatch``, ``dtype_mismatch`` (with ``cast``, floating dtypes may differ)."""
    rules = parse_map(rules)
    bm = apply_map(base.tensors, rules, "base")
    tm = apply_map(tuned.tensors, rules, "tuned")
    tasks = []
    for key, bname in bm.items():
        b = base.tensors[bname]
        if key not in tm:
            tasks.append(TensorTask(key, b, None, "only_base", opts))
            continue
        t = tuned.tensors[tm[key]]
        if tuple(b.shape) != tuple(t.shape):
            status = "shape_mismatch"
        elif b.dtype != t.dtype and not (
                opts.cast is not None and torch_dtype(b.dtype).is_floating_point
                and torch_dtype(t.dtype).is_floating_point):
            status = "dtype_mismatch"
        else:
            status = "paired"
        tasks.append(TensorTask(key, b, t, status, opts))
    for key, tname in tm.items():
        if key not in bm:
            tasks.append(TensorTask(key, None, tuned.tensors[tname], "only_tuned", opts))
    return tasks


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class DiffResult:
    """What :func:`diff` returns.

    Attributes:
        rows: pandas DataFrame, one row per tensor name (:data:`COLUMNS`), checkpoint order.
        summary: ``{"module": DataFrame, "layer": DataFrame, "model": DataFrame}``.
        out: the output folder (None when nothing was written).
        files: name -> path of every file written.
        base, tuned: the validated :class:`~gatesim.diff.io.Checkpoint` objects.
        resumed: rows taken from an earlier, interrupted run.
        seconds: wall time.
        timings: DataFrame ``name, seconds, svd_seconds`` (per-tensor wall times; kept
            out of the rows so that those are the same bytes on every run).
    """

    rows: Any
    summary: dict
    out: Optional[Path]
    files: dict
    base: Checkpoint
    tuned: Checkpoint
    resumed: int
    seconds: float
    timings: Any = None


def _csv_line(row: dict, columns=COLUMNS) -> str:
    import csv
    import io as _io
    buf = _io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(
        ["" if row.get(c) is None else row.get(c) for c in columns])
    return buf.getvalue()


def _write_csv(path: Path, rows: list, columns=COLUMNS) -> None:
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(",".join(columns) + "\n")
        for r in rows:
            f.write(_csv_line(r, columns))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _split_timing(result: dict) -> tuple[dict, dict]:
    """(row without timings, timings) of a :func:`diff_tensor` result."""
    row = {c: result.get(c) for c in COLUMNS}
    return row, {c: result.get(c) for c in TIMING_COLUMNS}


def diff(base: Union[str, os.PathLike], tuned: Union[str, os.PathLike],
         out: Union[str, os.PathLike, None] = None, *, map: MapLike = None,
         k: Optional[int] = None, alpha: float = 0.05, eta: float = DEFAULT_ETA,
         atol: float = DEFAULT_ATOL[0], sparsity_only: bool = False,
         bitwise_only: bool = False, cast: Optional[str] = None, svd: str = "gram",
         max_svd_numel: Optional[int] = None, workers: Optional[int] = 1, threads: int = 1,
         executor: Optional[Executor] = None, progress: bool = True,
         overwrite: bool = False, figures: bool = True,
         limit: Optional[int] = None) -> DiffResult:
    """Diffs two checkpoints tensor by tensor (module docstring).

    Args:
        base, tuned: checkpoint folders or files (:func:`gatesim.diff.io.open_checkpoint`).
        out: output folder (rows, summaries, figures, report; resumable); None: nothing is
            written, the rows are only returned.
        map: prefix map applied to both sides' names before pairing
            (:func:`gatesim.diff.names.parse_map`: ``"model.="``, ``["a.=b."]``,
            ``{"model.": ""}``).
        k: subspace dimension (default per matrix: :func:`default_k`).
        alpha: fraction of entries in the principal and low-magnitude masks (0.05).
        eta, atol: tolerances of the relative probe (1e-3) and absolute rule (1e-5).
        sparsity_only: skip the spectral block (no SVD).
        bitwise_only: only bitwise sparsity and non-finite counts (the fastest pass).
        cast: ``"bf16"``, ``"fp16"`` or ``"fp32"``: round both sides to that format
            (nearest-even, :func:`gatesim.to_dtype`) before comparing; lets pairs of
            different floating dtypes be compared. None: compare as stored, and report a
            dtype mismatch.
        svd: ``"gram"`` (default) or ``"full"`` (module docstring).
        max_svd_numel: skip the spectral block for matrices with more entries.
        workers, threads: executor (:func:`gatesim.executor.make_executor`): 1 = in this
            process; more = a process pool; ``threads`` torch threads per task.
        executor: any object with the executor ``map`` (overrides workers/threads).
        progress: tqdm bars (tensors and bytes) on stderr.
        overwrite: discard the rows of an earlier run in ``out`` instead of resuming.
        figures: write the PNG figures (matplotlib).
        limit: compute at most this many new rows, then stop without the final report
            (for tests and partial runs; resuming completes them).

    Every argument and both checkpoints are checked, and a resumed ``out`` verified,
    before the first byte is written. Resuming reuses a stored row only if the inputs'
    paths, file headers and settings are those of ``config.json`` and the row's tensors
    still have the checksums stored with it (they are read again to check).

    Raises:
        CheckpointError: invalid or unsafe input (before anything is written).
        NameMapError: a bad prefix map. ResumeError: ``out`` holds another run, or rows
        computed from other bytes. ValueError / TypeError: a bad argument.
    """
    t_start = time.perf_counter()
    opts = DiffOptions(k=k, alpha=alpha, eta=eta, atol=atol, sparsity_only=sparsity_only,
                       bitwise_only=bitwise_only, cast=cast, svd=svd,
                       max_svd_numel=max_svd_numel).check()
    for nm, v in (("progress", progress), ("overwrite", overwrite), ("figures", figures)):
        check_bool(v, nm)
    if limit is not None:
        check_int(limit, "limit", lo=0)
    rules = parse_map(map)
    ex = executor if executor is not None else make_executor(workers, threads)
    b = open_checkpoint(base)
    t = open_checkpoint(tuned)
    tasks = pair_tensors(b, t, rules, opts)
    order = [tk.key for tk in tasks]
    by_key = {tk.key: tk for tk in tasks}
    files: dict[str, Path] = {}
    outp = Path(out) if out is not None else None
    store = tstore = None
    results: dict[str, dict] = {}
    timings: dict[str, dict] = {}
    if outp is not None:
        config = make_config(b, t, rules, opts)
        resuming = check_out(outp, config, overwrite)
        if resuming:
            try:                                       # reading only: no side effect
                store = ResultStore(outp / "rows.jsonl")
                tstore = ResultStore(outp / "timings.jsonl")
            except ValueError as exc:
                raise ResumeError(f"{exc}; use another output folder or --overwrite") \
                    from None
            stored = dict(store.items())
            verify_stored(outp, stored, by_key, ex, progress)
            results = {kk: stored[kk] for kk in order if kk in stored}
            timings = {kk: tstore.get(kk) for kk in results if kk in tstore}
        else:
            store = ResultStore(outp / "rows.jsonl", fresh=True)
            tstore = ResultStore(outp / "timings.jsonl", fresh=True)
        init_out(outp, config, overwrite)               # the first write
        files.update(config=outp / "config.json", rows_jsonl=store.path,
                     rows_csv=outp / "rows.csv", timings=outp / "timings.csv")
        _write_csv(files["rows_csv"], [results[kk] for kk in order if kk in results])
    resumed = len(results)
    todo = [(tk.key, tk) for tk in tasks if tk.key not in results]
    if limit is not None:
        todo = todo[:limit]
    bars = _Bars(progress, len(tasks), sum(tk.nbytes for tk in tasks),
                 resumed, sum(by_key[kk].nbytes for kk in results))
    show_status(ex, bars.t)
    csv_f = open(files["rows_csv"], "a", encoding="utf-8", newline="") if outp else None
    stream = ex.map(diff_tensor, todo)
    try:
        for kk, result in stream:
            row, timing = _split_timing(result)
            if store is not None:
                store.add(kk, row)
                tstore.add(kk, timing)
            results[kk], timings[kk] = row, timing
            if csv_f is not None:
                csv_f.write(_csv_line(row))
                csv_f.flush()
            bars.update(by_key[kk].nbytes)
    finally:
        if hasattr(stream, "close"):   # an interrupted run stops the executor's workers now
            stream.close()
        bars.close()
        if csv_f is not None:
            csv_f.close()
        _release()
    import pandas as pd
    complete = all(kk in results for kk in order)
    rows = [results[kk] for kk in order if kk in results]
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    tdf = pd.DataFrame([{"name": kk, **(timings.get(kk) or {})} for kk in order
                        if kk in results], columns=["name", *TIMING_COLUMNS])
    summary: dict = {}
    if outp is not None:
        _write_csv(files["rows_csv"], rows)
        _write_csv(files["timings"], tdf.to_dict("records"), ("name", *TIMING_COLUMNS))
        if complete:            # the store in checkpoint order: the same bytes every time
            store.rewrite(order)
    if complete:
        from gatesim.diff import report as rep
        summary = rep.summarize(df)
        if outp is not None:
            files.update(rep.write_outputs(outp, df, summary, b, t, rules, opts,
                                           figures=figures))
    return DiffResult(df, summary, outp, files, b, t, resumed, time.perf_counter() - t_start,
                      tdf)


class _Bars:
    """Two tqdm bars: tensors and bytes."""

    def __init__(self, enabled: bool, n: int, nbytes: int, n0: int, b0: int):
        self.t = self.b = None
        if not enabled:
            return
        from tqdm import tqdm
        self.t = tqdm(total=n, initial=n0, desc="tensors", unit="tensor", position=0,
                      file=sys.stderr, dynamic_ncols=True)
        self.b = tqdm(total=nbytes, initial=b0, desc="bytes  ", unit="B", unit_scale=True,
                      unit_divisor=1024, position=1, file=sys.stderr, dynamic_ncols=True)

    def update(self, nbytes: int) -> None:
        if self.t is not None:
            self.t.update(1)
            self.b.update(nbytes)

    def close(self) -> None:
        if self.t is not None:
            self.b.close()
            self.t.close()
