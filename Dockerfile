# Keel: a slim runtime image with the binary, no toolchain.
#
#   docker build -t keel .                                  # the server
#   docker build --target model -t keel-model .             # the init step that fetches the model
#   docker run -p 50051:50051 -p 8080:8080 -p 9464:9464 --stop-timeout 30 \
#       -v $PWD/models:/models keel                         # model mounted at /models
#
# Flight on 50051, the HTTP front (OpenAI, TEI) on 8080, metrics on 9464. A stop drains
# open streams for server.shutdown_grace_ms (10 s) and then the work queued: give it
# longer than docker's default 10 s (--stop-timeout 30).
#
# The release build carries the GPU backend (feature gpu); the image runs the CPU backend
# unless a Vulkan driver is added (mesa-vulkan-drivers, or the NVIDIA container toolkit).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin keel && cp target/release/keel /keel && strip /keel

# The model fetcher (an init container): downloads all-MiniLM-L6-v2 into /models.
FROM python:3.12-slim AS model
COPY scripts/fetch-model.sh /opt/keel/fetch-model.sh
ENV KEEL_MODEL_DIR=/models/all-MiniLM-L6-v2 KEEL_FETCH_CACHE_DIR=/tmp/keel-cache
ENTRYPOINT ["/opt/keel/fetch-model.sh"]

FROM debian:bookworm-slim AS runtime
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates libvulkan1 >/dev/null \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/keel --create-home keel
COPY --from=build /keel /usr/local/bin/keel
COPY configs/default.yaml /etc/keel/keel.yaml
# In a container: listen on every interface, models and data in volumes.
ENV KEEL_SERVER__LISTEN=0.0.0.0:50051 \
    KEEL_HTTP__LISTEN=0.0.0.0:8080 \
    KEEL_METRICS__LISTEN=0.0.0.0:9464 \
    KEEL_EMBEDDER__MODEL_DIR=/models/all-MiniLM-L6-v2 \
    KEEL_STORAGE__DATA_DIR=/var/lib/keel/data
USER keel
WORKDIR /var/lib/keel
EXPOSE 50051 8080 9464
# SIGTERM drains open streams for server.shutdown_grace_ms.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/keel"]
CMD ["serve", "--config", "/etc/keel/keel.yaml"]
