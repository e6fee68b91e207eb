#!/usr/bin/env bash
# Builds THE Dockerfile without network access and checks the image and a running container.
#
#   1. Debian's docker.io and debootstrap (installed when missing); a private dockerd (its own
#      data root, exec root and socket under a temp dir; no bridge, no iptables) that cannot
#      pull: its registry traffic goes to a dead proxy. Stopped by PID on exit.
#   2. Local base images from debootstrap (bookworm, from the mirror apt uses) + `docker import`:
#      local/debian:bookworm-slim (runtime) and local/rust:bookworm (the same plus gcc,
#      libc6-dev, nasm and a copy of this machine's Rust toolchain). The rootfs tarballs are cached in
#      $FASTERNET_CI_CACHE, so reruns skip debootstrap.
#   3. `cargo vendor` into vendor/ (removed again on exit when this script created it), then
#      `docker build --network=none --build-arg RUST_IMAGE=... --build-arg RUNTIME_IMAGE=...`.
#   4. Image metadata (non-root numeric USER, EXPOSE, HEALTHCHECK, STOPSIGNAL, exec-form
#      ENTRYPOINT), the CLI inside the image classifying a Fashion-MNIST PNG, then the server:
#      `docker run --network=host` on a free loopback port with a CPU limit and a read-only root
#      filesystem; /readyz, POST /classify (JSON contract and accuracy), /metrics, /v1/models,
#      Docker's health status, the process's UID, threads == CPU limit, and `docker stop`: exit
#      code 0 within the drain period.
#
#   bash deploy/ci/docker.sh
#
# Environment: FASTERNET_CI_CACHE (default ~/.cache/fasternet-ci), FASTERNET_CI_BUILDKIT
# (1: BuildKit, the default; 0: the classic builder), FASTERNET_CI_CPUS (the container's CPU
# limit, default 1), FASTERNET_CI_KEEP_VENDOR=1 (keep a vendor/ this script created),
# FASTERNET_CI_DOCKER_DATA (a persistent dockerd data root: reruns reuse the build cache).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=deploy/ci/lib.sh
source deploy/ci/lib.sh

ROOT=$PWD
IMAGE=fasternet-serve:ci
RUST_BASE=local/rust:bookworm
RUNTIME_BASE=local/debian:bookworm-slim
SUITE=bookworm
RECIPE=2                      # bump when the base-image recipe below changes (new cache keys)
BUILDKIT=${FASTERNET_CI_BUILDKIT:-1}
CPUS=${FASTERNET_CI_CPUS:-1}
GRACE=30                      # the server's default FASTERNET_SHUTDOWN_GRACE_SECONDS
UID_EXPECTED=10001

# ---- 1. docker ---------------------------------------------------------------------------
step "install docker.io, debootstrap"
command -v dockerd >/dev/null || apt_install docker.io
command -v debootstrap >/dev/null || apt_install debootstrap
apt_install dataset-fashion-mnist
DOCKERD=$(command -v dockerd)
# The client that came with this daemon (a newer one elsewhere on PATH may lack BuildKit
# without the buildx plugin).
DOCKER=""
for c in "$(dirname "$DOCKERD")/docker" $(dpkg -L docker.io docker-ce-cli 2>/dev/null | grep '/bin/docker$' || true); do
    if [ -x "$c" ]; then DOCKER=$c; break; fi
done
[ -n "$DOCKER" ] || DOCKER=$(command -v docker)
log "dockerd: $("$DOCKERD" --version); client: $DOCKER"

