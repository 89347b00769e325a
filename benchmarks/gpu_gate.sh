#!/usr/bin/env bash
# GPU gates: the MoE-layer and end-to-end benchmarks in one device call, each compared with
# benchmarks/baselines/<kind>.json (kind from the GPU's name: h100, h200, ...).
#
#   bash benchmarks/gpu_gate.sh                      on the GPU machine: run both, then compare
#   bash benchmarks/gpu_gate.sh --compare DIR [BENCH ...]
#                                                    anywhere: compare the newest DIR/<bench>-<kind>-*.json
#                                                    that measured every shape (not a --shapes run)
#                                                    (kind: $GPU_KIND, default h100; benches: moe_layer e2e_decode)
#
# As one device call: command `GIT_COMMIT=<sha> bash benchmarks/gpu_gate.sh`, timeout_s 600, and
# carry [".whl"] where the machine lacks pydantic (`bash benchmarks/device_wheels.sh` downloads the wheels
# into .whl; they are installed from there first). The
# whole run keeps inside GPU_GATE_BUDGET_S (570 s): moe_layer.py with the arguments of the
# committed H100 run but without the config sweeps and without HF's torch.compile path (~110 s: both stop on
# a clock, so which metrics a run has would depend on its speed, and a gate must not), then e2e_decode.py
# with what is left, on a model of E2E_LAYERS (2) layers so that writing, compiling and benchmarking it fit.
#
#   bash benchmarks/gpu_gate.sh --flicker N [BENCH]  on the GPU machine: the flicker check (issue: a gate
#                                                    that flickers on an unchanged commit is a bug) of BENCH
#                                                    (e2e_decode, the default: the model compiled once and
#                                                    measured N times, ~60 s each at 2 layers; moe_layer: every
#                                                    case measured N times back to back, ~250 s for 5), every
#                                                    run gated; exit 0 only if all N pass. Results
#                                                    <bench>-<kind>-<date>-r<K>.json, packed into one
#                                                    <bench>-<kind>-<date>-runs.tar (a device call returns
#                                                    8 files at most); accept them into the baseline with
#                                                    `benchmarks/gate.py --calibrate`
#   bash benchmarks/gpu_gate.sh --compare-each DIR [BENCH]
#                                                    anywhere: gate every DIR/<bench>-<kind>-*-r<K>.json
#
# Into $OUT (./gpu-gate-out without one): <bench>-<kind>-<date>.json and .png, the outputs as the
# scripts write them (commit them under benchmarks/results/: the gate and report.py convert them),
# and gpu_gate-<kind>-<date>.log with everything the scripts printed. Exit 0 when every result is
# within its baseline's tolerances, 1 when a gate failed or a benchmark gave no result, 2 when the
# kind has no baseline file. A result with no baseline yet is recorded after fetching it:
#   python benchmarks/gate.py benchmarks/results/e2e_decode-h100-DATE.json benchmarks/baselines/h100.json --update
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

compare() {  # compare DIR KIND BENCH...: gate.py on the newest result of each bench; 0 only if all pass
  local dir=$1 kind=$2 status=0 bench result
  shift 2
  local baseline="$ROOT/benchmarks/baselines/$kind.json"
  if [[ ! -f $baseline ]]; then
    echo "gpu_gate: no baseline for $kind ($baseline); record one from these results with benchmarks/gate.py --update"
    return 2
  fi
  for bench in "$@"; do
    # the newest result that measured every shape and token count: a run of some shapes only
    # (moe_layer --shapes, one device call per shape for the full sweeps) or some token counts only
    # (--tokens) is not a gate run, and is passed over, saying so
    result=$("$PY" - "$dir" "$bench" "$kind" <<'PICK'
import json, pathlib, sys
d, bench, kind = sys.argv[1:]
for p in sorted(pathlib.Path(d).glob(f"{bench}-{kind}-*.json"), reverse=True):
    args = json.loads(p.read_text()).get("args") or {}
    if not args.get("shapes") and not args.get("tokens"):
        print(p)
        break
    some = f"--shapes {args['shapes']}" if args.get("shapes") else f"--tokens {args['tokens']}"
    print(f"gpu_gate: passing over {p.name} ({some}: not a gate run)", file=sys.stderr)
PICK
)
    if [[ -z $result ]]; then
      echo "gpu_gate: FAIL no $bench result ($dir/$bench-$kind-*.json): the benchmark did not finish"
      status=1
      continue
    fi
    echo "== $bench: $result against $baseline"
    "$PY" "$ROOT/benchmarks/gate.py" "$result" "$baseline" || status=1
  done
  return $status
}

