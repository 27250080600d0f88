# syntax=docker/dockerfile:1
# Two images from one file, both running as UID/GID 10001 with no build tools:
#   docker build --target operator -t ghcr.io/gptq-operator/operator:0.1.0 .
#   docker build --target worker   -t ghcr.io/gptq-operator/worker:0.1.0 .
# The worker's torch is PyPI's CUDA build: it carries the CUDA runtime libraries, so the
# image needs only the NVIDIA driver the node's container toolkit mounts.

ARG PYTHON_VERSION=3.12.8
ARG DEBIAN_RELEASE=bookworm
ARG VERSION=0.1.0

# ---- build stages: full Python image (compilers, headers); nothing of them ships --------
FROM python:${PYTHON_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY compat/ compat/
COPY worker/ worker/
COPY operator/ operator/

FROM build AS build-operator
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[operator]" \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM build AS build-worker
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir ".[worker]" \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# ---- runtime: what both images share (slim base, the fixed non-root user, environment) ---
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime
RUN groupadd --system --gid 10001 gptq \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gptq
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
USER 10001:10001

# ---- operator: Kopf and the kubernetes client, no torch -----------------------------------
FROM runtime AS operator
ARG VERSION
LABEL org.opencontainers.image.title="gptq-operator" \
      org.opencontainers.image.description="Kubernetes operator for GPTQ quantization and INT4 serving" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/gptq-operator/gptq-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build-operator /opt/venv /opt/venv
USER 10001:10001
ENTRYPOINT ["kopf"]
CMD ["run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8081/healthz", "-m", "gptq_operator.handlers"]

# ---- worker: the GPTQ engine (quantize, validate, eval) and the built-in serving runtime --
FROM runtime AS worker
ARG VERSION
LABEL org.opencontainers.image.title="gptq-worker" \
      org.opencontainers.image.description="GPTQ quantization engine and built-in INT4 serving runtime" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.source="https://github.com/gptq-operator/gptq-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build-worker /opt/venv /opt/venv
# the operator mounts a writable scratch volume here; the root filesystem stays read-only
ENV HOME=/scratch \
    HF_HOME=/scratch/hf \
    TRITON_CACHE_DIR=/scratch/triton
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["gptq-worker"]
CMD ["--help"]
