#!/usr/bin/env bash
# Install everything the tests need (venv, dev extras, the C++ example's build inputs) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh dev
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests; the test suite is missing or broken" >&2
  exit 1
fi
exit "$rc"
