"""The threshold ceremony and committee through the object store: the steps the workers run.

The broker carries notifications; what the parties exchange lives in the bucket, every
object beside a ``.sig`` record signed by its writer's identity (``cxr_mq.identity``) that
names the object's key and sha256. A reader checks the record (registry, role, signature)
and the hash before using an object. Secrets only ever appear sealed to their recipient's
X25519 identity key. Layout::

    keys/ceremony/<id>/params                          the key authority (role controller)
    keys/ceremony/<id>/shares/<dealer>/<recipient>     sealed share (dealer)
    keys/ceremony/<id>/contributions/<party>           public contribution (party); written
                                                       last, so its presence means "dealt"
    keys/ceremony/<id>/public                          the threshold public context
    keys/ceremony/<id>/received/<party>                the party holds its committee share
    rounds/<r>/keys/<hospital>                         key ciphertext (hospital, round_key record)
    rounds/<r>/committee/ready/<hospital>              a live member offers to decrypt
    rounds/<r>/committee/active                        the active set: written once (If-None-Match)
    rounds/<r>/committee/partials/<member>             the member's partial, sealed to every hospital

Ceremony: :func:`open_ceremony` (key authority), :func:`deal` (each hospital),
:func:`finalize_ceremony` (key authority, once every party dealt), :func:`receive` (each
hospital). Round: :func:`upload_round_key` (each contributor), :func:`volunteer` (each live
member after ``model_ready``), :func:`choose_active` (any member; the first write wins),
:func:`answer` (each active member), :func:`collect` (every hospital).
"""

from __future__ import annotations

import hashlib
import io
import json
import time

import msgpack

from .crypto import ceremony, committee
from .crypto.ceremony import CeremonyParams, CommitteeShare
from .crypto.committee import DecryptionRequest, KeyUpload, Ledger
from .crypto.keylayer import KeyCiphertext
from .crypto.threshold import ThresholdCodec
from .storage.base import ObjectNotFound, ObjectStore, PreconditionFailed

CEREMONY_PREFIX = "keys/ceremony/"


class FlowError(Exception):
    """A missing, unsigned, altered or inconsistent object; ``str(error)`` says which."""


class CeremonyIncomplete(FlowError):
    """Some hospitals did not take their step of the ceremony in time; ``missing`` names them."""

    def __init__(self, message: str, missing):
        super().__init__(message)
        self.missing = tuple(missing)


class RoundUndecryptable(FlowError):
    """Fewer than t committee members were alive (or answered) by the committee deadline."""


def ceremony_key(ceremony_id: str, *parts: str) -> str:
    return CEREMONY_PREFIX + "/".join((ceremony_id, *parts))


def committee_key(round_no: int, *parts: str) -> str:
    return "/".join((f"rounds/{int(round_no)}/committee", *parts))


def round_key_object(round_no: int, hospital: str) -> str:
    return f"rounds/{int(round_no)}/keys/{hospital}"


# --------------------------------------------------------------------------- signed objects


def put_signed(store: ObjectStore, key: str, data: bytes, me, *, if_none_match: bool = False, **fields) -> None:
    """Write ``data`` at ``key`` and its signed record at ``key.sig``; a reader uses an object
    only once the record names its hash. With ``if_none_match`` the object is created only if
    absent (``PreconditionFailed`` otherwise) and the record follows it."""
    from .identity import sign

    record = sign({"schema": "threshold_object", "version": 1, "key": key,
                   "sha256": hashlib.sha256(data).hexdigest(), "signed_at": time.time(), **fields}, me)
    record_bytes = json.dumps(record, sort_keys=True).encode()
    if if_none_match:  # the object decides who won; only the winner then writes its record
        store.put_bytes(key, data, if_none_match=True)
        store.put_bytes(key + ".sig", record_bytes)
        return
    store.put_bytes(key + ".sig", record_bytes)
    store.put_bytes(key, data)


def get_signed(store: ObjectStore, key: str, registry, *, role: str, signer: str | None = None) -> tuple[bytes, dict]:
    """The object at ``key`` after checking its record: signed by ``signer`` (if given) of
    ``role``, naming this key and this content's sha256."""
    from .identity import IdentityError, Verifier

    try:
        record = json.loads(store.get_bytes(key + ".sig"))
        data = store.get_bytes(key)
    except ObjectNotFound:
        raise
    except ValueError as exc:
        raise FlowError(f"{key}: unreadable signature record ({exc})") from None
    try:
        Verifier(registry, check_broker_user=False, max_age=float("inf")).verify(
            record, role=role, time_field="signed_at")
    except IdentityError as exc:
        raise FlowError(f"{key}: {exc}") from None
    if signer is not None and record.get("signer") != signer:
        raise FlowError(f"{key}: signed by {record.get('signer')!r}, expected {signer!r}")
    if record.get("key") != key or record.get("sha256") != hashlib.sha256(data).hexdigest():
        raise FlowError(f"{key}: the object is not the one its signed record names")
    return data, record


