from fleetserve.sim.prompts import LazyPromptTokens
from fleetserve.workload import TraceRequest, prompt_token_ids


def test_lazy_tokens_equal_the_workload_tokens_and_len_needs_none():
    request = TraceRequest(timestamp_ms=0.0, input_length=700, output_length=5, hash_ids=(3, 4))
    lazy = LazyPromptTokens(request, 32000, index=7, seed=1)
    assert len(lazy) == 700
    assert lazy._tokens is None  # counting did not expand the prompt
    want = prompt_token_ids(request, 32000, index=7, seed=1).tolist()
    assert list(lazy) == want and lazy[10:20] == want[10:20] and lazy[-1] == want[-1]
    assert tuple(lazy) == tuple(want) and all(type(token) is int for token in lazy)
