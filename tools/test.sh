#!/usr/bin/env bash
# The test command: installs everything Python needs into .venv, then runs lint, types and tests.
# System packages (mosquitto, PulseAudio...) come from `.ci/run` or the README.
# Arguments go to pytest: CI runs everything; `bash tools/test.sh -m "not slow"` is the fast lane.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0   # the CPU wheel; a bare `torch` would pull CUDA packages
.venv/bin/pip install -q -e '.[cpu,alm,tools,asr,speakers,web,pipecat,test,web-test]'
.venv/bin/ruff check stream_ser tests tools
.venv/bin/mypy
.venv/bin/python -m pytest "$@"
