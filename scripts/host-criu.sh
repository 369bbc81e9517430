#!/usr/bin/env bash
# Builds CRIU of Debian trixie (4.1.x) from its source tarball into build/host-criu/ and prints that
# directory: the runc baseline of `make bench` needs a CRIU that works on this host's kernel, and
# bookworm's 3.17 does not on 6.18 ("vdso: Unexpected rt vDSO area bounds"). The source comes through
# a private apt configuration (configs/guest/apt-env.sh); the build dependencies are installed from
# the host's Debian. About 3 minutes on 2 cores; cached by version.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
SUITE=trixie
CACHE=${KATA_RS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kata-rs}
source "$top/configs/guest/apt-env.sh"
out=$top/build/host-criu
src=$APTDIR/src
echo "deb-src ${MIRROR} $SUITE main" > "$APTDIR/sources-src.list"
APTS=("${APTO[@]}" -o Dir::Etc::SourceList="$APTDIR/sources-src.list")
if [ -z "$(find "$APTDIR/lists" -maxdepth 1 -name '*Sources*' -mmin -1440 2>/dev/null | head -1)" ]; then
  apt-get "${APTS[@]}" -qq update
fi
ver=$(apt-cache "${APTS[@]}" showsrc criu | sed -n 's/^Version:[[:space:]]*//p' | head -1)
[ -n "$ver" ] || { echo "host-criu.sh: no criu source in $SUITE" >&2; exit 2; }
if [ "$(cat "$out/version" 2>/dev/null)" = "$ver" ] && [ -x "$out/criu" ]; then echo "$out"; exit 0; fi
upstream=${ver#*:}; upstream=${upstream%-*}
mkdir -p "$src"
tarball=$src/criu_${upstream}.orig.tar.xz
if [ ! -f "$tarball" ]; then
  # The .dsc may be missing on the mirror; the orig tarball is enough.
  (cd "$src" && apt-get "${APTS[@]}" -qq source --download-only "criu=$ver" >/dev/null 2>&1) || true
  [ -f "$tarball" ] || { echo "host-criu.sh: $tarball was not downloaded" >&2; exit 2; }
fi
DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends \
  libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev \
  pkgconf protobuf-c-compiler protobuf-compiler python3-protobuf uuid-dev make gcc >/dev/null
work=$(mktemp -d)
tar -C "$work" -xf "$tarball"
(cd "$work"/criu-* && make -s -j"$(nproc)" criu >/dev/null)
mkdir -p "$out"
cp "$work"/criu-*/criu/criu "$out/criu"
rm -rf "$work"
echo "$ver" > "$out/version"
"$out/criu" --version >&2
echo "$out"
