#!/usr/bin/env bash
# Install noisyops and everything its tests and entry points need, on a fresh machine.
# The extension is built against the installed torch, hence --no-build-isolation.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install -q -r requirements.txt
MAX_JOBS="${MAX_JOBS:-2}" python -m pip install -q --no-build-isolation -e .
python -m noisyops.info
