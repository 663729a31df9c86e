"""The ``cxr-mq`` command line.

Settings come from flags, then ``CXR_MQ_*`` environment variables, then a TOML file
(``--config``). Configuration and input errors print one line naming the key or file and
exit with code 2.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from .config import PROFILES, ConfigError, Settings, load_settings, validate_hospital_id

EXIT_USAGE = 2
EXIT_LEASE_LOST = 3


class Context:
    def __init__(self, config_path, log_level, log_format):
        self.config_path, self.log_level, self.log_format = config_path, log_level, log_format

    def settings(self, **flags) -> Settings:
        settings = load_settings(flags={"log_level": self.log_level, "log_format": self.log_format,
                                        **flags}, config_path=self.config_path)
        from .log import configure_logging
        configure_logging(settings.log_level, settings.log_format)
        return settings


def _fail(message: str, code: int = EXIT_USAGE):
    click.echo(f"cxr-mq: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    """Turn the errors a user can fix into one line and exit code 2."""

    def invoke(self, ctx):
        from .crypto import CodecError
        from .data import DataError
        from .identity import IdentityError
        from .storage.base import StoreError
        from .transport.base import TransportError
        try:
            return super().invoke(ctx)
        except ConfigError as exc:
            _fail(str(exc))
        except DataError as exc:
            _fail(str(exc))
        except CodecError as exc:
            _fail(f"crypto: {exc}")
        except IdentityError as exc:
            _fail(f"identity: {exc}")
        except StoreError as exc:
            _fail(f"store: {exc}", 1)
        except TransportError as exc:
            _fail(f"broker: {exc}", 1)


@click.group(cls=_Group)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="TOML settings file (default: $CXR_MQ_CONFIG or /etc/cxr-mq/config.toml).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default=None)
@click.option("--log-format", type=click.Choice(["json", "console"]), default=None)
@click.pass_context
def main(ctx, config_path, log_level, log_format):
    """Privacy-preserving federated learning for chest X-rays over RabbitMQ and S3."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before TensorFlow is first imported
    ctx.obj = Context(config_path, log_level, log_format)


# -- keys -------------------------------------------------------------------------------------
@main.group()
def keys():
    """Key authority: the key ceremony (threshold profile) or single-key contexts."""


@keys.command("init")
@click.option("--out", "out_dir", type=click.Path(file_okay=False),
              help="Directory for the key files: secret.ctx (hospitals only) and public.ctx with "
                   "--profile compact|seed (required there); public.ctx only after a ceremony (optional).")
@click.option("--threshold", type=int, default=None,
              help="Threshold profile: T, the committee members that must take part in decrypting a round "
                   "(default: a majority of CXR_MQ_HOSPITALS).")
@click.option("--ceremony-id", default=None, help="Threshold profile: the ceremony's id (default: a fresh one).")
@click.option("--timeout", type=float, default=120.0, show_default=True,
              help="Threshold profile: seconds to wait for the hospitals at each step of the ceremony.")
@click.option("--profile", type=click.Choice(PROFILES), default=None,
              help="Codec profile (default: codec_profile, threshold unless configured). threshold runs "
                   "the key ceremony through the running hospital workers; compact and seed create one "
                   "key pair for single-key deployments (with --out).")
@click.option("--upload/--no-upload", default=True,
              help="Upload the public context to the bucket (keys/public-context).")
@click.option("--force", is_flag=True, help="Overwrite existing key files.")
@click.option("--kms-wrap", is_flag=True,
              help="Write secret.ctx KMS-wrapped (secret_kms_key_id, else kms_key_id).")
@click.option("--if-absent", is_flag=True,
              help="Do nothing (exit 0, print the bucket's context) if the bucket holds a public context "
                   "already: for automation that runs keys init on every rollout.")
@click.pass_obj
def keys_init(obj: Context, out_dir, threshold, ceremony_id, timeout, profile, upload, force, kms_wrap,
              if_absent):
    """Create the federation's keys. By default (profile threshold) run the key ceremony
    through the running hospital workers of CXR_MQ_HOSPITALS, signed with the key authority's
    identity (CXR_MQ_IDENTITY): no party ever holds the collective secret, T of the hospitals
    decrypt each round's sum (docs/threshold.md); the collective public key becomes the public
    context in the bucket. With --profile compact|seed --out DIR: one key pair, DIR/secret.ctx
    (for every hospital) and DIR/public.ctx, the public one published."""
    from . import crypto
    from .crypto import keyfile
    from .runtime import make_kms, make_store

    settings = obj.settings(codec_profile=profile or ("threshold" if threshold is not None else None))
    if threshold is not None and settings.codec_profile != "threshold":
        _fail(f"--threshold runs the key ceremony of the threshold profile, not of profile "
              f"{settings.codec_profile!r}: drop one of them")
    if if_absent:
        from .contexts import stored_context
        existing = stored_context(make_store(settings), settings.public_context_key)
        if existing is not None:
            click.echo(json.dumps({"existing": settings.public_context_key, "profile": existing.profile,
                                   "fingerprint": existing.fingerprint}, indent=1))
            return
    if settings.codec_profile == "threshold":
        if kms_wrap or not upload:
            _fail("--kms-wrap and --no-upload apply to a single-key profile: under the threshold "
                  "profile no secret key file exists and the public context goes to the bucket")
        _threshold_ceremony(obj, settings, threshold, ceremony_id, timeout, out_dir)
        return
    if not out_dir:
        _fail(f"--out is required with profile {settings.codec_profile!r} (the directory for secret.ctx "
              "and public.ctx)")
    out = Path(out_dir)
    secret_path, public_path = out / "secret.ctx", out / "public.ctx"
    if not force and (secret_path.exists() or public_path.exists()):
        _fail(f"{out}: key files exist already (use --force to replace them)")
    store = make_store(settings) if upload else None
    wrap_key = _wrap_key_id(settings) if kms_wrap else None
    pair = crypto.generate_keys(settings.codec_profile)
    codec = crypto.load_context(pair.public)
    secret = pair.secret
    if wrap_key:
        secret = keyfile.wrap(secret, make_kms(settings), wrap_key,
                              {"cxr-mq:fingerprint": codec.fingerprint})
    out.mkdir(parents=True, exist_ok=True)
    keyfile.write_secret_file(secret_path, secret)
    public_path.write_bytes(pair.public)
    result = {"secret_context": str(secret_path), "public_context": str(public_path),
              "profile": codec.profile, "fingerprint": codec.fingerprint}
    if wrap_key:
        result["kms_wrapped"] = keyfile.read_header(secret)["kms_key_id"]
    if store is not None:
        info = store.put_bytes(settings.public_context_key, pair.public)
        result["uploaded"] = f"{settings.public_context_key} sha256={info.sha256}"
    click.echo(json.dumps(result, indent=1))


