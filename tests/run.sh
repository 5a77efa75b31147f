#!/usr/bin/env bash
# Install everything the tests need (venv, dev extras, the C++ example's build inputs) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/setup.sh dev
# The C++ example (tests/test_cpp_host.py builds it with examples/cpp/build.sh) needs a compiler and CMake.
if ! command -v cmake >/dev/null || ! command -v g++ >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends cmake g++ >/dev/null
fi
rc=0
.venv/bin/python -m pytest "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests; the test suite is missing or broken" >&2
  exit 1
fi
exit "$rc"
