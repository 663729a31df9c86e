"""The Ansible assets run for real: ansible-lint's production profile, the provisioning play
against moto's server, and the roles applied to localhost in a sandbox prefix with service
management off. Nothing here skips: scripts/setup.sh installs Ansible (the deploy extra).

Each playbook run is expensive (seconds of Ansible start-up per run on a shared 2-core host),
so every run happens once per module in a fixture and the tests read its results.
"""
from __future__ import annotations

import base64
import grp
import json
import os
import pwd
import re
import secrets
import shlex
import subprocess
import sys
import sysconfig
import time
import tomllib
import uuid
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.integration]

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
             "provision_ami_id": ami,
             # moto's server reports the lifecycle rule back at once: no 30 s of re-reading it
             "provision_lifecycle_wait": False}
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
        gets = _resources(statements, "s3:GetObject")
        # its own update, and (threshold profile) its own ceremony and committee objects; the
        # round's active set is the one shared object (written once, If-None-Match)
        # (and, since the IAM policies were checked against the workers' calls: its refusals
        # of a round and their list, its evaluations, its reshare handovers to newcomers)
        mine = re.compile(rf"arn:aws:s3:::{bucket}/(rounds/\?{{6}}/updates/{own}(\.msg|\.refused)?"
                          rf"|hospitals/{own}/refusals|rounds/\?{{6}}/evaluations/{own}"
                          rf"|keys/ceremony/\*/handover/{own}/\*"
                          rf"|keys/ceremony/\*/(contributions|received)/{own}(\.sig)?|keys/ceremony/\*/shares/{own}/\*"
                          rf"|rounds/\*/(keys|committee/(ready|partials|outcome))/{own}(\.sig)?"
                          rf"|rounds/\*/committee/active(\.sig)?)$")
        assert puts and all(mine.match(p) for p in puts), [p for p in puts if not mine.match(p)]
        assert f"arn:aws:s3:::{bucket}/rounds/??????/updates/{own}" in puts
        assert not any(other in r for r in puts + gets)
        assert not any("/updates/*" in r for r in gets), "a hospital reads another's update"
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


# -- the roles applied to localhost in a sandbox ----------------------------------------------
def _base_python() -> str:
    """The interpreter this venv was made from: what a host's /usr/bin/python3 is to the roles."""
    cfg = dict(line.split(" = ", 1) for line in (Path(sys.prefix) / "pyvenv.cfg").read_text().splitlines()
               if " = " in line)
    return cfg.get("executable") or str(Path(cfg["home"]) / "python3")


