#!/usr/bin/env bash
# Closed-loop HTTP load test of fasternet-serve on loopback, with wrk.
#
# For each model (the bundled FasterNet-T0 at its own input size, and random
# FasterNet-T0 weights at 224x224) it
#   1. measures model-only throughput at the max batch size with
#      `fasternet-serve bench` (no server running),
#   2. starts `fasternet-serve serve` on a free 127.0.0.1 port (--port 0; the
#      port is read from the "listening" log line) and waits for /readyz,
#   3. runs wrk (tools/loadtest.lua POSTs one image to /classify) for each
#      concurrency level, scraping /metrics before and after each level,
#   4. stops the server with SIGTERM and waits for it,
# then prints service images/s, the ratio to model-only images/s, the mean
# batch size, p50/p99 latency, non-2xx responses and socket errors, and the
# p99 bound 3 x (one max-batch forward + max batch delay).
#
# Everything is bounded: wrk, bench and curl run under timeouts, the server
# gets --ready-timeout seconds to become ready and is killed on exit.
#
# Usage: tools/loadtest.sh [options]   (run from anywhere; uses the repo root)
#   --concurrency LIST      closed-loop clients per level      (1,8,32,64)
#   --duration SECONDS      wrk run per level                  (10)
#   --warmup SECONDS        unmeasured wrk run before the levels (2; 0 = none)
#   --models LIST           bundled,t0                         (both)
#   --image PATH            request body for every model (default: a 28x28 Fashion-MNIST
#                           PNG for the bundled model, the 451x300 chelsea.png for t0)
#   --max-batch-size N      passed to the server and to bench  (16)
#   --max-batch-delay-ms D  passed to the server               (5)
#   --queue-capacity Q      passed to the server               (256)
#   --threads N             server and bench compute threads   (2)
#   --wrk-threads N         wrk threads, capped at the clients (1, see below)
#   --bench-seconds S       model-only measurement time        (5)
#   --ready-timeout S       seconds to wait for /readyz        (180)
#   --bin PATH              server binary (target/release/fasternet-serve)
#   --markdown              print Markdown tables for docs/performance.md plus the machine
#   --json FILE             also save the results (every level, the model-only figures and
#                           the machine) as JSON, for --plot-from
#   --plot FILE.png         also draw requests/s and p99 latency against clients, one column
#                           per model, with the model-only rate and the p99 bound as dashed
#                           lines (tools/plots.py; needs matplotlib: pip install -r
#                           tools/requirements.txt; Python: $PYTHON, else .venv/bin/python,
#                           else python3)
#   --plot-from FILE.json   measure nothing: draw the chart of a saved --json run to --plot
#                           (default FILE.png)
#
# Requires wrk (Debian: apt-get install -y wrk), curl and awk.
#
# wrk runs on the same CPUs as the server and takes some of their time, so
# the service figures are a lower bound for a server with the CPUs to itself.
# wrk threads: one wrk thread easily drives 64 connections at a few hundred
# requests/s, and a second one only competes with the server's compute
# threads. A quick A/B on the 2-core machine this was written on (bundled
# model, 64 clients, 5 s, alternating; the machine was busy with a build, so
# noisy) gave -t 1: 657, 620 img/s and -t 2: 565, 622 img/s, hence the default
# --wrk-threads 1. Re-check on an idle machine with --wrk-threads 2.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

CONCURRENCY="1,8,32,64"
DURATION=10
WARMUP=2
MODELS="bundled,t0"
IMAGE=""
MAX_BATCH=16
DELAY_MS=5
QUEUE_CAP=256
THREADS=2
WRK_THREADS=1
BENCH_SECONDS=5
READY_TIMEOUT=180
BIN="target/release/fasternet-serve"
MARKDOWN=0
JSON_OUT=""
PLOT_OUT=""
PLOT_FROM=""
LUA="$REPO_ROOT/tools/loadtest.lua"

