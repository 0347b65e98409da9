"""The router side of a prefill group: one job's prefill on the group and its first token,
sampled from the group's logits.

Each rank sends its encoded slice of every layer straight to the reserved decode worker as soon
as the layer's K/V exist (DecodeWorker.import_kv_slice; the worker assembles a layer once all N
slices are in). `group_prefill` returns a report with the fields RayBackend.stream reads from a
PrefillWorker's report (first_token, first_logprob, prefill_start, prefill_end, bytes_sent), so the backend
branches on `cfg.group.use_group(len(prompt_ids))` and otherwise runs unchanged.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from zipserve.engine.sampler import Sampler
from zipserve.engine.sampling_params import SamplingParams
from zipserve.prefill_group.actors import RayPrefillGroup


@dataclass
class GroupPrefillReport:
    request_id: str
    first_token: int
    first_logprob: float | None
    prefill_start: float
    prefill_end: float
    """Wall-clock (time.time) bounds of the group's forward incl. encoding and sampling."""
    send_end: float
    """When every slice had been accepted by the decode worker (= prefill_end: the ranks
    return only after that)."""
    bytes_sent: int
    """KV bytes handed to the decode worker."""
    exchange_bytes: int
    """Bytes the group's all-to-alls moved between its workers."""


async def group_prefill(group: RayPrefillGroup, decode_actor, request_id: str,
                        prompt_ids: list[int], params: SamplingParams) -> GroupPrefillReport:
    start = time.time()
    res = await group.prefill_async(prompt_ids, request_id, decode_actor)
    gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    s = Sampler().sample(res.logits, [params], [gen])
    end = time.time()
    lp = None if s.logprobs is None else float(s.logprobs[0])
    return GroupPrefillReport(request_id, int(s.token_ids[0]), lp, start, end, end,
                              res.kv_bytes, res.sent_bytes())
