# One image for every cbtstream service (planner worker, copier, audit consumer, API).
FROM python:3.11-slim-bookworm

RUN apt-get update \
 && apt-get install -y --no-install-recommends nbdkit libnbd-bin \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY cbtstream ./cbtstream
COPY cbtctl ./cbtctl
COPY schemas ./schemas
COPY streams ./streams
COPY producers ./producers
COPY consumers ./consumers
RUN pip install --no-cache-dir .

RUN useradd --system --uid 10001 --home /var/lib/cbtstream cbtstream \
 && mkdir -p /var/lib/cbtstream/replicas /var/lib/cbtstream/faust \
 && chown -R cbtstream /var/lib/cbtstream
USER cbtstream
ENV CBTSTREAM_COPIER__TARGET_ROOT=/var/lib/cbtstream/replicas \
    CBTSTREAM_STREAMS__DATA_DIR=/var/lib/cbtstream/faust
ENTRYPOINT ["cbtstream"]
CMD ["--help"]
