"""The public contexts a running worker uses, by fingerprint, picked up from the store
without a restart.

A round names its context in the signed ``round_start`` (``key_fingerprint``: a hash over
the profile, its parameters and the public key, so nobody can substitute another key under
the same fingerprint). A worker that does not hold that context reads the store's public
context (``keys/public-context``, which ``keys init`` and ``keys init --threshold`` write)
again and takes it if, and only if, its fingerprint is the one the round names; anything
else is :class:`UnknownContext` with the reason.
"""
from __future__ import annotations

from . import crypto
from .storage.base import ObjectNotFound, ObjectStore

PUBLIC_CONTEXT_KEY = "keys/public-context"


def stored_context(store: ObjectStore, key: str = PUBLIC_CONTEXT_KEY):
    """The store's public context now (None if there is none or it does not load)."""
    try:
        return crypto.load_context(store.get_bytes(key))
    except (ObjectNotFound, crypto.CodecError):
        return None


class UnknownContext(Exception):
    """A round names a context this worker does not hold and the store does not have."""


class ContextBook:
    def __init__(self, store: ObjectStore, current, key: str = PUBLIC_CONTEXT_KEY):
        self.store, self.key = store, key
        self.current = current  # None: no key yet (a hospital before the first key ceremony)
        self.known = {current.fingerprint: current} if current is not None else {}

    def get(self, fingerprint: str, accept=lambda codec: None):
        """The context named ``fingerprint``: one held, else the store's if it is that one.
        ``accept(codec)`` may refuse a new context by returning the reason (e.g. a hospital
        without a committee share for it); a taken context becomes ``current``."""
        if fingerprint in self.known:
            return self.known[fingerprint]
        codec = stored_context(self.store, self.key)
        if codec is None:
            raise UnknownContext(f"context {fingerprint[:16]}… is not held here and the store has no usable "
                                 f"public context at {self.key!r}")
        if codec.fingerprint != fingerprint:
            raise UnknownContext(f"context {fingerprint[:16]}… is not held here, and the store's public context "
                                 f"({self.key}) is {codec.fingerprint[:16]}… ({codec.profile})")
        try:
            codec.require_public_only()
        except crypto.CodecError as exc:
            raise UnknownContext(f"the store's public context ({self.key}) is refused: {exc}") from None
        reason = accept(codec)
        if reason:
            raise UnknownContext(f"context {fingerprint[:16]}… ({codec.profile}): {reason}")
        self.adopt(codec)
        return codec

    def adopt(self, codec) -> None:
        self.known[codec.fingerprint] = codec
        self.current = codec

    def retire(self, keep) -> None:
        """Forget every threshold context but ``keep``'s (a new ceremony replaced them and
        their shares are deleted): a round naming one is then refused with the reason."""
        for fingerprint, codec in list(self.known.items()):
            if codec.profile == "threshold" and fingerprint != keep.fingerprint:
                del self.known[fingerprint]
