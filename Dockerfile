# api-notify container image.
#   docker build -t api-notify .
#   docker run --rm -p 8080:8080 \
#     -e API_NOTIFY__API__TOKENS='[{name = "me", sha256 = "<hex>", partners = ["*"]}]' api-notify
# runs embedded mode (SQLite in /var/lib/api-notify). The image listens on 0.0.0.0, so the API
# needs tokens (`api-notify token new` makes one); without them the gateway refuses to start.
# examples/compose.yaml runs the production path (Kafka, MySQL 8) with this image.

# Build stage: librdkafka is compiled from source by rdkafka-sys, which needs a C toolchain.
FROM rust:1.95-slim-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ make perl pkg-config zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin api-notify \
    && cp target/release/api-notify /usr/local/bin/api-notify

# Runtime stage: the binary, CA certificates for TLS to partners, and an unprivileged user.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 api-notify \
    && useradd --system --uid 10001 --gid api-notify --home-dir /var/lib/api-notify \
        --create-home --shell /usr/sbin/nologin api-notify
COPY --from=build /usr/local/bin/api-notify /usr/local/bin/api-notify
WORKDIR /var/lib/api-notify
ENV API_NOTIFY__API__LISTEN=0.0.0.0:8080
EXPOSE 8080
USER api-notify
ENTRYPOINT ["/usr/local/bin/api-notify"]
CMD ["serve"]
