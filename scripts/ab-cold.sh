#!/bin/bash
# Interleaved A/B of cold starts: two builds of clip, alternated round by
# round (ABBA), each run with the page cache dropped, a fresh clipd and an
# empty span cache. The machine's noise moves a single run by 10-20 %, so
# a change is only believed from many interleaved pairs.
#
#   scripts/ab-cold.sh OLD_BIN_DIR NEW_BIN_DIR [ROUNDS] [py|torch] [profile|plain|warm|cached]
#
# warm times a second container right after a cold one with a profile
# (0.6 s apart, as `cargo bench --bench run` does): spans cached, page
# cache warm. cached fills the span cache with an untimed start with a
# profile, then stops clipd, drops the page cache and times a start on a
# fresh clipd and mount (the benchmark's "cached" path).
#
# AB_NODE=NAME uses (and keeps) its own node, target/tmp/ab-IMG/NAME:
# its index, hints and profile (if any) are made by the new build once.
#
# Each BIN_DIR holds clipctl, clipd and clip-runtime (copies of
# target/release after building each version). Uses the registry storage
# that `cargo bench --bench run` builds (target/tmp/clip-bench-IMG); run that
# once first. Prints every run and the medians.
set -euo pipefail
old=$(realpath "$1") new=$(realpath "$2") rounds=${3:-8} img=${4:-py} mode=${5:-profile}
root=$(cd "$(dirname "$0")/.." && pwd)
bench=$root/target/tmp/clip-bench-$img
[ -d "$bench/registry" ] || { echo "no $bench/registry: run cargo bench --bench run first" >&2; exit 1; }
work=$root/target/tmp/ab-$img
mkdir -p "$work"
port=$([ "$img" = torch ] && echo 5991 || echo 5992)
if ! curl -sf -o /dev/null "http://127.0.0.1:$port/v2/"; then
  printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: 127.0.0.1:%s\n' \
    "$bench/registry" "$port" > "$work/registry.yml"
  setsid docker-registry serve "$work/registry.yml" > "$work/registry.log" 2>&1 &
  for _ in $(seq 50); do curl -sf -o /dev/null "http://127.0.0.1:$port/v2/" && break; sleep 0.1; done
fi
image=127.0.0.1:$port/bench/$img:latest
if [ "$img" = py ]; then
  cmd=(python3 -c 'import numpy, pandas, scipy.linalg; print(numpy.__version__, pandas.__version__)')
else
  cmd=(python3 -c 'import torch')
fi
node=$work/${AB_NODE:-$([ "$mode" = plain ] && echo plain || echo profile)}
export CLIP_BASE_DIR=$node/base CLIP_CACHE_DIR=$node/cache CLIP_RUN_DIR=$node/run
export CLIP_RECORD_SECS=0 CLIP_PUBLISHED_INDEX=0 CLIP_TAG_TTL=3600
# The index (and profile) are made once, by the new build; both builds read
# them, so only the start differs.
if [ ! -e "$node/ready" ]; then
  "$new/clipctl" index --image "$image" > /dev/null
  [ "$mode" != plain ] && "$new/clipctl" record --runtime runc "$image" "${cmd[@]}" > /dev/null
  "$new/clipctl" daemon stop > /dev/null 2>&1 || true
  touch "$node/ready"
fi
one() {
  "$1/clipctl" daemon stop > /dev/null 2>&1 || true
  rm -rf "$node/cache"
  sync; echo 3 > /proc/sys/vm/drop_caches; sleep 0.2
  "$1/clipctl" ps > /dev/null
  if [ "$mode" = warm ] || [ "$mode" = cached ]; then
    "$1/clipctl" run --rm --runtime runc "$image" "${cmd[@]}" > /dev/null
    sleep 0.5; sync; sleep 0.1
  fi
  if [ "$mode" = cached ]; then
    # Stopping writes the span cache; then nothing but the disk is warm.
    "$1/clipctl" daemon stop > /dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches; sleep 0.2
    "$1/clipctl" ps > /dev/null
  fi
  local s e
  s=$(date +%s.%N)
  "$1/clipctl" run --rm --runtime runc --name "ab$$" "$image" "${cmd[@]}" > /dev/null
  e=$(date +%s.%N)
  echo "$e - $s" | bc
}
declare -a A B
for r in $(seq "$rounds"); do
  if [ $((r % 2)) = 1 ]; then a=$(one "$old"); b=$(one "$new"); else b=$(one "$new"); a=$(one "$old"); fi
  A+=("$a") B+=("$b")
  echo "round $r: old $a new $b"
done
"$new/clipctl" daemon stop > /dev/null 2>&1 || true
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR % 2) ? v[(NR+1)/2] : (v[NR/2] + v[NR/2+1]) / 2}'; }
echo "$img $mode, $rounds rounds: old median $(median "${A[@]}") s, new median $(median "${B[@]}") s"
