"""The committee: t hospitals decrypt the sum of a round's key ciphertexts, once, after checks.

Two steps (after Lattigo's ``multiparty`` threshold combiner and key switching):

- :func:`partial_decrypt` - member j, in an active set S of exactly t members, turns its
  Shamir share into an additive one (``lambda_j^S sigma_j``, Lagrange at 0 modulo Q) and
  returns ``h_j = lambda_j^S sigma_j c1 + E_j`` with ``E_j`` uniform in [-2^68, 2^68)
  (os.urandom): the smudging that hides the exact noise (at most ~2^24 per summed key
  ciphertext; statistical distance below N * 2^24 * K / 2^68 ~ 2^-28 for K = 16), so nothing
  about sigma_j leaks.
  Before that it checks the request and refuses, with a reason, anything else:

  * a contributor set below ``min_clients`` (never below :data:`MIN_CLIENTS_FLOOR`);
  * a key upload missing for a contributor, or one for a non-contributor;
  * a key upload whose signature does not verify, or bound to another federation, round,
    committee or hospital;
  * a key sum that is not exactly the sum of those uploads;
  * a second, different decryption in the same round (its ledger; a redelivered identical
    request gets the stored answer back, nothing new).

- :func:`combine` - ``c0 + sum h_j = D s_S + noise``; rounding by D gives ``s_S``, the
  integer polynomial sum of the round keys, or an error if the noise is not far below D
  (fewer than t, or wrong, partials).

With t > n/2 (the default the ceremony asks for), two disjoint active sets cannot both
exist, so a member in their intersection refuses whichever request comes second even if an
aggregator tried to show different key sums to different members.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import msgpack
import numpy as np

from . import keylayer
from .ceremony import CommitteeShare
from .keylayer import KeyCiphertext, KeyLayerError

MIN_CLIENTS_FLOOR = 3


class CommitteeRefusal(Exception):
    """A member refuses to take part in a decryption; ``str(refusal)`` is the reason."""


@dataclass(frozen=True)
class KeyUpload:
    """One hospital's key ciphertext of the round as uploaded, and its signed message."""

    hospital: str
    blob: bytes
    signed: dict = field(default_factory=dict)  # verified by the request's verifier


@dataclass(frozen=True)
class DecryptionRequest:
    federation: str
    round: int
    contributors: tuple[str, ...]  # the round's accepted contributors, sorted
    key_sum: KeyCiphertext  # read from the aggregate
    uploads: tuple[KeyUpload, ...]
    active: tuple[str, ...]  # the t members whose partials will be combined, sorted

    def digest(self) -> str:
        """What the ledger records: the round, the key sum and the active set."""
        h = hashlib.sha256(b"cxr-mq/threshold/decryption-request/v1\0")
        h.update(json.dumps([self.federation, self.round, list(self.contributors), list(self.active)]).encode())
        h.update(self.key_sum.to_bytes())
        return h.hexdigest()


