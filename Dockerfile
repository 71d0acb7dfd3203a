# syntax=docker/dockerfile:1
#
# Tiergate's container image: one static-ish binary on distroless, as an ECS Fargate task
# runs it. Build for the platform you deploy on; nothing here is tied to one:
#
#   docker build -t tiergate .                                   # this machine's arch
#   docker buildx build --platform linux/amd64,linux/arm64 -t REPO/tiergate:TAG --push .
#
# Each platform is compiled natively (or under QEMU emulation with buildx), so the Rust
# stages need no cross toolchain. Layers:
#   chef     the Rust toolchain plus cargo-chef
#   planner  reduces the workspace to its dependency graph (recipe.json)
#   builder  builds the dependencies from the recipe (cached while Cargo.lock and the
#            manifests are unchanged), then the workspace itself
#   runtime  distroless: glibc, CA certificates, a non-root user, and the binary

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-slim-${DEBIAN} AS chef
# cargo-chef comes from crates.io, pinned, with its own lock file.
RUN cargo install cargo-chef --version 0.1.78 --locked
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json -p gateway --bin tiergate
COPY . .
# The commit for --version and /health (build-info/build.rs): .git is not in the build
# context, so pass it in:
#   docker build --build-arg TIERGATE_COMMIT="$(git rev-parse --short=12 HEAD)" .
ARG TIERGATE_COMMIT=unknown
ENV TIERGATE_COMMIT=${TIERGATE_COMMIT}
RUN cargo build --release --locked -p gateway --bin tiergate \
    && install -m 0755 target/release/tiergate /usr/local/bin/tiergate \
    && /usr/local/bin/tiergate --version

# cc: glibc and libgcc for the Rust binary; CA certificates for TLS to RDS and
# ElastiCache; user 65532 (nonroot). No shell, no package manager, no curl.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
COPY --from=builder /usr/local/bin/tiergate /usr/local/bin/tiergate
# The RDS certificate authorities (all regions, all CA generations), for
# sslmode=verify-full against Aurora: TIERGATE_DATABASE__CA_FILE names this file
# (deploy/ecs/task-definition.json, deploy/terraform). Fetched over HTTPS from AWS at
# build time; AWS adds CAs to it, so it is not pinned by checksum.
ADD --chmod=0444 https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem /etc/ssl/rds/global-bundle.pem
COPY config/examples/fargate.toml /etc/tiergate/tiergate.toml
# Fargate defaults come from that file: public listener 0.0.0.0:8080 (the ALB target
# port), admin on loopback (the health check and sidecars reach it inside the task), JSON
# logs. They are not set as TIERGATE_* variables here, which would beat a PORT given to
# the container. The database and Redis URLs come from the environment (DATABASE_URL,
# REDIS_URL), as ECS injects secrets.
ENV TIERGATE_CONFIG=/etc/tiergate/tiergate.toml \
    RUST_LOG=info
USER 65532:65532
EXPOSE 8080
# ECS sends SIGTERM, waits stopTimeout, then SIGKILL; Tiergate drains within
# shutdown.timeout (25 s). Docker's default is SIGTERM too; said here so it stays so.
STOPSIGNAL SIGTERM
# Liveness only: an unreachable database must not get the container replaced.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/tiergate", "healthcheck", "--timeout", "2s"]
# Exec form: tiergate is PID 1 and receives the signals itself.
ENTRYPOINT ["/usr/local/bin/tiergate"]
CMD ["serve"]