SINGLE_KEY_HINT = "or create a single key pair instead: cxr-mq keys init --profile compact --out DIR"


def _threshold_ceremony(obj: Context, settings: Settings, threshold, ceremony_id, timeout: float,
                        out_dir, extra=None) -> None:
    """The key ceremony through the running hospital workers (``keys init``'s default)."""
    import uuid

    from . import threshold_flow
    from .config import env_name
    from .crypto.ceremony import CeremonyError, CeremonyParams, majority
    from .identity import Identity, Registry
    from .runtime import make_broker, make_store

    hospitals = tuple(sorted(settings.hospitals))
    if len(hospitals) < 2:
        configured = ", ".join(hospitals) or "none"
        _fail(f"the threshold key ceremony runs through the hospital workers of {env_name('hospitals')} "
              f"(at least two; configured: {configured}): set {env_name('hospitals')}, {SINGLE_KEY_HINT}")
    threshold = majority(len(hospitals)) if threshold is None else threshold
    try:
        params = CeremonyParams(settings.namespace, hospitals, threshold,
                                ceremony_id or f"c{uuid.uuid4().hex[:12]}")
    except CeremonyError as exc:
        _fail(f"--threshold: {exc}")
    authority = Identity.load(settings.identity_path())
    store = make_store(settings)
    with make_broker(settings) as broker:
        broker.declare_topology(hospitals)
        try:
            codec = threshold_flow.run_ceremony(store, broker, params, authority, Registry(store), timeout=timeout,
                                                log=lambda m: click.echo(m, err=True))
        except threshold_flow.CeremonyIncomplete as exc:
            _fail(f"{exc}; start their hospital workers and run keys init again, {SINGLE_KEY_HINT}", 1)
        except threshold_flow.FlowError as exc:
            _fail(str(exc), 1)
    info = store.put_bytes(settings.public_context_key, codec.public_bytes())
    if out_dir:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "public.ctx").write_bytes(codec.public_bytes())
    click.echo(json.dumps({"ceremony_id": params.ceremony_id, "parties": list(params.parties),
                           "threshold": params.threshold, "profile": codec.profile, "fingerprint": codec.fingerprint,
                           "uploaded": f"{settings.public_context_key} sha256={info.sha256}", **(extra or {})},
                          indent=1))


@keys.command("reshare")
@click.option("--threshold", type=int, default=None,
              help="T of the new committee (default: the current T, if still a majority of the new hospitals).")
@click.option("--ceremony-id", default=None, help="The new ceremony's id (default: a fresh one).")
@click.option("--timeout", type=float, default=300.0, show_default=True,
              help="Seconds to wait for each step of the hospitals.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Also write the new public.ctx here.")
@click.pass_obj
def keys_reshare(obj: Context, threshold, ceremony_id, timeout, out_dir):
    """Change the committee to the hospitals of CXR_MQ_HOSPITALS: a new key ceremony (exactly
    'keys init --threshold T') through the running hospital workers, which take the new
    context without a restart, delete their old shares and hand the current model over to
    the hospitals that join. Refused while a round is open (docs/threshold.md)."""
    from . import rounds, threshold_flow
    from .contexts import stored_context
    from .runtime import make_store

    settings = obj.settings()
    store = make_store(settings)
    codec = stored_context(store, settings.public_context_key)
    if codec is None or codec.profile != "threshold":
        _fail(f"{settings.public_context_key}: the current context is "
              f"{'missing' if codec is None else codec.profile}, not a threshold committee: "
              "run 'cxr-mq keys init --threshold T' for the first ceremony")
    opened = rounds.list_rounds(store)
    if opened:
        last = rounds.RoundState.load(store, opened[-1])
        if last is None or last.status == rounds.OPEN:
            _fail(f"round {opened[-1]} is open: change the committee between rounds (its members delete their "
                  "old shares, and a round of the old committee could then not be decrypted)", 1)
        if last.status == rounds.COMPLETE and not threshold_flow.outcomes(store, last.round) and \
                (rounds.read_json(store, rounds.round_key(last.round)) or {}).get("codec_profile") == "threshold":
            _fail(f"round {last.round}'s committee has not decrypted it yet: change the committee between rounds", 1)
    new = tuple(sorted(settings.hospitals))
    added, removed = sorted(set(new) - set(codec.parties)), sorted(set(codec.parties) - set(new))
    t = threshold or codec.threshold
    click.echo(f"reshare: committee {codec.threshold}-of-{len(codec.parties)} ({', '.join(codec.parties)}) -> "
               f"{t}-of-{len(new)} ({', '.join(new)}); adding {', '.join(added) or 'none'}, removing "
               f"{', '.join(removed) or 'none'}: a new ceremony (keys init --threshold {t})", err=True)
    _threshold_ceremony(obj, settings, t, ceremony_id, timeout, out_dir,
                        extra={"previous_ceremony_id": codec.ceremony_id, "added": added, "removed": removed})


def _wrap_key_id(settings: Settings) -> str:
    key = settings.secret_kms_key_id or settings.kms_key_id
    if not key:
        raise ConfigError("CXR_MQ_SECRET_KMS_KEY_ID", "is required to KMS-wrap a secret key file "
                          "(or CXR_MQ_KMS_KEY_ID)")
    return key


@keys.command("wrap")
@click.argument("secret_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False),
              help="The wrapped key file to write (mode 0600); may be SECRET_FILE itself.")
