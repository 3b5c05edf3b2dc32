# billsync: multi-stage build of the single binary.
#   docker build -t billsync .
#   docker run --rm -p 8080:8080 -v billsync-data:/app/data -e BILLSYNC_API__KEYS=... billsync

# cargo-chef: the dependencies are built in a layer of their own, keyed only by the manifests
# (the root's and those of the workspace members in crates/) and Cargo.lock, so that a change to
# billsync's source rebuilds billsync alone. Both `COPY . .` bring crates/ with src/ (see
# .dockerignore): the server depends on crates/billsync-rules by path.
FROM rust:1.95-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --bin billsync --recipe-path recipe.json
# config/default.toml and migrations/ are embedded into the binary at compile time.
COPY . .
RUN cargo build --release --locked --bin billsync \
    && cp target/release/billsync /usr/local/bin/billsync

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 billsync \
    && useradd --system --uid 10001 --gid billsync --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin billsync \
    && mkdir -p /app/data \
    && chown -R billsync:billsync /app
WORKDIR /app
COPY --from=builder /usr/local/bin/billsync /usr/local/bin/billsync
COPY --chown=billsync:billsync config/ /app/config/
# The default database is sqlite://data/billsync.db, relative to /app.
VOLUME /app/data
ENV BILLSYNC_LISTEN=0.0.0.0:8080
EXPOSE 8080
USER billsync
# `billsync healthcheck` asks /readyz on the `listen` address (0.0.0.0 is asked on 127.0.0.1).
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["billsync", "healthcheck", "--timeout", "3s"]
ENTRYPOINT ["billsync"]
CMD ["serve"]
