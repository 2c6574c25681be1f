"""The prompt's token ids, computed the way the engines compute them, so the router can hash its blocks.

Cache-aware routing needs the same block hashes the engine's prefix cache uses, so the gateway must
tokenize exactly as the engine does: for completions the prompt text (or the token ids sent), for chat
the conversation rendered by the chat template, so that turn n+1 starts with the blocks of turn n. This
is the emulated engine's tokenizer and template; a model the catalog does not know gets no token ids and
is routed by load alone.
"""

from __future__ import annotations

from typing import Any

from fleetserve.gateway.admission import Endpoint
from fleetserve.model.catalog import Catalog, UnknownEntry
from fleetserve.protocol.tokenizer import HashTokenizer, chat_prompt


class PromptTokenizer:
    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._tokenizers: dict[str, HashTokenizer | None] = {}

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

    def _tokenizer(self, model: str) -> HashTokenizer | None:
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
