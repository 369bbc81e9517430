#!/usr/bin/env bash
# Unpacks containerd of Debian suite $1 (trixie: 1.7, sid: 2.x) into build/containerd-<suite>/ without
# installing it (apt-get download + dpkg -x through a private apt configuration, configs/guest/apt-env.sh).
# Prints the directory holding its `containerd`, `ctr` and (2.x) `containerd-shim-runc-v2`.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
SUITE=${1:?usage: containerd-debian.sh trixie|sid}
CACHE=${KATA_RS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kata-rs}
source "$top/configs/guest/apt-env.sh"
out=$top/build/containerd-$SUITE
ver=$(apt-cache "${APTO[@]}" policy containerd | sed -n 's/^[[:space:]]*Candidate:[[:space:]]*//p')
[ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "containerd-debian.sh: no containerd in $SUITE" >&2; exit 2; }
if [ "$(cat "$out/version" 2>/dev/null)" != "$ver" ]; then
  deb() { ls "$APTDIR/debs"/containerd_"${ver//:/%3a}"_*.deb 2>/dev/null | head -1; }
  [ -n "$(deb)" ] || (cd "$APTDIR/debs" && apt-get "${APTO[@]}" -qq download "containerd=$ver")
  rm -rf "$out"; mkdir -p "$out/x" "$out/bin"
  dpkg -x "$(deb)" "$out/x"
  for b in containerd ctr containerd-shim-runc-v2; do
    [ -e "$out/x/usr/bin/$b" ] && cp "$out/x/usr/bin/$b" "$out/bin/"
  done
  rm -rf "$out/x"
  "$out/bin/containerd" --version >&2
  echo "$ver" > "$out/version"
fi
echo "$out/bin"