die() { echo "loadtest: $*" >&2; exit 2; }
log() { echo "loadtest: $*" >&2; }
is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --concurrency) CONCURRENCY="${2:?}"; shift 2 ;;
    --duration) DURATION="${2:?}"; shift 2 ;;
    --warmup) WARMUP="${2:?}"; shift 2 ;;
    --models) MODELS="${2:?}"; shift 2 ;;
    --image) IMAGE="${2:?}"; shift 2 ;;
    --max-batch-size) MAX_BATCH="${2:?}"; shift 2 ;;
    --max-batch-delay-ms) DELAY_MS="${2:?}"; shift 2 ;;
    --queue-capacity) QUEUE_CAP="${2:?}"; shift 2 ;;
    --threads) THREADS="${2:?}"; shift 2 ;;
    --wrk-threads) WRK_THREADS="${2:?}"; shift 2 ;;
    --bench-seconds) BENCH_SECONDS="${2:?}"; shift 2 ;;
    --ready-timeout) READY_TIMEOUT="${2:?}"; shift 2 ;;
    --bin) BIN="${2:?}"; shift 2 ;;
    --markdown) MARKDOWN=1; shift ;;
    --json) JSON_OUT="${2:?}"; shift 2 ;;
    --plot) PLOT_OUT="${2:?}"; shift 2 ;;
    --plot-from) PLOT_FROM="${2:?}"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done

# Charts: tools/plots.py with matplotlib, checked before any measuring.
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PY="$REPO_ROOT/.venv/bin/python"; else PY=python3; fi
fi
if [[ -n "$PLOT_FROM" ]]; then
  [[ -f "$PLOT_FROM" ]] || die "$PLOT_FROM not found"
  exec "$PY" "$REPO_ROOT/tools/plots.py" "$PLOT_FROM" ${PLOT_OUT:+"$PLOT_OUT"}
fi
if [[ -n "$PLOT_OUT" ]]; then
  "$PY" -c 'import matplotlib' 2>/dev/null \
    || die "--plot needs matplotlib for $PY (pip install -r tools/requirements.txt, or set PYTHON)"
fi

for v in DURATION WARMUP MAX_BATCH DELAY_MS QUEUE_CAP THREADS WRK_THREADS BENCH_SECONDS READY_TIMEOUT; do
  is_uint "${!v}" || die "$v must be a non-negative integer, got '${!v}'"
done
for v in DURATION MAX_BATCH THREADS WRK_THREADS BENCH_SECONDS READY_TIMEOUT; do
  [[ "${!v}" -ge 1 ]] || die "$v must be at least 1"
done
IFS=',' read -r -a LEVELS <<<"$CONCURRENCY"
[[ ${#LEVELS[@]} -ge 1 ]] || die "--concurrency is empty"
for c in "${LEVELS[@]}"; do
  { is_uint "$c" && [[ "$c" -ge 1 && "$c" -le 10000 ]]; } || die "bad concurrency '$c'"
done
IFS=',' read -r -a MODEL_LIST <<<"$MODELS"
for m in "${MODEL_LIST[@]}"; do
  [[ "$m" == bundled || "$m" == t0 ]] || die "unknown model '$m' (bundled or t0)"
done

command -v wrk >/dev/null || die "wrk not found (Debian: apt-get install -y wrk)"
command -v curl >/dev/null || die "curl not found"
command -v timeout >/dev/null || die "timeout (coreutils) not found"
[[ -x "$BIN" ]] || die "$BIN not found or not executable (cargo build --release)"
[[ -z "$IMAGE" || -f "$IMAGE" ]] || die "image $IMAGE not found"
IMAGE_OVERRIDE="$IMAGE"
[[ -f "$LUA" ]] || die "$LUA not found"

use_image() { # path: sets IMAGE (absolute), CONTENT_TYPE, IMAGE_BYTES
  IMAGE="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
  case "${IMAGE,,}" in
    *.png) CONTENT_TYPE="image/png" ;;
    *.jpg|*.jpeg) CONTENT_TYPE="image/jpeg" ;;
    *.webp) CONTENT_TYPE="image/webp" ;;
    *.gif) CONTENT_TYPE="image/gif" ;;
    *.bmp) CONTENT_TYPE="image/bmp" ;;
    *) CONTENT_TYPE="application/octet-stream" ;;
  esac
  IMAGE_BYTES=$(wc -c <"$IMAGE")
}

default_image() { # model
  case "$1" in
    bundled) echo "tests/fixtures/fashion_mnist_t10k_0.png" ;;
    *) echo "tests/fixtures/preprocess/inputs/chelsea.png" ;;
  esac
}
IMAGES_USED=""

# The server and bench read FASTERNET_* settings from the environment; only
# the flags given here should count.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^FASTERNET_' || true)