# --------------------------------------------------------------------------- ceremony


def open_ceremony(store: ObjectStore, params: CeremonyParams, authority) -> None:
    put_signed(store, ceremony_key(params.ceremony_id, "params"),
               json.dumps(params.to_dict(), sort_keys=True).encode(), authority, if_none_match=True)


def read_ceremony(store: ObjectStore, ceremony_id: str, registry) -> CeremonyParams:
    data, _ = get_signed(store, ceremony_key(ceremony_id, "params"), registry, role="controller")
    params = CeremonyParams.from_dict(json.loads(data))
    if params.ceremony_id != ceremony_id:
        raise FlowError(f"ceremony {ceremony_id}: its parameters name ceremony {params.ceremony_id!r}")
    return params


def deal(store: ObjectStore, ceremony_id: str, me, registry) -> bool:
    """Step 1 for hospital ``me``: shares sealed to every party, then the contribution. Does
    nothing (returns False) if this party's contribution is already there: a redelivered
    request must not deal a second, different secret."""
    params = read_ceremony(store, ceremony_id, registry)
    contribution_key = ceremony_key(ceremony_id, "contributions", me.id)
    if store.exists(contribution_key):
        return False
    contribution, shares = ceremony.generate_share(params, me.id)
    for recipient, share in shares.items():
        sealed = ceremony.seal(registry.get(recipient).x25519, share.to_bytes(), share.aad())
        put_signed(store, ceremony_key(ceremony_id, "shares", me.id, recipient), sealed, me)
    put_signed(store, contribution_key, contribution.to_bytes(), me)
    return True


def dealt(store: ObjectStore, ceremony_id: str, params: CeremonyParams) -> list[str]:
    return [p for p in params.parties if store.exists(ceremony_key(ceremony_id, "contributions", p))]


def finalize_ceremony(store: ObjectStore, ceremony_id: str, registry, authority) -> ThresholdCodec:
    """The key authority's step once every party dealt: the public context, stored."""
    params = read_ceremony(store, ceremony_id, registry)
    contributions = []
    for party in params.parties:
        data, _ = get_signed(store, ceremony_key(ceremony_id, "contributions", party), registry,
                             role="hospital", signer=party)
        contributions.append(ceremony.PublicContribution.from_bytes(data))
    public_key = ceremony.finalize(params, contributions)
    codec = ThresholdCodec(public_key, federation=params.federation, parties=params.parties,
                           threshold=params.threshold, ceremony_id=params.ceremony_id)
    put_signed(store, ceremony_key(ceremony_id, "public"), codec.public_bytes(), authority)
    return codec


def ceremony_context(store: ObjectStore, ceremony_id: str, registry, public_sha256: str | None = None) -> ThresholdCodec:
    """The ceremony's public context (signed by the key authority; with ``public_sha256``,
    also the one its ``ceremony_finalize`` announced)."""
    from .crypto import load_context

    public, _ = get_signed(store, ceremony_key(ceremony_id, "public"), registry, role="controller")
    if public_sha256 is not None and hashlib.sha256(public).hexdigest() != public_sha256:
        raise FlowError(f"ceremony {ceremony_id}: the stored public key is not the one announced")
    return load_context(public)


def receive(store: ObjectStore, ceremony_id: str, me, registry) -> CommitteeShare:
    """Step 2 for hospital ``me``: its committee share, from every dealer's sealed share."""
    params = read_ceremony(store, ceremony_id, registry)
    codec = ceremony_context(store, ceremony_id, registry)
    received = []
    for dealer in params.parties:
        sealed, _ = get_signed(store, ceremony_key(ceremony_id, "shares", dealer, me.id), registry,
                               role="hospital", signer=dealer)
        share = ceremony.DealtShare.from_bytes(ceremony.unseal(
            me.agreement_key, sealed, ceremony.share_aad(ceremony_id, dealer, me.id)))
        received.append(share)
    return ceremony.aggregate_shares(params, me.id, received, codec.committee_key)


