#!/usr/bin/env bash
# The no-registry path from a bento to a container image, in one command:
#
#   deploy/container/build-image.sh TAG IMAGE       e.g.  iris-species:latest  localhost/iris-species:1
#
# 1. the local Python base image (base-image.sh; skipped when it exists),
# 2. `bentoml containerize TAG --backend podman` from it, with host networking (the only way to
#    PyPI from inside a build here) and a wheel cache kept between builds.
#
# With Docker and a registry, plain `bentoml containerize TAG` is all you need.
# Env: BASE_IMAGE (default localhost/guarded-serving-base:bookworm), BUILD_CACHE (uv's cache,
# default /var/cache/guarded-serving/uv), BENTOML_HOME (the bento store, as for bentoml).
set -euo pipefail
[[ $# -eq 2 ]] || { echo "usage: $0 BENTO_TAG IMAGE" >&2; exit 2; }
tag="$1"
image="$2"
here="$(cd "$(dirname "$0")" && pwd)"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
base="${BASE_IMAGE:-localhost/guarded-serving-base:bookworm}"
cache="${BUILD_CACHE:-/var/cache/guarded-serving/uv}"
python="${PYTHON:-python3}"

"$here/base-image.sh" "$base"
mkdir -p "$cache"

# The bento's Dockerfile starts FROM its docker.base_image. A bento built without the local base
# (`bentoml build` of the root bentofile, or `guarded-serving build` without --base-image) is
# containerized from a copy in a scratch store whose bento.yaml names the local base instead.
store="$("$python" -c 'import bentoml, sys; print(bentoml.get(sys.argv[1]).path)' "$tag")"
scratch=""
trap '[[ -n "$scratch" ]] && rm -rf "$scratch"' EXIT
if ! grep -q "^  base_image: $base\$" "$store/bento.yaml"; then
    scratch="$(mktemp -d)"
    name="${tag%%:*}"
    version="$(basename "$store")"
    mkdir -p "$scratch/bentos/$name"
    cp -a "$store" "$scratch/bentos/$name/$version"
    ln -s "$(cd "$store/../../.." && pwd)/models" "$scratch/models"  # models the bento names by tag
    "$python" - "$scratch/bentos/$name/$version/bento.yaml" "$base" <<'PY'
import sys, yaml
path, base = sys.argv[1:]
info = yaml.safe_load(open(path))
info["docker"]["base_image"] = base
yaml.safe_dump(info, open(path, "w"), sort_keys=False)
PY
    export BENTOML_HOME="$scratch"
    tag="$name:$version"
fi

# From /: BentoML 1.4 refuses a bento's Dockerfile template outside the working directory, and
# containerize copies the bento (template included) to a temporary directory first.
cd /
BENTOML_DO_NOT_TRACK=true "$python" -m bentoml containerize "$tag" --backend podman -t "$image" \
    --opt network=host --opt "volume=$cache:/root/.cache/uv"
echo "$image"
