"""The least-privilege IAM policies the provisioning playbook attaches are the ones the workers
need, no more: every S3 call each process made in the session's federation (``two_rounds``:
the threshold key ceremony through three hospital processes, two encrypted rounds decrypted by
the committee, ``status``, ``report``) is one its role's policy and the bucket policy allow,
judged by AWS's rules (``iam.py``); and what a dishonest hospital or a compromised aggregator
would try is denied."""
from __future__ import annotations

import copy

import pytest

from cxr_mq import rounds

from . import iam

pytestmark = pytest.mark.integration

BUCKET = "cxr-mq-prod"


def test_every_s3_call_of_every_role_is_allowed_by_its_policy(two_rounds):
    cluster = two_rounds.cluster
    # what an operator runs on the controller host, in this test's order too
    cluster.cli("status")
    cluster.cli("report", "--out", str(cluster.tmp / "iam-report"))
    audited = iam.assert_policies_allow(cluster)
    # every role's processes made calls: the audit recorded the federation's work
    assert {"cli", "aggregator", *cluster.hospitals} <= set(audited), sorted(audited)
    ops = {c["op"] for calls in audited.values() for c in calls}
    assert {"GetObject", "PutObject", "ListObjectsV2"} <= ops, ops


def test_the_check_fails_when_a_policy_lacks_what_a_role_does(two_rounds):
    """The check above can fail: without its statement for its own update, a hospital's
    upload is refused; with a put that names another KMS key, the bucket policy denies it."""
    cluster = two_rounds.cluster
    calls = iam.audited_calls(cluster.audit_dir / "h1.jsonl")
    uploads = [c for c in calls if c["op"] == "PutObject" and c["key"].endswith("/updates/h1")]
    assert uploads, "h1 uploaded no update in the audit"
    policies = iam.policies_for(cluster, "h1")
    assert iam.refused_calls(uploads, policies, cluster.s3["kms_key_id"]) == []
    crippled = copy.deepcopy(policies)
    crippled[0]["Statement"] = [s for s in crippled[0]["Statement"] if s.get("Sid") != "OwnUpdateOnly"]
    assert iam.refused_calls(uploads, crippled, cluster.s3["kms_key_id"])
    other_key = [{**c, "sse_kms_key_id": "alias/cxr-mq"} for c in uploads]
    assert all(": deny " in line for line in iam.refused_calls(other_key, policies, cluster.s3["kms_key_id"]))
    unencrypted = [{k: v for k, v in c.items() if k not in ("sse", "sse_kms_key_id")} for c in uploads]
    assert all(": deny " in line for line in iam.refused_calls(unencrypted, policies, cluster.s3["kms_key_id"]))


@pytest.mark.parametrize("role,action,key", [
    # what the federation above did not need to do (nothing was refused): the keys are the
    # code's own (cxr_mq.rounds), so a renamed key shows here too
    ("hospital", "s3:GetObject", rounds.hospital_refusals_key(7, "h1")),  # a refusal, recorded
    ("hospital", "s3:PutObject", rounds.hospital_refusals_key(7, "h1")),
    ("hospital", "s3:PutObject", rounds.evaluation_key(7, "h1")),
    ("hospital", "s3:GetObject", rounds.hospital_unrouted_key("h1")),       # forged messages
    ("hospital", "s3:PutObject", rounds.hospital_unrouted_key("h1")),
    ("aggregator", "s3:GetObject", rounds.UNROUTED_REFUSALS_KEY),          # refusals of no round
    ("aggregator", "s3:PutObject", rounds.UNROUTED_REFUSALS_KEY),
    ("aggregator", "s3:DeleteObject", rounds.update_key(7, "h1")),         # retention
    ("controller", "s3:GetObject", rounds.UNROUTED_REFUSALS_KEY),          # status shows them
    ("controller", "s3:GetObject", rounds.hospital_refusals_key(7, "h2")),
    ("controller", "s3:GetObject", rounds.evaluation_key(7, "h2")),         # report
    ("controller", "s3:GetObject", rounds.hospital_unrouted_key("h2")),
])
def test_each_role_may_do_what_its_failure_paths_need(role, action, key):
    policies = [iam.role_policy(role, BUCKET, hospital_id="h1" if role == "hospital" else None),
                iam.bucket_policy(BUCKET)]
    context = {"s3:x-amz-server-side-encryption": "aws:kms",
               "s3:x-amz-server-side-encryption-aws-kms-key-id": iam.KEY_ARN}
    assert iam.decide(policies, action, _object(key), context) == "allow"


