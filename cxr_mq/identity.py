"""Party identities, the registry in the bucket, and signed messages.

Every party (each hospital, the aggregator, the controller, and later the key committee) has
an :class:`Identity`: an Ed25519 signing key and an X25519 key-agreement key, both from
``cryptography`` (the OS CSPRNG). Its public half, with the party's role, is registered in the
bucket under ``keys/identities/<id>``; every worker checks every message against it before
doing anything else with the message.

API summary (what other modules call)::

    ident = Identity.generate("h1")                   # or Identity.load("keys/h1.key")
    ident.save(out_dir)                                # DIR/h1.key (0600) and DIR/h1.pub
    public = ident.public                              # PublicIdentity: id, ed25519, x25519
    register(store, public, role="hospital")           # keys/identities/h1 (SSE-KMS)
    registry = Registry(store)                         # cached, read-through
    registry.get("h1") -> PublicIdentity (role set); registry.parties("hospital") -> [...]
    signed = sign(message, ident)                      # adds "signer" and "signature"
    verifier = Verifier(registry)                      # max age, clock skew, broker users
    verifier.verify(signed, broker_user="h1") -> PublicIdentity   # or IdentityError
    verify(signed, registry, role="hospital")          # one-off form
    ident.agreement_key / public.x25519_key            # X25519 objects for key exchange

The signature covers the canonical encoding of the whole message except ``signature``
(:func:`canonical_bytes`): kind, version, round, hospital, object key, sha256, sample count,
key fingerprint, time, metrics, and the signer's id. Changing any field (re-addressing a
message to another round, naming another object) breaks it.

Signing and verifying are generic over message kinds: :data:`SENDERS` says, per kind, which
role may send it, which field holds its time and which field (if any) must name the signer.
A new kind (the threshold ceremony's) gets its schema file in ``schemas/`` (with optional
``signer`` and ``signature`` properties, see :data:`SIGNATURE_SCHEMA`), a name in
``messages.KINDS`` and a line here; a kind missing from ``SENDERS`` can still be verified
by passing ``role=`` (and ``time_field=``) explicitly.

:class:`IdentityError` is a :class:`cxr_mq.messages.MessageError`: ``str(error)`` is the
dead-letter reason.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable

import msgpack
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from .messages import MessageError
from .storage.base import ObjectNotFound, ObjectStore

ROLES = ("hospital", "aggregator", "controller")
REGISTRY_PREFIX = "keys/identities/"
SIGNING_CONTEXT = b"cxr-mq signed message v1\x00"  # domain separation from any other use
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,62}$")
DEFAULT_MAX_AGE = 86400.0  # seconds a signed message stays usable (queued while a worker is down)
DEFAULT_MAX_SKEW = 300.0  # seconds a sender's clock may run ahead of ours


@dataclass(frozen=True)
class KindRule:
    """Who may send a kind of message, where its time is, and which field names the sender."""

    role: str
    time_field: str
    sender_field: str | None = None


SENDERS: dict[str, KindRule] = {
    "round_start": KindRule("controller", "issued_at"),
    "update_ready": KindRule("hospital", "sent_at", sender_field="hospital"),
    "model_ready": KindRule("aggregator", "finished_at"),
    "round_aborted": KindRule("aggregator", "finished_at"),
    "ceremony_start": KindRule("controller", "issued_at"),  # the key authority (docs/threshold.md)
    "ceremony_finalize": KindRule("controller", "issued_at"),
}

# the two properties every message schema allows (validated as well-formed; required by verify)
SIGNATURE_SCHEMA = {
    "signer": {"type": "string", "pattern": ID_PATTERN.pattern},
    "signature": {"type": "string", "pattern": "^[0-9a-f]{128}$"},
}


class IdentityError(MessageError):
    """A message or identity that cannot be trusted; ``str(error)`` is the dead-letter reason."""


def _raw_public(key) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption())


def check_id(party_id: str, what: str = "party id") -> str:
    if not isinstance(party_id, str) or not ID_PATTERN.match(party_id):
        raise IdentityError(f"invalid {what} {party_id!r} (letters, digits, '-', '_'; at most 63)")
    return party_id


def check_role(role: str) -> str:
    if role not in ROLES:
        raise IdentityError(f"invalid role {role!r}: one of {', '.join(ROLES)}")
    return role


# -- keys ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PublicIdentity:
    """A party's public keys (and, from the registry, its role)."""

    id: str
    ed25519: bytes
    x25519: bytes
    role: str | None = None

    @cached_property
    def signing_key(self) -> Ed25519PublicKey:  # parsed once per registry entry
        return Ed25519PublicKey.from_public_bytes(self.ed25519)

    @property
    def x25519_key(self) -> X25519PublicKey:
        return X25519PublicKey.from_public_bytes(self.x25519)

    def to_dict(self) -> dict:
        entry = {"id": self.id, "ed25519": self.ed25519.hex(), "x25519": self.x25519.hex()}
        if self.role is not None:
            entry["role"] = self.role
        return entry

    @classmethod
    def from_dict(cls, data: dict, where: str = "identity") -> "PublicIdentity":
        try:
            ident = cls(id=check_id(data["id"]), ed25519=bytes.fromhex(data["ed25519"]),
                        x25519=bytes.fromhex(data["x25519"]),
                        role=check_role(data["role"]) if data.get("role") is not None else None)
            ident.signing_key, ident.x25519_key  # noqa: B018 - both must parse as keys
        except IdentityError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise IdentityError(f"{where}: not a public identity ({type(exc).__name__}: {exc})") from None
        return ident

    @classmethod
    def load(cls, path: str | Path) -> "PublicIdentity":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as exc:
            raise IdentityError(f"{path}: cannot read: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise IdentityError(f"{path}: not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise IdentityError(f"{path}: not a public identity")
        return cls.from_dict(data, str(path))


@dataclass(frozen=True)
class Identity:
    """A party's private keys: Ed25519 to sign, X25519 to agree keys (e.g. receive key shares)."""

    id: str
    signing_key: Ed25519PrivateKey = field(repr=False)
    agreement_key: X25519PrivateKey = field(repr=False)

    @classmethod
    def generate(cls, party_id: str) -> "Identity":
        return cls(check_id(party_id), Ed25519PrivateKey.generate(), X25519PrivateKey.generate())

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.id, _raw_public(self.signing_key.public_key()),
                              _raw_public(self.agreement_key.public_key()))

    def sign_bytes(self, data: bytes) -> bytes:
        return self.signing_key.sign(data)

    def save(self, out_dir: str | Path, force: bool = False) -> tuple[Path, Path]:
        """Write ``DIR/<id>.key`` (mode 0600: both private keys) and ``DIR/<id>.pub``."""
        out = Path(out_dir)
        key_path, pub_path = out / f"{self.id}.key", out / f"{self.id}.pub"
        if not force and (key_path.exists() or pub_path.exists()):
            raise IdentityError(f"{key_path}: identity files exist already (use --force to replace them)")
        out.mkdir(parents=True, exist_ok=True)
        secret = {"id": self.id, "ed25519_private": _raw_private(self.signing_key).hex(),
                  "x25519_private": _raw_private(self.agreement_key).hex()}
        if key_path.exists():
            key_path.unlink()  # a new file gets mode 0600 whatever the old one had
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(secret, fh)
        pub_path.write_text(json.dumps(self.public.to_dict(), indent=1) + "\n")
        return key_path, pub_path

    @classmethod
    def load(cls, path: str | Path) -> "Identity":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            return cls(check_id(data["id"]),
                       Ed25519PrivateKey.from_private_bytes(bytes.fromhex(data["ed25519_private"])),
                       X25519PrivateKey.from_private_bytes(bytes.fromhex(data["x25519_private"])))
        except OSError as exc:
            raise IdentityError(f"{path}: cannot read the identity key: {exc.strerror}") from None
        except IdentityError:
            raise
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise IdentityError(f"{path}: not an identity key file ({type(exc).__name__})") from None


