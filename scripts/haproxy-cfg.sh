#!/usr/bin/env bash
# The HAProxy config both benchmarks compare against: TCP mode on
# 127.0.0.1:7200 relaying to the demo backend on 127.0.0.1:7100.
#   scripts/haproxy-cfg.sh [NBTHREAD]   (default: HAProxy's own choice)
set -euo pipefail
echo "global"
echo "    maxconn 9000"
if [[ -n ${1:-} ]]; then echo "    nbthread $1"; fi
cat <<'HAP'
defaults
    mode tcp
    timeout connect 5s
    timeout client 120s
    timeout server 120s
frontend fe
    bind 127.0.0.1:7200
    default_backend be
backend be
    server demo 127.0.0.1:7100
HAP
