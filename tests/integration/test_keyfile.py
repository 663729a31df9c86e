"""KMS-wrapped secret key files (issue 10 item 8), against moto's KMS over HTTP.

A hospital's secret context may be stored wrapped (KMS ``GenerateDataKey`` + AES-256-GCM);
``load_secret_codec`` (the hospital, ``evaluate``, ``predict``) reads either form. The attacks:
the wrong KMS key, a changed byte anywhere in the file, a changed encryption
context, a truncated file: each is refused with an error naming the file.
"""
from __future__ import annotations

import json
import struct

import boto3
import pytest
from click.testing import CliRunner

from cxr_mq import crypto
from cxr_mq.cli import main
from cxr_mq.config import load_settings
from cxr_mq.crypto import keyfile
from cxr_mq.crypto.wire import KEY_MAGIC
from cxr_mq.runtime import load_secret_codec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def plain_pair():
    return crypto.generate_keys("compact")


@pytest.fixture
def kms(s3_settings):
    return boto3.client("kms", endpoint_url=s3_settings["endpoint_url"], region_name=s3_settings["region"])


def _env(s3_settings, **extra) -> dict:
    return {"CXR_MQ_CONFIG": "", "CXR_MQ_S3_ENDPOINT_URL": s3_settings["endpoint_url"],
            "CXR_MQ_KMS_KEY_ID": s3_settings["kms_key_id"], "AWS_REGION": s3_settings["region"],
            **{f"CXR_MQ_{k.upper()}": v for k, v in extra.items()}}


def _settings(s3_settings, **extra):
    return load_settings(env=_env(s3_settings, **extra), config_path=None)


def test_keys_init_kms_wrap_loads_transparently_and_the_wrong_key_is_refused(tmp_path, s3_settings, kms):
    result = CliRunner().invoke(main, ["keys", "init", "--profile", "compact", "--out", str(tmp_path),
                                       "--no-upload", "--kms-wrap"], env=_env(s3_settings))
    assert result.exit_code == 0, result.output
    made = json.loads(result.output)
    secret = tmp_path / "secret.ctx"
    data = secret.read_bytes()
    assert secret.stat().st_mode & 0o777 == 0o600
    assert data.startswith(keyfile.MAGIC) and KEY_MAGIC not in data  # no plaintext context
    assert made["kms_wrapped"].endswith(s3_settings["kms_key_id"])
    header = keyfile.read_header(data)
    assert header["encryption_context"]["cxr-mq:fingerprint"] == made["fingerprint"]

    codec = load_secret_codec(_settings(s3_settings), secret)
    assert codec.has_secret_key and codec.fingerprint == made["fingerprint"]
    # pinned to the right key, it loads too
    assert load_secret_codec(_settings(s3_settings, secret_kms_key_id=s3_settings["kms_key_id"]),
                             secret).fingerprint == made["fingerprint"]

    # the wrong KMS key: refused by KMS, the error names the file and both keys
    other = kms.create_key(Description="not the wrapping key")["KeyMetadata"]["KeyId"]
    with pytest.raises(keyfile.KeyFileError) as info:
        load_secret_codec(_settings(s3_settings, secret_kms_key_id=other), secret)
    message = str(info.value)
    assert str(secret) in message and "KMS refused" in message and other in message
    # and the CLI says it in one line, exit 2
    result = CliRunner().invoke(main, ["evaluate", "--data", str(tmp_path), "--secret-context",
                                       str(secret)], env=_env(s3_settings, secret_kms_key_id=other))
    assert result.exit_code == 2 and str(secret) in result.output and "KMS refused" in result.output


def _tamper(blob: bytes, how: str) -> bytes:
    start = len(keyfile.MAGIC) + 4
    (length,) = struct.unpack_from(">I", blob, len(keyfile.MAGIC))
    if how == "ciphertext byte":
        return blob[:-20] + bytes([blob[-20] ^ 1]) + blob[-19:]
    if how == "truncated":
        return blob[:-1]
    header = json.loads(blob[start:start + length])
    if how == "encryption context":
        header["encryption_context"]["cxr-mq:fingerprint"] = "0" * 64
    elif how == "nonce":
        header["nonce"] = "AAAAAAAAAAAAAAAA"
    raw = json.dumps(header, sort_keys=True).encode()
    return keyfile.MAGIC + struct.pack(">I", len(raw)) + raw + blob[start + length:]


@pytest.mark.parametrize("how, reason", [
    ("ciphertext byte", "fails authentication"),
    ("truncated", "fails authentication"),
    ("nonce", "fails authentication"),
    ("encryption context", "KMS refused"),
])
def test_a_tampered_wrapped_file_is_refused_naming_it(tmp_path, s3_settings, kms, how, reason):
    secret = b"a secret context " * 10
    blob = keyfile.wrap(secret, kms, s3_settings["kms_key_id"], {"cxr-mq:fingerprint": "f" * 64})
    path = tmp_path / "secret.ctx"
    keyfile.write_secret_file(path, blob)
    assert keyfile.read_secret_file(path, lambda: kms) == secret
    keyfile.write_secret_file(path, _tamper(blob, how))
    with pytest.raises(keyfile.KeyFileError, match=reason) as info:
        keyfile.read_secret_file(path, lambda: kms)
    assert str(path) in str(info.value)


def test_keys_wrap_wraps_a_plain_file_that_then_loads_the_same(tmp_path, s3_settings, plain_pair):
    plain, public = tmp_path / "secret.ctx", tmp_path / "public.ctx"
    plain.write_bytes(plain_pair.secret)
    public.write_bytes(plain_pair.public)
    wrapped = tmp_path / "wrapped.ctx"
    runner = CliRunner()
    result = runner.invoke(main, ["keys", "wrap", str(plain), "--out", str(wrapped)],
                           env=_env(s3_settings))
    assert result.exit_code == 0, result.output
    assert wrapped.stat().st_mode & 0o777 == 0o600 and keyfile.is_wrapped(wrapped.read_bytes())
    settings = _settings(s3_settings)
    expected = crypto.load_context(plain_pair.public).fingerprint
    assert load_secret_codec(settings, wrapped).fingerprint == expected
    assert load_secret_codec(settings, plain).fingerprint == expected  # plain still loads
    # refused: wrapping twice, a public context, replacing a file without --force
    for source, why in ((wrapped, "KMS-wrapped already"), (public, "holds no secret key")):
        result = runner.invoke(main, ["keys", "wrap", str(source), "--out", str(tmp_path / "x")],
                               env=_env(s3_settings))
        assert result.exit_code == 2 and why in result.output, result.output
    result = runner.invoke(main, ["keys", "wrap", str(plain), "--out", str(wrapped)],
                           env=_env(s3_settings))
    assert result.exit_code == 2 and "--force" in result.output
