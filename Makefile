# Quick start:  make serve   (install, convert SmolLM2 once, serve with the default patches)
#               make test    (install, then the whole test suite)
PY := .venv/bin/python
export OMP_NUM_THREADS ?= 2
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: install serve test test-fast test-container lint

install:
	./scripts/install.sh

# Dev mode: anonymous requests allowed, admin token generated into the cache dir; the shipped
# refusal-general patch is applied by default (opt out per request with "-refusal-general").
serve: install
	SAFEPATCH_DEV_MODE="$${SAFEPATCH_DEV_MODE:-1}" \
	SAFEPATCH_DEFAULT_PATCHES="$${SAFEPATCH_DEFAULT_PATCHES-refusal-general}" \
	.venv/bin/safepatch serve

test: install
	$(PY) -m ruff check app tests bench
	.venv/bin/lint-imports
	$(PY) -m ruff format --check app tests bench
	$(PY) -m pytest -q -m "not container"

test-fast: install
	$(PY) -m pytest -q -m "not slow and not container"

lint: install
	$(PY) -m ruff check app tests bench
	.venv/bin/lint-imports
	$(PY) -m ruff format --check app tests bench

# Builds the CPU image with podman on a local debootstrap base, runs it on 127.0.0.1 and sends
# a patched chat completion through it (root; ~10 min fresh, ~3 min cached). CI runs it.
test-container: install
	SAFEPATCH_CONTAINER_TEST=1 $(PY) -m pytest -q -m container tests/test_dockerfile.py
