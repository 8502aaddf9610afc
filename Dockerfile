# syntax=docker/dockerfile:1
# logitserve images. Two targets:
#   docker build --target cuda -t logitserve:cuda .   # NVIDIA GPUs; keeps the torch of the pytorch/pytorch image
#   docker build --target cpu  -t logitserve:cpu  .   # CPU only (also the default target)
# Installation itself is scripts/install.sh, the same script the README and CI use.
# The default model (SmolLM2-135M-Instruct) is downloaded and converted at build time into
# $LOGITSERVE_CACHE, so a container starts without network access.

ARG CUDA_BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
ARG CPU_BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------- cuda
FROM ${CUDA_BASE_IMAGE} AS cuda

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOGITSERVE_CACHE=/opt/logitserve/cache \
    LOGITSERVE_DEVICE=cuda \
    HF_HUB_OFFLINE=1

RUN groupadd --system --gid 10001 logitserve \
 && useradd --system --uid 10001 --gid logitserve --create-home --home-dir /home/logitserve logitserve

WORKDIR /opt/logitserve/app
COPY . .
# TORCH_SPEC=skip: keep the CUDA build of torch that the base image ships.
RUN TORCH_SPEC=skip bash scripts/install.sh
RUN python -c "from service.default_model import ensure_default_model; ensure_default_model('/opt/logitserve/cache')" \
 && chmod -R a+rX /opt/logitserve

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LOGITSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["logitserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]

# ----------------------------------------------------------------------------------------------- cpu
FROM ${CPU_BASE_IMAGE} AS cpu

# TORCH_SPEC as scripts/install.sh reads it (default: the CPU-tested torch pin); override with
# --build-arg TORCH_SPEC=... (for instance a CPU-only torch build from a local wheel index).
ARG TORCH_SPEC=torch==2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LOGITSERVE_CACHE=/opt/logitserve/cache \
    LOGITSERVE_DEVICE=cpu \
    HF_HUB_OFFLINE=1

RUN groupadd --system --gid 10001 logitserve \
 && useradd --system --uid 10001 --gid logitserve --create-home --home-dir /home/logitserve logitserve

WORKDIR /opt/logitserve/app
COPY . .
RUN bash scripts/install.sh
RUN python -c "from service.default_model import ensure_default_model; ensure_default_model('/opt/logitserve/cache')" \
 && chmod -R a+rX /opt/logitserve

USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('LOGITSERVE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["logitserve"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