# -- the registry ---------------------------------------------------------------------------------
def registry_key(party_id: str) -> str:
    return REGISTRY_PREFIX + check_id(party_id)


def register(store: ObjectStore, public: PublicIdentity, role: str, force: bool = False) -> PublicIdentity:
    """Write the registry entry of ``public`` with ``role``; an entry with other keys is kept
    unless ``force`` (re-registering the same keys is a no-op that may change nothing)."""
    entry = PublicIdentity(public.id, public.ed25519, public.x25519, check_role(role))
    try:
        existing = PublicIdentity.from_dict(json.loads(store.get_bytes(registry_key(public.id))))
    except ObjectNotFound:
        existing = None
    if existing is not None and existing != entry and not force:
        raise IdentityError(f"{public.id!r} is registered already with other keys or role "
                            f"({existing.role}); use --force to replace it")
    store.put_bytes(registry_key(public.id), json.dumps(entry.to_dict(), sort_keys=True).encode())
    return entry


def provision(store: ObjectStore, party_id: str, role: str, out_dir: str | Path | None = None) -> Identity:
    """Generate an identity, register it and (with ``out_dir``) save its files: for the demo,
    tests and single-machine set-ups, where one process plays the key authority."""
    ident = Identity.generate(party_id)
    register(store, ident.public, role, force=True)
    if out_dir is not None:
        ident.save(out_dir, force=True)
    return ident


