#!/usr/bin/env bash
# The benchmarks from a fresh checkout: venv + proca-sync (scripts/bootstrap.sh), RabbitMQ
# and PostgreSQL (scripts/services.sh), the bench-only Python tools (matplotlib for the
# plots, py-spy for the profile: never project dependencies), the Node peer from the npm
# registry into bench/node_modules (pinned by bench/package.json + package-lock.json),
# then `python -m bench.run` with the arguments given (e.g. --quick, --only proca-null).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/services.sh rabbitmq postgres
export PGPASSWORD="${PGPASSWORD:-postgres}"
. .venv/bin/activate
python -c 'import matplotlib' 2>/dev/null && command -v py-spy >/dev/null ||
  python -m pip install -q matplotlib py-spy
node_args=()
if command -v npm >/dev/null 2>&1; then
  if [ ! -d bench/node_modules/@proca/queue ] || [ bench/package-lock.json -nt bench/node_modules ]; then
    npm ci --prefix bench --no-audit --no-fund --loglevel=error
  fi
else
  echo "warning: npm not found: the Node cases are skipped" >&2
  node_args=(--no-node)
fi
exec python -m bench.run "${node_args[@]}" "$@"
