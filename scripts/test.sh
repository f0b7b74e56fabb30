#!/usr/bin/env bash
# The test suite: set-up (idempotent), then pytest on CPU.  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
exec .venv/bin/python -m pytest -q "$@"
