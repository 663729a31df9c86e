"""The codec's exceptions: every unusable context or stream is a ``CodecError``."""

from __future__ import annotations


class CodecError(Exception):
    """A context or ciphertext stream is unusable."""


class CodecMismatch(CodecError):
    """A stream was made under another profile, key or model shape."""


class SecretKeyPresent(CodecError):
    """A context that must be public-only holds the secret key."""


class UpdateOutOfRange(CodecError):
    """An update too large for the round: a sum of the round's most contributors could wrap."""
