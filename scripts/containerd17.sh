#!/usr/bin/env bash
# Unpacks Debian trixie's containerd (1.7) into build/containerd-trixie/ without installing it.
# Prints the directory holding its `containerd` and `ctr`.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
SUITE=trixie
CACHE=${KATA_RS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/kata-rs}
source "$top/configs/guest/apt-env.sh"
out=$top/build/containerd-$SUITE
ver=$(apt-cache "${APTO[@]}" policy containerd | sed -n 's/^[[:space:]]*Candidate:[[:space:]]*//p')
[ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "containerd17.sh: no containerd in $SUITE" >&2; exit 2; }
if [ "$(cat "$out/version" 2>/dev/null)" != "$ver" ]; then
  (cd "$APTDIR/debs" && ls containerd_*.deb >/dev/null 2>&1 && [ -n "$(ls containerd_"${ver//:/%3a}"_*.deb 2>/dev/null)" ] || apt-get "${APTO[@]}" -qq download "containerd=$ver")
  rm -rf "$out"; mkdir -p "$out/x"
  dpkg -x "$(ls "$APTDIR/debs"/containerd_"${ver//:/%3a}"_*.deb | head -1)" "$out/x"
  mkdir -p "$out/bin"
  cp "$out/x/usr/bin/containerd" "$out/x/usr/bin/ctr" "$out/bin/"
  rm -rf "$out/x"
  echo "$ver" > "$out/version"
fi
echo "$out/bin"
