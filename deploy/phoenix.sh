#!/usr/bin/env bash
# Start Arize Phoenix (trace UI + OTLP receiver) on loopback, from its own virtualenv.
#   deploy/phoenix.sh            # UI at http://127.0.0.1:6006, OTLP/HTTP at :6006/v1/traces, gRPC at :4317
# Then serve with tracing pointed at it, e.g. deploy/serving-phoenix.yaml:
#   guarded-serving serve deploy/serving-phoenix.yaml
# Phoenix has its own pins (it would fight ours over pandas/numpy), hence the separate venv.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.deploy-venvs/phoenix
if [ ! -x "$VENV/bin/phoenix" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q arize-phoenix
fi
export PHOENIX_HOST=${PHOENIX_HOST:-127.0.0.1}
export PHOENIX_PORT=${PHOENIX_PORT:-6006}
export PHOENIX_WORKING_DIR=${PHOENIX_WORKING_DIR:-$PWD/.phoenix}
mkdir -p "$PHOENIX_WORKING_DIR"
exec "$VENV/bin/phoenix" serve