compare_each() {  # compare_each DIR KIND BENCH: gate.py on every flicker run; 0 only if all pass
  local dir=$1 kind=$2 bench=$3 runs=0 failed=0 result
  local baseline="$ROOT/benchmarks/baselines/$kind.json"
  for result in $(ls "$dir/$bench-$kind-"*-r*.json 2>/dev/null | sort -V); do
    runs=$((runs + 1))
    echo "== $bench run $runs: $result against $baseline"
    "$PY" "$ROOT/benchmarks/gate.py" "$result" "$baseline" || failed=$((failed + 1))
  done
  if ((runs == 0)); then
    echo "gpu_gate: FAIL no flicker runs ($dir/$bench-$kind-*-r*.json)"
    return 1
  fi
  echo "gpu_gate: flicker check of $bench: $((runs - failed)) of $runs runs pass"
  ((failed == 0))
}

if [[ ${1:-} == --compare-each ]]; then
  dir=${2:?usage: gpu_gate.sh --compare-each DIR [BENCH]}
  compare_each "$dir" "${GPU_KIND:-h100}" "${3:-e2e_decode}"
  exit $?
fi
FLICKER=0
FLICKER_BENCH=e2e_decode
if [[ ${1:-} == --flicker ]]; then
  FLICKER=${2:?usage: gpu_gate.sh --flicker N [e2e_decode|moe_layer]}
  FLICKER_BENCH=${3:-e2e_decode}
  if [[ ! $FLICKER =~ ^[1-9][0-9]*$ ]]; then
    echo "gpu_gate: --flicker wants a number of runs >= 1, got '$FLICKER'"
    exit 2
  fi
  if [[ $FLICKER_BENCH != e2e_decode && $FLICKER_BENCH != moe_layer ]]; then
    echo "gpu_gate: --flicker checks e2e_decode or moe_layer, got '$FLICKER_BENCH'"
    exit 2
  fi
fi
MOE_LAYER_GATE_ARGS=(--budget-s 60 --no-sweep --no-compile)  # what the gate measures: nothing on a clock

