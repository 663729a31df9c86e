"""CKKS codec: encrypt model updates at the hospital, add them at the aggregator.

A hospital encrypts ``n_samples * weights`` (pre-scaling by its sample count means the
aggregator only ever adds ciphertexts: no multiplication, no relinearization, no rescaling);
the aggregator adds ciphertexts holding only the public context; a holder of the secret key
decrypts the sum and divides by the total sample count (FedAvg).

Stream format (an update and an aggregate look the same)::

    MAGIC (8 bytes) | u32 header length | msgpack header | chunk*
    chunk := u32 blob length | blob

The header names the format version, profile, key fingerprint, parameter count, chunk count
and how many updates the stream sums. Profiles (``seed``, ``compact``) are separate classes
behind one interface; the profile and its parameters are part of the key fingerprint, so a
ciphertext of another profile or key is rejected before anything is added.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack
import numpy as np

DEFAULT_PROFILE = "compact"
UPDATE_MAGIC = b"CXRMQct\x01"
KEY_MAGIC = b"CXRMQky\x01"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 16
MAX_CHUNK_BYTES = 1 << 26
MAX_PARAMS = 1 << 33
MAX_UPDATES = 1 << 20
_U32 = struct.Struct(">I")


class CodecError(Exception):
    """A context or ciphertext stream is unusable."""


class CodecMismatch(CodecError):
    """A stream was made under another profile, key or model shape."""


class SecretKeyPresent(CodecError):
    """A context that must be public-only holds the secret key."""


@dataclass(frozen=True)
class KeyPair:
    secret: bytes  # serialized context WITH the secret key (hospitals)
    public: bytes  # serialized context WITHOUT the secret key (aggregator)


@dataclass(frozen=True)
class UpdateHeader:
    profile: str
    fingerprint: str
    n_params: int
    n_chunks: int
    n_updates: int = 1  # how many updates this stream sums (1 for a single update)


# --------------------------------------------------------------------------- stream framing


def _read_exact(src: BinaryIO, n: int, what: str) -> bytes:
    parts = []
    remaining = n
    while remaining:
        part = src.read(remaining)
        if not part:
            raise CodecError(f"truncated stream: {what} needs {n} bytes, got {n - remaining}")
        parts.append(part)
        remaining -= len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _write_frame(out: BinaryIO, blob: bytes) -> int:
    out.write(_U32.pack(len(blob)))
    out.write(blob)
    return _U32.size + len(blob)


def _read_frame(src: BinaryIO, what: str, limit: int = MAX_CHUNK_BYTES) -> bytes:
    (length,) = _U32.unpack(_read_exact(src, _U32.size, f"{what} length"))
    if length > limit:
        raise CodecError(f"{what} claims {length} bytes, more than the limit {limit}")
    return _read_exact(src, length, what)


def _write_header(out: BinaryIO, header: UpdateHeader) -> int:
    body = msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "profile": header.profile,
            "fingerprint": header.fingerprint,
            "n_params": header.n_params,
            "n_chunks": header.n_chunks,
            "n_updates": header.n_updates,
        }
    )
    out.write(UPDATE_MAGIC)
    return len(UPDATE_MAGIC) + _write_frame(out, body)


def _parse_header(src: BinaryIO) -> UpdateHeader:
    magic = _read_exact(src, len(UPDATE_MAGIC), "magic")
    if magic != UPDATE_MAGIC:
        raise CodecError(f"not a cxr-mq ciphertext stream (magic {magic!r})")
    body = _read_frame(src, "header", MAX_HEADER_BYTES)
    try:
        fields = msgpack.unpackb(body)
        if fields["v"] != FORMAT_VERSION:
            raise CodecError(f"stream format version {fields['v']}, this codec reads {FORMAT_VERSION}")
        header = UpdateHeader(
            profile=str(fields["profile"]),
            fingerprint=str(fields["fingerprint"]),
            n_params=int(fields["n_params"]),
            n_chunks=int(fields["n_chunks"]),
            n_updates=int(fields["n_updates"]),
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack, KeyError, TypeError: all mean a bad header
        raise CodecError(f"unreadable stream header: {exc}") from exc
    if not (1 <= header.n_params <= MAX_PARAMS and header.n_chunks >= 1 and 1 <= header.n_updates <= MAX_UPDATES):
        raise CodecError(f"stream header out of range: {header}")
    return header


def _expect_eof(src: BinaryIO) -> None:
    if src.read(1):
        raise CodecError("trailing bytes after the last chunk")


def _fingerprint(profile: str, params: dict, public_key: bytes) -> str:
    h = hashlib.sha256()
    h.update(b"cxr-mq/ckks-fingerprint/v1\0")
    h.update(profile.encode() + b"\0")
    h.update(json.dumps(params, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    h.update(public_key)
    return h.hexdigest()


class _Scratch:
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


def _seal_save(obj) -> bytes:
    return _Scratch().save(obj)


def _as_weights(weights: np.ndarray, dtype=np.float64) -> np.ndarray:
    """A checked 1-D array of finite weights; ``dtype=None`` keeps float32 (no copy)."""
    arr = np.asarray(weights)
    if arr.ndim != 1 or arr.size == 0:
        raise CodecError(f"weights must be a non-empty 1-D array, got shape {arr.shape}")
    if dtype is None and arr.dtype in (np.float32, np.float64):
        dtype = arr.dtype
    arr = arr.astype(dtype or np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise CodecError("weights contain NaN or infinity")
    return arr


def _check_samples(n: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise CodecError(f"{what} must be a positive integer, got {n!r}")


# --------------------------------------------------------------------------- interface


class CkksCodec:
    """One CKKS profile with one key; see the module docstring for the stream format."""

    profile: str
    fingerprint: str
    has_secret_key: bool

    def require_public_only(self) -> None:
        if self.has_secret_key:
            raise SecretKeyPresent(
                f"the {self.profile} context {self.fingerprint[:16]} holds the secret key; "
                "the aggregator must be given the public context"
            )

    def public_bytes(self) -> bytes:
        raise NotImplementedError

    def encrypt_update(self, weights: np.ndarray, n_samples: int, out: BinaryIO) -> int:
        raise NotImplementedError

    def new_sum(self, n_params: int) -> "EncryptedSum":
        raise NotImplementedError

    def n_chunks(self, n_params: int) -> int:
        raise NotImplementedError

    def read_header(self, src: BinaryIO) -> UpdateHeader:
        """Read and check a stream header; leaves ``src`` at the first chunk."""
        header = _parse_header(src)
        self._check_header(header)
        return header

    def decrypt_aggregate(self, src: BinaryIO, total_samples: int) -> np.ndarray:
        _check_samples(total_samples, "total_samples")
        self._require_secret()
        header = self.read_header(src)
        total = self._decrypt_chunks(src, header)
        _expect_eof(src)
        return total / float(total_samples)

    def decrypt_update(self, src: BinaryIO, n_samples: int) -> np.ndarray:
        return self.decrypt_aggregate(src, n_samples)

    # helpers shared by the profiles

    def _check_header(self, header: UpdateHeader, n_params: int | None = None) -> None:
        if header.profile != self.profile:
            raise CodecMismatch(f"profile mismatch: stream is {header.profile!r}, this context is {self.profile!r}")
        if header.fingerprint != self.fingerprint:
            raise CodecMismatch(
                f"key fingerprint mismatch: stream {header.fingerprint[:16]}, context {self.fingerprint[:16]}"
            )
        if n_params is not None and header.n_params != n_params:
            raise CodecMismatch(f"n_params mismatch: stream has {header.n_params}, expected {n_params}")
        expected_chunks = self.n_chunks(header.n_params)
        if header.n_chunks != expected_chunks:
            raise CodecError(
                f"stream claims {header.n_chunks} chunks for {header.n_params} parameters, expected {expected_chunks}"
            )

    def _require_secret(self, action: str = "decrypt") -> None:
        if not self.has_secret_key:
            raise CodecError(f"the {self.profile} context {self.fingerprint[:16]} has no secret key: cannot {action}")

    def close(self) -> None:
        """Release worker processes, if the profile started any."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _decrypt_chunks(self, src: BinaryIO, header: UpdateHeader) -> np.ndarray:
        raise NotImplementedError

    def __repr__(self) -> str:
        kind = "secret" if self.has_secret_key else "public"
        return f"<{type(self).__name__} {self.profile} {self.fingerprint[:16]} {kind}>"


