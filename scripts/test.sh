#!/usr/bin/env bash
# The test command: sets up everything it needs (virtual environment, packages, RabbitMQ,
# Chromium for the report pages; moto's S3+KMS server is started by the tests on a free
# loopback port), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k contract`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/ensure-rabbitmq.sh
bash scripts/ensure-chromium.sh
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
exec "${CXR_MQ_VENV:-.venv}/bin/python" -m pytest -ra --durations=25 "$@"
