"""Deployment assets (ansible/, docker/, docs/deployment.md) keep the properties the design
relies on: the right plays reach the right hosts, units stop gracefully and restart on
failure, the aggregator never gets the secret context, the local stack is complete, and no
file carries an AWS secret.

No Docker engine exists on the dev machines and CI, so docker/compose.yml is checked
structurally. Ansible templates are rendered with plain Jinja2 and the handful of Ansible
filters they use; `ansible-playbook --syntax-check` runs here, and ansible-lint and real
playbook runs are in tests/integration/test_deploy_ansible.py.
"""
from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
ANSIBLE = REPO / "ansible"
ROLES = ANSIBLE / "roles"
DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yml"
DOCS = REPO / "docs" / "deployment.md"

REQUIRED_FILES = [
    "ansible/site.yml", "ansible/provision.yml", "ansible/requirements.yml",
    "ansible/inventory/aws_ec2.yml", "ansible/inventory/example.ini",
    "ansible/group_vars/all/main.yml", "ansible/group_vars/all/vault.yml.example",
    "ansible/group_vars/hospital/vault.yml.example",
    *[f"ansible/roles/{role}/tasks/main.yml" for role in ("common", "rabbitmq", "hospital", "aggregator")],
    "ansible/roles/hospital/templates/cxr-mq-hospital.service.j2",
    "ansible/roles/aggregator/templates/cxr-mq-aggregator.service.j2",
    "docker/Dockerfile", "docker/compose.yml", "docs/deployment.md",
]

# Task keys that are not the module name.
TASK_KEYWORDS = {
    "name", "when", "loop", "loop_control", "register", "notify", "listen", "vars", "tags",
    "become", "become_user", "changed_when", "failed_when", "no_log", "diff", "until", "retries",
    "delay", "ignore_errors", "delegate_to", "run_once", "block", "rescue", "always", "environment",
    "check_mode", "args", "with_items", "throttle", "timeout", "any_errors_fatal",
}


def _yaml_files() -> list[Path]:
    files = [p for p in ANSIBLE.rglob("*") if p.is_file() and
             (p.suffix in (".yml", ".yaml") or p.name.endswith((".yml.example", ".yaml.example")))]
    return sorted(files) + [COMPOSE]


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


# -- files and YAML ---------------------------------------------------------------------------
@pytest.mark.parametrize("rel", REQUIRED_FILES)
def test_required_file_exists(rel):
    assert (REPO / rel).is_file(), f"{rel} is missing"


@pytest.mark.parametrize("path", _yaml_files(), ids=_rel)
def test_yaml_parses(path):
    data = _load(path)
    assert data is not None, f"{_rel(path)} is empty"


def test_group_vars_not_shadowed():
    # Ansible reads group_vars/<g> as a directory OR as <g>.yml, never both: the file would be
    # silently ignored.
    for entry in (ANSIBLE / "group_vars").iterdir():
        if entry.is_dir():
            for ext in (".yml", ".yaml", ".json"):
                assert not (entry.parent / (entry.name + ext)).exists(), \
                    f"group_vars/{entry.name}{ext} is ignored because group_vars/{entry.name}/ exists"


def test_secret_context_only_in_hospital_group_vars():
    for path in (ANSIBLE / "group_vars").rglob("*"):
        if path.is_file() and "hospital" not in path.relative_to(ANSIBLE / "group_vars").parts:
            assert "secret_context" not in path.read_text(), \
                f"{_rel(path)} would hand the secret context to non-hospital hosts"
    example = _load(ANSIBLE / "group_vars/hospital/vault.yml.example")
    assert "vault_cxr_mq_secret_context_b64" in example


# -- the playbook -----------------------------------------------------------------------------
def _plays() -> dict[str, dict]:
    plays = _load(ANSIBLE / "site.yml")
    assert isinstance(plays, list) and plays
    return {play["hosts"]: play for play in plays}


def _role_names(play) -> list[str]:
    return [r["role"] if isinstance(r, dict) else r for r in play.get("roles", [])]


def test_site_plays_target_groups():
    plays = _plays()
    assert {"hospital", "aggregator"} <= set(plays), f"plays target {sorted(plays)}"
    assert _role_names(plays["hospital"]) == ["common", "hospital"]
    assert _role_names(plays["aggregator"]) == ["common", "aggregator"]
    assert _role_names(plays.get("broker", {"roles": ["rabbitmq"]})) == ["rabbitmq"]
    for play in plays.values():
        assert play.get("become") is True


