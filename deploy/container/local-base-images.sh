#!/usr/bin/env bash
# Makes the Dockerfile's base images without any container registry, for offline builds and the tests.
#
#   local-base-images.sh runtime TAG   # Debian bookworm minbase rootfs, imported as TAG (RUNTIME_IMAGE)
#   local-base-images.sh builder TAG   # the same plus gcc and the host's Rust toolchain (RUST_IMAGE)
#
# The rootfs comes from debootstrap (Debian's mirror is the only network use). The tarballs are cached in
# $DERPFLEET_IMAGE_CACHE (default /var/tmp/derpfleet-image-cache) and rebuilt whenever missing, so the cache
# saves time but nothing depends on it. Extra podman options (e.g. a private --root/--runroot) come from
# $PODMAN_OPTS. Needs root, debootstrap and podman.
set -euo pipefail

kind=${1:?usage: $0 runtime|builder TAG}
tag=${2:?usage: $0 runtime|builder TAG}
cache=${DERPFLEET_IMAGE_CACHE:-/var/tmp/derpfleet-image-cache}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
read -r -a podman_opts <<<"${PODMAN_OPTS:-}"
mkdir -p "$cache"

# One maker at a time per cache (two tests may ask at once).
exec 9>"$cache/.lock"
flock -w 900 9

# make_tar NAME INCLUDE: debootstrap a minbase rootfs with extra packages INCLUDE into $cache/NAME.tar.
make_tar() {
  local name=$1 include=$2 out="$cache/$1.tar"
  if [ -s "$out" ] && tar -tf "$out" ./etc/debian_version >/dev/null 2>&1; then
    return 0
  fi
  local work
  work=$(mktemp -d "$cache/.work.XXXXXX")
  trap 'rm -rf "$work"' RETURN
  echo "local-base-images: debootstrap $name (about a minute)" >&2
  debootstrap --variant=minbase ${include:+--include="$include"} bookworm "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -20 "$work/debootstrap.log" >&2; return 1; }
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  tar -C "$work/rootfs" -cf "$work/out.tar" .
  mv "$work/out.tar" "$out"
}

case "$kind" in
runtime)
  make_tar bookworm-minbase ""
  podman "${podman_opts[@]}" import "$cache/bookworm-minbase.tar" "$tag" >/dev/null
  ;;
builder)
  make_tar bookworm-minbase-gcc "gcc,libc6-dev,ca-certificates"
  # The host's active toolchain (binaries and libraries, not its docs) goes in /usr/local/rust.
  toolchain=$(dirname "$(dirname "$(rustup which rustc)")")
  version=$("$toolchain/bin/rustc" --version | tr -c 'A-Za-z0-9.\n' '-' | tr -d '\n')
  # The builder trusts the host's CA bundle too, so cargo works behind a TLS-inspecting egress proxy.
  cabundle=/etc/ssl/certs/ca-certificates.crt
  cahash=$(sha256sum "$cabundle" 2>/dev/null | cut -c1-12 || echo none)
  out="$cache/bookworm-builder-$version-ca$cahash.tar"
  if ! [ -s "$out" ]; then
    work=$(mktemp -d "$cache/.work.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    mkdir -p "$work/rootfs/usr/local/rust"
    tar -C "$work/rootfs" -xf "$cache/bookworm-minbase-gcc.tar"
    cp -a "$toolchain/bin" "$toolchain/lib" "$toolchain/libexec" "$work/rootfs/usr/local/rust/"
    if [ -s "$cabundle" ]; then cp "$cabundle" "$work/rootfs/etc/ssl/certs/ca-certificates.crt"; fi
    mkdir -p "$work/rootfs/usr/local/cargo"
    tar -C "$work/rootfs" -cf "$work/out.tar" .
    mv "$work/out.tar" "$out"
    find "$cache" -maxdepth 1 -name 'bookworm-builder-*.tar' ! -name "${out##*/}" -delete
  fi
  podman "${podman_opts[@]}" import \
    --change 'ENV PATH=/usr/local/cargo/bin:/usr/local/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV CARGO_HOME=/usr/local/cargo' \
    "$out" "$tag" >/dev/null
  ;;
*)
  echo "unknown kind $kind (runtime|builder)" >&2
  exit 2
  ;;
esac
echo "local-base-images: $kind image $tag ready" >&2
