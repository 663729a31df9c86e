#!/usr/bin/env bash
# Write constraints.txt: the exact versions of cxr-mq's runtime dependencies, as installed in
# the tested virtual environment. Every host and the Docker image install the one wheel with
# `pip install -c constraints.txt`, so nothing is resolved anew on a host. Rerun after
# changing pyproject.toml's dependencies (tests/unit/test_deploy_assets.py checks coverage).
# Needs the package index (metadata only: nothing is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${CXR_MQ_VENV:-.venv}/bin/python
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PY" -m pip freeze --all --exclude-editable > "$work/installed.txt"
"$PY" -m pip install --dry-run --ignore-installed --quiet --report "$work/report.json" \
  -c "$work/installed.txt" . 2>/dev/null
"$PY" - "$work/report.json" > constraints.txt <<'PYEOF'
import json
import platform
import sys

report = json.load(open(sys.argv[1]))
pins = sorted((i["metadata"]["name"].lower().replace("_", "-"), i["metadata"]["version"])
              for i in report["install"] if i["metadata"]["name"] != "cxr-mq")
print("# cxr-mq runtime dependencies, pinned (scripts/lock.sh; do not edit by hand).")
print(f"# Resolved for CPython {platform.python_version_tuple()[0]}.{platform.python_version_tuple()[1]}"
      f" on {platform.system()} {platform.machine()}: hosts must run this Python minor version.")
versions = dict(pins)
if "tensorflow-cpu" in versions:  # arm64 hosts and images install tensorflow (same release)
    pins.append(("tensorflow", versions["tensorflow-cpu"]))
for name, version in sorted(pins):
    print(f"{name}=={version}")
PYEOF
echo "constraints.txt: $(grep -c '==' constraints.txt) pins" >&2