class Registry:
    """Public identities from ``keys/identities/`` in the store, cached.

    A found entry is kept for ``ttl`` seconds (re-registration takes effect after that); a
    missing one is looked up again at most every ``miss_ttl`` seconds, so a flood of messages
    from made-up senders cannot turn into a flood of S3 requests."""

    MAX_MISSES = 1000

    def __init__(self, store: ObjectStore | None = None, ttl: float = 60.0, miss_ttl: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, entries: Iterable[PublicIdentity] = ()):
        self.store, self.ttl, self.miss_ttl, self.clock = store, ttl, miss_ttl, clock
        self._found: dict[str, tuple[float, PublicIdentity]] = {}
        self._missed: dict[str, float] = {}
        for entry in entries:  # fixed entries (tests, in-memory set-ups) never expire
            self._found[entry.id] = (float("inf"), entry)

    def get(self, party_id: str) -> PublicIdentity:
        if not isinstance(party_id, str) or not ID_PATTERN.match(party_id):
            raise IdentityError(f"unknown sender {party_id!r}: not a valid party id")
        now = self.clock()
        cached = self._found.get(party_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        if self.store is None or self._missed.get(party_id, -1.0) > now:
            raise IdentityError(f"unknown sender {party_id!r}: no identity in the registry")
        try:
            body = self.store.get_bytes(registry_key(party_id))
        except ObjectNotFound:
            if len(self._missed) >= self.MAX_MISSES:
                self._missed.clear()
            self._missed[party_id] = now + self.miss_ttl
            raise IdentityError(f"unknown sender {party_id!r}: no identity in the registry") from None
        try:
            entry = PublicIdentity.from_dict(json.loads(body), registry_key(party_id))
        except (ValueError, IdentityError) as exc:
            raise IdentityError(f"unknown sender {party_id!r}: unreadable registry entry ({exc})") from None
        if entry.id != party_id or entry.role is None:
            raise IdentityError(f"unknown sender {party_id!r}: registry entry names "
                                f"{entry.id!r} with role {entry.role!r}")
        self._found[party_id] = (now + self.ttl, entry)
        self._missed.pop(party_id, None)
        return entry

    def parties(self, role: str | None = None) -> list[PublicIdentity]:
        """Every registered party (of ``role``), sorted by id: e.g. the hospitals' X25519 keys."""
        ids = set(self._found)
        if self.store is not None:
            ids |= {key[len(REGISTRY_PREFIX):] for key in self.store.list(REGISTRY_PREFIX)}
        found = []
        for party_id in sorted(ids):
            try:
                entry = self.get(party_id)
            except IdentityError:
                continue
            if role is None or entry.role == role:
                found.append(entry)
        return found

    def require(self, ident: Identity, role: str) -> PublicIdentity:
        """Check that ``ident`` is registered, with these keys and this role (start-up check)."""
        try:
            entry = self.get(ident.id)
        except IdentityError:
            raise IdentityError(f"identity {ident.id!r} is not registered: run 'cxr-mq identity "
                                f"register {ident.id} {ident.id}.pub --role {role}'") from None
        if entry.role != role:
            raise IdentityError(f"identity {ident.id!r} is registered as {entry.role}, not {role}")
        if (entry.ed25519, entry.x25519) != (ident.public.ed25519, ident.public.x25519):
            raise IdentityError(f"identity {ident.id!r}: the key file does not match the registry")
        return entry


# -- signing --------------------------------------------------------------------------------------
def _canonical(value):
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    return value


def canonical_bytes(message: dict) -> bytes:
    """What a signature covers: every field but ``signature``, keys sorted at every level,
    msgpack-encoded (floats as float64), after a domain-separation prefix."""
    body = {k: v for k, v in message.items() if k != "signature"}
    return SIGNING_CONTEXT + msgpack.packb(_canonical(body), use_bin_type=True)


def sign(message: dict, ident: Identity) -> dict:
    """A copy of ``message`` with ``signer`` (the identity's id) and ``signature`` (hex)."""
    unsigned = {k: v for k, v in message.items() if k not in ("signer", "signature")}
    unsigned["signer"] = ident.id
    return {**unsigned, "signature": ident.sign_bytes(canonical_bytes(unsigned)).hex()}


@dataclass
class Verifier:
    """Checks a message's signature, its sender's registry entry and role, the broker user that
    published it, and its age. Every check that fails raises :class:`IdentityError`.

    ``shared_broker_users``: broker logins allowed to publish for any party (a development
    set-up where every worker uses one login); empty in a deployment with one user per party."""

    registry: Registry
    max_age: float = DEFAULT_MAX_AGE
    max_skew: float = DEFAULT_MAX_SKEW
    shared_broker_users: frozenset = frozenset()
    check_broker_user: bool = True
    clock: Callable[[], float] = time.time

    def verify(self, message: dict, broker_user: str | None = None, role: str | None = None,
               time_field: str | None = None) -> PublicIdentity:
        kind = message.get("schema")
        rule = SENDERS.get(kind)
        role = role or (rule.role if rule else None)
        time_field = time_field or (rule.time_field if rule else None)
        if role is None:
            raise IdentityError(f"{kind}: no sender role is known for this kind of message")
        signer, signature = message.get("signer"), message.get("signature")
        if not signer or not signature:
            raise IdentityError(f"unsigned {kind}: no signer or signature")
        sender = self.registry.get(signer)
        if sender.role != role:
            raise IdentityError(f"wrong role: {kind} from {signer!r}, registered as {sender.role}; "
                                f"only the {role} role may send it")
        try:
            sender.signing_key.verify(bytes.fromhex(signature), canonical_bytes(message))
        except (InvalidSignature, ValueError):
            raise IdentityError(f"bad signature on {kind} from {signer!r}") from None
        if rule is not None and rule.sender_field and message.get(rule.sender_field) != signer:
            raise IdentityError(f"{kind} signed by {signer!r} names {rule.sender_field} "
                                f"{message.get(rule.sender_field)!r}")
        self._check_broker_user(kind, signer, broker_user)
        if time_field is not None:
            self._check_time(kind, signer, message.get(time_field))
        return sender

    def verify_stored(self, message: dict, role: str | None = None) -> PublicIdentity:
        """Check a signed message read from the store (e.g. the round record): signature,
        sender and role; no broker user, and no age (a record outlives its round)."""
        stored = Verifier(self.registry, check_broker_user=False, max_age=float("inf"),
                          max_skew=float("inf"), clock=self.clock)
        return stored.verify(message, role=role)

    def _check_broker_user(self, kind, signer: str, broker_user: str | None) -> None:
        if not self.check_broker_user or broker_user in self.shared_broker_users:
            return
        if broker_user is None:
            raise IdentityError(f"{kind} from {signer!r} carries no broker user_id")
        if broker_user != signer:
            raise IdentityError(f"broker user {broker_user!r} published a {kind} signed by {signer!r}")

    def _check_time(self, kind, signer: str, sent) -> None:
        if not isinstance(sent, (int, float)) or isinstance(sent, bool):
            raise IdentityError(f"{kind} from {signer!r} has no time")
        age = self.clock() - sent
        if age > self.max_age:
            raise IdentityError(f"stale {kind} from {signer!r}: signed {age:.0f}s ago, "
                                f"more than {self.max_age:.0f}s")
        if -age > self.max_skew:
            raise IdentityError(f"{kind} from {signer!r} is dated {-age:.0f}s in the future")


def verify(message: dict, registry: Registry, role: str | None = None,
           broker_user: str | None = None, **policy) -> PublicIdentity:
    """One-off :meth:`Verifier.verify`; without ``broker_user`` the broker check is skipped
    (e.g. for a message read from the store rather than delivered)."""
    verifier = Verifier(registry, check_broker_user=broker_user is not None, **policy)
    return verifier.verify(message, broker_user=broker_user, role=role)
