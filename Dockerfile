# syntax=docker/dockerfile:1
# pfmon: one image for every service (collector, analytics, actuator, archiver) and tools.
# Multi-stage: the builder installs the pinned run-time dependencies
# (requirements.runtime.lock: no linters, type checkers or test tools) into a virtualenv;
# the runtime stage copies only that virtualenv and runs as a non-root user.

ARG PYTHON_VERSION=3.11
# The base of both stages: the official slim Python image. A host without an image registry
# passes a local one built the same way (Python 3.11, venv, `python` on PATH), e.g.
#   podman build --build-arg PYTHON_IMAGE=localhost/pfmon-ci/python:latest ...
# (tests/podman/python.Containerfile builds it from Debian's packages).
ARG PYTHON_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/pfmon
# dependencies first: this layer is rebuilt only when the lock file changes
COPY requirements.runtime.lock ./
RUN /opt/pfmon/bin/pip install --require-virtualenv -r requirements.runtime.lock
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY services ./services
# the build backend (pyproject's build-system) in a throwaway environment: the image's
# virtualenv holds only what requirements.runtime.lock lists
RUN /opt/pfmon/bin/pip install --require-virtualenv --no-deps . \
    && /opt/pfmon/bin/pfmon --help > /dev/null

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="pfmon" \
      org.opencontainers.image.description="Power-factor monitoring and correction: Modbus meters -> MQTT -> analytics, capacitor banks, TimescaleDB" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/pfmon/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PFM_DATA_DIR=/var/lib/pfmon \
    PFM_LOG_FORMAT=json
# uid/gid 10001 match `pfmon init` (it hands the client certificates to this uid)
RUN groupadd --system --gid 10001 pfmon \
    && useradd --system --uid 10001 --gid pfmon --home-dir /var/lib/pfmon --shell /usr/sbin/nologin pfmon \
    && mkdir -p /var/lib/pfmon /etc/pfmon \
    && chown pfmon:pfmon /var/lib/pfmon
COPY --from=builder /opt/pfmon /opt/pfmon
USER 10001:10001
WORKDIR /var/lib/pfmon
VOLUME ["/var/lib/pfmon"]
# /metrics of collector, analytics, actuator, archiver (one per container)
EXPOSE 9101 9102 9103 9104
ENTRYPOINT ["pfmon"]
CMD ["--help"]
