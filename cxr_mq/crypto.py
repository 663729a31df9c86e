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
import io
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import msgpack
import numpy as np

DEFAULT_PROFILE = "seed"
UPDATE_MAGIC = b"CXRMQct\x01"
KEY_MAGIC = b"CXRMQky\x01"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 1 << 16
MAX_CHUNK_BYTES = 1 << 26
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
    if header.n_params < 1 or header.n_chunks < 1 or header.n_updates < 1:
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


def _scratch_dir() -> str:
    # SEAL's bindings only save/load through paths; keep those files in memory when possible.
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _seal_save(obj) -> bytes:
    fd, path = tempfile.mkstemp(prefix="cxr-mq-", dir=_scratch_dir())
    os.close(fd)
    try:
        obj.save(path)
        return Path(path).read_bytes()
    finally:
        os.unlink(path)


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

    def _require_secret(self) -> None:
        if not self.has_secret_key:
            raise CodecError(f"the {self.profile} context {self.fingerprint[:16]} has no secret key: cannot decrypt")

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


# --------------------------------------------------------------------------- keys and loading


PROFILES: dict[str, type[CkksCodec]] = {"seed": SeedCodec}


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
