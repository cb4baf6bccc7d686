# syntax=docker/dockerfile:1
# ka agent image: `docker build -t ghcr.io/ka-project/ka-agent:0.1.0 .`
#
# The builder runs exactly what developers and CI run (`cargo xtask setup`,
# then `cargo xtask build --release`: Rust 1.95, llvm-22-dev, bpf-linker
# 0.13.0, docs/toolchain.md), so the binary in the image is the one the test
# suite exercises. The kernel programs are embedded in that one binary.

ARG RUST_VERSION=1.95.0

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
COPY . .
# xtask setup: rust-src, llvm-22-dev + libpolly-22-dev (from Debian), and
# bpf-linker 0.13.0 built against LLVM 22. Then the release build.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=ka-target \
    cargo xtask setup \
    && cargo xtask build --release \
    && install -D -m 0755 target/release/ka-agent /out/ka-agent

# glibc and libgcc only (ka-agent links nothing else); no shell, no package
# manager.
FROM gcr.io/distroless/cc-debian12 AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ka-agent" \
      org.opencontainers.image.description="Finds zombie TCP connections from the kernel (eBPF) and exports them to Prometheus" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/ka-project/ka" \
      org.opencontainers.image.url="https://github.com/ka-project/ka" \
      org.opencontainers.image.documentation="https://github.com/ka-project/ka/blob/main/deploy/README.md" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
COPY --from=builder /out/ka-agent /usr/local/bin/ka-agent
# The agent needs uid 0 with added capabilities (BPF, PERFMON, SYSLOG,
# SYS_ADMIN, SYS_PTRACE, DAC_READ_SEARCH: docs/security.md), granted by the
# DaemonSet or `docker run --cap-add`, not by the image. Non-root cannot
# work: without an ambient set, a non-zero uid loses them at exec.
USER 0:0
EXPOSE 9977
# In a container the agent must listen beyond loopback to be scraped.
ENV KA_LISTEN=0.0.0.0:9977
# No HEALTHCHECK: distroless has no shell or curl and ka-agent has no health
# subcommand. Kubernetes probes /healthz and /readyz (deploy/kubernetes);
# under plain Docker, probe http://<host>:9977/healthz from outside.
ENTRYPOINT ["/usr/local/bin/ka-agent"]
CMD ["run"]
