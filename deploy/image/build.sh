#!/usr/bin/env bash
# Build the cbtstream image with podman, optionally without any image registry.
#
#   deploy/image/build.sh [--tag TAG] [--file DOCKERFILE] [--base IMAGE | --debian-base]
#                         [--host-trust] [--build-arg K=V]... [-- PODMAN-BUILD-ARGS...]
#
#   --tag TAG        the image's name (default cbtstream:latest)
#   --file FILE      the Dockerfile (default: Dockerfile)
#   --base IMAGE     the Dockerfile's BASE (default python:3.11-slim-bookworm)
#   --debian-base    make the base from Debian packages instead, for sites without a registry:
#                    mmdebstrap --variant=minbase bookworm with python3, python3-venv and
#                    ca-certificates, using this host's apt sources and apt configuration,
#                    imported as localhost/cbtstream-base:bookworm. The tarball is kept in
#                    $CBTSTREAM_IMAGE_CACHE (default .stack/deploy) and reused.
#   --host-trust     let the build's RUN steps use this host's package access: its CA bundle
#                    (mounted at /run/host-ca/, not where ca-certificates writes its own), a
#                    pip configuration that trusts it (with this host's pip index settings),
#                    its apt sources and apt configuration (so list only repositories whose
#                    keys the base image has: Debian's). For hosts behind a TLS-inspecting
#                    proxy or using a mirror.
#   after --          passed to `podman build` as they are (e.g. --runtime runc, --ulimit ...)
#
# Needs podman (Debian: podman; --debian-base also mmdebstrap). Run from anywhere; the build
# context is the repository.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cache="${CBTSTREAM_IMAGE_CACHE:-$repo/.stack/deploy}"
tag="cbtstream:latest"
file="$repo/Dockerfile"
base=""
debian_base=0
host_trust=0
args=()

die() { echo "build.sh: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
  case "$1" in
    --tag|-t) tag="${2:?--tag needs a value}"; shift 2 ;;
    --file|-f) file="${2:?--file needs a value}"; shift 2 ;;
    --base) base="${2:?--base needs a value}"; shift 2 ;;
    --debian-base) debian_base=1; shift ;;
    --host-trust) host_trust=1; shift ;;
    --build-arg) args+=(--build-arg "${2:?--build-arg needs K=V}"); shift 2 ;;
    --) shift; args+=("$@"); break ;;
    -h|--help) sed -n '2,25p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
command -v podman >/dev/null || die "podman not found (Debian: apt-get install podman)"

# The base image from Debian packages: the same python3 3.11 as python:3.11-slim-bookworm.
base_image="localhost/cbtstream-base:bookworm"
base_packages="python3,python3-venv,ca-certificates"
if [ "$debian_base" = 1 ]; then
  [ -z "$base" ] || die "--base and --debian-base exclude each other"
  base="$base_image"
  tarball="$cache/base-bookworm-minbase-$(echo "$base_packages" | tr ',' '+').tar"
  if [ ! -s "$tarball" ]; then
    command -v mmdebstrap >/dev/null || die "mmdebstrap not found (Debian: apt-get install mmdebstrap)"
    mkdir -p "$cache"
    mirror=()
    for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
      [ -s "$f" ] && mirror+=("$f")
    done
    aptopt=()
    for f in /etc/apt/apt.conf.d/*; do [ -f "$f" ] && aptopt+=(--aptopt="$f"); done
    echo "build.sh: making $tarball with mmdebstrap (about a minute)" >&2
    mmdebstrap --quiet --format=tar --variant=minbase --include="$base_packages" "${aptopt[@]}" \
      bookworm "$tarball.part" "${mirror[@]}"
    mv "$tarball.part" "$tarball"
  fi
  # Re-import when the tarball is newer than the image (or the image is missing).
  stamp="$cache/.base-imported"
  if ! podman image exists "$base_image" || [ "$tarball" -nt "$stamp" ]; then
    podman import --quiet "$tarball" "$base_image" >/dev/null
    touch "$stamp"
  fi
fi
[ -n "$base" ] && args+=(--build-arg "BASE=$base")

if [ "$host_trust" = 1 ]; then
  mkdir -p "$cache"
  ca=/etc/ssl/certs/ca-certificates.crt
  [ -s "$ca" ] || die "--host-trust: no CA bundle at $ca"
  # pip.conf for the build: this host's index settings (index URLs, trusted hosts) with the CA
  # bundle at its mounted path.
  {
    echo "[global]"
    if command -v pip3 >/dev/null; then
      pip3 config list 2>/dev/null \
        | sed -n "s/^global\.\(index-url\|extra-index-url\|trusted-host\)='\(.*\)'$/\1 = \2/p"
    fi
    echo "cert = /run/host-ca/ca-certificates.crt"
  } > "$cache/pip.conf"
  args+=(-v "$ca:/run/host-ca/ca-certificates.crt:ro" -v "$cache/pip.conf:/etc/pip.conf:ro")
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
    [ -s "$f" ] && args+=(-v "$f:$f:ro")
  done
  for f in /etc/apt/apt.conf.d/*; do [ -f "$f" ] && args+=(-v "$f:$f:ro"); done
fi

exec podman build --file "$file" --tag "$tag" "${args[@]}" "$repo"
