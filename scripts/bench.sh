#!/usr/bin/env bash
# Reproduce docs/PERFORMANCE.md: the gateway, the demo backend, HAProxy and
# the load tester as separate processes on this machine, each comparison
# in one run. Results (JSON, SVG, summaries) go to docs/perf/: each NAME.txt
# starts with a header (date, machine, CPUs, commit, command) that also
# dates NAME.json and NAME.svg, written by the same run.
#
#   scripts/bench.sh [all|steady|idle|push|churn|login|micro]    (default: all)
#
# Needs: haproxy and linux-perf (apt-get install haproxy linux-perf).
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
out=docs/perf
mkdir -p "$out"
SESSIONS=${SESSIONS:-1000}
SECS=${SECS:-10}
ulimit -n "$(ulimit -Hn)"

cargo build --release -p slg-gateway -p slg-loadtest >/dev/null 2>&1
GW=target/release/slg-gateway
LT=target/release/slg-loadtest

# header COMMAND...: the date, the machine and the commit of a raw output.
header() {
    echo "# date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "# machine: $(uname -a)"
    echo "# cpus: $(nproc) x $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "# memory: $(awk '/^MemTotal/ {printf "%.1f GiB", $2 / 1048576}' /proc/meminfo)"
    echo "# commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo ' (work tree modified)')"
    echo "# rustc: $(rustc -V)"
    echo "# haproxy: $(haproxy -v 2>/dev/null | head -1)"
    echo "# command: $*"
}

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# The demo backend in its own process.
$GW demo-backend --listen 127.0.0.1:7100 >/dev/null 2>&1 & pids+=($!)
# The gateway: the shipped config with the demo backend out of process.
cfg=$(mktemp --suffix=.ron)
sed 's|demo_backend: Some("127.0.0.1:7100"),|demo_backend: None,|' config/gateway.ron > "$cfg"
$GW --config "$cfg" >/dev/null 2>&1 & gw=$!; pids+=($gw)
# HAProxy in TCP mode, relaying to the same demo backend.
hcfg=$(mktemp --suffix=.cfg)
scripts/haproxy-cfg.sh > "$hcfg"
haproxy -f "$hcfg" -db >/dev/null 2>&1 & hap=$!; pids+=($hap)
sleep 1

# run_counted PID NAME ARGS...: run the load tester with the syscalls of
# process PID counted by perf; output to $out/NAME.txt, plus syscalls/message.
run_counted() {
    local pid=$1 name=$2; shift 2
    header "$@" > "$out/$name.txt"
    perf stat -x, -e raw_syscalls:sys_enter -p "$pid" -o "$out/$name.perf" -- "$@" >> "$out/$name.txt"
    local n answered
    n=$(grep raw_syscalls "$out/$name.perf" | cut -d, -f1)
    answered=$(python3 -c "import json;print(json.load(open('$out/$name.json'))['answered'])")
    echo "syscalls: $n ($(python3 -c "print(round($n/max($answered,1),2))") per message)" >> "$out/$name.txt"
    cat "$out/$name.txt"
}

# run_logged NAME COMMAND...: run it, output to $out/NAME.txt after the header.
run_logged() {
    local name=$1; shift
    header "$@" > "$out/$name.txt"
    "$@" | tee -a "$out/$name.txt"
}

steady() {
    local rate=$1 tag=$2
    echo "== steady $tag: $SESSIONS sessions, 100-byte bodies, ${SECS}s each, rate/session=$rate"
    run_logged "steady-$tag-direct" $LT steady --target direct --addr 127.0.0.1:7100 --sessions "$SESSIONS" \
        --duration "$SECS" --rate "$rate" --quiet \
        --json "$out/steady-$tag-direct.json" --svg "$out/steady-$tag-direct.svg"
    run_counted "$hap" "steady-$tag-haproxy" $LT steady --target direct --addr 127.0.0.1:7200 --sessions "$SESSIONS" \
        --duration "$SECS" --rate "$rate" --watch-pid "$hap" --quiet \
        --json "$out/steady-$tag-haproxy.json" --svg "$out/steady-$tag-haproxy.svg"
    run_counted "$gw" "steady-$tag-gateway" $LT steady --target gateway --addr 127.0.0.1:7000 --sessions "$SESSIONS" \
        --duration "$SECS" --rate "$rate" --gateway-pid "$gw" --quiet \
        --json "$out/steady-$tag-gateway.json" --svg "$out/steady-$tag-gateway.svg"
}

if [[ $what == all || $what == steady ]]; then
    steady 0 max
    # Half of the gateway's maximum, spread over the sessions.
    max=$(python3 -c "import json;print(json.load(open('$out/steady-max-gateway.json'))['throughput'])")
    half=$(python3 -c "print(round($max/2/$SESSIONS, 3))")
    steady "$half" half
fi
if [[ $what == all || $what == idle ]]; then
    echo "== idle: 10000 sessions"
    run_logged idle $LT idle --sessions 10000 --duration 5 --gateway-pid "$gw" --quiet --json "$out/idle.json"
fi
if [[ $what == all || $what == push ]]; then
    echo "== push-fanout: 10000 sessions, 20 broadcasts"
    run_logged push $LT push-fanout --sessions 10000 --pushes 20 --push-interval-ms 250 --gateway-pid "$gw" --player-base 3000000 \
        --quiet --json "$out/push.json" --svg "$out/push.svg"
fi
if [[ $what == all || $what == churn ]]; then
    echo "== churn: 200 sessions, 60 s"
    run_logged churn $LT churn --sessions 200 --duration 60 --player-base 4000000 --gateway-pid "$gw" --quiet \
        --json "$out/churn.json" --svg "$out/churn.svg"
fi
if [[ $what == all || $what == login ]]; then
    echo "== login-storm: 5000 logins"
    run_logged login $LT login-storm --sessions 5000 --player-base 5000000 --gateway-pid "$gw" --quiet \
        --json "$out/login.json"
fi
if [[ $what == all || $what == micro ]]; then
    echo "== micro-benchmarks: benches/core.rs (criterion)"
    cargo bench --bench core --no-run >/dev/null 2>&1
    run_logged micro cargo bench --bench core -- --warm-up-time 1 --measurement-time 2
fi