@click.option("--force", is_flag=True, help="Replace an existing OUT.")
@click.pass_obj
def keys_wrap(obj: Context, secret_file, out_file, force):
    """KMS-wrap a secret context file (envelope: KMS GenerateDataKey + AES-256-GCM)."""
    from . import crypto
    from .crypto import keyfile
    from .runtime import make_kms

    settings = obj.settings()
    source, out = Path(secret_file), Path(out_file)
    if out.exists() and not force:
        _fail(f"{out}: exists already (use --force to replace it)")
    data = source.read_bytes()
    if keyfile.is_wrapped(data):
        _fail(f"{source}: is KMS-wrapped already")
    try:
        codec = crypto.load_context(data)
    except crypto.CodecError as exc:
        raise type(exc)(f"{source}: {exc}") from exc
    if not codec.has_secret_key:
        _fail(f"{source}: holds no secret key (nothing to wrap)")
    wrapped = keyfile.wrap(data, make_kms(settings), _wrap_key_id(settings),
                           {"cxr-mq:fingerprint": codec.fingerprint})
    keyfile.write_secret_file(out, wrapped)
    click.echo(json.dumps({"wrapped": str(out), "fingerprint": codec.fingerprint,
                           "kms_key_id": keyfile.read_header(wrapped)["kms_key_id"]}, indent=1))


# -- identities -------------------------------------------------------------------------------
@main.group()
def identity():
    """Party identities: Ed25519 signing and X25519 key-agreement keys, and their registry."""


@identity.command("init")
@click.option("--id", "party_id", required=True, help="The party's id (also its broker user name).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for ID.key (mode 0600, private keys) and ID.pub (public keys).")
@click.option("--force", is_flag=True, help="Replace existing identity files.")
def identity_init(party_id, out_dir, force):
    """Create an identity: DIR/ID.key (private, 0600) and DIR/ID.pub (public)."""
    from .identity import Identity, IdentityError

    try:
        ident = Identity.generate(party_id)
        key_path, pub_path = ident.save(out_dir, force=force)
    except IdentityError as exc:
        _fail(str(exc))
    click.echo(json.dumps({"id": ident.id, "key": str(key_path), "pub": str(pub_path),
                           **{k: v for k, v in ident.public.to_dict().items() if k != "id"}}, indent=1))


@identity.command("register")
@click.argument("party_id")
@click.argument("pubfile", type=click.Path(exists=True, dir_okay=False))
@click.option("--role", required=True, type=click.Choice(["hospital", "aggregator", "controller"]))
@click.option("--force", is_flag=True, help="Replace an entry registered with other keys or role.")
@click.pass_obj
def identity_register(obj: Context, party_id, pubfile, role, force):
    """Add PUBFILE's public keys to the registry in the bucket (keys/identities/ID)."""
    from .identity import IdentityError, PublicIdentity, register, registry_key
    from .runtime import make_store

    settings = obj.settings()
    try:
        public = PublicIdentity.load(pubfile)
        if public.id != party_id:
            _fail(f"{pubfile} holds the identity of {public.id!r}, not {party_id!r}")
        entry = register(make_store(settings), public, role, force=force)
    except IdentityError as exc:
        _fail(str(exc))
    click.echo(json.dumps({"registered": registry_key(party_id), **entry.to_dict()}, indent=1))


@identity.command("show")
@click.argument("party_id", required=False)
@click.pass_obj
def identity_show(obj: Context, party_id):
    """Print one registry entry, or every registered party."""
    from .identity import IdentityError, Registry
    from .runtime import make_store

    registry = Registry(make_store(obj.settings()))
    try:
        entries = [registry.get(party_id)] if party_id else registry.parties()
    except IdentityError as exc:
        _fail(str(exc), 1)
    click.echo(json.dumps([e.to_dict() for e in entries], indent=1))


# -- broker administration --------------------------------------------------------------------
@main.group()
def broker():
    """Broker administration: per-party permissions and the durable topology."""


@broker.command("permissions")
@click.option("--role", required=True,
              type=click.Choice(["hospital", "aggregator", "controller", "admin"]))
