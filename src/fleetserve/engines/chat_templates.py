"""The chat template of a GGUF model, as a function from messages to the prompt llama.cpp would run.

The gateway needs it to resume a chat stream on a llama.cpp engine: llama-cpp-python's server renders
every conversation with a fresh assistant turn (it has no `continue_final_message`), so the gateway
continues the answer through the completions API over the rendered conversation plus the text so far.
"""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path
from typing import Any

from fleetserve.config import FleetConfig
from fleetserve.engines.commands import llamacpp_weights
from fleetserve.protocol.continuation import ChatRenderer

log = logging.getLogger(__name__)


def llamacpp_chat_renderers(config: FleetConfig) -> dict[str, ChatRenderer]:
    """Model name -> its chat template, for every llama.cpp group of the fleet file whose GGUF can be
    read here (without it, chat streams on that model end with an error event instead of resuming)."""
    renderers: dict[str, ChatRenderer] = {}
    for group in config.engines:
        if group.kind != "llamacpp" or group.model in renderers:
            continue
        try:
            renderers[group.model] = gguf_chat_renderer(llamacpp_weights(group.model))
        except (ImportError, OSError, ValueError) as exc:
            log.warning("chat streams of %s cannot resume: no chat template (%s)", group.model, exc)
    return renderers


@cache
def gguf_chat_renderer(path: Path) -> ChatRenderer:
    """The model's own template from its GGUF metadata, rendered the way llama-cpp-python's server
    renders it (Jinja2, with the model's BOS and EOS tokens, ending with the assistant's turn)."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    template = model.metadata.get("tokenizer.chat_template")
    if template is None:
        raise ValueError(f"{path} has no chat template in its metadata")
    formatter = Jinja2ChatFormatter(
        template,
        eos_token=model._model.token_get_text(model.token_eos()),
        bos_token=model._model.token_get_text(model.token_bos()),
    )

    def render(messages: list[dict[str, Any]]) -> str:
        return formatter(messages=messages).prompt

    return render
