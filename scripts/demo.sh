#!/usr/bin/env bash
# The main job on the embedded default, from a fresh clone: install, then replay the
# sample messages into the embedded SQLite CRM (./proca-crm.db) and show the result.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
fixtures="${PROCA_FIXTURES:-../shared/fixtures}"
.venv/bin/proca-sync replay "$fixtures"/*.json --crm sqlite:///proca-crm.db
.venv/bin/proca-sync crm contacts --crm sqlite:///proca-crm.db