@click.option("--id", "party_id", required=True, help="The party's id: its broker user name.")
@click.option("--namespace", default=None, help="Queue/exchange prefix (default: settings).")
@click.option("--vhost", default="/", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object (for Ansible).")
@click.pass_obj
def broker_permissions(obj: Context, role, party_id, namespace, vhost, as_json):
    """The least-privilege permissions of one party's broker user."""
    from .config import validate_hospital_id
    from .transport.permissions import permissions_for

    validate_hospital_id(party_id)
    settings = obj.settings(namespace=namespace)
    perms = permissions_for(role, party_id, settings.namespace)
    if as_json:
        click.echo(json.dumps({**perms.to_dict(), "vhost": vhost, "namespace": settings.namespace}))
        return
    import shlex
    for args in perms.rabbitmqctl(vhost):
        click.echo("rabbitmqctl " + " ".join(shlex.quote(a) for a in args))


@broker.command("declare")
@click.option("--hospital", "hospitals", multiple=True,
              help="A hospital whose queue to declare (repeatable; default: configured hospitals).")
@click.pass_obj
def broker_declare(obj: Context, hospitals):
    """Declare the exchanges and queues (admin login): workers only check that they exist."""
    from .runtime import make_broker

    settings = obj.settings(hospitals=tuple(hospitals) or None)
    with make_broker(settings) as admin:
        admin.declare_topology(settings.hospitals)
    t = admin.topology
    click.echo(json.dumps({"namespace": t.namespace, "exchanges": [t.control_exchange,
                           t.dead_letter_exchange], "queues": [t.aggregator_queue, t.dead_letter_queue]
                           + [t.hospital_queue(h) for h in settings.hospitals]}))


# -- workers ----------------------------------------------------------------------------------
def _stop_on_signals():
    """A stop event that SIGTERM and SIGINT set, installed first thing in a worker command:
    a signal that arrives during start-up (importing TensorFlow, loading keys, connecting)
    then stops the worker cleanly (exit 0) instead of killing it with the default action.
    The worker re-installs its own handlers (which log) on the same event once it exists."""
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    return stop


def _serve_metrics(port):
    if port:
        from prometheus_client import start_http_server
        start_http_server(port, addr="127.0.0.1")


@main.command()
@click.option("--id", "hospital_id", required=True, help="This hospital's id (letters, digits, - and _).")
@click.option("--data", "data_dir", default=None, type=click.Path(exists=True, file_okay=False),
              help="COVIDx-format directory: a label file and the images.")
@click.option("--secret-context", type=click.Path(dir_okay=False), default=None,
              help="Single-key profiles (compact, seed): the secret context's path (or "
                   "CXR_MQ_SECRET_CONTEXT). Threshold profile: none; before any key exists the "
                   "hospital takes part in the key ceremony (keys init) and adopts its key.")
@click.option("--skip-bad", is_flag=True, help="Skip malformed label lines and missing images.")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@click.option("--synthetic", is_flag=True,
              help="Benchmarks only: replace local training by a seeded synthetic update.")
@click.option("--identity", "identity_path", type=click.Path(dir_okay=False), default=None,
              help="This party's identity key file (or CXR_MQ_IDENTITY).")
@click.pass_obj
def hospital(obj: Context, hospital_id, data_dir, secret_context, skip_bad, metrics_port, synthetic,
             identity_path):
    """Run a hospital worker (long-running)."""
    stop = _stop_on_signals()
    from workers.hospital import HospitalWorker

    from .runtime import load_hospital_codec, load_identity, make_broker, make_store, make_verifier

    validate_hospital_id(hospital_id)
    if data_dir is None and not synthetic:
        _fail("--data: a hospital needs its image directory (or --synthetic for benchmarks)")
    settings = obj.settings(secret_context=secret_context, identity=identity_path)
    store = make_store(settings)
    codec = load_hospital_codec(settings, store)
    ident = load_identity(settings, store, "hospital", hospital_id)
    broker = make_broker(settings.require("amqp_url"))
    _serve_metrics(metrics_port)
    worker = HospitalWorker(broker, store, codec, hospital_id, data_dir, settings.work_dir,
                            skip_bad=skip_bad, synthetic=synthetic,
                            keep_plaintext_updates=settings.keep_plaintext_updates,
                            committee_timeout=float(settings.committee_timeout),
                            min_clients_floor=settings.min_clients_floor,
                            identity=ident, verifier=make_verifier(settings, store), stop=stop)
    worker.install_signal_handlers()
    try:
        worker.run()
    finally:
        broker.close()


@main.command()
@click.option("--public-context", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Public CKKS context file (default: keys/public-context from the bucket).")
@click.option("--metrics-port", type=int, default=None, help="Serve Prometheus metrics on this port.")
@click.option("--lease", "lease_seconds", type=click.IntRange(min=1), default=None,
              help="Run with a standby: aggregators share a lease of this many seconds in the "
                   "store; one is active, the others take over when it lapses.")
@click.option("--id", "aggregator_id", default=None,
              help="This aggregator's name in the lease (default: host:pid).")
@click.option("--identity", "identity_path", type=click.Path(dir_okay=False), default=None,
              help="This party's identity key file (or CXR_MQ_IDENTITY).")
@click.pass_obj
def aggregator(obj: Context, public_context, metrics_port, lease_seconds, aggregator_id, identity_path):
    """Run the aggregator worker (long-running; public context only)."""
    stop = _stop_on_signals()
    from workers.aggregator import AggregatorWorker

    from .runtime import load_identity, load_public_codec, make_broker, make_store, make_verifier

    settings = obj.settings(aggregator_lease=lease_seconds, aggregator_id=aggregator_id,
                            identity=identity_path)
    store = make_store(settings)
    codec = load_public_codec(store, settings, public_context)
    ident = load_identity(settings, store, "aggregator")
    broker = make_broker(settings.require("amqp_url"))
    _serve_metrics(metrics_port)
    lease = None
    if settings.aggregator_lease:
        import socket

        from .lease import Lease
        lease = Lease(store, settings.aggregator_id or f"{socket.gethostname()}:{os.getpid()}",
                      ttl=settings.aggregator_lease)
    worker = AggregatorWorker(broker, store, codec, hospitals=settings.hospitals, lease=lease,
                              retain_updates=settings.retain_updates,
                              prefetch=settings.aggregator_prefetch,
                              identity=ident, verifier=make_verifier(settings, store), stop=stop)
    worker.install_signal_handlers()
    try:
        worker.run()
    finally:
        broker.close()
    if worker.lease_lost:
        _fail(f"aggregator lease lost: {worker.lease_lost}; restart this one as a standby",
              EXIT_LEASE_LOST)


# -- controller -------------------------------------------------------------------------------
def _training_options(f):
    for option in reversed([
        click.option("--model", default="small-cnn", show_default=True, help="Model name."),
        click.option("--image-size", type=int, default=64, show_default=True),
        click.option("--classes", type=click.Choice(["binary", "3class"]), default="binary",
                     show_default=True),
        click.option("--epochs", type=int, default=1, show_default=True),
        click.option("--lr", type=float, default=1e-3, show_default=True),
        click.option("--batch-size", type=int, default=16, show_default=True),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--width", type=float, default=1.0, show_default=True,
                     help="Channel multiplier (covidnet-s, small-cnn; mobilenetv2's alpha)."),
        click.option("--depth", type=int, default=1, show_default=True,
                     help="Module-count multiplier (covidnet-s, small-cnn)."),
        click.option("--balance", type=click.Choice(["none", "weights", "resample"]), default="weights",
                     show_default=True, help="Class balancing on skewed hospitals."),
        click.option("--server-lr", type=float, default=1.0, show_default=True,
                     help="FedAvg server learning rate (applied by each hospital to its update)."),
        click.option("--strategy", type=click.Choice(["fedavg", "fedprox", "scaffold", "fedavgm",
                                                      "fedadam", "fedyogi", "fedsgd"]),
                     default="fedavg", show_default=True,
                     help="Federated strategy (docs/model-quality.md); the aggregator only adds."),
        click.option("--prox-mu", type=float, default=0.01, show_default=True, help="FedProx mu."),
        click.option("--server-momentum", type=float, default=0.9, show_default=True, help="FedAvgM beta."),
        click.option("--beta1", type=float, default=0.9, show_default=True, help="FedAdam/FedYogi beta1."),
        click.option("--beta2", type=float, default=0.99, show_default=True, help="FedAdam/FedYogi beta2."),
        click.option("--tau", type=float, default=1e-3, show_default=True, help="FedAdam/FedYogi tau."),
        click.option("--bias-correction/--no-bias-correction", default=False, show_default=True,
                     help="FedAdam/FedYogi/FedSGD: Adam's bias correction of the server step."),
        click.option("--server-clipnorm", type=float, default=0.0, show_default=True,
                     help="Server optimizers: clip the pseudo-gradient per tensor at this norm (0: off)."),
        click.option("--local-steps", type=int, default=0, show_default=True,
                     help="Steps of a local epoch whatever the hospital's size (0: one pass); "
                          "fedsgd: SGD steps per round (0: one)."),
        click.option("--local-optimizer", type=click.Choice(["adam", "sgd"]), default="adam", show_default=True,
                     help="Local training's optimizer, fresh each round (sgd: with --local-momentum)."),
        click.option("--local-momentum", type=float, default=0.9, show_default=True,
                     help="Momentum of --local-optimizer sgd."),
        click.option("--epoch-fraction", type=float, default=1.0, show_default=True,
                     help="Each local epoch covers this fraction of the local data (more rounds, fewer steps)."),
        click.option("--logit-adjust", type=float, default=0.0, show_default=True,
                     help="Label skew: weight of log(local class prior) in local training's loss (0: off)."),
        click.option("--sample-rate", type=float, default=0.0, show_default=True,
                     help="fedsgd: draw each image into a step's batch with this probability (Poisson "
                          "sampling; B / N matches a central batch of B over N images); 0: a fixed batch."),
        click.option("--shuffle-rounds", type=int, default=0, show_default=True,
                     help="fedsgd: every R rounds are an epoch; each hospital steps on one of R slices of "
                          "its shuffled images a round (R = N / B: central's shuffled epochs); 0: off."),
    ]):
        f = option(f)
    return f


@main.command("start-round")
@click.option("--quorum", type=int, default=None,
              help="Updates that complete the round (default: number of configured hospitals, or 1).")
@click.option("--min-clients", type=int, default=None,
              help="Fewest updates accepted at the deadline (default: the quorum); at least "
                   "min_clients_floor (3 unless lowered in the configuration).")
@click.option("--deadline", type=float, default=3600.0, show_default=True,
              help="Seconds the aggregator waits for the quorum.")
@click.option("--hospital", "hospitals", multiple=True,
              help="Expected participant (repeatable; default: the configured hospitals).")
@_training_options
@click.option("--wait", is_flag=True, help="Block until the round completes or aborts.")
@click.option("--timeout", type=float, default=None,
              help="With --wait: give up after this many seconds (default: deadline + 60).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--synthetic-params", type=click.IntRange(min=1), default=None,
              help="Benchmarks only: a first round on a synthetic model of this many parameters "
                   "(for hospitals run with --synthetic).")
@click.option("--identity", "identity_path", type=click.Path(dir_okay=False), default=None,
              help="This party's identity key file (or CXR_MQ_IDENTITY).")
@click.option("--max-samples", type=click.IntRange(min=1), default=100_000, show_default=True,
              help="Threshold profile: the sample count that weighs 1 in FedAvg (a hospital with more "
                   "is refused); declare it close to the largest hospital for precision.")
@click.option("--weight-bound", type=click.FloatRange(min=0, min_open=True), default=8.0, show_default=True,
              help="Threshold profile: the largest |weight| an update may carry.")
@click.option("--committee-timeout", type=float, default=180.0, show_default=True,
              help="Threshold profile, with --wait: seconds to wait for the committee after model_ready.")
@click.pass_obj
def start_round(obj: Context, quorum, min_clients, deadline, hospitals, model, image_size, classes,
                epochs, lr, batch_size, seed, width, depth, balance, server_lr, strategy, prox_mu,
                server_momentum, beta1, beta2, tau, bias_correction, server_clipnorm, local_steps, local_optimizer,
                local_momentum, epoch_fraction, logit_adjust, sample_rate, shuffle_rounds, wait, timeout, as_json,
                synthetic_params, identity_path, max_samples, weight_bound, committee_timeout):
    """Open a round: write its record and publish round_start."""
    from . import controller, training
    from .runtime import load_identity, load_public_codec, make_broker, make_store, make_verifier

    settings = obj.settings(hospitals=tuple(hospitals) or None, identity=identity_path)
    try:
        params = training.TrainingParams(model=model, image_size=image_size, classes=classes,
                                         epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                                         width=width, depth=depth, balance=balance, server_lr=server_lr,
                                         strategy=strategy, prox_mu=prox_mu, server_momentum=server_momentum,
                                         beta1=beta1, beta2=beta2, tau=tau, bias_correction=bias_correction,
                                         server_clipnorm=server_clipnorm, local_steps=local_steps,
                                         local_optimizer=local_optimizer,
                                         local_momentum=local_momentum, epoch_fraction=epoch_fraction,
                                         logit_adjust=logit_adjust, sample_rate=sample_rate,
                                         shuffle_rounds=shuffle_rounds)
    except ValueError as exc:
        _fail(str(exc))
    quorum = quorum or max(1, len(settings.hospitals))
    request = controller.RoundRequest(quorum=quorum, min_clients=min_clients or quorum,
                                      deadline_seconds=deadline, training=params,
                                      hospitals=settings.hospitals,
                                      synthetic_params=synthetic_params or 0,
                                      max_samples=max_samples, weight_bound=weight_bound,
                                      min_clients_floor=settings.min_clients_floor)
    if request.quorum < 1 or deadline <= 0:
        _fail("--quorum and --deadline must be positive")
    try:
        request.check()
    except ValueError as exc:
        _fail(str(exc))
    store = make_store(settings)
    codec = load_public_codec(store, settings)
    ident = load_identity(settings, store, "controller")
    with make_broker(settings.require("amqp_url")) as broker:
        broker.declare_topology(settings.hospitals)
        queue = broker.temporary_queue(["model_ready", "round_aborted"]) if wait else None
        start = controller.open_round(broker, store, codec, request, ident)
        if not wait:
            result = {"round": start["round"], "status": "started",
                      "base_model_key": start["base_model_key"]}
            click.echo(json.dumps(result) if as_json else f"round {start['round']} started")
            return
        try:
            outcome = controller.wait_for_round(broker, queue, start["round"],
                                                timeout or deadline + 60, store=store,
                                                verifier=make_verifier(settings, store))
        except controller.RoundTimeout as exc:
            _fail(str(exc), 1)
    result = controller.round_result(start, outcome)
    if codec.profile == "threshold" and result["status"] == "complete":
        committee = controller.wait_for_committee(store, start["round"], committee_timeout)
        result["committee"] = committee
        if not committee["decrypted"]:
            result["status"], result["reason"] = controller.UNDECRYPTABLE, committee["reason"]
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(f"round {result['round']}: {result['status']}; contributors "
                   f"{', '.join(result['contributors']) or '-'}; samples {result['total_samples']}"
                   + (f"; reason: {result['reason']}" if result["reason"] else ""))
    sys.exit(0 if result["status"] == "complete" else 1)


@main.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--watch", "watch_live", is_flag=True,
              help="Follow the open round live: per hospital trained, uploaded, accepted or refused, and the time left.")
