"""The compact profile's process pool: workers that each load the secret context once and
encrypt or decrypt batches of chunks (hospital side only).

Hygiene: the plaintext weights and the chunks cross to the workers through memfds
(anonymous memory files, gone with their last descriptor however the process ends: crash,
SIGKILL, the hospital's fast exit on SIGTERM), never through named files in /dev/shm that
would outlive a crash. Each worker holds the secret key, so it watches its parent and exits
the moment the parent does, whatever way it ended (a worker would otherwise wait for work
for ever: it holds the write end of its own task pipe, so it never sees end-of-file).
"""

from __future__ import annotations

import contextlib
import os
import select
import tempfile
import threading

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


@contextlib.contextmanager
def shared_file(name: str):
    """``(file, path)``: a read-write file in memory that pool workers open by ``path``.

    A memfd, reached through ``/proc/<this pid>/fd/<n>``; only without memfds (not Linux) a
    named file in /dev/shm, which a crash would leave behind."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        with open(fd, "w+b") as fh:
            yield fh, f"/proc/{os.getpid()}/fd/{fd}"
        return
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.NamedTemporaryFile(dir=shm, prefix=f"{name}-") as fh:
        yield fh, fh.name


def exit_with_parent(parent_pid: int) -> None:
    """End this process as soon as ``parent_pid`` ends (a pidfd becomes readable when its
    process exits; without pidfds, poll the parent id)."""
    if os.getppid() != parent_pid:
        os._exit(0)  # the parent is gone already
    try:
        pidfd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        pidfd = -1

    def watch() -> None:
        if pidfd >= 0:
            select.select([pidfd], [], [])
        else:
            while os.getppid() == parent_pid:
                threading.Event().wait(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def pool_init(secret: bytes, parent_pid: int | None = None) -> None:
    global _POOL_CODEC
    if parent_pid is not None:
        exit_with_parent(parent_pid)
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
