"""Precision policies: how an optimizer, a simulated run or a tracker's what-if stores what it
computes, and the one name grammar that writes a policy down.

A :class:`PrecisionPolicy` is used by the emulated optimizers (:mod:`gatesim.optim`), the gate
simulation's shadow weights (:mod:`gatesim.sim`), the tracker's what-ifs
(:mod:`gatesim.tracking`) and the lab. Its :attr:`~PrecisionPolicy.name` is what sweeps,
results, what-ifs and logs write; :meth:`PrecisionPolicy.parse` reads it back.

Name grammar (canonical form)::

    NAME   := BASE ("+" FLAG)*
    BASE   := FORMAT ["_" MODE] | MODE | ""      (no FORMAT: the parameter's own format)
    FORMAT := fp32 | tf32 | bf16 | fp16 | e4m3fn | e5m2
    MODE   := sr | rna | rtz | up | down | odd   (nearest-even is written as nothing)
    FLAG   := master | kahan | exact             (in this order)

``bf16`` (nearest-even storage), ``bf16_sr`` (stochastic rounding), ``bf16+master`` (fp32
master weights, stored value ``R(master)``), ``bf16_sr+master``, ``fp16+kahan+exact``,
``master`` (the parameter's own format with fp32 master weights), ``own`` (the parameter's
own format, nearest-even: the name of ``PrecisionPolicy()``).

:meth:`PrecisionPolicy.parse` also reads the spellings older versions wrote: tokens joined by
``_``, ``+``, ``:`` or spaces in any order after the format (``bf16_master``,
``bf16_sr_master``, ``fp16_kahan_exact``, ``own_master``), the long mode names and their
aliases (``stochastic``, ``nearest``, ``rne``, ``toward_zero`` ...) and torch dtype names as
the format (``bfloat16``). The name covers storage only: the seed of stochastic rounding, the
optimizer state's format and ``torch_math`` are fields outside it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional, Union

import torch

from gatesim.formats import FORMATS, Format, as_format
from gatesim.precision import MODES, mode_index
from gatesim.update import SUM_MODES

__all__ = ["PrecisionPolicy", "FLAGS", "canonical_name"]

#: The ``+FLAG`` suffixes of a policy name, in canonical order.
FLAGS = ("master", "kahan", "exact")
#: Short name of each rounding mode in a policy name (nearest-even has none).
_MODE_SUFFIX = {"nearest_even": "", "stochastic": "sr", "nearest_away": "rna",
                "toward_zero": "rtz", "up": "up", "down": "down", "odd": "odd"}
assert set(_MODE_SUFFIX) == set(MODES)
#: Every spelling of a mode a name may carry, as one token (long names written with ``_``
#: are folded to one token before the name is split).
_MODE_TOKENS = {"sr": "stochastic", "stochastic": "stochastic", "rne": "nearest_even",
                "nearest": "nearest_even", "nearesteven": "nearest_even",
                "rna": "nearest_away", "nearestaway": "nearest_away", "rtz": "toward_zero",
                "towardzero": "toward_zero", "truncate": "toward_zero", "up": "up",
                "ceil": "up", "down": "down", "floor": "down", "odd": "odd"}


@dataclasses.dataclass(frozen=True)
class PrecisionPolicy:
    """How an emulated optimizer, a shadow copy or a what-if stores what it computes.

    Attributes:
        param_format: storage format of the parameters (a Format, name or dtype; default
            None: each parameter's own dtype). A float32 parameter under another format is
            held as float32 values on the format's grid (rounded to nearest once, when the
            optimizer is built).
        master: keep fp32 master weights; the stored parameter is ``R(master)``.
        state_format: format of the optimizer state (momentum, Adam moments), rounded to
            nearest even after every update.
        mode: rounding mode of the stored parameter (nearest_even or stochastic, or any
            other of :data:`gatesim.MODES`; aliases such as ``"sr"`` are accepted).
        kahan: Kahan-compensated parameter storage (torch-optimi's scheme); not with master.
        sum: ``"fp32"`` (default: what PyTorch does, compute in fp32 then round) or
            ``"exact"`` (round the exact result once); see :mod:`gatesim.update`.
        seed: Philox seed of stochastic rounding. Parameter i uses stream positions
            starting at the total size of parameters 0..i-1, and step s stream 2s(+1).
        torch_math: do the fp32 arithmetic with torch's own kernels (bit-identical to
            torch.optim on this machine). False replaces the one op that is not correctly
            rounded on some CPUs, ``torch.sqrt`` of float32, by a correctly rounded sqrt,
            which makes results machine-independent and equal to the numba twin.
    """

    param_format: Optional[Union[Format, str, torch.dtype]] = None
    master: bool = False
    state_format: Union[Format, str, torch.dtype] = "fp32"
    mode: str = "nearest_even"
    kahan: bool = False
    sum: str = "fp32"
    seed: int = 0
    torch_math: bool = True

    def __post_init__(self) -> None:
        if self.param_format is not None:
            object.__setattr__(self, "param_format", as_format(self.param_format, "param_format"))
        object.__setattr__(self, "state_format", as_format(self.state_format, "state_format"))
        object.__setattr__(self, "mode", MODES[mode_index(self.mode)])
        if self.master and self.kahan:
            raise ValueError("master and kahan: choose one (Kahan compensates low-precision "
                             "storage without a master copy)")
        if self.sum not in SUM_MODES:
            raise ValueError(f"sum must be one of {SUM_MODES}, got {self.sum!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"seed must be an int in [0, 2**63), got {self.seed!r}")

    @property
    def stochastic(self) -> bool:
        return self.mode == "stochastic"

    @property
    def name(self) -> str:
        """The canonical name (module docstring): ``bf16_sr+master``, ``fp32``, ``master``."""
        base = str(self.param_format) if self.param_format is not None else ""
        suffix = _MODE_SUFFIX[self.mode]
        if suffix:
            base = f"{base}_{suffix}" if base else suffix
        flags = [f for f, on in zip(FLAGS, (self.master, self.kahan, self.sum == "exact")) if on]
        if not base:
            return "+".join(flags) if flags else "own"
        return "+".join([base] + flags)

    def storage_format(self, own: Format) -> Format:
        """The format values are stored in, for a parameter whose own format is ``own``."""
        return self.param_format or own

    def describe(self) -> str:
        parts = [f"param={self.param_format or 'own dtype'}", f"mode={self.mode}",
                 f"state={self.state_format}", f"sum={self.sum}"]
        if self.master:
            parts.append("master=fp32")
        if self.kahan:
            parts.append("kahan")
        return " ".join(parts)

    @classmethod
    def parse(cls, spec: Union[str, "PrecisionPolicy"], **fields) -> "PrecisionPolicy":
        """A policy from its name (canonical or an older spelling, module docstring) or a
        policy (returned as it is). ``fields`` set what the name does not say (``seed``,
        ``state_format``, ``torch_math``). Raises ValueError naming the part it does not
        understand, TypeError for a spec that is neither a string nor a policy."""
        if isinstance(spec, PrecisionPolicy):
            return dataclasses.replace(spec, **fields) if fields else spec
        if not isinstance(spec, str):
            raise TypeError("a precision policy is a name or a gatesim.policy.PrecisionPolicy, "
                            f"got {type(spec).__name__}")
        text = spec.strip().lower()
        for long in ("nearest_even", "nearest_away", "toward_zero"):  # one token each
            text = text.replace(long, long.replace("_", ""))
        tokens = [t for t in re.split(r"[_+:\s]+", text) if t]
        if not tokens:
            raise ValueError(f"policy {spec!r}: empty name")
        fmt: Optional[Format] = None
        if tokens[0] not in _MODE_TOKENS and tokens[0] not in FLAGS:
            fmt, tokens = _parse_format(spec, tokens)
        modes = {_MODE_TOKENS[t] for t in tokens if t in _MODE_TOKENS}
        bad = [t for t in tokens if t not in _MODE_TOKENS and t not in FLAGS]
        if bad:
            raise ValueError(f"policy {spec!r}: unknown flag(s) {bad}; after the format come a "
                             f"rounding mode ({', '.join(s for s in _MODE_SUFFIX.values() if s)})"
                             f" and flags {', '.join('+' + f for f in FLAGS)}")
        if len(modes) > 1:
            raise ValueError(f"policy {spec!r}: more than one rounding mode {sorted(modes)}")
        return cls(param_format=fmt, mode=modes.pop() if modes else "nearest_even",
                   master="master" in tokens, kahan="kahan" in tokens,
                   sum="exact" if "exact" in tokens else "fp32", **fields)


def _parse_format(spec: str, tokens: list) -> tuple[Optional[Format], list]:
    """The format at the head of a name's tokens (``own``: None), and the tokens after it.
    Torch dtype names hold an ``_`` (``float8_e4m3fn``), so two tokens are tried first."""
    if tokens[0] == "own":
        return None, tokens[1:]
    for k in (2, 1):
        if len(tokens) >= k:
            try:
                return as_format("_".join(tokens[:k]), "policy format"), tokens[k:]
            except (ValueError, TypeError):
                pass
    raise ValueError(f"policy {spec!r}: unknown format {tokens[0]!r}; known: "
                     f"{sorted(FORMATS)} or 'own'")


def canonical_name(name):
    """``name`` in the canonical spelling when it parses (older spellings such as
    ``bf16_master`` become ``bf16+master``), else unchanged, for the caller's own validation
    to report."""
    try:
        return PrecisionPolicy.parse(name).name
    except (TypeError, ValueError):
        return name