def _object(key: str) -> str:
    return f"arn:aws:s3:::{BUCKET}/{key}"


@pytest.mark.parametrize("action,key", [
    ("s3:GetObject", "rounds/000001/updates/h2"),        # another hospital's update
    ("s3:GetObject", "rounds/000001/updates/h2.msg"),
    ("s3:PutObject", "rounds/000001/updates/h2"),        # an update under another's name
    ("s3:PutObject", "rounds/000001/updates/h2.msg"),
    ("s3:PutObject", "rounds/000001/aggregate"),         # the aggregate, the round's state
    ("s3:PutObject", "rounds/000001/state"),
    ("s3:PutObject", "rounds/000002/round"),             # a round record of its own
    ("s3:PutObject", "keys/public-context"),             # the key everyone encrypts under
    ("s3:PutObject", "keys/identities/h2.pub"),          # another party's identity
    ("s3:PutObject", "rounds/000001/keys/h2"),           # another member's committee objects
    ("s3:PutObject", "rounds/000001/committee/partials/h2"),
    ("s3:PutObject", "keys/ceremony/c1/shares/h2/h1"),
    ("s3:PutObject", "keys/ceremony/c1/handover/h2/h4"),  # another member's sealed handover
    ("s3:DeleteObject", "rounds/000001/updates/h1"),     # even its own, once sent
    ("s3:PutObject", rounds.hospital_unrouted_key("h2")),
])
def test_a_hospital_cannot_touch_what_is_not_its_own(action, key):
    policies = [iam.role_policy("hospital", BUCKET, hospital_id="h1"), iam.bucket_policy(BUCKET)]
    context = {"s3:x-amz-server-side-encryption": "aws:kms",
               "s3:x-amz-server-side-encryption-aws-kms-key-id": iam.KEY_ARN}
    assert iam.decide(policies, action, _object(key), context) != "allow"


@pytest.mark.parametrize("action,key", [
    ("s3:PutObject", "keys/public-context"),             # swap the key hospitals encrypt under
    ("s3:PutObject", "keys/identities/aggregator.pub"),
    ("s3:PutObject", "rounds/000002/round"),             # open a round the controller did not
    ("s3:PutObject", "rounds/000001/updates/h1"),        # forge a hospital's update
    ("s3:PutObject", "rounds/000001/updates/h1.msg"),
    ("s3:GetObject", "keys/ceremony/c1/shares/h2/h1"),   # sealed shares: not even readable
    ("s3:PutObject", "rounds/000001/committee/partials/h1"),
])
def test_the_aggregator_cannot_forge_keys_rounds_or_updates(action, key):
    policies = [iam.role_policy("aggregator", BUCKET), iam.bucket_policy(BUCKET)]
    context = {"s3:x-amz-server-side-encryption": "aws:kms",
               "s3:x-amz-server-side-encryption-aws-kms-key-id": iam.KEY_ARN}
    assert iam.decide(policies, action, _object(key), context) != "allow"


def test_the_policy_evaluation_follows_aws_rules():
    policy = {"Statement": [
        {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::b/rounds/??????/state"},
        {"Effect": "Allow", "Action": "s3:*", "Resource": "arn:aws:s3:::b/open/*"},
        {"Effect": "Deny", "Action": "s3:PutObject", "Resource": "arn:aws:s3:::b/open/locked"}]}
    assert iam.decide([policy], "s3:GetObject", "arn:aws:s3:::b/rounds/000001/state") == "allow"
    assert iam.decide([policy], "s3:GetObject", "arn:aws:s3:::b/rounds/0000001/state") == "implicit-deny"
    assert iam.decide([policy], "s3:GetObject", "arn:aws:s3:::b/rounds/00001/state") == "implicit-deny"
    assert iam.decide([policy], "s3:PutObject", "arn:aws:s3:::b/open/a/b/c") == "allow"  # * spans /
    assert iam.decide([policy], "s3:PutObject", "arn:aws:s3:::b/open/locked") == "deny"
    assert iam.decide([policy], "s3:PutObject", "arn:aws:s3:::b/rounds/000001/state") == "implicit-deny"
    with pytest.raises(ValueError, match="NotResource"):
        iam.decide([{"Statement": [{"Effect": "Allow", "Action": "s3:*", "NotResource": "x"}]}],
                   "s3:GetObject", "arn:aws:s3:::b/x")
