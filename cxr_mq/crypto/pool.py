"""The compact profile's process pool: workers that each load the secret context once and
encrypt or decrypt batches of chunks (hospital side only)."""

from __future__ import annotations

import os

import numpy as np

from .sealio import pwrite_all


def available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# Process-pool workers: each process loads the secret context once. A module global is the
# only way to hand state to a pool initializer's tasks; it lives in pool processes only.
_POOL_CODEC = None  # a CompactCodec, in pool processes only


def pool_init(secret: bytes) -> None:
    global _POOL_CODEC
    from .keys import load_context  # here, not at the top: keys imports the profiles, which import this module

    codec = load_context(secret)
    codec.workers = 1
    _POOL_CODEC = codec


def pool_encrypt(task) -> tuple[int, int]:
    """Encrypt chunks ``first`` .. ``first + count - 1`` of the weights in file ``src`` into
    their fixed-size slots of file ``dst`` (see ``CompactCodec._encrypted_chunks``)."""
    src, dtype, size, first, count, n_samples, grid, dst = task
    n = _POOL_CODEC.POLY_MODULUS_DEGREE
    weights = np.memmap(src, dtype=np.dtype(dtype), mode="r", shape=(size,))
    try:
        blobs = _POOL_CODEC.encrypt_chunks(weights[first * n : (first + count) * n], n_samples, grid)
    finally:
        del weights
    blob_len = len(blobs[0])
    fd = os.open(dst, os.O_WRONLY)
    try:
        pwrite_all(fd, b"".join(blobs), first * blob_len)
    finally:
        os.close(fd)
    return first, count


def pool_decrypt(task) -> np.ndarray:
    c0, seeds, k = task
    return _POOL_CODEC.decrypt_chunks(c0, seeds, k)


def pool_ping(_: int) -> int:
    return os.getpid()
