"""A RabbitMQ node of the test's own, for scenarios that stop and restart the broker.

The machine's broker on 127.0.0.1:5672 is shared with every other test run and must stay up,
so broker-restart tests start a separate node: its own node name, AMQP and distribution ports
(free loopback ports), data and log directories, Erlang cookie (in a private ``HOME``), config
files and an empty plugin list. ``stop()`` halts it gracefully (SIGTERM to its
``rabbitmq-server``, which runs an orderly shutdown), ``crash()`` SIGKILLs it, and
``start()`` boots it again on the same data directory, so durable queues and persistent
messages survive exactly as on a production node. Every node started is stopped at teardown,
also when the test fails; as a last resort the node's own OS process group (it is started in
a new session) is killed, never anything found by name.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .ports import reusable_port

RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def available() -> bool:
    return (RABBIT_BIN / "rabbitmq-server").exists() and shutil.which("erl") is not None


class RabbitNode:
    """One single-node RabbitMQ broker in ``base_dir``; ``url`` is its AMQP URL."""

    def __init__(self, base_dir: Path, consumer_timeout_ms: int | None = None,
                 channel_tick_ms: int | None = None, tls=None, cookie: str | None = None):
        self.base = Path(base_dir)
        self.name = f"cxrtest-{secrets.token_hex(4)}@localhost"
        # outside the ephemeral range: bound again after every restart (see ports.py)
        self.port = reusable_port()
        self.dist_port = reusable_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.timings: list[tuple[str, float]] = []  # (action, seconds), for reports
        home = self.base / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.cookie = cookie or secrets.token_hex(16).upper()  # shared by a cluster's nodes
        cookie = home / ".erlang.cookie"
        cookie.write_text(self.cookie)
        cookie.chmod(0o400)
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "env.conf").write_text("")  # keep the system's rabbitmq-env.conf out
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            "loopback_users = none\n"
            "log.console = false\n"
            "log.file.level = info\n" + (self._tls_config(tls) if tls is not None else ""))
        advanced = []
        if consumer_timeout_ms is not None:
            advanced.append(f"{{consumer_timeout, {int(consumer_timeout_ms)}}}")
        if channel_tick_ms is not None:
            advanced.append(f"{{channel_tick_interval, {int(channel_tick_ms)}}}")
        (self.base / "advanced.config").write_text(f"[{{rabbit, [{', '.join(advanced)}]}}].\n")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _tls_config(self, pki) -> str:
        """An AMQPS listener on ``tls_port`` (127.0.0.1, and 127.0.0.2 for host-name tests)
        with ``pki``'s server certificate, requiring a client certificate from the same CA."""
        self.tls_port = reusable_port()
        return (f"listeners.ssl.1 = 127.0.0.1:{self.tls_port}\n"
                f"listeners.ssl.2 = 127.0.0.2:{self.tls_port}\n"
                f"ssl_options.cacertfile = {pki.ca}\n"
                f"ssl_options.certfile = {pki.server_cert}\n"
                f"ssl_options.keyfile = {pki.server_key}\n"
                "ssl_options.verify = verify_peer\n"
                "ssl_options.fail_if_no_peer_cert = true\n")

    # -- control ----------------------------------------------------------------------------
    def ctl(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, *args],
                                env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} exited {result.returncode}: "
                               f"{result.stdout}{result.stderr}")
        return result

    def start(self, timeout: float = 90) -> None:
        self.launch()
        self.wait_ready(timeout)

    def launch(self) -> None:
        """Start ``rabbitmq-server`` without waiting for it (nodes of a cluster boot together)."""
        assert self.proc is None or self.proc.poll() is not None, "node is running"
        log = open(self.base / f"server-{self.starts}.log", "ab")
        self.proc = subprocess.Popen([str(RABBIT_BIN / "rabbitmq-server")], env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        log.close()
        self.starts += 1

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited {self.proc.returncode}; see {self.base}")
            if _port_open(self.port) and self._amqp_ok():
                return  # the AMQP listener is the last thing a booting node starts
            time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"RabbitMQ node {self.name} did not start within {timeout}s")

    def _amqp_ok(self) -> bool:
        import pika
        try:
            pika.BlockingConnection(pika.URLParameters(self.url)).close()
            return True
        except Exception:  # noqa: BLE001 - not ready yet
            return False

    def stop(self, timeout: float = 60) -> None:
        """Halt the node gracefully, as an upgrade would: every connection drops, nothing is
        lost. SIGTERM to ``rabbitmq-server`` (which it turns into an orderly shutdown) rather
        than ``rabbitmqctl stop``: the CLI's own start-up can take many seconds on a busy
        machine, which would blur *when* the broker went down."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def restart(self, down_for: float = 0.0) -> None:
        started = time.monotonic()
        self.stop()
        self.timings.append(("stop", time.monotonic() - started))
        time.sleep(down_for)
        started = time.monotonic()
        self.start()
        self.timings.append(("start", time.monotonic() - started))

    def crash(self) -> None:
        """SIGKILL the broker (no orderly shutdown): what only fsynced data survives."""
        self.kill()

    def kill(self) -> None:
        """Last resort: SIGKILL the node's own process group (started in a new session)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@pytest.fixture
def rabbit_node_factory(tmp_path_factory):
    """``make(**options)`` starts a node of this test's own; all are stopped at teardown."""
    if not available():
        pytest.skip("rabbitmq-server is not installed")
    nodes: list[RabbitNode] = []

    def make(**options) -> RabbitNode:
        node = RabbitNode(tmp_path_factory.mktemp("rabbit-node"), **options)
        nodes.append(node)
        node.start()
        return node

    yield make
    for node in nodes:
        try:
            node.stop(timeout=30)
        finally:
            node.kill()


class RabbitCluster:
    """Three (``size``) RabbitMQ nodes of the test's own, clustered on loopback: shared Erlang
    cookie, own node names and ports; nodes 2.. join node 1. ``urls`` lists every node's AMQP
    URL, comma-separated, as workers take it."""

    def __init__(self, base_dir: Path, size: int = 3):
        cookie = secrets.token_hex(16).upper()
        self.nodes = [RabbitNode(Path(base_dir) / f"node{i + 1}", cookie=cookie) for i in range(size)]

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 180) -> None:
        for node in self.nodes:
            node.launch()
        for node in self.nodes:
            node.wait_ready(timeout)
        seed = self.nodes[0].name
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", seed)
            node.ctl("start_app")
            node.wait_ready(timeout)
        members = self.nodes[0].ctl("cluster_status", "--formatter", "json").stdout
        for node in self.nodes:
            assert node.name in members, f"{node.name} did not join: {members}"

    def node_named(self, name: str) -> RabbitNode:
        return next(node for node in self.nodes if node.name == name)

    def leader(self, queue: str) -> RabbitNode:
        """The node leading quorum queue ``queue`` (asked of any running node)."""
        import json
        running = next(node for node in self.nodes if node.running)
        rows = json.loads(running.ctl("list_queues", "name", "leader", "--formatter", "json",
                                      "--quiet").stdout)
        leader = next(row["leader"] for row in rows if row["name"] == queue)
        return self.node_named(leader)

    def stop(self) -> None:
        for node in self.nodes:
            try:
                node.stop(timeout=30)
            finally:
                node.kill()