TMP="$(mktemp -d "${TMPDIR:-/tmp}/fasternet-loadtest.XXXXXX")"
SERVER_PID=""

stop_server() {
  local pid="$SERVER_PID"
  [[ -n "$pid" ]] || return 0
  SERVER_PID=""
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 150; i++)); do # up to 15 s (shutdown grace is 5 s)
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "server $pid did not stop after SIGTERM; killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
}
cleanup() {
  stop_server
  rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Bundled model: input size and classes from weights/config.json.
BUNDLED_SIZE=64
BUNDLED_CLASSES=10
if [[ -f weights/config.json ]]; then
  flat="$(tr -d ' \n\t' <weights/config.json)"
  s="$(grep -o '"input_size":\[3,[0-9]*,[0-9]*\]' <<<"$flat" | head -1 | sed 's/.*\[3,\([0-9]*\),\([0-9]*\)\]/\1x\2/' || true)"
  [[ -n "$s" ]] && BUNDLED_SIZE="$s"
  n="$(grep -o '"num_classes":[0-9]*' <<<"$flat" | head -1 | cut -d: -f2 || true)"
  [[ -n "$n" ]] && BUNDLED_CLASSES="$n"
fi
[[ "$BUNDLED_SIZE" =~ ^([0-9]+)x([0-9]+)$ && "${BASH_REMATCH[1]}" == "${BASH_REMATCH[2]}" ]] \
  && BUNDLED_SIZE="${BASH_REMATCH[1]}"

model_label() { case "$1" in bundled) echo "bundled T0" ;; t0) echo "T0 (random)" ;; esac; }
model_size() { case "$1" in bundled) echo "$BUNDLED_SIZE" ;; t0) echo 224 ;; esac; }
model_classes() { case "$1" in bundled) echo "$BUNDLED_CLASSES" ;; t0) echo 1000 ;; esac; }

# --- model-only throughput at the max batch size ---------------------------
run_bench() { # model -> "IMG_PER_S MS_PER_BATCH"
  local m="$1" out line
  log "$m: model-only bench, batch $MAX_BATCH, ${BENCH_SECONDS}s"
  out="$(timeout -k 5 $((BENCH_SECONDS * 4 + 120)) "$BIN" bench --variant t0 \
    --size "$(model_size "$m")" --batch "$MAX_BATCH" --threads "$THREADS" \
    --seconds "$BENCH_SECONDS" --num-classes "$(model_classes "$m")" 2>"$TMP/bench-$m.err")" \
    || { cat "$TMP/bench-$m.err" >&2; die "bench failed for $m"; }
  line="$(grep -E "batch $MAX_BATCH:" <<<"$out" | tail -1)"
  [[ -n "$line" ]] || { echo "$out" >&2; die "could not parse bench output"; }
  log "  $line"
  sed -E 's/.*: ([0-9.]+) img\/s \(([0-9.]+) ms\/batch\).*/\1 \2/' <<<"$line"
}

# --- server ---------------------------------------------------------------
PORT=""
start_server() { # model
  local m="$1" logf="$TMP/server-$1.log" i code
  local args=(serve --host 127.0.0.1 --port 0 --threads "$THREADS"
    --max-batch-size "$MAX_BATCH" --max-batch-delay-ms "$DELAY_MS"
    --queue-capacity "$QUEUE_CAP" --shutdown-grace-seconds 5 --log-format text)
  case "$m" in
    bundled) args+=(--weights weights) ;;
    t0) args+=(--random-init t0) ;;
  esac
  log "$m: starting $BIN ${args[*]}"
  NO_COLOR=1 "$BIN" "${args[@]}" >"$logf" 2>&1 &
  SERVER_PID=$!
  PORT=""
  for ((i = 0; i < READY_TIMEOUT * 10; i++)); do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      tail -20 "$logf" >&2
      SERVER_PID=""
      die "server for $m exited during start-up"
    fi
    if [[ -z "$PORT" ]]; then
      PORT="$(sed 's/\x1b\[[0-9;]*m//g' "$logf" | grep -m1 ' listening' \
        | grep -o 'addr=127\.0\.0\.1:[0-9]*' | cut -d: -f2 || true)"
    fi
    if [[ -n "$PORT" ]]; then
      code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$PORT/readyz" || true)"
      if [[ "$code" == 200 ]]; then
        log "$m: ready on 127.0.0.1:$PORT after $((i / 10)).$((i % 10)) s"
        return 0
      fi
    fi
    sleep 0.1
  done
  tail -20 "$logf" >&2
  die "server for $m not ready within ${READY_TIMEOUT}s"
}

