# syntax=docker/dockerfile:1
# One image for every Finsight service; the command picks the service:
#   docker run IMAGE python -m services.memory        (default: services.llm_gateway)
# Build:  docker build -t finsight:$(git rev-parse --short HEAD) .
#
# Stage "build" installs the dependencies and the project into /opt/venv and
# generates the protobuf code with grpcio-tools, which lives in a separate
# /opt/codegen venv that never reaches the final image. Stage "runtime" copies
# /opt/venv only and runs as an unprivileged user with no shell login.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src

# Code generation tools: their own venv, same pins as the dev extra of pyproject.toml.
RUN python -m venv /opt/codegen \
 && /opt/codegen/bin/pip install "grpcio-tools>=1.85,<2" "googleapis-common-protos>=1.70,<2"

# Runtime dependencies first, from pyproject.toml alone, so this layer is
# reused until the dependency list changes.
COPY pyproject.toml README.md ./
RUN python -m venv /opt/venv \
 && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
 && /opt/venv/bin/pip install --requirement /tmp/requirements.txt

# Generated code, as `make proto` does it (without the .pyi stubs, which only mypy reads).
COPY protos protos
RUN mkdir -p .build/proto-deps/google/type .build/proto-deps/google/rpc \
 && gp="$(/opt/codegen/bin/python -c 'import google.type.date_pb2 as m, pathlib; print(pathlib.Path(m.__file__).parents[1])')" \
 && for f in type/date type/money type/decimal rpc/status rpc/code rpc/error_details; do \
      cp "$gp/$f.proto" ".build/proto-deps/google/$f.proto"; done \
 && find protos -name '*_pb2*.py*' -delete \
 && find protos -name '*.proto' -print0 | xargs -0 /opt/codegen/bin/python -m grpc_tools.protoc \
      -I protos -I .build/proto-deps --python_out=protos --grpc_python_out=protos

# The project itself (a regular, non-editable install into the venv), then
# drop pip from the runtime venv: nothing installs anything at run time.
# libs/ includes libs.devprovider, the stdlib-only stand-in for DeepSeek that the
# dev overlay runs from this same image (`python -m libs.devprovider`); no service
# imports it (tests/llm_gateway/test_layering.py).
COPY libs libs
COPY services services
RUN /opt/venv/bin/pip install --no-deps . \
 && /opt/venv/bin/python -c "import finsight.memory.v1.memory_pb2_grpc, services.memory.main, services.analytics.main, services.llm_gateway.main, libs.devprovider.cli" \
 && /opt/venv/bin/pip uninstall --yes pip


FROM ${PYTHON_IMAGE} AS runtime
ARG FINSIGHT_UID=10001
LABEL org.opencontainers.image.title="finsight" \
      org.opencontainers.image.description="Finsight gRPC services: llm_gateway, memory, analytics" \
      org.opencontainers.image.licenses="LicenseRef-Proprietary"

# A fixed, unprivileged identity (Kubernetes runAsUser/fsGroup use the same
# number) with no home and no login shell; /data is the DuckDB volume.
RUN groupadd --system --gid "${FINSIGHT_UID}" finsight \
 && useradd --system --uid "${FINSIGHT_UID}" --gid finsight --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin finsight \
 && mkdir -p /data /app \
 && chown "${FINSIGHT_UID}:${FINSIGHT_UID}" /data

COPY --from=build /opt/venv /opt/venv

# Container defaults: listen on every interface (the code defaults to
# 127.0.0.1 for laptops), keep data on the volume, log unbuffered, write no
# bytecode (the root filesystem is read-only in Kubernetes), and keep library
# caches in /tmp (an emptyDir there).
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp \
    FINSIGHT_BIND_HOST=0.0.0.0 \
    FINSIGHT_DATA_DIR=/data

WORKDIR /app
USER 10001:10001

# gRPC: llm_gateway 50051, memory 50052, analytics 50053.
# Prometheus /metrics: llm_gateway 9101, memory 9102, analytics 9103.
EXPOSE 50051 50052 50053 9101 9102 9103

# Kubernetes probes use the native gRPC health check; this is for plain docker.
HEALTHCHECK NONE

# Python is PID 1: the services install their own SIGTERM handler (drain, then stop).
CMD ["python", "-m", "services.llm_gateway"]
