"""Everything a sweep will read, checked before its first byte is written (issue 22).

:func:`validate_sweep` is what ``ablate`` runs before it creates its output folder: the
cell configs are already type-checked on construction (:func:`gatesim.checks.check_fields`
via :class:`~gatesim.sim.config.CellConfig`), and here every weight matrix the cells
name is opened the way a cell will open it: the file exists and is a valid safetensors
file (the strict header validation of :mod:`gatesim.diff.io`), holds the tensor, the
tensor is a floating 2-D matrix, the cell's rows ``row_offset .. row_offset + rows - 1``
fit in it and are finite, ``n_targets < rows`` and ``k <= min(rows, columns)``. Each
problem is one :class:`SweepConfigError` naming the cell, the file and the field. It also
returns the content checksum of every matrix read, which ``ablate`` records in
``sweep.json``: a sweep resumed after its weight file changed is refused, not mixed.

:func:`spell_none` gives TOML, which has no null, a spelling for ``None``: the string
``"none"`` in an optional field (``clip = "none"``: no clipping; ``path = "none"``: the
bundled MiniLM; a file really called ``none`` is ``"./none"``).
"""
from __future__ import annotations

import os
import typing
import torch

__all__ = ["SweepConfigError", "validate_sweep", "validate_cells", "spell_none",
           "NONE_SPELLING"]

#: The TOML (and JSON) spelling of None in an optional field.
NONE_SPELLING = "none"


class SweepConfigError(ValueError):
    """A sweep whose cells could not run: names the cell, the file and the field."""


def _optional_fields() -> set:
    from gatesim.sim.config import CellConfig
    hints = typing.get_type_hints(CellConfig)
    return {name for name, tp in hints.items()
            if typing.get_origin(tp) is typing.Union and type(None) in typing.get_args(tp)}


def spell_none(d: dict) -> dict:
    """A sweep mapping with ``"none"`` replaced by None in the optional cell fields of
    ``base``, every variant and every grid axis (module docstring)."""
    opt = _optional_fields()

    def fix(fields):
        if not isinstance(fields, dict):
            return fields
        return {k: (None if k in opt and isinstance(v, str)
                    and v.strip().lower() == NONE_SPELLING else v) for k, v in fields.items()}

    out = dict(d)
    if "base" in out:
        out["base"] = fix(out["base"])
    if isinstance(out.get("variants"), dict):
        out["variants"] = {k: fix(v) for k, v in out["variants"].items()}
    if isinstance(out.get("grid"), dict):
        out["grid"] = {a: ([None if a in opt and isinstance(v, str)
                            and v.strip().lower() == NONE_SPELLING else v for v in vals]
                           if isinstance(vals, list) else vals)
                       for a, vals in out["grid"].items()}
    return out


def _matrix_rows(path: str, matrix: str, row_offset: int, rows: int, key: str,
                 where: str) -> tuple:
    """(the whole matrix, the cell's rows) of ``matrix`` in ``path``, read (memory-mapped)
    through the validated header."""
    from gatesim.diff.errors import CheckpointError
    from gatesim.diff.io import read_safetensors_header, read_tensor, torch_dtype
    try:
        refs, _meta, _sha = read_safetensors_header(path)
    except CheckpointError as exc:
        raise SweepConfigError(f"cell {key}: {where}: not a readable safetensors file: {exc}") \
            from None
    ref = refs.get(matrix)
    if ref is None:
        near = sorted(refs)[:5]
        raise SweepConfigError(f"cell {key}: {path}: matrix: no tensor {matrix!r} in the file "
                               f"(it holds {len(refs)}, e.g. {near})")
    if len(ref.shape) != 2:
        raise SweepConfigError(f"cell {key}: {path}: matrix: {matrix!r} has shape "
                               f"{list(ref.shape)}; a 2-D matrix is needed")
    if not torch_dtype(ref.dtype).is_floating_point:
        raise SweepConfigError(f"cell {key}: {path}: matrix: {matrix!r} is {ref.dtype}; a "
                               "floating-point matrix is needed")
    m = ref.shape[0]
    if row_offset + rows > m:
        raise SweepConfigError(f"cell {key}: {path}: rows/row_offset: rows {row_offset}.."
                               f"{row_offset + rows - 1} do not fit {matrix!r}, which has "
                               f"{m} rows")
    try:
        t = read_tensor(ref)
    except CheckpointError as exc:
        raise SweepConfigError(f"cell {key}: {where}: {exc}") from None
    return t, t[row_offset: row_offset + rows]


def validate_sweep(sweep) -> dict:
    """Checks every input of every cell of ``sweep`` (module docstring); raises
    :class:`SweepConfigError` on the first problem. Returns ``{"PATH::MATRIX": checksum}``
    of every matrix the cells read (:mod:`gatesim.integrity`): what ties stored cells to
    the weights they were computed from (``ablate`` records it in ``sweep.json``)."""
    return validate_cells(sweep.cells())


def validate_cells(cells) -> dict:
    """:func:`validate_sweep` for ``(key, CellConfig)`` pairs (``gatesim run``: one)."""
    from gatesim.integrity import checksum_tensor
    from gatesim.weights import bundled_model_path
    seen: dict = {}
    sums: dict = {}
    for key, cfg in cells:
        path = str(cfg.path) if cfg.path is not None else str(bundled_model_path())
        where = f"path {cfg.path!r}" if cfg.path is not None else "the bundled MiniLM"
        sig = (path, cfg.matrix, cfg.row_offset, cfg.rows)
        if sig not in seen:
            if not os.path.isfile(path):
                raise SweepConfigError(f"cell {key}: path: {path!r} is not a file")
            full, w = _matrix_rows(path, cfg.matrix, cfg.row_offset, cfg.rows, key, where)
            ident = f"{os.path.abspath(path)}::{cfg.matrix}"
            if ident not in sums:
                sums[ident] = checksum_tensor(full)
            if not bool(torch.isfinite(w.to(torch.float32)).all()):
                raise SweepConfigError(f"cell {key}: {path}: matrix: {cfg.matrix!r} has "
                                       "non-finite values in the chosen rows")
            seen[sig] = tuple(w.shape)
        rows, cols = seen[sig]
        if cfg.k > min(rows, cols):
            raise SweepConfigError(f"cell {key}: k: {cfg.k} exceeds min(rows, columns) = "
                                   f"{min(rows, cols)} of the chosen matrix")
        if cfg.n_targets >= rows:
            raise SweepConfigError(f"cell {key}: n_targets: {cfg.n_targets} must be below "
                                   f"rows ({rows})")
    return dict(sorted(sums.items()))
