#!/usr/bin/env bash
# Make sure a RabbitMQ broker answers on 127.0.0.1:5672: start a stopped one, or install
# Debian's rabbitmq-server (as root) and start it.
set -euo pipefail
port_open() { (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; }

if port_open; then exit 0; fi
if ! command -v rabbitmq-server >/dev/null 2>&1; then
  echo "rabbitmq: not installed; installing Debian's rabbitmq-server" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server >/dev/null
fi
echo "rabbitmq: starting the server" >&2
rabbitmq-server -detached || true
for _ in $(seq 1 90); do
  if port_open; then
    rabbitmqctl await_startup >/dev/null 2>&1 || true
    exit 0
  fi
  sleep 1
done
echo "rabbitmq: did not start listening on 127.0.0.1:5672 within 90s" >&2
exit 1