step "start dockerd"
D=$(mktemp -d /tmp/fnci-docker.XXXXXX)
DOCKERD_PID=""
DATA_ROOT=""
CONTAINER=""
stop_dockerd() {
    if [ -n "$CONTAINER" ]; then
        "$DOCKER" rm -f "$CONTAINER" >/dev/null 2>&1 || true
    fi
    if [ -n "$DOCKERD_PID" ]; then
        stop_pid "$DOCKERD_PID" 30
        wait "$DOCKERD_PID" 2>/dev/null || true
    fi
    # dockerd stops the containerd it started; if it could not, stop that one too (by its PID).
    local cpid
    cpid=$(cat "$D/exec/containerd/containerd.pid" 2>/dev/null || true)
    if [ -n "$cpid" ] && kill -0 "$cpid" 2>/dev/null; then stop_pid "$cpid" 10; fi
    # Leftover mounts under the temp dir (deepest first), then the dir itself.
    local dir
    for dir in "$D" $DATA_ROOT; do
        awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r | while read -r m; do umount -l "$m" || true; done
    done
    rm -rf "$D"
}
on_exit stop_dockerd
echo '{}' > "$D/daemon.json"
# FASTERNET_CI_DOCKER_DATA: keep dockerd's data root (images, build cache) there between runs,
# for fast local reruns; CI leaves it unset and starts from an empty data root.
DATA_ROOT=${FASTERNET_CI_DOCKER_DATA:-$D/data}
mkdir -p "$DATA_ROOT"
# HTTP(S)_PROXY at a closed port: any attempt to pull from a registry fails at once, so the
# build provably runs from the local base images only.
HTTP_PROXY=http://127.0.0.1:9 HTTPS_PROXY=http://127.0.0.1:9 NO_PROXY="" \
    "$DOCKERD" --config-file "$D/daemon.json" --data-root "$DATA_ROOT" --exec-root "$D/exec" \
    --pidfile "$D/dockerd.pid" -H "unix://$D/docker.sock" --storage-driver=overlay2 \
    --iptables=false --ip-masq=false --bridge=none --log-level=warn >"$D/dockerd.log" 2>&1 &
DOCKERD_PID=$!
export DOCKER_HOST="unix://$D/docker.sock"
deadline=$((SECONDS + 60))
until "$DOCKER" version >/dev/null 2>&1; do
    if ! kill -0 "$DOCKERD_PID" 2>/dev/null || (( SECONDS > deadline )); then
        tail -n 30 "$D/dockerd.log" >&2
        die "dockerd did not come up"
    fi
    sleep 0.5
done
log "dockerd pid $DOCKERD_PID, $("$DOCKER" version --format 'server {{.Server.Version}}, API {{.Server.APIVersion}}'), storage $("$DOCKER" info --format '{{.Driver}}')"