scrape() { # file
  curl -sf --max-time 5 "http://127.0.0.1:$PORT/metrics" >"$1" || die "GET /metrics failed"
}
metric() { # file name -> value (0 if absent)
  awk -v n="$2" '$1 == n { v = $2; f = 1 } END { printf "%s\n", f ? v : 0 }' "$1"
}
rejections() { # file -> sum over reasons
  awk '/^fasternet_rejections_total\{/ { s += $2 } END { printf "%d\n", s }' "$1"
}

# After wrk stops, the server may still be computing the batch its last
# requests joined (queued images whose client is gone are dropped). Wait until
# the queue is empty and no forward pass finished over one settle interval,
# so that a level does not start with the previous level's backlog.
settle() { # seconds_per_poll
  local i a b
  for ((i = 0; i < 30; i++)); do
    scrape "$TMP/s0"
    sleep "$1"
    scrape "$TMP/s1"
    a="$(metric "$TMP/s0" fasternet_batch_size_count)"
    b="$(metric "$TMP/s1" fasternet_batch_size_count)"
    [[ "$a" == "$b" && "$(metric "$TMP/s1" fasternet_queue_depth)" == 0 ]] && return 0
  done
  log "server did not settle; going on"
}

run_wrk() { # conc seconds outfile
  local c="$1" d="$2" t="$WRK_THREADS"
  [[ "$t" -gt "$c" ]] && t="$c"
  timeout -k 5 $((d + 30)) wrk -c "$c" -t "$t" -d "${d}s" --latency --timeout 10s \
    -s "$LUA" "http://127.0.0.1:$PORT/classify" -- "$IMAGE" "$CONTENT_TYPE" >"$3" 2>&1 \
    || { cat "$3" >&2; die "wrk failed (c=$c)"; }
}

RESULTS="$TMP/results.tsv" # model conc ips ratio mean_batch fwd_ms p50 p99 non2xx codes sockerr rej
MODEL_ONLY="$TMP/model_only.tsv" # model ips ms_per_batch bound_ms
IMAGES_TSV="$TMP/images.tsv" # model image_basename bytes
: >"$RESULTS"
: >"$MODEL_ONLY"
: >"$IMAGES_TSV"
LOAD_AT_START="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo '?')"
RUN_DATE="$(date -u '+%Y-%m-%d %H:%M UTC')"

