#!/usr/bin/env bash
# Build a local Python 3.11 base image from Debian's packages, for hosts that reach no container
# registry (nothing to pull) but do reach Debian's mirror and PyPI.
#
#   deploy/container/base-image.sh [IMAGE]      # default: localhost/guarded-serving-base:bookworm
#
# Idempotent: does nothing when the image exists (FORCE=1 rebuilds it). The image has Debian
# bookworm's python3 (3.11), ca-certificates, and uv (BentoML's Dockerfile installs the bento's
# requirements with it), which is all `bentoml containerize` needs from a `docker.base_image`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
image="${1:-localhost/guarded-serving-base:bookworm}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$here/containers.conf}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"

if [[ "${FORCE:-0}" != 1 ]] && podman image exists "$image"; then
    echo "$image exists"
    exit 0
fi
for tool in podman debootstrap; do
    command -v "$tool" >/dev/null || { echo "$tool is missing: apt-get install podman runc debootstrap" >&2; exit 2; }
done

root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" "$mirror" >"$root.log" 2>&1 \
    || { tail -n 30 "$root.log" >&2; exit 1; }
rm -f "$root.log"

# uv from PyPI (the same wheel pip would install), as a static binary in /usr/local/bin.
uvdir="$(mktemp -d)"
python3 -m pip install -q --no-deps --only-binary=:all: --target "$uvdir" "uv>=0.13.4,<0.14"
install -m 0755 "$uvdir/bin/uv" "$root/usr/local/bin/uv"
rm -rf "$uvdir"

# pip and uv inside builds reach the package index through the same TLS trust as this host: its
# CA bundle (which may hold a proxy's CA) replaces Debian's.
ca="${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}"
[[ -r "$ca" ]] && install -m 0644 "$ca" "$root/etc/ssl/certs/ca-certificates.crt"

# Leaner image: no apt lists, docs or man pages.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc/* "$root"/usr/share/man/*

tar -C "$root" -c . | podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/usr/bin/python3"]' \
    - "$image" >/dev/null
echo "built $image ($(podman image inspect --format '{{.Size}}' "$image") bytes)"