@click.option("--round", "round_no", type=int, default=None, help="With --watch: this round (default: the open one).")
@click.option("--interval", type=float, default=2.0, show_default=True, help="With --watch: seconds between refreshes.")
@click.pass_obj
def status(obj: Context, as_json, watch_live, round_no, interval):
    """List rounds with their state, contributors and refusals (or follow one with --watch)."""
    from . import controller
    from .runtime import make_store

    if watch_live:
        from rich.console import Console

        from .watch import watch
        if as_json:
            _fail("--watch and --json: choose one")
        if interval <= 0:
            _fail("--interval must be positive")
        watch(make_store(obj.settings()), Console(), round_no=round_no, interval=interval)
        return
    rows = controller.status(make_store(obj.settings()))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        click.echo("no rounds yet")
    for row in rows:
        click.echo(f"round {row['round']:>4}  {row['state']:<9} contributors: "
                   f"{', '.join(row['contributors']) or '-'}  samples: {row['total_samples']}"
                   + (f"  reason: {row['reason']}" if row["reason"] else ""))
        timings = {k: v for k, v in row["timings"].items() if isinstance(v, (int, float))}
        if timings:
            click.echo("      timings: " + ", ".join(f"{k.replace('_seconds', '')} {v:.2f}s"
                                                   for k, v in sorted(timings.items())))
        for refusal in row["refused"]:
            click.echo(f"      refused {refusal['hospital']}: {refusal['reason']}")
        for refusal in row.get("refused_by_hospitals", []):
            click.echo(f"      {refusal['hospital']} refused {refusal['message']}: {refusal['reason']}")


