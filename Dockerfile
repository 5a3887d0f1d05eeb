# modelgate: a release build in a Rust image, run from a small Debian image as a non-root user.
# Build:  docker build -t modelgate .
# Run:    docker run -p 8080:8080 -e MODELGATE_API_KEYS=team:SECRET modelgate
# Several replicas, Redis and a load balancer: compose.yaml.

# The AWS SDK crates need Rust 1.94.1 or later.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin modelgate \
    && install -D target/release/modelgate /out/modelgate

FROM debian:bookworm-slim
# CA certificates for AWS, `rediss://` and model downloads; nothing else.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent modelgate \
    && mkdir -p /etc/modelgate /var/cache/modelgate \
    && chown 10001:10001 /var/cache/modelgate
COPY --from=build /out/modelgate /usr/local/bin/modelgate
COPY modelgate.toml /etc/modelgate/modelgate.toml
ENV MODELGATE_CONFIG=/etc/modelgate/modelgate.toml \
    MODELGATE_LISTEN=0.0.0.0:8080 \
    MODELGATE_CACHE=/var/cache/modelgate \
    MODELGATE_LOG_FORMAT=json
# The registry (mount your own modelgate.toml here) and the local models' weights.
VOLUME ["/etc/modelgate", "/var/cache/modelgate"]
# A numeric user, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["modelgate", "healthcheck"]
ENTRYPOINT ["modelgate"]
CMD ["--config", "/etc/modelgate/modelgate.toml", "--listen", "0.0.0.0:8080"]
