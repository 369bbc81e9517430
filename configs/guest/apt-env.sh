# Sourced: a private apt configuration for Debian suite $SUITE under $CACHE (the host's /etc/apt is
# left alone; the mirror is the one the host's apt configuration names). Defines APTDIR and APTO.
MIRROR=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$MIRROR" ] || { echo "apt-env.sh: cannot find the Debian mirror in the host's apt configuration" >&2; exit 2; }
APTDIR=$CACHE/apt-$SUITE
mkdir -p "$APTDIR"/{lists/partial,archives/partial,debs}
echo "deb $MIRROR $SUITE main" > "$APTDIR/sources.list"
APTO=(-o Dir::Etc::SourceList="$APTDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR" -o Dir::Cache::archives="$APTDIR/archives"
      -o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Architecture=amd64
      -o Acquire::Retries=3 -o APT::Sandbox::User=root)
# Refresh the package lists at most once a day.
if [ -z "$(find "$APTDIR/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  echo "[apt] apt-get update ($SUITE)" >&2
  apt-get "${APTO[@]}" -qq update
fi