@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory for index.html, the PNG plots and report.json.")
@click.option("--rounds", "round_range", default=None, metavar="A..B",
              help="Rounds to report: A..B, A.., ..B or N (default: all).")
@click.option("--json", "as_json", is_flag=True, help="Also print report.json on stdout.")
@click.pass_obj
def report(obj: Context, out_dir, round_range, as_json):
    """Report a federation's rounds from the store: model quality overall and per hospital,
    contributors and refusals, bytes and timings (HTML page with plots, and report.json)."""
    from .history import collect, parse_rounds
    from .report import write_federation_report
    from .runtime import make_store

    try:
        low, high = parse_rounds(round_range)
    except ValueError as exc:
        raise ConfigError("--rounds", str(exc).removeprefix("--rounds ")) from None
    settings = obj.settings()
    history = collect(make_store(settings), low, high)
    if not history:
        _fail(f"no rounds in s3://{settings.s3_bucket}"
              + (f" within --rounds {round_range}" if round_range else ""), 1)
    result = write_federation_report(out_dir, history, {
        "bucket": settings.s3_bucket, "rounds": round_range or "all",
        "first_round": history[0].round, "last_round": history[-1].round})
    if as_json:
        click.echo(json.dumps(result, default=float))
    else:
        click.echo(f"report: {Path(out_dir) / 'index.html'} ({len(history)} rounds)")


# -- data -------------------------------------------------------------------------------------
@main.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--n", "n", type=int, default=200, show_default=True, help="Number of images.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--classes", type=click.Choice(["binary", "3class"]), default="binary", show_default=True)
@click.option("--size", type=int, default=64, show_default=True, help="Image side in pixels.")
def synth(out_dir, n, seed, classes, size):
    """Write a COVIDx-format directory of synthetic chest X-rays."""
    from .synth import write_synthetic

    if n < 1 or size < 16:
        _fail("--n must be at least 1 and --size at least 16")
    label_file = write_synthetic(out_dir, n=n, seed=seed, classes=classes, size=size)
    click.echo(str(label_file))


@main.command()
@click.argument("label_file", type=click.Path(exists=True, dir_okay=False))
@click.option("--hospitals", type=int, required=True, help="Number of hospitals to split into.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--iid", is_flag=True, help="Split patients uniformly at random.")
@click.option("--alpha", type=float, default=None,
              help="Dirichlet concentration over classes (non-IID; smaller is more skewed).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--skip-bad", is_flag=True, help="Skip malformed lines and missing images.")
@click.option("--json", "as_json", is_flag=True)
def partition(label_file, hospitals, out_dir, iid, alpha, seed, skip_bad, as_json):
    """Split a COVIDx dataset across hospitals by patient (no patient in two hospitals)."""
    from .partition import format_class_table, partition_dataset

    if iid and alpha is not None:
        _fail("--iid and --alpha exclude each other")
    if alpha is not None and alpha <= 0:
        _fail("--alpha must be positive")
    if hospitals < 1:
        _fail("--hospitals must be at least 1")
    table = partition_dataset(label_file, hospitals, out_dir, alpha=None if iid else (alpha or 0.5),
                              seed=seed, skip_bad=skip_bad)
    click.echo(json.dumps(table, indent=1) if as_json else format_class_table(table))


