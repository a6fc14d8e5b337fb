# syntax=docker/dockerfile:1
# Every event-service binary on Debian slim. Migrations and the JetStream topology are embedded
# in the binaries at build time, so the runtime image needs nothing else.

FROM rust:1.95-bookworm AS builder
WORKDIR /build
# Only what the build reads: the build context may hold target/ and local data.
COPY Cargo.toml Cargo.lock build.rs ./
COPY bins bins
# The workspace's other member: only its manifest and sources, it is not built here.
COPY bench bench
COPY src src
COPY migrations migrations
COPY jetstream jetstream
COPY docs docs
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/build/target \
    cargo build --release --locked -p event-service --bins \
    && mkdir -p /out \
    && cp target/release/event-service target/release/event-gateway target/release/event-persister \
          target/release/event-processor target/release/event-dispatcher target/release/event-projector \
          target/release/event-cluster /out/

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --user-group --uid 10001 --create-home --home-dir /var/lib/event-service \
       --shell /usr/sbin/nologin event-service
COPY --from=builder /out/ /usr/local/bin/
USER event-service
WORKDIR /var/lib/event-service
# Listening on every interface needs EVENT_API_KEYS (or EVENT_ALLOW_UNAUTHENTICATED=true).
ENV EVENT_HTTP_ADDR=0.0.0.0:8230 \
    EVENT_LOG_FORMAT=json
EXPOSE 8230
# Every stage's binary is in the image (event-gateway, event-persister, event-processor,
# event-dispatcher, event-projector): override the entrypoint to run a single stage, as
# compose.yaml does. curl is there for health checks.
ENTRYPOINT ["event-service"]
