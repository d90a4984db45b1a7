"""Content checksums: what ties a stored result to the exact bytes it was computed from.

One function family, used by the checkpoint diff (a checksum of each tensor's bytes,
computed in the pass that reads them anyway, keys its resume) and by update streams (a
checksum of every shard and of the manifest, verified before a replay starts).

**The checksum** (``"g64:"`` + 16 hex digits) of a byte string ``b`` of ``n`` bytes: view
``b`` as little-endian 64-bit words ``w_i`` (the last, partial word padded with zero
bytes), then::

    acc = sum_i mix(w_i XOR (i * K))    (mod 2**64)
    checksum = fmix64(acc XOR (n * P))

with ``mix(x) = (x XOR (x >> 29)) * C`` (a bijection: changing any one word always changes
the sum) and ``fmix64`` the splitmix64 finalizer. Every word is mixed independently, so
the sum vectorizes and can be computed in blocks (:class:`Checksum` accumulates, in any
block sizes, the same value as one call). It detects corruption, truncation, stale or
swapped data with probability about ``1 - 2**-64``; it is **not** a cryptographic hash
(someone who wants a collision can make one).
"""
from __future__ import annotations

import os

import numba
import numpy as np

__all__ = ["Checksum", "checksum_bytes", "checksum_tensor", "checksum_file",
           "checksum_tensors_async", "PREFIX"]

PREFIX = "g64:"
_K = np.uint64(0x9E3779B97F4A7C15)
_C = np.uint64(0xBF58476D1CE4E5B9)
_P = np.uint64(0x94D049BB133111EB)
_MASK = (1 << 64) - 1


@numba.njit(cache=True, nogil=True)
def _sum_words(w, first):
    """``sum_i mix(w[i] XOR ((first + i) * K))`` mod 2**64 (uint64 in, uint64 out)."""
    acc = np.uint64(0)
    k = np.uint64(0x9E3779B97F4A7C15)
    c = np.uint64(0xBF58476D1CE4E5B9)
    s = np.uint64(29)
    pos = np.uint64(first) * k
    for i in range(w.size):
        x = w[i] ^ pos
        acc += (x ^ (x >> s)) * c
        pos += k
    return acc


def _fmix64(z: int) -> int:
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9 & _MASK
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB & _MASK
    return z ^ (z >> 31)


class Checksum:
    """Incremental checksum (module docstring): ``update`` with consecutive pieces of the
    byte string (numpy arrays or anything with the buffer protocol), then ``hexdigest``."""

    def __init__(self):
        self._acc = 0
        self._n = 0              # bytes consumed so far
        self._tail = b""         # bytes of an unfinished word

    @classmethod
    def from_word_sum(cls, acc: int, nwords: int) -> "Checksum":
        """The state after ``nwords`` whole words whose :func:`_sum_words` (from word 0)
        is ``acc``: lets a kernel that reads the words anyway (the diff's bitwise scan)
        compute the sum in its own pass; ``update`` then takes the remaining bytes."""
        h = cls()
        h._acc = int(acc) & _MASK
        h._n = 8 * int(nwords)
        return h

    def update(self, data) -> "Checksum":
        a = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) \
            else data.reshape(-1).view(np.uint8)
        if self._tail:
            need = 8 - len(self._tail)
            head = self._tail + a[:need].tobytes()
            a = a[need:]
            if len(head) < 8:
                self._tail = head
                return self
            self._add_words(np.frombuffer(head, dtype="<u8"))
            self._tail = b""
        n8 = a.size // 8 * 8
        if n8:
            self._add_words(a[:n8].view("<u8"))
        if n8 < a.size:
            self._tail = a[n8:].tobytes()
        return self

    def _add_words(self, w: np.ndarray) -> None:
        first = self._n // 8
        self._acc = (self._acc + int(_sum_words(w, first))) & _MASK
        self._n += 8 * w.size

    def hexdigest(self) -> str:
        acc, n = self._acc, self._n
        if self._tail:
            w = np.frombuffer(self._tail.ljust(8, b"\0"), dtype="<u8")
            acc = (acc + int(_sum_words(w, n // 8))) & _MASK
            n += len(self._tail)
        return f"{PREFIX}{_fmix64(acc ^ (n * int(_P) & _MASK)):016x}"


def checksum_bytes(data) -> str:
    """The checksum of a bytes-like object or numpy array (its raw bytes)."""
    return Checksum().update(data).hexdigest()


def checksum_tensor(t) -> str:
    """The checksum of a CPU tensor's stored bytes (C order)."""
    import torch
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return checksum_bytes(b"")
    return checksum_bytes(t.view(torch.uint8).numpy())


def checksum_file(path) -> str:
    """The checksum of a whole file (memory-mapped read-only: no copy)."""
    import mmap
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return checksum_bytes(b"")
        with mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as mm:
            arr = np.frombuffer(mm, dtype=np.uint8)
            try:
                return Checksum().update(arr).hexdigest()
            finally:
                del arr          # the map cannot close while a view of it lives


def checksum_tensors_async(*tensors):
    """Starts checksumming the tensors' bytes in a helper thread (the kernel releases the
    GIL, so it runs beside the caller's own pass over the same bytes, on another core when
    there is one); returns a function that waits and gives the list of checksums (or
    raises what the thread raised). The tensors must not be modified meanwhile."""
    import threading
    out: list = [None] * len(tensors)
    err: list = []

    def work():
        try:
            for i, t in enumerate(tensors):
                out[i] = checksum_tensor(t)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            err.append(exc)

    th = threading.Thread(target=work, name="gatesim-checksum", daemon=True)
    th.start()

    def result() -> list:
        th.join()
        if err:
            raise err[0]
        return list(out)
    return result
