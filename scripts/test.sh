#!/usr/bin/env bash
# Set up (scripts/setup.sh), check the generated gRPC code is current, run the whole test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh tests/index -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python scripts/gen_proto.py --check
set +e
.venv/bin/python -m pytest "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$rc"
