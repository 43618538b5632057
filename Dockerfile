# syntax=docker/dockerfile:1
# The PFJet-SSD HTTP gateway (jetssd-service gateway): the core (jetssd + onnxruntime for the local backend), the
# service and the client SDK. Never torch, never the generator. Triton runs in its own image
# (deploy/triton/Dockerfile); docker-compose.yml wires both. Build: docker build -t pfjet-ssd-gateway .
#
# The model repository is *mounted*, not baked in (docker-compose.yml: ./model_repository:/models:ro, the same
# directory Triton serves): the gateway reads the variants, versions and metadata from it and runs the local
# backend on its ONNX files, so gateway and Triton cannot disagree about which model version they serve, and a
# new model needs a restart, not a rebuild.
ARG PYTHON_IMAGE=python:3.11.10-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY jetssd ./jetssd
COPY service ./service
COPY client ./client
# NUMBA_CACHE_DIR (below): the dsp backend's kernels are compiled by numba on first use and cached; the package
# directory is not writable for the non-root user and there is no home directory, so the cache goes to /tmp.
# nvidia-pytriton (a dependency of the service for `jetssd-service triton`) ships the Triton binary: 145 MB this
# container never runs. The check fails the build if torch slipped in.
RUN pip install --no-cache-dir "/src[inference,dsp]" /src/service /src/client \
    && pip uninstall --yes nvidia-pytriton \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && python -c "import jetssd_service.app, jetssd_client, onnxruntime"

FROM ${PYTHON_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="pfjet-ssd-gateway" \
      org.opencontainers.image.description="PFJet-SSD jet detector: HTTP gateway (FastAPI) in front of Triton" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/python:3.11.10-slim-bookworm"
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin jetssd
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    JETSSD_GATEWAY_HOST=0.0.0.0 \
    JETSSD_GATEWAY_PORT=8080 \
    JETSSD_MODEL_REPOSITORY=/models \
    NUMBA_CACHE_DIR=/tmp/numba-cache
WORKDIR /home/jetssd
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('JETSSD_GATEWAY_PORT', '8080'), timeout=2)"]
CMD ["jetssd-service", "gateway"]
