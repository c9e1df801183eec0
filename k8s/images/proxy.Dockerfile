# ferrule-proxy: the sidecar, the gateway and the init step (`ferrule-proxy init`, which needs
# iptables in the image: both the nft and the legacy backends, chosen at run time).
# Build from the repository root:
#   docker build -f k8s/images/proxy.Dockerfile -t ferrule/proxy:0.1.0 .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferrule-proxy --bin ferrule-proxy \
    && cp target/release/ferrule-proxy /ferrule-proxy

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends iptables ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 2102 ferrule && useradd --uid 2102 --gid 2102 --no-create-home ferrule
COPY --from=build /ferrule-proxy /usr/local/bin/ferrule-proxy
# The proxy runs as 2102, the UID the iptables rules exempt from redirection; the injected
# init container overrides it with root and NET_ADMIN/NET_RAW for `ferrule-proxy init` alone.
USER 2102:2102
EXPOSE 4140 4143 4191
ENTRYPOINT ["/usr/local/bin/ferrule-proxy"]
