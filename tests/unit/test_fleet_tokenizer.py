"""A fleet file's `tokenizer:`: the gateway hashes prompts with the same token ids as the emulated engine.

The tokenizer.json is a real one, trained here in memory on a few sentences with the `tokenizers`
package (byte-level BPE, as most LLM tokenizers are), so nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from starlette.testclient import TestClient
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from fleetserve.config import ConfigError, load_fleet, parse_fleet
from fleetserve.engines.emulator import specs_from_fleet
from fleetserve.engines.emulator.engine import EmulatedEngine
from fleetserve.gateway.app import Gateway
from fleetserve.gateway.tokens import PromptTokenizer
from fleetserve.model.catalog import default_catalog
from fleetserve.protocol.tokenizer import HashTokenizer, JsonTokenizer, chat_prompt

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fleet of engines serves the same model behind one gateway.",
    "Cache-aware routing sends a prompt to the engine that holds its prefix.",
    "You are a helpful assistant. Answer briefly and precisely.",
    "<|system|>\n<|user|>\n<|assistant|>\n",
]
PROMPT = "You are a helpful assistant. The quick brown fox routes prompts to the engine with its prefix."
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Which engine "}, {"type": "text", "text": "holds it?"}],
    },
    {"role": "assistant", "content": "The one with the prefix."},
    {"role": "user", "content": "Answer briefly."},
]


def make_tokenizer_json(path: Path, vocab_size: int = 400) -> Path:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(SENTENCES, trainer=trainer)
    tokenizer.save(str(path))
    return path


@pytest.fixture
def tokenizer_file(tmp_path: Path) -> Path:
    return make_tokenizer_json(tmp_path / "tokenizer.json")


def fleet_yaml(*groups: str) -> str:
    return "engines:\n" + "".join(groups)


def group(name: str, model: str = "llama-3-8b", tokenizer: str | None = None, **extra: str) -> str:
    lines = [f"  - name: {name}", f"    model: {model}"]
    lines += [f"    {key}: {value}" for key, value in extra.items()]
    if "kind" not in extra:
        lines.append("    gpu: h100-80g")
    if tokenizer is not None:
        lines.append(f"    tokenizer: {tokenizer}")
    return "\n".join(lines) + "\n"


def write_fleet(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(text)
    return path


def test_fleet_tokenizer_gives_gateway_the_emulators_token_ids(tmp_path: Path, tokenizer_file: Path) -> None:
    # a relative path is taken from the fleet file's folder; a second line of the model inherits it
    fleet = load_fleet(
        write_fleet(tmp_path, fleet_yaml(group("a", tokenizer="tokenizer.json"), group("b", replicas="2")))
    )
    assert fleet.engines[0].tokenizer == str(tokenizer_file.absolute())
    assert fleet.model_tokenizers() == {"llama-3-8b": str(tokenizer_file.absolute())}

    specs = [spec for spec, _ in specs_from_fleet(fleet)]
    assert len(specs) == 3
    assert {spec.tokenizer_file for spec in specs} == {str(tokenizer_file.absolute())}
    engine = EmulatedEngine(specs[-1])
    assert isinstance(engine.tokenizer, JsonTokenizer)

    prompts = PromptTokenizer(default_catalog(), fleet.model_tokenizers())
    reference = Tokenizer.from_file(str(tokenizer_file))
    with TestClient(engine.app) as client:
        completion = client.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
        chat = client.post("/tokenize", json={"messages": MESSAGES}).json()["tokens"]

    gateway_completion = prompts.token_ids({"prompt": PROMPT}, "completions", "llama-3-8b")
    assert gateway_completion == completion
    assert gateway_completion == reference.encode(PROMPT, add_special_tokens=False).ids  # the file's ids
    assert prompts.token_ids({"prompt": [PROMPT]}, "completions", "llama-3-8b") == completion
    gateway_chat = prompts.token_ids({"messages": MESSAGES}, "chat", "llama-3-8b")
    assert gateway_chat == chat
    rendered = chat_prompt(
        [
            ("system", "You are a helpful assistant."),
            ("user", "Which engine holds it?"),
            ("assistant", "The one with the prefix."),
            ("user", "Answer briefly."),
        ]
    )
    assert gateway_chat == reference.encode(rendered, add_special_tokens=False).ids
    assert gateway_chat != HashTokenizer(default_catalog().model("llama-3-8b").vocab_size).encode(rendered)


def test_gateway_uses_the_fleet_tokenizer_per_model(tmp_path: Path, tokenizer_file: Path) -> None:
    # a real engine's served name is not in the catalog: with a tokenizer file it still gets token ids
    text = fleet_yaml(
        group("real", model="org/served-model", tokenizer=str(tokenizer_file), url="http://127.0.0.1:9"),
        group("emu", model="llama-3-8b"),
    )
    gateway = Gateway(parse_fleet(text))
    tokenizer = gateway.proxy._tokenizer
    assert tokenizer is not None
    real = tokenizer.token_ids({"prompt": PROMPT}, "completions", "org/served-model")
    assert real == Tokenizer.from_file(str(tokenizer_file)).encode(PROMPT, add_special_tokens=False).ids
    emulated = tokenizer.token_ids({"prompt": PROMPT}, "completions", "llama-3-8b")
    assert emulated == HashTokenizer(default_catalog().model("llama-3-8b").vocab_size).encode(PROMPT)
    assert tokenizer.token_ids({"prompt": PROMPT}, "completions", "not-in-catalog") is None


def test_conflicting_tokenizers_for_one_model_are_rejected(tmp_path: Path, tokenizer_file: Path) -> None:
    other = make_tokenizer_json(tmp_path / "other.json", vocab_size=350)
    text = fleet_yaml(group("a", tokenizer=str(tokenizer_file)), group("b", tokenizer=str(other)))
    with pytest.raises(ConfigError) as error:
        load_fleet(write_fleet(tmp_path, text))
    message = str(error.value)
    assert "engines[1].tokenizer" in message and "llama-3-8b" in message
    assert str(tokenizer_file) in message and str(other) in message
    # the same file named twice (however spelled), or tokenizers of different models, are fine
    same = fleet_yaml(
        group("a", tokenizer="tokenizer.json"), group("b", tokenizer=f"./{tokenizer_file.name}")
    )
    assert load_fleet(write_fleet(tmp_path, same)).model_tokenizers()["llama-3-8b"] == str(tokenizer_file)
    two_models = fleet_yaml(
        group("a", tokenizer=str(tokenizer_file)), group("b", model="qwen2.5-7b", tokenizer=str(other))
    )
    assert len(parse_fleet(two_models).model_tokenizers()) == 2


def test_unloadable_tokenizer_file_is_a_config_error(tmp_path: Path) -> None:
    missing = write_fleet(tmp_path, fleet_yaml(group("a", tokenizer="nope.json")))
    with pytest.raises(
        ConfigError, match=r"fleet.yaml:5: engines\[0\].tokenizer: .*nope.json does not exist"
    ):
        load_fleet(missing)
    (tmp_path / "bad.json").write_text("{not json")
    bad = write_fleet(tmp_path, fleet_yaml(group("a", tokenizer="bad.json")))
    with pytest.raises(ConfigError, match=r"engines\[0\].tokenizer: .*cannot load tokenizer file"):
        load_fleet(bad)


def test_prompt_tokenizer_reports_a_file_that_does_not_load(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ConfigError, match="model 'm': cannot load tokenizer file"):
        PromptTokenizer(default_catalog(), {"m": tmp_path / "bad.json"})
    with pytest.raises(ConfigError, match=r"model 'm': cannot load tokenizer file .*missing\.json"):
        PromptTokenizer(default_catalog(), {"m": tmp_path / "missing.json"})
