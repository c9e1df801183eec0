# One of the shop's apps: --build-arg APP=user|order|payment. Build from the repository root:
#   docker build -f k8s/images/shop.Dockerfile --build-arg APP=user -t ferrule/shop-user:0.1.0 .
FROM rust:1-bookworm AS build
ARG APP
RUN test -n "$APP" || { echo 'set --build-arg APP=user|order|payment' >&2; exit 1; }
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p "shop-$APP" --bin "shop-$APP" \
    && cp "target/release/shop-$APP" /app

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /app /usr/local/bin/app
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/app"]
