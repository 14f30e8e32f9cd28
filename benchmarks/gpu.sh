#!/usr/bin/env bash
# GPU tests and benchmarks, in parts that each fit one call of the device tool.
#
#   benchmarks/gpu.sh PART [PART...]
#
# Parts (durations are estimates for an H100 until a GPU session measures them; every step
# has its own time limit, so that a part ends inside the tool's 10 minutes whatever happens):
#   wheels       HERE, not on the device (needs the network): the wheels the device image
#                lacks, pytest-asyncio (pyproject's pytest settings name it) and websockets
#                (the server, for load-small), into .whl/
#   tests        ~4 min  pytest -m gpu tests/gpu; then, on the device's CPU and torch, the
#                        exactness tests and the CPU tests of cuda.py and of bfloat16
#   bench-small  ~3 min  random:small, cuda float16: stages.py, then decode graphs vs eager
#   e2e-small    ~3 min  random:small: end_to_end.py
#   bench-large  ~5 min  random:large: stages.py, then decode graphs vs eager
#   e2e-large    ~7 min  random:large: end_to_end.py
#   load-small   ~8 min  random:small: load.py at 1, 4 and 32 clients (ours, ours with
#                        early audio; the naive server at 1 client): the server issue's H100
#                        goals (TTFA p50 <= 150 ms; 32 streams each faster than real time)
#   all          every device part in a row (no overall limit: not for the device tool)
# Several parts may share a call only if their step limits add up to less than 10 minutes
# (e.g. "benchmarks/gpu.sh bench-small" alone is 8 min of limits).
#
# With the device tool (30 min of device time a session, a cold start costs 1-2 min; a call
# that finds the machine warm starts at once, so run the parts back to back, most wanted first):
#   1. here, once:  benchmarks/gpu.sh wheels
#   2. run(command="benchmarks/gpu.sh tests", carry=[".whl"], timeout_s=600)
#   3. run(command="benchmarks/gpu.sh bench-small", carry=[".whl"], timeout_s=600)
#   4. run(command="benchmarks/gpu.sh e2e-small", carry=[".whl"], timeout_s=600)
#   5. run(command="benchmarks/gpu.sh bench-large", carry=[".whl"], timeout_s=600)
#   6. run(command="benchmarks/gpu.sh load-small", carry=[".whl"], timeout_s=600)
#   7. run(command="benchmarks/gpu.sh e2e-large", carry=[".whl"], timeout_s=600)  # if time is left
# (.whl is needed by the tests and load-small parts; carrying it elsewhere costs nothing.)
# Nothing else needs carrying: the device's own python3 has CUDA torch, transformers, numpy,
# accelerate, pytest and pytest-timeout; the package runs from the working tree (PYTHONPATH).
# What comes back lies under the reply's files_at: copy the JSON files into benchmarks/results/
# and commit them (logs too, if they are worth keeping).
#
# Output: logs and JSON go to $OUT when it is set (the device tool's folder that comes back,
# flat, at most 8 files a call), else to benchmarks/results/. Names: gpu-<gpu>-<part>.log,
# gpu-<gpu>-tests.xml (JUnit), gpu-<gpu>-random-<size>.json (stages.py),
# gpu-<gpu>-random-<size>-graphs.json (decode graphs), gpu-<gpu>-random-<size>-e2e.json.
# Exit status: 1 if any step failed (a failing test does not stop the later steps), else 0.
#
# Environment: PYTHON (default: python3 with CUDA torch), DTYPE (default float16), TOKENS
# (decode steps timed, default 64), E2E_ARGS (default "--batch 1 8 --semantic-tokens 150
# --repeats 3 --warmup 1").
set -uo pipefail
SCRIPT=$(realpath "$0")
cd "$(dirname "$SCRIPT")/.."

DTYPE=${DTYPE:-float16}
TOKENS=${TOKENS:-64}
E2E_ARGS=${E2E_ARGS:---batch 1 8 --semantic-tokens 150 --repeats 3 --warmup 1}
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"

wheels() {
    local py=.venv/bin/python
    [ -x "$py" ] || py=python3
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "pytest-asyncio==1.3.0" "websockets==17.4"
    ls -l .whl
}

