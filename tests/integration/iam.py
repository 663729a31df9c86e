"""The deployment's S3 permissions, as AWS would judge them, for tests.

``render`` turns the provisioning playbook's policy templates
(``ansible/templates/provision/policy-<role>.json.j2``, ``bucket-policy.json.j2``) into the JSON
that ``provision.yml`` attaches, with the same variables. ``decide`` evaluates one request
against a role's identity policy and the bucket policy with AWS's rules for what these policies
use: an explicit Deny wins, then an Allow, else implicitly denied; ``*`` in an ARN matches any
run of characters (``/`` too) and ``?`` exactly one; the bucket policy's conditions on the
SSE-KMS headers are evaluated on the request's parameters. Anything else in a policy (NotAction,
NotResource, another condition operator) raises: a check that cannot judge a policy must not
pass it.

``audited_calls`` reads the lines ``CXR_MQ_S3_AUDIT`` makes each process write (one per S3 API
call), and ``request_of`` maps a call to the IAM action and resource AWS authorizes it as.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2

ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = ROOT / "ansible" / "templates" / "provision"
PARTITION, REGION = "aws", "eu-west-1"
KEY_ARN = "arn:aws:kms:eu-west-1:123456789012:key/11111111-2222-3333-4444-555555555555"

# botocore operation -> the IAM action S3 authorizes it as
# (https://docs.aws.amazon.com/AmazonS3/latest/userguide/using-with-s3-policy-actions.html)
OBJECT_ACTIONS = {
    "GetObject": "s3:GetObject", "HeadObject": "s3:GetObject",
    "PutObject": "s3:PutObject", "CreateMultipartUpload": "s3:PutObject",
    "UploadPart": "s3:PutObject", "CompleteMultipartUpload": "s3:PutObject",
    "AbortMultipartUpload": "s3:AbortMultipartUpload", "DeleteObject": "s3:DeleteObject",
}
BUCKET_ACTIONS = {"ListObjectsV2": "s3:ListBucket", "ListObjects": "s3:ListBucket",
                  "HeadBucket": "s3:ListBucket", "ListObjectVersions": "s3:ListBucketVersions"}


def render(template: str, bucket: str, hospital_id: str | None = None, role: str | None = None) -> dict:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                             undefined=jinja2.StrictUndefined)
    env.filters["to_json"] = json.dumps
    text = env.get_template(template).render(
        provision_partition=PARTITION, cxr_mq_s3_bucket=bucket, cxr_mq_aws_region=REGION,
        provision_key={"key_arn": KEY_ARN},
        item={"hospital_id": hospital_id, "role": role, "name": f"cxr-mq-{role}"})
    return json.loads(text)


def role_policy(role: str, bucket: str, hospital_id: str | None = None) -> dict:
    return render(f"policy-{role}.json.j2", bucket, hospital_id=hospital_id, role=role)


def bucket_policy(bucket: str) -> dict:
    return render("bucket-policy.json.j2", bucket)


def _glob(pattern: str, value: str) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, flags=re.DOTALL) is not None


def _listed(field) -> list[str]:
    return field if isinstance(field, list) else [field]


def _conditions_hold(conditions: dict, context: dict) -> bool:
    """Every condition block holds. Only the operators the bucket policy uses are known."""
    for operator, tests in conditions.items():
        for key, expected in tests.items():
            expected = _listed(expected)
            present = key in context
            value = context.get(key)
            if operator == "Bool":
                holds = present and str(value).lower() in [str(e).lower() for e in expected]
            elif operator == "StringNotEquals":
                holds = not present or value not in expected  # AWS: a missing key matches
            elif operator == "StringNotEqualsIfExists":
                holds = present and value not in expected
            elif operator == "StringEquals":
                holds = present and value in expected
            else:
                raise ValueError(f"condition operator {operator} is not evaluated here")
            if not holds:
                return False
    return True


def _statement_applies(statement: dict, action: str, resource: str, context: dict) -> bool:
    unknown = set(statement) - {"Sid", "Effect", "Action", "Resource", "Condition", "Principal"}
    if unknown:
        raise ValueError(f"policy statement {statement.get('Sid')}: {sorted(unknown)} not evaluated here")
    if not any(_glob(a, action) for a in _listed(statement["Action"])):
        return False
    if not any(_glob(r, resource) for r in _listed(statement["Resource"])):
        return False
    return _conditions_hold(statement.get("Condition", {}), context)


def decide(policies: list[dict], action: str, resource: str, context: dict | None = None) -> str:
    """``"allow"``, ``"deny"`` (explicit) or ``"implicit-deny"`` for one request."""
    context = {"aws:SecureTransport": "true", **(context or {})}
    verdict = "implicit-deny"
    for policy in policies:
        for statement in policy["Statement"]:
            if _statement_applies(statement, action, resource, context):
                if statement["Effect"] == "Deny":
                    return "deny"
                verdict = "allow"
    return verdict


def request_of(call: dict) -> tuple[str, str, dict]:
    """The IAM action, resource ARN and condition context of one audited S3 call."""
    op, bucket = call["op"], call["bucket"]
    if op in BUCKET_ACTIONS:
        return BUCKET_ACTIONS[op], f"arn:{PARTITION}:s3:::{bucket}", {}
    if op not in OBJECT_ACTIONS:
        raise ValueError(f"S3 operation {op} has no known IAM action here: add it to iam.py")
    context = {}
    if op in ("PutObject", "CreateMultipartUpload"):
        if call.get("sse"):
            context["s3:x-amz-server-side-encryption"] = call["sse"]
        if call.get("sse_kms_key_id"):
            context["s3:x-amz-server-side-encryption-aws-kms-key-id"] = call["sse_kms_key_id"]
    return OBJECT_ACTIONS[op], f"arn:{PARTITION}:s3:::{bucket}/{call['key']}", context


def audited_calls(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def refused_calls(calls: list[dict], policies: list[dict], kms_key_id: str) -> list[str]:
    """The calls these policies would not allow, each as ``op key: verdict``. The request's own
    KMS key id (moto's here) stands for the deployment's key ARN, which is what a deployed
    worker sends (``cxr_mq_kms_key_id``)."""
    refused = []
    for call in calls:
        if call.get("sse_kms_key_id") == kms_key_id:
            call = {**call, "sse_kms_key_id": KEY_ARN}
        action, resource, context = request_of(call)
        verdict = decide(policies, action, resource, context)
        if verdict != "allow":
            refused.append(f"{call['op']} {call.get('key', call.get('prefix', ''))}: {verdict} ({action})")
    return sorted(set(refused))


def policies_for(cluster, name: str) -> list[dict]:
    """The identity policy of the role an audited process of ``cluster`` plays (a hospital by
    its id, the aggregator, and ``cli``: the commands an operator runs on the controller host)
    and the bucket policy."""
    bucket = cluster.s3["bucket"]
    if name in cluster.hospitals:
        role = role_policy("hospital", bucket, hospital_id=name)
    elif name.startswith("aggregator"):
        role = role_policy("aggregator", bucket)
    elif name == "cli":  # start-round, keys init/reshare (the key authority), status, report
        role = role_policy("controller", bucket)
    else:
        raise AssertionError(f"no role known for the audited process {name!r}")
    return [role, bucket_policy(bucket)]


def assert_policies_allow(cluster) -> dict[str, list[dict]]:
    """Every S3 call each audited process of ``cluster`` made is one the deployed policies
    allow; returns the calls, by process."""
    audited = {path.stem: audited_calls(path) for path in sorted(cluster.audit_dir.glob("*.jsonl"))}
    refused = {}
    for name, calls in audited.items():
        denied = refused_calls(calls, policies_for(cluster, name), cluster.s3["kms_key_id"])
        if denied:
            refused[name] = denied
    assert refused == {}, "calls the deployed IAM policies would refuse:\n" + "\n".join(
        f"{name}: {line}" for name, lines in refused.items() for line in lines)
    return audited
