#!/usr/bin/env bash
# Build the kata-rs guest image: a Debian kernel and an initramfs whose PID 1 is criu-bridge.
#
# Everything comes from Debian packages fetched with `apt-get download` and unpacked with `dpkg -x`
# into a staging sysroot; nothing is installed on the host. The mirror is the one the host's own
# apt configuration uses; the suite is a setting.
#
# Usage: configs/guest/build.sh --agent PATH [--suite bookworm|trixie] [--kernel-pkg NAME] [--out DIR] [--cache DIR]
# Output: OUT/vmlinux (uncompressed, PVH entry), OUT/initramfs.cpio (uncompressed), OUT/test-rootfs/ (busybox rootfs for tests),
#         OUT/manifest.txt (package versions), OUT/inputs.sha256 (cache key).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
SUITE=${KATA_RS_GUEST_SUITE:-bookworm}
KERNEL_PKG=${KATA_RS_GUEST_KERNEL_PKG:-}
OUT=
AGENT=
CACHE=${KATA_RS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kata-rs}
while [ $# -gt 0 ]; do
  case "$1" in
    --suite) SUITE=$2; shift 2 ;;
    --kernel-pkg) KERNEL_PKG=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --agent) AGENT=$2; shift 2 ;;
    --cache) CACHE=$2; shift 2 ;;
    *) echo "build.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ -n "$AGENT" ] || { echo "build.sh: --agent PATH (the criu-bridge binary) is required" >&2; exit 2; }
[ -x "$AGENT" ] || { echo "build.sh: agent binary '$AGENT' is missing: run 'cargo build --release -p criu-bridge'" >&2; exit 2; }
OUT=${OUT:-build/guest/$SUITE}
mkdir -p "$OUT" "$CACHE"
OUT=$(cd "$OUT" && pwd)
log() { echo "[guest-image] $*" >&2; }

for tool in apt-get dpkg depmod cpio gzip readelf strip xz zstd; do
  command -v "$tool" >/dev/null || { echo "build.sh: '$tool' not found: run 'make setup'" >&2; exit 2; }
done

# --- private apt configuration for the chosen suite (the host's /etc/apt is left alone) ---
source "$here/apt-env.sh"

if [ -z "$KERNEL_PKG" ]; then
  KERNEL_PKG=$(apt-cache "${APTO[@]}" depends linux-image-amd64 | sed -n 's/^[[:space:]]*Depends: \(linux-image-[0-9][^ ]*\)$/\1/p' | head -1)
  [ -n "$KERNEL_PKG" ] || { echo "build.sh: cannot resolve the kernel package of $SUITE" >&2; exit 2; }
fi
case "$KERNEL_PKG" in *cloud*) echo "build.sh: $KERNEL_PKG is a cloud kernel without 9p; use the generic linux-image-*-amd64" >&2; exit 2 ;; esac

# --- userspace package closure (without what only maintainer scripts need) ---
ROOTS="busybox-static criu runc tar iproute2 iptables libc6 libgcc-s1"
PKGS=$(apt-cache "${APTO[@]}" depends --recurse --no-recommends --no-suggests --no-conflicts --no-breaks \
        --no-replaces --no-enhances $ROOTS | grep -E '^[a-z0-9]' | sort -u |
       grep -vE '^(perl|perl-base|perl-modules-.*|libperl.*|python3.*|libpython3.*|dpkg|debconf|cdebconf|install-info|mailcap|mime-support|media-types|sgml-base|readline-common|netbase|libdebian-installer4|libnewt.*|libslang2|libtextwrap1)$')
for p in $PKGS "$KERNEL_PKG"; do
  v=$(apt-cache "${APTO[@]}" policy "$p" | sed -n 's/^[[:space:]]*Candidate:[[:space:]]*//p')
  [ -n "$v" ] && [ "$v" != "(none)" ] || { echo "build.sh: package $p has no candidate in $SUITE" >&2; exit 2; }
  echo "$p=$v"
done > "$OUT/manifest.new"

# --- cache key: the manifest, this script, and the agent binary ---
KEY=$( { cat "$OUT/manifest.new"; sha256sum "$0" "$AGENT" | cut -d' ' -f1; echo "$SUITE $KERNEL_PKG"; } | sha256sum | cut -d' ' -f1)
if [ -f "$OUT/inputs.sha256" ] && [ "$(cat "$OUT/inputs.sha256")" = "$KEY" ] && [ -f "$OUT/initramfs.cpio" ] && [ -f "$OUT/vmlinux" ]; then
  log "up to date: $OUT"
  rm -f "$OUT/manifest.new"
  exit 0
fi

