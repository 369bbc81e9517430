#!/usr/bin/env bash
# Installs what kata-rs needs on a Debian 12 host (idempotent; run as root). Used by `make setup`.
set -euo pipefail
log() { echo "[setup] $*" >&2; }
need_apt=()
# protoc: the tests' containerd gRPC client is generated at build time; iptables, tc, ip: CNI and the
# shim's tap/redirect plumbing; nsenter, unshare: the network tests' private namespaces.
for pair in qemu-system-x86_64:qemu-system-x86 cpio:cpio depmod:kmod readelf:binutils xz:xz-utils zstd:zstd \
            containerd:containerd runc:runc ctr:containerd socat:socat gcc:gcc \
            criu:criu protoc:protobuf-compiler iptables:iptables tc:iproute2 ip:iproute2 nsenter:util-linux unshare:util-linux; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
[ -x /usr/lib/qemu/virtiofsd ] || need_apt+=(qemu-system-common)
# CNI plugins (bridge, host-local, portmap, loopback) for the network tests and the demo.
[ -x /usr/lib/cni/bridge ] || need_apt+=(containernetworking-plugins)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "apt-get install ${need_apt[*]}"
  apt-get -o DPkg::Lock::Timeout=600 -qq update
  DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
    $(printf '%s\n' "${need_apt[@]}" | sort -u) >/dev/null
fi
# vhost-device-vsock: the hybrid-vsock agent channel where the host has no /dev/vhost-vsock.
if ! command -v vhost-device-vsock >/dev/null 2>&1; then
  log "cargo install vhost-device-vsock (about 2 minutes on 2 cores)"
  CARGO_TARGET_DIR=${KATA_RS_CACHE:-$HOME/.cache/kata-rs}/cargo-target-tools \
    cargo install --locked --quiet --root /usr/local vhost-device-vsock --version 0.3.0
fi
log "host ready: $(qemu-system-x86_64 --version | head -1); $(vhost-device-vsock --version 2>/dev/null || echo vhost-device-vsock)"
