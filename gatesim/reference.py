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

from gatesim.stat_layout import HIST_BINS, HIST_LO_LOG2, N_STATS, STAT_FIELDS

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
def random_word(seed, p, stream=0):
    """Word for position p of a stream: lane (p // 16) % 4 of the Philox counter
    (p // 64 * 16 + p % 16, stream) under key seed."""
    counter = (p // 64) * 16 + p % 16
    words = philox4x32_10(counter & 0xFFFFFFFF, counter >> 32, stream & 0xFFFFFFFF,
                          (stream >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF,
                          (seed >> 32) & 0xFFFFFFFF)
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


# ----- apply_update ------------------------------------------------------------------
UPDATE_BLOCK = 4096
HIST_LO = HIST_LO_LOG2
_N_COUNTERS = len(STAT_FIELDS)   # the histogram follows the counters
STORAGE, MASTER, KAHAN = 0, 1, 2
SUM_EXACT, SUM_FP32 = 0, 1
_FP32_ARGS = np.array([8, 23, 127, 1, 1, 0, 0, 0], dtype=np.int64)


@numba.njit(cache=True)
def _bits32(x):
    """float32 bit pattern of x (NaN canonical: as the kernels produce it)."""
    tmp = np.empty(1, dtype=np.float32)
    tmp[0] = x
    return tmp.view(np.uint32)[0]


@numba.njit(cache=True)
def _canon(x):
    """NaN results of arithmetic are canonical +qNaN (as in the kernels)."""
    return math.nan if math.isnan(x) else x


@numba.njit(cache=True)
def _f32(x):
    return np.float64(np.float32(x))


@numba.njit(cache=True)
def _round_sum(a, b, fmt, mode, rnd, rcap):
    """Format rounding of the exact a + b (doubles holding exact values)."""
    s, err = two_sum(_canon(a), _canon(b))
    s = _canon(s)
    if math.isinf(s) or math.isnan(s):
        err = 0.0
    return round_exact(s, err, fmt, mode, rnd, 52, -1022, rcap)


@numba.njit(cache=True)
def fma32(a, b, c):
    """float32 fma: a * b + c rounded once (a * b is exact in float64)."""
    return _round_sum(a * b, c, _FP32_ARGS, NEAREST_EVEN, 0, 32)


@numba.njit(cache=True)
def _round32(x, fmt, mode, rnd):
    """Format rounding of a float32 value (held in a float64)."""
    return round_exact(x, 0.0, fmt, mode, rnd, 23, -126, 32)


@numba.njit(cache=True)
def _storage_step(p, d, fmt, mode, alpha, decay, sum_mode, r0, r1):
    if sum_mode == SUM_EXACT:
        return _round_sum(p * decay, alpha * d, fmt, mode, r1, min(51 - fmt[1], 32))
    p1 = _round32(_f32(_canon(p * decay)), fmt, mode, r0)
    return _round32(fma32(alpha, d, p1), fmt, mode, r1)


@numba.njit(cache=True)
def _ulp_exp(x, fmt):
    m, bias, subn = fmt[1], fmt[2], fmt[3] != 0
    emin = 1 - bias
    v = abs(x)
    if v != 0.0 and _binade(v) >= emin:
        return _binade(v) - m
    return emin - (m if subn else 0)


@numba.njit(cache=True)
def apply_update(p, d, master, comp, path, fmt, mode, sum_mode, alpha, decay, seed, offset,
                 step):
    """Twin of gatesim.apply_update on float32 arrays holding format values (p, comp) and
    fp32 (d, master). Returns (new p, new master, new comp, counts[N_STATS], mass)."""
    n = p.size
    pn = np.empty(n, dtype=np.float32)
    mn = master.copy()
    cn = comp.copy()
    counts = np.zeros(N_STATS, dtype=np.int64)
    fmt_c = fmt.copy()
    fmt_c[6] = 0
    fmt_c[7] = 0
    alpha, decay = np.float64(np.float32(alpha)), np.float64(np.float32(decay))
    rcap = min(51 - fmt[1], 32)
    nblocks = (n + UPDATE_BLOCK - 1) // UPDATE_BLOCK
    padded = 1
    while padded < nblocks:
        padded *= 2
    block_mass = np.zeros(padded)
    for b0 in range(0, n, UPDATE_BLOCK):
        acc = np.zeros(UPDATE_BLOCK)
        for i in range(b0, min(n, b0 + UPDATE_BLOCK)):
            pos = offset + i
            r0 = random_word(seed, pos, 2 * step) if mode == STOCHASTIC else 0
            r1 = random_word(seed, pos, 2 * step + 1) if mode == STOCHASTIC else 0
            po, dv = np.float64(p[i]), np.float64(d[i])
            differs = False
            if path == MASTER:
                m2 = fma32(alpha, dv, _f32(_canon(np.float64(master[i]) * decay)))
                mn[i] = m2
                new = _round32(m2, fmt, mode, r1)
                u = alpha * dv + ((decay - 1.0) * np.float64(master[i]) if decay != 1.0 else 0.0)
            elif path == KAHAN:
                c = np.float64(comp[i])
                if sum_mode == SUM_EXACT:
                    p1 = round_exact(_canon(po * decay), 0.0, fmt, mode, r0, 52, -1022, rcap)
                    c1 = _round_sum(c, alpha * dv, fmt_c, NEAREST_EVEN, 0, 32)
                    new = _round_sum(p1, c1, fmt, mode, r1, rcap)
                    cn[i] = _round_sum(c1, _canon(p1 - new), fmt_c, NEAREST_EVEN, 0, 32)
                else:
                    p1 = _round32(_f32(_canon(po * decay)), fmt, mode, r0)
                    c1 = _round32(fma32(alpha, dv, c), fmt_c, NEAREST_EVEN, 0)
                    new = _round32(_f32(_canon(p1 + c1)), fmt, mode, r1)
                    t = _round32(_f32(_canon(p1 - new)), fmt_c, NEAREST_EVEN, 0)
                    cn[i] = _round32(_f32(_canon(c1 + t)), fmt_c, NEAREST_EVEN, 0)
                u = alpha * dv + ((decay - 1.0) * po if decay != 1.0 else 0.0)
            else:
                new = _storage_step(po, dv, fmt, mode, alpha, decay, sum_mode, r0, r1)
                other = _storage_step(po, dv, fmt, mode, alpha, decay, 1 - sum_mode, r0, r1)
                differs = _bits32(other) != _bits32(new)
                u = alpha * dv + ((decay - 1.0) * po if decay != 1.0 else 0.0)
            pn[i] = new
            # statistics (bitwise-sparsity equality: +0 == -0, NaN never equal)
            same = (po == new) and not math.isnan(po)
            changed = not same
            zero = u == 0.0
            absorbed = (not zero) and not changed
            counts[0] += 1
            counts[1] += changed
            counts[2] += absorbed
            counts[3] += zero
            counts[4] += not math.isfinite(dv)
            counts[5] += not math.isfinite(po)
            counts[6] += not math.isfinite(new)
            counts[7] += differs
            if not zero and math.isfinite(u) and math.isfinite(po):
                k = _binade(abs(u)) - _ulp_exp(po, fmt) - HIST_LO + 1
                counts[_N_COUNTERS + min(max(k, 0), HIST_BINS - 1)] += 1
            if absorbed:
                acc[i - b0] = abs(u)
        block_mass[b0 // UPDATE_BLOCK] = tree_sum(acc)
    mass = tree_sum(block_mass) if n > 0 else 0.0
    return pn, mn, cn, counts, mass


@numba.njit(cache=True)
def tree_sum(a):
    """Pairwise sum in the kernels' fixed order: for half = n/2, ..., 1: a[k] += a[k + half]
    (n a power of two; a is consumed)."""
    half = a.size // 2
    while half >= 1:
        for k in range(half):
            a[k] += a[k + half]
        half //= 2
    return a[0]


# ----- optimizers (SGD, Adam/AdamW) ------------------------------------------------------
# The fp32 arithmetic mirrors torch's single-tensor kernels on CPU, measured op by op:
# add(x, alpha=a) and addcmul are fmas, lerp is an fma (two forms by weight), mul/div/add
# are plain fp32 ops, and sqrt is correctly rounded here (PrecisionPolicy.torch_math=False).
@numba.njit(cache=True)
def _f32a(x):
    out = np.empty(x.size, dtype=np.float32)
    for i in range(x.size):
        out[i] = x[i]
    return out


@numba.njit(cache=True)
def _round_state(x, sfmt):
    out = np.empty(x.size, dtype=np.float32)
    for i in range(x.size):
        out[i] = _round32(np.float64(x[i]), sfmt, NEAREST_EVEN, 0)
    return out


@numba.njit(cache=True)
def _lerp32(s, e, w):
    """torch.lerp for float32: fma(w, e - s, s) if w < 0.5 else fma(-(1 - w), e - s, e)."""
    d = _f32(e - s)
    if w < 0.5:
        return fma32(w, d, s)
    return fma32(-_f32(1.0 - w), d, e)


@numba.njit(cache=True)
def sgd_step(x, grad, buf, has_buf, lr, momentum, dampening, wd, nesterov, sfmt):
    """fp32 part of torch's single-tensor SGD: returns (update direction, new buffer)."""
    n = grad.size
    g = np.empty(n, dtype=np.float32)
    wd32, mom32, od32 = np.float64(np.float32(wd)), np.float64(np.float32(momentum)), \
        np.float64(np.float32(1.0 - dampening))
    for i in range(n):
        gi = np.float64(grad[i])
        g[i] = fma32(wd32, np.float64(x[i]), gi) if wd != 0.0 else gi
    if momentum != 0.0:
        if has_buf:
            nb = np.empty(n, dtype=np.float32)
            for i in range(n):
                nb[i] = fma32(od32, np.float64(g[i]), _f32(np.float64(buf[i]) * mom32))
            buf = _round_state(nb, sfmt)
        else:
            buf = _round_state(g, sfmt)
        if nesterov:
            out = np.empty(n, dtype=np.float32)
            for i in range(n):
                out[i] = fma32(mom32, np.float64(buf[i]), np.float64(g[i]))
            return out, buf
        return buf.copy(), buf
    return g, buf


def adam_scalars(step, lr, beta1, beta2):
    """The Python-double scalars of torch's Adam step (numba's ** differs from CPython's
    pow in the last bit, so they are computed here, exactly as torch computes them)."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    return -step_size, bias_correction2 ** 0.5


@numba.njit(cache=True)
def adam_step(x, grad, exp_avg, exp_avg_sq, neg_step_size, bc2_sqrt, beta1, beta2, eps, wd,
              decoupled, sfmt):
    """fp32 part of torch's single-tensor Adam(W): returns (delta, m, v) with the parameter
    update delta (alpha = 1). neg_step_size and bc2_sqrt come from adam_scalars."""
    n = grad.size
    wd32 = np.float64(np.float32(wd))
    w1 = np.float64(np.float32(1.0 - beta1))
    b2 = np.float64(np.float32(beta2))
    v2 = np.float64(np.float32(1.0 - beta2))
    g = np.empty(n, dtype=np.float32)
    for i in range(n):
        gi = np.float64(grad[i])
        g[i] = fma32(wd32, np.float64(x[i]), gi) if (wd != 0.0 and not decoupled) else gi
    m = np.empty(n, dtype=np.float32)
    v = np.empty(n, dtype=np.float32)
    for i in range(n):
        m[i] = _lerp32(np.float64(exp_avg[i]), np.float64(g[i]), w1)
        gi = np.float64(g[i])
        v[i] = fma32(_f32(v2 * gi), gi, _f32(np.float64(exp_avg_sq[i]) * b2))
    m = _round_state(m, sfmt)
    v = _round_state(v, sfmt)
    bc2s = np.float64(np.float32(bc2_sqrt))
    eps32 = np.float64(np.float32(eps))
    neg_step = np.float64(np.float32(neg_step_size))
    delta = np.empty(n, dtype=np.float32)
    for i in range(n):
        denom = _f32(_f32(_f32(math.sqrt(np.float64(v[i]))) / bc2s) + eps32)
        delta[i] = _f32(_f32(np.float64(m[i]) * neg_step) / denom)
    return delta, m, v