for m in "${MODEL_LIST[@]}"; do
  use_image "${IMAGE_OVERRIDE:-$(default_image "$m")}"
  IMAGES_USED="$IMAGES_USED${IMAGES_USED:+, }$m: $(basename "$IMAGE") ($IMAGE_BYTES bytes, $CONTENT_TYPE)"
  printf '%s\t%s\t%s\n' "$m" "$(basename "$IMAGE")" "$IMAGE_BYTES" >>"$IMAGES_TSV"
  bench_out="$(run_bench "$m")"
  read -r mo_ips mo_ms <<<"$bench_out"
  settle_s="$(awk -v f="$mo_ms" 'BEGIN { s = 1.2 * f / 1000 + 0.2; printf "%.2f", (s < 0.5 ? 0.5 : s) }')"
  bound_ms="$(awk -v f="$mo_ms" -v d="$DELAY_MS" 'BEGIN { printf "%.1f", 3 * (f + d) }')"
  printf '%s\t%s\t%s\t%s\n' "$m" "$mo_ips" "$mo_ms" "$bound_ms" >>"$MODEL_ONLY"

  start_server "$m"
  if [[ "$WARMUP" -gt 0 ]]; then
    maxc=0
    for c in "${LEVELS[@]}"; do [[ "$c" -gt "$maxc" ]] && maxc="$c"; done
    log "$m: warm-up, $maxc clients, ${WARMUP}s"
    run_wrk "$maxc" "$WARMUP" "$TMP/wrk-$m-warmup.txt"
    settle "$settle_s"
  fi
  for c in "${LEVELS[@]}"; do
    log "$m: $c clients, ${DURATION}s"
    scrape "$TMP/m0"
    run_wrk "$c" "$DURATION" "$TMP/wrk-$m-$c.txt"
    scrape "$TMP/m1"
    settle "$settle_s"
    line="$(grep -m1 '^LOADTEST ' "$TMP/wrk-$m-$c.txt" || true)"
    [[ -n "$line" ]] || { cat "$TMP/wrk-$m-$c.txt" >&2; die "no LOADTEST line from wrk"; }
    declare -A r=()
    for kv in ${line#LOADTEST }; do r["${kv%%=*}"]="${kv#*=}"; done
    bs0="$(metric "$TMP/m0" fasternet_batch_size_sum)"; bs1="$(metric "$TMP/m1" fasternet_batch_size_sum)"
    bc0="$(metric "$TMP/m0" fasternet_batch_size_count)"; bc1="$(metric "$TMP/m1" fasternet_batch_size_count)"
    fs0="$(metric "$TMP/m0" fasternet_inference_duration_seconds_sum)"; fs1="$(metric "$TMP/m1" fasternet_inference_duration_seconds_sum)"
    rj0="$(rejections "$TMP/m0")"; rj1="$(rejections "$TMP/m1")"
    row="$(awk -v m="$m" -v c="$c" -v req="${r[requests]}" -v dur="${r[duration_us]}" \
      -v bad="${r[non2xx]}" -v codes="${r[codes]}" \
      -v se=$((r[err_connect] + r[err_read] + r[err_write] + r[err_timeout])) \
      -v p50="${r[p50_us]}" -v p99="${r[p99_us]}" -v mo="$mo_ips" \
      -v bs0="$bs0" -v bs1="$bs1" -v bc0="$bc0" -v bc1="$bc1" -v fs0="$fs0" -v fs1="$fs1" \
      -v rej=$((rj1 - rj0)) 'BEGIN {
        ips = dur > 0 ? (req - bad) / (dur / 1e6) : 0
        nb = bc1 - bc0
        mb = nb > 0 ? (bs1 - bs0) / nb : 0
        fwd = nb > 0 ? 1000 * (fs1 - fs0) / nb : 0
        printf "%s\t%d\t%.1f\t%.2f\t%.1f\t%.1f\t%.1f\t%.1f\t%d\t%s\t%d\t%d\n",
          m, c, ips, (mo > 0 ? ips / mo : 0), mb, fwd, p50 / 1000, p99 / 1000, bad, codes, se, rej
      }')"
    printf '%s\n' "$row" >>"$RESULTS"
    log "  $(cut -f3 <<<"$row") img/s, mean batch $(cut -f5 <<<"$row"), p50 $(cut -f7 <<<"$row") ms, p99 $(cut -f8 <<<"$row") ms, non-2xx $(cut -f9 <<<"$row")"
    unset r
  done
  stop_server
done

# --- report ---------------------------------------------------------------
CPU_MODEL="$(grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//' || true)"
[[ -n "$CPU_MODEL" ]] || CPU_MODEL="unknown CPU"
CPUS_AVAIL="$(nproc 2>/dev/null || echo '?')"
CPUS_ALL="$(grep -c '^processor' /proc/cpuinfo 2>/dev/null || echo '?')"
WRK_VERSION="$(wrk -v 2>&1 | head -1 | awk '{print $2}' || true)"
MAXC=0
for c in "${LEVELS[@]}"; do [[ "$c" -gt "$MAXC" ]] && MAXC="$c"; done
HALFC=$((MAXC / 2))

checks() { # prefix
  local p="$1" m ips ms bound row
  while IFS=$'\t' read -r m ips ms bound; do
    row="$(awk -F'\t' -v m="$m" -v c="$MAXC" '$1 == m && $2 == c' "$RESULTS")"
    [[ -n "$row" ]] && awk -F'\t' -v p="$p" -v l="$(model_label "$m")" '{
      printf "%s%s, %d clients: %.1f img/s = %.2fx model-only (target >= 0.90: %s)\n",
        p, l, $2, $3, $4, ($4 >= 0.9 ? "met" : "missed") }' <<<"$row"
    row="$(awk -F'\t' -v m="$m" -v c="$HALFC" '$1 == m && $2 == c' "$RESULTS")"
    [[ -n "$row" ]] && awk -F'\t' -v p="$p" -v l="$(model_label "$m")" -v b="$bound" '{
      printf "%s%s, %d clients: p99 %.1f ms vs bound %.1f ms (target p99 <= bound: %s)\n",
        p, l, $2, $8, b, ($8 <= b ? "met" : "missed") }' <<<"$row"
  done <"$MODEL_ONLY"
  return 0
}

