"""Turns a batch of next-token logits into token ids (plus optional logprobs).

`Sampler` owns the per-row policy of `SamplingParams`: greedy argmax, temperature, top-k, top-p, and
the per-request seeded generators. It is vectorized across rows (per-row knobs become tensors,
top-k and top-p share one sort); only the seeded rows draw their noise one row at a time, from their
own `torch.Generator`, so a seeded request samples the same tokens whatever else is in the batch.
All arithmetic is float32 on the logits' device (CPU or CUDA); the per-row knobs reach a GPU
through pinned memory (compress/device_copy.py), so sampling queues its kernels without waiting
for the forward pass (only reading the tokens back waits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zipserve.compress.device_copy import index_on, to_device_nowait

from .sampling_params import SamplingParams

MIN_TEMPERATURE = 1e-6
"""Temperatures below this are clamped, so that logits / temperature stays finite."""


@dataclass
class SampleResult:
    """What the sampler chose for each row of the batch."""

    token_ids: torch.Tensor
    """[B] int64, on the logits' device."""
    logprobs: torch.Tensor | None
    """[B] float32: log_softmax of the raw logits at the chosen token; None if no row asked."""
    top_logprobs: list[list[tuple[int, float]] | None]
    """Per row: the top-k (token id, raw logprob), most probable first, when logprobs=k > 0."""


class Sampler:
    """Stateless; `sample` is the whole interface."""

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None] | None = None,
    ) -> SampleResult:
        """Pick one token per row of `logits` [B, V] (any float dtype)."""
        if logits.dim() != 2:
            raise ValueError(f"logits: expected [B, V], got shape {tuple(logits.shape)}")
        B, V = logits.shape
        if generators is None:
            generators = [None] * B
        if len(params) != B or len(generators) != B:
            raise ValueError(
                f"params/generators: expected {B} each, got {len(params)}/{len(generators)}"
            )
        device = logits.device
        logits = logits.float()  # [B, V] float32

        token_ids = torch.empty(B, dtype=torch.int64, device=device)  # [B]
        greedy_rows = [i for i, p in enumerate(params) if p.greedy]
        random_rows = [i for i, p in enumerate(params) if not p.greedy]
        if len(greedy_rows) == B:
            token_ids = logits.argmax(dim=-1)
        else:
            if greedy_rows:
                g_idx = index_on(greedy_rows, device)
                token_ids[g_idx] = logits[g_idx].argmax(dim=-1)
            sub_params = [params[i] for i in random_rows]
            sub_gens = [generators[i] for i in random_rows]
            if len(random_rows) == B:
                token_ids = self._sample_random(logits, sub_params, sub_gens)
            else:
                r_idx = index_on(random_rows, device)
                token_ids[r_idx] = self._sample_random(logits[r_idx], sub_params, sub_gens)

        logprobs, top = self._logprobs(logits, token_ids, params)
        return SampleResult(token_ids=token_ids, logprobs=logprobs, top_logprobs=top)

    @staticmethod
    def _sample_random(
        logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
    ) -> torch.Tensor:
        """Temperature, top-k, top-p, then a categorical draw; logits [R, V] float32 -> [R] int64."""
        R, V = logits.shape
        device = logits.device
        temps = to_device_nowait(
            torch.tensor([max(p.temperature, MIN_TEMPERATURE) for p in params]), device
        )  # [R]
        x = logits / temps[:, None]  # [R, V]

        # top_k <= 0 means disabled: keep all V.
        top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
        top_p = [p.top_p for p in params]
        if any(k < V for k in top_k) or any(p < 1.0 for p in top_p):
            sorted_x, sorted_idx = x.sort(dim=-1, descending=True)  # [R, V] each
            ranks = torch.arange(V, device=device)[None, :]  # [1, V]
            k_t = index_on(top_k, device)[:, None]  # [R, 1]
            sorted_x = sorted_x.masked_fill(ranks >= k_t, float("-inf"))
            # Nucleus over the top-k survivors: keep a token if the mass strictly before it is
            # < top_p, i.e. the smallest prefix whose mass reaches top_p; rank 0 always survives.
            probs_sorted = sorted_x.softmax(dim=-1)  # [R, V]
            mass_before = probs_sorted.cumsum(dim=-1) - probs_sorted  # [R, V]
            p_t = to_device_nowait(torch.tensor(top_p), device)[:, None]  # [R, 1]
            drop = (mass_before >= p_t) & (ranks > 0)
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.full_like(x, float("-inf")).scatter_(1, sorted_idx, sorted_x)  # [R, V]

        probs = x.softmax(dim=-1)  # [R, V]
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) draws i with probability p_i.
        q = torch.empty_like(probs)  # [R, V]
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if len(unseeded) == R:
            q.exponential_()
        else:
            if unseeded:
                u_idx = index_on(unseeded, device)
                q[u_idx] = torch.empty(len(unseeded), V, device=device).exponential_()
            for i, g in enumerate(generators):
                if g is not None:
                    q[i].exponential_(generator=g)
        q.clamp_min_(torch.finfo(torch.float32).tiny)  # an exact 0 would turn 0/0 into NaN
        return (probs / q).argmax(dim=-1)  # [R]

    @staticmethod
    def _logprobs(
        logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
    ) -> tuple[torch.Tensor | None, list[list[tuple[int, float]] | None]]:
        """Raw (pre-temperature, pre-filter) logprobs of the chosen tokens and per-row top-k."""
        top: list[list[tuple[int, float]] | None] = [None] * len(params)
        if all(p.logprobs is None for p in params):
            return None, top
        lp = logits.log_softmax(dim=-1)  # [B, V]
        chosen = lp.gather(1, token_ids[:, None]).squeeze(1)  # [B]
        k_max = min(max(p.logprobs or 0 for p in params), lp.shape[1])
        if k_max > 0:
            vals, idx = lp.topk(k_max, dim=-1)  # [B, k_max], sorted descending
            vals_l, idx_l = vals.tolist(), idx.tolist()
            for i, p in enumerate(params):
                if p.logprobs:
                    top[i] = list(zip(idx_l[i][: p.logprobs], vals_l[i][: p.logprobs]))
        return chosen, top
