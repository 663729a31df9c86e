"""The ``threshold`` codec profile: fresh round keys, 4 bytes per parameter, no shared secret.

Each round each hospital k draws a fresh ternary key ``s_k`` and encrypts its update chunk by
chunk in Z_q[X]/(X^N + 1) (N = 4096, q a 32-bit prime)::

    c0_c = m_c + e_c - a_c * s_k   (mod q, coefficient form)

``a_c`` is public: expanded from a XOF of (federation, round, chunk), so only ``c0`` travels,
4 bytes per coefficient, and the last chunk only as far as it is used. ``e_c`` is centered
binomial noise (|e| <= 21) from the CSPRNG. The hospital also attaches one key ciphertext
``Enc_pk(D * s_k)`` under the committee's collective public key (``keylayer``).

The aggregator adds chunk streams modulo q and key ciphertexts modulo Q; it holds nothing
secret. The committee decrypts only the sum of the key ciphertexts (``committee``), giving
``s_S = sum s_k``; its holder decrypts every chunk of the aggregate at once:
``sum c0_c + a_c * s_S = sum m_c + sum e_c``.

Encoding (:class:`RoundEncoding`), fixed per round from what ``round_start`` declares:
- a hospital with n samples encodes ``rho * w`` with ``rho = n / max_samples`` at scale 2^b,
  b the largest with ``K * (W * 2^b + 23) < q / 2`` (K the round's maximum contributors, W the
  weight bound, 23 = noise 21 + rounding): no sum of K updates can wrap, and anything outside
  (|w| > W, n > max_samples, more than K summed) is refused before it is encrypted or added;
- the sample count travels inside the stream, as limbs in extra coefficients with a scale
  that rounds the summed noise away, so the total is exact and never in clear;
- 8 coefficients encrypt zero: after decryption they must be within the noise, which tells a
  wrong or incomplete key sum from a right one.

The products ``a_c * s`` are computed with float64 FFTs (the negacyclic "right-angle"
embedding): a ternary key times a 32-bit polynomial stays below 2^44, and the FFT's error is
far below 0.5, so rounding gives the exact product (decryption splits ``a_c`` into 16-bit
halves to keep the same margin for a key sum).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from functools import cached_property
from typing import BinaryIO

import msgpack
import numpy as np

from . import keylayer
from .base import CkksCodec
from .errors import CodecError, CodecMismatch
from .keylayer import CollectivePublicKey, KeyCiphertext
from .wire import KEY_MAGIC, read_exact
from .ring import expand_uniform_rows, ntt_primes, public_seed, sample_cbd, sample_ternary, secret_stream

PROFILE = "threshold"
STREAM_MAGIC = b"CXRMQth\x01"
FORMAT_VERSION = 1
RING_DEGREE = keylayer.RING_DEGREE
CHUNK_PRIME_BITS = 32
NOISE_BITS = 21
NOISE_MARGIN = NOISE_BITS + 2  # per contributor: noise, encoding rounding, FFT rounding
CHECK_COEFFS = 8
MAX_CONTRIBUTORS = 1024
MAX_PARAMS = 1 << 33
MAX_HEADER_BYTES = 1 << 12
MIN_SCALE_BITS = 16
BATCH_CHUNKS = 16
_U32 = struct.Struct(">I")


class ThresholdCodecError(CodecError):
    """A threshold stream, encoding or key that is unusable (subclassed by CodecError users)."""


def chunk_prime() -> int:
    return ntt_primes(RING_DEGREE, CHUNK_PRIME_BITS, 1)[0]


@dataclass(frozen=True)
class RoundEncoding:
    """What a round declares, and the fixed-point encoding derived from it."""

    federation: str
    round: int
    max_contributors: int
    max_samples: int
    weight_bound: float

    def __post_init__(self):
        if not 1 <= self.max_contributors <= MAX_CONTRIBUTORS:
            raise ThresholdCodecError(f"max_contributors must be 1..{MAX_CONTRIBUTORS}, got {self.max_contributors}")
        if not 1 <= self.max_samples < (1 << 40):
            raise ThresholdCodecError(f"max_samples must be 1..2^40, got {self.max_samples}")
        if not (0 < float(self.weight_bound) < 1e6):
            raise ThresholdCodecError(f"weight_bound must be positive, got {self.weight_bound}")
        if self.scale_bits < MIN_SCALE_BITS:
            raise ThresholdCodecError(
                f"{self.max_contributors} contributors x |w| <= {self.weight_bound} leave only "
                f"2^{self.scale_bits} of fixed-point scale in a 32-bit modulus (need 2^{MIN_SCALE_BITS})")

    @cached_property
    def _half(self) -> int:
        return chunk_prime() // 2

    @cached_property
    def scale_bits(self) -> int:
        return int(self.scale).bit_length() - 1 if self.scale >= 1 else 0

    @cached_property
    def scale(self) -> float:
        """The largest integer scale with K * (W * scale + noise) < q / 2."""
        room = self._half / self.max_contributors - NOISE_MARGIN - 1
        return float(max(0, int(room / float(self.weight_bound))))

    @cached_property
    def limb_scale_bits(self) -> int:
        """Scale of a count limb: above twice the summed noise, so rounding removes it."""
        return (2 * self.max_contributors * NOISE_MARGIN).bit_length()

    @cached_property
    def limb_bits(self) -> int:
        k = self.max_contributors
        room = (self._half - k * NOISE_MARGIN) // (k << self.limb_scale_bits)
        bits = room.bit_length() - 1  # k * (2^bits - 1) * 2^c + noise < q / 2
        if bits < 1:
            raise ThresholdCodecError(f"{k} contributors leave no room for the sample count")
        return min(bits, 16)

    @cached_property
    def limbs(self) -> int:
        return -(-self.max_samples.bit_length() // self.limb_bits)

    def n_coeffs(self, n_params: int) -> int:
        return int(n_params) + self.limbs + CHECK_COEFFS

    def n_chunks(self, n_params: int) -> int:
        return -(-self.n_coeffs(n_params) // RING_DEGREE)

    def seed(self) -> bytes:
        """The public seed of this round's ``a_c`` (chunk c is counter block c)."""
        return public_seed("cxr-mq/threshold/chunk-a/v1", self.federation, self.round)

    def to_dict(self) -> dict:
        return {"federation": self.federation, "round": self.round, "max_contributors": self.max_contributors,
                "max_samples": self.max_samples, "weight_bound": float(self.weight_bound)}

    @classmethod
    def from_dict(cls, fields: dict) -> "RoundEncoding":
        try:
            return cls(str(fields["federation"]), int(fields["round"]), int(fields["max_contributors"]),
                       int(fields["max_samples"]), float(fields["weight_bound"]))
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ThresholdCodecError):
                raise
            raise ThresholdCodecError(f"unreadable round encoding: {exc}") from exc