def test_hospital_rollout_is_rolling():
    play = _plays()["hospital"]
    serial = play.get("serial")
    assert serial is not None, "hospitals must be rolled out with serial"
    match = re.search(r"default\((\d+)\)", str(serial))
    batch = str(match.group(1) if match else serial)
    if batch.endswith("%"):
        assert int(batch[:-1]) < 50, f"serial {serial!r} restarts half the hospitals at once"
    else:
        assert 1 <= int(batch) <= 2, f"serial {serial!r} restarts too many hospitals at once"
    assert play.get("max_fail_percentage") == 0, "a failed batch must stop the rollout"


def _tasks(node) -> list[dict]:
    """Every task in a task list, blocks flattened."""
    out = []
    for task in node or []:
        out.append(task)
        for key in ("block", "rescue", "always"):
            out.extend(_tasks(task.get(key)))
    return out


def _task_files() -> list[Path]:
    return sorted(p for d in ("tasks", "handlers") for p in ROLES.glob(f"*/{d}/*.yml"))


def _module(task: dict) -> str | None:
    modules = [k for k in task if k not in TASK_KEYWORDS]
    if "block" in task:
        return None
    assert len(modules) == 1, f"task {task.get('name')!r} has module keys {modules}"
    return modules[0]


def test_tasks_use_fqcn_and_names():
    found = 0
    site_tasks = [t for play in _load(ANSIBLE / "site.yml") for t in _tasks(play.get("pre_tasks"))]
    for task in [t for f in _task_files() for t in _tasks(_load(f))] + site_tasks:
        assert task.get("name"), f"unnamed task {task}"
        module = _module(task)
        if module:
            found += 1
            assert re.fullmatch(r"[a-z0-9_]+\.[a-z0-9_]+\.[a-z0-9_]+", module), f"{task['name']!r} uses {module}, not an FQCN"
    assert found > 30


def test_every_notify_has_a_handler_in_its_play():
    def topics(role):
        handlers = _tasks(_load(ROLES / role / "handlers/main.yml"))
        return {h["name"] for h in handlers} | {h["listen"] for h in handlers if "listen" in h}

    for play in _plays().values():
        roles = _role_names(play)
        available = set().union(*(topics(r) for r in roles))
        for role in roles:
            for path in (ROLES / role / "tasks").glob("*.yml"):
                for task in _tasks(_load(path)):
                    notify = task.get("notify", [])
                    for name in [notify] if isinstance(notify, str) else notify:
                        assert name in available, f"{_rel(path)}: {name!r} has no handler in play {play['name']!r}"
    for role in ("hospital", "aggregator"):
        restart = [h for h in _tasks(_load(ROLES / role / "handlers/main.yml")) if h.get("listen") == "cxr-mq restart"]
        assert restart and restart[0]["ansible.builtin.systemd_service"]["state"] == "restarted"


# -- rendering templates ----------------------------------------------------------------------
SAMPLE_HOST = {
    "inventory_hostname": "hosp-a", "group_names": ["hospital"], "ansible_managed": "Ansible managed",
    "cxr_mq_hospital_id": "hospital-a", "cxr_mq_s3_bucket": "cxr-mq-test", "cxr_mq_kms_key_id": "alias/cxr-mq",
    "vault_cxr_mq_amqp_passwords": {"hospital-a": "p@ss/word:x", "aggregator": "agg-pass", "controller": "ctl-pass"},
    "ansible_playbook_python": sys.executable, "playbook_dir": str(ANSIBLE),
    "vault_cxr_mq_secret_context_b64": "QUJD",
    "groups": {"broker": ["mq-1"], "aggregator": ["agg-1"], "hospital": ["hosp-a", "hosp-b"]},
    "hostvars": {"mq-1": {"ansible_host": "192.0.2.10", "private_dns_name": "ip-192-0-2-10.eu-central-1.compute.internal"}, "hosp-a": {"cxr_mq_hospital_id": "hospital-a"},
                 "hosp-b": {"cxr_mq_hospital_id": "hospital-b"}, "agg-1": {}},
}


def _jinja(native: bool = False):
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.nativetypes import NativeEnvironment

    cls = NativeEnvironment if native else jinja2.Environment
    env = cls(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)

    def undef(hint=""):
        raise jinja2.UndefinedError(hint)

    env.filters.update({
        "bool": lambda v: v if isinstance(v, bool) else str(v).lower() in ("1", "true", "yes", "on"),
        "to_json": json.dumps,
        "basename": lambda v: Path(v).name,
        "regex_replace": lambda v, pat, rep="": re.sub(pat, rep, v),
        "extract": lambda item, container, key: container[item][key],
        "quote": shlex.quote,
    })
    env.globals["undef"] = undef
    return env


