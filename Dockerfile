# One image for every cbtstream service: planner worker, copier, audit consumer, snapshot
# scheduler (`cbtstream worker|copier|audit|snapshot ...`). README, "Deployment", says how to
# build it, what to mount and which settings the image sets.
#
# BASE: a Debian 12 (bookworm) image with python3 3.11 and its venv module. The default is the
# official Python image; tests/deploy builds on a base made from Debian packages
# (`mmdebstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm`),
# because no image registry is reachable where the project is tested.
ARG BASE=python:3.11-slim-bookworm

# ---- build: the dependencies' virtualenv /opt/cbtstream, and cbtstream's wheel ----------------
FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_WARN_SCRIPT_LOCATION=1
RUN python3 -m venv /opt/cbtstream
WORKDIR /src
COPY pyproject.toml ./
# Dependencies first, from pyproject.toml alone: this layer survives edits of the source.
RUN --mount=type=cache,target=/root/.cache/pip \
    python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
      > /tmp/requirements.txt \
 && /opt/cbtstream/bin/pip install -r /tmp/requirements.txt
COPY README.md ./
COPY cbtstream ./cbtstream
COPY cbtctl ./cbtctl
COPY schemas ./schemas
COPY streams ./streams
COPY producers ./producers
COPY consumers ./consumers
RUN --mount=type=cache,target=/root/.cache/pip \
    /opt/cbtstream/bin/pip wheel --no-deps --wheel-dir /wheels .

# ---- runtime ---------------------------------------------------------------------------------
FROM ${BASE} AS runtime
# nbdkit (1.32, with the retry and cacheextents filters every VDDK export uses) runs the vddk
# plugin for the copier; Debian does not ship that plugin: mount it (see below) or bake it in
# with deploy/image/Dockerfile.vddk. libnbd-bin: nbdinfo/nbdcopy for operators. tini is PID 1:
# it forwards SIGTERM to cbtstream (a process that is PID 1 ignores signals it does not handle:
# `snapshot --every` would be SIGKILLed at every stop) and reaps orphans.
RUN apt-get update \
 && apt-get install -y --no-install-recommends nbdkit libnbd-bin tini \
 && rm -rf /var/lib/apt/lists/*

# A dedicated user, uid/gid 10001, so host folders bind-mounted as volumes can be given
# to it (`chown -R 10001:10001 DIR`).
RUN groupadd --gid 10001 cbtstream \
 && useradd --uid 10001 --gid cbtstream --home-dir /var/lib/cbtstream --no-create-home \
      --no-log-init --shell /usr/sbin/nologin cbtstream \
 && install -d -o cbtstream -g cbtstream -m 0750 /var/lib/cbtstream \
      /var/lib/cbtstream/faust /var/lib/cbtstream/copier /var/lib/cbtstream/replicas \
 && install -d -m 0755 /opt/nbdkit-vddk /opt/vmware-vix-disklib-distrib
# The dependencies (a layer that changes only with pyproject.toml), then cbtstream itself. The
# wheel is COPYed, not bind-mounted into the RUN: buildah keys a RUN's cache on its text, not on
# what it mounts, and would keep installing a stale wheel.
COPY --from=build /opt/cbtstream /opt/cbtstream
COPY --from=build /wheels/ /tmp/wheels/
RUN /opt/cbtstream/bin/pip install --no-cache-dir --no-deps --no-index /tmp/wheels/*.whl \
 && rm -rf /tmp/wheels \
 && /opt/cbtstream/bin/cbtstream --version

# Every setting the image chooses is an environment variable: environment variables win over
# a TOML file (--config / CBTSTREAM_CONFIG), so override these with -e, not in the file.
#   state: the planner's table store, the copier's checkpoints/records, the replicas (volumes)
#   copier: snapshot disks read through `nbdkit vddk`, one per (disk, VM snapshot), on unix
#   sockets under <state_dir>/vddk (allowed in nbd_allow); VDDK mounted at its usual path and
#   the plugin at /opt/nbdkit-vddk (a .so, or the project's Python stand-in for tests).
ENV PATH=/opt/cbtstream/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    CBTSTREAM_STREAMS__DATA_DIR=/var/lib/cbtstream/faust \
    CBTSTREAM_COPIER__STATE_DIR=/var/lib/cbtstream/copier \
    CBTSTREAM_COPIER__TARGET_ROOT=/var/lib/cbtstream/replicas \
    CBTSTREAM_COPIER__EXPORTS=vddk \
    CBTSTREAM_COPIER__NBD_ALLOW='["127.0.0.1","unix:/var/lib/cbtstream/copier/vddk/"]' \
    CBTSTREAM_COPIER__VDDK__LIBDIR=/opt/vmware-vix-disklib-distrib \
    CBTSTREAM_COPIER__VDDK__PLUGIN=/opt/nbdkit-vddk/nbdkit-vddk-plugin.so
# Declared after the folders exist with their owner, so a new named or anonymous volume starts
# as a copy of them: owned by cbtstream, mode 0750.
VOLUME ["/var/lib/cbtstream/faust", "/var/lib/cbtstream/copier", "/var/lib/cbtstream/replicas"]
USER cbtstream:cbtstream
WORKDIR /var/lib/cbtstream
ENTRYPOINT ["/usr/bin/tini", "--", "/opt/cbtstream/bin/cbtstream"]
CMD ["--help"]