def run_ceremony(store: ObjectStore, broker, params: CeremonyParams, authority, registry, *,
                 timeout: float = 300.0, poll: float = 0.5, log=lambda *_: None) -> ThresholdCodec:
    """The key authority's whole ceremony through the running hospital workers: store the
    signed parameters, publish ``ceremony_start``, wait until every hospital dealt, store the
    public context, publish ``ceremony_finalize``, wait until every hospital holds its share."""
    from . import messages
    from .identity import sign

    def announce(kind: str, **fields) -> None:
        message = sign(messages.make(kind, ceremony_id=params.ceremony_id, issued_at=time.time(), **fields), authority)
        broker.publish(kind, messages.encode(message), message_id=f"{kind}:{params.ceremony_id}")

    def wait(what: str, done) -> None:
        deadline = time.monotonic() + timeout
        while True:
            have = done()
            if len(have) == len(params.parties):
                return
            if time.monotonic() > deadline:
                missing = sorted(set(params.parties) - set(have))
                raise CeremonyIncomplete(
                    f"ceremony {params.ceremony_id}: no {what} from hospital(s) {', '.join(missing)} within "
                    f"{timeout:.0f}s ({len(have)} of {len(params.parties)} answered: their hospital workers "
                    "are not running, or not on this broker namespace and bucket)", missing)
            time.sleep(poll)

    open_ceremony(store, params, authority)
    announce("ceremony_start")
    log(f"ceremony {params.ceremony_id}: waiting for {len(params.parties)} hospitals to deal")
    wait("shares", lambda: dealt(store, params.ceremony_id, params))
    codec = finalize_ceremony(store, params.ceremony_id, registry, authority)
    announce("ceremony_finalize", public_sha256=hashlib.sha256(codec.public_bytes()).hexdigest())
    log(f"ceremony {params.ceremony_id}: public key {codec.fingerprint[:16]}, waiting for the shares to be kept")
    wait("receipt", lambda: received(store, params.ceremony_id, params))
    return codec


def acknowledge(store: ObjectStore, ceremony_id: str, me) -> None:
    put_signed(store, ceremony_key(ceremony_id, "received", me.id), b"received", me)


def received(store: ObjectStore, ceremony_id: str, params: CeremonyParams) -> list[str]:
    return [p for p in params.parties if store.exists(ceremony_key(ceremony_id, "received", p))]


def share_path(work_dir, ceremony_id: str):
    from pathlib import Path

    return Path(work_dir) / f"committee-{ceremony_id}.share"


def save_share(share: CommitteeShare, path) -> None:
    """The committee share, mode 0600, replaced atomically."""
    import os
    from pathlib import Path

    path = Path(path)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(share.to_bytes())
    os.replace(tmp, path)


def load_share(work_dir, codec: ThresholdCodec) -> CommitteeShare:
    """This hospital's committee share for ``codec`` (the public context names its ceremony)."""
    path = share_path(work_dir, codec.ceremony_id)
    try:
        share = CommitteeShare.from_bytes(path.read_bytes())
    except OSError as exc:
        raise FlowError(f"{path}: no committee share for ceremony {codec.ceremony_id!r} ({exc.strerror}); "
                        "was this hospital running during 'cxr-mq keys init --threshold'?") from None
    if share.committee != codec.committee_key.fingerprint():
        raise FlowError(f"{path}: the committee share belongs to another collective key")
    return share


def encrypt_and_upload(store: ObjectStore, codec: ThresholdCodec, weights, n_samples: int, out, encoding, me) -> None:
    """A hospital's upload under the threshold profile: the stream to ``out`` (the caller
    stores it as today) and the round's key ciphertext with its signed message."""
    key_ct = codec.encrypt_update(weights, n_samples, out, encoding=encoding, hospital=me.id)
    upload_round_key(store, encoding.federation, encoding.round, me, key_ct)


def on_ceremony_start(store: ObjectStore, message: dict, me, registry) -> str:
    """A hospital worker's handler body: deal (once). Returns what it did, for the log."""
    params = read_ceremony(store, message["ceremony_id"], registry)
    if me.id not in params.parties:
        return "not a party"
    return "dealt" if deal(store, params.ceremony_id, me, registry) else "already dealt"