def _seed_venv(venv: Path) -> None:
    """Let the sandbox venv see this venv's packages (a path line in a .pth file, which does not
    activate this venv's editable cxr-mq), so the role's `pip install -c constraints.txt` finds
    every pinned dependency installed instead of downloading TensorFlow. The role still creates
    the venv and installs the wheel into it."""
    site = venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    site.mkdir(parents=True)
    (site / "_cxr_mq_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, moto_endpoint, aws_env, amqp_url):
    """site.yml applied to localhost (an aggregator and a hospital host, each under its own
    prefix; services not managed): a --check --diff run on the empty sandbox, then two applies."""
    import boto3

    root = tmp_path_factory.mktemp("deploy-sandbox")
    kms = boto3.client("kms", endpoint_url=moto_endpoint, region_name=aws_env["AWS_REGION"])
    key_id = kms.create_key(Description="cxr-mq deploy sandbox")["KeyMetadata"]["KeyId"]
    bucket = f"cxr-deploy-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name=aws_env["AWS_REGION"]).create_bucket(Bucket=bucket)
    _seed_venv(root / "venv")
    secret = os.urandom(3000)
    # Broker users on the shared RabbitMQ: unique names, removed at the end.
    tag = uuid.uuid4().hex[:8]
    parties = {"hospital": f"h-{tag}", "aggregator": f"agg-{tag}", "controller": f"ctl-{tag}", "admin": f"adm-{tag}"}
    passwords = {name: secrets.token_urlsafe(24) for name in parties.values()}
    (root / "inventory.ini").write_text(
        "[broker]\n"
        "sandbox-broker rabbitmq_manage_server=false\n"
        "[controller]\n"
        f"sandbox-controller cxr_mq_prefix={root / 'controller'}\n"
        "[aggregator]\n"
        f"sandbox-aggregator cxr_mq_prefix={root / 'aggregator'}\n"
        "[hospital]\n"
        f"sandbox-hospital cxr_mq_prefix={root / 'hospital'} cxr_mq_hospital_id={parties['hospital']}\n"
        "[all:vars]\n"
        f"ansible_connection=local\nansible_python_interpreter={sys.executable}\n")
    user = pwd.getpwuid(os.getuid()).pw_name
    group = grp.getgrgid(os.getgid()).gr_name
    given = {
        "cxr_mq_manage_services": False, "cxr_mq_manage_system": False,
        "cxr_mq_user": user, "cxr_mq_group": group, "cxr_mq_python": _base_python(),
        "cxr_mq_python_version": f"{sys.version_info[0]}.{sys.version_info[1]}",
        "cxr_mq_venv": str(root / "venv"),
        "cxr_mq_amqp_tls": False, "cxr_mq_amqp_host": "127.0.0.1", "cxr_mq_amqp_vhost": "/",
        # The workers log in as guest here: they still declare their topology, which their
        # least-privilege users may not do.
        "cxr_mq_amqp_user": "guest", "cxr_mq_amqp_password": "guest", "vault_cxr_mq_amqp_passwords": passwords,
        "cxr_mq_identity_pub_dir": str(root / "identities"), "cxr_mq_register_identities": True,
        "cxr_mq_aggregator_id": parties["aggregator"], "cxr_mq_controller_id": parties["controller"],
        "cxr_mq_amqp_admin_user": parties["admin"],
        "cxr_mq_namespace": f"t{uuid.uuid4().hex[:10]}", "cxr_mq_metrics_port": 0,
        "cxr_mq_s3_bucket": bucket, "cxr_mq_kms_key_id": key_id, "cxr_mq_s3_endpoint_url": moto_endpoint,
        "cxr_mq_aws_region": aws_env["AWS_REGION"],
        # compact: this sandbox checks the vault secret's path to the hospital (issue 10 item
        # 10); services are not managed here, so the threshold profile's ceremony (a task on
        # the controller, tests/unit/test_deploy_assets.py) would be skipped anyway
        "cxr_mq_codec_profile": "compact",
    }
    # The secret reaches the hospital host only (the aggregator's guard refuses to see it).
    (root / "host_vars").mkdir()
    (root / "host_vars" / "sandbox-hospital.yml").write_text(
        json.dumps({"vault_cxr_mq_secret_context_b64": base64.b64encode(secret).decode()}))
    args = ["-i", str(root / "inventory.ini"), "site.yml", "-e", json.dumps(given)]
    try:
        check = _playbook([*args, "--check", "--diff"])
        first = _playbook(args)
        assert not _failures(first), _failures(first)
        second = _playbook(args)
        yield {"root": root, "given": given, "secret": secret, "check": check, "first": first, "second": second,
               "parties": parties, "passwords": passwords}
    finally:
        listed = subprocess.run(["rabbitmqctl", "-q", "list_users", "--formatter", "json"],
                                capture_output=True, text=True, timeout=120)
        for user in json.loads(listed.stdout or "[]"):
            if user["user"] in parties.values():
                subprocess.run(["rabbitmqctl", "-q", "delete_user", user["user"]], capture_output=True, timeout=120)
        _delete_topology(amqp_url, given["cxr_mq_namespace"], parties["hospital"])


def _delete_topology(amqp_url: str, namespace: str, hospital: str) -> None:
    import pika

    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    channel = connection.channel()
    for name in ("aggregator", "dead-letter", f"hospital.{hospital}"):
        channel.queue_delete(f"{namespace}.{name}")
    for name in ("control", "dlx"):
        channel.exchange_delete(f"{namespace}.{name}")
    connection.close()


def test_sandbox_check_diff_runs_on_an_empty_host(sandbox):
    report = sandbox["check"]
    assert not _failures(report), _failures(report)
    assert _changed_tasks(report), "check mode on an empty host predicted no change"


def test_sandbox_second_apply_changes_nothing(sandbox):
    assert _changed_tasks(sandbox["first"]), "the first apply changed nothing"
    assert not _failures(sandbox["second"]), _failures(sandbox["second"])
    assert _changed_tasks(sandbox["second"]) == []


def _mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def _env_file(path: Path) -> dict[str, str]:
    return dict(re.findall(r'^(\w+)="(.*)"$', path.read_text(), re.M))


def test_sandbox_files_rendered_with_content_and_modes(sandbox):
    root, given = sandbox["root"], sandbox["given"]
    for host in ("aggregator", "hospital"):
        etc = root / host / "etc" / "cxr-mq"
        assert _mode(etc) == "0o750"
        env = _env_file(etc / "cxr-mq.env")
        assert _mode(etc / "cxr-mq.env") == "0o640" and _mode(etc / "config.toml") == "0o640"
        assert env["CXR_MQ_AMQP_URL"] == "amqp://guest:guest@127.0.0.1:5672/%2F"
        assert env["CXR_MQ_S3_BUCKET"] == given["cxr_mq_s3_bucket"]
        config = tomllib.loads((etc / "config.toml").read_text())
        assert config["namespace"] == given["cxr_mq_namespace"] and config["hospitals"] == [sandbox["parties"]["hospital"]]
        assert "guest" not in (etc / "config.toml").read_text(), "the password belongs in the env file only"
        unit = root / host / "etc" / "systemd" / "system" / f"cxr-mq-{host}.service"
        assert _mode(unit) == "0o644"
        assert f"EnvironmentFile={etc / 'cxr-mq.env'}" in unit.read_text()
    secret = root / "hospital" / "etc" / "cxr-mq" / "secret.ctx"
    assert secret.read_bytes() == sandbox["secret"] and _mode(secret) == "0o400"
    aggregator_files = [p for p in (root / "aggregator").rglob("*") if p.is_file()]
    assert not any("secret" in p.name for p in aggregator_files), "a secret file on the aggregator"


def test_sandbox_leaves_no_staged_copy_of_the_secret(sandbox):
    # Issue 10 item 10: the base64 form of the secret context must not sit on the host's disk.
    encoded = base64.b64encode(sandbox["secret"])
    for path in (sandbox["root"] / "hospital").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert encoded[:64] not in data, f"{path} holds the secret context in base64"
            assert path.name == "secret.ctx" or sandbox["secret"][:64] not in data, f"{path} holds the secret"


def test_sandbox_venv_runs_the_installed_wheel(sandbox):
    venv = Path(sandbox["given"]["cxr_mq_venv"])
    probe = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", "import cxr_mq, workers; print(cxr_mq.__file__)"],
                           capture_output=True, text=True, timeout=120, cwd=sandbox["root"])
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(venv), f"cxr_mq imported from {probe.stdout.strip()}"
    release = (venv / ".cxr-mq-release").read_text().split()
    assert release[0].startswith("cxr_mq-") and release[0].endswith(".whl") and len(release) == 3
    assert (sandbox["root"] / "aggregator" / "opt" / "cxr-mq" / "constraints.txt").read_text() == \
        (REPO / "constraints.txt").read_text()


