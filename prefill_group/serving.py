"""The router side of a prefill group: one job's prefill on the group and its first token,
sampled from the group's logits.

Each rank sends its encoded slice of every layer straight to the reserved decode worker as soon
as the layer's K/V exist (DecodeWorker.import_kv_slice; the worker assembles a layer once all N
slices are in). `group_prefill` returns the same `PrefillReport` a PrefillWorker does (the
all-to-all bytes in exchange_bytes), so the backend branches on
`cfg.group.use_group(len(prompt_ids))` and otherwise runs unchanged.
"""

from __future__ import annotations

import time

import torch

from zipserve.engine.sampler import Sampler
from zipserve.engine.sampling_params import SamplingParams
from zipserve.prefill_group.actors import RayPrefillGroup
from zipserve.prefill_worker.worker import PrefillReport


async def group_prefill(
    group: RayPrefillGroup,
    decode_actor,
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
) -> PrefillReport:
    start = time.time()
    res = await group.prefill_async(prompt_ids, request_id, decode_actor)
    gen = None if params.seed is None else torch.Generator().manual_seed(params.seed)
    s = Sampler().sample(res.logits, [params], [gen])
    end = time.time()
    lp = None if s.logprobs is None else float(s.logprobs[0])
    # send_end == prefill_end: the ranks return only once the decode worker took every slice
    return PrefillReport(
        request_id,
        int(s.token_ids[0]),
        lp,
        start,
        end,
        end,
        res.kv_bytes,
        res.dense_bytes,
        exchange_bytes=res.sent_bytes(),
        first_top_logprobs=s.top_logprobs[0] or [],
    )
