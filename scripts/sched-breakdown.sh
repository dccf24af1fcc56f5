#!/bin/bash
# Where one cold start's time goes, from the scheduler's view (`perf sched`):
# how long the container's main process ran, waited (and on what: a FUSE
# request, a page-cache fill, anything else) and sat runnable without a
# CPU; when it was exec'd; and the CPU each helper took (clipd's threads
# by role, the registry).
#
#   scripts/sched-breakdown.sh py|torch floor|profile|plain
#
# floor: a fresh overlay over the pristine unpacked image and `runc run`,
# as `cargo bench --bench run` times it. profile/plain: `clipctl run` on the
# nodes `scripts/ab-cold.sh` made (run it once first), span cache emptied,
# fresh clipd. Page cache dropped before each. Uses target/release (or
# BIN=dir). Needs perf (Debian: linux-perf). One run: the machine's noise
# moves a start by 10-20 %, so compare several.
set -euo pipefail
img=${1:-py} mode=${2:-profile}
root=$(cd "$(dirname "$0")/.." && pwd)
bin=$(realpath "${BIN:-$root/target/release}")
command -v perf > /dev/null || { echo "needs perf (apt-get install linux-perf)" >&2; exit 1; }
bench=$root/target/tmp/clip-bench-$img
work=$(mktemp -d)
trap 'umount "$work/merged" 2> /dev/null || true; [ -n "${KEEP:-}" ] && cp "$work/sched.data" "$KEEP"; rm -rf "$work"' EXIT
port=$([ "$img" = torch ] && echo 5991 || echo 5992)
if [ "$img" = py ]; then
  cmd=(python3 -c 'import numpy, pandas, scipy.linalg; print(numpy.__version__, pandas.__version__)')
else
  cmd=(python3 -c 'import torch')
fi
data=$work/sched.data
if [ "$mode" = floor ]; then
  [ -d "$bench/unpacked/rootfs" ] || { echo "no $bench/unpacked: run cargo bench --bench run first" >&2; exit 1; }
  mkdir -p "$work"/{upper,work,merged,bundle}
  (cd "$work/bundle" && runc spec)
  python3 - "$work" "${cmd[@]}" << 'EOF'
import json, sys
work, args = sys.argv[1], sys.argv[2:]
p = work + '/bundle/config.json'
c = json.load(open(p))
c['root'] = {'path': work + '/merged', 'readonly': False}
c['process']['terminal'] = False
c['process']['args'] = args
c['process']['env'] = ['PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin', 'LANG=C.UTF-8']
json.dump(c, open(p, 'w'))
EOF
  sync; echo 3 > /proc/sys/vm/drop_caches; sleep 0.2
  perf sched record -g -o "$data" -- sh -c "mount -t overlay overlay -o lowerdir=$bench/unpacked/rootfs,upperdir=$work/upper,workdir=$work/work,index=off,metacopy=off $work/merged && runc run --bundle $work/bundle sched$$" > /dev/null 2>&1
else
  node=$root/target/tmp/ab-$img/$mode
  [ -e "$node/ready" ] || { echo "no $node: run scripts/ab-cold.sh once first" >&2; exit 1; }
  export CLIP_BASE_DIR=$node/base CLIP_CACHE_DIR=$node/cache CLIP_RUN_DIR=$node/run
  export CLIP_RECORD_SECS=0 CLIP_PUBLISHED_INDEX=0 CLIP_TAG_TTL=3600
  curl -sf -o /dev/null "http://127.0.0.1:$port/v2/" || { echo "no registry on $port: run scripts/ab-cold.sh once first" >&2; exit 1; }
  "$bin/clipctl" daemon stop > /dev/null 2>&1 || true
  rm -rf "$node/cache"
  sync; echo 3 > /proc/sys/vm/drop_caches; sleep 0.2
  "$bin/clipctl" ps > /dev/null
  perf sched record -g -o "$data" -- "$bin/clipctl" run --rm --runtime runc "127.0.0.1:$port/bench/$img:latest" "${cmd[@]}" > /dev/null 2>&1
  "$bin/clipctl" daemon stop > /dev/null
fi
# timehist columns: time cpu task wait sch-delay run stack...; a row's wait
# ends at its switch-in, and its cause is the stack of the task's previous
# switch-out.
perf sched timehist -i "$data" 2> /dev/null | awk '
  NR <= 3 { next }
  { t = $1 + 0; if (!first) first = t; last = t
    task = $3; w = $4; d = $5; r = $6
    name = task; sub(/\[.*/, "", name)
    ids = task; sub(/.*\[/, "", ids); sub(/\].*/, "", ids)
    tid = ids; sub(/\/.*/, "", tid); pid = ids; if (ids ~ /\//) sub(/.*\//, "", pid)
    # The container main thread: the first python3, by id (torch renames it).
    if (name == "python3" && !main) main = tid
    if (main && tid == main) {
      if (!exec) exec = t - r / 1000
      run += r; delay += d
      why = prev_stack ~ /fuse/ ? "FUSE request" : prev_stack ~ /folio_wait|filemap/ ? "page cache fill" : "other"
      waited[why] += w
      s = ""; for (i = 7; i <= NF && i <= 10; i++) s = s " " $i; prev_stack = s
      end = t
    }
    role = ""
    if (main && (tid == main || pid == main)) role = "container (all threads)"
    else if (name ~ /^fuser/) role = "clipd FUSE threads"
    else if (name ~ /^clip-prefetch/) role = "clipd replay/read-ahead workers"
    else if (name ~ /^clip-miss/) role = "clipd miss runs"
    else if (name ~ /^clip-registry/) role = "clipd HTTP client"
    else if (name ~ /^clip/) role = "clipd other"
    else if (name ~ /^docker-registry/) role = "registry"
    else if (name ~ /^runc|^exe$/) role = "runc"
    if (role != "") cpu[role] += r
  }
  END {
    printf "recorded %.3f s; container exec at +%.3f s, its main thread ended at +%.3f s\n", last - first, exec - first, end - first
    printf "container main thread: ran %.0f ms, waited %.0f ms, runnable without a CPU %.0f ms\n", run, waited["FUSE request"] + waited["page cache fill"] + waited["other"], delay
    for (k in waited) printf "  waited on %s: %.0f ms\n", k, waited[k]
    print "CPU by role (ms):"
    for (k in cpu) printf "  %-34s %6.0f\n", k, cpu[k]
  }'
