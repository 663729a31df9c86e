"""The Ansible assets run for real: ansible-lint's production profile, the provisioning play
against moto's server, and the roles applied to localhost in a sandbox prefix with service
management off. Nothing here skips: scripts/setup.sh installs Ansible (the deploy extra).

Each playbook run is expensive (seconds of Ansible start-up per run on a shared 2-core host),
so every run happens once per module in a fixture and the tests read its results.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = BIN / name
    assert path.is_file(), f"{path} is missing: run scripts/setup.sh (installs pyproject's deploy extra)"
    return str(path)


def test_ansible_lint_production_profile():
    result = subprocess.run([_tool("ansible-lint"), "--profile", "production", "--strict", "--offline", "--nocolor"],
                            cwd=ANSIBLE, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    assert "Profile 'production' was required, and it passed" in result.stdout + result.stderr


def _playbook(args: list[str], env: dict | None = None, timeout: float = 600) -> dict:
    """Run ansible-playbook with the JSON callback; the parsed report (plays, stats)."""
    run_env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.json", "ANSIBLE_NOCOLOR": "1",
               "ANSIBLE_RETRY_FILES_ENABLED": "0", **(env or {})}
    result = subprocess.run([_tool("ansible-playbook"), *args], cwd=ANSIBLE, env=run_env,
                            capture_output=True, text=True, timeout=timeout)
    try:
        report = json.loads(result.stdout[result.stdout.index("{"):])
    except ValueError:
        pytest.fail(f"ansible-playbook {args} printed no JSON report:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    report["rc"] = result.returncode
    report["stderr"] = result.stderr
    return report


def _failures(report: dict) -> list[str]:
    out = []
    for play in report.get("plays", []):
        for task in play["tasks"]:
            for host, res in task["hosts"].items():
                if res.get("failed") or res.get("unreachable"):
                    out.append(f"{task['task']['name']} on {host}: {res.get('msg', res)}"[:2000])
    return out or ([report["stderr"][-3000:]] if report["rc"] else [])


def _changed_tasks(report: dict) -> list[str]:
    return [f"{task['task']['name']} on {host}" for play in report.get("plays", []) for task in play["tasks"]
            for host, res in task["hosts"].items() if res.get("changed")]


# -- provisioning against moto's server -----------------------------------------------------
PROVISION_REGION = "eu-central-1"  # the region inventory/aws_ec2.yml lists


@pytest.fixture(scope="module")
def provisioned(moto_endpoint, aws_env):
    """provision.yml run twice against moto: the two reports and what the play was given."""
    boto3 = pytest.importorskip("boto3")
    name = f"cxr-{uuid.uuid4().hex[:6]}"
    ec2 = boto3.client("ec2", endpoint_url=moto_endpoint, region_name=PROVISION_REGION)
    ami = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    given = {"aws_endpoint_url": moto_endpoint, "cxr_mq_aws_region": PROVISION_REGION, "provision_name": name,
             "cxr_mq_s3_bucket": f"{name}-bucket", "provision_hospitals": ["hospital-a", "hospital-b"],
             "provision_ami_id": ami}
    args = ["-i", "localhost,", "provision.yml", "-e", json.dumps(given)]
    first = _playbook(args)
    assert not _failures(first), _failures(first)
    second = _playbook(args)
    clients = {svc: boto3.client(svc, endpoint_url=moto_endpoint, region_name=PROVISION_REGION)
               for svc in ("s3", "kms", "iam", "ec2")}
    return {"first": first, "second": second, "given": given, "name": name, **clients}


def test_provision_twice_second_run_changes_nothing(provisioned):
    assert _changed_tasks(provisioned["first"]), "the first run against an empty account created nothing"
    assert not _failures(provisioned["second"]), _failures(provisioned["second"])
    assert _changed_tasks(provisioned["second"]) == [], "the second run changed things"
    assert provisioned["second"]["stats"]["localhost"]["changed"] == 0


def test_provisioned_bucket_is_private_versioned_sse_kms_tls_only(provisioned):
    s3, kms, bucket = provisioned["s3"], provisioned["kms"], provisioned["given"]["cxr_mq_s3_bucket"]
    key_arn = kms.describe_key(KeyId=f"alias/{provisioned['name']}")["KeyMetadata"]["Arn"]
    rule = s3.get_bucket_encryption(Bucket=bucket)["ServerSideEncryptionConfiguration"]["Rules"][0]
    assert rule["ApplyServerSideEncryptionByDefault"] == {"SSEAlgorithm": "aws:kms", "KMSMasterKeyID": key_arn}
    assert rule["BucketKeyEnabled"] is True
    assert s3.get_bucket_versioning(Bucket=bucket)["Status"] == "Enabled"
    block = s3.get_public_access_block(Bucket=bucket)["PublicAccessBlockConfiguration"]
    assert all(block[k] for k in ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"))
    statements = {s["Sid"]: s for s in json.loads(s3.get_bucket_policy(Bucket=bucket)["Policy"])["Statement"]}
    assert statements["DenyInsecureTransport"]["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}
    assert statements["DenyPutWithoutSseKms"]["Condition"]["StringNotEquals"] == {
        "s3:x-amz-server-side-encryption": "aws:kms"}
    assert statements["DenyPutWithAnotherKey"]["Condition"]["StringNotEqualsIfExists"] == {
        "s3:x-amz-server-side-encryption-aws-kms-key-id": key_arn}
    assert all(s["Effect"] == "Deny" for s in statements.values())
    lifecycle = s3.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    purge = [r for r in lifecycle if r["ID"] == "purge-deleted-updates"][0]
    assert purge["Status"] == "Enabled" and purge["NoncurrentVersionExpiration"]["NoncurrentDays"] >= 1


def test_provisioned_key_rotates_and_serves_workers_through_s3_only(provisioned):
    kms, name = provisioned["kms"], provisioned["name"]
    key_id = kms.describe_key(KeyId=f"alias/{name}")["KeyMetadata"]["KeyId"]
    assert kms.get_key_rotation_status(KeyId=key_id)["KeyRotationEnabled"] is True
    policy = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
    workers = [s for s in policy["Statement"] if s["Sid"] == "WorkersThroughS3Only"][0]
    assert workers["Condition"]["StringEquals"]["kms:ViaService"] == f"s3.{PROVISION_REGION}.amazonaws.com"
    principals = workers["Principal"]["AWS"]
    assert {p.rsplit("/", 1)[1] for p in principals} == {
        f"{name}-aggregator", f"{name}-controller", f"{name}-hospital-hospital-a", f"{name}-hospital-hospital-b"}


def _role_policy(iam, role: str) -> list[dict]:
    return iam.get_role_policy(RoleName=role, PolicyName="cxr-mq")["PolicyDocument"]["Statement"]


def _resources(statements, action) -> list[str]:
    out = []
    for s in statements:
        actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
        if action in actions and s["Effect"] == "Allow":
            out += [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
    return out


def test_provisioned_roles_least_privilege(provisioned):
    iam, name = provisioned["iam"], provisioned["name"]
    bucket = provisioned["given"]["cxr_mq_s3_bucket"]
    for own, other in (("hospital-a", "hospital-b"), ("hospital-b", "hospital-a")):
        role = f"{name}-hospital-{own}"
        statements = _role_policy(iam, role)
        puts = _resources(statements, "s3:PutObject")
        assert puts and all(p.startswith(f"arn:aws:s3:::{bucket}/rounds/??????/updates/{own}") for p in puts), puts
        assert not any(other in r or r.endswith("/*") for r in puts + _resources(statements, "s3:GetObject"))
        profile = iam.get_instance_profile(InstanceProfileName=role)["InstanceProfile"]
        assert [r["RoleName"] for r in profile["Roles"]] == [role]
    aggregator = _role_policy(iam, f"{name}-aggregator")
    assert not any("/updates/" in r for r in _resources(aggregator, "s3:PutObject"))
    assert not any("keys/" in r for r in _resources(aggregator, "s3:PutObject"))
    with pytest.raises(iam.exceptions.NoSuchEntityException):
        iam.get_role_policy(RoleName=f"{name}-broker", PolicyName="cxr-mq")


def _group(ec2, name: str) -> dict:
    return ec2.describe_security_groups(Filters=[{"Name": "group-name", "Values": [name]}])["SecurityGroups"][0]


def test_provisioned_broker_port_open_to_cxr_hosts_only(provisioned):
    ec2, name = provisioned["ec2"], provisioned["name"]
    broker, workers = _group(ec2, f"{name}-broker"), _group(ec2, f"{name}-workers")
    controller = _group(ec2, f"{name}-controller")
    for perm in broker["IpPermissions"]:
        assert not perm.get("IpRanges") and not perm.get("Ipv6Ranges"), f"broker open to addresses: {perm}"
    amqps = [p for p in broker["IpPermissions"] if p["FromPort"] <= 5671 <= p["ToPort"]]
    sources = {pair["GroupId"] for p in amqps for pair in p["UserIdGroupPairs"]}
    assert sources == {workers["GroupId"], controller["GroupId"]}
    assert not any(p["FromPort"] <= 5672 <= p["ToPort"] for p in broker["IpPermissions"]), "plain AMQP open"
    assert not any(p.get("IpRanges") for p in workers["IpPermissions"])


def test_provisioned_instances_imdsv2_encrypted_and_tagged(provisioned):
    ec2, name = provisioned["ec2"], provisioned["name"]
    reservations = ec2.describe_instances(Filters=[{"Name": "tag:federation", "Values": [name]},
                                                   {"Name": "instance-state-name", "Values": ["pending", "running"]}])
    instances = [i for r in reservations["Reservations"] for i in r["Instances"]]
    tags = [{t["Key"]: t["Value"] for t in i["Tags"]} for i in instances]
    assert sorted(t["cxr_mq_role"] for t in tags) == ["aggregator", "broker", "controller", "hospital", "hospital"]
    assert sorted(t["cxr_mq_hospital_id"] for t in tags if t["cxr_mq_role"] == "hospital") == ["hospital-a", "hospital-b"]
    for inst, tag in zip(instances, tags):
        assert inst["MetadataOptions"]["HttpTokens"] == "required", f"{tag['Name']} allows IMDSv1"
        assert inst["IamInstanceProfile"]["Arn"].endswith("/" + tag["Name"])
        volumes = ec2.describe_volumes(VolumeIds=[m["Ebs"]["VolumeId"] for m in inst["BlockDeviceMappings"]])
        assert all(v["Encrypted"] for v in volumes["Volumes"]), f"{tag['Name']} has an unencrypted volume"


def test_ec2_inventory_groups_the_provisioned_instances(provisioned, moto_endpoint):
    result = subprocess.run([_tool("ansible-inventory"), "-i", "inventory/aws_ec2.yml", "--list"], cwd=ANSIBLE,
                            env={**os.environ, "AWS_URL": moto_endpoint}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    inventory = json.loads(result.stdout)
    name = provisioned["name"]
    assert f"{name}-hospital-hospital-a" in inventory["hospital"]["hosts"]
    assert f"{name}-aggregator" in inventory["aggregator"]["hosts"]
    assert f"{name}-broker" in inventory["broker"]["hosts"]
    hostvars = inventory["_meta"]["hostvars"]
    assert hostvars[f"{name}-hospital-hospital-b"]["cxr_mq_hospital_id"] == "hospital-b"