def _round_model(obj: Context, round_no, secret_context, hospital, work_dir):
    """(model, params, round): the model hospital ``hospital`` holds (``--hospital``; its work
    directory under the settings' ``work_dir``, or ``--work-dir``), else the aggregate
    decrypted with the secret context (single-key FedAvg/FedProx rounds only)."""
    from .evaluation import as_model, decrypted_model, hospital_model
    from .runtime import load_secret_codec, make_store

    settings = obj.settings(secret_context=secret_context)
    if hospital is not None:
        validate_hospital_id(hospital)
        if secret_context:
            _fail("--hospital and --secret-context: choose one (a hospital's model needs no key)")
        weights, params, used = hospital_model(make_store(settings), Path(work_dir or settings.work_dir) / hospital,
                                               round_no)
    elif work_dir:
        _fail("--work-dir needs --hospital ID (whose model to use)")
    else:
        codec = load_secret_codec(settings)  # first: a key file that does not load is the first thing to say
        weights, params, used = decrypted_model(make_store(settings), codec, round_no)
    return as_model(weights, params), params, used


def _model_options(f):
    for option in reversed([
        click.option("--round", "round_no", type=int, default=None, help="Round (default: latest complete)."),
        click.option("--hospital", default=None,
                     help="Use the model this hospital holds (any profile and strategy; needs no key): "
                          "WORK_DIR/ID/global.npy, checked to be the round's."),
        click.option("--work-dir", type=click.Path(file_okay=False, exists=True), default=None,
                     help="With --hospital: the work directory holding ID/ (default: CXR_MQ_WORK_DIR)."),
        click.option("--secret-context", type=click.Path(dir_okay=False), default=None,
                     help="Without --hospital: decrypt a compact/seed FedAvg or FedProx aggregate with this key."),
    ]):
        f = option(f)
    return f


@main.command()
@click.option("--data", "label_file", required=True, type=click.Path(exists=True),
              help="A COVIDx label file (or a directory holding one).")
