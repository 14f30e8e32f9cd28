#!/usr/bin/env bash
# Run the streaming server: scripts/serve.sh [stream-engine serve options]
# Defaults to random:small on 127.0.0.1:8765 (no model hub needed); pass --model suno/bark-small
# for real weights. Open http://127.0.0.1:8765/ for the browser client.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p 2>/dev/null | grep -q libopus.so.0; then
    (apt-get update -qq && apt-get install -y -qq libopus0) >/dev/null
fi
# a C++ compiler and ninja build the CPU decode kernels (stream_engine/bark/cpu_kernels.py)
if ! command -v g++ >/dev/null || ! command -v ninja >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ ninja-build) >/dev/null \
        || echo "warning: g++/ninja could not be installed; decode steps fall back to oneDNN" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e .
has_model=0
for a in "$@"; do [ "$a" = "--model" ] && has_model=1; done
if [ "$has_model" = 0 ]; then set -- --model random:small "$@"; fi
exec .venv/bin/python -m stream_engine serve "$@"
