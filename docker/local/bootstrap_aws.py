"""Create (and keep) the local stack's KMS key alias, bucket and public context on moto.

Run by the ``aws-init`` service of docker/compose.yml. Idempotent; with ``--watch SECONDS`` it
checks again every SECONDS and recreates whatever a moto restart lost (moto keeps its state in
memory), then re-uploads the public CKKS context from ``--public-context`` once the key
ceremony has written it. Writes /tmp/aws-ready after the first pass (the service's health
check). Reads the same variables as the workers: CXR_MQ_S3_ENDPOINT_URL, CXR_MQ_S3_BUCKET,
CXR_MQ_KMS_KEY_ID (an ``alias/...``) and AWS_REGION.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import boto3
import botocore.exceptions


def _wait(client, attempts: int = 30) -> None:
    for _ in range(attempts):
        try:
            client.list_buckets()
            return
        except botocore.exceptions.EndpointConnectionError:
            time.sleep(1)
    sys.exit("moto server did not answer")


def ensure_bucket_and_key(s3, kms, bucket: str, alias: str, region: str) -> bool:
    """Create what is missing; True if anything was (moto lost its state, or first run)."""
    created = False
    aliases = {a["AliasName"] for a in kms.list_aliases()["Aliases"]}
    if alias not in aliases:
        key_id = kms.create_key(Description="cxr-mq local stack")["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName=alias, TargetKeyId=key_id)
        created = True
    key_arn = kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"]
    if bucket not in {b["Name"] for b in s3.list_buckets().get("Buckets", [])}:
        extra = {} if region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **extra)
        created = True
    # Same posture as production: SSE-KMS by default (the workers also ask for it per object).
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [{
        "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn},
        "BucketKeyEnabled": True}]})
    return created


def ensure_public_context(public: Path | None) -> bool:
    """Upload the public context with cxr-mq's own store (SSE-KMS, sha256 metadata) if missing."""
    if public is None or not public.is_file():
        return False
    from cxr_mq.config import load_settings
    from cxr_mq.runtime import make_store

    settings = load_settings()
    store = make_store(settings)
    if store.exists(settings.public_context_key):
        return False
    store.put_bytes(settings.public_context_key, public.read_bytes())
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--watch", type=float, default=0, help="check again every SECONDS (0: once)")
    parser.add_argument("--public-context", type=Path, default=None)
    args = parser.parse_args()
    endpoint = os.environ["CXR_MQ_S3_ENDPOINT_URL"]
    bucket = os.environ["CXR_MQ_S3_BUCKET"]
    alias = os.environ["CXR_MQ_KMS_KEY_ID"]
    region = os.environ.get("AWS_REGION", "us-east-1")
    if not alias.startswith("alias/"):
        sys.exit(f"CXR_MQ_KMS_KEY_ID must be an alias/... name here, got {alias!r}")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region)
    kms = boto3.client("kms", endpoint_url=endpoint, region_name=region)
    while True:
        try:
            _wait(s3)
            if ensure_bucket_and_key(s3, kms, bucket, alias, region):
                print(f"bucket {bucket} and KMS key {alias} ready on {endpoint}", flush=True)
            if ensure_public_context(args.public_context):
                print("public context uploaded", flush=True)
            Path("/tmp/aws-ready").touch()
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:  # moto restarting
            print(f"moto not ready: {exc}", flush=True)
        if not args.watch:
            return
        time.sleep(args.watch)


if __name__ == "__main__":
    main()
