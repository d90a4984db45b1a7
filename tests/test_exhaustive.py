"""Every one of the 2**32 float32 bit patterns through nearest_even, bit-for-bit.

For BF16, FP16, E4M3FN and E5M2 the storage encoding from gatesim.to_dtype must equal
ml_dtypes' conversion, and gatesim.quantize must equal that encoding decoded back to
float32; torch's own casts are checked too (E4M3FN against saturate=True, because torch
saturates that cast). NaN inputs: gatesim gives the canonical quiet NaN with the input's
sign, as ml_dtypes does for bf16 and fp8; numpy's fp16 keeps payload bits, so for FP16
NaN inputs only NaN-ness and sign are compared.

Chunked (2**24 patterns at a time): about a minute per format on 2 cores.
"""
import ml_dtypes
import numpy as np
import pytest
import torch

import gatesim

CHUNK = 1 << 24
CASES = {
    "bf16": (gatesim.BF16, ml_dtypes.bfloat16, torch.bfloat16, np.uint16),
    "fp16": (gatesim.FP16, np.float16, torch.float16, np.uint16),
    "e4m3fn": (gatesim.E4M3FN, ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn, np.uint8),
    "e5m2": (gatesim.E5M2, ml_dtypes.float8_e5m2, torch.float8_e5m2, np.uint8),
}


def _raw(t: torch.Tensor, utype) -> np.ndarray:
    return t.view(torch.uint8 if utype == np.uint8 else torch.int16).numpy().view(utype)


@pytest.mark.parametrize("name", list(CASES))
def test_all_float32_patterns_round_like_ml_dtypes_and_torch(name):
    fmt, mldt, tdt, utype = CASES[name]
    sign_bit = utype(1 << (8 * np.dtype(utype).itemsize - 1))
    checked = 0
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, 1 << 32, CHUNK):
            bits = np.arange(start, start + CHUNK, dtype=np.uint32)
            x = bits.view(np.float32)
            xt = torch.from_numpy(x)
            nan = np.isnan(x)
            ours = _raw(gatesim.to_dtype(xt, tdt), utype)
            ref = x.astype(mldt).view(utype)
            if name == "fp16":
                ok = np.where(nan, np.isnan(ref.view(np.float16)) & ((ours & sign_bit) == (ref & sign_bit)),
                              ours == ref)
                ok &= np.where(nan, np.isnan(ours.view(np.float16)), True)
            else:
                ok = ours == ref
            bad = np.flatnonzero(~ok)
            assert bad.size == 0, (f"{name}: {bad.size} patterns differ from ml_dtypes, first "
                                   f"{bits[bad[0]]:#010x} -> {ours[bad[0]]:#x} vs {ref[bad[0]]:#x}")

            # quantize (fp32 out) is the storage value decoded
            q = gatesim.quantize(xt, fmt).numpy().view(np.uint32)
            dec = gatesim.to_dtype(xt, tdt).float().numpy().view(np.uint32)
            both_nan = np.isnan(q.view(np.float32)) & np.isnan(dec.view(np.float32))
            okq = (q == dec) | both_nan
            assert okq.all(), f"{name}: quantize differs from to_dtype at {bits[~okq][0]:#010x}"
            assert np.isnan(q.view(np.float32)[nan]).all()

            # torch's own cast (non-NaN inputs; torch canonicalizes NaN differently)
            sat = name == "e4m3fn"
            ours_t = _raw(gatesim.to_dtype(xt, tdt, saturate=sat), utype)
            theirs = _raw(xt.to(tdt), utype)
            okt = (ours_t == theirs) | nan
            assert okt.all(), f"{name}: differs from torch cast at {bits[~okt][0]:#010x}"
            checked += CHUNK
    assert checked == 1 << 32
