"""n and best_of: one prefill forks into the request's candidates, which share the prompt's KV
blocks; best_of > n returns the n candidates with the highest cumulative logprob."""

from __future__ import annotations

from engine_helpers import TWO_CANDIDATES, assert_all_blocks_free, request
from ipc.messages import EngineCoreOutput, FinishReason

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
          8182, 2, 198, 1, 4093, 198, 31530, 549, 582, 1027, 563, 260, 8872, 30, 2, 198, 1, 520, 9531, 198]


def run(core, *messages) -> list[EngineCoreOutput]:
    for message in messages:
        core.add_request(message)
    outputs = []
    for _ in range(10_000):
        if not core.has_unfinished_requests:
            return outputs
        outputs += core.step()
    raise AssertionError("the engine did not finish its requests")


def by_index(outputs: list[EngineCoreOutput], request_id: str) -> dict[int, list[EngineCoreOutput]]:
    result: dict[int, list[EngineCoreOutput]] = {}
    for out in outputs:
        if out.request_id == request_id:
            result.setdefault(out.index, []).append(out)
    return result


def tokens(outs: list[EngineCoreOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def test_n_candidates_prefill_the_prompt_once_and_each_index_finishes(make_core):
    core = make_core()
    outputs = run(core, request("r", PROMPT, n=4, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))
    assert core.num_prompt_tokens_computed == len(PROMPT)
    choices = by_index(outputs, "r")
    assert sorted(choices) == [0, 1, 2, 3]
    for outs in choices.values():
        assert [o.finish_reason for o in outs].count(None) == len(outs) - 1  # only the last one finishes
        assert outs[-1].finish_reason == FinishReason.LENGTH and len(tokens(outs)) == 12
    assert len({tuple(tokens(outs)) for outs in choices.values()}) > 1  # each has its own generator
    assert_all_blocks_free(core)


def test_seeded_n_reproduces_in_any_batch(make_core):
    params = dict(n=3, seed=2024, max_tokens=10, ignore_eos=True, **TWO_CANDIDATES)
    alone = by_index(run(make_core(), request("s", PROMPT, **params)), "s")
    busy = make_core()
    others = [request(f"o{i}", PROMPT[: 10 + 5 * i], temperature=1.0, max_tokens=15, n=2) for i in range(3)]
    batched = by_index(run(busy, *others, request("s", PROMPT, **params)), "s")
    assert {i: tokens(o) for i, o in alone.items()} == {i: tokens(o) for i, o in batched.items()}
    assert_all_blocks_free(busy)


def test_best_of_returns_the_n_candidates_with_the_highest_cumulative_logprob(make_core):
    params = dict(temperature=1.0, seed=11, max_tokens=16)
    every = by_index(run(make_core(), request("all", PROMPT, n=4, **params)), "all")
    candidates = sorted(((outs[-1].cumulative_logprob, tokens(outs)) for outs in every.values()), reverse=True)
    core = make_core()
    outputs = run(core, request("best", PROMPT, n=2, best_of=4, **params))
    assert all(o.finish_reason is not None for o in outputs)  # held back until every candidate ended
    best = by_index(outputs, "best")
    assert sorted(best) == [0, 1]
    got = [(best[i][0].cumulative_logprob, best[i][0].new_token_ids) for i in (0, 1)]
    assert got == candidates[:2]
    assert best[0][0].num_generated_tokens == sum(len(t) for _, t in candidates)
    assert_all_blocks_free(core)


def test_aborting_one_index_ends_only_that_choice(make_core):
    core = make_core()
    core.add_request(request("r", PROMPT, n=3, temperature=1.0, seed=3, max_tokens=20, ignore_eos=True))
    outputs = []
    for _ in range(4):
        outputs += core.step()
    assert sorted(by_index(outputs, "r")) == [0, 1, 2]  # forked and streaming
    core.abort_requests(["r"], indices=[1])
    core.abort_requests(["r"], indices=[1])  # idempotent
    outputs += run(core)
    choices = by_index(outputs, "r")
    aborted = choices[1]
    assert aborted[-1].finish_reason == FinishReason.ABORT and len(tokens(aborted)) < 20
    assert [o.finish_reason for o in aborted].count(FinishReason.ABORT) == 1
    for index in (0, 2):
        assert choices[index][-1].finish_reason == FinishReason.LENGTH and len(tokens(choices[index])) == 20
    assert_all_blocks_free(core)
