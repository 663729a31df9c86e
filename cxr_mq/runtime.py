"""Build the broker, store and codec a command needs from its settings."""
from __future__ import annotations

from pathlib import Path

from . import crypto
from .config import ConfigError, Settings, env_name
from .storage.base import ObjectNotFound, ObjectStore
from .transport.base import Broker, Topology


def make_store(settings: Settings) -> ObjectStore:
    from .storage.s3 import S3Store

    settings.require("s3_bucket", "kms_key_id")
    return S3Store(bucket=settings.s3_bucket, kms_key_id=settings.kms_key_id,
                   endpoint_url=settings.s3_endpoint_url, region=settings.aws_region)


def make_broker(settings: Settings) -> Broker:
    from .transport.rabbitmq import RabbitMQBroker, TlsOptions

    settings.require("amqp_url")
    tls = TlsOptions(settings.amqp_ca_file, settings.amqp_cert_file, settings.amqp_key_file,
                     settings.amqp_tls_required)
    return RabbitMQBroker(settings.amqp_url, Topology(settings.namespace), tls=tls)


def load_public_codec(store: ObjectStore, settings: Settings, path: str | None = None):
    """The aggregator's context: public only, from a file or from the store; a context that
    holds a secret key is refused."""
    if path:
        codec = crypto.load_context_file(path)
    else:
        try:
            codec = crypto.load_context(store.get_bytes(settings.public_context_key))
        except ObjectNotFound:
            raise ConfigError(env_name("public_context_key"),
                              f"no public context at {settings.public_context_key!r} in the store "
                              "(run 'cxr-mq keys init' first)") from None
    codec.require_public_only()
    return codec


def make_kms(settings: Settings):
    """A KMS client (for wrapped secret key files); ``kms_endpoint_url``, else the S3
    endpoint (a local stack such as moto serves both), else AWS's own."""
    import boto3

    return boto3.client("kms", endpoint_url=settings.kms_endpoint_url or settings.s3_endpoint_url,
                        region_name=settings.aws_region)


def load_secret_codec(settings: Settings, path: str | Path | None = None):
    """A hospital's secret context from its file, plain or KMS-wrapped (unwrapped here, in
    memory only)."""
    from .crypto import keyfile

    target = Path(path) if path else settings.secret_context_path()
    data = keyfile.read_secret_file(target, lambda: make_kms(settings), settings.secret_kms_key_id)
    try:
        codec = crypto.load_context(data)
    except crypto.CodecError as exc:
        raise type(exc)(f"{target}: {exc}") from exc
    if not codec.has_secret_key:
        raise ConfigError(env_name("secret_context"), f"{target} holds no secret key")
    return codec
