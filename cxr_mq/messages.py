"""Message codec: msgpack maps carrying ``schema`` and ``version``, validated against ``schemas/``.

Every message is validated both before it is sent and when it is received; anything that
fails to decode or validate raises :class:`MessageError` with a reason fit for a
dead-letter header.
"""
from __future__ import annotations

import json
import time
from functools import lru_cache
from importlib import resources

import jsonschema
import msgpack

MAX_MESSAGE_BYTES = 256 * 1024
KINDS = ("round_start", "update_ready", "model_ready", "round_aborted", "ceremony_start", "ceremony_finalize")
VERSION = 1


class MessageError(ValueError):
    """A message that cannot be used; ``str(error)`` is the dead-letter reason."""


@lru_cache(maxsize=None)
def _validator(kind: str, version: int) -> jsonschema.protocols.Validator:
    try:
        text = resources.files("cxr_mq.schemas").joinpath(f"{kind}.v{version}.json").read_text()
    except FileNotFoundError:
        raise MessageError(f"unknown schema {kind!r} version {version!r}") from None
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def validate(message: dict) -> dict:
    kind, version = message.get("schema"), message.get("version")
    if kind not in KINDS or not isinstance(version, int) or isinstance(version, bool):
        raise MessageError(f"unknown schema {kind!r} version {version!r}")
    errors = sorted(_validator(kind, version).iter_errors(message), key=lambda e: list(e.path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.path) or "(message)"
        raise MessageError(f"{kind} v{version} invalid at {where}: {first.message}")
    return message


def make(kind: str, **fields) -> dict:
    """Build and validate a message of ``kind`` (current version)."""
    return validate({"schema": kind, "version": VERSION, **fields})


def encode(message: dict) -> bytes:
    return msgpack.packb(validate(message), use_bin_type=True)


def decode(body: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> dict:
    if len(body) > max_bytes:
        raise MessageError(f"oversized message: {len(body)} bytes > {max_bytes}")
    try:
        message = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise MessageError(f"not msgpack: {type(exc).__name__}: {exc or 'undecodable bytes'}") from None
    if not isinstance(message, dict):
        raise MessageError(f"not a msgpack map: {type(message).__name__}")
    return validate(message)


def now() -> float:
    return time.time()
