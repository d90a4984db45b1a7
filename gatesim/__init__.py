"""gatesim: simulate and measure how number formats and optimizer steps hide weight updates.

Precision core: :class:`Format` and its named instances, :func:`quantize`,
:func:`to_dtype`, :func:`ulp`, :func:`absorbed`, :func:`random_bits`.
Fused updates: :func:`apply_update` and :class:`UpdateStats`; emulated optimizers in
:mod:`gatesim.optim`.
"""
from gatesim.formats import BF16, E4M3FN, E5M2, FORMATS, FP16, FP32, TF32, Format, as_format
from gatesim._ops import cpu_isa
from gatesim.precision import MODES, absorbed, quantize, random_bits, to_dtype, ulp
from gatesim.update import UpdateStats, apply_update
from gatesim.tracking import track

from gatesim._version import __version__

__all__ = [
    "Format", "FP32", "TF32", "BF16", "FP16", "E4M3FN", "E5M2", "FORMATS", "as_format",
    "MODES", "quantize", "to_dtype", "ulp", "absorbed", "random_bits", "cpu_isa",
    "UpdateStats", "apply_update", "track",
]
