"""Our models against HF transformers on the same random checkpoints, through the paged cache."""
from __future__ import annotations

import pytest
import torch

from tests.model.conftest import VARIANTS
from tests.model.paged import PagedSeqs

TOL = 1e-4
pytestmark = pytest.mark.parametrize("variant", list(VARIANTS))


def _tokens(config, n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, config.vocab_size, (n,), generator=g).tolist()


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:  # [L, vocab]
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape
    diff = (got - want).abs().max().item()
    assert diff < TOL, f"max abs diff {diff}"


def test_prompt_logits(model_pair, variant):
    hf, ours, config = model_pair(variant)
    ids = _tokens(config, 12, 0)
    [got] = PagedSeqs(ours, config).step([(0, ids, None)])
    _close(got, _hf_logits(hf, ids))


def test_chunked_prefill_on_shuffled_blocks(model_pair, variant):
    hf, ours, config = model_pair(variant)
    ids = _tokens(config, 12, 1)
    paged = PagedSeqs(ours, config, seed=3)
    [first] = paged.step([(0, ids[:7], None)])
    [second] = paged.step([(0, ids[7:], None)])  # attends to the first 7 through the cache
    assert paged.tables[0] != sorted(paged.tables[0])  # the blocks really are out of order
    _close(torch.cat([first, second]), _hf_logits(hf, ids))


def test_ragged_batch(model_pair, variant):
    hf, ours, config = model_pair(variant)
    a, b, c = _tokens(config, 12, 2), _tokens(config, 9, 3), _tokens(config, 10, 4)
    paged = PagedSeqs(ours, config)
    paged.step([(2, c[:4], None)])
    # Two fresh prompts of different lengths and one prefill continuing from cache, in one step.
    got_a, got_b, got_c = paged.step([(0, a, None), (1, b, None), (2, c[4:], None)])
    _close(got_a, _hf_logits(hf, a))
    _close(got_b, _hf_logits(hf, b))
    _close(got_c, _hf_logits(hf, c)[4:])


def test_recompute_dropped_prefix_with_new_tokens(model_pair, variant):
    """A dropped prefix recomputed in the same step as a new turn: non-contiguous positions."""
    hf, ours, config = model_pair(variant)
    ids = _tokens(config, 16, 5)
    paged = PagedSeqs(ours, config)
    paged.step([(0, ids[:12], None)])
    paged.scramble(0, range(4))  # positions 0..3 are lost; 4..11 stay cached
    [got] = paged.step([(0, ids[:4] + ids[12:], [0, 1, 2, 3, 12, 13, 14, 15])])
    want = _hf_logits(hf, ids)
    _close(got, torch.cat([want[:4], want[12:]]))


def test_greedy_decode_matches(model_pair, variant):
    hf, ours, config = model_pair(variant)
    prompts = [_tokens(config, 7, 6), _tokens(config, 4, 7)]
    steps = 8
    want = []
    for prompt in prompts:  # HF greedy by full recomputation: no cache on its side
        seq = list(prompt)
        for _ in range(steps):
            seq.append(int(_hf_logits(hf, seq)[-1].argmax()))
        want.append(seq[len(prompt):])

    paged = PagedSeqs(ours, config, seed=1)
    logits = paged.step([(i, p, None) for i, p in enumerate(prompts)])
    got: list[list[int]] = [[int(l[-1].argmax())] for l in logits]
    for _ in range(steps - 1):  # single-token decode steps of both sequences through the cache
        logits = paged.step([(i, [g[-1]], None) for i, g in enumerate(got)])
        for g, l in zip(got, logits):
            g.append(int(l[-1].argmax()))
    assert got == want
