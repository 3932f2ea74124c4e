# syntax=docker/dockerfile:1
# flywheel: one binary, two images. The default target (`runtime`, the last stage) trains on
# CPUs; `--target gpu` builds with `--features wgpu` and adds the Vulkan loader, for worker
# pools that train on NVIDIA GPUs (the chart's pool `image.tagSuffix: -gpu`):
#   docker build -t flywheel:0.1.0 .
#   docker build --target gpu -t flywheel:0.1.0-gpu .

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# apalis' query macros must build offline and must not see a DATABASE_URL.
ENV SQLX_OFFLINE=true CARGO_TERM_COLOR=never
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p flywheel \
    && install -m 0755 target/release/flywheel /usr/local/bin/flywheel

FROM build AS build-gpu
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p flywheel --features wgpu \
    && install -m 0755 target/release/flywheel /usr/local/bin/flywheel

FROM debian:bookworm-slim AS base
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates tini \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 flywheel \
    && useradd --system --uid 10001 --gid flywheel --home-dir /var/lib/flywheel --shell /usr/sbin/nologin flywheel \
    && mkdir -p /var/lib/flywheel \
    && chown flywheel:flywheel /var/lib/flywheel
ENV FLYWHEEL_DATA_DIR=/var/lib/flywheel FLYWHEEL_LISTEN=0.0.0.0:8080
VOLUME ["/var/lib/flywheel"]
EXPOSE 8080
# tini reaps children and forwards SIGTERM, which flywheel turns into a graceful shutdown.
ENTRYPOINT ["/usr/bin/tini", "--", "flywheel"]
CMD ["serve"]

# burn-wgpu reaches NVIDIA GPUs through Vulkan: the image carries the loader, and the NVIDIA
# container toolkit mounts the driver and its Vulkan ICD when asked for the `graphics`
# capability (below; on Kubernetes the NVIDIA device plugin passes it on).
FROM base AS gpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends libvulkan1 \
    && rm -rf /var/lib/apt/lists/*
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics \
    FLYWHEEL_DEVICE=wgpu
COPY --from=build-gpu /usr/local/bin/flywheel /usr/local/bin/flywheel
USER 10001:10001

FROM base AS runtime
COPY --from=build /usr/local/bin/flywheel /usr/local/bin/flywheel
USER 10001:10001
