#!/usr/bin/env bash
# Installs the peer routers that benchmarks/routers.py compares fleetserve against, each in its own venv
# under benchmarks/.peers/ so their dependency pins never touch the project's environment.
# Versions are pinned so a rerun measures the same peers; bump them here and in docs/peers.md together.
set -euo pipefail

SGLANG_ROUTER_VERSION="0.3.2"
VLLM_ROUTER_VERSION="0.1.17"
# litellm >= 1.103 requires certifi >= 2026.10.19, which the package index here does not serve.
LITELLM_VERSION="1.101.6"

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peers_dir="$(dirname "$here")/.peers"
python="${PYTHON:-python3}"

make_venv() {
  local name="$1"
  shift
  local venv="$peers_dir/$name"
  if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "^WARNING: Location" || true
  "$venv/bin/pip" show --quiet "${1%%[=[]*}" >/dev/null
  echo "installed $* into $venv"
}

mkdir -p "$peers_dir"
make_venv sglang "sglang-router==$SGLANG_ROUTER_VERSION"
make_venv vllm "vllm-router==$VLLM_ROUTER_VERSION"
make_venv litellm "litellm[proxy]==$LITELLM_VERSION"