@dataclass(frozen=True)
class StreamHeader:
    fingerprint: str
    encoding: RoundEncoding
    n_params: int
    n_updates: int


class _Negacyclic:
    """Exact products in Z[X]/(X^N + 1) of a fixed small polynomial with many others, via
    the folded, twisted complex FFT of size N/2 (values at the odd powers of a 2N-th root)."""

    def __init__(self, n: int, fixed: np.ndarray):
        self.n, self.half = n, n // 2
        self.twist = np.exp(1j * np.pi * np.arange(self.half) / n)
        self.untwist = np.conj(self.twist)
        self.fixed = self.transform(np.asarray(fixed, dtype=np.float64))

    def transform(self, x: np.ndarray) -> np.ndarray:
        h = self.half
        return np.fft.fft((x[..., :h] + 1j * x[..., h:]) * self.twist, axis=-1)

    def product(self, x: np.ndarray, check: bool = True) -> np.ndarray:
        """round(x * fixed) for float64 rows (..., N) of integers; with ``check``, a product
        whose FFT error is not far below 0.5 is refused (by the bound in the module
        docstring it never is; encryption skips the check, where an error of 1 would only
        add one unit of noise)."""
        z = np.fft.ifft(self.transform(x) * self.fixed, axis=-1) * self.untwist
        out = np.empty(z.shape[:-1] + (self.n,), dtype=np.float64)
        np.rint(z.real, out=out[..., : self.half])
        np.rint(z.imag, out=out[..., self.half :])
        if not check:
            return out
        worst = max(float(np.max(np.abs(out[..., : self.half] - z.real))), float(np.max(np.abs(out[..., self.half :] - z.imag))))
        if worst > 0.25:
            raise ThresholdCodecError(f"FFT product off by {worst:.3f}: inputs beyond the exact range")
        return out


