#!/usr/bin/env bash
# The relay comparison of issue 14, side by side in one run: one gateway
# shard (`shards: Some(1)`) against HAProxy (`mode tcp`, `nbthread 1`), both
# in front of the same demo (echo) backend, driven by the same load tester:
#
#   - closed loop, SESSIONS connections x 4 requests in flight;
#   - closed loop, SESSIONS connections x 1 in flight;
#   - paced, PACE msgs/s in all;
#
# 100-byte bodies, the client ACKs every 32 responses (gateway only; HAProxy
# relays the demo backend's own protocol). Each shape runs ROUNDS times,
# gateway and HAProxy alternating, and the medians are reported: msgs/s, CPU
# microseconds per message of the relay process (user + system, from
# /proc), p99 latency. Raw JSON per run and the summary go to
# docs/perf/relay/ (the summary starts with the machine and commit), and one
# chart per shape (SUMMARY-SHAPE.svg, `slg-loadtest compare`).
#
#   scripts/relay.sh                      # SECS=5 ROUNDS=3 SESSIONS=1000 PACE=20000
#   SECS=10 ROUNDS=5 scripts/relay.sh
#   SHAPES="inflight4 paced" scripts/relay.sh   # some shapes only
#
# Needs haproxy (apt-get install haproxy). Opens about 2 x SESSIONS + 10
# files per process (the open-files cap here is 20000).
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
SESSIONS=${SESSIONS:-1000}
PACE=${PACE:-20000}
out=docs/perf/relay
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"

cargo build --release -p slg-gateway -p slg-loadtest >/dev/null 2>&1
GW=target/release/slg-gateway
LT=target/release/slg-loadtest

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

$GW demo-backend --listen 127.0.0.1:7100 >/dev/null 2>&1 & pids+=($!)
cfg=$(mktemp --suffix=.ron)
sed -e 's|demo_backend: Some("127.0.0.1:7100"),|demo_backend: None,|' \
    -e 's|^    shards: None,|    shards: Some(1),|' config/gateway.ron > "$cfg"
grep -q '^    shards: Some(1),' "$cfg" || { echo "relay.sh: could not set shards: Some(1)" >&2; exit 1; }
$GW --config "$cfg" >/dev/null 2>&1 & gw=$!; pids+=($gw)
hcfg=$(mktemp --suffix=.cfg)
scripts/haproxy-cfg.sh 1 > "$hcfg"
haproxy -f "$hcfg" -db >"$out/haproxy.log" 2>&1 & hap=$!; pids+=($hap)
sleep 1
kill -0 "$hap" 2>/dev/null || { echo "relay.sh: haproxy did not start:" >&2; cat "$out/haproxy.log" >&2; exit 1; }
kill -0 "$gw" 2>/dev/null || { echo "relay.sh: the gateway did not start" >&2; exit 1; }

# one SHAPE ROUND TARGET ARGS...: one load run, its JSON in $out.
one() {
    local shape=$1 round=$2 target=$3; shift 3
    local json="$out/$shape-$target-$round.json"
    case $target in
        gateway) $LT steady --target gateway --addr 127.0.0.1:7000 --gateway-pid "$gw" \
                     --sessions "$SESSIONS" --duration "$SECS" --quiet --json "$json" "$@" >/dev/null ;;
        haproxy) $LT steady --target direct --addr 127.0.0.1:7200 --watch-pid "$hap" \
                     --sessions "$SESSIONS" --duration "$SECS" --quiet --json "$json" "$@" >/dev/null ;;
    esac || echo "relay.sh: $shape $target round $round failed its verdict (see $json)" >&2
}

rate=$(python3 -c "print($PACE / $SESSIONS)")
shapes=()
for name in ${SHAPES:-inflight4 inflight1 paced}; do
    case $name in
        inflight4) shapes+=("inflight4:--inflight 4 --rate 0") ;;
        inflight1) shapes+=("inflight1:--inflight 1 --rate 0") ;;
        paced) shapes+=("paced:--inflight 1 --rate $rate") ;;
        *) echo "relay.sh: unknown shape $name (inflight4, inflight1, paced)" >&2; exit 2 ;;
    esac
done
for round in $(seq 1 "$ROUNDS"); do
    for s in "${shapes[@]}"; do
        name=${s%%:*}; args=${s#*:}
        # Alternate which goes first, so neither always runs on a warmer machine.
        if (( round % 2 )); then order="gateway haproxy"; else order="haproxy gateway"; fi
        for t in $order; do
            # shellcheck disable=SC2086
            one "$name" "$round" "$t" $args
        done
    done
done

summary="$out/${SUMMARY:-summary}.txt"
{
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# machine: $(uname -a)"
    echo "# cpus: $(nproc) x $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "# commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (work tree modified)')"
    echo "# haproxy: $(haproxy -v 2>/dev/null | head -1)"
    echo "# command: SECS=$SECS ROUNDS=$ROUNDS SESSIONS=$SESSIONS PACE=$PACE scripts/relay.sh"
    python3 - "$out" "$ROUNDS" "${SHAPES:-inflight4 inflight1 paced}" <<'PY'
import json, statistics, sys
out, rounds, shapes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def load(shape, target, r):
    d = json.load(open(f"{out}/{shape}-{target}-{r}.json"))
    cpu = d["gateway_cpu_us_per_message"] if target == "gateway" else d["watched_cpu_us_per_message"]
    bad = d["violations"] + sum(d["errors"].values())
    return d["throughput"], cpu, d["latency_us"]["p99"], bad
print(f"{'shape':<10} {'target':<8} {'msgs/s':>9} {'cpu us/msg':>10} {'p99 ms':>7}  runs (msgs/s, us/msg)")
med = {}
for shape in shapes:
    for target in ["haproxy", "gateway"]:
        runs = [load(shape, target, r) for r in range(1, rounds + 1)]
        m = [statistics.median(x[i] for x in runs) for i in range(3)]
        med[(shape, target)] = m
        bad = sum(x[3] for x in runs)
        each = ", ".join(f"{x[0]:.0f}/{x[1]:.2f}" for x in runs)
        flag = f"  ERRORS/VIOLATIONS: {bad}" if bad else ""
        print(f"{shape:<10} {target:<8} {m[0]:>9.0f} {m[1]:>10.2f} {m[2]/1000:>7.2f}  {each}{flag}")
    g, h = med[(shape, "gateway")], med[(shape, "haproxy")]
    print(f"{shape:<10} {'ratio':<8} {g[0]/h[0]:>8.2f}x {g[1]/h[1]:>9.2f}x {g[2]/h[2]:>6.2f}x  (gateway / haproxy)")
PY
} > "$summary"
# One chart per shape, gateway and HAProxy together (round 1 of each).
for name in ${SHAPES:-inflight4 inflight1 paced}; do
    $LT compare --out "$out/${SUMMARY:-summary}-$name.svg" \
        --title "$name: one gateway shard vs HAProxy nbthread 1 (round 1)" \
        "gateway=$out/$name-gateway-1.json" "haproxy=$out/$name-haproxy-1.json" || true
done
cat "$summary"
