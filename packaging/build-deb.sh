#!/usr/bin/env bash
# Builds bulkhead_<version>_amd64.deb from release binaries with dpkg-deb (no debhelper needed).
#
#   packaging/build-deb.sh [OUTDIR]      (default OUTDIR: target/debian)
#
# Layout: the four binaries live together in /usr/libexec/bulkhead/ (the monitor finds its
# workers next to its own executable, never through PATH); /usr/bin/bulkhead is a symlink.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$top/target/debian}
bindir=${BULKHEAD_BIN_DIR:-$top/target/release}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/Cargo.toml" | head -n1)
arch=$(dpkg --print-architecture)

for b in bulkhead bulkhead-vcpu bulkhead-blockd bulkhead-netd; do
  [ -x "$bindir/$b" ] || { echo "build-deb: $bindir/$b missing: run 'cargo build --release --bins' first" >&2; exit 1; }
done

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -d "$stage/DEBIAN" "$stage/usr/libexec/bulkhead" "$stage/usr/bin" \
  "$stage/lib/systemd/system" "$stage/etc/bulkhead" "$stage/usr/share/doc/bulkhead"
for b in bulkhead bulkhead-vcpu bulkhead-blockd bulkhead-netd; do
  install -m 0755 "$bindir/$b" "$stage/usr/libexec/bulkhead/$b"
  strip --strip-debug "$stage/usr/libexec/bulkhead/$b" 2>/dev/null || true
done
ln -s ../libexec/bulkhead/bulkhead "$stage/usr/bin/bulkhead"
install -m 0644 "$top/packaging/systemd/bulkhead@.service" "$stage/lib/systemd/system/"
install -m 0644 "$top/packaging/systemd/example.conf" "$stage/etc/bulkhead/example.conf"
install -m 0644 "$top/README.md" "$stage/usr/share/doc/bulkhead/README.md"
install -m 0644 "$top/packaging/debian/copyright" "$stage/usr/share/doc/bulkhead/copyright"
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" \
  -e "s/@SIZE@/$(du -sk "$stage" | cut -f1)/" "$top/packaging/debian/control.in" > "$stage/DEBIAN/control"
install -m 0755 "$top/packaging/debian/postinst" "$stage/DEBIAN/postinst"
echo "/etc/bulkhead/example.conf" > "$stage/DEBIAN/conffiles"

mkdir -p "$out"
deb="$out/bulkhead_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >/dev/null
echo "$deb"
