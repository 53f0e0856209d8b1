# derpfleet relay image: derpfleet-relay (DERP over HTTPS + STUN) and derpfleet-stun (standalone STUN).
#
# Build from source (needs a Rust toolchain image and crates.io):
#   podman build --format docker -t derpfleet-relay .
# Build around binaries already compiled on a bookworm (glibc 2.36) host, put in ./dist/:
#   cargo build --release --locked -p derpfleet-relay -p derpfleet-stun --bins
#   mkdir -p dist && cp target/release/derpfleet-relay target/release/derpfleet-stun dist/
#   podman build --format docker --build-arg BINARIES_FROM=prebuilt -t derpfleet-relay .
# Base images are build arguments so that offline builds can point them at locally made images
# (deploy/container/local-base-images.sh). `--format docker` keeps HEALTHCHECK (OCI has no field for it).
# Configuration, ports, volumes and the health check are described in docs/operators.md.

ARG RUST_IMAGE=docker.io/library/rust:1-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim
# Which stage supplies /out/derpfleet-*: "build" (compile here) or "prebuilt" (copy ./dist/).
ARG BINARIES_FROM=build

# --- build: compile the release binaries with the lock file as committed ---
# checkov cannot see through the build argument; its default above carries an explicit tag.
#checkov:skip=CKV_DOCKER_7:The image comes from the RUST_IMAGE build argument, whose default is tagged (rust:1-bookworm).
FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
# The cache mounts keep the crates.io download and the target dir between builds on one machine.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p derpfleet-relay -p derpfleet-stun --bins \
 && mkdir -p /out \
 && cp target/release/derpfleet-relay target/release/derpfleet-stun /out/

# --- prebuilt: binaries compiled outside the image build ---
FROM scratch AS prebuilt
COPY dist/derpfleet-relay dist/derpfleet-stun /out/

# --- binaries: whichever of the two was selected ---
FROM ${BINARIES_FROM} AS binaries

# --- runtime: Debian slim (same glibc as the build stage), no compiler, no shell tools added ---
FROM ${RUNTIME_IMAGE} AS runtime
# ca-certificates: mesh peers and -verify-client-url are reached over TLS with the system roots.
# Versions are not pinned: the base image tag fixes the Debian release, and pinning would stop the
# security updates that this package exists to deliver (hadolint DL3008).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 derper \
 && useradd --system --uid 10001 --gid derper --home-dir /var/lib/derper --create-home \
      --shell /usr/sbin/nologin derper \
 && mkdir -p /etc/derpfleet \
 && chmod 0700 /var/lib/derper
COPY --from=binaries /out/derpfleet-relay /out/derpfleet-stun /usr/local/bin/

# 443: DERP over HTTPS; 80: ACME HTTP-01, /generate_204 and redirects; 3478: STUN;
# 9090: Prometheus metrics (the relay binds it to loopback unless told otherwise).
EXPOSE 443/tcp 80/tcp 3478/udp 9090/tcp

# The node key (-c) lives here; mount a volume so the node keeps its identity across restarts.
WORKDIR /var/lib/derper
USER 10001:10001

# The image has no curl: bash's /dev/tcp asks the relay for /generate_204 (served on the HTTP port when
# TLS is on, and on the main port in plain-HTTP mode) and expects 204. Point it elsewhere with
# DERPFLEET_HEALTH_HOST / DERPFLEET_HEALTH_PORT (e.g. the -a port when -http-port is -1).
ENV DERPFLEET_HEALTH_HOST=127.0.0.1 \
    DERPFLEET_HEALTH_PORT=80
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
  CMD ["/bin/bash", "-c", "exec 3<>/dev/tcp/${DERPFLEET_HEALTH_HOST}/${DERPFLEET_HEALTH_PORT} && printf 'GET /generate_204 HTTP/1.0\\r\\nHost: localhost\\r\\n\\r\\n' >&3 && read -r -t 4 _ code _ <&3 && [ \"$code\" = 204 ]"]

# SIGTERM starts the relay's drain; the runtime's stop timeout must exceed -drain-timeout (default 5s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/derpfleet-relay"]
# Defaults only: a real node replaces them with its own flags (at least -hostname, usually -mesh-*), or with
# -config FILE mounted from the host.
CMD ["-a", ":443", "-http-port", "80", "-stun", "-stun-port", "3478", "-c", "/var/lib/derper/derper.key", \
     "-certdir", "/var/lib/derper/certs"]
