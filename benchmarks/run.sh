#!/usr/bin/env bash
# Runs GPU benchmarks one after another, each under its own time cap, then packs the results.
#
#   benchmarks/run.sh overhead:60 figure5:250 serving:300      # NAME[:SECONDS] ...
#
# Names: overhead, step_time, serving, serving_pixels, serving_mobilenet, serving_host, figure5, table1, figure3, lowering. A step that
# fails or runs out of time is reported and the next one still runs. Each script writes its
# JSON to benchmarks/results/ and its section of benchmarks/README.md; when $OUT is set, both
# are packed into $OUT/results.tgz (the way results come back from a lent GPU machine).
# Extra arguments for a step: BENCH_ARGS_<NAME>="..." in this script's environment, exported
# or on the same command line (e.g. BENCH_ARGS_serving="--trial-s 3" benchmarks/run.sh serving).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
mkdir -p benchmarks/results
status=0
for item in "$@"; do
  name=${item%%:*}
  cap=${item#*:}
  [[ "$cap" == "$item" ]] && cap=600
  if ! [[ "$cap" =~ ^[0-9]+$ ]] || (( cap < 30 )); then
    echo "[run.sh] $name: the cap must be a whole number of seconds >= 30, got '$cap'" >&2; status=2; continue
  fi
  extra_var="BENCH_ARGS_${name}"
  extra=${!extra_var:-}
  case "$name" in
    overhead) cmd=("$PY" benchmarks/overhead.py) ;;
    step_time) cmd=("$PY" benchmarks/step_time.py) ;;
    serving) cmd=("$PY" benchmarks/serving.py) ;;
    serving_pixels) cmd=("$PY" benchmarks/serving.py --pixels) ;;
    serving_mobilenet) cmd=("$PY" benchmarks/serving.py --arch mobilenetv2) ;;
    serving_host) cmd=("$PY" benchmarks/serving.py --host-only --trial-s 3 --bisect 3) ;;
    figure5) cmd=("$PY" benchmarks/paper.py --parts figure5_bfloat16,figure5_float32 --budget-s "$((cap - 10))") ;;
    table1) cmd=("$PY" benchmarks/paper.py --parts table1_jax,table1_torch --budget-s "$((cap - 10))") ;;
    figure3) cmd=("$PY" benchmarks/paper.py --parts figure3_torch,figure3_jax --budget-s "$((cap - 10))") ;;
    lowering) cmd=("$PY" benchmarks/lowering.py --budget-s "$((cap - 20))") ;;
    *) echo "[run.sh] unknown step '$name'" >&2; status=2; continue ;;
  esac
  # shellcheck disable=SC2206
  cmd+=($extra)
  echo "[run.sh] $name (up to ${cap} s): ${cmd[*]}" >&2
  start=$SECONDS
  timeout --kill-after=10 "$cap" "${cmd[@]}" 2>&1 | tee "benchmarks/results/log_${name}.txt"
  rc=${PIPESTATUS[0]}
  echo "[run.sh] $name: exit $rc after $((SECONDS - start)) s" >&2
  [[ $rc -ne 0 ]] && status=1
done
if [[ -n "${OUT:-}" ]]; then
  tar czf "$OUT/results.tgz" benchmarks/results benchmarks/README.md || status=1
fi
exit $status
