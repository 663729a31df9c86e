"""A codec with the CKKS codec's interface that does not encrypt: the baseline that
``cxr-mq demo --plaintext`` and ``--compare`` and the bench measure encryption against.

It is never used by the production workers' CLI; its profile name ``plaintext`` is refused by
every CKKS context, so a plaintext update can never be mixed into an encrypted round.
"""
from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from .crypto import CodecError, CodecMismatch

MAGIC = b"CXRPLN1\n"
_HEADER = struct.Struct("<32sQ")
BLOCK = 1 << 16  # parameters per streamed block


@dataclass(frozen=True)
class PlainHeader:
    profile: str
    fingerprint: str
    n_params: int


class PlaintextCodec:
    profile = "plaintext"
    has_secret_key = True  # anyone holding it can read the values: it is not a public context

    def __init__(self, label: str = "demo"):
        self.fingerprint = hashlib.sha256(f"plaintext:{label}".encode()).hexdigest()

    def require_public_only(self) -> None:
        """The plaintext codec has nothing to hide: the aggregator may use it in demos."""

    def public_bytes(self) -> bytes:
        return MAGIC + bytes.fromhex(self.fingerprint)

    def encrypt_update(self, weights: np.ndarray, n_samples: int, out: BinaryIO, *,
                       max_contributors: int | None = None) -> int:
        values = np.asarray(weights, dtype=np.float64).ravel() * float(n_samples)
        header = MAGIC + _HEADER.pack(bytes.fromhex(self.fingerprint), values.size)
        out.write(header)
        out.write(values.tobytes())
        return len(header) + values.nbytes

    def read_header(self, src: BinaryIO) -> PlainHeader:
        raw = src.read(len(MAGIC) + _HEADER.size)
        if not raw.startswith(MAGIC) or len(raw) != len(MAGIC) + _HEADER.size:
            raise CodecMismatch("not a plaintext update stream")
        fingerprint, n_params = _HEADER.unpack(raw[len(MAGIC):])
        if fingerprint.hex() != self.fingerprint:
            raise CodecMismatch("plaintext stream of another federation")
        return PlainHeader(self.profile, fingerprint.hex(), n_params)

    def _values(self, src: BinaryIO, n_params: int) -> np.ndarray:
        data = src.read(n_params * 8 + 1)
        if len(data) != n_params * 8:
            raise CodecError(f"plaintext stream holds {len(data)} bytes, expected {n_params * 8}")
        return np.frombuffer(data, dtype=np.float64)

    def new_sum(self, n_params: int, *, max_updates: int | None = None,
                distinct_updates: bool = True) -> "PlainSum":
        return PlainSum(self, n_params)

    def decrypt_aggregate(self, src: BinaryIO, total_samples: int, *, n_updates: int | None = None,
                          min_updates: int = 1) -> np.ndarray:
        """The stream has no update count: the demo's baseline checks nothing of it."""
        header = self.read_header(src)
        return self._values(src, header.n_params) / float(total_samples)

    decrypt_update = decrypt_aggregate


class PlainSum:
    def __init__(self, codec: PlaintextCodec, n_params: int):
        self.codec, self.n_params, self.count = codec, n_params, 0
        self.total = np.zeros(n_params, dtype=np.float64)

    def add(self, src: BinaryIO, n_updates: int = 1) -> None:
        header = self.codec.read_header(src)
        if header.n_params != self.n_params:
            raise CodecMismatch(f"update has {header.n_params} parameters, sum has {self.n_params}")
        self.total += self.codec._values(src, self.n_params)
        self.count += 1

    def write(self, out: BinaryIO) -> int:
        header = MAGIC + _HEADER.pack(bytes.fromhex(self.codec.fingerprint), self.n_params)
        out.write(header)
        out.write(self.total.tobytes())
        return len(header) + self.total.nbytes
