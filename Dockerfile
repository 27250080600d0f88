# syntax=docker/dockerfile:1
# Two images from one file, both running as UID/GID 10001 with no build tools:
#   docker build --target operator -t ghcr.io/gptq-operator/operator:0.1.0 .
#   docker build --target worker   -t ghcr.io/gptq-operator/worker:0.1.0 .
# The worker's torch is PyPI's CUDA build: it carries the CUDA runtime libraries, so the
# image needs only the NVIDIA driver the node's container toolkit mounts.
#
# BUILD_BASE and BASE name the images the build and runtime stages start from. Any Debian-
# like image with python3 (>= 3.10) and its venv module will do, as long as both have
# python3 at the same path (the virtualenv links to it); the cluster test tier builds one
# with mmdebstrap (tests/cluster/images.sh), as no registry is reachable there.

ARG PYTHON_VERSION=3.12.8
ARG DEBIAN_RELEASE=bookworm
ARG BUILD_BASE=python:${PYTHON_VERSION}-${DEBIAN_RELEASE}
ARG BASE=python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}
ARG VERSION=0.1.0

# ---- build stages: full Python image (compilers, headers); nothing of them ships --------
# The dependency lists come out of pyproject.toml first; the virtualenvs are built from those
# lists alone, so that their layers (torch: gigabytes) are reused until a dependency changes.
FROM ${BUILD_BASE} AS build
# pip trusts the base image's CA bundle (where a site adds its proxy's CA), not only its own
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src

FROM build AS requirements
COPY pyproject.toml ./
RUN python3 -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
[open(f'requirements-{x}.txt', 'w').write('\n'.join(p['dependencies'] + p['optional-dependencies'][x]) + '\n') for x in ('operator', 'worker')]"

FROM build AS deps-operator
COPY --from=requirements /src/requirements-operator.txt ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --requirement requirements-operator.txt \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

FROM build AS deps-worker
COPY --from=requirements /src/requirements-worker.txt ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --requirement requirements-worker.txt \
    && /opt/venv/bin/pip uninstall --yes pip setuptools

# The project's own packages: a layer of their own, rebuilt when the source changes.
FROM build AS app
COPY pyproject.toml README.md ./
COPY compat/ compat/
COPY worker/ worker/
COPY operator/ operator/
RUN python3 -m venv /opt/buildenv \
    && /opt/buildenv/bin/pip install --no-cache-dir --no-deps --target /opt/app . \
    && sed -i '1s|.*|#!/opt/venv/bin/python3|' /opt/app/bin/*

# ---- runtime: what both images share (slim base, the fixed non-root user, environment) ---
FROM ${BASE} AS runtime
RUN groupadd --system --gid 10001 gptq \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin gptq
ENV PATH=/opt/app/bin:/opt/venv/bin:$PATH \
    PYTHONPATH=/opt/app \
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
COPY --from=deps-operator /opt/venv /opt/venv
COPY --from=app /opt/app /opt/app
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
COPY --from=deps-worker /opt/venv /opt/venv
COPY --from=app /opt/app /opt/app
# the operator mounts a writable scratch volume here; the root filesystem stays read-only
ENV HOME=/scratch \
    HF_HOME=/scratch/hf \
    TRITON_CACHE_DIR=/scratch/triton
USER 10001:10001
EXPOSE 8080
ENTRYPOINT ["gptq-worker"]
CMD ["--help"]
