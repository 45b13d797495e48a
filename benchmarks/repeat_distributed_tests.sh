#!/usr/bin/env bash
# Run tests/test_distributed.py N times in a row (default 50), stopping at the first
# failure; one line per run in the log (default /tmp/repeat_distributed.log).
# Usage: benchmarks/repeat_distributed_tests.sh [N] [LOG]   (from the repository root;
# PYTHON defaults to .venv/bin/python)
set -u
n=${1:-50}
log=${2:-/tmp/repeat_distributed.log}
python=${PYTHON:-.venv/bin/python}
export PYTHONPATH=${PYTHONPATH:-$PWD/src} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
: > "$log"
start=$(date +%s)
for i in $(seq 1 "$n"); do
  t0=$(date +%s)
  "$python" -m pytest -q -s -p no:cacheprovider tests/test_distributed.py > "$log.run$i" 2>&1
  rc=$?
  echo "run $i rc=$rc $(( $(date +%s) - t0 ))s $(tail -1 "$log.run$i")" >> "$log"
  if [ $rc -ne 0 ] || grep -qE "terminate called|SIGABRT|exitcode|ProcessExitedException" "$log.run$i"; then
    echo "FAILED at run $i after $(( $(date +%s) - start ))s (see $log.run$i)" >> "$log"; exit 1
  fi
  rm -f "$log.run$i"
done
echo "$n runs in a row passed in $(( $(date +%s) - start ))s" >> "$log"