class ThresholdCodec(CkksCodec):
    """The threshold profile under one committee key; public: it holds no secret at all.

    Its context (``public_bytes``) is what ``keys init --threshold`` stores as the public
    context: the committee's parties, threshold and collective public key. The hospitals'
    committee shares are separate files (``ceremony.CommitteeShare``)."""

    profile = PROFILE
    has_secret_key = False

    def __init__(self, committee_key: CollectivePublicKey, *, federation: str, parties: tuple[str, ...],
                 threshold: int, ceremony_id: str = ""):
        self.committee_key = committee_key
        self.federation, self.parties, self.threshold = federation, tuple(parties), int(threshold)
        self.ceremony_id = str(ceremony_id)  # where each hospital finds its committee share
        self.q = chunk_prime()
        self.n = RING_DEGREE
        self.fingerprint = self._fingerprint()

    def params(self) -> dict:
        ring = keylayer.key_ring()
        return {"ring_degree": self.n, "chunk_prime": self.q, "key_primes": list(ring.primes),
                "key_scale_bits": keylayer.KEY_SCALE_BITS, "smudging_bits": keylayer.SMUDGING_BITS,
                "noise": f"cbd-{NOISE_BITS}", "secret": "ternary", "a_expansion": "aes-256-ctr"}

    def _fingerprint(self) -> str:
        h = hashlib.sha256(b"cxr-mq/threshold-fingerprint/v1\0")
        h.update(json.dumps({"params": self.params(), "federation": self.federation, "parties": list(self.parties),
                             "threshold": self.threshold, "ceremony_id": self.ceremony_id},
                            sort_keys=True).encode() + b"\0")
        h.update(self.committee_key.fingerprint().encode())
        return h.hexdigest()

    @classmethod
    def generate(cls):
        raise CodecError("threshold keys come from a ceremony among the hospitals: "
                         "run 'cxr-mq keys init --threshold T' (or ceremony.run_local in one process)")

    def public_bytes(self) -> bytes:
        return KEY_MAGIC + msgpack.packb(
            {"profile": PROFILE, "params": self.params(), "federation": self.federation, "parties": list(self.parties),
             "threshold": self.threshold, "ceremony_id": self.ceremony_id,
             "committee_key": self.committee_key.to_bytes()}, use_bin_type=True)

    def secret_bytes(self) -> bytes:
        raise CodecError("the threshold profile has no secret context: each hospital holds a committee share")

    @classmethod
    def from_payload(cls, payload: dict) -> "ThresholdCodec":
        try:
            key = CollectivePublicKey.from_bytes(bytes(payload["committee_key"]))
            codec = cls(key, federation=str(payload["federation"]), parties=tuple(payload["parties"]),
                        threshold=int(payload["threshold"]), ceremony_id=str(payload.get("ceremony_id", "")))
            claimed = payload["params"]
        except CodecError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise CodecError(f"incomplete threshold context: {exc}") from exc
        if claimed != codec.params():
            raise CodecMismatch(f"threshold parameters differ: context {claimed}, this codec {codec.params()}")
        return codec

    def n_chunks(self, n_params: int) -> int:
        return -(-int(n_params) // self.n)

    def __repr__(self) -> str:
        return f"<ThresholdCodec {self.federation} {self.threshold}-of-{len(self.parties)} {self.fingerprint[:16]}>"

    # hospital side

    def encrypt_update(self, weights: np.ndarray, n_samples: int, out: BinaryIO, *,
                       encoding: RoundEncoding | None = None, hospital: str | None = None,
                       **_single_key_options) -> KeyCiphertext:
        """Encrypt ``weights`` of ``n_samples`` samples under a fresh round key; write the
        stream (header, key ciphertext, chunks) to ``out``; return the key ciphertext (the
        hospital also uploads it alone, signed, for the committee)."""
        if encoding is None or hospital is None:
            raise ThresholdCodecError("the threshold profile encrypts for one round and hospital: "
                                      "pass encoding=RoundEncoding(...) and hospital=")
        values = self._check_update(weights, n_samples, encoding, hospital)
        key = sample_ternary(self.n)
        key_ct = keylayer.encrypt_round_key(self.committee_key, key, federation=encoding.federation,
                                            round_no=encoding.round, hospital=hospital)
        header = StreamHeader(self.fingerprint, encoding, values.size, 1)
        self._write_prefix(out, header, key_ct)
        mult = _Negacyclic(self.n, key)
        noise = secret_stream()
        factor = float(n_samples) / encoding.max_samples * encoding.scale
        tail = self._tail(encoding, [int(n_samples)])
        n_coeffs = encoding.n_coeffs(values.size)
        seed = encoding.seed()
        for first in range(0, encoding.n_chunks(values.size), BATCH_CHUNKS):
            rows = min(BATCH_CHUNKS, encoding.n_chunks(values.size) - first)
            start, stop = first * self.n, min((first + rows) * self.n, n_coeffs)
            c = self._message(values, tail, factor, start, stop)  # float64, exact integers
            c += sample_cbd(stop - start, NOISE_BITS, noise)
            c -= mult.product(self._a_rows(seed, first, rows), check=False).reshape(-1)[: stop - start]  # - a * s
            out.write(_reduce(c, self.q).astype("<u4").tobytes())
        return key_ct

    def _check_update(self, weights, n_samples, encoding: RoundEncoding, hospital: str) -> np.ndarray:
        if encoding.federation != self.federation:
            raise ThresholdCodecError(f"round of federation {encoding.federation!r}, this codec is {self.federation!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, (int, np.integer)) or not 1 <= n_samples <= encoding.max_samples:
            raise ThresholdCodecError(f"n_samples must be 1..{encoding.max_samples} (the round's max_samples), got {n_samples!r}")
        values = np.asarray(weights)
        if values.ndim != 1 or values.size == 0 or values.size > MAX_PARAMS:
            raise ThresholdCodecError(f"weights must be a non-empty 1-D array, got shape {values.shape}")
        if values.dtype not in (np.float32, np.float64):
            values = values.astype(np.float64)
        peak = float(np.max(np.abs(values)))
        if not np.isfinite(peak):
            raise ThresholdCodecError("weights contain NaN or infinity")
        if peak > encoding.weight_bound:
            raise ThresholdCodecError(
                f"|weight| reaches {peak:.4g}, above the round's weight_bound {encoding.weight_bound:g}: "
                f"a sum of {encoding.max_contributors} such updates could wrap")
        return values

    def _tail(self, encoding: RoundEncoding, counts: list[int]) -> np.ndarray:
        """The sample-count limbs (scaled) and the zero check coefficients."""
        mask = (1 << encoding.limb_bits) - 1
        n = counts[0]
        limbs = [((n >> (encoding.limb_bits * i)) & mask) << encoding.limb_scale_bits for i in range(encoding.limbs)]
        return np.array(limbs + [0] * CHECK_COEFFS, dtype=np.int64)

    @staticmethod
    def _message(values: np.ndarray, tail: np.ndarray, factor: float, start: int, stop: int) -> np.ndarray:
        """round(rho * w * scale) for coefficients start..stop-1, then the tail (float64)."""
        n_params = values.size
        out = np.zeros(stop - start, dtype=np.float64)
        upto = min(stop, n_params)
        if start < upto:
            np.multiply(values[start:upto], factor, out=out[: upto - start], dtype=np.float64)
            np.rint(out[: upto - start], out=out[: upto - start])
        if stop > n_params:
            lo = max(start, n_params)
            out[lo - start :] = tail[lo - n_params : stop - n_params]
        return out

    def _a_rows(self, seed: bytes, first: int, rows: int) -> np.ndarray:
        """Public ``a_c`` rows (chunks ``first`` ..) as centered float64 (|a| < 2^31)."""
        a = expand_uniform_rows(seed, first, rows, self.n, self.q).astype(np.float64)
        a -= float(self.q) * (a > float(self.q // 2))
        return a

    # stream framing

    def _write_prefix(self, out: BinaryIO, header: StreamHeader, key_ct: KeyCiphertext) -> int:
        body = msgpack.packb({"v": FORMAT_VERSION, "profile": PROFILE, "fingerprint": header.fingerprint,
                              "encoding": header.encoding.to_dict(), "n_params": header.n_params,
                              "n_updates": header.n_updates}, use_bin_type=True)
        blob = key_ct.to_bytes()
        for part in (STREAM_MAGIC, _U32.pack(len(body)), body, _U32.pack(len(blob)), blob):
            out.write(part)
        return len(STREAM_MAGIC) + 8 + len(body) + len(blob)

    def read_prefix(self, src: BinaryIO) -> tuple[StreamHeader, KeyCiphertext]:
        """Read and check the header and the key ciphertext; ``src`` is left at the chunks."""
        magic = _read_exact(src, len(STREAM_MAGIC), "magic")
        if magic != STREAM_MAGIC:
            raise ThresholdCodecError(f"not a threshold stream (magic {magic!r})")
        (length,) = _U32.unpack(_read_exact(src, 4, "header length"))
        if length > MAX_HEADER_BYTES:
            raise ThresholdCodecError(f"stream header claims {length} bytes, more than {MAX_HEADER_BYTES}")
        try:
            fields = msgpack.unpackb(_read_exact(src, length, "header"), raw=False)
            if fields["v"] != FORMAT_VERSION or fields["profile"] != PROFILE:
                raise ThresholdCodecError(f"stream is {fields['profile']!r} v{fields['v']}, expected {PROFILE} v{FORMAT_VERSION}")
            header = StreamHeader(str(fields["fingerprint"]), RoundEncoding.from_dict(fields["encoding"]),
                                  int(fields["n_params"]), int(fields["n_updates"]))
        except ThresholdCodecError:
            raise
        except Exception as exc:
            raise ThresholdCodecError(f"unreadable stream header: {exc}") from exc
        if header.fingerprint != self.fingerprint:
            raise ThresholdCodecError(f"committee key mismatch: stream {header.fingerprint[:16]}, codec {self.fingerprint[:16]}")
        if header.encoding.federation != self.federation:
            raise ThresholdCodecError(f"stream of federation {header.encoding.federation!r}, codec of {self.federation!r}")
        if not 1 <= header.n_params <= MAX_PARAMS:
            raise ThresholdCodecError(f"stream claims {header.n_params} parameters")
        if not 1 <= header.n_updates <= header.encoding.max_contributors:
            raise ThresholdCodecError(
                f"stream sums {header.n_updates} updates; the round allows 1..{header.encoding.max_contributors}")
        (length,) = _U32.unpack(_read_exact(src, 4, "key ciphertext length"))
        if length > 1 << 20:
            raise ThresholdCodecError(f"key ciphertext claims {length} bytes")
        try:
            key_ct = KeyCiphertext.from_bytes(_read_exact(src, length, "key ciphertext"), header.encoding.max_contributors)
        except keylayer.KeyLayerError as exc:
            raise ThresholdCodecError(str(exc)) from None
        if (key_ct.federation, key_ct.round, key_ct.committee) != (
                self.federation, header.encoding.round, self.committee_key.fingerprint()):
            raise ThresholdCodecError("the key ciphertext is bound to another federation, round or committee key")
        if len(key_ct.contributors) != header.n_updates:
            raise ThresholdCodecError(
                f"stream sums {header.n_updates} updates but its key ciphertext {len(key_ct.contributors)}")
        return header, key_ct

    def read_coefficients(self, src: BinaryIO, header: StreamHeader, first: int, count: int) -> np.ndarray:
        data = _read_exact(src, 4 * count, f"coefficients {first}..{first + count - 1}")
        c = np.frombuffer(data, dtype="<u4").astype(np.uint64)
        if c.size and int(c.max()) >= self.q:
            raise ThresholdCodecError(f"coefficients {first}..{first + count - 1}: not reduced modulo q")
        return c

    # aggregator side

    def new_sum(self, n_params: int, *, max_updates: int | None = None,
                distinct_updates: bool = True) -> "ThresholdSum":
        """A running sum; at most ``max_updates`` (and the round's ``max_contributors``).
        Contributors are always distinct here: the key sum names each one once."""
        return ThresholdSum(self, n_params, max_updates)

    def key_sum_of(self, src: BinaryIO) -> KeyCiphertext:
        """The key ciphertext (sum) at the front of a stream: what the committee is asked about."""
        return self.read_prefix(src)[1]

    # decryption by the holder of s_S

    def decrypt_aggregate(self, src: BinaryIO, key_sum: np.ndarray, *, n_updates: int | None = None,
                          min_updates: int = 1) -> tuple[np.ndarray, int]:
        """(FedAvg weights, total samples) of an aggregate, with the round's key sum ``s_S``
        (integer polynomial from :func:`committee.combine`). A key sum that does not belong
        to this aggregate is refused (the zero coefficients do not decrypt to zero), and so
        is an aggregate of other than ``n_updates`` or fewer than ``min_updates`` updates."""
        header, key_ct = self.read_prefix(src)
        enc, k = header.encoding, header.n_updates
        if n_updates is not None and k != n_updates:
            raise ThresholdCodecError(f"the aggregate sums {k} updates, expected {n_updates}")
        if k < min_updates:
            raise ThresholdCodecError(f"the aggregate sums {k} update(s), fewer than the minimum of {min_updates}: "
                                      "decrypting it would reveal them")
        s = np.asarray(key_sum, dtype=np.int64)
        if s.shape != (self.n,) or np.abs(s).max(initial=0) > k:
            raise ThresholdCodecError(f"a key sum of {k} round keys has {self.n} coefficients in [-{k}, {k}]")
        mult = _Negacyclic(self.n, s)
        seed, n_coeffs = enc.seed(), enc.n_coeffs(header.n_params)
        chunks = enc.n_chunks(header.n_params)
        out = np.empty(n_coeffs, dtype=np.float64)
        half = float(self.q // 2)
        for first in range(0, chunks, BATCH_CHUNKS):
            rows = min(BATCH_CHUNKS, chunks - first)
            start, stop = first * self.n, min((first + rows) * self.n, n_coeffs)
            c = self.read_coefficients(src, header, start, stop - start).astype(np.float64)
            # a * s_S with a split in 16-bit halves: each FFT product stays exact for K <= 1024
            a = self._a_rows(seed, first, rows)
            hi = np.floor(a * (1.0 / 65536.0))
            a -= hi * 65536.0
            prod = _reduce(mult.product(hi).reshape(-1)[: stop - start], self.q) * 65536.0
            prod += mult.product(a).reshape(-1)[: stop - start]
            c += prod
            _reduce(c, self.q)
            c -= float(self.q) * (c > half)
            out[start:stop] = c
        _expect_eof(src)
        return self._decode(out, header)

    def _decode(self, v: np.ndarray, header: StreamHeader) -> tuple[np.ndarray, int]:
        enc, k, n_params = header.encoding, header.n_updates, header.n_params
        noise = k * NOISE_MARGIN
        check = v[n_params + enc.limbs :]
        if np.abs(check).max() > noise:
            raise ThresholdCodecError("the key sum does not decrypt this aggregate (check coefficients are not zero)")
        limbs = v[n_params : n_params + enc.limbs].astype(np.int64)
        unit = 1 << enc.limb_scale_bits
        sums = (limbs + unit // 2) // unit
        if np.abs(limbs - sums * unit).max(initial=0) > noise or sums.min(initial=0) < 0:
            raise ThresholdCodecError("the sample-count limbs do not decrypt: wrong key sum")
        total = sum(int(x) << (enc.limb_bits * i) for i, x in enumerate(sums))
        if not k <= total <= k * enc.max_samples:
            raise ThresholdCodecError(f"decrypted total of {total} samples is impossible for {k} updates")
        # sum(rho_i w_i) / sum(rho_i), rho_i = n_i / max_samples; rounding noise is part of the value
        weights = v[:n_params] * (enc.max_samples / (enc.scale * total))
        return weights, total


class ThresholdSum:
    """Running sum of threshold streams of one round: chunk coefficients mod q (one array, plus
    a staged copy while an update is read) and the key ciphertexts mod Q. Memory does not
    grow with the number of updates; a bad update leaves the sum as it was."""

    def __init__(self, codec: ThresholdCodec, n_params: int, max_updates: int | None = None):
        if not 1 <= int(n_params) <= MAX_PARAMS:
            raise ThresholdCodecError(f"n_params must be 1..{MAX_PARAMS}, got {n_params}")
        self.codec, self.n_params = codec, int(n_params)
        self.max_updates = MAX_CONTRIBUTORS if max_updates is None else int(max_updates)
        self.count = 0
        self.encoding: RoundEncoding | None = None
        self.key_sum: KeyCiphertext | None = None
        self._sum: np.ndarray | None = None
        self._staged: np.ndarray | None = None

    def add(self, src: BinaryIO, n_updates: int = 1) -> None:
        """Add a stream that holds exactly ``n_updates`` updates (an upload holds one)."""
        header, key_ct = self.codec.read_prefix(src)
        if header.n_updates != n_updates:
            raise ThresholdCodecError(f"the stream holds {header.n_updates} updates, expected exactly {n_updates}")
        if self.count + header.n_updates > self.max_updates:
            raise ThresholdCodecError(f"the sum holds {self.count} of at most {self.max_updates} updates")
        if header.n_params != self.n_params:
            raise ThresholdCodecError(f"n_params mismatch: stream has {header.n_params}, expected {self.n_params}")
        if self.encoding is not None and header.encoding != self.encoding:
            raise ThresholdCodecError("stream of another round or round encoding than this sum")
        enc = header.encoding
        if self.count + header.n_updates > enc.max_contributors:
            raise ThresholdCodecError(
                f"adding {header.n_updates} to {self.count} updates exceeds the round's {enc.max_contributors} contributors")
        new_key = key_ct if self.key_sum is None else keylayer.sum_key_ciphertexts([self.key_sum, key_ct])
        n_coeffs = enc.n_coeffs(self.n_params)
        if self._sum is None:
            self._sum = np.zeros(n_coeffs, dtype="<u4")  # residues < q < 2^32: 4 bytes each
            self._staged = np.empty_like(self._sum)
        q = np.uint64(self.codec.q)
        step = BATCH_CHUNKS * RING_DEGREE
        for start in range(0, n_coeffs, step):
            stop = min(start + step, n_coeffs)
            c = self.codec.read_coefficients(src, header, start, stop - start)
            c += self._sum[start:stop]  # uint64 batch: no overflow
            self._staged[start:stop] = np.minimum(c, c - q)
        _expect_eof(src)
        self._sum, self._staged = self._staged, self._sum
        self.encoding, self.key_sum = enc, new_key
        self.count += header.n_updates

    def write(self, out: BinaryIO) -> int:
        if self.count == 0:
            raise ThresholdCodecError("cannot write an empty sum")
        header = StreamHeader(self.codec.fingerprint, self.encoding, self.n_params, self.count)
        written = self.codec._write_prefix(out, header, self.key_sum)
        data = self._sum.tobytes()
        out.write(data)
        return written + len(data)


def _reduce(c: np.ndarray, q: int) -> np.ndarray:
    """Exact integers in float64 (|c| < 2^52) to their residues modulo q, in place."""
    qf = float(q)
    c -= np.floor(c * (1.0 / qf)) * qf  # the quotient may be off by one at the edges:
    c += qf * (c < 0)
    c -= qf * (c >= qf)
    return c


def _read_exact(src: BinaryIO, n: int, what: str) -> bytes:
    return read_exact(src, n, what, ThresholdCodecError)


def _expect_eof(src: BinaryIO) -> None:
    if src.read(1):
        raise ThresholdCodecError("trailing bytes after the last coefficient")
