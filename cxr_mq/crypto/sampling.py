"""Randomness of the seeded RLWE encryption: AES-256-CTR keystreams, uniform polynomials
modulo q expanded from a seed, and centered binomial noise."""

from __future__ import annotations

import numpy as np

from .wire import strided_words

def aes_ctr(key: bytes):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


_ZEROS = bytes(1 << 17)


def expand_seed(key: bytes, n: int, q: int, width: int) -> np.ndarray:
    """The n uniform coefficients modulo q that a chunk's seed stands for.

    The AES-256-CTR keystream of ``key`` (counter block starting at zero) read as
    consecutive little-endian ``width``-byte words; words >= q are skipped (for the compact
    prime, probability (2^56 - q) / 2^56 ~ 4e-12 each), the first n kept. Deterministic:
    the hospital that encrypts and whoever decrypts expand the same polynomial.
    """
    stream, out, got = aes_ctr(key), np.empty(n, dtype=np.uint64), 0
    mask = np.uint64((1 << (8 * width)) - 1)
    while got < n:
        want = n - got + 16
        buf = bytearray(width * want + 16)  # update_into needs 15 spare bytes; the last word reads 1
        stream.update_into(_ZEROS[: width * want], buf)
        words = strided_words(buf, 0, (want,), (width,)) & mask
        kept = words[words < np.uint64(q)][: n - got]
        out[got : got + kept.size] = kept
        got += kept.size
    return out


def cbd_noise(stream, count: int, bits: int) -> np.ndarray:
    """``count`` samples of popcount(a) - popcount(b), a and b uniform ``bits``-bit integers
    (SEAL's centered binomial noise for bits = 21: variance 10.5, |e| <= 21), from the
    secret keystream ``stream`` (AES-256-CTR under a fresh random key: ``aes_ctr``)."""
    raw = stream.update(_ZEROS[: 8 * count])
    words = np.frombuffer(raw, dtype="<u8")
    mask = np.uint64((1 << bits) - 1)
    noise = np.bitwise_count(words & mask).astype(np.int64)
    noise -= np.bitwise_count((words >> np.uint64(bits)) & mask)
    return noise
