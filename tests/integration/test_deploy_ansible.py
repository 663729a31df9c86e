"""The Ansible assets run for real: ansible-lint's production profile, the provisioning play
against moto's server, and the roles applied to localhost in a sandbox prefix with service
management off. Nothing here skips: scripts/setup.sh installs Ansible (the deploy extra).

Each playbook run is expensive (seconds of Ansible start-up per run on a shared 2-core host),
so every run happens once per module in a fixture and the tests read its results.
"""
from __future__ import annotations

import subprocess
import sys
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
