"""The interface every CKKS profile implements: a codec (one profile, one key) and a
running encrypted sum, plus what they share: the checks (weights, sample counts, headers)
and the limits no profile may cross.

Limits, in the units of a parameter's value ``n_samples * w`` ("value units"):

- A round declares the most contributors ``K`` its aggregate may sum. An update is
  encrypted only if ``n_samples * |w| <= update_limit(K)``, so that ``K`` such updates, their
  noise and the decoder's rounding stay below the modulus: a sum cannot wrap. A larger
  update is refused (``UpdateOutOfRange``) before anything is encrypted.
- An uploaded update holds exactly one update; a sum refuses a stream of any other count,
  and more than ``max_updates`` in all, before it allocates anything for the stream.
- Decrypted values carry no noise. An update is quantized to a grid (``grid(K)``, a power
  of two at least twice the largest noise of ``K`` updates plus the decoder's error) before
  it is encrypted; the decryptor of a sum of ``k <= K`` updates rounds to ``grid(k)``, which
  divides ``grid(K)``, and so gets back exactly the sum of the quantized updates: the same
  values for every encryption of the same updates, nothing of the RLWE noise (which would
  give away the secret key, see docs/security.md). Each update loses at most
  ``precision(K) = grid(K) / 2`` to the quantization.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import BinaryIO

import numpy as np

from .errors import CodecError, CodecMismatch, SecretKeyPresent, UpdateOutOfRange
from .wire import MAX_CONTRIBUTORS, UpdateHeader, expect_eof, parse_header, write_frame, write_header

# The most contributors an update encrypted without a round's bound may be summed with
# (benchmarks, tests, tools); a round always states its own.
DEFAULT_MAX_CONTRIBUTORS = 3


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


def check_contributors(k, what: str = "max_contributors") -> int:
    """A count of summed updates within what any round may take."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_CONTRIBUTORS:
        raise CodecError(f"{what} must be a whole number from 1 to {MAX_CONTRIBUTORS}, got {k!r}")
    return int(k)


def power_of_two_at_least(x: float) -> float:
    return 2.0 ** math.ceil(math.log2(x))


