"""The routers benchmarks/routers.py compares: each peer's launcher (a `ServerSpec` for a list of engine
URLs), where its venv lives, and which version is installed there. `install.sh` creates the venvs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

PEERS_DIR = Path(__file__).resolve().parent.parent / ".peers"


@dataclass(frozen=True)
class PeerInstall:
    """One peer's venv under benchmarks/.peers/ and the distribution installed in it."""

    venv: str
    distribution: str
    executable: str

    @property
    def binary(self) -> Path:
        return PEERS_DIR / self.venv / "bin" / self.executable

    @property
    def installed(self) -> bool:
        return self.binary.is_file()

    def version(self) -> str | None:
        if not self.installed:
            return None
        python = PEERS_DIR / self.venv / "bin" / "python"
        script = f"import importlib.metadata as m; print(m.version({self.distribution!r}))"
        result = subprocess.run([str(python), "-c", script], capture_output=True, text=True, check=False)
        return result.stdout.strip() or None


SGLANG_ROUTER = PeerInstall("sglang", "sglang-router", "sglang-router")
VLLM_ROUTER = PeerInstall("vllm", "vllm-router", "vllm-router")
LITELLM = PeerInstall("litellm", "litellm", "litellm")