def on_ceremony_finalize(store: ObjectStore, message: dict, me, registry, work_dir, previous=None) -> str:
    """A hospital worker's handler body: collect the committee share, keep it, retire the
    shares of earlier ceremonies (deleted: see docs/security.md), hand the model it holds
    over to the parties that were not in its ``previous`` threshold context (a committee
    change), acknowledge. Returns what it did, for the log."""
    ceremony_id = message["ceremony_id"]
    params = read_ceremony(store, ceremony_id, registry)
    if me.id not in params.parties:
        return "not a party"
    ceremony_context(store, ceremony_id, registry, message["public_sha256"])
    save_share(receive(store, ceremony_id, me, registry), share_path(work_dir, ceremony_id))
    retired = retire_shares(work_dir, keep=ceremony_id)
    newcomers = sorted(set(params.parties) - set(getattr(previous, "parties", None) or params.parties) - {me.id})
    handed = hand_over(store, params, me, registry, work_dir, newcomers) if newcomers else []
    acknowledge(store, ceremony_id, me)
    return "share kept" + (f"; retired {', '.join(retired)}" if retired else "") + (
        f"; model handed over to {', '.join(handed)}" if handed else "")


def retire_shares(work_dir, keep: str) -> list[str]:
    """Delete this hospital's committee shares of every ceremony but ``keep``: an old share
    decrypts nothing of the new rounds, and deleted it cannot leak the old rounds' key sums."""
    from pathlib import Path

    keep_path = share_path(work_dir, keep)
    retired = []
    for path in sorted(Path(work_dir).glob("committee-*.share")):
        if path != keep_path:
            path.unlink(missing_ok=True)
            retired.append(path.name[len("committee-"):-len(".share")])
    return retired


def handover_aad(ceremony_id: str, sender: str, recipient: str) -> bytes:
    return f"cxr-mq/handover/v1\0{ceremony_id}\0{sender}\0{recipient}".encode()


def hand_over(store: ObjectStore, params: CeremonyParams, me, registry, work_dir, recipients) -> list[str]:
    """Seal the global model this hospital holds (``global.npy`` and its record) to each
    hospital joining the committee: the next round starts from it, and the newcomer holds no
    share of the committee that decrypted it. None held yet: nothing to hand over."""
    from pathlib import Path

    from .evaluation import MODEL_FILE, RECORD_FILE, STATE_FILE
    from .strategies import ServerState

    try:
        record = json.loads((Path(work_dir) / RECORD_FILE).read_text())
        model = (Path(work_dir) / MODEL_FILE).read_bytes()
    except FileNotFoundError:
        return []
    state = ServerState.load(Path(work_dir) / STATE_FILE)
    shared = None
    if state is not None and state.applied == record.get("aggregate_sha256"):
        out = io.BytesIO()
        state.shared().write(out)  # the server step's moments / control, not this hospital's own
        shared = out.getvalue()
    body = msgpack.packb({"record": record, "model": model, "state": shared}, use_bin_type=True)
    for recipient in recipients:
        sealed = ceremony.seal(registry.get(recipient).x25519, body,
                               handover_aad(params.ceremony_id, me.id, recipient))
        put_signed(store, ceremony_key(params.ceremony_id, "handover", me.id, recipient), sealed, me)
    return list(recipients)


def take_over(store: ObjectStore, ceremony_id: str, me, registry, aggregate_sha256: str):
    """The global model of the round whose aggregate is ``aggregate_sha256`` and the
    strategy's shared server state (``strategies.ServerState`` or None), from the handovers
    sealed to ``me`` in ceremony ``ceremony_id``; None if there is none. Each handover must
    be signed by a hospital that is a party of the ceremony; handovers that disagree (model
    or state) are refused."""
    import numpy as np

    from .strategies import ServerState, model_sha256

    params = read_ceremony(store, ceremony_id, registry)
    found = {}
    for sender in params.parties:
        if sender == me.id:
            continue
        try:
            sealed, _ = get_signed(store, ceremony_key(ceremony_id, "handover", sender, me.id), registry,
                                   role="hospital", signer=sender)
        except ObjectNotFound:
            continue
        body = msgpack.unpackb(ceremony.unseal(me.agreement_key, sealed, handover_aad(ceremony_id, sender, me.id)),
                               raw=False)
        record = body["record"]
        if record.get("aggregate_sha256") != aggregate_sha256:
            continue
        weights = np.load(io.BytesIO(body["model"]), allow_pickle=False).astype(np.float32)
        state = ServerState.read(io.BytesIO(body["state"])) if body.get("state") else None
        if model_sha256(weights) != record.get("model_sha256") or (
                state is not None and (state.applied != aggregate_sha256 or not np.array_equal(state.model, weights))):
            raise FlowError(f"ceremony {ceremony_id}: {sender}'s handover does not match its own record")
        found[sender] = (weights, state, hashlib.sha256(body["model"] + (body.get("state") or b"")).hexdigest())
    if not found:
        return None
    if len({digest for _, _, digest in found.values()}) > 1:
        raise FlowError(f"ceremony {ceremony_id}: the handed-over models of aggregate {aggregate_sha256[:16]}… "
                        f"disagree ({', '.join(sorted(found))})")
    weights, state, _ = next(iter(found.values()))
    return weights, state


