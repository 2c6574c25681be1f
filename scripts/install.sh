#!/usr/bin/env bash
# Installs everything fleetserve needs on a fresh Debian machine: the system packages that
# llama-cpp-python builds with, then a virtual environment in .venv with fleetserve and all its extras.
# Safe to run again: every step skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

system_packages=(build-essential cmake git redis-server procps)  # procps: pgrep, which the Ray test uses
missing=()
for pkg in "${system_packages[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing system packages: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}"
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip

# llama-cpp-python compiles llama.cpp from source (about 4 minutes on 2 cores). By default it builds for
# the CPU it is built on (-march=native): on a machine whose CPU reports AMX or AVX-512 that the VM does
# not let programs use, that build dies with "Illegal instruction" at the first token, and a wheel built on
# one machine may be reused on another. So it is built once for the portable x86-64 AVX2 baseline, kept in
# a wheel folder of its own (pip's cache would hand back a native build), and installed from there.
llama_cpp_version=0.3.36
if [ "$(uname -m)" = x86_64 ]; then
  wheels=${FLEETSERVE_WHEELS:-$HOME/.cache/fleetserve/wheels/llama-cpp-avx2}
  if ! ls "$wheels"/llama_cpp_python-"$llama_cpp_version"-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python $llama_cpp_version for x86-64 AVX2 (about 4 minutes)"
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON" \
      CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
      .venv/bin/python -m pip wheel -q --no-deps --no-cache-dir -w "$wheels" "llama-cpp-python==$llama_cpp_version"
  fi
  .venv/bin/python -m pip install -q --find-links "$wheels" "llama-cpp-python[server]==$llama_cpp_version"
fi
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
  .venv/bin/python -m pip install -q -e '.[all]'

# inference-perf, a load generator the tests drive the gateway with, needs Python >= 3.12 (newer than the
# project's): it gets a venv of its own, from the first Python 3.12+ found (on PATH, or one pyenv built).
inference_perf=${FLEETSERVE_INFERENCE_PERF:-$HOME/.cache/fleetserve/inference-perf-0.7.0}
if [ ! -x "$inference_perf/bin/inference-perf" ]; then
  newer=""
  for candidate in python3.13 python3.12 "$HOME"/.pyenv/versions/3.1[2-9]*/bin/python3; do
    if "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' >/dev/null 2>&1; then
      newer=$candidate
      break
    fi
  done
  if [ -n "$newer" ]; then
    echo "installing inference-perf 0.7.0 with $newer in $inference_perf"
    "$newer" -m venv "$inference_perf"
    "$inference_perf/bin/python" -m pip install -q inference-perf==0.7.0
  else
    echo "no Python 3.12 on this machine: the inference-perf test will be skipped"
  fi
fi
echo "fleetserve installed in .venv ($(.venv/bin/fleetserve --version))"
