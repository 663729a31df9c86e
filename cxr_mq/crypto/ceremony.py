"""The key ceremony: a collective public key whose secret is t-of-n Shamir-shared, never whole.

Three steps, each a function with typed inputs (after Lattigo's ``multiparty``: the
collective public key of ``keygen_cpk`` and the ring-level Shamir sharing of ``threshold``):

1. :func:`generate_share` - party i draws a ternary ``k_i`` and noise ``e_i`` (CSPRNG), and
   returns its public contribution ``p_i = e_i - a k_i`` (``a`` from the ceremony's public
   seed) and one Shamir share ``f_i(x_j)`` of ``k_i`` per party j, from a random polynomial
   ``f_i`` of degree t-1 with coefficients in R_Q and ``f_i(0) = k_i``. Sharing is linear,
   so it is done on the NTT form. ``k_i`` and ``f_i`` are dropped when the function returns.
2. :func:`aggregate_shares` - party j adds the n shares it received:
   ``sigma_j = sum_i f_i(x_j)``, its committee share (a Shamir share of ``k = sum k_i``).
3. :func:`finalize` - anyone adds the contributions: ``p0 = sum p_i``, the collective public
   key ``(p0, a)``.

Shares travel sealed to the recipient's X25519 identity key (:func:`seal`, :func:`unseal`:
X25519 + HKDF-SHA256 + AES-256-GCM, the context bound as associated data); contributions and
sealed shares are signed by their dealer (the caller signs, with ``cxr_mq.identity``).
Everything is honest-but-curious: a dealer could deal inconsistent shares; the committee's
combine step then fails loudly rather than decrypting something else.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

import msgpack
import numpy as np

from . import keylayer
from .errors import CodecError
from .keylayer import CollectivePublicKey, KeyLayerError
from .ring import public_seed, sample_ternary

SEAL_INFO = b"cxr-mq/threshold/sealed-share/v1"


class CeremonyError(CodecError):
    """A ceremony input that is inconsistent, incomplete or not addressed to this party."""


def majority(n_parties: int) -> int:
    """The default threshold: the fewest members that are more than half of ``n_parties``."""
    return n_parties // 2 + 1


@dataclass(frozen=True)
class CeremonyParams:
    """Who takes part, the threshold, and a ceremony id that makes the common ``a`` fresh."""

    federation: str
    parties: tuple[str, ...]
    threshold: int
    ceremony_id: str
    allow_minority: bool = False  # t <= n/2: two disjoint committees could each decrypt a round

    def __post_init__(self):
        parties = tuple(self.parties)
        if len(parties) != len(set(parties)) or list(parties) != sorted(parties):
            raise CeremonyError(f"parties must be sorted and distinct, got {list(parties)}")
        if not 2 <= len(parties) <= keylayer.MAX_PARTIES:
            raise CeremonyError(f"a committee has 2..{keylayer.MAX_PARTIES} parties, got {len(parties)}")
        if not 1 <= self.threshold <= len(parties):
            raise CeremonyError(f"threshold must be 1..{len(parties)}, got {self.threshold}")
        if 2 * self.threshold <= len(parties) and not self.allow_minority:
            raise CeremonyError(
                f"threshold {self.threshold} of {len(parties)} is not a majority: two disjoint active sets could "
                "each decrypt a different key sum of one round (pass allow_minority to accept that)")
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,62}$", self.ceremony_id or ""):
            raise CeremonyError(f"a ceremony id is 1-63 letters, digits, '_', '.', '-', got {self.ceremony_id!r}")

    def point(self, party: str) -> int:
        """The party's Shamir evaluation point: 1-based position in the sorted list."""
        try:
            return self.parties.index(party) + 1
        except ValueError:
            raise CeremonyError(f"{party!r} is not a party of this ceremony") from None

    def crs_seed(self) -> bytes:
        return public_seed("cxr-mq/threshold/crs/v1", self.federation, self.ceremony_id,
                           ",".join(self.parties), self.threshold)

    def to_dict(self) -> dict:
        return {"federation": self.federation, "parties": list(self.parties), "threshold": self.threshold,
                "ceremony_id": self.ceremony_id, "allow_minority": self.allow_minority}

    @classmethod
    def from_dict(cls, fields: dict) -> "CeremonyParams":
        try:
            return cls(str(fields["federation"]), tuple(str(p) for p in fields["parties"]), int(fields["threshold"]),
                       str(fields["ceremony_id"]), bool(fields.get("allow_minority", False)))
        except (KeyError, TypeError) as exc:
            raise CeremonyError(f"unreadable ceremony parameters: {exc}") from None


