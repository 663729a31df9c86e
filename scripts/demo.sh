#!/usr/bin/env bash
# The demo: sets up the virtual environment if needed, then runs the whole federation on this
# machine (embedded broker and store, synthetic data; the threshold profile: the key ceremony
# through the hospitals, then the committee decrypting every round) and writes a report to
# reports/demo/. Extra arguments go to `cxr-mq demo`, e.g. `bash scripts/demo.sh --rounds 3
# --compare`, or `--profile compact` for the single-shared-key profile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${CXR_MQ_VENV:-.venv}/bin/cxr-mq" demo --report reports/demo "$@"
