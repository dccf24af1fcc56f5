#!/usr/bin/env bash
# Installs what clip's build, tests and demo need on a Debian machine (as
# root): the real parts the tests drive, from Debian's packages.
set -euo pipefail

PACKAGES=(
    docker-registry   # the CNCF distribution registry, served on loopback
    skopeo umoci      # push images, and unpack them as the reference tree
    busybox-static debootstrap   # contents of the test images
    zstd pigz libcap2-bin python3 # building edge-case layers
    apache2-utils      # htpasswd, for the registry auth test
    openssl            # a CA and a certificate for the TLS registry test
    runc crun runsc fuse-overlayfs # runtimes and the overlay fallback
    tini               # run --init (tini-static, bind-mounted as docker-init)
    libseccomp-dev pkg-config    # clip-runtime links libseccomp (via libcontainer)
    fuse3 curl ca-certificates gzip tar unzip
    containerd         # the snapshotter tests drive a real containerd (ctr, CRI)
    protobuf-compiler  # protoc: containerd's snapshots API and the CRI's bindings
    golang-1.19-go make # builds runtime-tools' validation suite (clip-runtime's conformance test)
)

missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null || { echo "cargo is required (a Rust toolchain, 1.89 or newer)" >&2; exit 1; }
cargo nextest --version >/dev/null 2>&1 || cargo install --locked cargo-nextest
