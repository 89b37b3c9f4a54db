#!/usr/bin/env bash
# Run the fuzz targets of fuzz/ (docs/reliability.md).
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Installs cargo-fuzz if it is missing, builds every target (nightly,
# release with debug assertions, AddressSanitizer), then runs each TARGET
# (default: all) for SECONDS (default 1800) or 10 million executions,
# whichever comes first, one after the other. Each run starts from the
# checked-in seeds copied into a scratch corpus (FUZZ_WORK, default a new
# temporary directory), so fuzz/corpus/ stays clean. Prints each target's
# executions, time and corpus size; exits non-zero if any target crashed
# (the input is kept under FUZZ_WORK/<target>/artifacts/).
#
# Environment: FUZZ_WORK (scratch directory, kept), FUZZ_RUNS (executions
# cap, default 10000000), FUZZ_JOBS (libFuzzer -fork
# processes, default 1: none),
# SLG_FUZZ_KNOWN=1 (also check the findings already reported).
set -euo pipefail

secs=${1:-1800}
if [ $# -gt 0 ]; then shift; fi
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root/fuzz"

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs a nightly toolchain (rustup toolchain install nightly)" >&2
    exit 2
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

all=$(cargo +nightly fuzz list)
targets=${*:-$all}
for t in $targets; do
    if ! grep -qx "$t" <<<"$all"; then
        echo "fuzz.sh: no target '$t' (targets: $(echo $all))" >&2
        exit 2
    fi
done

cargo +nightly fuzz build
bin=target/$(rustc +nightly -vV | sed -n 's/^host: //p')/release

# Every input that once crashed must pass first (fuzz/regressions/).
for t in $targets; do
    reg=(regressions/"$t"/*)
    if [ -e "${reg[0]}" ]; then
        if ! "$bin/$t" "${reg[@]}" >/dev/null 2>&1; then
            echo "fuzz.sh: $t fails on a regression input: $bin/$t ${reg[*]}" >&2
            exit 1
        fi
        echo "regressions of $t: ${#reg[@]} pass"
    fi
done

work=${FUZZ_WORK:-$(mktemp -d "${TMPDIR:-/tmp}/slg-fuzz.XXXXXX")}
runs=${FUZZ_RUNS:-10000000}
jobs=${FUZZ_JOBS:-1}
failed=()
printf '%-16s %12s %8s %8s %s\n' target execs seconds corpus result
for t in $targets; do
    dir=$work/$t
    rm -rf "$dir"
    mkdir -p "$dir/corpus" "$dir/artifacts"
    cp corpus/"$t"/seed-* "$dir/corpus/"
    start=$(date +%s)
    rc=0
    par=()
    if [ "$jobs" -gt 1 ]; then par=(-fork="$jobs"); fi
    "$bin/$t" -max_total_time="$secs" -runs="$runs" "${par[@]}" \
        -print_final_stats=1 -artifact_prefix="$dir/artifacts/" \
        "$dir/corpus" >"$dir/log" 2>&1 || rc=$?
    took=$(($(date +%s) - start))
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$dir/log" | tail -1)
    size=$(find "$dir/corpus" -type f | wc -l)
    result=ok
    if [ "$rc" -ne 0 ]; then
        result="CRASH (rc $rc): $dir/log, $(ls "$dir/artifacts" | head -1)"
        failed+=("$t")
    fi
    printf '%-16s %12s %8s %8s %s\n' "$t" "${execs:-?}" "$took" "$size" "$result"
done
echo "logs and corpora: $work"
if [ ${#failed[@]} -gt 0 ]; then
    echo "crashed: ${failed[*]}" >&2
    exit 1
fi