SETUP="server \`--threads $THREADS --max-batch-size $MAX_BATCH --max-batch-delay-ms $DELAY_MS --queue-capacity $QUEUE_CAP\`; wrk $WRK_VERSION, closed loop, ${DURATION} s per level, \`-t $WRK_THREADS\` (capped at the clients), \`--timeout 10s\`; each request POSTs one image ($IMAGES_USED)"
NOTE_CPU="wrk runs on the same CPUs as the server and takes part of their time, so service figures are a lower bound for a server with the machine to itself."
NOTE_BOUND="p99 bound = 3 x (model-only forward of one batch of $MAX_BATCH + $DELAY_MS ms max batch delay); model-only figures are \`fasternet-serve bench\` on random weights of the same shape (${BENCH_SECONDS} s)."

if [[ "$MARKDOWN" -eq 1 ]]; then
  echo "Machine: $CPU_MODEL, $CPUS_AVAIL logical CPUs available (of $CPUS_ALL), load average at start $LOAD_AT_START."
  echo "Setup: $SETUP."
  echo
  echo "| Model | Input | Model-only img/s (batch $MAX_BATCH) | Forward ms (batch $MAX_BATCH) | p99 bound ms |"
  echo "|---|---|---:|---:|---:|"
  while IFS=$'\t' read -r m ips ms bound; do
    s="$(model_size "$m")"
    echo "| $(model_label "$m") | ${s}x${s} | $ips | $ms | $bound |"
  done <"$MODEL_ONLY"
  echo
  echo "| Model | Clients | img/s | vs model-only | Mean batch | Mean forward ms | p50 ms | p99 ms | non-2xx | Socket errors |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  while IFS=$'\t' read -r m c ips ratio mb fwd p50 p99 bad codes se rej; do
    [[ "$codes" == "-" ]] && codes="" || codes=" ($codes)"
    echo "| $(model_label "$m") | $c | $ips | ${ratio}x | $mb | $fwd | $p50 | $p99 | $bad$codes | $se |"
  done <"$RESULTS"
  echo
  echo "- $NOTE_CPU"
  echo "- $NOTE_BOUND"
  echo "- Mean batch and mean forward come from \`/metrics\` (\`fasternet_batch_size\`, \`fasternet_inference_duration_seconds\`) over each level; img/s counts 2xx responses only (one image each)."
  checks "- "
else
  echo "Machine: $CPU_MODEL, $CPUS_AVAIL logical CPUs available (of $CPUS_ALL), load average at start $LOAD_AT_START"
  echo "Setup: ${SETUP//\`/}"
  echo
  while IFS=$'\t' read -r m ips ms bound; do
    s="$(model_size "$m")"
    echo "$(model_label "$m") ${s}x${s}: model-only $ips img/s at batch $MAX_BATCH ($ms ms/batch); p99 bound 3 x ($ms + $DELAY_MS) = $bound ms"
    printf '  %7s %9s %8s %10s %8s %8s %9s %9s %8s %8s %10s\n' \
      clients img/s ratio mean_batch fwd_ms p50_ms p99_ms p99/bound non2xx sockerr rejections
    awk -F'\t' -v m="$m" -v b="$bound" '$1 == m {
      printf "  %7d %9.1f %8.2f %10.1f %8.1f %8.1f %9.1f %9.2f %8d %8d %10d%s\n",
        $2, $3, $4, $5, $6, $7, $8, (b > 0 ? $8 / b : 0), $9, $11, $12, ($10 == "-" ? "" : "  codes " $10) }' "$RESULTS"
    echo
  done <"$MODEL_ONLY"
  echo "Notes:"
  echo "  $NOTE_CPU"
  echo "  ${NOTE_BOUND//\`/}"
  checks "  "
fi

# --- saved results and chart (stdout above is unchanged by these) ---------
json_str() { # value -> JSON string
  local s="$1"
  s="${s//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//$'\t'/ }"
  printf '"%s"' "$s"
}

