"""The key layer of the threshold profile: a collective RLWE public key and the small
ciphertexts that carry each hospital's round key to the committee.

Ring Z_Q[X]/(X^N + 1), N = 4096, Q = q_1 q_2 q_3 (three 31-bit NTT primes, log Q ~ 93),
residues stored in NTT form as uint64 arrays of shape (3, ..., N).

- Collective public key ``pk = (p0, a)``: ``a`` is expanded from a public seed (the common
  reference string of the ceremony), ``p0 = sum_i (e_i - a k_i)`` over the parties' secret
  contributions ``k_i`` (ternary) and noise ``e_i``. The collective secret ``k = sum k_i`` is
  never assembled.
- A key ciphertext is the public-key encryption of ``D * s`` (``D = 2^78``), ``s`` a ternary
  round key: ``c0 = p0 u + e0 + D s``, ``c1 = a u + e1``. Key ciphertexts add; decrypting the
  sum of K of them (``c0 + c1 k``) gives ``D * sum s + noise`` and rounding by D gives the
  integer polynomial ``sum s`` while |noise| < D / 2: the committee's smudging (T * 2^68), the
  encryption noise (K * ~2^24) and nothing else. Q / D leaves room for K up to 2^13.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import msgpack
import numpy as np

from .errors import CodecError
from .ring import RnsRing, expand_uniform, ntt_primes, rns_ring, sample_cbd, sample_ternary, secret_stream

RING_DEGREE = 4096
KEY_PRIME_BITS = 31
KEY_PRIME_COUNT = 3
KEY_SCALE_BITS = 78  # D = 2^78: the round key sum is D * s_S under the noise
SMUDGING_BITS = 68  # each partial decryption adds noise uniform in [-2^68, 2^68): >= 2^40 by far
NOISE_BITS = 21  # centered binomial, |e| <= 21 (SEAL's)
MAX_PARTIES = 100  # T * 2^68 smudging must stay below D / 4
KEY_CT_MAGIC = b"CXRMQkc\x01"
_U32 = struct.Struct(">I")


class KeyLayerError(CodecError):
    """A key ciphertext or public key that is malformed or does not belong here."""


def key_ring() -> RnsRing:
    return rns_ring(RING_DEGREE, ntt_primes(RING_DEGREE, KEY_PRIME_BITS, KEY_PRIME_COUNT))


def crs(seed: bytes) -> np.ndarray:
    """The common ``a`` of a ceremony, in NTT form (uniform either way), shape (L, N)."""
    ring = key_ring()
    return np.stack([expand_uniform(seed, 0, ring.n, q) for q in ring.primes])


def ternary_ntt(s: np.ndarray) -> np.ndarray:
    ring = key_ring()
    return ring.forward(ring.from_signed(s))


def noise_ntt(count: int = 1) -> np.ndarray:
    ring = key_ring()
    e = sample_cbd(count * ring.n, NOISE_BITS, secret_stream()).reshape(count, ring.n)
    if count == 1:
        e = e[0]
    return ring.forward(ring.from_signed(e))


def _pack_residues(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x, dtype="<u4").tobytes()


def _unpack_residues(data: bytes, shape: tuple, what: str) -> np.ndarray:
    want = 4 * int(np.prod(shape))
    if len(data) != want:
        raise KeyLayerError(f"{what}: {len(data)} bytes of residues, expected {want}")
    arr = np.frombuffer(data, dtype="<u4").astype(np.uint64).reshape(shape)
    try:
        key_ring().check(arr, what, rows=shape[1] if len(shape) == 3 else None)
    except ValueError as exc:
        raise KeyLayerError(str(exc)) from None
    return arr


@dataclass(frozen=True)
class CollectivePublicKey:
    """``(p0, a)``: p0 in NTT form (L, N); ``a`` expands from ``crs_seed``."""

    crs_seed: bytes
    p0: np.ndarray

    def fingerprint(self) -> str:
        h = hashlib.sha256(b"cxr-mq/threshold/collective-pk/v1\0")
        h.update(self.crs_seed)
        h.update(_pack_residues(self.p0))
        return h.hexdigest()

    def to_bytes(self) -> bytes:
        return msgpack.packb({"crs_seed": self.crs_seed, "p0": _pack_residues(self.p0)}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "CollectivePublicKey":
        try:
            fields = msgpack.unpackb(data, raw=False)
            seed, p0 = bytes(fields["crs_seed"]), bytes(fields["p0"])
        except Exception as exc:
            raise KeyLayerError(f"unreadable collective public key: {exc}") from exc
        if len(seed) != 32:
            raise KeyLayerError("collective public key: the CRS seed is not 32 bytes")
        ring = key_ring()
        return cls(seed, _unpack_residues(p0, (len(ring.primes), ring.n), "collective public key"))


@dataclass(frozen=True)
class KeyCiphertext:
    """Enc_pk(D * s) for one hospital's round key, or the sum of several.

    The header binds the federation, the round, the committee key and who it is from:
    ``contributors`` is the sorted list of hospitals whose round keys it sums (one for an
    upload). ``c`` holds (c0, c1) in NTT form: shape (L, 2, N).
    """

    federation: str
    round: int
    committee: str  # fingerprint of the collective public key
    contributors: tuple[str, ...]
    c: np.ndarray

    def to_bytes(self) -> bytes:
        header = msgpack.packb(
            {"v": 1, "federation": self.federation, "round": self.round, "committee": self.committee,
             "contributors": list(self.contributors)},
            use_bin_type=True,
        )
        return KEY_CT_MAGIC + _U32.pack(len(header)) + header + _pack_residues(self.c)

    @classmethod
    def from_bytes(cls, data: bytes, max_contributors: int = 1 << 12) -> "KeyCiphertext":
        data = bytes(data)
        if not data.startswith(KEY_CT_MAGIC) or len(data) < len(KEY_CT_MAGIC) + 4:
            raise KeyLayerError("not a cxr-mq key ciphertext (bad magic)")
        at = len(KEY_CT_MAGIC)
        (length,) = _U32.unpack_from(data, at)
        if length > 64 + 80 * max_contributors:
            raise KeyLayerError(f"key ciphertext header claims {length} bytes")
        try:
            fields = msgpack.unpackb(data[at + 4 : at + 4 + length], raw=False)
            if fields["v"] != 1:
                raise KeyLayerError(f"key ciphertext version {fields['v']}, this code reads 1")
            contributors = tuple(str(c) for c in fields["contributors"])
            federation, round_no, committee = str(fields["federation"]), int(fields["round"]), str(fields["committee"])
        except KeyLayerError:
            raise
        except Exception as exc:
            raise KeyLayerError(f"unreadable key ciphertext header: {exc}") from exc
        if not contributors or len(contributors) > max_contributors or list(contributors) != sorted(set(contributors)):
            raise KeyLayerError("key ciphertext: contributors must be a sorted list of distinct hospitals")
        ring = key_ring()
        c = _unpack_residues(data[at + 4 + length :], (len(ring.primes), 2, ring.n), "key ciphertext")
        return cls(federation, round_no, committee, contributors, c)

    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()


def encrypt_round_key(pk: CollectivePublicKey, s: np.ndarray, *, federation: str, round_no: int,
                      hospital: str) -> KeyCiphertext:
    """Enc_pk(D * s): u ternary, e0, e1 centered binomial, all fresh from the CSPRNG."""
    ring = key_ring()
    a = crs(pk.crs_seed)
    u = ternary_ntt(sample_ternary(ring.n))
    e = noise_ntt(2)  # (L, 2, N)
    scaled = ring.forward(ring.scalar(ring.from_signed(s), 1 << KEY_SCALE_BITS))
    c0 = ring.add(ring.add(ring.mul(pk.p0, u), e[:, 0]), scaled)
    c1 = ring.add(ring.mul(a, u), e[:, 1])
    return KeyCiphertext(federation, int(round_no), pk.fingerprint(), (hospital,), np.stack([c0, c1], axis=1))


def sum_key_ciphertexts(items: list[KeyCiphertext]) -> KeyCiphertext:
    """The sum of key ciphertexts of one federation, round and committee, disjoint senders."""
    if not items:
        raise KeyLayerError("no key ciphertexts to add")
    first = items[0]
    ring = key_ring()
    total = first.c
    names = list(first.contributors)
    for item in items[1:]:
        if (item.federation, item.round, item.committee) != (first.federation, first.round, first.committee):
            raise KeyLayerError(
                f"cannot add a key ciphertext of {item.federation}/round {item.round} to one of "
                f"{first.federation}/round {first.round} (or another committee key)")
        total = ring.add(total, item.c)
        names.extend(item.contributors)
    if len(set(names)) != len(names):
        raise KeyLayerError(f"a contributor is counted twice in the key sum: {sorted(names)}")
    return KeyCiphertext(first.federation, first.round, first.committee, tuple(sorted(names)), total)


def decode_key_sum(plain_ntt: np.ndarray, max_abs: int) -> np.ndarray:
    """Round ``D * s + noise`` (NTT form, (L, N)) to the integer polynomial s; refuse a result
    whose noise is not far below D (wrong or missing shares) or out of range."""
    ring = key_ring()
    values = ring.centered(ring.inverse(plain_ntt))  # Python ints: Q > 2^63
    d = 1 << KEY_SCALE_BITS
    s = [(int(v) + d // 2) >> KEY_SCALE_BITS for v in values]  # nearest multiple of D
    worst = max(abs(int(v) - (k << KEY_SCALE_BITS)) for v, k in zip(values, s))
    if worst > d // 4:
        raise KeyLayerError("the combined partial decryptions do not decrypt the key sum "
                            f"(residual noise 2^{worst.bit_length()} >= D/4): wrong, missing or forged shares")
    if max(abs(k) for k in s) > max_abs:
        raise KeyLayerError(f"decrypted key sum has a coefficient beyond {max_abs}: not a sum of that many round keys")
    return np.array(s, dtype=np.int64)
