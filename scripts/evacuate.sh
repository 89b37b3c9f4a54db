#!/usr/bin/env bash
# Reproduce docs/PERFORMANCE.md "Evacuation": three gateways (gw-a, gw-b,
# gw-c) on one Redis, N players held by gw-a, then `POST /v1/evacuate`
# on gw-a with no target, so they spread over gw-b and gw-c by room, while
# a steady load runs against gw-b (a target: it adopts half of them). The
# steady load's latency during the evacuation is compared with the same
# load run just before it, on the same gateways.
#
#   scripts/evacuate.sh [N...]                 (default: 5000 20000)
#
# Environment: PARALLEL (cluster.migrate_parallel, default 16), RATE
# (cluster.migrate_rate, default none), SHARDS (per gateway, default 1),
# STEADY ("SESSIONS RATE", default "100 20": 100 sessions at 20 req/s).
# The players are logged in and left lingering (no connection: the open
# files cap of 20,000 per process bounds connected players, and a lingering
# player's state moves the same way; REDIRECT of connected clients is
# covered by tests/cluster_placement.rs). Output: docs/perf/evacuate-N.txt
# (evacuate-N-rateR.txt with RATE)
# (a header, the evacuation's report, both steady runs' summaries).
# Needs redis-server.
set -euo pipefail
cd "$(dirname "$0")/.."
out=docs/perf
mkdir -p "$out"
sizes=${*:-5000 20000}
PARALLEL=${PARALLEL:-16}
RATE=${RATE:-}
SHARDS=${SHARDS:-1}
read -r SS SR <<<"${STEADY:-100 20}"
ulimit -n "$(ulimit -Hn)"

cargo build --release -p slg-gateway -p slg-loadtest >/dev/null 2>&1
GW=$PWD/target/release/slg-gateway
LT=$PWD/target/release/slg-loadtest
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

redis-server --port 6390 --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
$GW demo-backend --listen 127.0.0.1:7100 >/dev/null 2>&1 & pids+=($!)
sleep 0.5

rate=None
[ -n "$RATE" ] && rate="Some($RATE)"
# config ID PORT: gateway ID on PORT (clients) and PORT+1 (HTTP).
config() {
    sed -e "s|listen: \"127.0.0.1:7000\"|listen: \"127.0.0.1:$2\"|" \
        -e "s|http_listen: \"127.0.0.1:7001\"|http_listen: \"127.0.0.1:$(($2 + 1))\"|" \
        -e "s|shards: None|shards: Some($SHARDS)|" \
        -e 's|demo_backend: Some("127.0.0.1:7100")|demo_backend: None|' \
        -e 's|snapshot_dir: Some("state")|snapshot_dir: None|' \
        -e "s|^    cluster: None,|    cluster: Some((redis: \"redis://127.0.0.1:6390/\", gateway_id: \"$1\", advertise: \"127.0.0.1:$2\", migrate_parallel: $PARALLEL, migrate_rate: $rate)),|" \
        config/gateway.ron > "$work/$1.ron"
}

for n in $sizes; do
    redis-cli -p 6390 flushall >/dev/null
    gws=()
    for g in "gw-a 7200" "gw-b 7210" "gw-c 7220"; do
        set -- $g
        config "$1" "$2"
        $GW --config "$work/$1.ron" >"$work/$1.log" 2>&1 & gws+=($!); pids+=($!)
    done
    sleep 2
    # N players on gw-a, lingering, 5,000 logins at a time.
    base=1000000
    left=$n
    while [ "$left" -gt 0 ]; do
        batch=$((left < 5000 ? left : 5000))
        $LT login-storm --addr 127.0.0.1:7200 --http 127.0.0.1:7201 --sessions "$batch" \
            --player-base "$base" --linger --quiet >/dev/null
        base=$((base + batch))
        left=$((left - batch))
    done
    held=$(curl -s 127.0.0.1:7201/metrics | awk '/^slg_players\{/ {s += $2} END {print s}')
    f="$out/evacuate-$n${RATE:+-rate$RATE}.txt"
    {
        echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
        echo "# machine: $(nproc) x $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
        echo "# commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (work tree modified)')"
        echo "# command: scripts/evacuate.sh $n (PARALLEL=$PARALLEL RATE=${RATE:-none} SHARDS=$SHARDS STEADY=\"$SS $SR\")"
        echo "players held by gw-a before: $held"
        echo "== steady load on gw-b, before (baseline)"
    } >"$f"
    $LT steady --addr 127.0.0.1:7210 --http 127.0.0.1:7211 --sessions "$SS" --rate "$SR" \
        --duration 10 --player-base 9000000 --quiet --json "$work/base.json" >>"$f"
    # The same load, about as long as the evacuation (begun 1 s before it;
    # 2,000 players a second, at least 5 s), so its p99 is the
    # evacuation's.
    during=$((n / 2000 > 5 ? n / 2000 : 5))
    [ -n "$RATE" ] && during=$((n / RATE + 2 > during ? n / RATE + 2 : during))
    $LT steady --addr 127.0.0.1:7210 --http 127.0.0.1:7211 --sessions "$SS" --rate "$SR" \
        --duration "$during" --player-base 9100000 --quiet --json "$work/during.json" >"$work/during.txt" &
    steady=$!
    sleep 1
    t0=$(date +%s.%N)
    report=$(curl -s -X POST -d '' 127.0.0.1:7201/v1/evacuate)
    t1=$(date +%s.%N)
    wait "$steady"
    {
        echo "== evacuation of gw-a (POST /v1/evacuate, no target): $(echo "$t1 - $t0" | bc) s"
        echo "$report"
        echo "== steady load on gw-b, during (${during} s; the evacuation began about 1 s after it started)"
        cat "$work/during.txt"
        echo "== held after: gw-a $(curl -s 127.0.0.1:7201/metrics | awk '/^slg_players\{/ {s += $2} END {print s}')," \
             "gw-b $(curl -s 127.0.0.1:7211/metrics | awk '/^slg_players\{/ {s += $2} END {print s}')," \
             "gw-c $(curl -s 127.0.0.1:7221/metrics | awk '/^slg_players\{/ {s += $2} END {print s}')"
        echo "== migration steps on gw-a (sum s / count)"
        curl -s 127.0.0.1:7201/metrics | grep -E '^slg_migration_step_seconds_(sum|count)'
    } >>"$f"
    for p in "${gws[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${gws[@]}"; do wait "$p" 2>/dev/null || true; done
    cat "$f"
done
