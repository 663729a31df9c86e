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


def _as_weights(weights: np.ndarray) -> np.ndarray:
    arr = np.asarray(weights)
    if arr.ndim != 1 or arr.size == 0:
        raise CodecError(f"weights must be a non-empty 1-D array, got shape {arr.shape}")
    arr = arr.astype(np.float64, copy=False)
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


def _strided_words(buf, offset: int, shape: tuple, strides: tuple) -> np.ndarray:
    return np.ndarray(shape, dtype="<u8", buffer=buf, offset=offset, strides=strides)


class CompactCodec(CkksCodec):
    """Seeded symmetric CKKS over one 56-bit prime, coefficient-packed: ~7 bytes per parameter.

    - One prime, no special prime: the aggregator only adds, so there is no key switching,
      no relinearization and no rescaling; SEAL allows this and it checks 128-bit security.
    - N parameters per ciphertext, as polynomial *coefficients* (round(value * 2^28) mod q,
      brought to NTT form through SEAL without its encoder: see ``_init_plain_path``; the
      decoder fills the slots with the canonical embedding). Decryption noise then stays per
      coefficient, bounded by SEAL's centered binomial sampler (|e| <= 21) instead of growing
      with sqrt(N) in the slots.
    - ``encrypt_symmetric`` with SEAL's seeded form: the uniform half ``c1`` of each
      ciphertext travels as its 64-byte PRNG seed. A chunk on the wire is the seed(s) plus
      ``c0`` (NTT form) packed to 7 bytes per coefficient.
    - The aggregator adds the ``c0`` halves modulo q in numpy and keeps the seeds (65 bytes
      per chunk per update); whoever decrypts expands the seeds through SEAL. The aggregate
      is the same format with one seed per summed update in every chunk.
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
    SEED_BYTES = 65  # SEAL UniformRandomGeneratorInfo: PRNG type byte + 512-bit seed
    NOISE_BOUND = 21  # SEAL's centered binomial noise sampler
    VALUE_LIMIT = 2.0 ** (PRIME_BITS - 1 - SCALE_BITS - 3)  # per update; the sum may reach 8x
    READ_BATCH = 16  # chunks per read and per vectorized add on the aggregator
    TASK_CHUNKS = 32  # chunks per task of the hospital's process pool
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
        self._encryptor = seal.Encryptor(self._context, self._sk)
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
        self._learn_layout()
        self._init_plain_path()
        # the public key must belong to the secret key: encrypt 0 with one, decrypt with the other
        probe = seal.Ciphertext()
        seal.Encryptor(self._context, pk).encrypt(self._encode(np.zeros(n)), probe)
        plain = seal.Plaintext()
        self._decryptor.decrypt(probe, plain)
        if np.max(np.abs(self._encoder.decode_double(plain))) > 1e-2:
            raise CodecError("the compact context's public key does not match its secret key")

    def _learn_layout(self) -> None:
        """Find c0 and the seed in SEAL's seeded ciphertext serialization, and check it.

        Layout (SEAL 4.x, ``Ciphertext::save_members``): parms_id, NTT flag, size, N, number
        of primes, scale, correction factor; then a nested DynArray (header, count, c0); then
        the PRNG info (header, type, seed). Anything else fails loudly here.
        """
        n = self.POLY_MODULUS_DEGREE
        saved = self._scratch.save(self._encryptor.encrypt_symmetric(self._encode(np.zeros(n))))
        outer = _SEAL_HEADER.unpack(saved[: _SEAL_HEADER.size])
        raw = self._zstd.decompress(saved[_SEAL_HEADER.size :], max_output_size=1 << 24)
        prefix = 32 + 1 + 8 + 8 + 8 + 8 + 8
        c0_at = prefix + _SEAL_HEADER.size + 8
        info_at = c0_at + 8 * n
        try:
            ntt, size, degree, n_primes, scale = struct.unpack_from("<BQQQd", raw, 32)
            dyn = _SEAL_HEADER.unpack_from(raw, prefix)
            (count,) = struct.unpack_from("<Q", raw, prefix + _SEAL_HEADER.size)
            info = _SEAL_HEADER.unpack_from(raw, info_at)
            ok = (
                outer[0] == _SEAL_MAGIC
                and (ntt, size, degree, n_primes, scale) == (1, 2, n, 1, self.scale)
                and dyn[0] == _SEAL_MAGIC and dyn[4] == 0 and dyn[6] == _SEAL_HEADER.size + 8 + 8 * n
                and count == n
                and info[0] == _SEAL_MAGIC and info[6] == _SEAL_HEADER.size + self.SEED_BYTES
                and len(raw) == info_at + _SEAL_HEADER.size + self.SEED_BYTES
            )
        except struct.error:
            ok = False
        if not ok:
            raise CodecError("unexpected SEAL seeded-ciphertext layout: is this the TenSEAL version cxr-mq expects?")
        self._raw_len = len(raw)
        self._raw_prefix = raw[:c0_at]
        self._raw_info_header = raw[info_at : info_at + _SEAL_HEADER.size]
        self._c0_at, self._info_at = c0_at, info_at
        # an uncompressed header SEAL accepts when loading what we assemble
        self._load_header = _SEAL_HEADER.pack(outer[0], outer[1], outer[2], outer[3], 0, 0, _SEAL_HEADER.size + len(raw))
        self._zero_c0 = bytes(8 * n)

    def _init_plain_path(self) -> None:
        """Set up :meth:`_plaintexts`: integer coefficients to NTT-form plaintexts, encoder-free.

        SEAL's CKKS encoder (an FFT of its own, rounding, an NTT) and the canonical embedding
        that feeds it cost ~0.38 ms per chunk. SEAL refuses a CKKS plaintext in coefficient
        form, but it loads a coefficient-form *ciphertext*. So two chunks' integer
        coefficients ``(a, b)`` are loaded as one uncompressed ciphertext from a memfd that
        holds a fixed template (only the coefficients are rewritten), turned to NTT form by
        ``Evaluator.transform_to_ntt_inplace`` (one NTT per chunk), and read back as
        plaintexts by decrypting with two constant "keys": s = 0 gives ``c0 = NTT(a)``; after
        ``sub_plain`` of that, s = 1 (all ones in NTT form) gives ``c1 = NTT(b)``. The
        plaintexts are at scale 2^28 with the context's parms_id, exactly what the encoder
        makes of the same integers (checked here, plaintext for plaintext). The constant keys
        only ever decrypt these loaded plaintexts; encryption uses the real secret key.

        SEAL refuses a ciphertext whose ``c1`` is zero ("transparent"): an all-zero second
        chunk is loaded first instead (``NTT(0)`` is 0), and a lone chunk or a zero pair gets
        the constant polynomial 1 as the ``c1`` that is never read.
        """
        seal, n = self._seal, self.POLY_MODULUS_DEGREE
        version = _SEAL_HEADER.unpack(self._load_header)[2:4]
        # the secret key's serialization (a Plaintext): parms_id, coeff count, scale, DynArray
        raw_sk = self._decompress_seal(self._scratch.save(self._sk), 1 << 20)
        key_prefix = 32 + 8 + 8 + _SEAL_HEADER.size + 8
        coeff_count, key_scale = struct.unpack_from("<Qd", raw_sk, 32)
        if len(raw_sk) != key_prefix + 8 * n or coeff_count != n or key_scale != 1.0:
            raise CodecError("unexpected SEAL secret-key layout: is this the TenSEAL version cxr-mq expects?")
        decryptors = []
        for value in (0, 1):
            key = seal.SecretKey()
            self._scratch.load(key, self._context, _seal_blob(version, raw_sk[:key_prefix] + _words(value, n)))
            decryptors.append(seal.Decryptor(self._context, key))
        self._c0_reader, self._c1_reader = decryptors
        # an uncompressed coefficient-form ciphertext: the seeded layout with NTT flag 0 and
        # both polynomials present
        fields = struct.pack("<BQQQdQ", 0, 2, n, 1, self.scale, 1)
        if self._raw_prefix[32 : 32 + len(fields)] != b"\x01" + fields[1:]:
            raise CodecError("unexpected SEAL ciphertext metadata: is this the TenSEAL version cxr-mq expects?")
        dyn = _SEAL_HEADER.pack(_SEAL_MAGIC, _SEAL_HEADER.size, *version, 0, 0, _SEAL_HEADER.size + 8 + 16 * n)
        body = self._raw_prefix[:32] + fields + dyn + struct.pack("<Q", 2 * n) + bytes(16 * n)
        self._plain_template = _seal_blob(version, body)
        self._plain_at = len(self._plain_template) - 16 * n
        self._filler = np.ones(n, dtype=np.uint64)  # the stand-in c1 when both chunks are zero
        # the check: integer coefficients (exact under both paths) give the encoder's plaintexts,
        # for a pair, a pair whose second chunk is zero, a zero pair, and a lone chunk
        rng = np.random.default_rng(0x5EA1)
        probe = rng.integers(-(1 << 30), 1 << 30, 7 * n).astype(np.float64)
        probe[3 * n :] = 0.0  # chunks 3 to 5 zero
        probe[-1] = 7.0  # chunk 6 alone
        for start in range(0, probe.size, 2 * n):
            values = probe[start : start + 2 * n]
            got = self._plaintexts(self._plain_loader.residues(values, 1.0))
            want = [self._encode(row / self.scale) for row in values.reshape(-1, n)]
            if len(got) != len(want) or any(g != w for g, w in zip(got, want)):
                raise CodecError(
                    "SEAL's NTT-form plaintexts differ from its encoder's: is this the TenSEAL version cxr-mq expects?"
                )

    def _plaintexts(self, rows: np.ndarray) -> list:
        """NTT-form plaintexts whose polynomial coefficients are the 1 or 2 rows (uint64, < q)."""
        seal, evaluator = self._seal, self._evaluator
        first = rows[0]
        second = rows[1] if rows.shape[0] == 2 else None
        # c1 must not be zero; NTT(0) is 0, so a zero row goes first or is never read
        if second is not None and second.any():
            order = (0, 1)
        elif second is not None and first.any():
            first, second, order = second, first, (1, 0)
        else:
            second, order = self._filler, (0,) if rows.shape[0] == 1 else (0, 0)
        ct = self._plain_loader.load(self._context, first, second)
        evaluator.transform_to_ntt_inplace(ct)  # (NTT(first), NTT(second))
        plains = (seal.Plaintext(), seal.Plaintext())
        self._c0_reader.decrypt(ct, plains[0])  # c0 + c1 * 0
        if 1 in order:
            evaluator.sub_plain_inplace(ct, plains[0])  # (0, NTT(second))
            self._c1_reader.decrypt(ct, plains[1])  # 0 + c1 * 1
        return [plains[i] for i in order]

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
        self._require_secret("encrypt (compact encrypts with the secret key: SEAL's seeded form is symmetric)")
        values = _as_weights(weights)
        peak = float(np.max(np.abs(values))) * n_samples
        if peak > self.VALUE_LIMIT:
            raise CodecError(
                f"n_samples * |weight| reaches {peak:.3g}; the compact profile takes at most "
                f"{self.VALUE_LIMIT:.3g} per update (sum headroom {8 * self.VALUE_LIMIT:.3g})"
            )
        header = UpdateHeader(self.profile, self.fingerprint, values.size, self.n_chunks(values.size))
        written = _write_header(out, header)
        for blob in self._encrypted_chunks(np.asarray(weights).reshape(-1), n_samples):
            written += _write_frame(out, blob)
        return written

    def _encrypted_chunks(self, weights: np.ndarray, n_samples: int):
        n = self.POLY_MODULUS_DEGREE
        if self._use_pool(weights.size):
            per_task = -(-self.n_chunks(weights.size) // (4 * self.workers))  # >= 4 tasks per worker
            step = 2 * n * max(1, min(self.TASK_CHUNKS, per_task) // 2)  # whole pairs (see _plaintexts)
            # the workers scale: float32 weights cross the pipe at half the float64 size
            tasks = ((weights[i : i + step], n_samples) for i in range(0, weights.size, step))
            for blobs in self._ordered_map(_pool_encrypt, tasks):
                yield from blobs
        else:
            yield from self.encrypt_chunks(weights, n_samples)

    def encrypt_chunks(self, weights: np.ndarray, n_samples: int) -> list[bytes]:
        """Encrypt ``n_samples * weights`` as chunk blobs, in this process."""
        step = 2 * self.POLY_MODULUS_DEGREE
        factor = float(n_samples) * self.scale  # w * factor == (w * n) * 2^28, exactly
        loader = self._plain_loader
        blobs = []
        for start in range(0, weights.size, step):
            for plain in self._plaintexts(loader.residues(weights[start : start + step], factor)):
                blobs.append(self._encrypt_plain(plain))
        return blobs

    def _encrypt_plain(self, plain) -> bytes:
        """One chunk blob: the seed and c0 of SEAL's seeded encryption of ``plain``."""
        saved = self._scratch.save(self._encryptor.encrypt_symmetric(plain))
        raw = self._decompress_seal(saved, self._raw_len)
        if (
            len(raw) != self._raw_len
            or raw[: self._c0_at] != self._raw_prefix
            or raw[self._info_at : self._info_at + _SEAL_HEADER.size] != self._raw_info_header
        ):
            raise CodecError("SEAL wrote an unexpected ciphertext layout")
        c0 = np.frombuffer(raw, dtype="<u8", count=self.POLY_MODULUS_DEGREE, offset=self._c0_at)
        return raw[-self.SEED_BYTES :] + _pack_words(c0, self.PACKED_BYTES)

    # aggregator side

    def new_sum(self, n_params: int) -> "CompactSum":
        return CompactSum(self, n_params)

    def _read_chunks(self, src: BinaryIO, header: UpdateHeader):
        """Yield (first chunk index, c0 (b, N) uint64, seeds (b, 65 k) uint8) in batches.

        Everything in a batch is checked (frame lengths, PRNG types, c0 < q) before it is
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
            prng_types = seeds[:, :: self.SEED_BYTES]
            if not np.all((prng_types == 1) | (prng_types == 2)):
                raise CodecError(f"chunks {first}..{first + b - 1}: unknown PRNG type in a seed")
            c0 = _strided_words(buf, c0_at, (b, n), (frame, width)) & np.uint64((1 << (8 * width)) - 1)
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
        seal = self._seal
        ct = self._load_ciphertext(c0.astype("<u8").tobytes(), seeds[: self.SEED_BYTES])
        for j in range(1, k):  # the sum's c1 is the sum of the expanded seeds
            seed = seeds[j * self.SEED_BYTES : (j + 1) * self.SEED_BYTES]
            self._evaluator.add_inplace(ct, self._load_ciphertext(self._zero_c0, seed))
        plain = seal.Plaintext()
        self._decryptor.decrypt(ct, plain)
        return self._decode(plain)

    def _load_ciphertext(self, c0: bytes, seed: bytes):
        data = b"".join((self._load_header, self._raw_prefix, c0, self._raw_info_header, seed))
        ct = self._seal.Ciphertext()
        try:
            self._scratch.load(ct, self._context, data)
        except (RuntimeError, ValueError) as exc:
            raise CodecError(f"SEAL refused a ciphertext: {exc}") from exc
        return ct

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


class _PlainLoader:
    """Per-thread state of the encoder-free plaintext path (see ``_init_plain_path``): a memfd
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

    def residues(self, values: np.ndarray, factor: float) -> np.ndarray:
        """round(values * factor) modulo q, zero-padded to whole chunks: a (1 or 2, n) uint64
        view of this loader's buffer, valid until the next call. |values * factor| < 2^52."""
        n, size = self._n, values.size
        k = -(-size // n)
        if not 1 <= k <= 2:
            raise CodecError(f"{size} values are not one or two chunks")
        scaled, ints, tmp = self._float[: k * n], self._ints[: k * n], self._tmp[: k * n]
        scaled[size:] = 0.0
        np.multiply(values, factor, out=scaled[:size], dtype=np.float64)
        np.rint(scaled, out=scaled)
        np.copyto(ints, scaled, casting="unsafe")
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


def _words(value: int, count: int) -> bytes:
    return np.full(count, value, dtype="<u8").tobytes()


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


def _pool_encrypt(task) -> list[bytes]:
    weights, n_samples = task
    return _POOL_CODEC.encrypt_chunks(weights, n_samples)


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
