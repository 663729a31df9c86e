"""The interface every CKKS profile implements: a codec (one profile, one key) and a
running encrypted sum, plus the checks they share (weights, sample counts, headers)."""

from __future__ import annotations

import hashlib
import json
from typing import BinaryIO

import numpy as np

from .errors import CodecError, CodecMismatch, SecretKeyPresent
from .wire import UpdateHeader, expect_eof, parse_header, write_frame, write_header

def fingerprint_of(profile: str, params: dict, public_key: bytes) -> str:
    h = hashlib.sha256()
    h.update(b"cxr-mq/ckks-fingerprint/v1\0")
    h.update(profile.encode() + b"\0")
    h.update(json.dumps(params, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    h.update(public_key)
    return h.hexdigest()


def as_weights(weights: np.ndarray, dtype=np.float64) -> np.ndarray:
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


def check_samples(n: int, what: str) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise CodecError(f"{what} must be a positive integer, got {n!r}")


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
        header = parse_header(src)
        self._check_header(header)
        return header

    def decrypt_aggregate(self, src: BinaryIO, total_samples: int) -> np.ndarray:
        check_samples(total_samples, "total_samples")
        self._require_secret()
        header = self.read_header(src)
        total = self._decrypt_chunks(src, header)
        expect_eof(src)
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
        header = parse_header(src)
        self.codec._check_header(header, self.n_params)
        staged = self._stage(src, header)
        expect_eof(src)
        self._commit(staged, header)
        self.count += header.n_updates

    def write(self, out: BinaryIO) -> int:
        if self.count == 0:
            raise CodecError("cannot write an empty sum")
        header = UpdateHeader(self.codec.profile, self.codec.fingerprint, self.n_params, self.n_chunks, self.count)
        written = write_header(out, header)
        for blob in self._chunk_blobs():
            written += write_frame(out, blob)
        return written

    def _stage(self, src: BinaryIO, header: UpdateHeader):
        raise NotImplementedError

    def _commit(self, staged, header: UpdateHeader) -> None:
        raise NotImplementedError

    def _chunk_blobs(self):
        raise NotImplementedError
