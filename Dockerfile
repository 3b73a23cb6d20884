# syntax=docker/dockerfile:1
# herald container image: `docker build -t herald .`, or `docker compose up` for Redis, three
# nodes and nginx (docker-compose.yml).

# ---- build ----
FROM rust:1-bookworm AS builder
WORKDIR /src
# The whole tree (see .dockerignore): Cargo needs every declared target and every workspace
# member (bench/herald-bench) to parse the manifest; only herald is built.
COPY . .
# Registry and target dir are cache mounts, so a rebuild after a source change is incremental.
# The binary is copied out in the same step because the target dir is not part of the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin herald \
    && install -m 0755 target/release/herald /usr/local/bin/herald

# ---- runtime ----
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 herald \
    && useradd --system --uid 10001 --gid herald --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin herald
COPY --from=builder /usr/local/bin/herald /usr/local/bin/herald
USER 10001:10001
ENV HERALD_LISTEN=0.0.0.0:8080
EXPOSE 8080
# SIGTERM drains: sessions are closed with 1012 within --drain-grace (30s by default), so
# give the container a longer stop timeout than that (docker-compose.yml uses 35s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/herald"]