@dataclass(frozen=True)
class PublicContribution:
    party: str
    ceremony_id: str
    p: np.ndarray  # NTT form, (L, N)

    def to_bytes(self) -> bytes:
        return msgpack.packb({"party": self.party, "ceremony_id": self.ceremony_id,
                              "p": np.ascontiguousarray(self.p, dtype="<u4").tobytes()}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "PublicContribution":
        fields = _unpack(data, "public contribution")
        return cls(str(fields["party"]), str(fields["ceremony_id"]), _residues(fields["p"], "public contribution"))


@dataclass(frozen=True)
class DealtShare:
    """f_dealer(x_recipient): secret; only ever stored or sent sealed to the recipient."""

    dealer: str
    recipient: str
    ceremony_id: str
    value: np.ndarray = None  # NTT form, (L, N)

    def __repr__(self) -> str:  # never print the share
        return f"<DealtShare {self.dealer}->{self.recipient} {self.ceremony_id}>"

    def to_bytes(self) -> bytes:
        return msgpack.packb({"dealer": self.dealer, "recipient": self.recipient, "ceremony_id": self.ceremony_id,
                              "value": np.ascontiguousarray(self.value, dtype="<u4").tobytes()}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "DealtShare":
        fields = _unpack(data, "dealt share")
        return cls(str(fields["dealer"]), str(fields["recipient"]), str(fields["ceremony_id"]),
                   _residues(fields["value"], "dealt share"))

    def aad(self) -> bytes:
        return share_aad(self.ceremony_id, self.dealer, self.recipient)


@dataclass(frozen=True)
class CommitteeShare:
    """Party j's share sigma_j of the collective secret, with what it belongs to."""

    params: CeremonyParams
    party: str
    committee: str  # fingerprint of the collective public key
    sigma: np.ndarray = None  # NTT form, (L, N)

    def __repr__(self) -> str:
        return f"<CommitteeShare {self.party} of {self.params.federation} {self.committee[:16]}>"

    def to_bytes(self) -> bytes:
        return msgpack.packb({"kind": "cxr-mq committee share", "params": self.params.to_dict(), "party": self.party,
                              "committee": self.committee,
                              "sigma": np.ascontiguousarray(self.sigma, dtype="<u4").tobytes()}, use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "CommitteeShare":
        fields = _unpack(data, "committee share")
        if fields.get("kind") != "cxr-mq committee share":
            raise CeremonyError("not a committee share file")
        return cls(CeremonyParams.from_dict(fields["params"]), str(fields["party"]), str(fields["committee"]),
                   _residues(fields["sigma"], "committee share"))


def _unpack(data: bytes, what: str) -> dict:
    try:
        fields = msgpack.unpackb(bytes(data), raw=False)
    except Exception as exc:
        raise CeremonyError(f"unreadable {what}: {exc}") from None
    if not isinstance(fields, dict):
        raise CeremonyError(f"unreadable {what}")
    return fields


def _residues(data, what: str) -> np.ndarray:
    ring = keylayer.key_ring()
    try:
        return keylayer._unpack_residues(bytes(data), (len(ring.primes), ring.n), what)
    except (KeyLayerError, TypeError) as exc:
        raise CeremonyError(str(exc)) from None


def _uniform_ntt() -> np.ndarray:
    """A secret uniform polynomial of R_Q (NTT form), from os.urandom."""
    ring = keylayer.key_ring()
    out = np.empty((len(ring.primes), ring.n), dtype=np.uint64)
    for i, q in enumerate(ring.primes):
        got = 0
        while got < ring.n:
            words = np.frombuffer(os.urandom(4 * (ring.n - got + 32)), dtype="<u4")
            kept = words[words < q][: ring.n - got]
            out[i, got : got + kept.size] = kept
            got += kept.size
    return out


def generate_share(params: CeremonyParams, me: str) -> tuple[PublicContribution, dict[str, DealtShare]]:
    """Step 1 for party ``me``: its public contribution and one share per party (itself too)."""
    params.point(me)
    ring = keylayer.key_ring()
    k = keylayer.ternary_ntt(sample_ternary(ring.n))
    e = keylayer.noise_ntt()
    a = keylayer.crs(params.crs_seed())
    p = ring.sub(e, ring.mul(a, k))
    coefficients = [k] + [_uniform_ntt() for _ in range(params.threshold - 1)]
    points = np.array([params.point(party) for party in params.parties], dtype=np.uint64)
    values = np.empty((len(ring.primes), len(points), ring.n), dtype=np.uint64)
    for i, (q, r) in enumerate(zip(ring.primes, ring.rings)):
        x = (points % np.uint64(q)).reshape(-1, 1)
        acc = np.broadcast_to(coefficients[-1][i], (len(points), ring.n)).copy()
        for coefficient in reversed(coefficients[:-1]):  # Horner: f(x) = k + x (r_1 + x (...)), every x at once
            acc = r.add(r.mul(acc, x), coefficient[i])
        values[i] = acc
    shares = {party: DealtShare(me, party, params.ceremony_id, np.ascontiguousarray(values[:, j]))
              for j, party in enumerate(params.parties)}
    return PublicContribution(me, params.ceremony_id, p), shares


def run_local(params: CeremonyParams) -> tuple[CollectivePublicKey, dict[str, CommitteeShare]]:
    """The whole ceremony in one process (tests, the bench, a one-machine demo): the same
    steps, but every party's secrets pass through this process's memory."""
    dealt = {party: generate_share(params, party) for party in params.parties}
    public_key = finalize(params, [dealt[party][0] for party in params.parties])
    shares = {
        me: aggregate_shares(params, me, [dealt[dealer][1][me] for dealer in params.parties], public_key)
        for me in params.parties
    }
    return public_key, shares


def finalize(params: CeremonyParams, contributions: list[PublicContribution]) -> CollectivePublicKey:
    """Step 3: the collective public key from every party's contribution (exactly one each)."""
    by_party = _one_each(params, contributions, lambda c: c.party, "public contribution")
    ring = keylayer.key_ring()
    p0 = None
    for party in params.parties:
        item = by_party[party]
        p0 = item.p if p0 is None else ring.add(p0, item.p)
    return CollectivePublicKey(params.crs_seed(), p0)


def aggregate_shares(params: CeremonyParams, me: str, shares: list[DealtShare],
                     public_key: CollectivePublicKey) -> CommitteeShare:
    """Step 2 for party ``me``: sigma_me from the shares every dealer sent it."""
    for share in shares:
        if share.recipient != me:
            raise CeremonyError(f"a share from {share.dealer!r} is addressed to {share.recipient!r}, not {me!r}")
    by_dealer = _one_each(params, shares, lambda s: s.dealer, "share")
    ring = keylayer.key_ring()
    sigma = None
    for dealer in params.parties:
        value = by_dealer[dealer].value
        sigma = value if sigma is None else ring.add(sigma, value)
    if public_key.crs_seed != params.crs_seed():
        raise CeremonyError("the collective public key was not made by this ceremony")
    return CommitteeShare(params, me, public_key.fingerprint(), sigma)


def _one_each(params: CeremonyParams, items, party_of, what: str) -> dict:
    found: dict = {}
    for item in items:
        if item.ceremony_id != params.ceremony_id:
            raise CeremonyError(f"a {what} of ceremony {item.ceremony_id!r}, not {params.ceremony_id!r}")
        party = party_of(item)
        params.point(party)
        if party in found:
            raise CeremonyError(f"two {what}s from {party!r}")
        found[party] = item
    missing = sorted(set(params.parties) - set(found))
    if missing:
        raise CeremonyError(f"missing {what}s from {', '.join(missing)}")
    return found


# --------------------------------------------------------------------------- sealing


def share_aad(ceremony_id: str, dealer: str, recipient: str) -> bytes:
    return f"cxr-mq/threshold/share/{ceremony_id}/{dealer}/{recipient}".encode()


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes, aad: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    salt = hashlib.sha256(ephemeral + recipient).digest()
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=SEAL_INFO + b"\0" + aad).derive(shared)


def seal(recipient_x25519: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt to a recipient's X25519 public key: ephemeral key (32) | nonce (12) | AES-GCM."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    ephemeral = X25519PrivateKey.generate()
    eph_pub = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient_x25519))
    nonce = os.urandom(12)
    key = _derive(shared, eph_pub, recipient_x25519, aad)
    return eph_pub + nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(recipient_private, sealed: bytes, aad: bytes) -> bytes:
    """Open :func:`seal`'s output with the recipient's X25519 private key object."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    if len(sealed) < 32 + 12 + 16:
        raise CeremonyError("sealed share is truncated")
    eph_pub, nonce, body = sealed[:32], sealed[32:44], sealed[44:]
    mine = recipient_private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    shared = recipient_private.exchange(X25519PublicKey.from_public_bytes(eph_pub))
    try:
        return AESGCM(_derive(shared, eph_pub, mine, aad)).decrypt(nonce, body, aad)
    except InvalidTag:
        raise CeremonyError("sealed share does not open: not for this key, or altered, or another context") from None
