# ferrule-controller (with the injection webhook). Build from the repository root:
#   docker build -f k8s/images/controller.Dockerfile -t ferrule/controller:0.1.0 .
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends protobuf-compiler \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ferrule-controller --bin ferrule-controller \
    && cp target/release/ferrule-controller /ferrule-controller

# glibc and nothing else: no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /ferrule-controller /usr/local/bin/ferrule-controller
USER 2103:2103
EXPOSE 8086 8443 9990
ENTRYPOINT ["/usr/local/bin/ferrule-controller"]
