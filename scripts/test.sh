#!/usr/bin/env bash
# Set up .venv/ (first run only; later runs take a second) and run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$repo/scripts/setup-venv.sh"
cd "$repo"
exec "$repo/.venv/bin/python" -m pytest "$@"