# --------------------------------------------------------------------------- rounds


def upload_round_key(store: ObjectStore, federation: str, round_no: int, me, key_ct: KeyCiphertext) -> None:
    from .identity import sign

    blob = key_ct.to_bytes()
    key = round_key_object(round_no, me.id)
    message = sign(committee.round_key_message(federation, round_no, me.id, blob, time.time()), me)
    store.put_bytes(key + ".sig", json.dumps(message, sort_keys=True).encode())
    store.put_bytes(key, blob)


def volunteer(store: ObjectStore, round_no: int, me) -> None:
    put_signed(store, committee_key(round_no, "ready", me.id), b"ready", me)


def choose_active(store: ObjectStore, round_no: int, share: CommitteeShare, registry, me) -> tuple[str, ...] | None:
    """The round's active set: the first t members (sorted) with a valid ready record, written
    once; whoever writes first decides and everyone reads the same. None while fewer than t
    members are ready."""
    key = committee_key(round_no, "active")
    try:
        data, _ = get_signed(store, key, registry, role="hospital")
        return tuple(json.loads(data))
    except ObjectNotFound:
        if store.exists(key):
            return None  # decided, its record on the way
    except FlowError:
        return None  # decided, the record not yet matching: ask again
    ready = []
    for member in share.params.parties:
        try:
            get_signed(store, committee_key(round_no, "ready", member), registry, role="hospital", signer=member)
            ready.append(member)
        except (ObjectNotFound, FlowError):
            continue
    if len(ready) < share.params.threshold:
        return None
    active = tuple(sorted(ready)[: share.params.threshold])
    try:
        put_signed(store, key, json.dumps(list(active)).encode(), me, if_none_match=True)
    except PreconditionFailed:
        pass  # another member decided first: read its choice
    try:
        data, _ = get_signed(store, key, registry, role="hospital")
    except (ObjectNotFound, FlowError):
        return None  # the winner's record is not there yet: ask again
    return tuple(json.loads(data))


def build_request(store: ObjectStore, codec: ThresholdCodec, round_no: int, contributors, aggregate: bytes,
                  active) -> DecryptionRequest:
    """A decryption request from the store: the aggregate's key sum and each contributor's
    key upload with its signed message (checked by the committee, not here)."""
    uploads = []
    for hospital in sorted(contributors):
        key = round_key_object(round_no, hospital)
        uploads.append(KeyUpload(hospital, store.get_bytes(key), json.loads(store.get_bytes(key + ".sig"))))
    return DecryptionRequest(codec.federation, int(round_no), tuple(sorted(contributors)),
                             codec.key_sum_of(io.BytesIO(aggregate)), tuple(uploads), tuple(active))


def answer(store: ObjectStore, request: DecryptionRequest, share: CommitteeShare, me, registry, ledger: Ledger,
           min_clients: int) -> None:
    """An active member's part: the checked partial decryption, sealed to every party."""
    partial = committee.partial_decrypt(share, request, min_clients=min_clients,
                                        verify=committee.signed_upload_verifier(registry, max_age=float("inf")),
                                        ledger=ledger)
    recipients = {p: registry.get(p).x25519 for p in share.params.parties}
    sealed = committee.seal_partial(partial, recipients)
    put_signed(store, committee_key(request.round, "partials", me.id), msgpack.packb(sealed, use_bin_type=True), me)


def collect(store: ObjectStore, request: DecryptionRequest, me, registry):
    """The round key sum for hospital ``me`` once every active member answered, else None."""
    partials = []
    for member in request.active:
        try:
            data, _ = get_signed(store, committee_key(request.round, "partials", member), registry,
                                 role="hospital", signer=member)
        except ObjectNotFound:
            return None
        sealed = msgpack.unpackb(data, raw=False)
        if me.id not in sealed:
            raise FlowError(f"round {request.round}: {member}'s partial is not sealed to {me.id}")
        partials.append(committee.open_partial(sealed[me.id], me.id, me.agreement_key, party=member, request=request))
    return committee.combine(request, partials)