def _resolve(env, variables: dict) -> dict:
    """Template variable values until nothing changes (Ansible resolves them lazily)."""
    resolved = dict(variables)
    for _ in range(10):
        changed = False
        for key, value in resolved.items():
            if isinstance(value, str) and "{{" in value:
                try:
                    new = env.from_string(value.strip()).render(resolved)
                except Exception:  # depends on a value not resolved yet, or on a real host
                    continue
                if new != value:
                    resolved[key], changed = new, True
        if not changed:
            break
    return resolved


def _host_vars(*roles: str, **extra) -> dict:
    variables = dict(_load(ANSIBLE / "group_vars/all/main.yml"))
    for role in roles:
        variables.update(_load(ROLES / role / "defaults/main.yml") or {})
    variables.update(SAMPLE_HOST)
    variables.update(extra)
    return _resolve(_jinja(native=True), variables)


def _render(template: Path, variables: dict) -> str:
    text = _jinja().from_string(template.read_text()).render(variables)
    assert "{{" not in text and "{%" not in text, f"{_rel(template)} left unrendered Jinja"
    return text


def _unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None, f"{line!r} outside a section"
        current.setdefault(key, []).append(value)
    return sections


def _one(unit, section, key) -> str:
    values = unit[section].get(key, [])
    assert len(values) == 1, f"[{section}] {key}= appears {len(values)} times"
    return values[0]


def test_hospital_unit_template():
    variables = _host_vars("common", "hospital", cxr_mq_codec_profile="compact")
    unit = _unit(_render(ROLES / "hospital/templates/cxr-mq-hospital.service.j2", variables))
    service = unit["Service"]
    assert _one(unit, "Service", "Restart") == "on-failure"
    assert _one(unit, "Service", "KillSignal") == "SIGTERM"
    assert int(_one(unit, "Service", "TimeoutStopSec")) >= 600, "too short to finish a training round"
    assert _one(unit, "Service", "User") == "cxrmq"
    assert _one(unit, "Service", "EnvironmentFile") == "/etc/cxr-mq/cxr-mq.env"
    assert "CXR_MQ_SECRET_CONTEXT=/etc/cxr-mq/secret.ctx" in service["Environment"]
    argv = shlex.split(_one(unit, "Service", "ExecStart"))
    assert argv[:4] == ["/opt/cxr-mq/venv/bin/cxr-mq", "--config", "/etc/cxr-mq/config.toml", "hospital"]
    assert argv[argv.index("--id") + 1] == "hospital-a" and "--data" in argv
    assert not any("amqp" in a or "p@ss" in a or a == "--secret-context" for a in argv), "secret on the command line"
    assert _one(unit, "Install", "WantedBy") == "multi-user.target"


def test_threshold_hospitals_get_no_secret_and_the_ceremony_runs_before_the_aggregator():
    """The default profile: no secret context in the hospital's unit nor installed; the
    aggregator play runs the key ceremony (keys init --if-absent, on the controller) before its
    roles, after the hospital play has started the hospitals."""
    variables = _host_vars("common", "hospital")
    assert variables["cxr_mq_codec_profile"] == "threshold"
    text = _render(ROLES / "hospital/templates/cxr-mq-hospital.service.j2", variables)
    assert "CXR_MQ_SECRET_CONTEXT" not in text and "secret.ctx" not in text
    main = _tasks(_load(ROLES / "hospital/tasks/main.yml"))
    install = [t for t in main if t.get("ansible.builtin.import_tasks") == "secret.yml"]
    assert install and install[0]["when"] == "cxr_mq_codec_profile != 'threshold'"
    plays = _load(ANSIBLE / "site.yml")
    order = [play["hosts"] for play in plays]
    assert order.index("hospital") < order.index("aggregator")
    pre = _plays()["aggregator"]["pre_tasks"]
    assert [t["ansible.builtin.import_role"].get("tasks_from") for t in pre] == ["guard.yml", "ceremony.yml"]
    ceremony = _tasks(_load(ROLES / "controller/tasks/ceremony.yml"))
    assert len(ceremony) == 1 and ceremony[0]["run_once"] is True
    argv = ceremony[0]["ansible.builtin.command"]["argv"]
    assert "keys init --if-absent" in argv[2] and "amqp" not in " ".join(map(str, argv))
    assert "cxr_mq_codec_profile == 'threshold'" in ceremony[0]["when"]


