#!/usr/bin/env bash
# Two fasternet-serve instances behind haproxy, scraped by Prometheus, under a bounded load:
#
#   phase 1  SIGTERM one instance mid-load: it must drain and exit 0 within its grace period,
#            and no client request may fail (haproxy health-checks /readyz and retries refused
#            or reset requests on the other instance)
#   restart  the instance comes back: /readyz, haproxy marks it UP, Prometheus sees up=1
#   phase 2  SIGKILL one instance mid-load: failures are reported and must not exceed
#            FASTERNET_LB_KILL_MAX_FAILURES (default 0: haproxy's L7 retries should hide a crash)
#   alerts   Prometheus loads deploy/monitoring/alerts.yaml: every rule evaluates without error
#            on the real series, and FasternetTargetDown goes pending for the killed instance
#
# Everything listens on 127.0.0.1 (free ports); every process started here is stopped by PID on
# exit; every wait has a timeout; the load is a fixed number of requests with a time cap.
#
#   bash deploy/ci/loadbalancer.sh
#
# Uses target/release/fasternet-serve (built with `cargo build --release --locked` if missing).
# Environment: FASTERNET_LB_REQUESTS (per phase, default 1500), FASTERNET_LB_CONCURRENCY
# (default 8), FASTERNET_LB_KILL_MAX_FAILURES (default 0).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/ci/lib.sh
source deploy/ci/lib.sh

ROOT=$PWD
BIN=$ROOT/target/release/fasternet-serve
REQUESTS=${FASTERNET_LB_REQUESTS:-1500}
CONCURRENCY=${FASTERNET_LB_CONCURRENCY:-8}
KILL_MAX_FAILURES=${FASTERNET_LB_KILL_MAX_FAILURES:-0}
LOAD_MAX_SECONDS=120
APP_GRACE=10                   # FASTERNET_SHUTDOWN_GRACE_SECONDS of the instances
TMP=$(mktemp -d /tmp/fasternet-lb.XXXXXX)
on_exit "rm -rf '$TMP'"

step "install haproxy, prometheus, dataset-fashion-mnist"
apt_install haproxy prometheus dataset-fashion-mnist
log "$(haproxy -v | head -n1); $(prometheus --version 2>&1 | head -n1)"

step "release binary"
if [ ! -x "$BIN" ]; then
    cargo build --release --locked
fi
"$BIN" --version

read -r PORT_A PORT_B PORT_LB PORT_STATS PORT_PROM <<<"$(free_ports 5)"
declare -A PORT=([a]=$PORT_A [b]=$PORT_B)
declare -A PID=()
stop_all() {
    local p
    for p in "${PID[@]}" ${HAPROXY_PID:-} ${PROM_PID:-} ${LOAD_PID:-}; do stop_pid "$p" 15; done
}
on_exit stop_all
logs_on_failure() {
    [ "$EXIT_RC" != 0 ] || return 0
    local f
    for f in "$TMP"/*.log; do
        [ -f "$f" ] && { log "--- tail of ${f##*/}"; tail -n 15 "$f" >&2; }
    done
}
on_exit logs_on_failure

start_instance() { # NAME
    local name=$1
    FASTERNET_HOST=127.0.0.1 FASTERNET_PORT=${PORT[$name]} FASTERNET_THREADS=1 \
        FASTERNET_SHUTDOWN_GRACE_SECONDS=$APP_GRACE FASTERNET_WEIGHTS="$ROOT/weights" \
        FASTERNET_LOG_FORMAT=text "$BIN" serve >>"$TMP/instance-$name.log" 2>&1 &
    PID[$name]=$!
    wait_http "http://127.0.0.1:${PORT[$name]}/readyz" 200 60 "${PID[$name]}" || die "instance $name did not become ready"
    log "instance $name: pid ${PID[$name]}, ready on 127.0.0.1:${PORT[$name]}"
}

# wait_exit NAME TIMEOUT: waits for the instance to exit; sets EXIT_CODE and EXIT_SECS.
wait_exit() {
    local name=$1 timeout=$2 pid=${PID[$1]} t0=${EPOCHREALTIME/./}
    while kill -0 "$pid" 2>/dev/null; do
        (( ${EPOCHREALTIME/./} - t0 < timeout * 1000000 )) || die "instance $name (pid $pid) still running ${timeout}s after the signal"
        sleep 0.05
    done
    EXIT_CODE=0
    wait "$pid" || EXIT_CODE=$?
    EXIT_SECS=$(_usecs_to_s $(( ${EPOCHREALTIME/./} - t0 )))
    unset "PID[$name]"
}

