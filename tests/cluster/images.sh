#!/usr/bin/env bash
# Build the project's images from its own Dockerfile, with no container registry:
#   1. a Debian base image made by mmdebstrap (python3 + venv), kept as a tarball in the cache;
#   2. the Dockerfile's operator and worker targets, built by buildah on that base
#      (BUILD_BASE and BASE build arguments), layers cached between runs;
#   3. each image's ID written to images/<name>.id; the node (node.py) streams an image whose
#      ID it has not imported yet straight from buildah's storage into containerd, as an
#      uncompressed docker-archive (no archive on disk, no time spent compressing gigabytes).
# Cache: $GPTQ_CACHE (default ~/.cache/gptq-operator): images/ (base tarball, archives) and
# containers/ (buildah's storage). Needs root, mmdebstrap and buildah (Debian packages).
# Prints one line per step; the last line is the directory holding the IDs.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${GPTQ_CACHE:-$HOME/.cache/gptq-operator}
IMAGES=$CACHE/images
SUITE=${DEBIAN_SUITE:-bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
TAG=${IMAGE_TAG:-dev}
STORE=(--root "$CACHE/containers/storage" --runroot /run/gptq-operator/containers)
mkdir -p "$IMAGES"

log() { echo "[images $(date +%H:%M:%S)] $*" >&2; }

for tool in mmdebstrap buildah go; do
  command -v $tool >/dev/null || { echo "$tool is missing: apt-get install -y mmdebstrap buildah golang" >&2; exit 3; }
done

# 1. Base: Debian minbase with python3 and its venv module. The host's extra CA certificates
#    (a site's TLS-intercepting proxy, say) are added so that pip inside the build can reach
#    the package index through the same proxy as the host.
base_tar=$IMAGES/base-$SUITE.tar
if [[ ! -s $base_tar ]]; then
  log "base: mmdebstrap $SUITE (python3, python3-venv, ca-certificates)"
  hook='true'
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    hook='cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/" && chroot "$1" update-ca-certificates'
  fi
  mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --customize-hook="$hook" --format=tar "$SUITE" "$base_tar.part" "$MIRROR"
  mv "$base_tar.part" "$base_tar"
fi
# tagged by the tarball's digest, so a rebuilt base (deleted tarball) is never mistaken for an old one
BASE_IMAGE=localhost/gptq-base:$SUITE-$(sha256sum "$base_tar" | cut -c1-12)
if ! buildah "${STORE[@]}" inspect --type image "$BASE_IMAGE" >/dev/null 2>&1; then
  log "base: importing $base_tar as $BASE_IMAGE"
  ctx=$(mktemp -d)
  ln "$base_tar" "$ctx/rootfs.tar" 2>/dev/null || cp "$base_tar" "$ctx/rootfs.tar"
  printf 'FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n' > "$ctx/Containerfile"
  buildah "${STORE[@]}" bud --quiet --isolation chroot -t "$BASE_IMAGE" "$ctx" >/dev/null
  rm -rf "$ctx"
fi

# The pods' sandbox image (tests/cluster/pause), FROM scratch: a static Go binary.
pause=localhost/gptq-operator/pause:$TAG
if ! buildah "${STORE[@]}" inspect --type image "$pause" >/dev/null 2>&1; then
  log "pause: go build + buildah bud"
  ctx=$(mktemp -d)
  cp "$ROOT/tests/cluster/pause/Containerfile" "$ctx/"
  (cd "$ROOT/tests/cluster/pause" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$ctx/pause" .)
  buildah "${STORE[@]}" bud --quiet --isolation chroot -t "$pause" "$ctx" >/dev/null
  rm -rf "$ctx"
fi
buildah "${STORE[@]}" inspect --type image --format '{{.FromImageID}}' "$pause" > "$IMAGES/pause.id"

# 2 and 3. The Dockerfile's targets; buildah's layer cache makes an unchanged step free.
for target in ${TARGETS:-operator worker}; do
  image=localhost/gptq-operator/$target:$TAG
  log "$target: buildah bud --target $target (Dockerfile, base $BASE_IMAGE)"
  start=$(date +%s)
  buildah "${STORE[@]}" bud --isolation chroot --layers --target "$target" \
    --build-arg BUILD_BASE="$BASE_IMAGE" --build-arg BASE="$BASE_IMAGE" \
    -t "$image" "$ROOT" 2>&1 | grep --line-buffered -E '^\[[0-9]+/[0-9]+] (STEP|COMMIT)|rror' >&2
  log "$target: built in $(( $(date +%s) - start )) s, $(buildah "${STORE[@]}" images --format '{{.Size}}' "$image")"
  buildah "${STORE[@]}" inspect --type image --format '{{.FromImageID}}' "$image" > "$IMAGES/$target.id"
done
echo "$IMAGES"
