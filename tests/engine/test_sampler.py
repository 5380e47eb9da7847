"""Sampler on hand-made logits whose answers are known in closed form."""
from __future__ import annotations

import math

import pytest
import torch

from pensieve.engine.sampler import Sampler, SamplingBatch
from pensieve.sampling_params import SamplingParams

CPU = torch.device("cpu")
SAMPLER = Sampler()


def build(
    params: list[SamplingParams],
    vocab: int,
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    eos: list[int] | None = None,
) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[] for _ in range(n)],
        outputs if outputs is not None else [[] for _ in range(n)],
        eos if eos is not None else [],
        vocab,
        CPU,
    )


def sample_many(probs: list[float], params: SamplingParams, rows: int = 4000) -> torch.Tensor:
    """Samples `rows` times from one distribution (as identical batch rows); returns counts per id."""
    logits = torch.tensor(probs).log().expand(rows, -1).contiguous()
    out = SAMPLER(logits, build([params] * rows, len(probs)))
    return torch.bincount(out.token_ids, minlength=len(probs))


def test_greedy_is_exact_argmax_and_takes_fast_path():
    torch.manual_seed(0)
    logits = torch.randn(16, 1000)
    batch = build([SamplingParams(temperature=0.0)] * 16, 1000)
    out = SAMPLER(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_ids is None
    assert out.token_ids.dtype == torch.int64


def test_greedy_rows_mixed_with_sampled_rows_stay_argmax():
    torch.manual_seed(1)
    logits = torch.randn(8, 500)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.5, top_p=0.9) for i in range(8)]
    params[0] = SamplingParams(temperature=0.8, top_k=1)  # top_k == 1 is greedy too
    out = SAMPLER(logits, build(params, 500))
    for i in [0, 1, 3, 5, 7]:
        assert out.token_ids[i] == logits[i].argmax()


def test_top_k_one_is_argmax_under_high_temperature():
    torch.manual_seed(2)
    logits = torch.randn(32, 300)
    # top_k=2 with two equal winners is not greedy; top_k=1 must be argmax whatever the temperature.
    out = SAMPLER(logits, build([SamplingParams(temperature=5.0, top_k=1)] * 32, 300))
    assert torch.equal(out.token_ids, logits.argmax(-1))


@pytest.mark.parametrize(
    "params, allowed",
    [
        (SamplingParams(top_k=2), {0, 1}),
        (SamplingParams(top_k=3), {0, 1, 2}),
        # probs 0.5, 0.3, 0.15, 0.05: mass before each = 0, 0.5, 0.8, 0.95
        (SamplingParams(top_p=0.75), {0, 1}),
        (SamplingParams(top_p=0.49), {0}),  # 0.5 alone already covers 0.49: the minimal nucleus
        (SamplingParams(top_p=0.51), {0, 1}),
        (SamplingParams(top_p=0.85), {0, 1, 2}),
        (SamplingParams(top_p=0.3), {0}),
        # min_p * p_max = 0.25 * 0.5 = 0.125 keeps 0.5, 0.3, 0.15
        (SamplingParams(min_p=0.25), {0, 1, 2}),
        (SamplingParams(min_p=0.7), {0}),
        (SamplingParams(top_k=3, top_p=0.75), {0, 1}),
        (SamplingParams(), {0, 1, 2, 3}),
    ],
)
def test_truncation_keeps_exactly_the_allowed_ids(params, allowed):
    torch.manual_seed(3)
    # Shuffled order so that sorting and scattering back are exercised.
    probs = [0.15, 0.5, 0.05, 0.3]
    rank_to_id = [1, 3, 0, 2]
    counts = sample_many(probs, params)
    seen = {i for i in range(4) if counts[i] > 0}
    assert seen == {rank_to_id[r] for r in allowed}


def test_temperature_reshapes_the_distribution():
    torch.manual_seed(4)
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    for temp in (0.5, 1.0, 2.0):
        counts = sample_many(probs.tolist(), SamplingParams(temperature=temp), rows=20000)
        expected = probs ** (1 / temp)
        expected /= expected.sum()
        assert torch.allclose(counts.float() / counts.sum(), expected, atol=0.02), temp


def test_top_p_renormalises_within_the_nucleus():
    torch.manual_seed(5)
    counts = sample_many([0.5, 0.3, 0.15, 0.05], SamplingParams(top_p=0.75), rows=20000)
    freq = counts.float() / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.02)


