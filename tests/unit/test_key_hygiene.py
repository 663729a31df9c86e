"""Hygiene of keys and plaintexts (issue 10 item 10): nothing secret is left behind when a
process dies, no key file is wider than 0600, no repr prints a key.

(The hospital's plaintext updates, opt-in with a retention, are tested over the real broker
and store in ``tests/integration/test_retention.py``.)
"""
from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from cxr_mq.cli import main
from cxr_mq.crypto import KeyPair

# A hospital-like process: a compact codec whose process pool encrypts an update; it stops
# (for ever) once the pool is busy, reports its pool and open files, and waits to be killed.
POOL_CHILD = r"""
import io, json, os, sys, time
import numpy as np
from cxr_mq.crypto import CompactCodec

codec = CompactCodec.generate()
codec.workers, codec.parallel_min_params = 2, 1
serial_map = codec._ordered_map

def stalled_map(fn, tasks):
    results = serial_map(fn, tasks)
    first = next(results)  # the pool is running and the shared files are open
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    print(json.dumps({"pool": codec.pool_pids(), "fds": fds}), flush=True)
    time.sleep(600)
    yield first

codec._ordered_map = stalled_map
weights = (np.random.default_rng(0).standard_normal(4 * codec.POLY_MODULUS_DEGREE) * 0.01).astype(np.float32)
codec.encrypt_update(weights, 10, io.BytesIO())
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie holds nothing
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="memfds and /proc are Linux")
def test_pool_shares_plaintext_through_memfds_and_its_workers_die_with_the_parent():
    child = subprocess.Popen([sys.executable, "-c", POOL_CHILD], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, env={**os.environ, "CXR_MQ_FAULTS": ""})
    try:
        ready, _, _ = select.select([child.stdout], [], [], 240)
        assert ready, f"the pool never started: {child.stderr.read1(4000) if child.poll() is not None else ''}"
        line = child.stdout.readline()
        assert line, child.stderr.read().decode()[-4000:]
        report = json.loads(line)
        pool, links = report["pool"], list(report["fds"].values())
        assert len(pool) == 2 and all(_alive(pid) for pid in pool)
        # the plaintext weights and chunks are in anonymous memfds, not named tmpfs files
        assert any(link.startswith("/memfd:cxr-mq-weights") for link in links), links
        assert any(link.startswith("/memfd:cxr-mq-chunks") for link in links), links
        named = [link for link in links if link.startswith("/dev/shm/") and not link.endswith("(deleted)")]
        assert named == [], f"files that would survive a crash: {named}"
    finally:
        child.send_signal(signal.SIGKILL)  # a crash, or the hospital's os._exit on SIGTERM
        child.wait(timeout=30)
    # the workers (each holding the secret key) end with their parent, not orphaned
    deadline = time.monotonic() + 20
    while any(_alive(pid) for pid in pool) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [pid for pid in pool if _alive(pid)]
    for pid in survivors:  # don't leave them running even when the test fails
        os.kill(pid, signal.SIGKILL)
    assert survivors == [], "pool workers outlived their parent"


def test_key_pair_repr_redacts_the_secret():
    secret, public = b"\x00TOP-SECRET-KEY\xff" * 8, b"public context"
    pair = KeyPair(secret=secret, public=public)
    for text in (repr(pair), str(pair), f"{pair!r} {pair}"):
        assert "TOP-SECRET" not in text and secret.hex()[:32] not in text and "\\x00" not in text
        assert "redacted" in text and str(len(secret)) in text
    assert pair.secret == secret  # redacted in print only


def test_keys_init_force_over_a_wider_file_ends_0600(tmp_path):
    secret = tmp_path / "secret.ctx"
    secret.write_bytes(b"an old key")
    secret.chmod(0o644)  # e.g. copied around, or made by hand
    result = CliRunner().invoke(main, ["keys", "init", "--out", str(tmp_path), "--no-upload",
                                       "--force", "--profile", "seed"], env={"CXR_MQ_CONFIG": ""})
    assert result.exit_code == 0, result.output
    assert secret.stat().st_mode & 0o777 == 0o600
    assert secret.read_bytes() != b"an old key"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
