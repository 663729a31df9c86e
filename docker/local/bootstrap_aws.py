"""Create the local stack's KMS key (with its alias) and bucket on the moto server.

Idempotent: run by the one-shot ``aws-init`` service of docker/compose.yml before anything
writes to S3. Reads the same variables as the workers: CXR_MQ_S3_ENDPOINT_URL,
CXR_MQ_S3_BUCKET, CXR_MQ_KMS_KEY_ID (an ``alias/...``) and AWS_REGION.
"""
from __future__ import annotations

import os
import sys
import time

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


def main() -> None:
    endpoint = os.environ["CXR_MQ_S3_ENDPOINT_URL"]
    bucket = os.environ["CXR_MQ_S3_BUCKET"]
    alias = os.environ["CXR_MQ_KMS_KEY_ID"]
    region = os.environ.get("AWS_REGION", "us-east-1")
    if not alias.startswith("alias/"):
        sys.exit(f"CXR_MQ_KMS_KEY_ID must be an alias/... name here, got {alias!r}")

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name=region)
    kms = boto3.client("kms", endpoint_url=endpoint, region_name=region)
    _wait(s3)

    aliases = {a["AliasName"]: a.get("TargetKeyId") for a in kms.list_aliases()["Aliases"]}
    if alias not in aliases:
        key_id = kms.create_key(Description="cxr-mq local stack")["KeyMetadata"]["KeyId"]
        kms.create_alias(AliasName=alias, TargetKeyId=key_id)
        aliases[alias] = key_id
    key_arn = kms.describe_key(KeyId=alias)["KeyMetadata"]["Arn"]

    existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        extra = {} if region == "us-east-1" else {
            "CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, **extra)
    # Same posture as production: SSE-KMS by default (the workers also ask for it per object).
    s3.put_bucket_encryption(Bucket=bucket, ServerSideEncryptionConfiguration={"Rules": [{
        "ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn},
        "BucketKeyEnabled": True}]})
    print(f"bucket {bucket} and KMS key {alias} ({key_arn}) ready on {endpoint}", flush=True)


if __name__ == "__main__":
    main()
