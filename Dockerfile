# syntax=docker/dockerfile:1
#
# One image for every resync process: `resync` (migrate, relay, consume, job, dlq, ...), `fare`
# (provisioning: topics, queues, routes) and `apisim` (the third-party API simulator of the demo
# and of docker-compose.yml).
#
#   docker build -t resync .                      # BuildKit (the default builder) is required
#   docker run --rm resync --help
#   docker run --rm --entrypoint fare resync --help
#
# The SQL migrations are compiled into the binary (`sqlx::migrate!` in migrations/), so the
# image carries no migration files: `resync migrate` is all a deployment runs.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS builder
WORKDIR /src
COPY . .
# The registry, git checkouts and target/ live in BuildKit cache mounts: a rebuild after a
# source change recompiles only what changed. Cache mounts are not part of the image, so the
# binaries are copied out of target/ inside the same RUN.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin resync --bin fare --bin apisim \
    && mkdir -p /out \
    && cp target/release/resync target/release/fare target/release/apisim /out/

FROM debian:${DEBIAN_RELEASE}-slim AS runtime
# ca-certificates: TLS to AWS, amqps://, rediss://, Postgres with sslmode and HTTPS sinks.
# bash (already in the base image) serves the HTTP health checks of docker-compose.yml.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 resync \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin resync
COPY --from=builder /out/resync /out/fare /out/apisim /usr/local/bin/
# Service config files (fare's format) are mounted here; `consume`, `job start|verify` and
# `fare` read this directory.
ENV RESYNC_CONFIG_DIR=/etc/resync/services
WORKDIR /etc/resync
USER 10001:10001
# /metrics, /healthz, /readyz: `resync relay` listens on 9464 by default, `resync consume` on
# 9465 (both `--listen` / RESYNC_LISTEN).
EXPOSE 9464 9465
ENTRYPOINT ["resync"]
CMD ["--help"]