if [[ ${1:-} == --compare ]]; then
  dir=${2:?usage: gpu_gate.sh --compare DIR [BENCH ...]}
  shift 2
  (($#)) || set -- moe_layer e2e_decode
  compare "$dir" "${GPU_KIND:-h100}" "$@"
  exit $?
fi

START=$(date +%s)
BUDGET_S=${GPU_GATE_BUDGET_S:-570}
E2E_LAYERS=${E2E_LAYERS:-2}
OUT=${OUT:-$ROOT/gpu-gate-out}
left() { echo $((BUDGET_S - ($(date +%s) - START))); }

if ! "$PY" -c "import pydantic" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
KIND=$("$PY" -c "import torch; from moec.runtime.regression_gate import device_kind; \
print(device_kind('cuda', torch.cuda.get_device_name()) if torch.cuda.is_available() else '')") || KIND=
if [[ -z $KIND ]]; then
  echo "gpu_gate: no CUDA device here; run this on the GPU machine (or use --compare)"
  exit 2
fi
WORK=$(mktemp -d /tmp/moec-gpu-gate.XXXXXX)
mkdir -p "$OUT"
DATE=$(date -u +%F)
COMMIT=${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || true)}
LOG="$OUT/gpu_gate-$KIND-$DATE.log"
echo "gpu_gate: $KIND, commit ${COMMIT:-unknown}, budget ${BUDGET_S} s" | tee "$LOG"

if ((FLICKER > 0)); then  # one benchmark measured FLICKER times on this commit, every run gated
  if [[ $FLICKER_BENCH == moe_layer ]]; then
    timeout $(($(left) - 20)) "$PY" benchmarks/moe_layer.py --out "$WORK/$FLICKER_BENCH" "${MOE_LAYER_GATE_ARGS[@]}" \
      --repeat "$FLICKER" ${COMMIT:+--commit "$COMMIT"} >>"$LOG" 2>&1
  else
    timeout $(($(left) - 20)) "$PY" benchmarks/e2e_decode.py --out "$WORK/$FLICKER_BENCH" --work "$WORK/e2e-work" \
      --layers "$E2E_LAYERS" --budget-s $(($(left) - 40)) --repeat "$FLICKER" >>"$LOG" 2>&1
  fi
  echo "gpu_gate: $FLICKER_BENCH.py --repeat $FLICKER exited $? after $(($(date +%s) - START)) s" | tee -a "$LOG"
  for k in $(seq 1 "$FLICKER"); do
    src="$WORK/$FLICKER_BENCH/$FLICKER_BENCH-r$k.json"
    ((k == 1)) && src="$WORK/$FLICKER_BENCH/$FLICKER_BENCH.json"
    [[ -f $src ]] && "$PY" -c "import json, sys; d = json.load(open(sys.argv[1])); d['commit'] = sys.argv[3] or None; \
open(sys.argv[2], 'w').write(json.dumps(d, indent=1))" "$src" "$OUT/$FLICKER_BENCH-$KIND-$DATE-r$k.json" "$COMMIT"
  done
  rm -rf "$WORK/e2e-work"
  compare_each "$OUT" "$KIND" "$FLICKER_BENCH" 2>&1 | tee -a "$LOG"
  status=${PIPESTATUS[0]}
  # a device call returns at most 8 files from $OUT (10 runs lost 3 of them): the runs go back as one tar
  (cd "$OUT" && tar -cf "$FLICKER_BENCH-$KIND-$DATE-runs.tar" "$FLICKER_BENCH-$KIND-$DATE"-r*.json \
    && rm -f "$FLICKER_BENCH-$KIND-$DATE"-r*.json)
  echo "gpu_gate: flicker check done in $(($(date +%s) - START)) s, exit $status; results in $OUT"
  exit "$status"
fi

# 1. the MoE layer: every case, no config sweep, no HF torch.compile path (the commit named)
timeout $(($(left) - 200)) "$PY" benchmarks/moe_layer.py --out "$WORK/moe_layer" "${MOE_LAYER_GATE_ARGS[@]}" \
  ${COMMIT:+--commit "$COMMIT"} >>"$LOG" 2>&1
echo "gpu_gate: moe_layer.py exited $? after $(($(date +%s) - START)) s" | tee -a "$LOG"
if [[ -f $WORK/moe_layer/moe_layer.json ]]; then
  cp "$WORK/moe_layer/moe_layer.json" "$OUT/moe_layer-$KIND-$DATE.json"
  [[ -f $WORK/moe_layer/moe_layer.png ]] && cp "$WORK/moe_layer/moe_layer.png" "$OUT/moe_layer-$KIND-$DATE.png"
fi

# 2. the model end to end, in what is left (its own budget stops parts in time; 40 s stay for the gate)
E2E_BUDGET=$(($(left) - 40))
timeout $((E2E_BUDGET + 20)) "$PY" benchmarks/e2e_decode.py --out "$WORK/e2e" --work "$WORK/e2e-work" \
  --layers "$E2E_LAYERS" --budget-s "$E2E_BUDGET" >>"$LOG" 2>&1
echo "gpu_gate: e2e_decode.py exited $? after $(($(date +%s) - START)) s" | tee -a "$LOG"
if [[ -f $WORK/e2e/e2e_decode.json ]]; then
  # e2e_decode.py records no commit of its own: add the one this run measured
  "$PY" - "$WORK/e2e/e2e_decode.json" "$OUT/e2e_decode-$KIND-$DATE.json" "$COMMIT" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
doc["commit"] = sys.argv[3] or None
open(sys.argv[2], "w").write(json.dumps(doc, indent=1))
EOF
  [[ -f $WORK/e2e/e2e_decode.png ]] && cp "$WORK/e2e/e2e_decode.png" "$OUT/e2e_decode-$KIND-$DATE.png"
fi
rm -rf "$WORK/e2e-work"  # the model and artifact: tens of GB

# 3. the gates, printed last so that they end the device call's output
compare "$OUT" "$KIND" moe_layer e2e_decode 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
echo "gpu_gate: done in $(($(date +%s) - START)) s, exit $status; results in $OUT"
exit "$status"
