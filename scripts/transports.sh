#!/usr/bin/env bash
# The relay over each client transport, side by side in one run: plain TCP,
# WebSocket, TLS and WebSocket over TLS, each through one gateway shard
# (`shards: Some(1)`) in front of the same demo (echo) backend, driven by
# the same load tester:
#
#   - closed loop, SESSIONS connections x 4 requests in flight;
#   - closed loop, SESSIONS connections x 1 in flight;
#
# 100-byte bodies, ACK every 32 responses. Two gateway processes: one plain
# (TCP on 7000, WebSocket on 7002), one with TLS on both (7010, wss on
# 7012), with a certificate made here (openssl). Each shape runs ROUNDS
# times, the four transports in a rotating order, and the medians are
# reported: msgs/s, CPU microseconds per message of the gateway process
# (user + system, from /proc), p99 latency, and each against plain TCP.
# Raw JSON and the summary go to docs/perf/transports/.
#
#   scripts/transports.sh                  # SECS=5 ROUNDS=3 SESSIONS=1000
#   SHAPES=inflight4 ROUNDS=5 scripts/transports.sh
#
# Needs openssl. Opens about SESSIONS + 10 files per process.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${SECS:-5}
ROUNDS=${ROUNDS:-3}
SESSIONS=${SESSIONS:-1000}
out=docs/perf/transports
mkdir -p "$out"
ulimit -n "$(ulimit -Hn)"

cargo build --release -p slg-gateway -p slg-loadtest >/dev/null 2>&1
GW=target/release/slg-gateway
LT=target/release/slg-loadtest

pids=()
tmp=$(mktemp -d)
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

# A leaf certificate for localhost (CA:FALSE: webpki refuses a CA
# certificate used as a server's own).
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$tmp/key.pem" -out "$tmp/cert.pem" -days 2 -subj /CN=localhost \
    -addext subjectAltName=DNS:localhost -addext basicConstraints=critical,CA:FALSE 2>/dev/null

$GW demo-backend --listen 127.0.0.1:7100 >/dev/null 2>&1 & pids+=($!)
base() {
    sed -e 's|demo_backend: Some("127.0.0.1:7100"),|demo_backend: None,|' \
        -e 's|^    shards: None,|    shards: Some(1),|' "$@" config/gateway.ron
}
base -e 's|ws_listen: None,|ws_listen: Some("127.0.0.1:7002"),|' > "$tmp/plain.ron"
base -e 's|"127.0.0.1:7000"|"127.0.0.1:7010"|' -e 's|"127.0.0.1:7001"|"127.0.0.1:7011"|' \
     -e 's|ws_listen: None,|ws_listen: Some("127.0.0.1:7012"),|' \
     -e "s|^    tls: None,|    tls: Some((cert: \"$tmp/cert.pem\", key: \"$tmp/key.pem\", client: true, websocket: true)),|" \
     > "$tmp/tls.ron"
grep -q 'tls: Some' "$tmp/tls.ron" || { echo "transports.sh: could not set tls" >&2; exit 1; }
$GW --config "$tmp/plain.ron" >/dev/null 2>&1 & plain=$!; pids+=($plain)
$GW --config "$tmp/tls.ron" >/dev/null 2>&1 & tls=$!; pids+=($tls)
sleep 1
kill -0 "$plain" 2>/dev/null && kill -0 "$tls" 2>/dev/null || { echo "transports.sh: a gateway did not start" >&2; exit 1; }

# one SHAPE ROUND TRANSPORT ARGS...: one load run, its JSON in $out.
one() {
    local shape=$1 round=$2 t=$3; shift 3
    local json="$out/$shape-$t-$round.json" addr pid
    case $t in
        tcp) addr=127.0.0.1:7000; pid=$plain ;;
        ws)  addr=127.0.0.1:7002; pid=$plain ;;
        tls) addr=127.0.0.1:7010; pid=$tls ;;
        wss) addr=127.0.0.1:7012; pid=$tls ;;
    esac
    $LT steady --transport "$t" --tls-ca "$tmp/cert.pem" --addr "$addr" --gateway-pid "$pid" \
        --sessions "$SESSIONS" --duration "$SECS" --quiet --json "$json" "$@" >/dev/null \
        || echo "transports.sh: $shape $t round $round failed its verdict (see $json)" >&2
}

shapes=()
for name in ${SHAPES:-inflight4 inflight1}; do
    case $name in
        inflight4) shapes+=("inflight4:--inflight 4 --rate 0") ;;
        inflight1) shapes+=("inflight1:--inflight 1 --rate 0") ;;
        *) echo "transports.sh: unknown shape $name (inflight4, inflight1)" >&2; exit 2 ;;
    esac
done
all=(tcp ws tls wss)
for round in $(seq 1 "$ROUNDS"); do
    for s in "${shapes[@]}"; do
        name=${s%%:*}; args=${s#*:}
        # Rotate the order, so no transport always runs on a warmer machine.
        for i in 0 1 2 3; do
            t=${all[$(( (i + round) % 4 ))]}
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
    echo "# command: SECS=$SECS ROUNDS=$ROUNDS SESSIONS=$SESSIONS scripts/transports.sh"
    python3 - "$out" "$ROUNDS" "${SHAPES:-inflight4 inflight1}" <<'PY'
import json, statistics, sys
out, rounds, shapes = sys.argv[1], int(sys.argv[2]), sys.argv[3].split()
def load(shape, t, r):
    d = json.load(open(f"{out}/{shape}-{t}-{r}.json"))
    bad = d["violations"] + sum(d["errors"].values())
    return d["throughput"], d["gateway_cpu_us_per_message"], d["latency_us"]["p99"], bad
print(f"{'shape':<10} {'transport':<9} {'msgs/s':>9} {'cpu us/msg':>10} {'p99 ms':>7}  {'vs tcp (msgs/s, cpu, p99)':<28} runs (msgs/s, us/msg)")
for shape in shapes:
    med = {}
    for t in ["tcp", "ws", "tls", "wss"]:
        runs = [load(shape, t, r) for r in range(1, rounds + 1)]
        med[t] = [statistics.median(x[i] for x in runs) for i in range(3)]
        bad = sum(x[3] for x in runs)
        each = ", ".join(f"{x[0]:.0f}/{x[1]:.2f}" for x in runs)
        m, b = med[t], med["tcp"]
        vs = f"{m[0]/b[0]:.2f}x, {m[1]/b[1]:.2f}x, {m[2]/b[2]:.2f}x"
        flag = f"  ERRORS/VIOLATIONS: {bad}" if bad else ""
        print(f"{shape:<10} {t:<9} {m[0]:>9.0f} {m[1]:>10.2f} {m[2]/1000:>7.2f}  {vs:<28} {each}{flag}")
PY
} > "$summary"
cat "$summary"
