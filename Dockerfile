# syntax=docker/dockerfile:1
# flywheel: one binary. Build stage compiles it (CPU backend); the runtime stage is slim and
# runs as a non-root user. The Helm chart's default image is built from this file.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# apalis' query macros must build offline and must not see a DATABASE_URL.
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p flywheel \
    && install -m 0755 target/release/flywheel /usr/local/bin/flywheel

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 flywheel \
    && useradd --system --uid 10001 --gid flywheel --home-dir /var/lib/flywheel --shell /usr/sbin/nologin flywheel \
    && mkdir -p /var/lib/flywheel \
    && chown flywheel:flywheel /var/lib/flywheel
COPY --from=build /usr/local/bin/flywheel /usr/local/bin/flywheel
USER 10001:10001
ENV FLYWHEEL_DATA_DIR=/var/lib/flywheel FLYWHEEL_LISTEN=0.0.0.0:8080
VOLUME ["/var/lib/flywheel"]
EXPOSE 8080
# tini reaps children and forwards SIGTERM, which flywheel turns into a graceful shutdown.
ENTRYPOINT ["/usr/bin/tini", "--", "flywheel"]
CMD ["serve"]
