#!/usr/bin/env bash
# Runs a command with KATA_RS_CONFIG pointing at a configuration for this checkout's guest image
# (build/guest/<suite>), written to build/configuration.toml from configs/configuration.toml.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
guest=${KATA_RS_GUEST_DIR:-$top/build/guest/bookworm}
out=$top/build/configuration.toml
sed -e "s|^kernel = .*|kernel = \"$guest/vmlinux\"|" -e "s|^initrd = .*|initrd = \"$guest/initramfs.cpio\"|" \
  "$top/configs/configuration.toml" > "$out"
KATA_RS_CONFIG=$out exec "$@"
