"""Sliding-window perplexity of a model over documents (`zipserve eval ppl`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    tokens: int
    """Predicted tokens (every token of every document but its first)."""
    context: int
    stride: int


def sliding_window_nll(
    logits_fn: Callable[[list[int]], torch.Tensor], ids: list[int], context: int, stride: int
) -> tuple[float, int]:
    """Summed NLL and count of tokens 1..n-1 of ids, each predicted with up to `context` tokens
    of history; windows advance by `stride` and score only tokens not scored before."""
    if not 0 < stride <= context:
        raise ValueError(f"stride: must be in [1, context={context}], got {stride}")
    total, count, scored_to = 0.0, 0, 1  # token 0 is never predicted
    begin = 0
    while scored_to < len(ids):
        end = min(begin + context, len(ids))
        logp = torch.log_softmax(logits_fn(ids[begin:end]).float(), dim=-1)  # [w, V]
        targets = torch.tensor(ids[scored_to:end])
        rows = torch.arange(scored_to - begin - 1, end - begin - 1)
        total -= logp[rows, targets].sum().item()
        count += end - scored_to
        scored_to = end
        begin += stride
    return total, count


def perplexity(
    logits_fn: Callable[[list[int]], torch.Tensor],
    docs: Iterable[list[int]],
    context: int = 1024,
    stride: int = 512,
    progress: bool = True,
) -> PerplexityResult:
    docs = list(docs)
    nll, n = 0.0, 0
    for ids in tqdm(docs, desc="perplexity", disable=not progress):
        d_nll, d_n = sliding_window_nll(logits_fn, ids, context, stride)
        nll, n = nll + d_nll, n + d_n
    if n == 0:
        raise ValueError("docs: nothing to score (every document is shorter than 2 tokens)")
    return PerplexityResult(math.exp(nll / n), nll, n, context, stride)
