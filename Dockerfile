# syntax=docker/dockerfile:1
#
# One Dockerfile, three images (the last stage, producer, is the default):
#
#   docker build --target producer -t bulkops-producer .   # HTTP API + splitter, :8080
#   docker build --target worker   -t bulkops-worker   .   # AMQP worker, /metrics on :9090
#   docker build --target migrate  -t bulkops-migrate  .   # bulkops-migrate up (then exits)
#
# Every image holds all four programs (bulkops-producer, bulkops-worker, bulkops-migrate and
# the operator CLI `bulkops`, from the bulkops-cli crate) under /usr/local/bin and config/default.toml at
# /app/config/default.toml; only the entrypoint differs, so `kubectl exec` into any pod can
# run `bulkops batch show ID`. They run as uid 10001 on a read-only root filesystem.
#
# Needs BuildKit (the default builder since Docker 23) for the cache mount.
# The CI machine has no Docker engine: this file is not built there.

ARG RUST_VERSION=1.95.0

# --- build -------------------------------------------------------------------------------
# rust-toolchain.toml pins 1.95.0: the image's toolchain is the pinned one, so rustup
# downloads no other (it may add the rustfmt/clippy components the file lists).
FROM rust:${RUST_VERSION}-bookworm AS builder
# aws-lc-sys (rustls' crypto provider) may build its C code with CMake.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# Manifests first: `cargo fetch` is its own layer, re-run only when dependencies change.
# Workspace members need their targets to be valid manifests; empty stubs stand in for the
# sources (keep this list in step with the workspace members and their [[bin]]/[[test]]).
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
COPY shared/Cargo.toml shared/
COPY migrations/Cargo.toml migrations/
COPY producer/Cargo.toml producer/
COPY worker/Cargo.toml worker/
COPY cli/Cargo.toml cli/
COPY tests/Cargo.toml tests/
RUN for stub in shared/src/lib.rs migrations/src/lib.rs migrations/src/main.rs \
                producer/src/lib.rs producer/src/main.rs cli/src/lib.rs cli/src/main.rs \
                worker/src/lib.rs worker/src/main.rs tests/src/lib.rs tests/tests/e2e/main.rs \
                tests/tests/faults/main.rs tests/tests/cluster/main.rs \
                tests/src/bin/bench.rs tests/src/bin/load.rs; do \
        mkdir -p "$(dirname "$stub")" && touch "$stub"; \
    done \
 && cargo fetch --locked
# Then the sources. Compiled artefacts persist across builds in a BuildKit cache mount
# (so the binaries are copied out of it, to /out).
COPY . .
RUN --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --offline -p bulkops-migrations -p bulkops-producer -p bulkops-worker -p bulkops-cli \
 && mkdir -p /out \
 && cp target/release/bulkops-migrate target/release/bulkops-producer \
       target/release/bulkops-worker target/release/bulkops /out/

# --- runtime -----------------------------------------------------------------------------
# glibc, libgcc and CA certificates, nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /out/ /usr/local/bin/
COPY config/default.toml /app/config/default.toml
# The programs read config/default.toml relative to the working directory.
WORKDIR /app
USER 10001:10001

FROM runtime AS migrate
ENTRYPOINT ["/usr/local/bin/bulkops-migrate"]
CMD ["up"]

FROM runtime AS worker
# Listen on every interface inside the container (the built-in default is loopback).
ENV BULKOPS__METRICS__BIND=0.0.0.0:9090
EXPOSE 9090
ENTRYPOINT ["/usr/local/bin/bulkops-worker"]

FROM runtime AS producer
ENV BULKOPS__HTTP__BIND=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/bulkops-producer"]
