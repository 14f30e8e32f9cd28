#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, fetched HERE (the GPU machine reaches no package index)
# into .whl/ (git-ignored), and the device tool's command that carries and installs them.
#
#   benchmarks/gpu_wheels.sh        [PY312=/path/to/python3.12, to test-install them all]
#
# The GPU machine's python3 (3.12, x86_64) has CUDA torch, transformers 5, numpy, accelerate,
# pytest, pytest-timeout, prometheus-client, anyio, httpx, h11 and click (the device tool's
# KINDS.md lists its packages). What it lacks:
#   pytest-asyncio   tests/conftest.py imports it, and pyproject's pytest settings name its
#                    options under --strict-config: without it `pytest tests/gpu` exits 4
#   websockets, starlette, uvicorn, av
#                    the server (benchmarks/gpu_check.py's server part; without them that part
#                    is skipped, naming them)
# Their own requirements are fetched too, then dropped where the machine has them (DEVICE_HAS);
# anything else they need is kept. Not carried: opuslib (the checks ask for PCM, and the machine
# has no libopus for it to load), openai (load.py's HTTP side only).
# The versions are the ones this repository's .venv runs, one of each.
set -euo pipefail
cd "$(dirname "$(realpath "$0")")/.."

WANT=(pytest-asyncio==1.5.0 websockets==17.4 starlette==1.10.0 uvicorn==0.54.0 av==18.1.0)
# on the GPU machine already (KINDS.md), by normalised distribution name
DEVICE_HAS=(anyio click h11 idna iniconfig packaging pluggy pygments pytest sniffio
    typing-extensions)
LIMIT_MIB=48 # the working tree and carried paths travel together, 64 MiB in all

PY=.venv/bin/python
[ -x "$PY" ] || PY=python3
rm -rf .whl
mkdir -p .whl
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --abi cp312 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${WANT[@]}"

for f in .whl/*.whl; do
    name=$(basename "$f" | cut -d- -f1 | tr '[:upper:]_.' '[:lower:]--')
    for have in "${DEVICE_HAS[@]}"; do
        if [ "$name" = "$have" ]; then
            rm "$f"
        fi
    done
done

# they install as they will there: all of them with a CPython 3.12 (PY312, or python3.12 on the
# PATH), else the pure-Python ones
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
py312=${PY312:-$(command -v python3.12 || true)}
if [ -n "$py312" ] && "$py312" -m pip --version >/dev/null 2>&1; then
    "$py312" -m pip install -q --no-index --no-deps --no-compile --target "$tmp" .whl/*.whl
    # the compiled ones import (the others import what the GPU machine has and this may not)
    PYTHONPATH="$tmp" "$py312" -c "import av, websockets.speedups"
    echo "installed into a --target folder with $py312; av and websockets import"
else
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$tmp" .whl/*-none-any.whl
    echo "the pure-Python wheels installed into a --target folder (no python3.12 here)"
fi

ls -l .whl
total=$(du -cb .whl/*.whl | tail -1 | cut -f1)
echo "total $((total / 1024 / 1024)) MiB ($total bytes) in $(ls .whl/*.whl | wc -l) wheels"
if [ "$total" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
    echo "gpu_wheels.sh: over $LIMIT_MIB MiB: too much to carry beside the working tree" >&2
    exit 1
fi

setup='set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 || exit'
cat <<EOF

Carry them with the device tool (one H100/H200; 15 minutes of device time, a start costs 1-2):
1. the GPU check (8 minutes at most; the timeout leaves 3-4 minutes for step 2):
   run(command="$setup; python3 benchmarks/gpu_check.py 2>&1 | tee \$OUT/gpu-check.log", carry=[".whl"], timeout_s=540)
2. then, on the still warm machine, one of:
   run(command="$setup; python3 benchmarks/gpu_check.py --parts correctness", carry=[".whl"], timeout_s=180)
   run(command="$setup; python3 -m pytest -m gpu tests/gpu -x -q -p no:cacheprovider --junitxml=\$OUT/gpu-tests.xml", carry=[".whl"], timeout_s=180)
   and give_back() when done.
Copy the JSON from the reply's files_at into benchmarks/results/ and commit it.
EOF
