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


def tls_options(settings: Settings):
    from .transport.rabbitmq import TlsOptions

    return TlsOptions(settings.amqp_ca_file, settings.amqp_cert_file, settings.amqp_key_file,
                      settings.amqp_tls_required)


def make_broker(settings: Settings) -> Broker:
    from .transport.rabbitmq import RabbitMQBroker

    settings.require("amqp_url")
    return RabbitMQBroker(settings.amqp_url, Topology(settings.namespace), tls=tls_options(settings))


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


def load_hospital_codec(settings: Settings, store: ObjectStore):
    """A hospital's codec: under the threshold profile the public context in the bucket (the
    hospital's secret is its committee share, in its work directory), else its secret file;
    None before any key exists (threshold profile, no secret file configured): the hospital
    waits for the key ceremony."""
    try:
        public = crypto.load_context(store.get_bytes(settings.public_context_key))
    except (ObjectNotFound, crypto.CodecError):
        public = None
    if public is not None and public.profile == "threshold":
        return public
    if public is None and not settings.secret_context and settings.codec_profile == "threshold":
        return None  # no key yet: the hospital takes part in the ceremony ('keys init') and adopts its key
    return load_secret_codec(settings)


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


def load_identity(settings: Settings, store: ObjectStore, role: str, party_id: str | None = None):
    """This party's identity (``--identity`` / ``CXR_MQ_IDENTITY``), checked against the
    registry: registered, with the same keys, in ``role`` (and named ``party_id``)."""
    from .identity import Identity, Registry

    ident = Identity.load(settings.identity_path())
    if party_id is not None and ident.id != party_id:
        raise ConfigError(env_name("identity"), f"{settings.identity} is the identity of "
                          f"{ident.id!r}, not {party_id!r}")
    Registry(store).require(ident, role)
    return ident


def make_verifier(settings: Settings, store: ObjectStore):
    """Checks every incoming message against the registry in ``store``."""
    from .identity import Registry, Verifier

    return Verifier(Registry(store), max_age=float(settings.message_max_age),
                    shared_broker_users=frozenset(settings.shared_broker_users))

