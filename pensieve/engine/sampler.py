"""Batched sampling on the logits' device: penalties, temperature, top-k/top-p/min-p, seeds, logprobs.

The engine builds one `SamplingBatch` per step (host lists -> device tensors, once) and calls
`Sampler()(logits, batch)`. Nothing in here reads a device value back to the host, so the caller's
single `.tolist()` on the result is the step's only sync.

Order of operations, per row (rows never influence each other):
  1. penalties on the raw logits: repetition (HF: over prompt + output ids; positive logits are
     divided by the penalty, negative ones multiplied), then frequency and presence (OpenAI: over
     output ids, `logit -= count * frequency + (count > 0) * presence`);
  2. `min_tokens`: EOS (unless `ignore_eos`) and `stop_token_ids` set to -inf until reached;
  3. greedy rows (temperature 0 or top_k 1) take the argmax of these logits, exactly;
  4. other rows: divide by temperature, then top-k, top-p (minimal nucleus: a token is kept iff the
     probability mass strictly before it in sorted order is < top_p), then min-p (keep tokens whose
     probability is >= min_p * the largest probability), then sample.
Logprobs are `log_softmax` of the step-4 logits after temperature and before truncation (for greedy
rows, temperature 1): the model's distribution after penalties and temperature, as OpenAI reports it,
and a truncated-away token still gets a finite logprob.

Sampling uses `argmax(probs / E)` with `E ~ Exponential(1)` i.i.d. per token (an exact draw from
`probs`, no host sync, no cumsum). Unseeded rows draw `E` from the default generator; a seeded row
draws its own row from a generator seeded with (seed, number of tokens generated so far), so its
token depends only on its own logits and history, not on its batch neighbours or position.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from torch import Tensor

from pensieve.sampling_params import SamplingParams

_MASK64 = (1 << 64) - 1


def _mix_seed(seed: int, step: int) -> int:
    """A well-spread 63-bit generator seed from (request seed, step): splitmix64 over both."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def _to_device(data: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """One host->device copy; pinned + non_blocking on CUDA so the host does not wait on it."""
    pin = device.type == "cuda"
    return torch.tensor(data, dtype=dtype, pin_memory=pin).to(device, non_blocking=pin)


def _scatter_ids(ids: list[tuple[list[int], ...]], vocab_size: int, device: torch.device) -> Tensor:
    """[B, V] float32 occurrence counts of each row's ids (`ids[row]` is a tuple of id lists).

    The ids go flat, as `row * V + id`, in one copy and one `scatter_add_`: no padding to the
    longest row. numpy builds the flat array (`torch.tensor` on a long int list costs ~5x more).
    """
    lengths = np.fromiter((sum(len(part) for part in parts) for parts in ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    counts = torch.zeros(len(ids) * vocab_size, dtype=torch.float32, device=device)
    if total:
        flat = np.fromiter(chain.from_iterable(chain.from_iterable(ids)), dtype=np.int64, count=total)
        flat += np.repeat(np.arange(len(ids), dtype=np.int64) * vocab_size, lengths)
        index = torch.from_numpy(flat)
        pin = device.type == "cuda"
        index = (index.pin_memory() if pin else index).to(device, non_blocking=pin)
        counts.scatter_add_(0, index, torch.ones(total, dtype=torch.float32, device=device))
    return counts.view(len(ids), vocab_size)


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step sampling state of the whole batch; tensors live on the logits' device.

    Optional tensors are None when no row needs them, so an all-greedy, penalty-free batch costs
    two small copies. `vocab_size` must equal `logits.shape[-1]` (the model's padded vocab).
    """

    temperature: Tensor                 # [B] float32; 1.0 on greedy rows (so dividing is safe)
    greedy: Tensor                      # [B] bool
    top_k: Tensor | None                # [B] int64 in [1, V]; V where disabled
    top_p: Tensor | None                # [B] float32; 1.0 where disabled
    min_p: Tensor | None                # [B] float32; 0.0 where disabled
    repetition_penalty: Tensor | None   # [B] float32
    seen_mask: Tensor | None            # [B, V] bool: id occurs in prompt or output (repetition)
    frequency_penalty: Tensor | None    # [B] float32
    presence_penalty: Tensor | None     # [B] float32
    output_counts: Tensor | None        # [B, V] float32: occurrences in the output so far
    ban_rows: Tensor | None             # [N] int64 \ (row, id) pairs set to -inf:
    ban_cols: Tensor | None             # [N] int64 /  min_tokens not yet reached
    seeded: tuple[tuple[int, torch.Generator], ...]  # (row, generator) for rows with a seed
    num_logprobs: int                   # K = max logprobs requested in the batch; -1: none asked
    all_greedy: bool
    any_sampled_filter: bool            # some non-greedy row uses top-k or top-p

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_ids: list[list[int]],
        output_ids: list[list[int]],
        eos_token_ids: list[int],
        vocab_size: int,
        device: torch.device,
    ) -> "SamplingBatch":
        if not len(params) == len(prompt_ids) == len(output_ids):
            raise ValueError("params, prompt_ids and output_ids must have one entry per row")
        device = torch.device(device)
        v = vocab_size
        greedy = [p.greedy for p in params]
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy)]

        def row_tensor(values: list, dtype: torch.dtype, neutral: object) -> Tensor | None:
            # None when every row holds the neutral value: the sampler then skips the whole stage.
            return None if all(x == neutral for x in values) else _to_device(values, dtype, device)

        sampled = [not g for g in greedy]
        top_k = row_tensor(
            [min(p.top_k, v) if s and p.top_k > 0 else v for p, s in zip(params, sampled)], torch.int64, v
        )
        top_p = row_tensor([p.top_p if s else 1.0 for p, s in zip(params, sampled)], torch.float32, 1.0)
        min_p = row_tensor([p.min_p if s else 0.0 for p, s in zip(params, sampled)], torch.float32, 0.0)

        rep = row_tensor([p.repetition_penalty for p in params], torch.float32, 1.0)
        seen_mask = None
        if rep is not None:
            # Only rows that use the penalty contribute ids: a long prompt elsewhere costs nothing.
            seen = [
                (pr, out) if p.repetition_penalty != 1.0 else ()
                for p, pr, out in zip(params, prompt_ids, output_ids)
            ]
            seen_mask = _scatter_ids(seen, v, device) > 0

        freq = row_tensor([p.frequency_penalty for p in params], torch.float32, 0.0)
        pres = row_tensor([p.presence_penalty for p in params], torch.float32, 0.0)
        counts = None
        if freq is not None or pres is not None:
            if freq is None:
                freq = _to_device([0.0] * len(params), torch.float32, device)
            if pres is None:
                pres = _to_device([0.0] * len(params), torch.float32, device)
            counted = [
                (out,) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 else ()
                for p, out in zip(params, output_ids)
            ]
            counts = _scatter_ids(counted, v, device)

        ban_rows: list[int] = []
        ban_cols: list[int] = []
        for row, (p, out) in enumerate(zip(params, output_ids)):
            if len(out) < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                for tok in sorted(t for t in banned if 0 <= t < v):
                    ban_rows.append(row)
                    ban_cols.append(tok)

        seeded = []
        for row, (p, out) in enumerate(zip(params, output_ids)):
            if p.seed is not None and not greedy[row]:
                gen = torch.Generator(device=device)
                gen.manual_seed(_mix_seed(p.seed, len(out)))
                seeded.append((row, gen))

        asked = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            temperature=_to_device(temps, torch.float32, device),
            greedy=_to_device(greedy, torch.bool, device),
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=rep,
            seen_mask=seen_mask,
            frequency_penalty=freq,
            presence_penalty=pres,
            output_counts=counts,
            ban_rows=_to_device(ban_rows, torch.int64, device) if ban_rows else None,
            ban_cols=_to_device(ban_cols, torch.int64, device) if ban_cols else None,
            seeded=tuple(seeded),
            num_logprobs=min(max(asked), v) if asked else -1,
            all_greedy=all(greedy),
            any_sampled_filter=top_k is not None or top_p is not None,
        )


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: Tensor             # [B] int64
    logprobs: Tensor | None       # [B] float32 logprob of the sampled token; None if no row asked
    top_ids: Tensor | None        # [B, K] int64, K = max logprobs asked (None if K == 0)
    top_logprobs: Tensor | None   # [B, K] float32; rows that asked for fewer use a prefix


