"""`--workload SPEC` parsing and the synthetic requests it produces."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fleetserve.bench.synthetic import WorkloadSpecError, parse_workload
from fleetserve.workload.prompts import prompt_text


def sample(spec: str, count: int = 4000, seed: int = 0) -> list:
    return list(itertools.islice(parse_workload(spec).requests(seed), count))


def test_fixed_lengths() -> None:
    requests = sample("input=512,output=128", 10)
    assert {(r.input_length, r.output_length) for r in requests} == {(512, 128)}


def test_uniform_stays_in_range_and_covers_it() -> None:
    lengths = [r.input_length for r in sample("input=uniform:10:20,output=1")]
    assert min(lengths) == 10 and max(lengths) == 20


def test_zipf_lengths_have_the_requested_mean_and_a_heavy_tail() -> None:
    lengths = np.array([r.output_length for r in sample("input=8,output=zipf:200", 20_000)])
    assert lengths.min() >= 1
    assert lengths.mean() == pytest.approx(200, rel=0.1)
    assert np.percentile(lengths, 99) > 4 * np.median(lengths)


def test_fixed_spelled_out_equals_bare_number() -> None:
    assert sample("input=fixed:7,output=3", 5) == sample("input=7,output=fixed:3", 5)


def test_seed_makes_runs_repeatable() -> None:
    spec = "input=zipf:300,output=uniform:1:100"
    assert sample(spec, 50, seed=1) == sample(spec, 50, seed=1)
    assert sample(spec, 50, seed=1) != sample(spec, 50, seed=2)


def test_shared_prefix_gives_shared_text_and_unique_rest() -> None:
    first, second = sample("input=200,output=4,prefix=64", 2)
    text_a, text_b = prompt_text(first, index=0), prompt_text(second, index=1)
    words_a, words_b = text_a.split(), text_b.split()
    assert len(words_a) == len(words_b) == 200
    assert words_a[:64] == words_b[:64]
    assert words_a[64:] != words_b[64:]


@pytest.mark.parametrize(
    "spec",
    [
        "input=512",
        "output=3",
        "input=0,output=1",
        "input=abc,output=1",
        "input=uniform:5:1,output=1",
        "input=gauss:3,output=1",
        "inputs=3,output=1",
        "input=1,output=1,prefix=-4",
    ],
)
def test_bad_specs_are_rejected_with_a_message(spec: str) -> None:
    with pytest.raises(WorkloadSpecError):
        parse_workload(spec)
