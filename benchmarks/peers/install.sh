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

# make_venv VENV DISTRIBUTION VERSION [EXTRAS]
make_venv() {
  local venv="$peers_dir/$1" distribution="$2" version="$3" extras="${4:-}"
  if [[ ! -x "$venv/bin/python" ]]; then
    "$python" -m venv "$venv"
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$distribution$extras==$version"
  # pip's exit status alone would not catch an older version left in the venv by an earlier run.
  "$venv/bin/python" - "$distribution" "$version" <<'PY'
import importlib.metadata, sys
name, wanted = sys.argv[1], sys.argv[2]
found = importlib.metadata.version(name)
if found != wanted:
    sys.exit(f"{name}: installed {found}, wanted {wanted}")
PY
  echo "installed $distribution $version into $venv"
}

mkdir -p "$peers_dir"
make_venv sglang sglang-router "$SGLANG_ROUTER_VERSION"
make_venv vllm vllm-router "$VLLM_ROUTER_VERSION"
make_venv litellm litellm "$LITELLM_VERSION" "[proxy]"
