#!/usr/bin/env bash
# Prepare a machine for cxr-mq: a virtual environment with the package, its test extras and
# the deployment tooling (Ansible, ansible-lint) that the deploy tests run.
# Idempotent and quick when nothing changed (a stamp holds the hash of pyproject.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${CXR_MQ_VENV:-.venv}
PYTHON=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    echo "setup: python3 -m venv failed; installing Debian's python3-venv" >&2
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi
stamp="$VENV/.cxr-mq-installed"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! "$VENV/bin/python" -c "import cxr_mq" 2>/dev/null; then
  echo "setup: installing cxr-mq and its dependencies into $VENV (first time: a few minutes)" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[test,deploy]"
  echo "$want" > "$stamp"
fi
