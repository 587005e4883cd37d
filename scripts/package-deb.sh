#!/usr/bin/env bash
# Builds the Debian package target/package/xks-proxy_<version>-1_<arch>.deb
# (XKS_PACKAGE_OUT) with dpkg-deb from deploy/debian/, without debhelper
# (nothing to compile here, and no debian/ source tree to keep):
#
#   /usr/bin/xks-proxy                     the release binary, debug info stripped
#                                          ($XKS_PACKAGE_BIN, else cargo build --release)
#   /lib/systemd/system/xks-proxy.service  deploy/systemd/xks-proxy.service, its
#                                          binary at /usr/bin (the package's path)
#   /etc/xks-proxy/config.toml             deploy/debian/config.toml, a conffile
#   /etc/xks-proxy/{secrets,tls}/          empty, for what the config names
#   /usr/share/doc/xks-proxy/              copyright, changelog, the annotated
#                                          production example
#
# Modes and owners (root:xks-proxy 0750 for /etc/xks-proxy and its two
# directories, 0640 for the config, xks-proxy 0700 for /var/lib/xks-proxy)
# are set by the postinst, once the user exists: deploy/debian/postinst.
# Depends: from dpkg-shlibdeps on the binary, and adduser.
# Prints the path of the .deb.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

ensure_build_packages dpkg-dev binutils
bin="$(package_bin)"
version="$(package_version "$bin")"
debversion=$version-1
arch="$(dpkg --print-architecture)"
out="$(package_out)"
maintainer=${XKS_DEB_MAINTAINER:-xks-proxy maintainers <xks-proxy@example.invalid>}
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root=$work/root

install -d -m 0755 "$root/usr/bin" "$root/lib/systemd/system" "$root/usr/share/doc/xks-proxy" "$root/DEBIAN"
strip --strip-debug -o "$root/usr/bin/xks-proxy" "$bin"
chmod 0755 "$root/usr/bin/xks-proxy"

# The unit: the repository's, with the package's binary path, and its
# header (manual installation steps) replaced by what the package did.
{
  echo "# xks-proxy as a hardened systemd service, installed by the xks-proxy package:"
  echo "# configure /etc/xks-proxy/config.toml, then systemctl enable --now xks-proxy."
  echo "# Local changes: systemctl edit xks-proxy (e.g. ReadWritePaths= for an HSM"
  echo "# client's own directories). Reload: systemctl reload xks-proxy."
  sed -n '/^\[Unit\]/,$p' deploy/systemd/xks-proxy.service | sed 's|/usr/local/bin/xks-proxy|/usr/bin/xks-proxy|g'
} >"$root/lib/systemd/system/xks-proxy.service"
if grep -q /usr/local "$root/lib/systemd/system/xks-proxy.service" ||
  ! grep -q '^ExecStart=/usr/bin/xks-proxy serve' "$root/lib/systemd/system/xks-proxy.service"; then
  echo "package-deb.sh: the unit's binary path was not rewritten to /usr/bin" >&2
  exit 1
fi
chmod 0644 "$root/lib/systemd/system/xks-proxy.service"

install -d -m 0750 "$root/etc/xks-proxy" "$root/etc/xks-proxy/secrets" "$root/etc/xks-proxy/tls"
install -m 0640 deploy/debian/config.toml "$root/etc/xks-proxy/config.toml"

doc=$root/usr/share/doc/xks-proxy
install -m 0644 deploy/debian/copyright "$doc/copyright"
install -m 0644 config/production.example.toml "$doc/production.example.toml"
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
printf '%s\n' "xks-proxy ($debversion) unstable; urgency=medium" "" \
  "  * Built from commit $revision by scripts/package-deb.sh." "" \
  " -- $maintainer  $(date -uR)" | gzip -9n >"$doc/changelog.Debian.gz"
chmod 0644 "$doc/changelog.Debian.gz"

# The shared libraries the binary needs, as Debian packages (libc6 ...);
# dpkg-shlibdeps reads the package name from a debian/control beside it.
mkdir -p "$work/debian"
printf 'Source: xks-proxy\n\nPackage: xks-proxy\nArchitecture: any\n' >"$work/debian/control"
shlibs=$(cd "$work" && dpkg-shlibdeps -O -e root/usr/bin/xks-proxy 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
[ -n "$shlibs" ] || { echo "package-deb.sh: dpkg-shlibdeps found no dependencies" >&2; exit 1; }

install -m 0755 deploy/debian/postinst deploy/debian/prerm deploy/debian/postrm "$root/DEBIAN/"
install -m 0644 deploy/debian/conffiles "$root/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$debversion|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
  -e "s|@INSTALLED_SIZE@|$size|" -e "s|@DEPENDS@|$shlibs|" deploy/debian/control.in >"$root/DEBIAN/control"
(cd "$root" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"

deb=$out/xks-proxy_${debversion}_$arch.deb
rm -f "$out"/xks-proxy_*.deb
# Files owned by root whoever builds. xz at level 1: 4.4 MB in half a
# second; the default level 6 saves 0.6 MB for 6 s of CPU on every CI run.
dpkg-deb --root-owner-group -Zxz -z1 --build "$root" "$deb" >/dev/null
echo "package-deb.sh: $deb ($(du -k "$deb" | cut -f1) KiB; installed $size KiB; Depends: $shlibs, adduser)" >&2
echo "$deb"
