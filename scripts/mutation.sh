#!/usr/bin/env bash
# Mutation testing of the core with mutmut (results and survivors: MUTATION.md).
#
#   scripts/mutation.sh                      every module of [tool.mutmut] only_mutate, afresh
#   scripts/mutation.sh proca_sync/consumer/lanes.py proca_sync/crm/sql
#                                            only those modules (files or folders) again;
#                                            the other modules keep their last results
#   MUTATION_JOBS=1 scripts/mutation.sh …    worker processes (default 2: a shared machine)
#
# Runs on the fast tests only (tests/unit and tests/integration without the `rabbitmq`
# marker: SQLite files and the PostgreSQL on loopback). Not part of CI: a full run takes
# about an hour on 2 busy cores. Ends with the score table of each module (the figures
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

# Per-module score. Only AckBook (the ack bookkeeping) is in scope in consumer/intake.py:
# the rest of it talks to the broker, which the fast tests do not start.
mutmut results --all true | python3 -c '
import collections, re, sys
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
    rows[module][status] += 1
    if status != "killed":
        survivors.append((name, status))
print(f"{\"module\":42} {\"mutants\":>7} {\"killed\":>7} {\"survived\":>8} {\"other\":>6} {\"score\":>6}")
for module in sorted(rows):
    c = rows[module]
    total = sum(c.values())
    other = total - c["killed"] - c["survived"]
    print(f"{module:42} {total:7} {c[\"killed\"]:7} {c[\"survived\"]:8} {other:6} "
          f"{100 * c[\"killed\"] / total:5.1f}%")
print()
print("not killed (see MUTATION.md for why each is equivalent or harmless):")
for name, status in sorted(survivors):
    print(f"  {status:10} {name}")
'
