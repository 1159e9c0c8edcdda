#!/usr/bin/env bash
# The container's entrypoint: settings from mounted secrets and OpenTelemetry's own variables,
# then BentoML's entrypoint (exec, so SIGTERM reaches `bentoml serve` as PID 1).
#
#   GUARDED_SERVING_<X>_FILE=/run/secrets/x   ->  GUARDED_SERVING_<X>=<the file's content>
#       (e.g. GUARDED_SERVING_STORE_URL_FILE, GUARDED_SERVING_TOKEN_FILE)
#   OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (or OTEL_EXPORTER_OTLP_ENDPOINT + /v1/traces)
#       ->  BentoML's tracing: OTLP/HTTP to that endpoint, at OTEL_TRACES_SAMPLER_ARG (default 1.0)
#   GUARDED_SERVING_WORKERS  worker processes (default 1)
set -euo pipefail

while IFS='=' read -r name _; do
    if [[ "$name" == GUARDED_SERVING_*_FILE ]]; then
        file="${!name}"
        [[ -r "$file" ]] || { echo "entrypoint: $name names $file, which cannot be read" >&2; exit 64; }
        export "${name%_FILE}=$(<"$file")"
    fi
done < <(env)

endpoint="${OTEL_EXPORTER_OTLP_TRACES_ENDPOINT:-}"
if [[ -z "$endpoint" && -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]]; then
    endpoint="${OTEL_EXPORTER_OTLP_ENDPOINT%/}/v1/traces"
fi
if [[ -n "$endpoint" ]]; then
    svc="services.GuardedService.tracing"
    export BENTOML_CONFIG_OPTIONS="${BENTOML_CONFIG_OPTIONS:-} $svc.exporter_type=otlp $svc.otlp.protocol=http $svc.otlp.endpoint=$endpoint $svc.sample_rate=${OTEL_TRACES_SAMPLER_ARG:-1.0}"
fi

exec "$BENTO_PATH/env/docker/entrypoint.sh" "$@"
