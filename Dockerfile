# fasternet-serve: HTTP image classification with FasterNet (candle). See deploy/README.md.
#
#   docker build -t fasternet-serve .
#   docker run --rm -p 8080:8080 --cpus 2 --stop-timeout 40 fasternet-serve
#
# Works with BuildKit and with the classic builder (no RUN --mount, COPY --chmod or heredocs).
# Base images are build arguments so that CI can substitute locally made images
# (deploy/ci/docker.sh builds with --network=none); the defaults are the public images.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# ---- sources: the subset of the context that the dependency layer depends on --------------
# COPY cannot copy an optional path, and vendor/ exists only when crates were vendored
# (`cargo vendor`, as CI does for offline builds). So the whole context lands here and
# /deps receives Cargo.toml, Cargo.lock, build.rs with proto/ (the gRPC code it generates)
# and, when vendor/ exists, the crates plus a cargo config that points at them. The builder's
# `COPY --from=sources /deps/` is cached by content: editing src/ does not invalidate the
# dependency build below.
# weights/ goes to the builder too: the binary compiles the bundled model in.
FROM ${RUST_IMAGE} AS sources
WORKDIR /src
COPY . .
RUN set -eu; \
    mkdir -p /deps/.cargo; \
    cp Cargo.toml Cargo.lock build.rs /deps/; \
    cp -r proto /deps/proto; \
    for member in crates/*/; do mkdir -p "/deps/$member" && cp "$member/Cargo.toml" "/deps/$member"; done; \
    if [ -f .cargo/config.toml ]; then cp .cargo/config.toml /deps/.cargo/config.toml; fi; \
    if [ -d vendor ]; then \
        echo "vendor/ present: building offline from vendored crates"; \
        mv vendor /deps/vendor; \
        cat deploy/docker/cargo-vendor.toml >> /deps/.cargo/config.toml; \
    else \
        echo "no vendor/: cargo downloads crates from crates.io"; \
    fi; \
    cp -r weights /weights; \
    chmod -R u=rwX,go=rX /weights

# ---- builder -----------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /build
# nasm assembles libjpeg-turbo's SIMD code; without it (an offline build on a base image that
# lacks it) the build falls back to plain C, which decodes large JPEGs 10-20% slower.
RUN command -v nasm >/dev/null \
    || (apt-get update -qq && apt-get install -y -qq --no-install-recommends nasm=2.16.01-1 \
        && rm -rf /var/lib/apt/lists/*) \
    || echo "nasm unavailable: libjpeg-turbo without SIMD"
COPY --from=sources /deps/ ./
# Dependency layer: every crate in Cargo.lock, compiled against stub targets (empty main.rs /
# lib.rs, any other `path = "*.rs"` target in Cargo.toml, each workspace member's lib.rs).
# Rebuilt only when a Cargo.toml, Cargo.lock or the vendored crates change.
RUN set -eu; \
    for f in src/main.rs src/lib.rs $(sed -n 's/^[[:space:]]*path[[:space:]]*=[[:space:]]*"\([^"]*\.rs\)".*/\1/p' Cargo.toml) \
        $(for member in crates/*/; do echo "${member}src/lib.rs"; done); do \
        mkdir -p "$(dirname "$f")"; echo '#![allow(dead_code)] fn main() {}' > "$f"; \
    done; \
    cargo build --release --locked; \
    rm -rf src crates/*/src
COPY src/ src/
COPY crates/ crates/
# The bundled model, compiled into the binary (include_bytes!).
COPY --from=sources /weights/ weights/
# COPY keeps the files' original mtimes, which can be older than the stub build: touch them
# so cargo rebuilds these crates instead of reusing the stub's artifacts.
RUN set -eu; \
    find src crates -type f -exec touch {} +; \
    cargo build --release --locked; \
    ./target/release/fasternet-serve --version

# ---- runtime -----------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
# The release the image holds; deploy/ci/docker.sh passes Cargo.toml's version.
ARG VERSION=unknown
LABEL org.opencontainers.image.title="fasternet-serve" \
      org.opencontainers.image.description="FasterNet image classification: JSON, Open Inference Protocol (REST and gRPC), Prometheus metrics" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT"
# A numeric, non-root UID/GID, so that Kubernetes' runAsNonRoot can verify the USER.
RUN groupadd --gid 10001 fasternet \
    && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin fasternet
COPY --from=builder /build/target/release/fasternet-serve /usr/local/bin/fasternet-serve
WORKDIR /app
# The binary carries the bundled model; FASTERNET_WEIGHTS (a mounted file or directory)
# serves another. Threads are deliberately not set: the server uses the CPUs the container may
# use, CPU quota included (`docker run --cpus N`, a Kubernetes CPU limit); FASTERNET_THREADS
# overrides.
ENV FASTERNET_HOST=0.0.0.0 \
    FASTERNET_PORT=8080
USER 10001:10001
EXPOSE 8080
# SIGTERM: readiness turns 503, in-flight requests finish, exit 0 within
# FASTERNET_SHUTDOWN_GRACE_SECONDS (30 s): give `docker stop`/compose more than that
# (`--stop-timeout 40`, compose `stop_grace_period`), their default is 10 s.
STOPSIGNAL SIGTERM
# No curl in the image: the binary probes its own /readyz on FASTERNET_PORT (or
# FASTERNET_HEALTHCHECK_URL when set).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["fasternet-serve", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/fasternet-serve"]
CMD ["serve"]
