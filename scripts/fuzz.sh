#!/usr/bin/env bash
# Runs every fuzz target for a fixed time (default 30 s each) from seeds
# made here: a GNU tar, a real .clip index, gzip/zstd streams. Needs
# cargo-fuzz (installed if missing) and, on a stable toolchain,
# RUSTC_BOOTSTRAP=1 for the sanitizer flags.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-30}
export RUSTC_BOOTSTRAP=1
cargo fuzz --version >/dev/null 2>&1 || cargo install --locked cargo-fuzz
S=fuzz/corpus
mkdir -p "$S"/{tar_walker,index_file,index_meta,layer}
seed=$(mktemp -d)
trap 'rm -rf "$seed"' EXIT
mkdir -p "$seed/t/dir/$(printf 'n%.0s' $(seq 1 120))"
echo data > "$seed/t/dir/file"; ln -s file "$seed/t/dir/link"; ln "$seed/t/dir/file" "$seed/t/dir/hard"
truncate -s 100K "$seed/t/sparse"; echo x >> "$seed/t/sparse"
# Files the walker learns facts from: a Python source and an ELF object.
printf 'import os\nfrom . import sub\n' > "$seed/t/dir/m.py"; cp /bin/true "$seed/t/dir/true"
tar --format=gnu --sparse -C "$seed/t" -cf "$S/tar_walker/gnu.tar" .
tar --format=posix -C "$seed/t" -cf "$S/tar_walker/pax.tar" .
gzip -n -c "$S/tar_walker/gnu.tar" | { printf '\0'; cat; } > "$S/layer/gzip"
zstd -q -c "$S/tar_walker/pax.tar" | { printf '\1'; cat; } > "$S/layer/zstd"
umoci init --layout "$seed/oci" && umoci new --image "$seed/oci:x" >/dev/null
tail -c +2 "$S/layer/gzip" > "$seed/l.gz"
python3 tests/fixtures/oci_layout.py add-layer "$seed/oci" x "$seed/l.gz" application/vnd.oci.image.layer.v1.tar+gzip "$S/tar_walker/gnu.tar"
cargo run -q -p clipctl -- index --image "oci:$seed/oci:x" --out "$S/index_file/seed.clip" >/dev/null || true
for t in tar_walker index_file index_meta layer; do
    echo "== fuzz $t for ${SECONDS_EACH}s"
    (cd fuzz && cargo fuzz run "$t" -- -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 2>&1 | tail -3)
done
