#!/usr/bin/env bash
# Synthesize a sentence to a WAV file with an in-process server: scripts/say.sh "text" out.wav [model]
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e .
.venv/bin/python -m stream_engine say "${1:-Hello from stream engine.}" -o "${2:-out.wav}" --model "${3:-random:small}"
