#!/usr/bin/env bash
# The test command: installs everything (venv, packages, RabbitMQ, PostgreSQL) on a fresh
# machine, then runs the linters, the type checker and the whole test suite.
# Extra arguments go to pytest (e.g. scripts/test.sh -k replay).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/services.sh rabbitmq postgres chromium
export PGPASSWORD="${PGPASSWORD:-postgres}"
. .venv/bin/activate
echo "== ruff"; ruff check proca_sync tests bench reliability
echo "== mypy --strict"; mypy proca_sync reliability
echo "== pytest"; exec pytest "$@"