# ---- 2. base images ----------------------------------------------------------------------
step "base images (debootstrap + docker import)"
MIRROR=$(python3 - "$SUITE" <<'PY'
import glob, re, sys
suite = sys.argv[1]
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        m = re.match(r"deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line.split("#")[0].strip())
        if m and m.group(2) == suite and re.match(r"(https?|file):", m.group(1)):
            print(m.group(1)); sys.exit()
for path in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
    for stanza in re.split(r"\n\s*\n", open(path).read()):
        f = {}
        for line in stanza.splitlines():
            if ":" in line and not line.lstrip().startswith("#"):
                k, v = line.split(":", 1)
                f[k.strip().lower()] = v.split()
        if ("deb" in f.get("types", []) and suite in f.get("suites", []) and f.get("enabled", ["yes"])[0] != "no"):
            for uri in f.get("uris", []):
                if re.match(r"(https?|file):", uri):
                    print(uri); sys.exit()
PY
)
[ -n "$MIRROR" ] || die "no $SUITE mirror in /etc/apt/sources.list(.d)"
SYSROOT=$(rustc --print sysroot)
HOST_TRIPLE=$(rustc -vV | sed -n 's/^host: //p')
RUST_VERSION=$(rustc -V | awk '{print $2}')
mkdir -p "$FASTERNET_CI_CACHE/debootstrap"
RUNTIME_TAR="$FASTERNET_CI_CACHE/rootfs-$SUITE-slim-r$RECIPE.tar"
RUST_TAR="$FASTERNET_CI_CACHE/rootfs-$SUITE-rust-$RUST_VERSION-$HOST_TRIPLE-r$RECIPE.tar"
log "mirror $MIRROR; toolchain $RUST_VERSION ($HOST_TRIPLE) from $SYSROOT"

# make_rootfs DIR [debootstrap options...]: a minbase bookworm, trimmed like the -slim images.
make_rootfs() {
    local dir=$1; shift
    log "debootstrap $SUITE into $dir $*"
    if ! debootstrap --variant=minbase --cache-dir="$FASTERNET_CI_CACHE/debootstrap" "$@" \
            "$SUITE" "$dir" "$MIRROR" >"$dir.log" 2>&1; then
        tail -n 30 "$dir.log" >&2
        die "debootstrap failed"
    fi
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/var/log/*.log
}
pack_rootfs() { # DIR TARBALL
    tar --numeric-owner -C "$1" -cf "$2.partial" . && mv "$2.partial" "$2"
    log "cached $2 ($(du -h "$2" | cut -f1))"
}
if [ ! -f "$RUNTIME_TAR" ]; then
    make_rootfs "$D/rootfs-runtime"
    pack_rootfs "$D/rootfs-runtime" "$RUNTIME_TAR"
    rm -rf "$D/rootfs-runtime"
else
    log "cached: $RUNTIME_TAR"
fi
if [ ! -f "$RUST_TAR" ]; then
    make_rootfs "$D/rootfs-rust" --include=gcc,libc6-dev,ca-certificates,nasm
    # The host's toolchain: rustc, cargo, their shared libraries and the host target's std
    # (lib/rustlib/<host> also holds rust-lld, the default linker of x86_64 Linux since 1.90).
    mkdir -p "$D/rootfs-rust/usr/local/rust/bin" "$D/rootfs-rust/usr/local/rust/lib/rustlib" "$D/rootfs-rust/usr/local/cargo"
    cp -a "$SYSROOT/bin/rustc" "$SYSROOT/bin/cargo" "$D/rootfs-rust/usr/local/rust/bin/"
    cp -a "$SYSROOT"/lib/*.so* "$D/rootfs-rust/usr/local/rust/lib/"
    cp -a "$SYSROOT/lib/rustlib/$HOST_TRIPLE" "$D/rootfs-rust/usr/local/rust/lib/rustlib/"
    pack_rootfs "$D/rootfs-rust" "$RUST_TAR"
    rm -rf "$D/rootfs-rust"
else
    log "cached: $RUST_TAR"
fi
STD_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
"$DOCKER" import --change "ENV PATH=$STD_PATH" --change 'CMD ["/bin/bash"]' \
    "$RUNTIME_TAR" "$RUNTIME_BASE" >/dev/null
"$DOCKER" import --change "ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:$STD_PATH" \
    --change "ENV CARGO_HOME=/usr/local/cargo" --change 'CMD ["/bin/bash"]' \
    "$RUST_TAR" "$RUST_BASE" >/dev/null
"$DOCKER" run --rm --pull=never --network=none "$RUST_BASE" sh -ec \
    'rustc -V; cargo -V; cd /tmp; echo "fn main() { println!(\"toolchain ok\"); }" > t.rs; rustc -O t.rs -o t; ./t'
"$DOCKER" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep '^local/' >&2

# ---- 3. vendor + build -------------------------------------------------------------------
step "cargo vendor"
VENDOR_CREATED=0
[ -d vendor ] || VENDOR_CREATED=1
remove_vendor() { if [ "$VENDOR_CREATED" = 1 ] && [ "${FASTERNET_CI_KEEP_VENDOR:-0}" != 1 ]; then rm -rf "$ROOT/vendor"; fi; }
on_exit remove_vendor
# From cargo's local cache when it has every crate (e.g. after `cargo test`), else crates.io.
if ! cargo vendor --locked --offline vendor >/dev/null 2>"$D/vendor.log"; then
    log "offline vendoring failed ($(grep -m1 -i 'error\|offline' "$D/vendor.log" | sed 's/^ *//')); fetching from crates.io"
    cargo vendor --locked vendor >/dev/null 2>"$D/vendor.log" || { tail -n 20 "$D/vendor.log" >&2; die "cargo vendor failed"; }
fi
log "vendor/: $(find vendor -mindepth 1 -maxdepth 1 -type d | wc -l) crates, $(du -sh vendor | cut -f1)"

step "docker build --network=none"
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
BUILD_ARGS=(--network=none --pull=false --build-arg "RUST_IMAGE=$RUST_BASE" --build-arg "RUNTIME_IMAGE=$RUNTIME_BASE" --build-arg "VERSION=$VERSION" -t "$IMAGE" -f Dockerfile .)
if [ "$BUILDKIT" = 1 ]; then BUILD_ARGS=(--progress=plain "${BUILD_ARGS[@]}"); fi
log "DOCKER_BUILDKIT=$BUILDKIT docker build ${BUILD_ARGS[*]}"
# The full log goes to $D/build.log; the console gets it without cargo's per-crate lines.
set +e
DOCKER_BUILDKIT=$BUILDKIT "$DOCKER" build "${BUILD_ARGS[@]}" 2>&1 | tee "$D/build.log" | grep --line-buffered -v -E '^(#[0-9]+ [0-9.]+ +)? *(Compiling|Checking|Downloaded|Vendoring) '
BUILD_RC=${PIPESTATUS[0]}
set -e
[ "$BUILD_RC" = 0 ] || die "docker build failed (exit $BUILD_RC, see above)"
"$DOCKER" image inspect "$IMAGE" >/dev/null || die "docker build produced no $IMAGE"
log "$IMAGE: $(( $("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE") / 1000000 )) MB"

# ---- 4. checks ---------------------------------------------------------------------------
step "image metadata"
"$DOCKER" image inspect -f '{{json .Config}}' "$IMAGE" > "$D/config.json"
python3 - "$D/config.json" "$UID_EXPECTED" "$VERSION" <<'PY' || die "image metadata"
import json, sys
c = json.load(open(sys.argv[1]))
want_uid, want_version = sys.argv[2:4]
problems = []
labels = c.get("Labels") or {}
want_labels = {"org.opencontainers.image.title": "fasternet-serve",
               "org.opencontainers.image.version": want_version,
               "org.opencontainers.image.licenses": "MIT"}
for key, value in want_labels.items():
    if labels.get(key) != value:
        problems.append(f"label {key} is {labels.get(key)!r}, expected {value!r}")
user = c.get("User") or ""
uid = user.split(":")[0]
if not uid.isdigit() or uid == "0":
    problems.append(f"USER {user!r} is not a numeric non-root UID")
elif uid != want_uid:
    problems.append(f"USER {user!r}, expected {want_uid}")
ports = list(c.get("ExposedPorts") or {})
if "8080/tcp" not in ports:
    problems.append("8080/tcp not exposed")
hc = (c.get("Healthcheck") or {}).get("Test") or []
if not hc or hc[0] != "CMD" or "healthcheck" not in " ".join(hc):
    problems.append(f"HEALTHCHECK {hc}")
stop = c.get("StopSignal")
if stop != "SIGTERM":
    problems.append(f"STOPSIGNAL {stop}")
ep = c.get("Entrypoint") or []
if ep != ["/usr/local/bin/fasternet-serve"]:
    problems.append(f"ENTRYPOINT {ep} (expected the exec form)")
wd = c.get("WorkingDir")
if wd != "/app":
    problems.append(f"WORKDIR {wd}")
env = dict(e.split("=", 1) for e in c.get("Env") or [])
if "FASTERNET_THREADS" in env:
    problems.append("FASTERNET_THREADS is baked into the image")
print(f"User={user} ExposedPorts={ports} StopSignal={stop} Entrypoint={ep} Cmd={c.get('Cmd')} WorkingDir={wd}")
print(f"Healthcheck={hc}")
print(f"Labels={labels}")
for p in problems:
    print("PROBLEM:", p)
sys.exit(1 if problems else 0)
PY

step "CLI inside the image"
python3 deploy/ci/loadgen.py --url unused --fashion-mnist 8 --save "$D/images" >/dev/null
chmod -R a+rX "$D/images"
"$DOCKER" run --rm --pull=never --network=none "$IMAGE" --version
# Runs as the image's user, reads the baked-in model: prints the top label of 8 Fashion-MNIST test images.
"$DOCKER" run --rm --pull=never --network=none --read-only -v "$D/images:/images:ro" "$IMAGE" \
    classify --top-k 1 --json /images/fashion-mnist-0000{0..7}.png > "$D/classify.jsonl" || die "classify in the container failed"
python3 - "$D/classify.jsonl" "$D/images/classes.txt" <<'PY' || die "classify output"
import json, sys
truth = dict(l.split() for l in open(sys.argv[2]) if len(l.split()) == 2)
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{len(rows)} images classified in the container; first: {json.dumps(rows[0])[:200]}")
assert len(rows) == 8, rows
PY

step "run the server container"
PORT=$(free_port)
CONTAINER=fasternet-ci-$$
BASE_URL="http://127.0.0.1:$PORT"
# --network=host: this dockerd has no bridge. FASTERNET_HOST keeps it on loopback. The CPU limit
# is what the server must size its thread pool by; the rest mirrors the Kubernetes pod spec.
"$DOCKER" run -d --pull=never --name "$CONTAINER" --network=host \
    -e FASTERNET_HOST=127.0.0.1 -e FASTERNET_PORT="$PORT" -e FASTERNET_LOG_FORMAT=json \
    --cpus "$CPUS" --memory 1g --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    --health-interval 2s --stop-timeout $((GRACE + 15)) "$IMAGE" >/dev/null
container_logs() { "$DOCKER" logs --tail "${1:-40}" "$CONTAINER" 2>&1 | sed 's/^/  container: /' >&2; }
logs_on_failure() { if [ -n "$CONTAINER" ] && [ "$EXIT_RC" != 0 ]; then container_logs 60; fi; }
on_exit logs_on_failure
deadline=$((SECONDS + 120))
until [ "$(http_status "$BASE_URL/readyz")" = 200 ]; do
    if [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$CONTAINER")" != true ]; then
        die "the container exited ($("$DOCKER" inspect -f 'exit code {{.State.ExitCode}}' "$CONTAINER")) before /readyz answered 200"
    fi
    (( SECONDS < deadline )) || die "/readyz not 200 after 120 s"
    sleep 0.5
done
log "ready on $BASE_URL"

step "HTTP checks"
[ "$(http_status "$BASE_URL/healthz")" = 200 ] || die "/healthz is not 200"
log "/v1/models: $(http_get "$BASE_URL/v1/models" | head -c 300)"
python3 deploy/ci/loadgen.py --url "$BASE_URL" --fashion-mnist 40 --requests 40 --concurrency 4 \
    --max-seconds 60 --min-accuracy 0.7 --print-first --label classify || die "POST /classify"
METRICS=$(http_get "$BASE_URL/metrics")
for m in fasternet_http_requests_total fasternet_queue_depth fasternet_batch_size fasternet_inference_duration_seconds fasternet_queue_wait_seconds; do
    grep -q "^$m" <<<"$METRICS" || die "/metrics lacks $m"
done
log "/metrics: $(grep -c '^fasternet_' <<<"$METRICS") fasternet_* samples; $(grep '^fasternet_http_requests_total' <<<"$METRICS" | grep 'classify' | head -n2 | tr '\n' ' ')"

step "container health, user, threads"
deadline=$((SECONDS + 60))
until [ "$("$DOCKER" inspect -f '{{.State.Health.Status}}' "$CONTAINER")" = healthy ]; do
    (( SECONDS < deadline )) || die "Docker health status: $("$DOCKER" inspect -f '{{json .State.Health}}' "$CONTAINER")"
    sleep 1
done
log "docker health: healthy (the image's HEALTHCHECK, run every 2 s here)"
uid=$("$DOCKER" exec "$CONTAINER" id -u)
[ "$uid" = "$UID_EXPECTED" ] || die "the server runs as UID $uid"
"$DOCKER" top "$CONTAINER" -o uid,pid,args >&2
log "the server runs as UID $uid (non-root)"
threads=$("$DOCKER" logs "$CONTAINER" 2>&1 | grep -o '"threads":[0-9]*' | head -n1 | cut -d: -f2 || true)
if [ -z "$threads" ]; then
    log "WARNING: no \"threads\" field in the server's JSON log; cannot check threads against --cpus $CPUS"
elif [ "$threads" != "$CPUS" ]; then
    die "the server uses $threads threads under --cpus $CPUS"
else
    log "threads = $threads = the container's CPU limit (--cpus $CPUS)"
fi

step "docker stop (SIGTERM)"
t0=${EPOCHREALTIME/./}
"$DOCKER" stop -t $((GRACE + 15)) "$CONTAINER" >/dev/null
dt=$(( ${EPOCHREALTIME/./} - t0 ))
code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$CONTAINER")
oom=$("$DOCKER" inspect -f '{{.State.OOMKilled}}' "$CONTAINER")
container_logs 5
[ "$code" = 0 ] || die "exit code $code after SIGTERM (OOMKilled=$oom)"
(( dt < GRACE * 1000000 )) || die "took $(_usecs_to_s "$dt")s to stop (drain period ${GRACE}s)"
log "stopped cleanly: exit code 0 after $(_usecs_to_s "$dt")s (< ${GRACE}s)"
"$DOCKER" rm "$CONTAINER" >/dev/null
CONTAINER=""

timing_summary
log "docker.sh: OK"
