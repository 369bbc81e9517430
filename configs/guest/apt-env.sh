# Sourced: a private apt configuration for Debian suite $SUITE under $CACHE (the host's /etc/apt is
# left alone; the mirror is the one the host's apt configuration names). Defines APTDIR and APTO.
MIRROR=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep -v security | head -1)
[ -n "$MIRROR" ] || MIRROR=$(awk '$1=="deb" && $0 !~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$MIRROR" ] || { echo "apt-env.sh: cannot find the Debian mirror in the host's apt configuration" >&2; exit 2; }
# Debian's security archive, as the host's apt configuration names it (the main mirror's
# debian-security next to it otherwise).
SECURITY=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null | grep security | head -1)
[ -n "$SECURITY" ] || SECURITY=$(awk '$1=="deb" && $0 ~ /security/ {print $2; exit}' /etc/apt/sources.list 2>/dev/null)
[ -n "$SECURITY" ] || SECURITY=${MIRROR%/debian}/debian-security
APTDIR=$CACHE/apt-$SUITE
mkdir -p "$APTDIR"/{lists/partial,archives/partial,debs}
# A stable suite with its security and updates suites (what a Debian system of that release installs);
# sid and experimental have neither.
{
  echo "deb $MIRROR $SUITE main"
  case "$SUITE" in
    sid|unstable|experimental) ;;
    *) echo "deb $MIRROR $SUITE-updates main"; echo "deb $SECURITY $SUITE-security main" ;;
  esac
} > "$APTDIR/sources.list.new"
# Changed sources: the lists are fetched again.
if ! cmp -s "$APTDIR/sources.list.new" "$APTDIR/sources.list"; then
  rm -f "$APTDIR/lists/"*Packages* 2>/dev/null || true
fi
mv "$APTDIR/sources.list.new" "$APTDIR/sources.list"
APTO=(-o Dir::Etc::SourceList="$APTDIR/sources.list" -o Dir::Etc::SourceParts=/dev/null
      -o Dir::State::Lists="$APTDIR/lists" -o Dir::Cache="$APTDIR" -o Dir::Cache::archives="$APTDIR/archives"
      -o Dir::State::status=/dev/null -o Debug::NoLocking=1 -o APT::Architecture=amd64
      -o Acquire::Retries=3 -o APT::Sandbox::User=root)
# Refresh the package lists at most once a day.
if [ -z "$(find "$APTDIR/lists" -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
  echo "[apt] apt-get update ($SUITE)" >&2
  apt-get "${APTO[@]}" -qq update
fi

