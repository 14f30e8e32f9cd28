#!/usr/bin/env bash
# The whole test suite on a fresh machine: venv, CPU torch, libopus, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ldconfig -p 2>/dev/null | grep -q libopus.so.0; then
    (apt-get update -qq && apt-get install -y -qq libopus0) >/dev/null
fi
# headless Chromium for the browser client's test (Playwright drives it; it downloads no browser)
if ! command -v chromium >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null \
        || echo "warning: chromium could not be installed; the browser tests will skip" >&2
fi
# a C++ compiler and ninja build the CPU decode kernels (stream_engine/bark/cpu_kernels.py)
if ! command -v g++ >/dev/null || ! command -v ninja >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ ninja-build) >/dev/null \
        || echo "warning: g++/ninja could not be installed; decode steps fall back to oneDNN" >&2
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
# torch first, pinned: on this machine kind 2.13.0 is the CPU wheel on local disk
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[dev,pipecat,livekit,ray]"
.venv/bin/ruff format --check stream_engine tests benchmarks clients
.venv/bin/ruff check stream_engine tests benchmarks clients
.venv/bin/mypy  # the package, integrations included (pyproject.toml)
.venv/bin/mypy clients/npc/npc.py clients/voice-agent/agent.py
.venv/bin/python -m pytest "$@"
