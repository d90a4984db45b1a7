"""Reference twins of the gatesim kernels, in numba, written for clarity rather than speed.

The C++ kernels work on bit patterns; these twins work on *values* in float64 (every
fp32 value, every format value and every quantum is exact in float64), so they are an
independent formulation of the same definitions. Tests hold each kernel against its
twin bit-for-bit.

A format is passed as the op-level list ``Format.op_args(saturate, rand_bits)`` =
``[ebits, mbits, bias, subnormals, inf, nan_fn, saturate, rand_bits]``.
"""
from __future__ import annotations

import math

import numba
import numpy as np

NEAREST_EVEN, NEAREST_AWAY, TOWARD_ZERO, UP, DOWN, ODD, STOCHASTIC = range(7)

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = 0x9E3779B9
_W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF


# ----- Philox4x32-10 and the stream layout ------------------------------------------
@numba.njit(cache=True)
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 of counter (c0..c3) under key (k0, k1); returns four words.

    Everything is held in uint64 and masked to 32 bits after each operation.
    """
    mask = np.uint64(0xFFFFFFFF)
    c0, c1, c2, c3 = np.uint64(c0), np.uint64(c1), np.uint64(c2), np.uint64(c3)
    k0, k1 = np.uint64(k0), np.uint64(k1)
    for _ in range(10):
        p0 = _M0 * c0  # 32 x 32 -> 64-bit products
        p1 = _M1 * c2
        n0 = ((p1 >> np.uint64(32)) ^ c1 ^ k0) & mask
        n1 = p1 & mask
        n2 = ((p0 >> np.uint64(32)) ^ c3 ^ k1) & mask
        n3 = p0 & mask
        c0, c1, c2, c3 = n0, n1, n2, n3
        k0 = (k0 + np.uint64(_W0)) & mask
        k1 = (k1 + np.uint64(_W1)) & mask
    return np.int64(c0), np.int64(c1), np.int64(c2), np.int64(c3)


@numba.njit(cache=True)
def random_word(seed, p):
    """Word for stream position p: lane (p // 16) % 4 of counter (p // 64) * 16 + p % 16."""
    counter = (p // 64) * 16 + p % 16
    words = philox4x32_10(counter & 0xFFFFFFFF, counter >> 32, 0, 0,
                          seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    lane = (p // 16) % 4
    if lane == 0:
        return words[0]
    if lane == 1:
        return words[1]
    if lane == 2:
        return words[2]
    return words[3]


@numba.njit(cache=True)
def random_words(n, seed, offset):
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        out[i] = random_word(seed, offset + i)
    return out


# ----- format arithmetic ---------------------------------------------------------------
@numba.njit(cache=True)
def max_finite(ebits, m, bias, fn):
    top = 2 ** ebits - 1
    if fn:
        emax = (top if m > 0 else top - 1) - bias
        frac = (2.0 ** m - 2.0) / 2.0 ** m if m > 0 else 0.0
    else:
        emax = top - 1 - bias
        frac = (2.0 ** m - 1.0) / 2.0 ** m
    return math.ldexp(1.0 + frac, emax)


@numba.njit(cache=True)
def _binade(v):
    """e with v in [2**e, 2**(e+1)), v > 0 finite."""
    _, ex = math.frexp(v)
    return ex - 1


@numba.njit(cache=True)
def _quantum_exp(e, emin, m, subnormals):
    """Exponent of the format's spacing for values of binade e."""
    if e >= emin:
        return e - m
    return emin - m if subnormals else emin  # no subnormals: one gap (0, 2**emin)


@numba.njit(cache=True)
def _lo_is_odd(n, e, emin, m, bias):
    """Last bit of the encoding of lo = n * quantum."""
    if n == 0:
        return False
    if e >= emin and m == 0:
        return (e + bias) % 2 == 1  # no mantissa: the biased exponent's last bit
    return n % 2 == 1


@numba.njit(cache=True)
def _overflow_to_inf(mode, neg):
    if mode == TOWARD_ZERO or mode == ODD:
        return False
    if mode == UP:
        return not neg
    if mode == DOWN:
        return neg
    return True


@numba.njit(cache=True)
def _infinity_due(fmt, maxf):
    if fmt[6]:  # saturate
        return maxf
    if fmt[4]:  # has inf
        return math.inf
    return math.nan


@numba.njit(cache=True)
def round_exact(s, err, fmt, mode, rnd, src_m, src_emin, rcap):
    """Rounds the exact value s + err (floats, |err| < ulp(s)/2 or err == 0) to fmt.

    ``src_m``/``src_emin`` describe the source precision (23/-126 for fp32 inputs,
    52/-1022 for exact fp64 sums): stochastic rounding with ``rand_bits=0`` uses every
    bit the source holds below the format's last bit, capped at 32 and at ``rcap``.
    Returns a float64 (NaN with the input's sign for NaN).
    """
    ebits, m, bias, subn = fmt[0], fmt[1], fmt[2], fmt[3]
    emin = 1 - bias
    maxf = max_finite(ebits, m, bias, fmt[5] != 0)
    if math.isnan(s):
        return math.copysign(math.nan, s)
    neg = math.copysign(1.0, s) < 0.0
    v, ev = abs(s), (-err if neg else err)
    if math.isinf(v):
        return math.copysign(_infinity_due(fmt, maxf), s)
    if v == 0.0:
        return s
    e = _binade(v)
    if ev < 0.0 and v == math.ldexp(1.0, e):
        e -= 1  # the exact value lies just below the power of two
    qe = _quantum_exp(e, emin, m, subn != 0)
    q = math.ldexp(1.0, qe)
    n = math.floor(v / q)  # exact: v / q only rescales
    rem = v - n * q  # exact
    if rem == 0.0 and ev < 0.0:
        n -= 1
        rem = q  # "q minus a sliver": the comparisons below use ev's sign
    lo, hi = n * q, (n + 1) * q
    inexact = rem != 0.0 or ev != 0.0
    half = q / 2.0
    above = rem > half or (rem == half and ev > 0.0)
    tie = rem == half and ev == 0.0
    odd = _lo_is_odd(n, e, emin, m, bias)
    if mode == NEAREST_EVEN:
        up = above or (tie and odd)
    elif mode == NEAREST_AWAY:
        up = above or tie
    elif mode == TOWARD_ZERO:
        up = False
    elif mode == UP:
        up = inexact and not neg
    elif mode == DOWN:
        up = inexact and neg
    elif mode == ODD:
        up = inexact and not odd
    else:
        d = qe - (max(e, src_emin) - src_m)  # source bits below the format's last bit
        r = fmt[7] if fmt[7] > 0 else min(d, 32)
        r = min(r, rcap)
        scaled = rem / q * 2.0 ** r  # exact (power-of-two rescaling)
        t = math.floor(scaled)
        if scaled == t and ev < 0.0 and rem != 0.0:
            t -= 1  # the sliver below pushes floor down
        big_r = (rnd >> (32 - r)) if r > 0 else 0
        up = t + big_r >= 2 ** r
    res = hi if up else lo
    if res > maxf:
        res = _infinity_due(fmt, maxf) if _overflow_to_inf(mode, neg) else maxf
    return -res if neg else res


@numba.njit(cache=True)
def quantize(x, fmt, mode, seed, offset):
    """Twin of gatesim.quantize: float32 array in, float32 array out."""
    out = np.empty(x.size, dtype=np.float32)
    for i in range(x.size):
        rnd = random_word(seed, offset + i) if mode == STOCHASTIC else 0
        out[i] = round_exact(np.float64(x[i]), 0.0, fmt, mode, rnd, 23, -126, 32)
    return out


@numba.njit(cache=True)
def encode(y, fmt):
    """Twin of the storage encoding: format values (float32) to right-aligned codes."""
    ebits, m, bias, fn = fmt[0], fmt[1], fmt[2], fmt[5] != 0
    emin = 1 - bias
    top = 2 ** ebits - 1
    out = np.empty(y.size, dtype=np.int64)
    for i in range(y.size):
        v = np.float64(y[i])
        sign = 1 if math.copysign(1.0, v) < 0.0 else 0
        a = abs(v)
        if math.isnan(v):
            code = (top << m) | ((2 ** m - 1) if fn else (2 ** (m - 1) if m > 0 else 0))
        elif math.isinf(v):
            code = top << m
        elif a == 0.0:
            code = 0
        else:
            e = _binade(a)
            if e >= emin:
                code = ((e + bias) << m) | int((a / math.ldexp(1.0, e) - 1.0) * 2 ** m)
            else:
                code = int(a / math.ldexp(1.0, emin - m))
        out[i] = code | (sign << (ebits + m))
    return out


@numba.njit(cache=True)
def ulp(x, fmt):
    """Twin of gatesim.ulp."""
    m, bias, subn = fmt[1], fmt[2], fmt[3] != 0
    emin = 1 - bias
    out = np.empty(x.size, dtype=np.float32)
    for i in range(x.size):
        v = abs(np.float64(x[i]))
        if math.isnan(v):
            out[i] = math.nan
        elif math.isinf(v):
            out[i] = math.inf
        elif v == 0.0 or _binade(v) < emin:
            out[i] = math.ldexp(1.0, emin - (m if subn else 0))
        else:
            out[i] = math.ldexp(1.0, _binade(v) - m)
    return out


@numba.njit(cache=True)
def two_sum(a, b):
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@numba.njit(cache=True)
def absorbed(w, delta, fmt, mode, seed, offset):
    """Twin of gatesim.absorbed: exact w + delta, rounded, compared with w."""
    out = np.empty(w.size, dtype=np.bool_)
    rcap = min(51 - fmt[1], 32)
    for i in range(w.size):
        wv, dv = np.float64(w[i]), np.float64(delta[i])
        s, err = two_sum(wv, dv)
        if math.isinf(s) or math.isnan(s):
            err = 0.0
        rnd = random_word(seed, offset + i) if mode == STOCHASTIC else 0
        r = round_exact(s, err, fmt, mode, rnd, 52, -1022, rcap)
        same = (r == wv) and not math.isnan(wv)
        out[i] = dv != 0.0 and same
    return out
