"""Settings: CLI flags, then environment (``CXR_MQ_*``), then an optional TOML file.

Secrets (credentials, the AMQP password inside the URL) are read from the environment or
the file only, never from flags. A missing or invalid setting raises :class:`ConfigError`
naming the key; the CLI turns it into a one-line message and exit code 2.
"""
from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping

ENV_PREFIX = "CXR_MQ_"
DEFAULT_CONFIG_PATH = Path("/etc/cxr-mq/config.toml")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
LIST_KEYS = ("hospitals", "shared_broker_users")
PROFILES = ("threshold", "compact", "seed")  # the first is the default
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,62}$")


class ConfigError(Exception):
    def __init__(self, key: str, problem: str):
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


@dataclass(frozen=True)
class Settings:
    amqp_url: str | None = None
    amqp_ca_file: str | None = None  # CA bundle that signs the broker's certificate
    amqp_cert_file: str | None = None  # optional client certificate (PEM) ...
    amqp_key_file: str | None = None  # ... and its private key
    amqp_tls_required: bool = False  # refuse a plain amqp:// URL
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    kms_key_id: str | None = None
    secret_context: str | None = None
    secret_kms_key_id: str | None = None  # KMS key that wraps secret key files (keys wrap)
    kms_endpoint_url: str | None = None  # KMS API endpoint; unset: the S3 endpoint, else AWS
    identity: str | None = None  # path of this party's identity key file (cxr-mq identity init)
    aws_region: str | None = None
    namespace: str = "cxr"
    hospitals: tuple[str, ...] = ()
    shared_broker_users: tuple[str, ...] = ()  # broker logins that may publish for any party (dev)
    message_max_age: int = 86400  # seconds a signed message stays usable
    # the fewest updates an aggregate may sum: start-round refuses a smaller --min-clients and
    # hospitals refuse to take part in, or decrypt, anything smaller (an aggregate of one or
    # two updates reveals them to the other hospitals); lowering it is an operator's decision
    min_clients_floor: int = 3
    aggregator_lease: int = 0  # seconds; >0: aggregators share a lease, one active, others standby
    aggregator_id: str | None = None  # this aggregator's name in the lease (default host:pid)
    aggregator_prefetch: int = 3  # updates fetched and hash-checked ahead of the one summed; 0: none
    public_context_key: str = "keys/public-context"
    codec_profile: str = "threshold"  # keys init's profile: threshold (ceremony) or compact/seed (one key)
    log_level: str = "info"
    log_format: str = "json"
    work_dir: str = field(default_factory=lambda: str(Path.home() / ".cxr-mq"))
    retain_updates: bool = False  # keep individual encrypted updates after the aggregate
    keep_plaintext_updates: int = 0  # rounds of plaintext update .npy a hospital keeps (0: none)
    committee_timeout: int = 120  # threshold profile: seconds a hospital waits for the committee

    # -- requirements, checked by the commands that need them ------------------------------
    def require(self, *names: str) -> "Settings":
        for name in names:
            if getattr(self, name) in (None, "", ()):
                raise ConfigError(env_name(name), "is required but not set "
                                  f"(set {env_name(name)} or '{name}' in the config file)")
        return self

    def identity_path(self) -> Path:
        self.require("identity")
        path = Path(self.identity)
        if not path.is_file():
            raise ConfigError(env_name("identity"), f"no such file: {path}")
        return path

    def secret_context_path(self) -> Path:
        self.require("secret_context")
        path = Path(self.secret_context)
        if not path.is_file():
            raise ConfigError(env_name("secret_context"), f"no such file: {path}")
        return path


def env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _split_list(value) -> tuple[str, ...]:
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    return tuple(v.strip() for v in str(value).split(",") if v.strip())