class Sampler:
    """Stateless: all per-request state comes in through the `SamplingBatch`."""

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> SamplerOutput:
        # logits: [B, V] float32; not modified.
        logits = self.penalize(logits, batch)
        greedy_ids = logits.argmax(dim=-1)
        if batch.all_greedy and batch.num_logprobs < 0:
            return SamplerOutput(greedy_ids, None, None, None)

        scaled = logits / batch.temperature.unsqueeze(1)
        token_ids = greedy_ids
        if not batch.all_greedy:
            sampled_ids = self._sample(self._truncate(scaled, batch), batch)
            token_ids = torch.where(batch.greedy, greedy_ids, sampled_ids)
        if batch.num_logprobs < 0:
            return SamplerOutput(token_ids, None, None, None)

        logprobs = torch.log_softmax(scaled, dim=-1)
        chosen = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
        if batch.num_logprobs == 0:
            return SamplerOutput(token_ids, chosen, None, None)
        top_logprobs, top_ids = logprobs.topk(batch.num_logprobs, dim=-1)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)

    @staticmethod
    def penalize(logits: Tensor, batch: SamplingBatch) -> Tensor:
        """Penalties and min_tokens bans; returns a new tensor if anything applies, else `logits`."""
        # logits: [B, V]
        if logits.dtype != torch.float32:
            logits = logits.float()
        if batch.seen_mask is not None:
            penalty = batch.repetition_penalty.unsqueeze(1)
            scaled = torch.where(logits > 0, logits / penalty, logits * penalty)
            logits = torch.where(batch.seen_mask, scaled, logits)
        if batch.output_counts is not None:
            counts = batch.output_counts
            logits = (
                logits
                - batch.frequency_penalty.unsqueeze(1) * counts
                - batch.presence_penalty.unsqueeze(1) * (counts > 0).float()
            )
        if batch.ban_rows is not None:
            # new_full fills on the device; torch.tensor(-inf, device=...) would be a synchronous copy.
            logits = logits.index_put((batch.ban_rows, batch.ban_cols), logits.new_full((), float("-inf")))
        return logits

    @staticmethod
    def _truncate(scaled: Tensor, batch: SamplingBatch) -> Tensor:
        """top-k, top-p, min-p as -inf masks; the row's best token always survives."""
        # scaled: [B, V] temperature-scaled logits
        out = scaled
        if batch.any_sampled_filter:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [B, V] each
            rank = torch.arange(scaled.shape[-1], device=scaled.device).unsqueeze(0)  # [1, V]
            drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
            if batch.top_k is not None:
                drop |= rank >= batch.top_k.unsqueeze(1)
            if batch.top_p is not None:
                probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
                mass_before = probs.cumsum(dim=-1) - probs
                # top_p == 1 keeps everything even where rounding pushes the cumsum past 1.
                limit = torch.where(batch.top_p >= 1.0, float("inf"), batch.top_p).unsqueeze(1)
                drop |= mass_before >= limit
            drop[:, 0] = False
            out = out.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        if batch.min_p is not None:
            # p_i >= min_p * p_max  <=>  logit_i >= logit_max + log(min_p); log(0) = -inf keeps all.
            best = out.max(dim=-1, keepdim=True).values
            out = out.masked_fill(out < best + batch.min_p.log().unsqueeze(1), float("-inf"))
        return out

    @staticmethod
    def _sample(truncated: Tensor, batch: SamplingBatch) -> Tensor:
        # truncated: [B, V]; returns [B] int64
        probs = truncated.softmax(dim=-1)
        noise = torch.empty_like(probs).exponential_()
        for row, gen in batch.seeded:  # loop over seeded rows only, each one device-side fill
            noise[row].exponential_(generator=gen)
        # Exponential draws can be exactly 0 in float32; 0/0 = NaN would win the argmax.
        return (probs / noise.clamp_min_(1e-20)).argmax(dim=-1)
