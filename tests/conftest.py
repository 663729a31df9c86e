"""Shared fixtures: a real moto S3+KMS server on loopback and the real RabbitMQ.

Integration tests never mock boto3 or the broker: they talk HTTP to moto's server and AMQP
to RabbitMQ. Each test gets its own bucket and broker namespace so tests cannot see each
other's objects or messages.
"""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

AMQP_URL = os.environ.get("CXR_MQ_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
REGION = "us-east-1"


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """moto's S3+KMS server as a separate process on a free loopback port (the same helper
    `cxr-mq bench-federation` starts it with)."""
    from cxr_mq.bench_federation import moto_server

    with moto_server(tmp_path_factory.mktemp("moto")) as (endpoint, _pid):
        yield endpoint


@pytest.fixture(scope="session")
def aws_env(moto_endpoint):
    """Fake credentials for moto, set for this process and inherited by worker subprocesses."""
    values = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
              "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION}
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    yield values
    for key, old in saved.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def new_bucket(moto_endpoint: str) -> dict:
    """A fresh bucket and KMS key on the moto server: dict(endpoint_url, bucket, kms_key_id, region)."""
    import boto3

    kms = boto3.client("kms", endpoint_url=moto_endpoint, region_name=REGION)
    key_id = kms.create_key(Description="cxr-mq test")["KeyMetadata"]["KeyId"]
    bucket = f"cxr-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name=REGION).create_bucket(Bucket=bucket)
    return {"endpoint_url": moto_endpoint, "bucket": bucket, "kms_key_id": key_id, "region": REGION}


@pytest.fixture
def s3_settings(moto_endpoint, aws_env):
    """A fresh bucket and KMS key on the moto server (see ``new_bucket``)."""
    return new_bucket(moto_endpoint)


@pytest.fixture(scope="session")
def amqp_url():
    """The real RabbitMQ; .ci/run and scripts/test.sh make sure it is up."""
    import pika

    try:
        pika.BlockingConnection(pika.URLParameters(AMQP_URL)).close()
    except Exception as exc:  # noqa: BLE001 - report any reason the broker is unusable
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL}: {exc!r}")
    return AMQP_URL


def new_namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def namespace():
    """A broker namespace of this test's own (queue and exchange name prefix)."""
    return new_namespace()


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def pytest_terminal_summary(terminalreporter, config):
    """Print the shuffle seed last, where a failing run's reader looks (also under -q)."""
    seed = getattr(config.option, "randomly_seed", None)
    if seed is not None and config.pluginmanager.hasplugin("randomly"):
        terminalreporter.write_line(
            f"test order: shuffled by pytest-randomly, repeat it with --randomly-seed={seed}")
