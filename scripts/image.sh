#!/usr/bin/env bash
# Builds the container images of docs/deploy.md from the release binary built
# on the host, with podman, on a Debian base made from Debian packages (no
# registry is needed, and none is reachable from CI):
#
#   localhost/xks-proxy:<version>             production (deploy/container/Containerfile):
#                                             base + the binary, non-root, no PKCS#11 library
#   localhost/xks-proxy-softhsm:<version>     production + SoftHSM's library, made with
#                                             deploy/container/Containerfile.pkcs11 exactly as
#                                             the docs' vendor-library example; what
#                                             scripts/test-image.sh runs with a mounted token.
#                                             A test image: not for publishing.
#   localhost/xks-proxy-evaluation:<version>  the above + token, demo keys, dev TLS and the
#                                             published dev credentials: EVALUATION ONLY
#
# The base: `mmdebstrap --variant=minbase` of Debian 12 with its updates and
# security updates, the user xks-proxy (10001) and /var/lib/xks-proxy, as a
# tarball cached in ~/.cache/xks-proxy (XKS_CACHE_DIR), keyed by everything
# mmdebstrap is given (suite, sources, options, hooks) and the ISO week: a
# warm run imports it (or finds it imported); a new week builds a fresh one,
# so the images pick up Debian's security updates at least weekly.
#
# The binary: $XKS_PACKAGE_BIN, else `cargo build --release --locked --bin
# xks-proxy`; copied with its debug info stripped (the release profile keeps
# line tables: 139 MB with them, 24 MB without; the symbols stay, for
# backtraces and perf).
#
# Writes the production and evaluation images as OCI archives to
# target/package/ (XKS_PACKAGE_OUT) and prints the three image names.
# Labels: XKS_SOURCE_URL (default: the clone's origin, without credentials),
# the commit (with -dirty for a modified tree), the version, the build time.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh

