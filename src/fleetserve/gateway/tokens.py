"""The prompt's token ids, computed the way the engines compute them, so the router can hash its blocks.

Cache-aware routing needs the same block hashes the engine's prefix cache uses, so the gateway must
tokenize exactly as the engine does: for completions the prompt text (or the token ids sent), for chat
the conversation rendered by the chat template, so that turn n+1 starts with the blocks of turn n.

The tokenizer is, per model, the `tokenizer:` file the fleet file names for it (the emulated engines of
that model count with the same file), else the emulated engine's built-in hashing tokenizer sized to the
catalog's vocabulary. The chat template is always the emulated engine's generic one (`chat_prompt`): with
a real tokenizer, completions prompts hash exactly as a real engine's do, chat prompts only as an
emulated engine's. A model with neither a tokenizer file nor a catalog entry gets no token ids and is
routed by load alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fleetserve.config import ConfigError
from fleetserve.gateway.admission import Endpoint
from fleetserve.model.catalog import Catalog, UnknownEntry
from fleetserve.protocol.tokenizer import HashTokenizer, Tokenizer, chat_prompt, json_tokenizer


class PromptTokenizer:
    """`tokenizer_files` maps a base model name to its tokenizer.json (`FleetConfig.model_tokenizers`);
    they are loaded here, so a file that does not load fails at startup with a `ConfigError`."""

    def __init__(self, catalog: Catalog, tokenizer_files: Mapping[str, str | Path] | None = None) -> None:
        self._catalog = catalog
        self._tokenizers: dict[str, Tokenizer | None] = {}
        for model, path in (tokenizer_files or {}).items():
            try:
                self._tokenizers[model] = json_tokenizer(path)
            except (OSError, ValueError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
                raise ConfigError(f"model {model!r}: cannot load tokenizer file {path}: {reason}") from None

    def token_ids(self, payload: dict[str, Any], endpoint: Endpoint, model: str) -> list[int] | None:
        """The prompt's token ids for base model `model`, or None when they cannot be known."""
        tokenizer = self._tokenizer(model)
        if tokenizer is None:
            return None
        if endpoint == "chat":
            return tokenizer.encode(chat_prompt(_turns(payload.get("messages"))))
        prompt = payload.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # one prompt in a list, as the engines accept it
        if isinstance(prompt, str):
            return tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return prompt
        return None

    def _tokenizer(self, model: str) -> Tokenizer | None:
        if model not in self._tokenizers:
            try:
                self._tokenizers[model] = HashTokenizer(self._catalog.model(model).vocab_size)
            except UnknownEntry:
                self._tokenizers[model] = None
        return self._tokenizers[model]


def _turns(messages: Any) -> list[tuple[str, str]]:
    """(role, text) per message, text parts joined as the engine joins them (admission checked roles)."""
    turns = []
    for message in messages or ():
        content = message.get("content")
        if isinstance(content, list):
            content = "".join(
                part["text"]
                for part in content
                if isinstance(part, dict) and isinstance(part.get("text"), str)
            )
        turns.append((message["role"], content if isinstance(content, str) else ""))
    return turns