def test_repetition_penalty_follows_hf():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5], [2.0, -2.0, 1.0, -1.0, 0.5]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams()]
    # Row 0 has seen 0 (prompt), 1 (output), 3 twice; row 1 has no penalty whatever it saw.
    batch = build(params, 5, prompts=[[0, 3], [0, 1]], outputs=[[1, 3], [2]])
    got = SAMPLER.penalize(logits, batch)
    assert torch.equal(got[0], torch.tensor([1.0, -4.0, 1.0, -2.0, 0.5]))
    assert torch.equal(got[1], logits[1])
    assert torch.equal(logits[0], torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5]))  # input untouched


def test_frequency_and_presence_penalties_follow_openai():
    logits = torch.zeros(3, 6)
    params = [
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=1.5),
        SamplingParams(frequency_penalty=-0.25, presence_penalty=0.75),
    ]
    outputs = [[1, 1, 1, 4], [2, 2, 5], [0, 0, 3]]
    # Prompt ids never count for these penalties.
    batch = build(params, 6, prompts=[[2, 3], [1], [5, 5]], outputs=outputs)
    got = SAMPLER.penalize(logits, batch)
    expected = torch.zeros(3, 6)
    for row, (p, out) in enumerate(zip(params, outputs)):
        for tok in set(out):
            expected[row, tok] = -(out.count(tok) * p.frequency_penalty + p.presence_penalty)
    assert torch.allclose(got, expected)


def test_penalties_steer_greedy():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    batch = build([SamplingParams(temperature=0.0, presence_penalty=0.5)], 3, outputs=[[0]])
    assert SAMPLER(logits, batch).token_ids.tolist() == [1]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]])  # eos = 3, stop id = 4, then 2 is best
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4])
    early = SAMPLER(logits, build([params], 5, outputs=[[1, 1]], eos=[3]))
    assert early.token_ids.tolist() == [2]
    reached = SAMPLER(logits, build([params], 5, outputs=[[1, 1, 1]], eos=[3]))
    assert reached.token_ids.tolist() == [3]
    # With ignore_eos the EOS is an ordinary token, so it is not banned; the stop id still is.
    loose = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=[4], ignore_eos=True)
    assert SAMPLER(logits, build([loose], 5, outputs=[[1]], eos=[3])).token_ids.tolist() == [3]
    logits2 = torch.tensor([[0.0, 1.0, 2.0, 4.0, 5.0]])
    assert SAMPLER(logits2, build([loose], 5, outputs=[[1]], eos=[3])).token_ids.tolist() == [3]


def test_min_tokens_applies_to_sampled_rows():
    torch.manual_seed(6)
    probs = [0.05, 0.05, 0.9]
    params = SamplingParams(min_tokens=2)
    logits = torch.tensor(probs).log().expand(2000, -1).contiguous()
    out = SAMPLER(logits, build([params] * 2000, 3, outputs=[[0]] * 2000, eos=[2]))
    assert (out.token_ids != 2).all()


def test_seed_reproducible_regardless_of_batch_neighbours_and_position():
    torch.manual_seed(7)
    vocab = 200
    mine = torch.randn(vocab)
    seeded = SamplingParams(temperature=1.0, seed=1234)

    def run(rows: int, pos: int, history: list[int]) -> int:
        logits = torch.randn(rows, vocab) * 3
        logits[pos] = mine
        params = [SamplingParams(temperature=0.7, top_p=0.9) for _ in range(rows)]
        params[pos] = seeded
        outputs = [[1, 2] for _ in range(rows)]
        outputs[pos] = history
        torch.manual_seed(rows * 31 + pos)  # the default generator differs between runs
        return SAMPLER(logits, build(params, vocab, outputs=outputs)).token_ids[pos].item()

    for history in ([], [5, 6, 7]):
        picks = {run(rows, pos, history) for rows, pos in [(1, 0), (4, 3), (9, 2), (9, 8)]}
        assert len(picks) == 1
    # The step number feeds the seed: successive steps do not repeat one fixed draw.
    steps = {run(3, 1, list(range(k))) for k in range(12)}
    assert len(steps) > 1
    other = {run(3, 1, [0] * k) for k in range(12)}
    assert other == steps  # depends on how many tokens, not which (the logits carry the rest)


def test_seed_changes_the_draw():
    logits = torch.zeros(1, 1000)
    picks = {
        SAMPLER(logits, build([SamplingParams(seed=s)], 1000)).token_ids.item() for s in range(8)
    }
    assert len(picks) > 1