def _waits(first: float, most: float):
    """Poll intervals: ``first``, doubling up to ``most``. The committee's members reach each
    step within a fraction of a second of each other, so the first looks come soon; a member
    that is late (or dead) is then looked for at most every ``most`` seconds."""
    wait = min(first, most)
    while True:
        yield wait
        wait = min(wait * 2, most)


def decrypt_round(store: ObjectStore, codec: ThresholdCodec, share: CommitteeShare, round_no: int, contributors,
                  aggregate: bytes, me, registry, ledger: Ledger, *, min_clients: int, deadline: float,
                  poll: float = 0.5, first_poll: float = 0.05, sleep=time.sleep, clock=time.time):
    """What a hospital does after ``model_ready`` under the threshold profile: offer to
    decrypt, learn the active set, answer if in it, collect the partials sealed to it and
    decrypt the aggregate. Returns (FedAvg weights, total samples); raises
    :class:`RoundUndecryptable` with the reason if the committee cannot finish by ``deadline``
    (unix time), and ``CommitteeRefusal`` if this member refuses the request. Each wait polls
    the store after ``first_poll`` seconds, then twice as long each time up to ``poll``."""
    volunteer(store, round_no, me)
    active = None
    waits = _waits(first_poll, poll)
    while active is None:
        active = choose_active(store, round_no, share, registry, me)
        if active is None:
            if clock() > deadline:
                ready = [p for p in share.params.parties if store.exists(committee_key(round_no, "ready", p))]
                raise RoundUndecryptable(
                    f"round {round_no}: only {len(ready)} of the {share.params.threshold} committee members needed "
                    f"were alive by the deadline ({', '.join(ready) or 'none'})")
            sleep(next(waits))
    request = build_request(store, codec, round_no, contributors, aggregate, active)
    if me.id in active:
        answer(store, request, share, me, registry, ledger, min_clients)
    problem = None
    waits = _waits(first_poll, poll)
    while True:
        try:
            key_sum = collect(store, request, me, registry)
        except FlowError as exc:  # e.g. a partial read between its record and its bytes: retry
            key_sum, problem = None, exc
        if key_sum is not None:
            return codec.decrypt_aggregate(io.BytesIO(aggregate), key_sum, n_updates=len(request.contributors),
                                           min_updates=min_clients)
        if clock() > deadline:
            missing = [m for m in active if not store.exists(committee_key(round_no, "partials", m))]
            raise RoundUndecryptable(
                f"round {round_no}: " + (f"active member(s) {', '.join(missing)} did not answer by the deadline"
                                         if missing else f"the partials do not check out ({problem})")
                + "; a member answers once per round, so the round stays undecryptable")
        sleep(next(waits))


def round_encoding(codec: ThresholdCodec, round_start: dict):
    """The round's encoding from its (signed) ``round_start``: at most ``max_contributors``
    (else ``quorum``) contributors."""
    from .crypto.threshold import RoundEncoding

    fields = round_start.get("encoding")
    if not fields:
        raise FlowError(f"round {round_start['round']}: round_start carries no threshold encoding")
    most = round_start.get("max_contributors") or round_start["quorum"]
    return RoundEncoding(codec.federation, int(round_start["round"]), int(most),
                         int(fields["max_samples"]), float(fields["weight_bound"]))


def record_outcome(store: ObjectStore, round_no: int, me, reason: str | None) -> None:
    """What this hospital's committee part came to (``status`` and ``start-round --wait``
    read it): decrypted, or the reason the round is undecryptable."""
    body = json.dumps({"round": int(round_no), "hospital": me.id, "decrypted": reason is None,
                       "reason": reason}).encode()
    put_signed(store, committee_key(round_no, "outcome", me.id), body, me)


def outcomes(store: ObjectStore, round_no: int) -> dict[str, dict]:
    """Each hospital's recorded committee outcome of a round (unchecked: for display)."""
    prefix = committee_key(round_no, "outcome") + "/"
    found = {}
    for key in store.list(prefix):
        if key.endswith(".sig"):
            continue
        try:
            entry = json.loads(store.get_bytes(key))
            found[str(entry["hospital"])] = entry
        except (ObjectNotFound, ValueError, KeyError, TypeError):
            continue
    return found
