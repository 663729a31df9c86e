"""Keys: generating a key pair of a profile, and loading a context (key file) of any
registered profile."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import msgpack

from .base import CkksCodec
from .compact import CompactCodec
from .errors import CodecError
from .seed import SeedCodec
from .threshold import ThresholdCodec
from .wire import KEY_MAGIC

DEFAULT_PROFILE = "compact"


@dataclass(frozen=True)
class KeyPair:
    secret: bytes = field(repr=False)  # serialized context WITH the secret key (hospitals)
    public: bytes = field(repr=False)  # serialized context WITHOUT the secret key (aggregator)

    def __repr__(self) -> str:
        # never the key bytes: a repr ends up in logs, tracebacks and debugger output
        return f"KeyPair(secret=<{len(self.secret)} bytes, redacted>, public=<{len(self.public)} bytes>)"


PROFILES: dict[str, type[CkksCodec]] = {"seed": SeedCodec, "compact": CompactCodec, "threshold": ThresholdCodec}
# profiles with one key pair that generate_keys makes (threshold keys come from a ceremony)
SINGLE_KEY_PROFILES = ("seed", "compact")



def generate_keys(profile: str = DEFAULT_PROFILE) -> KeyPair:
    codec_cls = profile_class(profile)
    codec = codec_cls.generate()
    return KeyPair(secret=codec.secret_bytes(), public=codec.public_bytes())


def profile_class(profile: str) -> type[CkksCodec]:
    try:
        return PROFILES[profile]
    except KeyError:
        raise CodecError(f"unknown codec profile {profile!r}; known: {', '.join(sorted(PROFILES))}") from None


def load_context(data: bytes) -> CkksCodec:
    """Load a context written by :func:`generate_keys`; the profile is read from the bytes."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"context must be bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data.startswith(KEY_MAGIC):
        raise CodecError("not a cxr-mq CKKS context (bad magic)")
    try:
        payload = msgpack.unpackb(data[len(KEY_MAGIC) :], raw=False)
        profile = payload["profile"]
    except Exception as exc:
        raise CodecError(f"unreadable CKKS context: {exc}") from exc
    return profile_class(profile).from_payload(payload)


def load_context_file(path) -> CkksCodec:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CodecError(f"cannot read CKKS context {path}: {exc}") from exc
    try:
        return load_context(data)
    except CodecError as exc:
        raise type(exc)(f"{path}: {exc}") from exc