# haproxy's view of its servers, from the stats CSV: "a UP b DOWN" or one field of one row.
lb_stat() { # [SVNAME FIELD]
    python3 - "http://127.0.0.1:$PORT_STATS/stats;csv" "$@" <<'PY'
import csv, io, sys, urllib.request
rows = list(csv.DictReader(io.StringIO(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode().lstrip("# "))))
be = [r for r in rows if r["pxname"] == "fasternet"]
if len(sys.argv) == 4:
    print(next(r[sys.argv[3]] for r in be if r["svname"] == sys.argv[2]) or "0")
else:
    print(" ".join(f"{r['svname']} {r['status'].split()[0]}" for r in be if r["svname"] not in ("FRONTEND", "BACKEND")))
PY
}
wait_lb() { # NAME STATUS TIMEOUT
    local deadline=$((SECONDS + $3)) st=""
    while (( SECONDS < deadline )); do
        st=$(lb_stat 2>/dev/null || true)
        [[ " $st " == *" $1 $2 "* ]] && return 0
        sleep 0.2
    done
    die "haproxy did not report server $1 $2 within $3s (last: $st)"
}

# Prometheus' `up` per instance: "a=1 b=1".
prom_up() {
    python3 - "http://127.0.0.1:$PORT_PROM/api/v1/query?query=up%7Bjob%3D%22fasternet%22%7D" <<'PY'
import json, sys, urllib.request
d = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))
assert d["status"] == "success", d
print(" ".join(sorted(f"{r['metric']['name']}={r['value'][1]}" for r in d["data"]["result"])))
PY
}
wait_prom() { # EXPECTED ("a=1 b=1") TIMEOUT
    local deadline=$((SECONDS + $2)) got=""
    while (( SECONDS < deadline )); do
        got=$(prom_up 2>/dev/null || true)
        [ "$got" = "$1" ] && return 0
        sleep 0.25
    done
    die "Prometheus: expected up {$1} within $2s, got {$got}"
}

step "start two instances"
start_instance a
start_instance b

step "start haproxy"
cat > "$TMP/haproxy.cfg" <<CFG
# Same policy as deploy/compose/haproxy.cfg, with static servers and faster checks.
global
    maxconn 256
    tune.bufsize 1048576
defaults
    mode http
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    timeout http-request 10s
    timeout queue 10s
    option http-buffer-request
    retries 3
    option redispatch 1
    retry-on all-retryable-errors
frontend http
    bind 127.0.0.1:$PORT_LB
    default_backend fasternet
frontend stats
    bind 127.0.0.1:$PORT_STATS
    stats enable
    stats uri /stats
backend fasternet
    balance leastconn
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host localhost
    http-check expect status 200
    default-server inter 500ms fastinter 250ms downinter 500ms fall 2 rise 2
    server a 127.0.0.1:$PORT_A check
    server b 127.0.0.1:$PORT_B check
CFG
haproxy -c -q -f "$TMP/haproxy.cfg"
haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1 &
HAPROXY_PID=$!
wait_http "http://127.0.0.1:$PORT_STATS/stats" 200 20 "$HAPROXY_PID" || die "haproxy did not start"
wait_lb a UP 20
wait_lb b UP 20
log "haproxy pid $HAPROXY_PID on 127.0.0.1:$PORT_LB: $(lb_stat)"

step "start prometheus"
cat > "$TMP/prometheus.yml" <<CFG
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $ROOT/deploy/monitoring/alerts.yaml
scrape_configs:
  - job_name: fasternet
    static_configs:
      - targets: ["127.0.0.1:$PORT_A"]
        labels: {name: a}
      - targets: ["127.0.0.1:$PORT_B"]
        labels: {name: b}
CFG
promtool check config "$TMP/prometheus.yml" >/dev/null
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/prometheus-data" \
    --web.listen-address="127.0.0.1:$PORT_PROM" --log.level=warn >"$TMP/prometheus.log" 2>&1 &
PROM_PID=$!
wait_http "http://127.0.0.1:$PORT_PROM/-/ready" 200 30 "$PROM_PID" || die "prometheus did not start"
wait_prom "a=1 b=1" 30
log "prometheus pid $PROM_PID on 127.0.0.1:$PORT_PROM: up {$(prom_up)}"