def test_aggregator_unit_template_has_no_secret():
    variables = _host_vars("common", "aggregator")
    text = _render(ROLES / "aggregator/templates/cxr-mq-aggregator.service.j2", variables)
    unit = _unit(text)
    assert _one(unit, "Service", "Restart") == "on-failure"
    assert _one(unit, "Service", "KillSignal") == "SIGTERM"
    assert shlex.split(_one(unit, "Service", "ExecStart"))[1:4] == ["--config", "/etc/cxr-mq/config.toml", "aggregator"]
    assert "SECRET" not in text.upper()


def test_aggregator_role_never_references_secret_context():
    for path in (ROLES / "aggregator").rglob("*"):
        if path.is_file():
            text = path.read_text()
            for needle in ("secret.ctx", "CXR_MQ_SECRET_CONTEXT", "--secret-context", "vault_cxr_mq_secret"):
                assert needle not in text, f"{_rel(path)} mentions {needle}"


def test_aggregator_guard_refuses_secret_vars():
    guard = _tasks(_load(ROLES / "aggregator/tasks/guard.yml"))
    asserts = [t for t in guard if "ansible.builtin.assert" in t]
    conditions = " ".join(str(t["ansible.builtin.assert"]["that"]) for t in asserts)
    assert "varnames" in conditions and "secret_context" in conditions
    main = _tasks(_load(ROLES / "aggregator/tasks/main.yml"))
    assert main[0].get("ansible.builtin.import_tasks") == "guard.yml", "the guard must run first"
    pre = _plays()["aggregator"].get("pre_tasks", [])
    assert any(t.get("ansible.builtin.import_role", {}).get("tasks_from") == "guard.yml" for t in pre)


def test_hospital_secret_context_is_private():
    variables = _host_vars("common", "hospital")
    assert variables["hospital_secret_ctx_dest"] == "/etc/cxr-mq/secret.ctx"
    tasks = _tasks(_load(ROLES / "hospital/tasks/secret.yml"))
    install = [t for t in tasks if "secret_ctx_b64" in yaml.safe_dump(t)]
    assert len(install) == 1, "the secret must reach the host in one place only"
    command = install[0]["ansible.builtin.command"]
    # on the decoder's standard input, never in argv, a staged file or the log
    assert "secret_ctx_b64" in command["stdin"] and "secret_ctx_b64" not in yaml.safe_dump(command["argv"])
    assert install[0].get("no_log") is True
    assert not [t for t in tasks if "ansible.builtin.copy" in t or "ansible.builtin.template" in t]
    perms = [t["ansible.builtin.file"] for t in tasks if "ansible.builtin.file" in t and "mode" in t["ansible.builtin.file"]]
    assert perms and perms[-1]["mode"] == "0400" and perms[-1]["owner"] == "{{ cxr_mq_user }}"
    assert (ROLES / "hospital/files/install_secret.py").is_file()


def test_rabbitmq_password_never_in_argv_and_timeout_raised():
    commands = 0
    for path in (ROLES / "rabbitmq/tasks").glob("*.yml"):
        for task in _tasks(_load(path)):
            command = task.get("ansible.builtin.command")
            if command:
                argv = yaml.safe_dump(command.get("argv", []))
                assert "passwords" not in argv and "amqp_password" not in argv, f"{task['name']!r}: password in argv"
                if {"add_user", "change_password", "authenticate_user"} & set(command.get("argv", [])):
                    commands += 1
                    assert "rabbitmq_passwords[" in command.get("stdin", ""), f"{task['name']!r}: password not on stdin"
                if "stdin" in command:
                    assert task.get("no_log") is True
    assert commands == 3
    variables = _host_vars("rabbitmq")
    conf = _render(ROLES / "rabbitmq/templates/rabbitmq.conf.j2", variables)
    settings = dict(line.split(" = ", 1) for line in conf.splitlines() if " = " in line and not line.startswith("#"))
    assert int(settings["consumer_timeout"]) > 30 * 60 * 1000, "must exceed RabbitMQ's 30 min default"