@_model_options
@click.option("--skip-bad", is_flag=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def evaluate(obj: Context, round_no, hospital, work_dir, label_file, secret_context, skip_bad, as_json):
    """Report COVID-Net-style metrics of a round's global model on labelled data."""
    from .data import find_label_file
    from .evaluation import evaluate_label_file
    from .metrics import format_report

    model, params, used = _round_model(obj, round_no, secret_context, hospital, work_dir)
    report = evaluate_label_file(model, params, find_label_file(label_file), skip_bad=skip_bad)
    report["round"] = used
    if hospital:
        report["hospital"] = hospital
    click.echo(json.dumps(report, indent=1) if as_json else f"round {used}\n{format_report(report)}")


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@_model_options
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def predict(obj: Context, images, round_no, hospital, work_dir, secret_context, as_json):
    """Class probabilities per image from a round's global model."""
    from . import training
    from .data import load_images

    model, params, used = _round_model(obj, round_no, secret_context, hospital, work_dir)
    classes = training.class_names(params.classes)
    proba = training.predict_proba(model, load_images(list(images), params.image_size))
    rows = [{"image": path, "round": used, "probabilities": dict(zip(classes, map(float, p))),
             "prediction": classes[int(p.argmax())]} for path, p in zip(images, proba)]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        for row in rows:
            probs = "  ".join(f"{c}={v:.3f}" for c, v in row["probabilities"].items())
            click.echo(f"{row['image']}: {row['prediction']}  ({probs})")


@main.command()
@click.option("--hospitals", type=int, default=None, help="Hospitals (default 3).")
@click.option("--rounds", "n_rounds", type=int, default=None, help="FedAvg rounds.")
@click.option("--data", default=None, metavar="LABELFILE",
              help="A COVIDx label file to use instead of synthetic data.")
@click.option("--n", "n_images", type=int, default=None, help="Synthetic images (without --data).")
@click.option("--model", default=None, help="Model name.")
@click.option("--width", type=float, default=None, help="Channel multiplier of the model.")
@click.option("--image-size", type=int, default=None)
@click.option("--classes", type=click.Choice(["binary", "3class"]), default=None)
@click.option("--epochs", type=int, default=None, help="Local epochs per round.")
@click.option("--lr", type=float, default=None, help="Round 1's learning rate.")
@click.option("--lr-final", type=float, default=None,
              help="The last round's learning rate (default: --lr / 10; cosine in between).")
@click.option("--server-lr", type=float, default=None, help="FedAvg server learning rate.")
@click.option("--augment/--no-augment", default=None, help="COVID-Net's training augmentation.")
@click.option("--alpha", type=float, default=None,
              help="Dirichlet non-IID concentration over classes; 0 means IID.")
@click.option("--seed", type=int, default=None)
@click.option("--profile", type=click.Choice(PROFILES), default=None,
              help="Codec profile (default: codec_profile, threshold unless configured): threshold runs the "
                   "key ceremony through the hospitals and the committee decrypts every round; compact or "
                   "seed share one secret key, for comparison.")
@click.option("--plaintext", is_flag=True, help="Run without encryption.")
@click.option("--compare", is_flag=True, help="Run encrypted and plaintext, and compare them.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False), default=None,
              help="Write report.json, PNG plots and index.html here.")
@click.option("--broker", default=None, help="amqp://... to use RabbitMQ instead of the embedded broker.")
@click.option("--store", default=None, help="s3://BUCKET (with the S3 settings) or a directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.pass_obj
def demo(obj: Context, hospitals, n_rounds, data, n_images, model, width, image_size, classes,
         epochs, lr, lr_final, server_lr, augment, alpha, seed, profile, plaintext, compare, report_dir,
         broker, store, as_json):
    """The whole federation on one machine (embedded broker and store by default). Unset
    options take the demo's defaults (cxr_mq.demo.DemoOptions, described in the README)."""
    from .demo import DemoError, DemoOptions, run_demo
    from .report import build_report, write_report
    from .view import LiveView

    settings = obj.settings(log_level=obj.log_level or "warning", log_format=obj.log_format or "console")
    if plaintext and compare:
        _fail("--plaintext and --compare: choose one (--compare runs both)")
    given = {"hospitals": hospitals, "rounds": n_rounds, "n": n_images, "model": model,
             "width": width, "image_size": image_size, "classes": classes, "epochs": epochs,
             "lr": lr, "lr_final": lr_final, "server_lr": server_lr, "augment": augment,
             "seed": seed}
    options = DemoOptions(**{k: v for k, v in given.items() if v is not None}, data=data,
                          broker=broker, store=store, profile=profile or settings.codec_profile,
                          plaintext=plaintext,
                          work_dir=settings.work_dir if Path(settings.work_dir).is_dir() else None,
                          warm_up=compare)
    if alpha is not None:
        options.alpha = alpha or None
    options.validate()  # ConfigError: one line naming the flag, exit 2
    modes = ["encrypted", "plaintext"] if compare else ["plaintext" if plaintext else "encrypted"]
    results = {}
    for mode in modes:
        options.plaintext = mode == "plaintext"
        view = LiveView(title=mode)
        try:
            results[mode] = run_demo(options, settings, view=view)
        except DemoError as exc:
            _fail(f"demo: {exc}", 1)
        finally:
            view.close()
    report = write_report(report_dir, results) if report_dir else build_report(results)
    if as_json:
        click.echo(json.dumps(report, default=float))
        return
    if "overhead_ratio" in report:
        click.echo(f"encryption overhead: rounds' wall time {report['overhead_ratio']:.2f}x "
                   f"plaintext, bytes uploaded {report['bytes_ratio']:.1f}x")
    if report_dir:
        click.echo(f"report: {Path(report_dir) / 'index.html'}")


@main.command()
@click.option("--params", type=int, default=1_000_000, show_default=True,
              help="Model parameters per update.")
@click.option("--hospitals", "hospitals", type=int, multiple=True,
              help="Hospital counts for the aggregator memory figure (repeatable; default 2, 10, 50).")
@click.option("--profile", "profiles", type=click.Choice(["seed", "compact", "threshold"]), multiple=True,
              help="Profiles to measure (default both).")
@click.option("--round/--no-round", "with_round", default=True, show_default=True,
              help="Also time embedded demo rounds encrypted (threshold) and in plaintext, after two warm-up rounds.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def bench(obj: Context, params, hospitals, profiles, with_round, as_json):
    """Measure the codec profiles (size, speed, precision, memory) and the round overhead."""
    from .bench import _check_targets, results_table, round_overhead, run_codec_bench

    settings = obj.settings(log_level=obj.log_level or "warning")
    if params < 1 or any(k < 1 for k in hospitals):
        _fail("--params and --hospitals must be positive")
    log = (lambda message: click.echo(message, err=True))
    result = run_codec_bench(params, list(hospitals) or [2, 10, 50],
                             tuple(profiles) or ("seed", "compact", "threshold"), log=log)
    if with_round:
        result.update(round_overhead(settings=settings, log=log))
        result["targets"] = _check_targets(result)
    click.echo(json.dumps(result, indent=1, default=float) if as_json else results_table(result))


@main.command("bench-federated", context_settings={"ignore_unknown_options": True, "help_option_names": []})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_federated(args):
    """Central vs federated (encrypted FedAvg) training on synthetic CXR; --help for options.

    Trains for minutes: a benchmark, not a test (cxr_mq/central_bench.py)."""
    from .central_bench import main as central_bench_main

    central_bench_main(list(args), prog="cxr-mq bench-federated")


@main.command("bench-federation")
@click.option("--hospitals", type=click.IntRange(min=1), required=True, help="Hospitals (N).")
@click.option("--params", type=click.IntRange(min=1), required=True, help="Model parameters (P).")
@click.option("--rounds", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--round-timeout", type=float, default=3600.0, show_default=True,
              help="Seconds a round may take before the bench gives up.")
@click.option("--hospital-priority", type=click.Choice(["low", "same"]), default="low",
              show_default=True,
              help="low: each simulated hospital thread runs at nice 19, so the figures measure "
                   "the aggregator and the store (hospitals have their own machines in a real "
                   "federation); same: hospitals compete with them for the cores.")
@click.option("--aggregator-prefetch", type=click.IntRange(min=0), default=None,
              help="Updates the aggregator fetches ahead (default: aggregator_prefetch, 3); "
                   "0: one at a time.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.pass_obj
def bench_federation(obj: Context, hospitals, params, rounds, round_timeout, hospital_priority,
                     aggregator_prefetch, as_json):
    """Rounds of N hospitals x P parameters through the real workers, RabbitMQ and S3.

    Local training is replaced by a seeded synthetic update (said in the output); the store
    is moto's server on loopback, started here, unless CXR_MQ_S3_ENDPOINT_URL is set (then
    CXR_MQ_S3_BUCKET, if set, must hold no rounds). Uses its own broker namespace."""
    from . import bench_federation as bench
    from .log import configure_logging

    import signal
    # SIGTERM unwinds like Ctrl-C: the aggregator, moto and the bench's queues are cleaned up
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    settings = obj.settings()
    configure_logging(obj.log_level or "warning", settings.log_format)  # N workers' logs
    options = bench.BenchOptions(
        hospitals=hospitals, params=params, rounds=rounds, round_timeout=round_timeout,
        amqp_url=settings.amqp_url or bench.BenchOptions.amqp_url,
        s3_endpoint_url=settings.s3_endpoint_url,
        s3_bucket=settings.s3_bucket if settings.s3_endpoint_url else None,
        kms_key_id=settings.kms_key_id if settings.s3_endpoint_url else None,
        region=settings.aws_region or "us-east-1", hospital_priority=hospital_priority,
        aggregator_prefetch=(settings.aggregator_prefetch if aggregator_prefetch is None
                             else aggregator_prefetch))
    try:
        result = bench.run(options)
    except (RuntimeError, ValueError) as exc:
        _fail(f"bench-federation: {exc}", 1)
    if as_json:
        click.echo(bench.main_json(result))
        return
    click.echo(f"bench-federation: {result['synthetic_training']}")
    click.echo(f"hospitals: {result['hospital_priority_note']}; aggregator prefetch: "
               f"{result['aggregator_prefetch']}")
    click.echo(f"store: {result['store']}; broker: {result['broker']} (namespace "
               f"{result['namespace']}); load average before/after: "
               f"{result['load_average_before'][0]:.1f} / {result['load_average_after'][0]:.1f}")
    click.echo(bench.table(result))


if __name__ == "__main__":  # pragma: no cover
    main()