class EncryptedSum:
    """A running sum of encrypted updates of one model shape, streamed in chunk by chunk.

    ``add`` stages the new sum chunk by chunk beside the old one and commits only once the
    whole update has been read and checked, so a truncated or corrupt update leaves the sum
    as it was. Memory is two sums, whatever the number of updates.
    """

    def __init__(self, codec: CkksCodec, n_params: int):
        if n_params < 1:
            raise CodecError(f"n_params must be positive, got {n_params}")
        self.codec = codec
        self.n_params = int(n_params)
        self.n_chunks = codec.n_chunks(self.n_params)
        self.count = 0

    def add(self, src: BinaryIO) -> None:
        header = _parse_header(src)
        self.codec._check_header(header, self.n_params)
        staged = self._stage(src, header)
        _expect_eof(src)
        self._commit(staged, header)
        self.count += header.n_updates

    def write(self, out: BinaryIO) -> int:
        if self.count == 0:
            raise CodecError("cannot write an empty sum")
        header = UpdateHeader(self.codec.profile, self.codec.fingerprint, self.n_params, self.n_chunks, self.count)
        written = _write_header(out, header)
        for blob in self._chunk_blobs():
            written += _write_frame(out, blob)
        return written

    def _stage(self, src: BinaryIO, header: UpdateHeader):
        raise NotImplementedError

    def _commit(self, staged, header: UpdateHeader) -> None:
        raise NotImplementedError

    def _chunk_blobs(self):
        raise NotImplementedError


# --------------------------------------------------------------------------- seed profile