def test_rendered_config_is_accepted_by_cxr_mq(tmp_path):
    variables = _host_vars("common")
    toml_text = _render(ROLES / "common/templates/config.toml.j2", variables)
    env_text = _render(ROLES / "common/templates/cxr-mq.env.j2", variables)
    env = dict(re.findall(r'^(\w+)="(.*)"$', env_text, re.M))
    # the party's own user, the broker by name (its certificate names it), AMQPS with the CA
    assert env["CXR_MQ_AMQP_URL"] == \
        "amqps://hospital-a:p%40ss%2Fword%3Ax@ip-192-0-2-10.eu-central-1.compute.internal:5671/cxr-mq"
    assert env["CXR_MQ_AMQP_CA_FILE"] == "/etc/cxr-mq/broker-ca.pem" and env["CXR_MQ_AMQP_TLS_REQUIRED"] == "true"
    assert "p@ss" not in toml_text and "amqp_url" not in toml_text, "secrets belong in the env file"
    config = pytest.importorskip("cxr_mq.config")
    path = tmp_path / "config.toml"
    path.write_text(toml_text)
    settings = config.load_settings(env=env, config_path=path)
    assert settings.hospitals == ("hospital-a", "hospital-b")
    assert settings.s3_bucket == "cxr-mq-test" and settings.kms_key_id == "alias/cxr-mq"
    assert settings.amqp_url == env["CXR_MQ_AMQP_URL"]
    assert settings.amqp_ca_file == "/etc/cxr-mq/broker-ca.pem" and settings.amqp_tls_required is True


# -- inventories ------------------------------------------------------------------------------
def test_ec2_inventory_groups_by_role_tag():
    inv = _load(ANSIBLE / "inventory/aws_ec2.yml")
    assert inv["plugin"] == "amazon.aws.aws_ec2"
    groups = [g for g in inv["keyed_groups"] if g["key"] == "tags.cxr_mq_role"]
    assert groups and groups[0].get("prefix") == "" and groups[0].get("separator") == "", \
        "group names must equal the tag values hospital/aggregator/broker"
    assert inv["compose"]["cxr_mq_hospital_id"] == "tags.cxr_mq_hospital_id"


def test_example_inventory():
    parser = configparser.ConfigParser(allow_no_value=True, delimiters=("\0",))
    parser.optionxform = str
    parser.read(ANSIBLE / "inventory/example.ini")
    hosts = {g: {line.split()[0]: dict(kv.split("=", 1) for kv in line.split()[1:]) for line in parser[g]}
             for g in ("hospital", "aggregator", "broker")}
    assert all(hosts.values())
    assert not set(hosts["hospital"]) & set(hosts["aggregator"])
    ids = [v["cxr_mq_hospital_id"] for v in hosts["hospital"].values()]
    assert len(ids) == len(set(ids)) >= 2


# -- docker -----------------------------------------------------------------------------------
def _services() -> dict:
    return _load(COMPOSE)["services"]


def _command(service) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else list(command)


def test_compose_defines_the_stack():
    services = _services()
    assert {"rabbitmq", "s3", "aggregator", "keys"} <= set(services)
    assert services["rabbitmq"]["image"].startswith("rabbitmq:3.10")
    assert "management" not in services["rabbitmq"]["image"]
    assert services["s3"]["image"].startswith("motoserver/moto")
    assert "keys init" in " ".join(_command(services["keys"]))
    assert _command(services["aggregator"])[:1] == ["aggregator"]


def test_compose_three_hospitals_with_own_synthetic_data():
    services = _services()
    hospitals = {n: s for n, s in services.items() if _command(s)[:1] == ["hospital"]}
    keys_volume = [m for m in services["keys"]["volumes"] if m.endswith(":/keys")][0].split(":")[0]
    assert len(hospitals) == 3
    ids, volumes = set(), set()
    for name, svc in hospitals.items():
        argv = _command(svc)
        ids.add(argv[argv.index("--id") + 1])
        data = argv[argv.index("--data") + 1]
        mounts = {m.split(":")[1]: m.split(":") for m in svc["volumes"]}
        volume = mounts[data][0]
        volumes.add(volume)
        secret_dir = str(Path(svc["environment"]["CXR_MQ_SECRET_CONTEXT"]).parent)
        assert mounts[secret_dir][0] == keys_volume and mounts[secret_dir][-1] == "ro"
        assert mounts[data][-1] == "ro", "a hospital only reads its images"
        makers = [d for d, cond in svc["depends_on"].items()
                  if cond["condition"] == "service_completed_successfully"
                  and _command(services[d])[:1] == ["synth"]]
        assert len(makers) == 1, f"{name} needs one synth service"
        maker = services[makers[0]]
        out = _command(maker)[_command(maker).index("--out") + 1]
        assert f"{volume}:{out}" in maker["volumes"], f"{makers[0]} must write {name}'s volume"
    assert len(ids) == 3 and len(volumes) == 3
    assert volumes <= set(_load(COMPOSE)["volumes"])


