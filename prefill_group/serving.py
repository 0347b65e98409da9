"""The router side of a prefill group: one job's prefill on the group, its first token sampled
from the group's logits, its layers assembled and handed to the reserved decode worker.

`group_prefill` returns a report with the fields RayBackend.stream reads from a PrefillWorker's
report (first_token, first_logprob, prefill_start, prefill_end, bytes_sent), so the backend
branches on `cfg.group.use_group(len(prompt_ids))` and otherwise runs unchanged. The slices
travel actor -> router through Ray's object store and are assembled here (not streamed layer by
layer while the group computes).
"""

from __future__ import annotations

import asyncio
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
    """When the decode worker had imported every layer."""
    bytes_sent: int
    """KV bytes handed to the decode worker."""
    exchange_bytes: int
    """Bytes the group's all-to-alls moved between its workers."""


async def group_prefill(group: RayPrefillGroup, decode_actor, request_id: str,
                        prompt_ids: list[int], params: SamplingParams) -> GroupPrefillReport:
    start = time.time()
    res = await group.prefill_async(prompt_ids)
    gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    s = Sampler().sample(res.logits, [params], [gen])
    end = time.time()
    blobs = [kv.to_bytes() for kv in res.layers(request_id)]
    await asyncio.gather(*[decode_actor.import_kv.remote(b) for b in blobs])
    lp = None if s.logprobs is None else float(s.logprobs[0])
    return GroupPrefillReport(request_id, int(s.token_ids[0]), lp, start, end, time.time(),
                              sum(len(b) for b in blobs), res.sent_bytes())