class SeedCodec(CkksCodec):
    """The seed's parameters through TenSEAL's CKKSVector: the compatibility baseline.

    N=8192, coefficient moduli [60, 40, 40, 60], scale 2^40, 4096 real slots per ciphertext,
    public-key encryption. A fresh ciphertext lives at the top level (140 data bits), so
    |n_samples * w| * 2^40 has ~2^99 of headroom: no pre-scaling is needed (sample counts of
    1e5 and weights of 10 use 2^60).
    """

    profile = "seed"
    POLY_MODULUS_DEGREE = 8192
    COEFF_MOD_BIT_SIZES = (60, 40, 40, 60)
    SCALE_BITS = 40
    SLOTS = 4096

    @classmethod
    def params(cls) -> dict:
        return {
            "poly_modulus_degree": cls.POLY_MODULUS_DEGREE,
            "coeff_mod_bit_sizes": list(cls.COEFF_MOD_BIT_SIZES),
            "scale_bits": cls.SCALE_BITS,
            "slots": cls.SLOTS,
        }

    def __init__(self, context):
        import tenseal as ts

        self._ts = ts
        self._ctx = context
        self._ctx.global_scale = 2.0**self.SCALE_BITS
        _check_security(self.POLY_MODULUS_DEGREE, self.COEFF_MOD_BIT_SIZES)
        self.has_secret_key = bool(context.is_private())
        self.fingerprint = _fingerprint(self.profile, self.params(), _seal_save(context.public_key().data))

    @classmethod
    def generate(cls) -> "SeedCodec":
        import tenseal as ts

        _check_security(cls.POLY_MODULUS_DEGREE, cls.COEFF_MOD_BIT_SIZES)
        ctx = ts.context(
            ts.SCHEME_TYPE.CKKS,
            poly_modulus_degree=cls.POLY_MODULUS_DEGREE,
            coeff_mod_bit_sizes=list(cls.COEFF_MOD_BIT_SIZES),
        )
        return cls(ctx)

    @classmethod
    def from_payload(cls, payload: dict) -> "SeedCodec":
        import tenseal as ts

        if payload.get("params") != cls.params():
            raise CodecMismatch(f"seed parameters differ: file {payload.get('params')}, codec {cls.params()}")
        try:
            ctx = ts.context_from(payload["context"])
        except Exception as exc:
            raise CodecError(f"unreadable TenSEAL context: {exc}") from exc
        return cls(ctx)

    def _payload(self, secret: bool) -> dict:
        if secret:
            self._require_secret()
            ctx = self._ctx
        else:
            ctx = self._ctx.copy()
            if ctx.is_private():
                ctx.make_context_public()
        data = ctx.serialize(save_public_key=True, save_secret_key=secret, save_galois_keys=False, save_relin_keys=False)
        return {"profile": self.profile, "params": self.params(), "context": data}

    def secret_bytes(self) -> bytes:
        return _pack_key(self._payload(secret=True))

    def public_bytes(self) -> bytes:
        return _pack_key(self._payload(secret=False))

    def n_chunks(self, n_params: int) -> int:
        return -(-int(n_params) // self.SLOTS)

    def encrypt_update(self, weights: np.ndarray, n_samples: int, out: BinaryIO) -> int:
        _check_samples(n_samples, "n_samples")
        scaled = _as_weights(weights) * float(n_samples)
        header = UpdateHeader(self.profile, self.fingerprint, scaled.size, self.n_chunks(scaled.size))
        written = _write_header(out, header)
        for start in range(0, scaled.size, self.SLOTS):
            vec = self._ts.ckks_vector(self._ctx, scaled[start : start + self.SLOTS].tolist())
            written += _write_frame(out, vec.serialize())
        return written

    def new_sum(self, n_params: int) -> "SeedSum":
        return SeedSum(self, n_params)

    def _load_chunk(self, blob: bytes, index: int, n_params: int):
        try:
            vec = self._ts.ckks_vector_from(self._ctx, blob)
        except Exception as exc:
            raise CodecError(f"chunk {index}: unreadable ciphertext: {exc}") from exc
        expected = min(self.SLOTS, n_params - index * self.SLOTS)
        if vec.size() != expected:
            raise CodecError(f"chunk {index}: {vec.size()} values, expected {expected}")
        return vec

    def _decrypt_chunks(self, src: BinaryIO, header: UpdateHeader) -> np.ndarray:
        total = np.empty(header.n_params, dtype=np.float64)
        for i in range(header.n_chunks):
            vec = self._load_chunk(_read_frame(src, f"chunk {i}"), i, header.n_params)
            start = i * self.SLOTS
            total[start : start + vec.size()] = vec.decrypt()
        return total


class SeedSum(EncryptedSum):
    codec: SeedCodec

    def __init__(self, codec: SeedCodec, n_params: int):
        super().__init__(codec, n_params)
        self._chunks: list = [None] * self.n_chunks

    def _stage(self, src: BinaryIO, header: UpdateHeader) -> list:
        staged = []
        for i in range(self.n_chunks):
            vec = self.codec._load_chunk(_read_frame(src, f"chunk {i}"), i, self.n_params)
            try:
                staged.append(vec if self._chunks[i] is None else self._chunks[i] + vec)
            except Exception as exc:  # scale or parameter mismatch inside SEAL
                raise CodecError(f"chunk {i}: cannot add: {exc}") from exc
        return staged

    def _commit(self, staged: list, header: UpdateHeader) -> None:
        self._chunks = staged

    def _chunk_blobs(self):
        for vec in self._chunks:
            yield vec.serialize()


# --------------------------------------------------------------------------- compact profile


def _available_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _pack_words(values: np.ndarray, width: int) -> bytes:
    """Little-endian ``width``-byte records of uint64 ``values`` whose top bytes are zero.

    Even and odd records are OR-ed in as overlapping unaligned words: records of one parity
    never overlap each other, and the bytes a word spills into its neighbour are zero.
    """
    flat = np.ascontiguousarray(values, dtype=np.uint64).reshape(-1)
    if flat.size % 2:
        flat = np.append(flat, np.uint64(0))
    out = np.zeros(flat.size * width + 8, dtype=np.uint8)
    half = flat.size // 2
    for parity in (0, 1):
        words = _strided_words(out, parity * width, (half,), (2 * width,))
        np.bitwise_or(words, flat[parity::2], out=words)
    return out[: values.size * width].tobytes()


def _unpack_words(data, width: int) -> np.ndarray:
    """The uint64 values of consecutive little-endian ``width``-byte records (the inverse of
    :func:`_pack_words`)."""
    buf = bytes(data) + bytes(8 - width)  # the last record is read as a whole word
    count = (len(buf) - (8 - width)) // width
    return _strided_words(buf, 0, (count,), (width,)) & np.uint64((1 << (8 * width)) - 1)


def _strided_words(buf, offset: int, shape: tuple, strides: tuple) -> np.ndarray:
    return np.ndarray(shape, dtype="<u8", buffer=buf, offset=offset, strides=strides)


class CompactCodec(CkksCodec):
    """Seeded symmetric CKKS over one 56-bit prime, coefficient-packed: ~7 bytes per parameter.

    - One prime, no special prime: the aggregator only adds, so there is no key switching,
      no relinearization and no rescaling; SEAL allows this and it checks 128-bit security.
    - N parameters per ciphertext, as polynomial *coefficients* (round(value * 2^28) mod q;
      the decoder fills the slots with the canonical embedding). Decryption noise then stays
      per coefficient, bounded by the centered binomial sampler (|e| <= 21) instead of
      growing with sqrt(N) in the slots.
    - Seeded symmetric RLWE encryption, computed by SEAL: a chunk's uniform polynomial
      ``u`` is expanded from a fresh 32-byte seed (AES-256-CTR, rejection-sampled modulo q,
      ``_expand_seed``); the hospital loads ``(m + e, u)`` as a coefficient-form ciphertext,
      SEAL transforms it to NTT form and its Decryptor, holding the real secret key,
      computes ``c0 = NTT(m + e) + NTT(u) * s``. The ciphertext is ``(c0, -NTT(u))``: it
      decrypts to ``m + e``, with ``-NTT(u)`` uniform as RLWE requires. ``e`` is SEAL's
      noise distribution (centered binomial, 21 + 21 bits, sigma 3.2) drawn from a
      CSPRNG; the secret key never leaves SEAL. A chunk on the wire is the seed (with a
      one-byte PRNG tag) and ``c0`` (NTT form) packed to 7 bytes per coefficient.
    - The aggregator adds the ``c0`` halves modulo q in numpy and keeps the seeds (33 bytes
      per chunk per update). Whoever decrypts expands the seeds, sums them modulo q
      (NTT is linear: one NTT for the sum, not one per update) and decrypts through SEAL.
      The aggregate is the same format with one seed per summed update in every chunk.
    - Hospitals encrypt and decrypt large models on a process pool (``workers``, default
      every core); a codec may be shared by threads, an EncryptedSum may not.

    Precision (coefficient encoding, scale 2^28): each update contributes at most 22 / 2^28
    of absolute error per parameter (noise 21, encoding rounding 1), so after dividing by a
    total of at least one sample per update the FedAvg error is below 8.2e-8. Headroom: |sum of n_i * w_i| per parameter must
    stay below 2^27 (about 1.3e8; e.g. 10 hospitals x 100,000 samples x |w| = 10 uses 1e7).
    A single update above 2^24 per parameter is refused.
    """

    profile = "compact"
    POLY_MODULUS_DEGREE = 8192
    PRIME_BITS = 56
    SCALE_BITS = 28
    PACKED_BYTES = PRIME_BITS // 8
    PRNG_TAG = 0xA5  # AES-256-CTR, 7-byte little-endian words, rejection modulo q
    SEED_BYTES = 1 + 32  # the tag and the AES-256 key
    NOISE_BITS = 21  # centered binomial: popcount of 21 bits minus popcount of 21 (SEAL's)
    NOISE_BOUND = NOISE_BITS
    VALUE_LIMIT = 2.0 ** (PRIME_BITS - 1 - SCALE_BITS - 3)  # per update; the sum may reach 8x
    READ_BATCH = 16  # chunks per read and per vectorized add on the aggregator
    ENCRYPT_BATCH = 8  # chunks computed in SEAL before they are serialized (see encrypt_chunks)
    TASK_CHUNKS = 32  # chunks per task of the hospital's process pool
    TASKS_PER_WORKER = 8  # per update, at least (a finer split idles less at the end)
    parallel_min_params = 1 << 21  # below this a process pool costs more than it saves

    def __init__(self, public_key: bytes, secret_key: bytes | None = None, *, claimed_params: dict | None = None):
        import tenseal.sealapi as seal

        self._seal = seal
        self._context, self.q = self._make_context()
        if claimed_params is not None and claimed_params != self.params():
            raise CodecMismatch(f"compact parameters differ: context {claimed_params}, this codec {self.params()}")
        self.scale = 2.0**self.SCALE_BITS
        self.fingerprint = _fingerprint(self.profile, self.params(), public_key)
        self.has_secret_key = secret_key is not None
        self.workers = _available_cores()
        self._public_key = public_key
        self._secret_key = secret_key
        self._executor = None
        self._local = threading.local()  # SEAL's path-based I/O needs a scratch file per thread
        if secret_key is not None:
            self._init_secret(secret_key)

    def params(self) -> dict:
        return {
            "poly_modulus_degree": self.POLY_MODULUS_DEGREE,
            "coeff_modulus": [self.q],
            "scale_bits": self.SCALE_BITS,
            "encoding": "coefficients",
            "encryption": "symmetric-seeded",
            "seed_expansion": "aes-256-ctr",
            "noise": f"cbd-{self.NOISE_BITS}",
            "packed_bytes": self.PACKED_BYTES,
        }

    # keys

    @classmethod
    def _make_context(cls):
        """The SEAL context of this profile, its security checked; and its prime."""
        import tenseal.sealapi as seal

        n = cls.POLY_MODULUS_DEGREE
        _check_security(n, [cls.PRIME_BITS])
        parms = seal.EncryptionParameters(seal.SCHEME_TYPE.CKKS)
        parms.set_poly_modulus_degree(n)
        parms.set_coeff_modulus(seal.CoeffModulus.Create(n, [cls.PRIME_BITS]))
        context = seal.SEALContext(parms, True, seal.SEC_LEVEL_TYPE.TC128)
        if not context.parameters_set():
            raise CodecError(f"SEAL refuses the compact parameters: {context.parameters_error_message()}")
        return context, int(parms.coeff_modulus()[0].value())

    @classmethod
    def generate(cls) -> "CompactCodec":
        import tenseal.sealapi as seal

        context, _ = cls._make_context()
        keygen = seal.KeyGenerator(context)
        public = seal.PublicKey()
        keygen.create_public_key(public)
        scratch = _Scratch()
        return cls(scratch.save(public), scratch.save(keygen.secret_key()))

    @classmethod
    def from_payload(cls, payload: dict) -> "CompactCodec":
        try:
            public_key = bytes(payload["public_key"])
            secret_key = payload.get("secret_key")
            claimed = payload["params"]
        except (KeyError, TypeError) as exc:
            raise CodecError(f"incomplete compact context: {exc}") from exc
        return cls(public_key, None if secret_key is None else bytes(secret_key), claimed_params=claimed)

    def _payload(self, secret: bool) -> dict:
        payload = {"profile": self.profile, "params": self.params(), "public_key": self._public_key}
        if secret:
            self._require_secret()
            payload["secret_key"] = self._secret_key
        return payload

    def secret_bytes(self) -> bytes:
        return _pack_key(self._payload(secret=True))

    def public_bytes(self) -> bytes:
        return _pack_key(self._payload(secret=False))

    @property
    def _scratch(self) -> _Scratch:
        local = self._local
        if not hasattr(local, "scratch"):
            local.scratch = _Scratch()
        return local.scratch

    @property
    def _zstd(self):
        local = self._local
        if not hasattr(local, "zstd"):
            import zstandard

            local.zstd = zstandard.ZstdDecompressor()
        return local.zstd

    @property
    def _plain_loader(self) -> "_PlainLoader":
        local = self._local
        if not hasattr(local, "plain_loader"):
            local.plain_loader = _PlainLoader(self._plain_template, self._plain_at, self.POLY_MODULUS_DEGREE, self.q)
        return local.plain_loader

    def _init_secret(self, secret_key: bytes) -> None:
        seal, n = self._seal, self.POLY_MODULUS_DEGREE
        try:
            self._sk = seal.SecretKey()
            self._scratch.load(self._sk, self._context, secret_key)
            pk = seal.PublicKey()
            self._scratch.load(pk, self._context, self._public_key)
        except RuntimeError as exc:
            raise CodecError(f"unreadable compact key: {exc}") from exc
        self._encoder = seal.CKKSEncoder(self._context)
        self._decryptor = seal.Decryptor(self._context, self._sk)
        self._evaluator = seal.Evaluator(self._context)
        # SEAL's slot i holds m(zeta^p), p = 3^i mod 2N, zeta = exp(i pi / N). A half-size FFT of
        # the folded, twisted coefficients gives m at every zeta^(4j+1); the slots with
        # p = 3 mod 4 are the conjugates of m at zeta^(2N-p), which is 1 mod 4.
        half = n // 2
        powers = np.empty(half, dtype=np.int64)
        pos = 1
        for i in range(half):
            powers[i] = pos
            pos = pos * 3 % (2 * n)
        self._conj_slots = powers % 4 == 3
        self._fold_index = np.where(self._conj_slots, (2 * n - powers - 1) // 4, (powers - 1) // 4)
        self._twist = np.exp(1j * np.pi * np.arange(half) / n)
        self._init_paths()
        # the public key must belong to the secret key: encrypt 0 with one, decrypt with the other
        probe = seal.Ciphertext()
        seal.Encryptor(self._context, pk).encrypt(self._encode(np.zeros(n)), probe)
        plain = seal.Plaintext()
        self._decryptor.decrypt(probe, plain)
        if np.max(np.abs(self._encoder.decode_double(plain))) > 1e-2:
            raise CodecError("the compact context's public key does not match its secret key")

    def _init_paths(self) -> None:
        """Learn SEAL's serializations this codec reads and writes, build the templates it
        loads, and check the whole path once: encrypt a probe, decrypt it, compare.

        - An NTT-form plaintext (SEAL 4.x ``Plaintext::save_members``): parms_id, coefficient
          count, scale, then a DynArray (header, count, coefficients). Decryption writes one
          (the hospital reads ``c0`` out of it); the decryptor loads one (``c0`` of a sum).
        - A coefficient-form ciphertext of two polynomials (``Ciphertext::save_members``:
          parms_id, NTT flag, size, N, number of primes, scale, correction factor, DynArray),
          loaded through a memfd of which only the polynomials are rewritten (``_PlainLoader``).
        Anything unexpected fails loudly here, naming the TenSEAL version as the likely cause.
        """
        n = self.POLY_MODULUS_DEGREE
        saved = self._scratch.save(self._encode(np.zeros(n)))
        version = _SEAL_HEADER.unpack_from(saved)[2:4]
        raw = self._decompress_seal(saved, 1 << 20)
        dyn_at = 32 + 8 + 8
        try:
            coeff_count, scale = struct.unpack_from("<Qd", raw, 32)
            dyn = _SEAL_HEADER.unpack_from(raw, dyn_at)
            (count,) = struct.unpack_from("<Q", raw, dyn_at + _SEAL_HEADER.size)
            ok = (
                (coeff_count, scale, count) == (n, self.scale, n)
                and dyn[0] == _SEAL_MAGIC and dyn[4] == 0 and dyn[6] == _SEAL_HEADER.size + 8 + 8 * n
                and len(raw) == dyn_at + _SEAL_HEADER.size + 8 + 8 * n
            )
        except struct.error:
            ok = False
        if not ok:
            raise CodecError("unexpected SEAL plaintext layout: is this the TenSEAL version cxr-mq expects?")
        self._seal_version = version
        self._plain_prefix = raw[: -8 * n]
        parms_id = raw[:32]
        fields = struct.pack("<BQQQdQ", 0, 2, n, 1, self.scale, 1)
        dyn = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *version, 0, 0, _SEAL_HEADER.size + 8 + 16 * n)
        body = parms_id + fields + dyn + struct.pack("<Q", 2 * n) + bytes(16 * n)
        self._plain_template = _seal_blob(version, body)
        self._plain_at = len(self._plain_template) - 16 * n
        self._zero_row = np.zeros(n, dtype=np.uint64)
        # the check: integer coefficients (exact under encoding) through encryption, a sum of
        # two updates and decryption, within the noise bound
        rng = np.random.default_rng(0x5EA1)
        probe = rng.integers(-(1 << 40), 1 << 40, (2, n)).astype(np.float64)
        rows = [self.encrypt_chunks(row, 1.0 / self.scale)[0] for row in probe]
        k = 2
        seeds = b"".join(sorted(r[: self.SEED_BYTES] for r in rows))
        words = [_unpack_words(r[self.SEED_BYTES :], self.PACKED_BYTES) for r in rows]
        total = (words[0] + words[1]) % np.uint64(self.q)
        got = self._decrypt_chunk(total, seeds, k) * self.scale
        if np.max(np.abs(got - probe.sum(axis=0))) > k * (self.NOISE_BOUND + 1):
            raise CodecError("the compact encryption path does not decrypt: is this the TenSEAL version cxr-mq expects?")

    @property
    def _word_mask(self) -> np.uint64:
        return np.uint64((1 << (8 * self.PACKED_BYTES)) - 1)

    def _plain_words(self, plain) -> np.ndarray:
        """The coefficients (uint64) of an NTT-form plaintext, through SEAL's serialization."""
        n = self.POLY_MODULUS_DEGREE
        raw = self._decompress_seal(self._scratch.save(plain), len(self._plain_prefix) + 8 * n)
        if len(raw) != len(self._plain_prefix) + 8 * n or raw[: -8 * n] != self._plain_prefix:
            raise CodecError("SEAL wrote an unexpected plaintext layout")
        return np.frombuffer(raw, dtype="<u8", count=n, offset=len(self._plain_prefix))

    def _load_plain(self, words: np.ndarray):
        """An NTT-form plaintext whose coefficients are ``words`` (uint64, < q)."""
        plain = self._seal.Plaintext()
        blob = _seal_blob(self._seal_version, self._plain_prefix + np.ascontiguousarray(words, dtype="<u8").tobytes())
        try:
            self._scratch.load(plain, self._context, blob)
        except (RuntimeError, ValueError) as exc:
            raise CodecError(f"SEAL refused a plaintext: {exc}") from exc
        return plain

    def _decompress_seal(self, saved: bytes, limit: int) -> bytes:
        if len(saved) < _SEAL_HEADER.size or _SEAL_HEADER.unpack_from(saved)[4] != _SEAL_ZSTD:
            raise CodecError("SEAL wrote an unexpected serialization header")
        return self._zstd.decompress(memoryview(saved)[_SEAL_HEADER.size :], max_output_size=limit)

    # encoding

    def _encode(self, coeffs: np.ndarray):
        """A plaintext whose polynomial coefficients are round(coeffs * scale)."""
        half = self.POLY_MODULUS_DEGREE // 2
        folded = (coeffs[:half] + 1j * coeffs[half:]) * self._twist
        slots = np.fft.ifft(folded, norm="forward")[self._fold_index]
        np.conjugate(slots, out=slots, where=self._conj_slots)
        plain = self._seal.Plaintext()
        self._encoder.encode(slots.tolist(), self.scale, plain)
        return plain

    def _decode(self, plain) -> np.ndarray:
        half = self.POLY_MODULUS_DEGREE // 2
        slots = np.asarray(self._encoder.decode_complex(plain))
        np.conjugate(slots, out=slots, where=self._conj_slots)
        folded = np.empty(half, dtype=np.complex128)
        folded[self._fold_index] = slots
        folded = np.fft.fft(folded, norm="forward") * np.conj(self._twist)
        return np.concatenate([folded.real, folded.imag])

    # hospital side

    def n_chunks(self, n_params: int) -> int:
        return -(-int(n_params) // self.POLY_MODULUS_DEGREE)

    def frame_bytes(self, n_updates: int = 1) -> int:
        """Bytes of one chunk frame of a stream summing ``n_updates`` updates."""
        return _U32.size + self.SEED_BYTES * n_updates + self.PACKED_BYTES * self.POLY_MODULUS_DEGREE

    def encrypt_update(self, weights: np.ndarray, n_samples: int, out: BinaryIO) -> int:
        _check_samples(n_samples, "n_samples")
        self._require_secret("encrypt (compact encryption is symmetric: it needs the secret key)")
        values = _as_weights(weights, dtype=None)  # float32 stays float32: no 2x copy to check it
        peak = float(np.max(np.abs(values))) * n_samples
        if peak > self.VALUE_LIMIT:
            raise CodecError(
                f"n_samples * |weight| reaches {peak:.3g}; the compact profile takes at most "
                f"{self.VALUE_LIMIT:.3g} per update (sum headroom {8 * self.VALUE_LIMIT:.3g})"
            )
        header = UpdateHeader(self.profile, self.fingerprint, values.size, self.n_chunks(values.size))
        written = _write_header(out, header)
        for blob in self._encrypted_chunks(values, n_samples):
            written += _write_frame(out, blob)
        return written

    def _encrypted_chunks(self, weights: np.ndarray, n_samples: int):
        if not self._use_pool(weights.size):
            yield from self.encrypt_chunks(weights, n_samples)
            return
        # The weights and the chunk blobs cross between processes through two files in
        # memory (tmpfs), not through the pool's pipes: pickling ~1 MB each way per task and
        # copying it through a pipe cost the workers ~10-15% of their time.
        n, chunks = self.POLY_MODULUS_DEGREE, self.n_chunks(weights.size)
        per_task = -(-chunks // (self.TASKS_PER_WORKER * self.workers))
        step = 2 * max(1, min(self.TASK_CHUNKS, per_task) // 2)  # whole pairs (see _PlainLoader.residues)
        blob_len = self.SEED_BYTES + self.PACKED_BYTES * n
        values = np.ascontiguousarray(weights)
        shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
        with tempfile.NamedTemporaryFile(dir=shm, prefix="cxr-mq-weights-") as src, \
                tempfile.NamedTemporaryFile(dir=shm, prefix="cxr-mq-chunks-") as dst:
            src.write(memoryview(values).cast("B"))
            src.flush()
            dst.truncate(chunks * blob_len)
            tasks = (
                (src.name, values.dtype.str, values.size, first, min(step, chunks - first), n_samples, dst.name)
                for first in range(0, chunks, step)
            )
            for first, count in self._ordered_map(_pool_encrypt, tasks):
                data = os.pread(dst.fileno(), count * blob_len, first * blob_len)
                if len(data) != count * blob_len:
                    raise CodecError(f"chunks {first}..{first + count - 1}: a worker wrote {len(data)} bytes")
                view = memoryview(data)
                for i in range(count):
                    yield view[i * blob_len : (i + 1) * blob_len]

    def encrypt_chunks(self, weights: np.ndarray, n_samples: float) -> list[bytes]:
        """Encrypt ``n_samples * weights`` as chunk blobs, in this process.

        In batches of ``ENCRYPT_BATCH`` chunks: first every chunk's ``c0`` is computed in
        SEAL, then all are serialized. Alternating SEAL's NTT with its zstd serialization
        chunk by chunk evicts each other's tables from the cache (~8% slower measured)."""
        step, batch = 2 * self.POLY_MODULUS_DEGREE, self.ENCRYPT_BATCH * self.POLY_MODULUS_DEGREE
        factor = float(n_samples) * self.scale  # w * factor == (w * n) * 2^28, exactly
        loader = self._plain_loader
        noise = _aes_ctr(os.urandom(32))  # one secret keystream for this call's noise
        blobs = []
        for first in range(0, weights.size, batch):
            pending = []
            for start in range(first, min(first + batch, weights.size), step):
                for row in loader.residues(weights[start : start + step], factor, noise=noise, noise_bits=self.NOISE_BITS):
                    pending.append(self._encrypt_row(row))
            tag = bytes((self.PRNG_TAG,))
            for seed, plain in pending:
                blobs.append(tag + seed + _pack_words(self._plain_words(plain), self.PACKED_BYTES))
        return blobs

    def _encrypt_row(self, row: np.ndarray):
        """(seed, NTT-form plaintext holding c0) of one chunk encrypting the residues
        ``row`` = m + e mod q."""
        seed = os.urandom(self.SEED_BYTES - 1)
        u = _expand_seed(seed, self.POLY_MODULUS_DEGREE, self.q, self.PACKED_BYTES)
        ct = self._plain_loader.load(self._context, row, u)  # (m + e, u), coefficient form
        self._evaluator.transform_to_ntt_inplace(ct)  # (NTT(m + e), NTT(u))
        plain = self._seal.Plaintext()
        self._decryptor.decrypt(ct, plain)  # NTT(m + e) + NTT(u) * s: c0 of (c0, -NTT(u))
        return seed, plain

    # aggregator side

    def new_sum(self, n_params: int) -> "CompactSum":
        return CompactSum(self, n_params)

    def _read_chunks(self, src: BinaryIO, header: UpdateHeader):
        """Yield (first chunk index, c0 (b, N) uint64, seeds (b, 33 k) uint8) in batches.

        Everything in a batch is checked (frame lengths, PRNG tags, c0 < q) before it is
        yielded, so a caller adds only well-formed chunks.
        """
        k, n, width = header.n_updates, self.POLY_MODULUS_DEGREE, self.PACKED_BYTES
        frame = self.frame_bytes(k)
        if frame > MAX_CHUNK_BYTES:
            raise CodecError(f"a stream of {k} summed updates is beyond this codec's limit")
        seeds_at = _U32.size
        c0_at = seeds_at + self.SEED_BYTES * k
        for first in range(0, header.n_chunks, self.READ_BATCH):
            b = min(self.READ_BATCH, header.n_chunks - first)
            buf = bytearray(b * frame + 8)  # 8 spare bytes: the last word is read unaligned
            _read_into(src, memoryview(buf)[: b * frame], f"chunks {first}..{first + b - 1}")
            lengths = np.ndarray((b,), dtype=">u4", buffer=buf, offset=0, strides=(frame,))
            if np.any(lengths != frame - _U32.size):
                bad = int(np.argmax(lengths != frame - _U32.size))
                raise CodecError(
                    f"chunk {first + bad}: frame of {int(lengths[bad])} bytes, expected {frame - _U32.size}"
                )
            seeds = np.ndarray((b, self.SEED_BYTES * k), dtype=np.uint8, buffer=buf, offset=seeds_at, strides=(frame, 1))
            if not np.all(seeds[:, :: self.SEED_BYTES] == self.PRNG_TAG):
                raise CodecError(f"chunks {first}..{first + b - 1}: unknown PRNG tag in a seed")
            c0 = _strided_words(buf, c0_at, (b, n), (frame, width)) & self._word_mask
            if c0.max() >= self.q:
                raise CodecError(f"chunks {first}..{first + b - 1}: coefficient not reduced modulo q")
            yield first, c0, seeds.copy()

    # decryption

    def _decrypt_chunks(self, src: BinaryIO, header: UpdateHeader) -> np.ndarray:
        n = self.POLY_MODULUS_DEGREE
        total = np.empty(header.n_chunks * n, dtype=np.float64)
        batches = self._read_chunks(src, header)
        if self._use_pool(header.n_params * header.n_updates):
            results = self._ordered_map(_pool_decrypt, ((c0, seeds, header.n_updates) for _, c0, seeds in batches))
        else:
            results = (self.decrypt_chunks(c0, seeds, header.n_updates) for _, c0, seeds in batches)
        offset = 0
        for values in results:
            total[offset : offset + values.size] = values.reshape(-1)
            offset += values.size
        return total[: header.n_params]

    def decrypt_chunks(self, c0: np.ndarray, seeds: np.ndarray, k: int) -> np.ndarray:
        """Decrypt a batch of chunks (c0 rows and their k seeds each) in this process."""
        out = np.empty(c0.shape, dtype=np.float64)
        for row in range(c0.shape[0]):
            out[row] = self._decrypt_chunk(c0[row], seeds[row].tobytes(), k)
        return out

    def _decrypt_chunk(self, c0: np.ndarray, seeds: bytes, k: int) -> np.ndarray:
        """Values of one chunk of a sum of k updates: (sum c0, -NTT(sum u)) through SEAL."""
        q, width = np.uint64(self.q), self.SEED_BYTES
        total = np.zeros(self.POLY_MODULUS_DEGREE, dtype=np.uint64)
        for j in range(k):  # the sum's c1 is minus the NTT of the sum of the expanded seeds
            record = seeds[j * width : (j + 1) * width]
            if record[0] != self.PRNG_TAG:
                raise CodecError("unknown PRNG tag in a seed")
            total += _expand_seed(record[1:], self.POLY_MODULUS_DEGREE, self.q, self.PACKED_BYTES)
            total = np.minimum(total, total - q)  # both < q < 2^63: wraps above where smaller
        minus = q - total
        minus[total == 0] = 0
        ct = self._plain_loader.load(self._context, self._zero_row, minus)
        self._evaluator.transform_to_ntt_inplace(ct)  # (0, -NTT(sum u))
        self._evaluator.add_plain_inplace(ct, self._load_plain(c0))
        plain = self._seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return self._decode(plain)

    # process pool (hospital side: encryption and decryption)

    def _use_pool(self, work_params: int) -> bool:
        return self.has_secret_key and self.workers > 1 and work_params >= self.parallel_min_params

    def _ordered_map(self, fn, tasks):
        """fn(task) over a process pool, results in task order, a bounded number in flight."""
        executor = self._pool()
        window = 2 * self.workers
        pending = []
        for task in tasks:
            pending.append(executor.submit(fn, task))
            if len(pending) >= window:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()

    def _pool(self):
        if self._executor is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawn, not fork: the parent may hold TensorFlow threads and SEAL memory pools
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_pool_init,
                initargs=(self.secret_bytes(),),
            )
            weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        return self._executor

    def warm_up(self) -> None:
        """Start the process pool now rather than on the first large update."""
        if self.has_secret_key and self.workers > 1:
            list(self._ordered_map(_pool_ping, range(self.workers)))

    def pool_pids(self) -> list[int]:
        """Process ids of the pool's workers (for CPU accounting in the bench)."""
        return list(getattr(self._executor, "_processes", None) or {})

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __getstate__(self):
        raise TypeError("a CompactCodec is not picklable; send secret_bytes() or public_bytes()")


class CompactSum(EncryptedSum):
    """The running sum of c0 halves modulo q, plus the seeds of every summed update."""

    codec: CompactCodec

    def __init__(self, codec: CompactCodec, n_params: int):
        super().__init__(codec, n_params)
        n = codec.POLY_MODULUS_DEGREE
        self._sum = np.zeros((self.n_chunks, n), dtype=np.uint64)
        self._staged: np.ndarray | None = None
        self._seeds: list[np.ndarray] = []  # one (n_chunks, 65 k) array per added stream

    def _stage(self, src: BinaryIO, header: UpdateHeader) -> np.ndarray:
        if self._staged is None:
            self._staged = np.empty_like(self._sum)
            self._work = np.empty((self.codec.READ_BATCH, self._sum.shape[1]), dtype=np.uint64)
        q = np.uint64(self.codec.q)
        seeds = np.empty((self.n_chunks, self.codec.SEED_BYTES * header.n_updates), dtype=np.uint8)
        for first, c0, chunk_seeds in self.codec._read_chunks(src, header):
            rows = slice(first, first + c0.shape[0])
            work = self._work[: c0.shape[0]]
            np.add(c0, self._sum[rows], out=c0)  # both < q < 2^63: no overflow
            np.subtract(c0, q, out=work)  # wraps to above c0 where c0 < q
            np.minimum(c0, work, out=self._staged[rows])
            seeds[rows] = chunk_seeds
        return seeds

    def _commit(self, seeds: np.ndarray, header: UpdateHeader) -> None:
        self._sum, self._staged = self._staged, self._sum
        self._seeds.append(seeds)

    def _chunk_blobs(self):
        width = self.codec.SEED_BYTES
        for i in range(self.n_chunks):
            row = b"".join(seeds[i].tobytes() for seeds in self._seeds)
            records = sorted(row[j : j + width] for j in range(0, len(row), width))
            yield b"".join(records) + _pack_words(self._sum[i], self.codec.PACKED_BYTES)


_SEAL_MAGIC = 0xA15E
_SEAL_HEADER = struct.Struct("<HBBBBHQ")  # magic, header size, version major/minor, compression, reserved, size
_SEAL_ZSTD = 2  # seal::compr_mode_type::zstd


def _seal_blob(version: tuple, body: bytes) -> bytes:
    """An uncompressed SEAL serialization of ``body`` (SEAL ``version`` = (major, minor))."""
    return _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *version, 0, 0, _SEAL_HEADER.size + len(body)) + body


def _aes_ctr(key: bytes):
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()


_ZEROS = bytes(1 << 17)


def _expand_seed(key: bytes, n: int, q: int, width: int) -> np.ndarray:
    """The n uniform coefficients modulo q that a chunk's seed stands for.

    The AES-256-CTR keystream of ``key`` (counter block starting at zero) read as
    consecutive little-endian ``width``-byte words; words >= q are skipped (for the compact
    prime, probability (2^56 - q) / 2^56 ~ 4e-12 each), the first n kept. Deterministic:
    the hospital that encrypts and whoever decrypts expand the same polynomial.
    """
    stream, out, got = _aes_ctr(key), np.empty(n, dtype=np.uint64), 0
    mask = np.uint64((1 << (8 * width)) - 1)
    while got < n:
        want = n - got + 16
        buf = bytearray(width * want + 16)  # update_into needs 15 spare bytes; the last word reads 1
        stream.update_into(_ZEROS[: width * want], buf)
        words = _strided_words(buf, 0, (want,), (width,)) & mask
        kept = words[words < np.uint64(q)][: n - got]
        out[got : got + kept.size] = kept
        got += kept.size
    return out


def _cbd_noise(stream, count: int, bits: int) -> np.ndarray:
    """``count`` samples of popcount(a) - popcount(b), a and b uniform ``bits``-bit integers
    (SEAL's centered binomial noise for bits = 21: variance 10.5, |e| <= 21), from the
    secret keystream ``stream`` (AES-256-CTR under a fresh random key: ``_aes_ctr``)."""
    raw = stream.update(_ZEROS[: 8 * count])
    words = np.frombuffer(raw, dtype="<u8")
    mask = np.uint64((1 << bits) - 1)
    noise = np.bitwise_count(words & mask).astype(np.int64)
    noise -= np.bitwise_count((words >> np.uint64(bits)) & mask)
    return noise


class _PlainLoader:
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
        self._scratch = _Scratch()
        self._pid = -1
        self._ct = seal.Ciphertext()
        self._float = np.empty(2 * n, dtype=np.float64)
        self._ints = np.empty(2 * n, dtype=np.int64)
        self._tmp = np.empty(2 * n, dtype=np.int64)

    def residues(self, values: np.ndarray, factor: float, noise=None, noise_bits: int = 0) -> np.ndarray:
        """round(values * factor) (+ centered binomial noise of ``noise_bits`` + ``noise_bits``
        bits drawn from the keystream ``noise``) modulo q, zero-padded to whole chunks: a
        (1 or 2, n) uint64 view of this loader's buffer, valid until the next call.
        |values * factor| < 2^52."""
        n, size = self._n, values.size
        k = -(-size // n)
        if not 1 <= k <= 2:
            raise CodecError(f"{size} values are not one or two chunks")
        scaled, ints, tmp = self._float[: k * n], self._ints[: k * n], self._tmp[: k * n]
        scaled[size:] = 0.0
        np.multiply(values, factor, out=scaled[:size], dtype=np.float64)
        np.rint(scaled, out=scaled)
        np.copyto(ints, scaled, casting="unsafe")
        if noise is not None:
            ints += _cbd_noise(noise, k * n, noise_bits)
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
            _pwrite_all(scratch._fd, self._template, 0)
            self._pid = os.getpid()
        for row, offset in ((first, 0), (second, 8 * self._n)):
            if row.dtype != np.uint64 or row.shape != (self._n,):
                raise CodecError(f"a chunk of shape {row.shape} ({row.dtype}) does not fit the plaintext template")
            _pwrite_all(scratch._fd, memoryview(np.ascontiguousarray(row)).cast("B"), self._poly_at + offset)
        try:
            self._ct.load(context, scratch.path)
        except (RuntimeError, ValueError) as exc:
            raise CodecError(f"SEAL refused a plaintext: {exc}") from exc
        return self._ct


def _pwrite_all(fd: int, data, offset: int) -> None:
    view, done = memoryview(data), 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _read_into(src: BinaryIO, view: memoryview, what: str) -> None:
    readinto = getattr(src, "readinto", None)
    offset = 0
    while offset < len(view):
        if readinto is not None:
            got = readinto(view[offset:])
        else:
            part = src.read(len(view) - offset)
            got = len(part) if part else 0
            view[offset : offset + got] = part or b""
        if not got:
            raise CodecError(f"truncated stream: {what} needs {len(view)} bytes, got {offset}")
        offset += got


# Process-pool workers: each process loads the secret context once. A module global is the
# only way to hand state to a pool initializer's tasks; it lives in pool processes only.
_POOL_CODEC: CompactCodec | None = None


def _pool_init(secret: bytes) -> None:
    global _POOL_CODEC
    codec = load_context(secret)
    codec.workers = 1
    _POOL_CODEC = codec


def _pool_encrypt(task) -> tuple[int, int]:
    """Encrypt chunks ``first`` .. ``first + count - 1`` of the weights in file ``src`` into
    their fixed-size slots of file ``dst`` (see ``CompactCodec._encrypted_chunks``)."""
    src, dtype, size, first, count, n_samples, dst = task
    n = _POOL_CODEC.POLY_MODULUS_DEGREE
    weights = np.memmap(src, dtype=np.dtype(dtype), mode="r", shape=(size,))
    try:
        blobs = _POOL_CODEC.encrypt_chunks(weights[first * n : (first + count) * n], n_samples)
    finally:
        del weights
    blob_len = len(blobs[0])
    fd = os.open(dst, os.O_WRONLY)
    try:
        _pwrite_all(fd, b"".join(blobs), first * blob_len)
    finally:
        os.close(fd)
    return first, count


def _pool_decrypt(task) -> np.ndarray:
    c0, seeds, k = task
    return _POOL_CODEC.decrypt_chunks(c0, seeds, k)


def _pool_ping(_: int) -> int:
    return os.getpid()


# --------------------------------------------------------------------------- keys and loading


PROFILES: dict[str, type[CkksCodec]] = {"seed": SeedCodec, "compact": CompactCodec}


def _check_security(poly_modulus_degree: int, coeff_bits) -> None:
    """128-bit security per the HomomorphicEncryption.org bounds that SEAL enforces."""
    import tenseal.sealapi as seal

    limit = seal.CoeffModulus.MaxBitCount(poly_modulus_degree, seal.SEC_LEVEL_TYPE.TC128)
    total = sum(coeff_bits)
    if total > limit:
        raise CodecError(
            f"insecure parameters: {total} coefficient-modulus bits for N={poly_modulus_degree}, "
            f"128-bit security allows at most {limit}"
        )


def _pack_key(payload: dict) -> bytes:
    return KEY_MAGIC + msgpack.packb(payload, use_bin_type=True)


def generate_keys(profile: str = DEFAULT_PROFILE) -> KeyPair:
    codec_cls = _profile_class(profile)
    codec = codec_cls.generate()
    return KeyPair(secret=codec.secret_bytes(), public=codec.public_bytes())


def _profile_class(profile: str) -> type[CkksCodec]:
    try:
        return PROFILES[profile]
    except KeyError:
        raise CodecError(f"unknown codec profile {profile!r}; known: {', '.join(sorted(PROFILES))}") from None


def load_context(data: bytes) -> CkksCodec:
    """Load a context written by :func:`generate_keys`; the profile is read from the bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"context must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(KEY_MAGIC):
        raise CodecError("not a cxr-mq CKKS context (bad magic)")
    try:
        payload = msgpack.unpackb(data[len(KEY_MAGIC) :], raw=False)
        profile = payload["profile"]
    except Exception as exc:
        raise CodecError(f"unreadable CKKS context: {exc}") from exc
    return _profile_class(profile).from_payload(payload)


def load_context_file(path) -> CkksCodec:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CodecError(f"cannot read CKKS context {path}: {exc}") from exc
    try:
        return load_context(data)
    except CodecError as exc:
        raise type(exc)(f"{path}: {exc}") from exc


__all__ = [
    "CodecError",
    "CodecMismatch",
    "SecretKeyPresent",
    "KeyPair",
    "UpdateHeader",
    "CkksCodec",
    "EncryptedSum",
    "generate_keys",
    "load_context",
    "load_context_file",
    "DEFAULT_PROFILE",
    "PROFILES",
]