def test_compose_aggregator_has_no_secret():
    agg = _services()["aggregator"]
    assert "CXR_MQ_SECRET_CONTEXT" not in agg.get("environment", {})
    keys_volume = [m for m in _services()["keys"]["volumes"] if m.endswith(":/keys")][0].split(":")[0]
    assert not any(m.split(":")[0] == keys_volume for m in agg.get("volumes", []))


def test_compose_workers_share_endpoints_and_image():
    services = _services()
    for name, svc in services.items():
        if svc.get("image") == "cxr-mq:local":
            env = svc["environment"]
            assert env["CXR_MQ_S3_ENDPOINT_URL"] == "http://s3:5000", name
            assert "@rabbitmq:5672/" in env["CXR_MQ_AMQP_URL"], name
            build = svc["build"]
            assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKER / "Dockerfile"


def test_dockerfile():
    text = (DOCKER / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M).group(1)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+", base), f"base image {base} is not pinned to a release"
    froms = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert froms and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    installs = [line for line in lines if line.startswith("RUN pip install")]
    assert installs and all("--constraint /tmp/constraints.txt" in line for line in installs)
    assert "!constraints.txt" in (DOCKER / "Dockerfile.dockerignore").read_text()
    assert any(line.startswith("HEALTHCHECK ") for line in lines)
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    entry = [line for line in lines if line.startswith("ENTRYPOINT ")]
    assert json.loads(entry[-1].split(None, 1)[1]) == ["cxr-mq"]


def test_compose_survives_restarts_with_room_in_shm():
    services = _services()
    for name, svc in services.items():
        if svc.get("image") == "cxr-mq:local":
            size = str(svc.get("shm_size", "64m")).lower()
            assert size.endswith("gb") or (size.endswith("m") and int(size[:-1]) >= 512), f"{name}: shm_size {size}"
        long_running = name in ("rabbitmq", "s3", "aws-init", "aggregator") or _command(svc)[:1] == ["hospital"]
        if long_running:
            assert svc.get("restart") == "unless-stopped", f"{name} does not come back after a restart"
        if _command(svc)[:1] in (["hospital"], ["aggregator"]):
            assert "--metrics-port" in _command(svc), f"{name}: the image's HEALTHCHECK reads the metrics port"
    init = services["aws-init"]
    assert "--watch" in init["entrypoint"] and "--public-context" in init["entrypoint"]
    assert not any(m.split(":")[0] == "keys" for m in init["volumes"]), "aws-init must not see the secret context"


def test_constraints_pin_every_runtime_dependency():
    import tomllib

    from packaging.requirements import Requirement

    pins = dict(line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"constraints.txt does not pin {name}: run scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} is outside {req.specifier}"
    assert "cxr-mq" not in pins


def test_bootstrap_recreates_what_moto_lost(moto_endpoint, aws_env, tmp_path, monkeypatch):
    import boto3
    import importlib.util

    spec = importlib.util.spec_from_file_location("bootstrap_aws", DOCKER / "local/bootstrap_aws.py")
    bootstrap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bootstrap)
    s3 = boto3.client("s3", endpoint_url=moto_endpoint, region_name=aws_env["AWS_REGION"])
    kms = boto3.client("kms", endpoint_url=moto_endpoint, region_name=aws_env["AWS_REGION"])
    tag = uuid.uuid4().hex[:8]
    bucket, alias = f"cxr-boot-{tag}", f"alias/cxr-boot-{tag}"
    assert bootstrap.ensure_bucket_and_key(s3, kms, bucket, alias, aws_env["AWS_REGION"]) is True
    assert bootstrap.ensure_bucket_and_key(s3, kms, bucket, alias, aws_env["AWS_REGION"]) is False
    public = tmp_path / "public.ctx"
    public.write_bytes(b"public context bytes")
    for key, value in {"CXR_MQ_S3_BUCKET": bucket, "CXR_MQ_KMS_KEY_ID": alias,
                       "CXR_MQ_S3_ENDPOINT_URL": moto_endpoint}.items():
        monkeypatch.setenv(key, value)
    assert bootstrap.ensure_public_context(public) is True
    assert bootstrap.ensure_public_context(public) is False
    # moto restarted: bucket and alias are gone; the next pass puts them back, context included
    s3.delete_object(Bucket=bucket, Key="keys/public-context")
    s3.delete_bucket(Bucket=bucket)
    kms.delete_alias(AliasName=alias)
    assert bootstrap.ensure_bucket_and_key(s3, kms, bucket, alias, aws_env["AWS_REGION"]) is True
    assert bootstrap.ensure_public_context(public) is True
    body = s3.get_object(Bucket=bucket, Key="keys/public-context")
    assert body["Body"].read() == b"public context bytes" and body["ServerSideEncryption"] == "aws:kms"