def test_logprobs_equal_log_softmax_after_temperature():
    torch.manual_seed(8)
    vocab = 50
    logits = torch.randn(4, vocab) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=3),
        SamplingParams(temperature=0.5, logprobs=5),
        SamplingParams(temperature=1.3, top_k=4, logprobs=0),
        SamplingParams(temperature=1.0),
    ]
    out = SAMPLER(logits, build(params, vocab))
    temps = torch.tensor([1.0, 0.5, 1.3, 1.0]).unsqueeze(1)
    ref = torch.log_softmax(logits / temps, dim=-1)
    assert out.top_ids.shape == (4, 5) and out.top_logprobs.shape == (4, 5)
    assert torch.allclose(out.logprobs, ref.gather(1, out.token_ids.unsqueeze(1)).squeeze(1), atol=1e-6)
    ref_top, ref_ids = ref.topk(5, dim=-1)
    assert torch.equal(out.top_ids, ref_ids)
    assert torch.allclose(out.top_logprobs, ref_top, atol=1e-6)
    assert out.token_ids[0] == logits[0].argmax()
    assert out.top_ids[0, 0] == out.token_ids[0]
    # top_k=4 truncates sampling, not the reported distribution: the pick is among the best 4.
    assert out.token_ids[2].item() in logits[2].topk(4).indices.tolist()


def test_logprobs_zero_reports_only_the_sampled_token():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = SAMPLER(logits, build([SamplingParams(temperature=0.0, logprobs=0)], 3))
    assert out.top_ids is None and out.top_logprobs is None
    expected = 3.0 - math.log(math.exp(1) + math.exp(2) + math.exp(3))
    assert out.token_ids.tolist() == [2]
    assert out.logprobs.item() == pytest.approx(expected, abs=1e-6)


def test_logprobs_reflect_penalties():
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    params = SamplingParams(temperature=0.0, frequency_penalty=1.0, logprobs=3)
    out = SAMPLER(logits, build([params], 3, outputs=[[0, 0]]))
    ref = torch.log_softmax(torch.tensor([-1.0, 1.0, 1.0]), dim=-1)
    assert torch.allclose(out.top_logprobs[0].sort().values, ref.sort().values, atol=1e-6)


def test_build_skips_unused_stages():
    batch = build([SamplingParams(temperature=0.0), SamplingParams(temperature=0.0)], 10)
    assert batch.all_greedy and batch.num_logprobs == -1
    assert batch.top_k is None and batch.top_p is None and batch.min_p is None
    assert batch.seen_mask is None and batch.output_counts is None and batch.ban_rows is None
    # A greedy row's top_p is irrelevant, so it builds no top-p stage either.
    assert build([SamplingParams(temperature=0.0, top_p=0.5)], 10).top_p is None


def test_counts_built_by_scatter_match_python_counts():
    outputs = [[3, 3, 9, 0], [], [9] * 7]
    params = [SamplingParams(frequency_penalty=1.0)] * 3
    batch = build(params, 10, outputs=outputs)
    for row, out in enumerate(outputs):
        assert batch.output_counts[row].tolist() == [float(out.count(t)) for t in range(10)]


@pytest.mark.gpu
@pytest.mark.filterwarnings("ignore:Synchronization debug mode")
def test_cuda_batch_without_host_sync_and_seeds_stable():
    dev = torch.device("cuda")
    vocab = 32000
    torch.manual_seed(9)
    logits = torch.randn(64, vocab, device=dev) * 3
    params = [
        SamplingParams(
            temperature=0.0 if i % 3 == 0 else 0.8,
            top_p=0.9,
            top_k=40 if i % 2 else -1,
            min_p=0.05,
            repetition_penalty=1.2,
            frequency_penalty=0.3,
            min_tokens=10 if i % 5 == 0 else 0,
            seed=i if i % 4 == 0 else None,
            logprobs=4 if i % 7 == 0 else None,
        )
        for i in range(64)
    ]
    prompts = [list(range(i, i + 300)) for i in range(64)]
    outputs = [list(range(i, i + 5)) for i in range(64)]
    batch = SamplingBatch.build(params, prompts, outputs, [2], vocab, dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = SAMPLER(logits, batch)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    cpu_batch = SamplingBatch.build(params, prompts, outputs, [2], vocab, CPU)
    penalized = SAMPLER.penalize(logits.cpu(), cpu_batch)
    greedy_rows = [i for i, p in enumerate(params) if p.greedy]
    assert out.token_ids[greedy_rows].tolist() == penalized[greedy_rows].argmax(-1).tolist()
    # Row 4 (seeded) alone in a batch draws the same token as among 63 neighbours.
    alone = SamplingBatch.build(params[4:5], prompts[4:5], outputs[4:5], [2], vocab, dev)
    assert SAMPLER(logits[4:5], alone).token_ids.item() == out.token_ids[4].item()
