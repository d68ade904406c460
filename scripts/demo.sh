#!/usr/bin/env bash
# The main job from a fresh clone: install, make sure RabbitMQ runs on loopback (installing
# Debian's rabbitmq-server when absent), then `proca-sync demo`: simulated Proca traffic
# synced by the real consumer into the embedded SQLite CRM (./proca-crm.db).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/services.sh rabbitmq
exec .venv/bin/proca-sync demo "$@"