def _unit_command(unit: Path) -> tuple[list[str], dict[str, str]]:
    """ExecStart's argv and the environment systemd would give it (EnvironmentFile, Environment)."""
    env: dict[str, str] = {}
    argv: list[str] = []
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key == "EnvironmentFile":
            env.update(_env_file(Path(value)))
        elif key == "Environment":
            name, _, val = value.partition("=")
            env[name] = val
        elif key == "ExecStart":
            argv = shlex.split(value)
    return argv, env


def test_sandbox_aggregator_unit_starts_and_connects(sandbox, moto_endpoint, aws_env, amqp_url):
    import pika

    root, given = sandbox["root"], sandbox["given"]
    argv, unit_env = _unit_command(root / "aggregator" / "etc" / "systemd" / "system" / "cxr-mq-aggregator.service")
    assert Path(argv[0]) == Path(given["cxr_mq_venv"]) / "bin" / "cxr-mq"
    # The key ceremony's public context in the bucket, where the aggregator reads it.
    keys_env = {**os.environ, **aws_env, **{k: v for k, v in unit_env.items() if k.startswith("CXR_MQ_S3") or k.startswith("CXR_MQ_KMS")}}
    ceremony = subprocess.run([str(BIN / "cxr-mq"), "--config", str(root / "aggregator/etc/cxr-mq/config.toml"),
                               "keys", "init", "--profile", "compact", "--out", str(root / "ceremony")],
                              env=keys_env, capture_output=True, text=True, timeout=300)
    assert ceremony.returncode == 0, ceremony.stderr[-3000:]
    # What systemd would run: the unit's environment plus the instance-profile credentials.
    run_env = {"PATH": "/usr/bin:/bin", **aws_env, **unit_env}
    queue = f"{given['cxr_mq_namespace']}.aggregator"
    log = open(root / "aggregator.log", "wb")
    proc = subprocess.Popen(argv, env=run_env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        consumers, deadline = 0, time.monotonic() + 180
        while consumers == 0 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(1)
            try:
                consumers = connection.channel().queue_declare(queue, passive=True).method.consumer_count
            except pika.exceptions.ChannelClosedByBroker:
                consumers = 0
        assert consumers >= 1, f"no consumer on {queue}; worker log:\n" + (root / "aggregator.log").read_text()[-3000:]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        connection.close()
    assert proc.returncode == 0, "the aggregator did not exit cleanly on SIGTERM"


def test_sandbox_broker_users_get_least_privilege(sandbox, amqp_url):
    import pika

    from cxr_mq.transport.permissions import permissions_for

    ns, parties = sandbox["given"]["cxr_mq_namespace"], sandbox["parties"]
    listed = subprocess.run(["rabbitmqctl", "-q", "list_permissions", "-p", "/", "--formatter", "json"],
                            capture_output=True, text=True, timeout=120)
    granted = {p["user"]: (p["configure"], p["write"], p["read"]) for p in json.loads(listed.stdout)}
    for role in ("hospital", "aggregator", "controller"):
        want = permissions_for(role, parties[role], ns)
        assert granted[parties[role]] == (want.configure, want.write, want.read), role
    assert granted[parties["admin"]] == (".*", ".*", ".*")
    # The attack: hospital h logs in with its own password and tries to read the aggregator's queue.
    guest = pika.BlockingConnection(pika.URLParameters(amqp_url))
    victim = f"{ns}.aggregator-probe"
    guest.channel().queue_declare(victim, auto_delete=False)
    params = pika.URLParameters(amqp_url)
    params.credentials = pika.PlainCredentials(parties["hospital"], sandbox["passwords"][parties["hospital"]])
    try:
        hospital = pika.BlockingConnection(params)
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            hospital.channel().basic_get(victim)
        assert refused.value.reply_code == 403
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            hospital.channel().queue_declare(f"{ns}.hospital.{parties['hospital']}", durable=True)
        assert refused.value.reply_code == 403, "a hospital may not declare (configure) anything"
        hospital.close()
    finally:
        guest.channel().queue_delete(victim)
        guest.close()


def test_sandbox_controller_declares_topology_and_schedules_rounds(sandbox, amqp_url):
    import pika

    root, given, parties = sandbox["root"], sandbox["given"], sandbox["parties"]
    systemd = root / "controller" / "etc" / "systemd" / "system"
    timer = (systemd / "cxr-mq-start-round.timer").read_text()
    assert "OnCalendar=*-*-* 02:00:00" in timer and _mode(systemd / "cxr-mq-start-round.timer") == "0o644"
    argv, env = _unit_command(systemd / "cxr-mq-start-round.service")
    assert argv[1:4] == ["--config", str(root / "controller/etc/cxr-mq/config.toml"), "start-round"]
    assert env["CXR_MQ_AMQP_URL"].startswith("amqp://guest:")
    prometheus = yaml.safe_load((root / "controller/etc/prometheus/prometheus.yml").read_text())
    assert prometheus["rule_files"] == [str(root / "controller/etc/prometheus/cxr-mq-alerts.yml")]
    assert (root / "controller/etc/prometheus/cxr-mq-alerts.yml").is_file()
    assert (root / "controller/var/lib/grafana/dashboards/cxr-mq.json").is_file()
    # The admin login declared the federation's queues (workers may not configure anything).
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
    try:
        channel = connection.channel()
        for queue in (f"{given['cxr_mq_namespace']}.hospital.{parties['hospital']}", f"{given['cxr_mq_namespace']}.aggregator"):
            channel.queue_declare(queue, passive=True)
    finally:
        connection.close()
