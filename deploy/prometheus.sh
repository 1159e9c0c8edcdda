#!/usr/bin/env bash
# Start Prometheus (Debian package) scraping the guarded service on 127.0.0.1:3000.
#   deploy/prometheus.sh         # UI at http://127.0.0.1:9090
# Useful queries:
#   histogram_quantile(0.99, sum by (le, stage) (rate(guarded_serving_stage_duration_seconds_bucket[1m])))
#   sum by (route) (rate(guarded_serving_rows_total[1m]))
#   topk(5, sum by (reason, feature) (rate(guarded_serving_flags_total[5m])))
#   max by (feature) (guarded_serving_drift_psi)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v prometheus >/dev/null || apt-get install -y prometheus
mkdir -p .prometheus
exec prometheus --config.file=deploy/prometheus.yml --storage.tsdb.path=.prometheus \
  --web.listen-address=127.0.0.1:9090