suite=bookworm
mirror=${XKS_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security=${XKS_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

podman_setup
ensure_build_packages binutils
bin="$(package_bin)"
version="$(package_version "$bin")"
out="$(package_out)"
cache="$(xks_cache_dir)"
mkdir -p "$cache"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The files that name image tags must name this version: the derived
# images' defaults, the Kubernetes manifest (it deploys the image as built)
# and docs/deploy.md's commands.
stale=$(grep -HnoE 'xks-proxy[-a-z]*:[0-9][0-9A-Za-z.+~-]*' deploy/container/Containerfile* \
  deploy/kubernetes/xks-proxy.yaml docs/deploy.md | grep -vF ":$version" || true)
if [ -n "$stale" ]; then
  echo "image.sh: these lines name another version than $version:" >&2
  echo "$stale" >&2
  exit 1
fi

# --- The base -----------------------------------------------------------------
# Everything that decides the tarball's content is in mm_args and sources,
# and so in the key.
mm_args=(
  --variant=minbase --format=tar
  # merged /usr as Debian 12 has it, without the usrmerge package (which
  # would pull in perl: 46 MB)
  --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr
  # No translations (stays in /etc/apt/apt.conf.d/99mmdebstrap).
  --aptopt='Acquire::Languages "none"'
  # No documentation, man pages or locales, now and in derived images
  # (the settings stay in /etc/dpkg/dpkg.cfg.d); licences stay.
  --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright'
  --dpkgopt='path-exclude=/usr/share/man/*'
  --dpkgopt='path-exclude=/usr/share/info/*'
  --dpkgopt='path-exclude=/usr/share/locale/*'
  # The proxy's user (the uid the Kubernetes manifest runs as) and its state
  # directory (the audit trail), so that the image build needs no RUN.
  --customize-hook='chroot "$1" groupadd --system --gid 10001 xks-proxy'
  --customize-hook='chroot "$1" useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/xks-proxy --no-create-home --shell /usr/sbin/nologin xks-proxy'
  --customize-hook='install -d -m 0700 -o 10001 -g 10001 "$1/var/lib/xks-proxy"'
  --customize-hook='rm -f "$1"/var/log/*.log "$1"/var/log/apt/*.log "$1"/var/cache/debconf/*-old'
  # For derived images: no package caches and no downloaded .debs kept, as in
  # Debian's own container images (after an apt-get update the caches are
  # some 70 MB in the derived image's layer). Set last, and the caches
  # removed here: mmdebstrap needs the downloads, and its own clean-up would
  # no longer know where the caches are.
  --customize-hook='printf "%s\n" "Dir::Cache::pkgcache \"\";" "Dir::Cache::srcpkgcache \"\";" "APT::Keep-Downloaded-Packages \"false\";" >"$1/etc/apt/apt.conf.d/90xks-proxy-image"; rm -f "$1"/var/cache/apt/*.bin'
)
sources=(
  "deb $mirror $suite main"
  "deb $mirror $suite-updates main"
  "deb $security $suite-security main"
)
key=$(printf '%s\n' "$suite" "${mm_args[@]}" "${sources[@]}" "$(date -u +%G-W%V)" | sha256sum | cut -c1-12)
rootfs=$cache/rootfs-$suite-$key.tar
base=localhost/xks-proxy-base:$suite-$key
(
  # One builder at a time; others wait and then find the tarball.
  flock 9
  if [ ! -f "$rootfs" ]; then
    echo "image.sh: building the $suite minbase rootfs (log: $cache/rootfs.log)" >&2
    mmdebstrap "${mm_args[@]}" "$suite" "$rootfs.tmp" "${sources[@]}" >"$cache/rootfs.log" 2>&1 ||
      { tail -30 "$cache/rootfs.log" >&2; rm -f "$rootfs.tmp"; exit 1; }
    mv "$rootfs.tmp" "$rootfs"
    # Older bases (another week, other options) are not needed any more.
    find "$cache" -maxdepth 1 -name "rootfs-*.tar" ! -name "${rootfs##*/}" -delete
  fi
) 9>"$cache/rootfs.lock"
if ! podman image exists "$base"; then
  podman import --quiet "$rootfs" "$base" >/dev/null
fi

# --- Labels -------------------------------------------------------------------
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- 2>/dev/null || revision+=-dirty
source_url=${XKS_SOURCE_URL:-$(git remote get-url origin 2>/dev/null | sed -E 's#^([a-z+]+://)[^/@]*@#\1#' || true)}
if [ -z "$source_url" ]; then
  echo "image.sh: no git remote 'origin' and no XKS_SOURCE_URL: label source=unknown" >&2
  source_url=unknown
fi
created=$(date -u +%Y-%m-%dT%H:%M:%SZ)

# --- The images ---------------------------------------------------------------
# Each build commits one layer (--layers=false): nothing intermediate stays
# behind in podman's storage. Docker format: OCI image configs have no
# HEALTHCHECK. The images the tags named before are removed at the end.
replaced=()
build() {
  local tag=$1 old
  shift
  old=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
  podman build --quiet --layers=false --format docker -t "$tag" "$@" >"$work/build.log" 2>&1 ||
    { cat "$work/build.log" >&2; exit 1; }
  if [ -n "$old" ] && [ "$old" != "$(podman image inspect --format '{{.Id}}' "$tag")" ]; then
    replaced=("$old" "${replaced[@]}")
  fi
}

prod=localhost/xks-proxy:$version
softhsm=localhost/xks-proxy-softhsm:$version
eval_image=localhost/xks-proxy-evaluation:$version

mkdir -p "$work/ctx"
strip --strip-debug -o "$work/ctx/xks-proxy" "$bin"
cp deploy/container/healthcheck "$work/ctx/healthcheck"
chmod 0755 "$work/ctx/xks-proxy" "$work/ctx/healthcheck"
build "$prod" -f deploy/container/Containerfile \
  --build-arg BASE="$base" --build-arg BASE_NAME="$base" \
  --build-arg VERSION="$version" --build-arg REVISION="$revision" \
  --build-arg SOURCE="$source_url" --build-arg CREATED="$created" \
  "$work/ctx"

# The vendor-library example with SoftHSM as the vendor: an empty pkcs11/.
mkdir -p "$work/pkcs11-ctx/pkcs11"
build "$softhsm" -f deploy/container/Containerfile.pkcs11 \
  --build-arg XKS_IMAGE="$prod" --build-arg PKCS11_PACKAGES=softhsm2 \
  --label org.opencontainers.image.title=xks-proxy-softhsm \
  --label "org.opencontainers.image.description=TEST IMAGE: the production xks-proxy image plus SoftHSM's PKCS#11 library (Containerfile.pkcs11), for CI." \
  "$work/pkcs11-ctx"

# The evaluation context: config, a fresh certificate (the CA's key is not
# kept), and the published development PIN and secrets (as scripts/dev-up.sh).
e=$work/eval-ctx/evaluation
mkdir -p "$e/tls" "$e/secrets"
cp deploy/container/evaluation/config.toml deploy/container/evaluation/softhsm2.conf "$e/"
scripts/dev-certs.sh "$work/certs" >/dev/null
cp "$work/certs/ca.crt" "$work/certs/server.crt" "$work/certs/server.key" "$e/tls/"
printf '%s\n' 'xks-evaluation-pin' >"$e/secrets/hsm-pin"
printf '%s\n' 'ZGV2LXNlY3JldC1hLWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbg==' >"$e/secrets/dev-a.secret"
printf '%s\n' 'ZGV2LXNlY3JldC1iLWRvLW5vdC11c2UtaW4tcHJvZHVjdGlvbg==' >"$e/secrets/dev-b.secret"
# The proxy refuses secret files that group or others can read.
chmod 0600 "$e/tls/server.key" "$e"/secrets/*
chmod 0700 "$e/secrets"
build "$eval_image" -f deploy/container/Containerfile.evaluation \
  --build-arg XKS_SOFTHSM_IMAGE="$softhsm" "$work/eval-ctx"

# What the moved tags leave behind, children first (an image with a child
# cannot go), and the bases of other keys.
for old in "${replaced[@]}" $(podman images --format '{{.Repository}}:{{.Tag}}' localhost/xks-proxy-base); do
  [ "$old" = "$base" ] || podman rmi "$old" >/dev/null 2>&1 || true
done

# The published artefacts, as a registry would receive them.
rm -f "$out"/xks-proxy*.oci.tar
podman save --quiet --format oci-archive -o "$out/xks-proxy_$version.oci.tar" "$prod"
podman save --quiet --format oci-archive -o "$out/xks-proxy-evaluation_$version.oci.tar" "$eval_image"

size() { podman image inspect --format '{{.Size}}' "$1" | awk '{printf "%.1f MB", $1 / 1e6}'; }
{
  echo "image.sh: base $base (rootfs $(du -m "$rootfs" | cut -f1) MB, $rootfs)"
  echo "image.sh: $prod: $(size "$prod"); $out/xks-proxy_$version.oci.tar: $(du -m "$out/xks-proxy_$version.oci.tar" | cut -f1) MB"
  echo "image.sh: $softhsm: $(size "$softhsm") (test image)"
  echo "image.sh: $eval_image: $(size "$eval_image"); $out/xks-proxy-evaluation_$version.oci.tar: $(du -m "$out/xks-proxy-evaluation_$version.oci.tar" | cut -f1) MB"
} >&2
printf '%s\n' "$prod" "$softhsm" "$eval_image"