# run_phase NAME SIGNAL MAX_FAILURES: load through haproxy; SIGNAL to instance a after a third
# of the requests were answered. Appends a line to SUMMARY.
SUMMARY=()
run_phase() {
    local phase=$1 sig=$2 max_failures=$3 progress="$TMP/$1.progress" report="$TMP/$1.json" rc=0 deadline
    local r0 d0 c0 e0
    r0=$(lb_stat BACKEND wretr); d0=$(lb_stat BACKEND wredis); c0=$(lb_stat a econ); e0=$(lb_stat a eresp)
    python3 deploy/ci/loadgen.py --url "http://127.0.0.1:$PORT_LB" --fashion-mnist 100 \
        --requests "$REQUESTS" --concurrency "$CONCURRENCY" --max-seconds "$LOAD_MAX_SECONDS" \
        --max-failures "$max_failures" --min-accuracy 0.7 --progress-file "$progress" \
        --report "$report" --label "$phase" &
    LOAD_PID=$!
    deadline=$((SECONDS + 60))
    until [ "$(cat "$progress" 2>/dev/null || echo 0)" -ge $((REQUESTS / 3)) ]; do
        kill -0 "$LOAD_PID" 2>/dev/null || die "$phase: the load ended before the signal was sent"
        (( SECONDS < deadline )) || die "$phase: fewer than $((REQUESTS / 3)) answers after 60s"
        sleep 0.02
    done
    log "$phase: $(cat "$progress") answered; SIG$sig to instance a (pid ${PID[a]})"
    kill "-$sig" "${PID[a]}"
    local sig_at=$SECONDS
    if [ "$sig" = TERM ]; then
        wait_exit a $((APP_GRACE + 5))
        [ "$EXIT_CODE" = 0 ] || die "$phase: instance a exited with $EXIT_CODE after SIGTERM"
        log "$phase: instance a drained and exited 0 after ${EXIT_SECS}s (grace ${APP_GRACE}s)"
        local exit_note="a exited 0 after ${EXIT_SECS}s"
    else
        wait_exit a 5
        local exit_note="a killed (status $EXIT_CODE)"
        wait_prom "a=0 b=1" 15
        log "$phase: Prometheus reports up {$(prom_up)} $((SECONDS - sig_at))s after the kill"
    fi
    wait_lb a DOWN 10
    deadline=$((SECONDS + LOAD_MAX_SECONDS + 40))
    while kill -0 "$LOAD_PID" 2>/dev/null; do
        (( SECONDS < deadline )) || die "$phase: the load generator did not finish"
        sleep 0.1
    done
    wait "$LOAD_PID" || rc=$?
    LOAD_PID=""
    # haproxy's counters for this phase: retries (wretr) and redispatches (wredis) of the
    # backend, connection and response errors (econ, eresp) seen on instance a.
    local lb_note
    lb_note="retries=$(( $(lb_stat BACKEND wretr) - r0 )) redispatches=$(( $(lb_stat BACKEND wredis) - d0 ))"
    lb_note+=" a:conn_errors=$(( $(lb_stat a econ) - c0 )) a:resp_errors=$(( $(lb_stat a eresp) - e0 ))"
    SUMMARY+=("$(python3 - "$report" "$phase" "$exit_note" "$lb_note" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:<8} {r['answered']:>4}/{r['requests']:<4} ok={r['ok']:<4} failed={r['failed']:<3} "
      f"{r['seconds']}s p50={r['latency_ms']['p50']}ms p95={r['latency_ms']['p95']}ms max={r['latency_ms']['max']}ms "
      f"top1={r['accuracy']} | haproxy {sys.argv[4]} | {sys.argv[3]}")
PY
)")
    log "summary: ${SUMMARY[-1]}"
    [ "$rc" = 0 ] || die "$phase: the load failed (see above; allowed failures: $max_failures)"
}

step "phase 1: SIGTERM under load"
wait_prom "a=1 b=1" 10
run_phase sigterm TERM 0

step "restart instance a"
start_instance a
wait_lb a UP 20
wait_prom "a=1 b=1" 20
log "haproxy: $(lb_stat); prometheus: up {$(prom_up)}"

step "phase 2: SIGKILL under load"
run_phase sigkill KILL "$KILL_MAX_FAILURES"

step "alerting rules in Prometheus"
# Instance a is down since the SIGKILL: its target is up=0 and exported fasternet_build_info
# within the hour, so FasternetTargetDown is pending (it fires after its 5 minutes).
python3 - "http://127.0.0.1:$PORT_PROM" "127.0.0.1:$PORT_A" "$(grep -c -- '- alert:' deploy/monitoring/alerts.yaml)" <<'PY' \
    || die "the alerting rules did not all load and evaluate in Prometheus"
import json, sys, time, urllib.request
base, down, want = sys.argv[1], sys.argv[2], int(sys.argv[3])
deadline = time.time() + 20
while True:
    d = json.load(urllib.request.urlopen(base + "/api/v1/rules?type=alert", timeout=2))
    rules = [r for g in d["data"]["groups"] for r in g["rules"]]
    bad = [f"{r['name']}: {r.get('health')} {r.get('lastError', '')}" for r in rules if r.get("health") != "ok"]
    pending = [a for r in rules if r["name"] == "FasternetTargetDown" for a in r.get("alerts", [])
               if a["labels"].get("instance") == down]
    if len(rules) == want and not bad and pending:
        break
    if time.time() > deadline:
        sys.exit(f"after 20s: {len(rules)} of {want} alerting rules, unhealthy: {bad}, "
                 f"FasternetTargetDown for {down}: {pending}")
    time.sleep(0.5)
states = ", ".join(f"{r['name']}={r['state']}" for r in rules)
print(f"{len(rules)} alerting rules evaluated without error ({states}); "
      f"FasternetTargetDown {pending[0]['state']} for {down}", file=sys.stderr)
PY

step "shutdown"
stop_pid "${PID[b]}" $((APP_GRACE + 5))
rc=0
wait "${PID[b]}" || rc=$?
[ "$rc" = 0 ] || die "instance b exited with $rc on SIGTERM"
log "instance b exited 0 on SIGTERM"
unset "PID[b]"

timing_summary
printf '\nload balancer summary (%s requests per phase, concurrency %s, 2 instances x 1 thread):\n' "$REQUESTS" "$CONCURRENCY" >&2
printf '  %s\n' "${SUMMARY[@]}" >&2
log "loadbalancer.sh: OK"