# -- secrets ----------------------------------------------------------------------------------
AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
AWS_SECRET = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+=]{40}(?![A-Za-z0-9/+=])")
SECRET_ASSIGN = re.compile(r"aws_secret_access_key\W{1,4}([^\s\"',}]+)", re.I)
LOCAL_FAKES = {"testing", "CHANGE-ME"}


def _looks_like_aws_secret(text: str) -> list[str]:
    hits = AWS_KEY_ID.findall(text)
    for token in AWS_SECRET.findall(text):
        if re.search(r"[A-Z]", token) and re.search(r"[a-z]", token) and re.search(r"\d", token):
            hits.append(token)
    hits += [v for v in SECRET_ASSIGN.findall(text) if v not in LOCAL_FAKES and not v.startswith(("$", "{{"))]
    return hits


def test_secret_detector_catches_a_key():
    fake_id = "AKIA" + "Z" * 16
    fake_secret = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY1"[:18]
    assert _looks_like_aws_secret(f"id={fake_id}")
    assert _looks_like_aws_secret(f"secret: {fake_secret}")
    assert _looks_like_aws_secret("AWS_SECRET_ACCESS_KEY: hunter2hunter2")
    assert not _looks_like_aws_secret("AWS_SECRET_ACCESS_KEY: testing\nsha 3a77f3f6d9f9eb3acfc2c8522462af8d54431738")


def _scanned_files() -> list[Path]:
    files = [p for root in (ANSIBLE, DOCKER) for p in root.rglob("*") if p.is_file()]
    return sorted(files + [DOCS])


@pytest.mark.parametrize("path", _scanned_files(), ids=_rel)
def test_no_aws_secret_in_file(path):
    hits = _looks_like_aws_secret(path.read_text(errors="replace"))
    assert not hits, f"{_rel(path)} contains what looks like AWS credentials: {hits}"


def test_vault_files_are_encrypted():
    for path in ANSIBLE.rglob("vault.y*ml"):
        assert path.read_text().startswith("$ANSIBLE_VAULT;"), f"{_rel(path)} is not ansible-vault encrypted"


# -- docs and ansible itself ------------------------------------------------------------------
def test_deployment_doc_covers_the_path():
    text = DOCS.read_text()
    for needle in ("cxr-mq keys init", "ansible-vault", "ansible-playbook -i inventory/aws_ec2.yml site.yml --ask-vault-pass",
                   "aws:kms", "s3:PutObject", "journalctl -u cxr-mq-hospital", "cxr-mq status",
                   "ansible-playbook provision.yml", "--check --diff", "## 7. Adding a hospital",
                   "## 8. Rotating keys", "## 9. Upgrading without losing a round", "constraints.txt"):
        assert needle in text, f"docs/deployment.md does not mention {needle!r}"


