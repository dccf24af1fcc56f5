#!/usr/bin/env bash
# The main job, end to end on one machine: build a sample image (debootstrap
# minbase, two layers) into an OCI layout, serve it from a local registry,
# index it with clipctl (clipd, the node service, starts on demand), inspect
# the index and read a file through it, mount it lazily, run a container
# from it, and show the metrics.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo build --release -p clipctl -p clip-runtime
CLIPCTL=$PWD/target/release/clipctl

WORK=${CLIP_DEMO_DIR:-/var/tmp/clip-demo}
# The demo's node (its clipd, mounts, indexes and cache), apart from the
# host's /run/clip, /var/lib/clip and /var/cache/clip.
export CLIP_RUN_DIR=$WORK/run CLIP_BASE_DIR=$WORK/base CLIP_CACHE_DIR=$WORK/cache
"$CLIPCTL" daemon stop >/dev/null 2>&1 || true
rm -rf "$WORK/run" "$WORK/base" "$WORK/cache"
bash tests/fixtures/build-images.sh "$WORK/images"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
mkdir -p "$WORK/registry"
cat > "$WORK/registry.yml" <<YML
version: 0.1
log: {level: warn}
storage: {filesystem: {rootdirectory: $WORK/registry}}
http: {addr: 127.0.0.1:$port}
YML
docker-registry serve "$WORK/registry.yml" > "$WORK/registry.log" 2>&1 &
registry_pid=$!
trap '"$CLIPCTL" daemon stop >/dev/null 2>&1; kill $registry_pid 2>/dev/null' EXIT
for _ in $(seq 100); do curl -fs "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

image=127.0.0.1:$port/sample/debian:latest
skopeo copy --quiet --preserve-digests --dest-tls-verify=false "oci:$WORK/images/oci:debian" "docker://$image"

echo "== clipctl index --image $image"
"$CLIPCTL" index --image "$image" --out "$WORK/debian.clip"
echo "== clipctl inspect"
"$CLIPCTL" inspect "$WORK/debian.clip"
echo "== clipctl inspect --ls /etc (first lines)"
"$CLIPCTL" inspect "$WORK/debian.clip" --ls /etc | sed -n 1,8p
echo "== clipctl cat /etc/os-release (read through the checkpoints with range requests)"
"$CLIPCTL" cat "$WORK/debian.clip" /etc/os-release

echo "== clipctl mount --image $image $WORK/mnt (lazy, read-only FUSE, served by clipd)"
rm -rf "$WORK/mnt"
"$CLIPCTL" mount --image "$image" "$WORK/mnt"
"$CLIPCTL" daemon status
ls "$WORK/mnt"
"$WORK/mnt/usr/bin/bash" --version 2>/dev/null | head -1 || true
echo "bash: $(sha256sum "$WORK/mnt/usr/bin/bash" | cut -c1-16)...; $(du -sh "$WORK/cache" | cut -f1) fetched into the span cache"
"$CLIPCTL" umount "$WORK/mnt"
echo "== unmounted"

echo "== clipctl run --rm $image (clip-runtime, overlayfs over the lazy mount)"
set +e
"$CLIPCTL" run --rm "$image" sh -c 'echo "hello from $(. /etc/os-release; echo $PRETTY_NAME) in a container, exiting with 3"; exit 3'
echo "== container exit code: $?"
set -e

echo "== clipctl metrics (range GETs, first exec: clipd's, for the whole node)"
"$CLIPCTL" metrics | grep -E '^clip_(range_get_(requests|bytes)_total|first_exec_seconds_(sum|count)|index_builds_total|mounts)[{ ]' | sed -E 's/layer="sha256:([0-9a-f]{12})[0-9a-f]*"/layer="sha256:\1..."/'
