# shellcheck shell=bash
# Shared helpers for deploy/ci/*.sh (sourced, not executed).
#
#   step NAME        start a timed step (ends the previous one); timing_summary prints all of them
#   on_exit CMD...   register a cleanup command; all run in reverse order on exit (also on errors
#                    and on INT/TERM); $EXIT_RC holds the script's exit status meanwhile
#   apt_install P... install missing Debian packages without starting their services
#   free_port        print a free TCP port on 127.0.0.1
#   wait_http URL STATUS TIMEOUT [PID]   poll URL until it answers STATUS (fails if PID dies)
#
# Scripts set `set -euo pipefail` themselves before sourcing this file.

export PATH="$HOME/.cargo/bin:$PATH"
export DEBIAN_FRONTEND=noninteractive
FASTERNET_CI_CACHE="${FASTERNET_CI_CACHE:-$HOME/.cache/fasternet-ci}"
mkdir -p "$FASTERNET_CI_CACHE"

log() { printf '%s %s\n' "$(date -u +%T)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

# ---- timed steps -------------------------------------------------------------------------
_STEP_NAMES=()
_STEP_USECS=()
_STEP_CUR=""
_STEP_T0=0
_SCRIPT_T0=${EPOCHREALTIME/./}

_usecs_to_s() { printf '%d.%01d' $(($1 / 1000000)) $((($1 % 1000000) / 100000)); }

step_end() {
    [ -n "$_STEP_CUR" ] || return 0
    local dt=$(( ${EPOCHREALTIME/./} - _STEP_T0 ))
    _STEP_NAMES+=("$_STEP_CUR")
    _STEP_USECS+=("$dt")
    printf -- '-- %s: %ss\n' "$_STEP_CUR" "$(_usecs_to_s "$dt")" >&2
    _STEP_CUR=""
}

step() {
    step_end
    _STEP_CUR="$1"
    _STEP_T0=${EPOCHREALTIME/./}
    printf '\n== %s (%s)\n' "$1" "$(date -u +%T)" >&2
}

timing_summary() {
    step_end
    local i
    printf '\nstep timings (%s):\n' "${0##*/}" >&2
    for i in "${!_STEP_NAMES[@]}"; do
        printf '  %8ss  %s\n' "$(_usecs_to_s "${_STEP_USECS[$i]}")" "${_STEP_NAMES[$i]}" >&2
    done
    printf '  %8ss  total\n' "$(_usecs_to_s $(( ${EPOCHREALTIME/./} - _SCRIPT_T0 )))" >&2
}

# ---- cleanup -----------------------------------------------------------------------------
_CLEANUPS=()
on_exit() { _CLEANUPS+=("$*"); }
export EXIT_RC=0
_run_cleanups() {
    local rc=$? i
    export EXIT_RC=$rc    # for cleanups that only act on failure
    set +eu
    trap - EXIT INT TERM
    for (( i=${#_CLEANUPS[@]}-1; i>=0; i-- )); do
        eval "${_CLEANUPS[$i]}"
    done
    if [ "$rc" -ne 0 ]; then
        [ -n "$_STEP_CUR" ] && log "failed during step: $_STEP_CUR"
        timing_summary
        log "${0##*/}: FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap _run_cleanups EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Kill a process we started (by PID): TERM, wait up to $2 seconds (default 10), then KILL.
stop_pid() {
    local pid=$1 grace=${2:-10} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    for (( i=0; i<grace*10; i++ )); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for ${grace}s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
}

# ---- packages ----------------------------------------------------------------------------
_APT_UPDATED=0
apt_install() {
    local p missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    # Package scripts must not start daemons (dockerd, haproxy, prometheus) on this machine:
    # a policy-rc.d that denies every start, only for the duration of the install.
    local own_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    local rc=0
    {
        if [ "$_APT_UPDATED" = 0 ]; then apt-get update -qq && _APT_UPDATED=1; fi &&
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    } || rc=$?
    [ "$own_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
    return "$rc"
}

# A Python venv under the cache dir with the given pip requirements (pinned by the caller).
# Prints the venv's bin directory.
pip_venv() {
    local name=$1; shift
    local dir="$FASTERNET_CI_CACHE/venv-$name" stamp
    stamp="$(printf '%s\n' "$@" | sha256sum | cut -c1-16)"
    if [ ! -x "$dir/bin/python" ] || [ "$(cat "$dir/.stamp" 2>/dev/null)" != "$stamp" ]; then
        rm -rf "$dir"
        if ! python3 -m venv "$dir" >/dev/null 2>&1; then
            rm -rf "$dir"
            apt_install python3-venv >&2
            python3 -m venv "$dir" >&2
        fi
        "$dir/bin/pip" install -q --disable-pip-version-check "$@" >&2
        echo "$stamp" > "$dir/.stamp"
    fi
    echo "$dir/bin"
}

# ---- network helpers (loopback only) -----------------------------------------------------
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# wait_http URL EXPECTED_STATUS TIMEOUT_SECONDS [PID]
wait_http() {
    local url=$1 want=$2 timeout=$3 pid=${4:-} code deadline
    deadline=$(( SECONDS + timeout ))
    while (( SECONDS < deadline )); do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            log "process $pid exited while waiting for $url"
            return 1
        fi
        code=$(http_status "$url")
        [ "$code" = "$want" ] && return 0
        sleep 0.2
    done
    log "timeout after ${timeout}s waiting for $url to answer $want (last: $code)"
    return 1
}

# http_status URL: prints the HTTP status code, or 000 when nothing answered.
http_status() {
    python3 - "$1" <<'PY'
import sys, urllib.request, urllib.error
try:
    with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
        print(r.status)
except urllib.error.HTTPError as e:
    print(e.code)
except Exception:
    print("000")
PY
}

# http_get URL: prints the body (fails on non-2xx).
http_get() {
    python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' "$1"
}

# free_ports N: N distinct free TCP ports on 127.0.0.1, space-separated.
free_ports() {
    python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
for s in socks:
    s.close()
PY
}
