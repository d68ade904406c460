#!/usr/bin/env bash
# Mutation testing of the core with mutmut (results and survivors: MUTATION.md).
#
#   scripts/mutation.sh                      every module of [tool.mutmut] only_mutate, afresh
#   scripts/mutation.sh proca_sync/consumer/lanes.py proca_sync/crm/sql
#                                            only those modules (files or folders) again;
#                                            the other modules keep their last results
#   scripts/mutation.sh 'proca_sync.consumer.intake.xǁAckBookǁ*'
#                                            mutants by name (globs, as mutmut names them)
#   MUTATION_JOBS=1 scripts/mutation.sh …    worker processes (default 2: a shared machine)
#
# Runs on the fast tests only (tests/unit and tests/integration without the `rabbitmq`
# marker: SQLite files and the PostgreSQL on loopback). Not part of CI: a full run (about 5,500 mutants)
# takes hours on 2 cores shared with other jobs. A first run in a checkout maps which test
# reaches which function (the whole fast suite under tracing, ~20 min here); later runs reuse
# that map and run each mutant against its function's tests only (a survivor of sync/,
# crypto.py or messages/ costs ~2 min). Ends with the score table of each module (the figures
# MUTATION.md records). Work files go to mutants/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bash scripts/bootstrap.sh
bash scripts/services.sh postgres
. .venv/bin/activate

# The tests find the shared fixtures beside the checkout (../shared, or $PROCA_SHARED);
# mutmut runs them from mutants/, one level deeper, so ./shared must lead there too.
shared=${PROCA_SHARED:-$root/../shared}
[ -d "$shared/fixtures" ] || { echo "error: no fixtures in $shared (set PROCA_SHARED)" >&2; exit 2; }
[ -e shared ] || ln -s "$(cd "$shared" && pwd)" shared
export PROCA_SHARED="$shared"
unset CI  # a missing PostgreSQL skips its tests here instead of failing the clean run

patterns=()
for module in "$@"; do
  case "$module" in
    *'*'*) patterns+=("$module"); continue ;;  # a mutant-name glob, passed as is
    proca_sync/*) ;;
    *) echo "error: modules are paths under proca_sync/, got $module" >&2; exit 2 ;;
  esac
  name=${module%.py}; name=${name%/}; name=${name//\//.}
  patterns+=("$name.*")
done
if [ ${#patterns[@]} -eq 0 ]; then
  rm -rf mutants  # a full run starts from scratch, so its figures are reproducible
fi

jobs=${MUTATION_JOBS:-2}
started=$(date +%s)
mkdir -p mutants
nice -n 10 mutmut run --max-children "$jobs" "${patterns[@]}" > mutants/run.log 2>&1 ||
  { tail -c 3000 mutants/run.log; exit 1; }
tail -c 400 mutants/run.log | tr '\r' '\n' | tail -n 3
echo "wall time: $(( $(date +%s) - started )) s with $jobs worker(s)"

# Per-module score: detected / checked. A mutant is detected when a test failed, hit the
# time limit or died (mutmut's "killed", "timeout", "suspicious", "segfault"); "survived"
# and "no tests" are not; "not checked" ones (an interrupted run) are left out. Only AckBook
# (the ack bookkeeping) counts in consumer/intake.py: the rest of it talks to the broker,
# which the fast tests do not start.
report=$(cat <<'EOF'
import collections, re, sys
detected = {"killed", "timeout", "suspicious", "segfault"}
rows = collections.defaultdict(collections.Counter)
survivors = []
for line in sys.stdin:
    m = re.match(r"\s*(\S+): (.+)$", line)
    if not m:
        continue
    name, status = m.group(1), m.group(2).strip()
    module = name.split(".x", 1)[0]
    if module == "proca_sync.consumer.intake":
        if "AckBook" not in name:
            continue
        module += " (AckBook)"
    kind = "detected" if status in detected else status
    rows[module][kind] += 1
    if kind in ("survived", "no tests"):
        survivors.append((name, status))
print(f"{'module':42} {'mutants':>7} {'detected':>8} {'survived':>8} {'no tests':>8} "
      f"{'unchecked':>9} {'score':>6}")
for module in sorted(rows):
    c = rows[module]
    total = sum(c.values())
    checked = total - c["not checked"]
    score = f"{100 * c['detected'] / checked:5.1f}%" if checked else "-"
    print(f"{module:42} {total:7} {c['detected']:8} {c['survived']:8} {c['no tests']:8} "
          f"{c['not checked']:9} {score:>6}")
print()
print("not detected (MUTATION.md says why each is equivalent or harmless):")
for name, status in sorted(survivors):
    print(f"  {status:10} {name}")
EOF
)
mutmut results --all true | python3 -c "$report"
