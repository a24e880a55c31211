#!/usr/bin/env bash
# `make images`: voicestack's CPU images, built on this machine with podman (no Docker engine,
# no Docker Hub). Top to bottom:
#   1. podman, runc, catatonit and mmdebstrap from Debian, and the engine settings these machines
#      need in /etc/containers/containers.conf (written only where absent or different);
#   2. the base image: Debian 12 made from Debian's own packages (mmdebstrap, podman import), once;
#   3. podman build of each CPU target of services/Dockerfile, with the host's pip cache and the
#      Makefile's wheel directory (the compiled llama-cpp-python) lent to it, so that nothing
#      is compiled twice.
# Settings (environment): REPOSITORY (localhost/voicestack), TAG (the chart's appVersion: what the
# chart pulls by default), TARGETS (cpu edge vad web sip), BASE (localhost/voicestack-base:bookworm).
# podman runs as root here (the kernel's overlay storage): run as root, or this re-runs under sudo.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || exec sudo --preserve-env=REPOSITORY,TAG,TARGETS,BASE "$0" "$@"

REPOSITORY=${REPOSITORY:-localhost/voicestack}
TAG=${TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/voicestack/Chart.yaml)}
TARGETS=${TARGETS:-cpu edge vad web sip}
BASE=${BASE:-localhost/voicestack-base:bookworm}
WORK=build/images
mkdir -p "$WORK"
say() { echo "== images: $*"; }

# ---------------------------------------------------------------- 1. podman
missing=""
for p in podman runc catatonit mmdebstrap; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  say "installing Debian packages:$missing"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

# No systemd here (so cgroupfs, not systemd, manages the containers' cgroups), runc as the
# runtime, and the file and process limits every container gets.
CONF=/etc/containers/containers.conf
WANT='[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"'
if [ "$(cat "$CONF" 2>/dev/null)" != "$WANT" ]; then
  if [ -e "$CONF" ]; then say "$CONF differs: the old one is kept as $CONF.orig"; cp "$CONF" "$CONF.orig"; fi
  say "writing $CONF:"
  mkdir -p "$(dirname "$CONF")"
  echo "$WANT" | tee "$CONF"
fi

# ---------------------------------------------------------------- 2. the base image
# What debian:bookworm-slim is, from Debian's mirror: minbase without documentation, manual
# pages and translations (the dpkg options stay in the image, so later installs skip them too).
if ! podman image exists "$BASE"; then
  say "making $BASE from Debian's packages (mmdebstrap: about 30 s)"
  mmdebstrap --variant=minbase --format=tar --quiet \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$WORK/base.tar"
  podman import --change 'CMD ["/bin/bash"]' "$WORK/base.tar" "$BASE"
  rm -f "$WORK/base.tar"
fi

# ---------------------------------------------------------------- 3. the images
# The host's pip cache and the Makefile's wheel directory, lent to the build (PIP_CACHE_DIR and
# WHEELS of the Dockerfile): the llama-cpp-python wheel `make venv` built here is reused (or the
# one built here is kept for `make venv`), and pip keeps what it may cache. Only the builder
# stage uses them; the images copy its /opt/venv and /app.
PIP_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/pip
WHEELS=$HOME/.cache/voicestack-wheels
mkdir -p "$PIP_CACHE" "$WHEELS"
lend=(--volume "$PIP_CACHE:/root/.cache/host/pip" --build-arg PIP_CACHE_DIR=/root/.cache/host/pip
      --volume "$WHEELS:/root/.cache/host/voicestack-wheels" --build-arg WHEELS=/root/.cache/host/voicestack-wheels)
# The build's pip trusts the CAs this machine trusts (a TLS-inspecting proxy's, say): a pip
# config of its own and a copy of the host's CA bundle, as root's pip config in the RUN steps.
if [ -r /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$WORK/pip-config"
  cp /etc/ssl/certs/ca-certificates.crt "$WORK/pip-config/"
  printf '[global]\ncert = /root/.config/pip/ca-certificates.crt\n' > "$WORK/pip-config/pip.conf"
  lend+=(--volume "$PWD/$WORK/pip-config:/root/.config/pip:ro")
fi

# One copy of the sources (what the Dockerfile copies, and the Dockerfile) for every target: the
# images of one run are built from the same files even while the checkout changes.
rm -rf "$WORK/context" && mkdir -p "$WORK/context"
tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml Makefile protos services load | tar -x -C "$WORK/context"

all_start=$(date +%s)
for target in $TARGETS; do
  start=$(date +%s)
  say "building $REPOSITORY-$target:$TAG"
  podman build -f "$WORK/context/services/Dockerfile" \
    --ignorefile "$WORK/context/services/Dockerfile.dockerignore" \
    --build-arg BASE_IMAGE="$BASE" "${lend[@]}" \
    --target "$target" --tag "$REPOSITORY-$target:$TAG" "$WORK/context"
  say "$target built in $(( $(date +%s) - start )) s"
done
say "all built in $(( $(date +%s) - all_start )) s"
podman image ls --filter "reference=$REPOSITORY-*"