@dataclass(frozen=True)
class PartialDecryption:
    party: str
    federation: str
    round: int
    request: str  # DecryptionRequest.digest()
    h: np.ndarray = None  # NTT form, (L, N)

    def __repr__(self) -> str:
        return f"<PartialDecryption {self.party} {self.federation}/round {self.round}>"

    def to_bytes(self) -> bytes:
        return msgpack.packb({"party": self.party, "federation": self.federation, "round": self.round,
                              "request": self.request, "h": np.ascontiguousarray(self.h, dtype="<u4").tobytes()},
                             use_bin_type=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> "PartialDecryption":
        try:
            fields = msgpack.unpackb(bytes(data), raw=False)
            ring = keylayer.key_ring()
            h = keylayer._unpack_residues(bytes(fields["h"]), (len(ring.primes), ring.n), "partial decryption")
            return cls(str(fields["party"]), str(fields["federation"]), int(fields["round"]), str(fields["request"]), h)
        except KeyLayerError:
            raise
        except Exception as exc:
            raise KeyLayerError(f"unreadable partial decryption: {exc}") from None


def partial_aad(partial: "PartialDecryption", recipient: str) -> bytes:
    return f"cxr-mq/threshold/partial/{partial.federation}/{partial.round}/{partial.party}/{recipient}/{partial.request}".encode()


def seal_partial(partial: PartialDecryption, recipients: dict[str, bytes]) -> dict[str, bytes]:
    """The partial sealed to each hospital's X25519 identity key: t partials in the clear
    would let anyone (the aggregator, a bucket reader) combine s_S and read the model."""
    from .ceremony import seal

    data = partial.to_bytes()
    return {who: seal(key, data, partial_aad(partial, who)) for who, key in sorted(recipients.items())}


def open_partial(sealed: bytes, me: str, agreement_key, *, party: str, request: DecryptionRequest) -> PartialDecryption:
    """Open a partial sealed to ``me`` by ``party`` for ``request``; anything else is refused."""
    from .ceremony import unseal

    expected = PartialDecryption(party, request.federation, request.round, request.digest())
    partial = PartialDecryption.from_bytes(unseal(agreement_key, sealed, partial_aad(expected, me)))
    if (partial.party, partial.federation, partial.round, partial.request) != (
            party, request.federation, request.round, expected.request):
        raise KeyLayerError(f"a sealed partial from {party!r} answers another request")
    return partial


class Ledger:
    """A member's durable record of the rounds it decrypted (one file per round, created
    exclusively): the request digest and the partial it answered with."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, federation: str, round_no: int) -> Path:
        name = hashlib.sha256(federation.encode()).hexdigest()[:16]
        return self.dir / f"{name}-round-{int(round_no)}.partial"

    def previous(self, federation: str, round_no: int) -> PartialDecryption | None:
        path = self._path(federation, round_no)
        if not path.exists():
            return None
        return PartialDecryption.from_bytes(path.read_bytes())

    def record(self, partial: PartialDecryption) -> None:
        path = self._path(partial.federation, partial.round)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # one per round, ever
        with os.fdopen(fd, "wb") as fh:
            fh.write(partial.to_bytes())
            fh.flush()
            os.fsync(fh.fileno())


def round_key_message(federation: str, round_no: int, hospital: str, blob: bytes, sent_at: float) -> dict:
    """The message a hospital signs for its key upload (``cxr_mq.identity.sign``)."""
    return {"schema": "round_key", "version": 1, "federation": federation, "round": int(round_no),
            "hospital": hospital, "sha256": hashlib.sha256(blob).hexdigest(), "sent_at": float(sent_at)}


def signed_upload_verifier(registry, **policy) -> Callable[[KeyUpload], None]:
    """A ``verify`` for :func:`partial_decrypt`: the upload's message is signed by the hospital
    it names (registered, role hospital) and names this blob's sha256."""
    from cxr_mq import identity

    checker = identity.Verifier(registry, check_broker_user=False, **policy)

    def verify(upload: KeyUpload) -> None:
        signed = upload.signed
        checker.verify(signed, role="hospital", time_field="sent_at")
        if signed.get("signer") != upload.hospital or signed.get("hospital") != upload.hospital:
            raise CommitteeRefusal(f"key upload of {upload.hospital!r} is signed by {signed.get('signer')!r}")
        if signed.get("sha256") != hashlib.sha256(upload.blob).hexdigest():
            raise CommitteeRefusal(f"key upload of {upload.hospital!r} is not the object its signed message names")

    return verify


def lagrange_at_zero(points: list[int], me: int, modulus: int) -> int:
    """lambda_me = prod_{m != me} x_m / (x_m - x_me) modulo ``modulus`` (points distinct)."""
    num, den = 1, 1
    for x in points:
        if x != me:
            num = num * x % modulus
            den = den * (x - me) % modulus
    return num * pow(den, -1, modulus) % modulus


def check_request(share: CommitteeShare, request: DecryptionRequest, *, min_clients: int,
                  verify: Callable[[KeyUpload], None]) -> None:
    """Every check of a decryption request; raises :class:`CommitteeRefusal` with the reason."""
    params = share.params
    where = f"{request.federation}/round {request.round}"
    if request.federation != params.federation:
        raise CommitteeRefusal(f"{where}: this member serves federation {params.federation!r}")
    if min_clients < MIN_CLIENTS_FLOOR:
        raise CommitteeRefusal(f"{where}: min_clients {min_clients} is below the floor {MIN_CLIENTS_FLOOR}")
    contributors = list(request.contributors)
    if contributors != sorted(set(contributors)):
        raise CommitteeRefusal(f"{where}: contributors must be sorted and distinct")
    if len(contributors) < min_clients:
        raise CommitteeRefusal(f"{where}: {len(contributors)} contributors, fewer than min_clients {min_clients}: "
                               "an aggregate that small would reveal them")
    active = list(request.active)
    if active != sorted(set(active)) or len(active) != params.threshold or not set(active) <= set(params.parties):
        raise CommitteeRefusal(f"{where}: the active set {active} is not {params.threshold} distinct committee members")
    if share.party not in active:
        raise CommitteeRefusal(f"{where}: {share.party!r} is not in the active set")
    uploaded = [u.hospital for u in request.uploads]
    if len(uploaded) != len(set(uploaded)):
        raise CommitteeRefusal(f"{where}: two key uploads from one hospital")
    left_out = sorted(set(contributors) - set(uploaded))
    added = sorted(set(uploaded) - set(contributors))
    if left_out or added:
        raise CommitteeRefusal(f"{where}: key uploads do not match the contributors "
                               f"(missing {left_out or 'none'}, not contributors {added or 'none'})")
    keys = []
    for upload in request.uploads:
        try:
            verify(upload)
            item = KeyCiphertext.from_bytes(upload.blob)
        except CommitteeRefusal:
            raise
        except Exception as exc:  # IdentityError, KeyLayerError: both mean "not this hospital's key"
            raise CommitteeRefusal(f"{where}: key upload of {upload.hospital!r} refused: {exc}") from None
        if upload.signed and (upload.signed.get("round"), upload.signed.get("federation")) != (request.round, params.federation):
            raise CommitteeRefusal(f"{where}: the signed key message of {upload.hospital!r} names "
                                   f"{upload.signed.get('federation')}/round {upload.signed.get('round')}")
        if (item.federation, item.round, item.committee, item.contributors) != (
                params.federation, request.round, share.committee, (upload.hospital,)):
            raise CommitteeRefusal(f"{where}: key upload of {upload.hospital!r} is bound to "
                                   f"{item.federation}/round {item.round}, {list(item.contributors)}, "
                                   f"committee {item.committee[:16]}")
        keys.append(item)
    try:
        expected = keylayer.sum_key_ciphertexts(keys)
    except KeyLayerError as exc:
        raise CommitteeRefusal(f"{where}: {exc}") from None
    claimed = request.key_sum
    if (claimed.federation, claimed.round, claimed.committee) != (params.federation, request.round, share.committee):
        raise CommitteeRefusal(f"{where}: the key sum is bound to {claimed.federation}/round {claimed.round}")
    if claimed.contributors != expected.contributors or not np.array_equal(claimed.c, expected.c):
        raise CommitteeRefusal(f"{where}: the key sum is not the sum of the contributors' signed key uploads")


def partial_decrypt(share: CommitteeShare, request: DecryptionRequest, *, min_clients: int,
                    verify: Callable[[KeyUpload], None], ledger: Ledger) -> PartialDecryption:
    """Member ``share.party``'s partial decryption of the request's key sum, after the checks."""
    check_request(share, request, min_clients=min_clients, verify=verify)
    digest = request.digest()
    previous = ledger.previous(request.federation, request.round)
    if previous is not None:
        if previous.request == digest:
            return previous  # the same request redelivered: the same answer, nothing new
        raise CommitteeRefusal(f"{request.federation}/round {request.round}: {share.party!r} already took part "
                               "in a decryption of this round; a second one could reveal a hospital")
    ring = keylayer.key_ring()
    params = share.params
    points = [params.point(p) for p in request.active]
    lam = lagrange_at_zero(points, params.point(share.party), ring.modulus)
    additive = ring.scalar(share.sigma, lam)
    smudge = ring.wide_uniform(keylayer.SMUDGING_BITS)  # coefficient form
    h = ring.add(ring.mul(additive, request.key_sum.c[:, 1]), ring.forward(smudge))
    partial = PartialDecryption(share.party, request.federation, request.round, digest, h)
    try:
        ledger.record(partial)
    except FileExistsError:  # another delivery of a request for this round won the race
        raise CommitteeRefusal(f"{request.federation}/round {request.round}: already decrypted by {share.party!r}") from None
    return partial


def combine(request: DecryptionRequest, partials: list[PartialDecryption]) -> np.ndarray:
    """The round key sum ``s_S`` (int64, N coefficients in [-K, K]) from the active set's
    partials; raises :class:`KeyLayerError` if they are not exactly the active set's, or do
    not decrypt."""
    digest = request.digest()
    by_party = {}
    for partial in partials:
        if partial.request != digest or (partial.federation, partial.round) != (request.federation, request.round):
            raise KeyLayerError(f"a partial decryption from {partial.party!r} answers another request")
        if partial.party in by_party:
            raise KeyLayerError(f"two partial decryptions from {partial.party!r}")
        by_party[partial.party] = partial
    if sorted(by_party) != list(request.active):
        raise KeyLayerError(f"partials from {sorted(by_party)}, the active set is {list(request.active)}")
    ring = keylayer.key_ring()
    plain = request.key_sum.c[:, 0]
    for party in request.active:
        plain = ring.add(plain, by_party[party].h)
    return keylayer.decode_key_sum(plain, max_abs=len(request.key_sum.contributors))