def _validate(s: Settings) -> Settings:
    for url in (s.amqp_url or "").split(","):  # a cluster: its nodes' URLs, comma-separated
        if s.amqp_url and not re.match(r"^amqps?://", url.strip()):
            raise ConfigError(env_name("amqp_url"), f"must start with amqp:// or amqps:// (a list: "
                              f"comma-separated), got {_redact(url.strip())!r}")
    for key in ("s3_endpoint_url", "kms_endpoint_url"):
        if getattr(s, key) and not re.match(r"^https?://[^/]+", getattr(s, key)):
            raise ConfigError(env_name(key), f"must be an http(s) URL, got {getattr(s, key)!r}")
    if s.s3_bucket and not _BUCKET_RE.match(s.s3_bucket):
        raise ConfigError(env_name("s3_bucket"), f"is not a valid S3 bucket name: {s.s3_bucket!r}")
    if not _ID_RE.match(s.namespace):
        raise ConfigError(env_name("namespace"), f"must be letters, digits, '-' or '_', got {s.namespace!r}")
    for hospital in s.hospitals:
        if not _ID_RE.match(hospital):
            raise ConfigError(env_name("hospitals"), f"invalid hospital id {hospital!r}")
    if s.committee_timeout < 1:
        raise ConfigError(env_name("committee_timeout"), f"must be at least 1 second, got {s.committee_timeout}")
    if s.min_clients_floor < 1:
        raise ConfigError(env_name("min_clients_floor"), f"must be at least 1, got {s.min_clients_floor}")
    if s.aggregator_prefetch < 0:
        raise ConfigError(env_name("aggregator_prefetch"),
                          f"must be 0 (no look-ahead) or more, got {s.aggregator_prefetch}")
    if s.message_max_age < 1:
        raise ConfigError(env_name("message_max_age"), f"must be at least 1 second, got {s.message_max_age}")
    if s.codec_profile not in PROFILES:
        raise ConfigError(env_name("codec_profile"), f"must be 'threshold', 'compact' or 'seed', got {s.codec_profile!r}")
    if s.log_format not in ("json", "console"):
        raise ConfigError(env_name("log_format"), f"must be 'json' or 'console', got {s.log_format!r}")
    if s.log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(env_name("log_level"), f"must be debug, info, warning or error, got {s.log_level!r}")
    return s


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]+):([^@]+)@", r"//\1:***@", url)


def validate_hospital_id(hospital_id: str) -> str:
    if not _ID_RE.match(hospital_id or ""):
        raise ConfigError("--id", f"invalid hospital id {hospital_id!r} (letters, digits, '-', '_')")
    return hospital_id


def _read_toml(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    data = data.get("cxr_mq", data)
    known = {f.name for f in fields(Settings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError("--config", f"{path}: unknown key(s) {', '.join(unknown)}")
    return data


def load_settings(flags: Mapping[str, object] | None = None, env: Mapping[str, str] | None = None,
                  config_path: str | Path | None = None) -> Settings:
    """Merge the three sources, highest precedence first: flags, environment, TOML file."""
    env = os.environ if env is None else env
    path = config_path or env.get(ENV_PREFIX + "CONFIG")
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    values: dict[str, object] = _read_toml(Path(path)) if path else {}
    for f in fields(Settings):
        if env.get(env_name(f.name)):
            values[f.name] = env[env_name(f.name)]
    if not values.get("aws_region"):
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
        if region:
            values["aws_region"] = region
    for name, value in (flags or {}).items():
        if value not in (None, ()):
            values[name] = value
    for key in LIST_KEYS:
        if key in values:
            values[key] = _split_list(values[key])
    typed = {f.name: type(f.default) for f in fields(Settings) if type(f.default) in (bool, int)}
    for key, value in values.items():
        if key in typed:
            values[key] = _typed(key, value, typed[key])
        elif key not in LIST_KEYS and value is not None and not isinstance(value, str):
            raise ConfigError(env_name(key), f"must be a string, got {type(value).__name__}")
    return _validate(replace(Settings(), **values))


def _typed(key: str, value, kind: type):
    """A bool or int setting from TOML (typed already) or the environment (a string)."""
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip().lower()
    if kind is bool and text in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return text in ("true", "1", "yes", "on")
    if kind is int and re.fullmatch(r"\d+", text):
        return int(text)
    expected = "true or false" if kind is bool else "a whole number >= 0"
    raise ConfigError(env_name(key), f"must be {expected}, got {value!r}")
