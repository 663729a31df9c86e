"""Secret key files at rest: written atomically with mode 0600, optionally KMS-wrapped.

A wrapped file is an envelope (the pattern of the AWS Encryption SDK, by hand because it is
a few lines with ``cryptography``): KMS ``GenerateDataKey`` gives a fresh AES-256 data key
in the clear and wrapped under the KMS key; the file holds the wrapped data key and the
secret context encrypted with AES-256-GCM under the plain data key, which is then dropped.
Unwrapping asks KMS to decrypt the data key, so only a principal allowed to use that KMS key
(the hospital's instance role, say) can read the file, and every use is in CloudTrail.

Layout::

    MAGIC (8 bytes) | header length (u32, big-endian) | header (JSON) | AES-GCM ciphertext+tag

The header names the KMS key (its ARN), the encryption context (which KMS binds to the
wrapped data key: a wrapped key is refused under any other context) and the GCM nonce. The
whole prefix (magic, length, header) is the GCM associated data, so changing any byte of
the file is refused. A file without the magic is a plain context and is returned as is.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import tempfile
from pathlib import Path

from .errors import CodecError

MAGIC = b"CXRWRAP1"
ALGORITHM = "AES-256-GCM"
PURPOSE = {"cxr-mq:purpose": "secret-context"}
_LENGTH = struct.Struct(">I")
MAX_HEADER = 64 * 1024


class KeyFileError(CodecError):
    """A secret key file cannot be read, unwrapped or written."""


def write_secret_file(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, whatever was there before: a new file is
    written beside it and renamed over it, so a replaced file never keeps a wider mode and
    a reader never sees half a key."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")  # mode 0600
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot write the secret key file: {exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def is_wrapped(data: bytes) -> bool:
    return data[: len(MAGIC)] == MAGIC


def wrap(secret: bytes, kms, key_id: str, context: dict[str, str] | None = None) -> bytes:
    """Envelope-encrypt ``secret`` under a fresh data key from KMS key ``key_id``."""
    from botocore.exceptions import BotoCoreError, ClientError
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    context = {**PURPOSE, **(context or {})}
    try:
        made = kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", EncryptionContext=context)
    except (BotoCoreError, ClientError) as exc:
        raise KeyFileError(f"KMS key {key_id}: cannot generate a data key: {exc}") from exc
    nonce = os.urandom(12)
    header = json.dumps({
        "alg": ALGORITHM, "kms_key_id": made["KeyId"], "encryption_context": context,
        "wrapped_data_key": base64.b64encode(made["CiphertextBlob"]).decode(),
        "nonce": base64.b64encode(nonce).decode()}, sort_keys=True).encode()
    prefix = MAGIC + _LENGTH.pack(len(header)) + header
    return prefix + AESGCM(made["Plaintext"]).encrypt(nonce, secret, prefix)


def unwrap(blob: bytes, kms, source: str, expected_key_id: str | None = None) -> bytes:
    """The secret inside a wrapped file. ``source`` names the file in every error.
    With ``expected_key_id``, KMS refuses a file wrapped under any other key."""
    from botocore.exceptions import BotoCoreError, ClientError
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    prefix, header = _split(blob, source)
    key_id = expected_key_id or header["kms_key_id"]
    try:
        data_key = kms.decrypt(CiphertextBlob=header["wrapped_data_key"], KeyId=key_id,
                               EncryptionContext=header["encryption_context"])["Plaintext"]
    except ClientError as exc:
        error = exc.response.get("Error", {})
        raise KeyFileError(
            f"{source}: KMS refused to unwrap the data key with key {key_id} (the file names "
            f"{header['kms_key_id']}): {error.get('Code')}: {error.get('Message')}") from None
    except BotoCoreError as exc:
        raise KeyFileError(f"{source}: cannot reach KMS to unwrap the key: {exc}") from exc
    try:
        return AESGCM(data_key).decrypt(header["nonce"], blob[len(prefix):], prefix)
    except InvalidTag:
        raise KeyFileError(f"{source}: the wrapped secret key fails authentication "
                           "(the file was altered or truncated)") from None


def _split(blob: bytes, source: str) -> tuple[bytes, dict]:
    """(associated data, parsed header) of a wrapped file, its fields checked."""
    if not is_wrapped(blob) or len(blob) < len(MAGIC) + _LENGTH.size:
        raise KeyFileError(f"{source}: not a KMS-wrapped key file")
    (length,) = _LENGTH.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if length > MAX_HEADER or start + length > len(blob):
        raise KeyFileError(f"{source}: wrapped key header of {length} bytes is truncated or too large")
    try:
        header = json.loads(blob[start:start + length])
        parsed = {"kms_key_id": str(header["kms_key_id"]),
                  "encryption_context": {str(k): str(v) for k, v in header["encryption_context"].items()},
                  "wrapped_data_key": base64.b64decode(header["wrapped_data_key"], validate=True),
                  "nonce": base64.b64decode(header["nonce"], validate=True)}
        if header["alg"] != ALGORITHM or len(parsed["nonce"]) != 12:
            raise ValueError(f"algorithm {header['alg']!r}, nonce of {len(parsed['nonce'])} bytes")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise KeyFileError(f"{source}: unreadable wrapped key header: {exc!r}") from None
    return blob[:start + length], parsed


def read_header(blob: bytes, source: str = "wrapped key") -> dict:
    """The header of a wrapped file (KMS key ARN, encryption context), for display."""
    return _split(blob, source)[1]


def read_secret_file(path: str | Path, kms_factory, expected_key_id: str | None = None) -> bytes:
    """A secret context from ``path``, plain or wrapped; ``kms_factory()`` makes the KMS
    client, only when the file is wrapped."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read secret key file {path}: {exc.strerror}") from exc
    if not is_wrapped(data):
        return data
    return unwrap(data, kms_factory(), str(path), expected_key_id)