# --- download (cached by file name, which carries the version) ---
missing=()
while IFS='=' read -r p v; do
  ev=${v//:/%3a}
  ls "$APTDIR/debs/${p}_${ev}_"*.deb >/dev/null 2>&1 || missing+=("$p=$v")
done < "$OUT/manifest.new"
if [ ${#missing[@]} -gt 0 ]; then
  log "apt-get download ${#missing[@]} packages"
  (cd "$APTDIR/debs" && apt-get "${APTO[@]}" -qq download "${missing[@]}")
fi

# --- unpack into a staging sysroot ---
WORK=$OUT/work
rm -rf "$WORK"; mkdir -p "$WORK/sysroot" "$WORK/kernel"
while IFS='=' read -r p v; do
  ev=${v//:/%3a}
  deb=$(ls "$APTDIR/debs/${p}_${ev}_"*.deb | head -1)
  if [ "$p" = "$KERNEL_PKG" ]; then dpkg -x "$deb" "$WORK/kernel"; else dpkg -x "$deb" "$WORK/sysroot"; fi
done < "$OUT/manifest.new"
S=$WORK/sysroot
KVER=$(ls "$WORK/kernel/lib/modules" 2>/dev/null || ls "$WORK/kernel/usr/lib/modules")
KMOD=$WORK/kernel/lib/modules/$KVER
[ -d "$KMOD" ] || KMOD=$WORK/kernel/usr/lib/modules/$KVER
# Compressed modules (trixie) are unpacked so that finit_module needs no decompressor in the guest.
find "$KMOD" -name '*.ko.xz' -exec xz -d -f {} +
find "$KMOD" -name '*.ko.zst' -exec zstd -q -d --rm -f {} +
depmod -b "$(dirname "$(dirname "$KMOD")")" "$KVER" 2>/dev/null || depmod -b "$WORK/kernel" "$KVER"

# --- assemble the initramfs tree ---
R=$WORK/root
mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,var/lib,lib/modules,lib64,newroot}
cp "$S/bin/busybox" "$R/bin/busybox"
for a in $("$R/bin/busybox" --list); do [ -e "$R/bin/$a" ] || ln -s busybox "$R/bin/$a"; done
# Real tools where busybox's applets are not enough for CRIU/runc.
rm -f "$R/bin/tar" "$R/bin/ip" "$R/sbin/ip"
cp "$S/bin/tar" "$R/bin/tar"
if [ -e "$S/bin/ip" ]; then cp "$S/bin/ip" "$R/bin/ip"; else cp "$S/sbin/ip" "$R/bin/ip"; fi
cp "$S/usr/sbin/criu" "$R/usr/sbin/criu"
cp "$S/usr/sbin/runc" "$R/usr/sbin/runc" 2>/dev/null || cp "$S/usr/bin/runc" "$R/usr/sbin/runc"
cp "$S/usr/sbin/xtables-nft-multi" "$R/usr/sbin/"
for t in iptables iptables-restore iptables-save ip6tables ip6tables-restore ip6tables-save; do
  ln -sf xtables-nft-multi "$R/usr/sbin/$t"
done
XT=usr/lib/x86_64-linux-gnu/xtables
mkdir -p "$R/$XT"
cp "$S/$XT"/libxt_{mark,standard,MARK,conntrack}.so "$S/$XT"/libipt_*.so "$S/$XT"/libip6t_*.so "$R/$XT/" 2>/dev/null || true
cp "$AGENT" "$R/sbin/criu-bridge"
ln -sf sbin/criu-bridge "$R/init"

# Shared libraries: resolve DT_NEEDED recursively inside the guest sysroot (never the host's).
declare -A DONE
LIBDIRS="lib/x86_64-linux-gnu usr/lib/x86_64-linux-gnu lib64 usr/lib lib"
copy_needed() {
  local elf=$1 lib d found
  for lib in $(readelf -d "$elf" 2>/dev/null | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    [ -n "${DONE[$lib]:-}" ] && continue
    found=
    for d in $LIBDIRS; do
      if [ -e "$S/$d/$lib" ]; then
        mkdir -p "$R/$d"; cp -L "$S/$d/$lib" "$R/$d/$lib"; DONE[$lib]=1; found=1
        copy_needed "$R/$d/$lib"; break
      fi
    done
    [ -n "$found" ] || { echo "build.sh: library $lib (needed by $elf) is not in the $SUITE sysroot" >&2; exit 1; }
  done
}
for elf in "$R/bin/tar" "$R/bin/ip" "$R/usr/sbin/criu" "$R/usr/sbin/runc" "$R/usr/sbin/xtables-nft-multi" "$R/sbin/criu-bridge" "$R/$XT"/*.so; do
  copy_needed "$elf"
done
# The dynamic loader, at the path the binaries ask for.
interp=$(readelf -l "$R/usr/sbin/criu" | sed -n 's/.*interpreter: \(.*\)\]/\1/p')
mkdir -p "$R$(dirname "$interp")"
cp -L "$S$interp" "$R$interp" 2>/dev/null || cp -L "$S/lib/x86_64-linux-gnu/$(basename "$interp")" "$R$interp"

# Kernel modules, in dependency order (modules.dep from depmod). Built-in ones are skipped.
WANT="virtio_pci virtio_blk virtio_console 9pnet_virtio 9p fuse virtiofs vmw_vsock_virtio_transport overlay
      unix_diag inet_diag tcp_diag udp_diag af_packet_diag netlink_diag raw_diag vsock_diag
      virtio_net veth tun bridge autofs4 crc32c_generic nf_tables nft_ct nft_compat xt_mark nf_conntrack_netlink"
declare -A SEEN; ORDER=()
resolve() {
  local m=$1 line f deps d
  line=$(grep -E "(^|/)$m\.ko:" "$KMOD/modules.dep" | head -1) || true
  if [ -z "$line" ]; then
    grep -qE "(^|/)$m\.ko$" "$KMOD/modules.builtin" 2>/dev/null && return 0
    echo "build.sh: kernel module $m is neither in modules.dep nor built in ($KERNEL_PKG)" >&2; exit 1
  fi
  f=${line%%:*}; deps=${line#*:}
  for d in $deps; do resolve "$(basename "$d" .ko)"; done
  if [ -z "${SEEN[$f]:-}" ]; then SEEN[$f]=1; ORDER+=("$f"); fi
}
for m in $WANT; do resolve "${m//-/_}"; done
: > "$R/etc/modules.order"
# Without their appended signatures (strip rewrites the ELF and drops them): verifying 47 RSA
# signatures in the guest cost most of the agent's module loads under TCG, and checks nothing the host
# needs (the modules come from the kernel package the host unpacked; the guest is not trusted anyway).
for f in "${ORDER[@]}"; do
  cp "$KMOD/$f" "$R/lib/modules/"; strip --strip-debug "$R/lib/modules/$(basename "$f")"; basename "$f" >> "$R/etc/modules.order"
done

echo 'root:x:0:0:root:/root:/bin/sh' > "$R/etc/passwd"
echo 'root:x:0:' > "$R/etc/group"
echo 'hosts: files' > "$R/etc/nsswitch.conf"
cp "$OUT/manifest.new" "$R/etc/kata-rs-guest-manifest"
mknod -m 600 "$R/dev/console" c 5 1
mknod -m 666 "$R/dev/null" c 1 3

# --- outputs ---
# Both uncompressed: under TCG the kernel's own decompression of an xz bzImage took about 4 s of a
# 13 s boot and unpacking a gzip initramfs about 2 s more; QEMU loads the bytes instead (docs/architecture.md).
(cd "$R" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet --reproducible 2>/dev/null \
   > "$OUT/initramfs.cpio.new")
# The kernel as an ELF with a PVH entry point (vmlinux): QEMU enters it directly (no real-mode setup,
# no self-decompression). Found the way linux/scripts/extract-vmlinux does: the compressed payload's
# magic, then a decompression that yields an ELF.
extract_vmlinux() { # bzImage out
  local pair magic tool pos
  for pair in '\xfd\x37\x7a\x58\x5a\x00:xz -dc' '\x28\xb5\x2f\xfd:zstd -dcq' '\x1f\x8b\x08:gzip -dc'; do
    magic=${pair%%:*}; tool=${pair#*:}
    for pos in $(LC_ALL=C grep -obUaP "$magic" "$1" | cut -d: -f1); do
      tail -c +$((pos + 1)) "$1" | $tool > "$2" 2>/dev/null || true
      readelf -h "$2" >/dev/null 2>&1 && return 0
    done
  done
  return 1
}
extract_vmlinux "$WORK/kernel/boot/vmlinuz-$KVER" "$OUT/vmlinux.new" || { echo "build.sh: no ELF kernel found in vmlinuz-$KVER" >&2; exit 2; }
# PVH entry: the Xen ELF note XEN_ELFNOTE_PHYS32_ENTRY (18).
readelf -n "$OUT/vmlinux.new" | grep -q '(0x00000012)' || { echo "build.sh: vmlinux-$KVER has no PVH entry note (CONFIG_PVH); QEMU cannot boot it directly" >&2; exit 2; }
mv "$OUT/initramfs.cpio.new" "$OUT/initramfs.cpio"
mv "$OUT/vmlinux.new" "$OUT/vmlinux"
rm -f "$OUT/initramfs.cpio.gz" "$OUT/vmlinuz"

# A busybox rootfs for tests and the demo (containers' own images come from containerd later).
TR=$OUT/test-rootfs
rm -rf "$TR"; mkdir -p "$TR"/{bin,tmp,etc,proc,sys,dev,root}
chmod 1777 "$TR/tmp"
cp "$S/bin/busybox" "$TR/bin/busybox"
for a in $("$TR/bin/busybox" --list); do [ -e "$TR/bin/$a" ] || ln -s busybox "$TR/bin/$a"; done
cp "$R/etc/passwd" "$R/etc/group" "$TR/etc/"

mv "$OUT/manifest.new" "$OUT/manifest.txt"
echo "$KVER" > "$OUT/kernel-version"
echo "$KEY" > "$OUT/inputs.sha256"
rm -rf "$WORK"
log "built $OUT: kernel $KVER, initramfs $(du -h "$OUT/initramfs.cpio" | cut -f1)"