class CkksCodec:
    """One CKKS profile with one key; see the module docstring for the stream format."""

    profile: str
    fingerprint: str
    has_secret_key: bool

    # Set by each profile, in value units (see the module docstring):
    noise_bound: float  # the largest error one encryption adds to a decrypted value
    decode_slack: float  # the largest error of decoding a sum (floating point)
    sum_limit: float  # the largest |sum| that decodes without wrapping modulo q
    value_cap: float  # the largest n_samples * |w| of one update, whatever the round

    # limits

    def grid(self, n_updates: int) -> float:
        """The step decrypted values of a sum of ``n_updates`` are rounded to: a power of two
        more than twice their largest noise, so rounding removes all of it."""
        k = check_contributors(n_updates, "n_updates")
        return power_of_two_at_least(2 * (self.noise_of_sum(k) + self.decode_slack))

    def noise_of_sum(self, n_updates: int) -> float:
        """The largest noise of a sum of ``n_updates`` encryptions (value units)."""
        return n_updates * self.noise_bound

    def precision(self, max_contributors: int) -> float:
        """The largest error quantization adds to one update (value units) in a round of at
        most ``max_contributors``; a FedAvg value is off by at most k * this / total samples."""
        return self.grid(max_contributors) / 2

    def update_limit(self, max_contributors: int) -> float:
        """The largest ``n_samples * |w|`` one update may carry so that ``max_contributors``
        such updates, quantized and with their noise, sum below ``sum_limit``."""
        k = check_contributors(max_contributors)
        room = (self.sum_limit - self.decode_slack) / k - self.precision(k) - self.noise_bound
        return max(0.0, min(self.value_cap, room))

    def check_update_range(self, peak: float, max_contributors: int) -> None:
        """Refuse an update whose largest ``n_samples * |w|`` is ``peak`` before encrypting it."""
        limit = self.update_limit(max_contributors)
        if not peak <= limit:
            raise UpdateOutOfRange(
                f"n_samples * |weight| reaches {peak:.6g}; the {self.profile} profile takes at most "
                f"{limit:.6g} per update in a round of at most {max_contributors} contributors "
                f"(a larger update could make their sum wrap modulo q)"
            )

    def round_to_grid(self, values: np.ndarray, n_updates: int) -> np.ndarray:
        """Decrypted values rounded to ``grid(n_updates)``, in place: no noise leaves the codec."""
        step = self.grid(n_updates)
        np.multiply(values, 1.0 / step, out=values)
        np.rint(values, out=values)
        np.multiply(values, step, out=values)
        return values

    def require_public_only(self) -> None:
        if self.has_secret_key:
            raise SecretKeyPresent(
                f"the {self.profile} context {self.fingerprint[:16]} holds the secret key; "
                "the aggregator must be given the public context"
            )

    def public_bytes(self) -> bytes:
        raise NotImplementedError

    def encrypt_update(self, weights: np.ndarray, n_samples: int, out: BinaryIO, *,
                       max_contributors: int | None = None) -> int:
        """Encrypt ``n_samples * weights`` as one update of a round of at most
        ``max_contributors`` (default ``DEFAULT_MAX_CONTRIBUTORS``); ``UpdateOutOfRange``
        if it is too large for that many."""
        raise NotImplementedError

    def new_sum(self, n_params: int, *, max_updates: int | None = None,
                distinct_updates: bool = True) -> "EncryptedSum":
        """A running sum of at most ``max_updates`` updates (default: any number up to the
        codec's limit). ``distinct_updates=False`` lets the same upload be added again (the
        bench's memory figure); a round's sum never does."""
        raise NotImplementedError

    def n_chunks(self, n_params: int) -> int:
        raise NotImplementedError

    def read_header(self, src: BinaryIO) -> UpdateHeader:
        """Read and check a stream header; leaves ``src`` at the first chunk."""
        header = parse_header(src)
        self._check_header(header)
        return header

    def decrypt_aggregate(self, src: BinaryIO, total_samples: int, *, n_updates: int | None = None,
                          min_updates: int = 1) -> np.ndarray:
        """The FedAvg values of an aggregate, rounded to its grid (no noise).

        ``n_updates``: the count the aggregate must hold (e.g. ``model_ready``'s contributors);
        ``min_updates``: the fewest it may hold. Both, and the aggregate's own consistency
        (a profile's seed records: one per update per chunk, all distinct), are checked
        before anything is decrypted."""
        check_samples(total_samples, "total_samples")
        self._require_secret()
        header = self.read_header(src)
        if n_updates is not None and header.n_updates != n_updates:
            raise CodecError(f"the aggregate sums {header.n_updates} updates, expected {n_updates}")
        if header.n_updates < min_updates:
            raise CodecError(
                f"the aggregate sums {header.n_updates} update(s), fewer than the minimum of {min_updates}: "
                "decrypting it would reveal them"
            )
        check_contributors(header.n_updates, "the aggregate's n_updates")
        total = self._decrypt_chunks(src, header)
        expect_eof(src)
        self.round_to_grid(total, header.n_updates)
        return total / float(total_samples)

    def decrypt_update(self, src: BinaryIO, n_samples: int) -> np.ndarray:
        return self.decrypt_aggregate(src, n_samples, n_updates=1)

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

    def __init__(self, codec: CkksCodec, n_params: int, max_updates: int | None = None,
                 distinct_updates: bool = True):
        if n_params < 1:
            raise CodecError(f"n_params must be positive, got {n_params}")
        self.codec = codec
        self.n_params = int(n_params)
        self.n_chunks = codec.n_chunks(self.n_params)
        self.max_updates = check_contributors(MAX_CONTRIBUTORS if max_updates is None else max_updates,
                                              "max_updates")
        self.distinct_updates = distinct_updates
        self.count = 0

    def add(self, src: BinaryIO, n_updates: int = 1) -> None:
        """Add a stream that must hold exactly ``n_updates`` updates (an upload holds one;
        a partial sum may hold more). Every count is checked before anything is allocated."""
        check_contributors(n_updates, "n_updates")
        header = parse_header(src)
        self.codec._check_header(header, self.n_params)
        if header.n_updates != n_updates:
            raise CodecError(f"the stream holds {header.n_updates} updates, expected exactly {n_updates}")
        if self.count + header.n_updates > self.max_updates:
            raise CodecError(
                f"the sum holds {self.count} of at most {self.max_updates} updates: "
                f"no room for {header.n_updates} more"
            )
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
