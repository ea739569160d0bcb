# Multi-stage build: compile with the full Rust toolchain, ship only the binary
# on a small Debian base, running as an unprivileged user.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin icerelay

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin icerelay
COPY --from=build /src/target/release/icerelay /usr/local/bin/icerelay
USER 10001
# 9181: the catalog proxy; 9182: the admin listener (health, readiness, metrics).
EXPOSE 9181 9182
ENTRYPOINT ["icerelay"]
CMD ["serve", "--config", "/etc/icerelay/icerelay.toml", "--listen", "0.0.0.0:9181", "--admin-listen", "0.0.0.0:9182"]
