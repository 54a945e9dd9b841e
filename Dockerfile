# Multi-stage build of the single `switchboard` binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY .cargo .cargo
COPY .sqlx .sqlx
COPY crates crates
COPY src src
COPY migrations migrations
COPY docs docs
# Queries are checked against the committed .sqlx/ data: no database at build time.
ENV SQLX_OFFLINE=true
RUN cargo build --release --locked --bin switchboard

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 switchboard
COPY --from=build /src/target/release/switchboard /usr/local/bin/switchboard
USER switchboard
ENV SWITCHBOARD_API_ADDR=0.0.0.0:8080 \
    SWITCHBOARD_LOG_FORMAT=json
EXPOSE 8080
ENTRYPOINT ["switchboard"]
CMD ["api"]