write_json() { # file
  local m ips ms bound s img bytes first=1
  {
    printf '{"kind": "load", "tool": "tools/loadtest.sh", "meta": {'
    printf '"cpu": %s, "cpus_available": %s, "cpus_all": %s, ' "$(json_str "$CPU_MODEL")" \
      "$(json_str "$CPUS_AVAIL")" "$(json_str "$CPUS_ALL")"
    printf '"load_at_start": %s, "threads": %d, "max_batch_size": %d, "max_batch_delay_ms": %d, ' \
      "$(json_str "$LOAD_AT_START")" "$THREADS" "$MAX_BATCH" "$DELAY_MS"
    printf '"queue_capacity": %d, "wrk_threads": %d, "wrk_version": %s, "duration_s": %d, ' \
      "$QUEUE_CAP" "$WRK_THREADS" "$(json_str "$WRK_VERSION")" "$DURATION"
    printf '"bench_seconds": %d, "date": %s, "setup": %s, ' "$BENCH_SECONDS" \
      "$(json_str "$RUN_DATE")" "$(json_str "${SETUP//\`/}")"
    printf '"rate_label": "requests/s (2xx, one image each)", "subtitle": %s},\n' \
      "$(json_str "--max-batch-size $MAX_BATCH --max-batch-delay-ms $DELAY_MS --queue-capacity $QUEUE_CAP; wrk $WRK_VERSION -t $WRK_THREADS, closed loop, $DURATION s per level; $RUN_DATE")"
    printf ' "groups": ['
    while IFS=$'\t' read -r m ips ms bound; do
      s="$(model_size "$m")"
      IFS=$'\t' read -r img bytes < <(awk -F'\t' -v m="$m" '$1 == m { print $2 "\t" $3 }' "$IMAGES_TSV")
      [[ $first -eq 1 ]] || printf ','
      first=0
      printf '\n  {"name": %s, "model": %s, "input": %s, "image": %s, "image_bytes": %d, ' \
        "$(json_str "$(model_label "$m") ${s}x${s}, $img")" "$(json_str "$m")" "$(json_str "${s}x${s}")" \
        "$(json_str "$img")" "$bytes"
      printf '"model_only_per_s": %s, "model_only_ms_per_batch": %s, "model_only_label": %s, ' \
        "$ips" "$ms" "$(json_str "model only (bench, batch $MAX_BATCH)")"
      printf '"p99_bound_ms": %s, "p99_bound_label": %s}' "$bound" \
        "$(json_str "p99 bound 3 x (forward + ${DELAY_MS} ms)")"
    done <"$MODEL_ONLY"
    printf '],\n "rows": ['
    first=1
    while IFS=$'\t' read -r m c ips ratio mb fwd p50 p99 bad codes se rej; do
      s="$(model_size "$m")"
      IFS=$'\t' read -r img bytes < <(awk -F'\t' -v m="$m" '$1 == m { print $2 "\t" $3 }' "$IMAGES_TSV")
      [[ $first -eq 1 ]] || printf ','
      first=0
      printf '\n  {"group": %s, "series": "/classify", "clients": %d, "requests_per_s": %s, ' \
        "$(json_str "$(model_label "$m") ${s}x${s}, $img")" "$c" "$ips"
      printf '"vs_model_only": %s, "mean_batch": %s, "mean_forward_ms": %s, "p50_ms": %s, "p99_ms": %s, ' \
        "$ratio" "$mb" "$fwd" "$p50" "$p99"
      printf '"non2xx": %d, "codes": %s, "socket_errors": %d, "rejections": %d}' "$bad" \
        "$(json_str "$codes")" "$se" "$rej"
    done <"$RESULTS"
    printf '\n]}\n'
  } >"$1"
}

if [[ -n "$JSON_OUT" || -n "$PLOT_OUT" ]]; then
  JSON_FILE="${JSON_OUT:-$TMP/results.json}"
  mkdir -p "$(dirname "$JSON_FILE")"
  write_json "$JSON_FILE"
  if [[ -n "$JSON_OUT" ]]; then log "results saved to $JSON_OUT"; fi
  if [[ -n "$PLOT_OUT" ]]; then
    mkdir -p "$(dirname "$PLOT_OUT")"
    "$PY" "$REPO_ROOT/tools/plots.py" "$JSON_FILE" "$PLOT_OUT" || die "plotting failed"
  fi
fi