setup() {
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    PY=${PYTHON:-python3}
    if ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
        echo "gpu.sh: $PY has no CUDA torch (set PYTHON=...)" >&2
        exit 2
    fi
    GPU=$("$PY" -c "
import re, torch
name = torch.cuda.get_device_name().lower().replace('nvidia', '').split()
print(re.sub(r'[^a-z0-9]+', '-', name[0] if name else 'gpu'))")
    # pyproject's pytest settings name pytest-asyncio's options and make unknown ones an
    # error (--strict-config); without its wheel, drop that flag and ignore the warning
    PYTEST_FLAGS=(-q -p no:cacheprovider)
    if ! "$PY" -c "import pytest_asyncio" 2>/dev/null; then
        echo "gpu.sh: no pytest-asyncio (run 'benchmarks/gpu.sh wheels' here and carry .whl)"
        PYTEST_FLAGS+=(-o "addopts=-ra --strict-markers" -W "ignore::pytest.PytestConfigWarning")
    fi
}

environment() {
    echo "== $(date -u +%FT%TZ) $PART on $(hostname)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
    "$PY" -c "
import torch, transformers, numpy
print('python', __import__('sys').version.split()[0], '| torch', torch.__version__,
      '| cuda', torch.version.cuda, '| transformers', transformers.__version__,
      '| numpy', numpy.__version__, '|', torch.cuda.get_device_name())"
    git log --oneline -1 2>/dev/null || true
}

# step NAME SECONDS CMD...: run CMD under a time limit; record a failure and go on
step() {
    local name=$1 limit=$2
    shift 2
    echo "== step $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$@"
    echo "== step $name: exit $? after $((SECONDS - t0))s"
}

# graphs_bench.py MODEL DTYPE TOKENS OUT: eager vs graphed decode ms/step, capture cost
write_graphs_bench() {
    GRAPHS_BENCH=${TMPDIR:-/tmp}/gpu_graphs_bench.py
    cat >"$GRAPHS_BENCH" <<'EOF'
import json, sys, torch
sys.path.insert(0, "benchmarks")
import stages
from stream_engine import Engine
from stream_engine.runtime.cuda import DecodeGraphs

model, dtype, tokens, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.manual_seed(0)
engine = Engine.load(model, device="cuda", dtype=dtype)
stages.DEVICE = engine.device
rows = {}
for name, prompt in (("semantic", 257), ("coarse", 400)):
    m = getattr(engine, f"{name}_model")
    row = {}
    for b in (1, 8):
        eager = stages.ours_ms_per_token(m, b, prompt, tokens)
        m.decode = DecodeGraphs(m)  # shadows the method for stages.py; it keeps the original
        try:  # the untimed pass captures (the cache is reallocated for b slots first)
            graphed = stages.ours_ms_per_token(m, b, prompt, tokens)
        finally:
            del m.decode
        row |= {f"eager_b{b}_ms_per_step": eager, f"graphs_b{b}_ms_per_step": graphed,
                f"graphs_b{b}_speedup": eager / graphed}
    m.setup_cache(8)
    t = stages.clock()
    g = DecodeGraphs(m)
    g.capture_all()
    row |= {"capture_all_8_slots_s": stages.clock() - t, "graphs_captured": len(g.graphs),
            "pool_reserved_mib": torch.cuda.memory_reserved() / 2**20}
    rows[name] = row
    print(name, json.dumps(row, indent=1))
with open(out, "w") as f:
    record = {"model": model, "device": torch.cuda.get_device_name(), "dtype": dtype,
              "torch": torch.__version__, "tokens": tokens, "stages": rows}
    json.dump(record, f, indent=1)
EOF
}

part_tests() {
    step gpu-tests 330 "$PY" -m pytest "${PYTEST_FLAGS[@]}" -m gpu tests/gpu \
        --junitxml="$RES/gpu-$GPU-tests.xml"
    step cpu-tests 200 "$PY" -m pytest "${PYTEST_FLAGS[@]}" tests/test_exactness.py \
        tests/bark/test_dtypes.py tests/runtime/test_decode_graphs.py
}

part_bench() {  # part_bench SIZE LIMIT1 LIMIT2: stages.py, then the decode graphs
    local model=random:$1 base=$RES/gpu-$GPU-random-$1
    step "stages-$1" "$2" "$PY" benchmarks/stages.py --model "$model" --device cuda \
        --dtype "$DTYPE" --tokens "$TOKENS" --out "$base.json"
    write_graphs_bench
    step "graphs-$1" "$3" "$PY" "$GRAPHS_BENCH" "$model" "$DTYPE" "$TOKENS" "$base-graphs.json"
}

part_e2e() {  # part_e2e SIZE LIMIT
    local model=random:$1
    # shellcheck disable=SC2086  # E2E_ARGS is a list of flags
    step "e2e-$1" "$2" "$PY" benchmarks/end_to_end.py --model "$model" --device cuda \
        --dtype "$DTYPE" $E2E_ARGS --out "$RES/gpu-$GPU-random-$1-e2e.json"
}

part_load() {  # part_load SIZE LIMIT
    step "load-$1" "$2" "$PY" benchmarks/load.py --model "random:$1" --device cuda \
        --dtype "$DTYPE" --clients 1 4 32 --sentences 3 --rounds 1 --warmup 1 \
        --naive-max-clients 1 --early-audio --out "$RES/gpu-$GPU-random-$1-load.json"
}

run_part() {
    PART=$1
    case "$PART" in
    tests) part_tests ;;
    bench-small) part_bench small 240 240 ;;
    e2e-small) part_e2e small 540 ;;
    bench-large) part_bench large 300 240 ;;
    e2e-large) part_e2e large 540 ;;
    load-small) part_load small 540 ;;
    *)
        echo "unknown part $PART (wheels, tests, bench-small, e2e-small, bench-large," \
            "e2e-large, load-small, all)" >&2
        exit 2
        ;;
    esac
}

if [ $# -lt 1 ]; then
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$SCRIPT"
    exit 2
fi
if [ "$1" = wheels ]; then
    wheels
    exit
fi
setup
parts=("$@")
[ "$1" = all ] && parts=(tests bench-small e2e-small bench-large e2e-large load-small)
logs=()
for p in "${parts[@]}"; do
    PART=$p
    log=$RES/gpu-$GPU-$p.log
    logs+=("$log")
    environment 2>&1 | tee "$log"
    run_part "$p" 2>&1 | tee -a "$log"
done
# the steps ran in pipelines (subshells): their exit statuses are read back from the logs
if grep -h "^== step .*: exit [1-9]" "${logs[@]}"; then
    echo "gpu.sh: some steps failed (above); outputs in $RES"
    exit 1
fi
echo "gpu.sh: all steps passed; outputs in $RES"
