#!/usr/bin/env bash
# Before and after: two gateway binaries under the same loads, alternating
# rounds, medians, one summary and one chart per shape. How each change of
# issue 14 is judged (docs/PERFORMANCE.md quotes these summaries).
#
#   scripts/ab.sh OLD_BINARY NEW_BINARY [NAME]
#   OLD=$(git rev-parse HEAD~1) ...: build the old one with
#     git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release -p slg-gateway)
#
# Shapes (SHAPES, default all):
#   relay   one shard, 1000 sessions x 4 in flight, 100-byte bodies, SECS s;
#   fanout  two shards, 10000 sessions, 20 broadcasts of BODY bytes
#           (default 1024) 250 ms apart: deliveries per CPU-second, full
#           delivery times, and RSS after (the outboxes hold every push:
#           the client acks only every 32);
#   idle    two shards, 10000 logged-in idle sessions: RSS per session.
#
# The demo backend and the load tester are this checkout's (release). Output:
# docs/perf/ab/NAME/ (JSON per run, summary.txt, *.svg). Opens up to 10000
# client sockets plus the gateway's (open-files cap here: 20000 a process).
set -euo pipefail
cd "$(dirname "$0")/.."
OLD=${1:?usage: scripts/ab.sh OLD_BINARY NEW_BINARY [NAME]}
NEW=${2:?usage: scripts/ab.sh OLD_BINARY NEW_BINARY [NAME]}
NAME=${3:-latest}
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
BODY=${BODY:-1024}
out=docs/perf/ab/$NAME
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"

cargo build --release -p slg-gateway -p slg-loadtest >/dev/null 2>&1
LT=target/release/slg-loadtest

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
target/release/slg-gateway demo-backend --listen 127.0.0.1:7100 >/dev/null 2>&1 & pids+=($!)

# gateway BINARY SHARDS: start it on 7000 (HTTP 9100 as the shipped config), pid in $gw.
gateway() {
    local cfg
    cfg=$(mktemp --suffix=.ron)
    sed -e 's|demo_backend: Some("127.0.0.1:7100"),|demo_backend: None,|' \
        -e "s|^    shards: None,|    shards: Some($2),|" config/gateway.ron > "$cfg"
    "$1" --config "$cfg" >/dev/null 2>&1 & gw=$!
    sleep 1
    kill -0 "$gw" 2>/dev/null || { echo "ab.sh: $1 did not start" >&2; exit 1; }
}

# one SHAPE WHICH ROUND: one run of SHAPE on the old or new binary.
one() {
    local shape=$1 which=$2 round=$3 bin
    [[ $which == old ]] && bin=$OLD || bin=$NEW
    local json="$out/$shape-$which-$round.json"
    case $shape in
        relay)
            gateway "$bin" 1
            $LT steady --target gateway --addr 127.0.0.1:7000 --gateway-pid "$gw" --sessions 1000 \
                --inflight 4 --rate 0 --duration "$SECS" --quiet --json "$json" >/dev/null ;;
        fanout)
            gateway "$bin" 2
            $LT push-fanout --sessions 10000 --pushes 20 --push-interval-ms 250 --body "$BODY" \
                --gateway-pid "$gw" --player-base 3000000 --quiet --json "$json" >/dev/null ;;
        idle)
            gateway "$bin" 2
            $LT idle --sessions 10000 --duration 3 --gateway-pid "$gw" --quiet --json "$json" >/dev/null ;;
        *) echo "ab.sh: unknown shape $shape (relay, fanout, idle)" >&2; exit 2 ;;
    esac || echo "ab.sh: $shape $which round $round failed its verdict (see $json)" >&2
    # The RSS once the load is over, with what it left (outboxes).
    python3 - "$json" "$gw" <<'PY'
import json, sys
path, pid = sys.argv[1], sys.argv[2]
d = json.load(open(path))
rss = next(int(l.split()[1]) * 1024 for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:"))
d.setdefault("extra", {})["gateway_rss_after_run_bytes"] = rss
json.dump(d, open(path, "w"), indent=1)
PY
    kill "$gw"; wait "$gw" 2>/dev/null || true
}

shapes=${SHAPES:-relay fanout idle}
for round in $(seq 1 "$ROUNDS"); do
    for s in $shapes; do
        if (( round % 2 )); then order="old new"; else order="new old"; fi
        for w in $order; do one "$s" "$w" "$round"; done
    done
done

{
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# machine: $(uname -a)"
    echo "# cpus: $(nproc) x $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "# commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (work tree modified)')"
    echo "# old: $OLD ($(sha256sum "$OLD" | cut -c1-12))"
    echo "# new: $NEW ($(sha256sum "$NEW" | cut -c1-12))"
    echo "# command: SECS=$SECS ROUNDS=$ROUNDS BODY=$BODY SHAPES=\"$shapes\" scripts/ab.sh OLD NEW $NAME"
    python3 - "$out" "$ROUNDS" "$shapes" <<'PY'
import json, statistics, sys
out, rounds, shapes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
metrics = {
    "relay": [("msgs/s", lambda d: d["throughput"]),
              ("cpu us/msg", lambda d: d["gateway_cpu_us_per_message"]),
              ("p99 ms", lambda d: d["latency_us"]["p99"] / 1000)],
    "fanout": [("deliveries/cpu-s", lambda d: d["extra"]["deliveries_per_gateway_cpu_second"]),
               ("median ms", lambda d: d["extra"]["broadcast_full_delivery_us_median"] / 1000),
               ("worst ms", lambda d: d["extra"]["broadcast_full_delivery_us_worst"] / 1000),
               ("rss after MiB", lambda d: d["extra"]["gateway_rss_after_run_bytes"] / 2**20)],
    "idle": [("rss/session B", lambda d: d["extra"]["gateway_rss_per_session_bytes"])],
}
for shape in shapes:
    print(f"== {shape}")
    med = {}
    for which in ["old", "new"]:
        runs = [json.load(open(f"{out}/{shape}-{which}-{r}.json")) for r in range(1, rounds + 1)]
        bad = sum(d["violations"] + sum(d["errors"].values()) for d in runs)
        cells = []
        for name, f in metrics[shape]:
            vals = [f(d) for d in runs]
            med[(which, name)] = statistics.median(vals)
            cells.append(f"{name} {med[(which, name)]:.2f} ({', '.join(f'{v:.2f}' for v in vals)})")
        print(f"{which:<4} " + "   ".join(cells) + (f"   ERRORS/VIOLATIONS: {bad}" if bad else ""))
    print("new/old " + "   ".join(f"{name} {med[('new', name)] / med[('old', name)]:.2f}x"
                                   for name, _ in metrics[shape] if med[('old', name)]))
PY
} > "$out/summary.txt"
for s in $shapes; do
    [[ $s == idle ]] && continue
    $LT compare --out "$out/$s.svg" --title "$s: before and after ($NAME, round 1)" \
        "old=$out/$s-old-1.json" "new=$out/$s-new-1.json" || true
done
cat "$out/summary.txt"
