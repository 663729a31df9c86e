"""`cxr-mq demo --broker amqp://... --store s3://BUCKET`: the same demo (default profile:
threshold, its ceremony and committee) on the real RabbitMQ and moto's S3+KMS server. Every object the run leaves is SSE-KMS encrypted, it stays under its own
prefix (a bucket holding other rounds does not confuse it), and its broker namespace is gone
afterwards.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import boto3
import pika
import pytest

from cxr_mq.transport.base import Topology, TransportError
from cxr_mq.transport.rabbitmq import RabbitMQBroker

pytestmark = pytest.mark.integration

HOSPITALS = ["hospital-1", "hospital-2", "hospital-3"]  # the threshold committee's floor


def test_demo_on_rabbitmq_and_s3(tmp_path, amqp_url, s3_settings):
    s3 = boto3.client("s3", endpoint_url=s3_settings["endpoint_url"], region_name=s3_settings["region"])
    # another federation's round in the same bucket: the demo must not continue from it
    s3.put_object(Bucket=s3_settings["bucket"], Key="rounds/000007/round", Body=b"{}",
                  ServerSideEncryption="aws:kms", SSEKMSKeyId=s3_settings["kms_key_id"])
    env = {**os.environ, "CXR_MQ_WORK_DIR": str(tmp_path), "TF_CPP_MIN_LOG_LEVEL": "2",
           "CXR_MQ_S3_ENDPOINT_URL": s3_settings["endpoint_url"],
           "CXR_MQ_KMS_KEY_ID": s3_settings["kms_key_id"], "AWS_REGION": s3_settings["region"]}
    result = subprocess.run(
        [sys.executable, "-m", "cxr_mq.cli", "demo", "--broker", amqp_url,
         "--store", f"s3://{s3_settings['bucket']}", "--hospitals", "3", "--rounds", "1",
         "--n", "100", "--image-size", "32", "--epochs", "1", "--model", "small-cnn", "--json"],
        env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)

    assert [r["round"] for r in report["rounds"]] == [1]
    assert sorted(report["rounds"][0]["contributors"]) == HOSPITALS
    assert 0.0 <= report["rounds"][0]["metrics"]["accuracy"] <= 1.0
    settings = report["settings"]
    namespace, prefix = settings["namespace"], settings["store_prefix"]
    assert namespace.startswith("demo-") and prefix == f"demo/{namespace}/"
    if "@" in amqp_url and ":" in amqp_url.split("@")[0][len("amqp://"):]:
        assert "***" in settings["broker"]  # the password never reaches the report

    # every object is SSE-KMS with the configured key; the run's objects are under its prefix
    keys = [obj["Key"] for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=s3_settings["bucket"]) for obj in page.get("Contents", [])]
    ours = {k[len(prefix):] for k in keys if k.startswith(prefix)}
    assert {"rounds/000001/round", "rounds/000001/state", "rounds/000001/aggregate"} <= ours, sorted(keys)
    # the default profile over the real services: the key ceremony's objects, the collective
    # public key as the run's public context, the committee's partials for round 1
    ceremony = report["ceremony"]
    assert settings["codec_profile"] == "threshold" and ceremony["kept"] == HOSPITALS
    assert {f"keys/ceremony/{ceremony['ceremony_id']}/public", "keys/public-context"} <= ours
    assert {f"rounds/1/committee/partials/{m}" for m in report["rounds"][0]["committee"]["active"]} <= ours
    assert report["rounds"][0]["committee"]["decrypted_by"] == HOSPITALS
    # retention (the default): the individual updates went once the aggregate was announced
    assert not [k for k in ours if "/updates/" in k], sorted(keys)
    for key in keys:
        head = s3.head_object(Bucket=s3_settings["bucket"], Key=key)
        assert head.get("ServerSideEncryption") == "aws:kms", key
        assert s3_settings["kms_key_id"] in head.get("SSEKMSKeyId", ""), key

    # the run's namespace is gone from the broker: queues and exchanges
    topology = Topology(namespace)
    broker = RabbitMQBroker(amqp_url, topology, reconnect_for=5)
    try:
        for queue in [topology.aggregator_queue, topology.dead_letter_queue,
                      *(topology.hospital_queue(h) for h in HOSPITALS)]:
            with pytest.raises(TransportError):
                broker.queue_depth(queue)
    finally:
        broker.close()
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        for exchange in (topology.control_exchange, topology.dead_letter_exchange):
            channel = connection.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
                channel.exchange_declare(exchange, passive=True)
            assert refused.value.reply_code == 404
    finally:
        connection.close()
