"""Glue to SEAL through TenSEAL's bindings: path-based save/load through memory-backed
scratch files, SEAL's serialization headers, the template loader the compact encryption
path writes polynomials through, and the 128-bit security check of parameters."""

from __future__ import annotations

import os
import struct
import tempfile
import weakref

import numpy as np

from .errors import CodecError
from .sampling import cbd_noise


class Scratch:
    """A memory-backed file for SEAL's bindings, which only save and load through paths.

    A memfd where the kernel has one (freed with the process), else a file in /dev/shm.
    One per process: a codec used after a fork opens its own.
    """

    def __init__(self) -> None:
        self._pid = -1
        self._fd = -1
        self.path = ""

    def _open(self) -> None:
        if self._pid == os.getpid():
            return
        try:
            self._fd = os.memfd_create("cxr-mq-seal", os.MFD_CLOEXEC)
            self.path = f"/proc/self/fd/{self._fd}"
            weakref.finalize(self, _close_quietly, self._fd, None)
            if not os.path.exists(self.path):
                raise OSError("no /proc")
        except (AttributeError, OSError):
            shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            self._fd, self.path = tempfile.mkstemp(prefix="cxr-mq-seal-", dir=shm)
            weakref.finalize(self, _close_quietly, self._fd, self.path)
        self._pid = os.getpid()

    def save(self, obj) -> bytes:
        self._open()
        obj.save(self.path)
        size = os.fstat(self._fd).st_size
        parts, offset = [], 0
        while offset < size:
            part = os.pread(self._fd, size - offset, offset)
            if not part:
                break
            parts.append(part)
            offset += len(part)
        return b"".join(parts)

    def load(self, obj, context, data: bytes) -> None:
        self._open()
        os.ftruncate(self._fd, 0)
        view, offset = memoryview(data), 0
        while offset < len(data):
            offset += os.pwrite(self._fd, view[offset:], offset)
        obj.load(context, self.path)


def _close_quietly(fd: int, path: str | None) -> None:
    try:
        os.close(fd)
        if path:
            os.unlink(path)
    except OSError:
        pass


def seal_save(obj) -> bytes:
    return Scratch().save(obj)


class PlainLoader:
    """Per-thread state of the encryption path (see ``CompactCodec._init_paths``): a memfd
    holding an uncompressed coefficient-form ciphertext of which only the two polynomials are
    rewritten per load, the Ciphertext it loads into, and reused buffers for rounding two
    chunks (fresh 128 KB arrays per chunk cost page faults). A loader used after a fork
    writes its template again."""

    def __init__(self, template: bytes, poly_at: int, n: int, q: int) -> None:
        import tenseal.sealapi as seal

        self._template, self._poly_at, self._n, self._q = template, poly_at, n, np.int64(q)
        if len(template) != poly_at + 16 * n:
            raise CodecError("the plaintext template does not hold two polynomials")
        self._scratch = Scratch()
        self._pid = -1
        self._ct = seal.Ciphertext()
        self._float = np.empty(2 * n, dtype=np.float64)
        self._ints = np.empty(2 * n, dtype=np.int64)
        self._tmp = np.empty(2 * n, dtype=np.int64)

    def residues(self, values: np.ndarray, factor: float, noise=None, noise_bits: int = 0,
                 grid: int = 1) -> np.ndarray:
        """round(values * factor / grid) * grid (+ centered binomial noise of ``noise_bits`` +
        ``noise_bits`` bits drawn from the keystream ``noise``) modulo q, zero-padded to whole
        chunks: a (1 or 2, n) uint64 view of this loader's buffer, valid until the next call.
        |values * factor| < 2^52; ``grid`` a power of two (scaling by it is exact)."""
        n, size = self._n, values.size
        k = -(-size // n)
        if not 1 <= k <= 2:
            raise CodecError(f"{size} values are not one or two chunks")
        scaled, ints, tmp = self._float[: k * n], self._ints[: k * n], self._tmp[: k * n]
        scaled[size:] = 0.0
        np.multiply(values, factor / grid, out=scaled[:size], dtype=np.float64)
        np.rint(scaled, out=scaled)
        if grid != 1:
            np.multiply(scaled, grid, out=scaled)
        np.copyto(ints, scaled, casting="unsafe")
        if noise is not None:
            ints += cbd_noise(noise, k * n, noise_bits)
        np.right_shift(ints, 63, out=tmp)  # -1 where negative, else 0
        np.bitwise_and(tmp, self._q, out=tmp)
        np.add(ints, tmp, out=ints)
        return ints.view(np.uint64).reshape(k, n)

    def load(self, context, first: np.ndarray, second: np.ndarray):
        """The template ciphertext with its polynomials set to ``first`` and ``second``."""
        scratch = self._scratch
        if self._pid != os.getpid():
            scratch._open()
            os.ftruncate(scratch._fd, 0)
            pwrite_all(scratch._fd, self._template, 0)
            self._pid = os.getpid()
        for row, offset in ((first, 0), (second, 8 * self._n)):
            if row.dtype != np.uint64 or row.shape != (self._n,):
                raise CodecError(f"a chunk of shape {row.shape} ({row.dtype}) does not fit the plaintext template")
            pwrite_all(scratch._fd, memoryview(np.ascontiguousarray(row)).cast("B"), self._poly_at + offset)
        try:
            self._ct.load(context, scratch.path)
        except (RuntimeError, ValueError) as exc:
            raise CodecError(f"SEAL refused a plaintext: {exc}") from exc
        return self._ct


def pwrite_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


SEAL_MAGIC = 0xA15E
SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major/minor, compression, reserved, size
SEAL_ZSTD = 2  # seal::compr_mode_type::zstd


def seal_blob(version: tuple, body: bytes) -> bytes:
    """An uncompressed SEAL serialization of ``body`` (SEAL ``version`` = (major, minor))."""
    return SEAL_HEADER.pack(SEAL_MAGIC, SEAL_HEADER.size, *version, 0, 0, SEAL_HEADER.size + len(body)) + body


def check_security(poly_modulus_degree: int, coeff_bits) -> None:
    """128-bit security per the HomomorphicEncryption.org bounds that SEAL enforces."""
    import tenseal.sealapi as seal

    limit = seal.CoeffModulus.MaxBitCount(poly_modulus_degree, seal.SEC_LEVEL_TYPE.TC128)
    total = sum(coeff_bits)
    if total > limit:
        raise CodecError(
            f"insecure parameters: {total} coefficient-modulus bits for N={poly_modulus_degree}, "
            f"128-bit security allows at most {limit}"
        )
