#!/usr/bin/env bash
# The test command: set up (idempotent), lint, type-check, run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# headless Chromium renders the HTML report in tests/test_report.py
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "warning: chromium not found; tests/test_report.py needs it (apt-get install chromium)" >&2
  fi
fi
.venv/bin/ruff check mmdsweep tests benchmarks
.venv/bin/ruff format --check mmdsweep tests benchmarks
.venv/bin/mypy mmdsweep
# the package layering (pyproject.toml [tool.importlinter]; docs/architecture.md)
.venv/bin/lint-imports
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests (exit 5)" >&2
  exit 1
fi
if [ "$rc" = 0 ] && [ "$#" = 0 ]; then
  # numerics must not depend on the number of torch threads: the run above used one intra-op thread
  # for the modules that ask for it; the tests marked `threads` run again with 2 threads
  # (tests/conftest.py honours MMDSWEEP_TEST_THREADS)
  for threads in 2; do
    set +e
    MMDSWEEP_TEST_THREADS=$threads .venv/bin/python -m pytest -q -m threads
    rc=$?
    set -e
    if [ "$rc" != 0 ]; then
      echo "tests marked 'threads' failed with $threads torch thread(s)" >&2
      exit "$rc"
    fi
  done
fi
exit "$rc"