def test_ansible_syntax_check():
    # Never skipped: scripts/setup.sh installs Ansible (pyproject's deploy extra) with the tests.
    playbook = Path(sys.executable).with_name("ansible-playbook")
    assert playbook.is_file(), f"{playbook} is missing: run scripts/setup.sh (installs the deploy extra)"
    for play in ("ansible/site.yml", "ansible/provision.yml"):
        if (REPO / play).exists():
            result = subprocess.run([str(playbook), "--syntax-check", "-i", "ansible/inventory/example.ini", play],
                                    cwd=REPO, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stdout + result.stderr


# -- controller and systemd hardening ---------------------------------------------------------
def _rendered_units(tmp_path: Path) -> dict[str, Path]:
    units = {
        "cxr-mq-hospital.service": ("hospital", ROLES / "hospital/templates/cxr-mq-hospital.service.j2"),
        "cxr-mq-aggregator.service": ("aggregator", ROLES / "aggregator/templates/cxr-mq-aggregator.service.j2"),
        "cxr-mq-start-round.service": ("controller", ROLES / "controller/templates/cxr-mq-start-round.service.j2"),
    }
    out = {}
    for name, (role, template) in units.items():
        path = tmp_path / name
        path.write_text(_render(template, _host_vars("common", role)))
        out[name] = path
    return out


def test_controller_timer_runs_start_round_on_schedule():
    variables = _host_vars("common", "controller", controller_schedule="Mon *-*-* 03:00:00")
    timer = _unit(_render(ROLES / "controller/templates/cxr-mq-start-round.timer.j2", variables))
    assert _one(timer, "Timer", "OnCalendar") == "Mon *-*-* 03:00:00"
    assert _one(timer, "Timer", "Unit") == "cxr-mq-start-round.service"
    assert _one(timer, "Timer", "Persistent") == "true"
    assert _one(timer, "Install", "WantedBy") == "timers.target"
    service = _unit(_render(ROLES / "controller/templates/cxr-mq-start-round.service.j2", variables))
    assert _one(service, "Service", "Type") == "oneshot"
    argv = shlex.split(_one(service, "Service", "ExecStart"))
    assert argv[:4] == ["/opt/cxr-mq/venv/bin/cxr-mq", "--config", "/etc/cxr-mq/config.toml", "start-round"]
    assert argv[argv.index("--quorum") + 1] == "3"
    tasks = _tasks(_load(ROLES / "controller/tasks/main.yml"))
    declare = [t for t in tasks if "declare" in str(t.get("ansible.builtin.command", {}).get("argv"))]
    assert declare and declare[0]["no_log"] is True, "the admin login's URL must not be logged"


def _exposure(unit: Path) -> float:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(unit)],
                            capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    return float(match.group(1))


def test_units_exposure_at_most_3(tmp_path):
    assert shutil.which("systemd-analyze"), "systemd-analyze is needed to rate the units (Debian: systemd)"
    for name, path in _rendered_units(tmp_path).items():
        assert _exposure(path) <= 3.0, f"{name}: systemd-analyze security exposure above 3.0"


def test_exposure_check_catches_an_unhardened_unit(tmp_path):
    bare = tmp_path / "bare.service"
    bare.write_text("[Service]\nExecStart=/bin/true\n")
    assert _exposure(bare) > 3.0


# -- monitoring -------------------------------------------------------------------------------
def _worker_metric_names() -> set[str]:
    """Sample names the workers export (counters get _total, histograms _bucket)."""
    from cxr_mq.observability import Metrics

    metrics = Metrics()
    names = set()
    for family in metrics.registry.collect():
        names |= {sample.name for sample in family.samples} | {family.name, family.name + "_total"}
    return names | {"cxr_duration_seconds_bucket"}


def test_alert_rules_cover_outages_aborts_and_dead_letters():
    rules = {r["alert"]: r for g in _load(ROLES / "monitoring/files/cxr-mq-alerts.yml")["groups"] for r in g["rules"]}
    assert {"CxrMqWorkerDown", "CxrMqRoundAborted", "CxrMqDeadLettersGrowing"} <= set(rules)
    assert 'up{job="cxr-mq"} == 0' in rules["CxrMqWorkerDown"]["expr"]
    assert "dead-letter" in rules["CxrMqDeadLettersGrowing"]["expr"]
    exported = _worker_metric_names()
    for rule in rules.values():
        for name in re.findall(r"\b(cxr_[a-z_]+)", rule["expr"]):
            assert name in exported, f"{rule['alert']} uses {name}, which no worker exports"


def test_dashboard_and_scrape_config_use_exported_metrics():
    dashboard = json.loads((ROLES / "monitoring/files/cxr-mq-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exported = _worker_metric_names()
    used = {n for e in exprs for n in re.findall(r"\b(cxr_[a-z_]+)", e)}
    assert used and used <= exported, used - exported
    variables = _host_vars("common", "monitoring")
    scrape = yaml.safe_load(_render(ROLES / "monitoring/templates/prometheus.yml.j2", variables))
    jobs = {j["job_name"]: j for j in scrape["scrape_configs"]}
    targets = [t for c in jobs["cxr-mq"]["static_configs"] for t in c["targets"]]
    assert targets == ["hosp-a:9410", "hosp-b:9410", "agg-1:9410"]
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["ip-192-0-2-10.eu-central-1.compute.internal:15692"]
