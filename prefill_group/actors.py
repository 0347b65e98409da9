"""A prefill group as N Ray actors (one per GPU, or CPU actors over gloo) that prefill one long
prompt together.

`RayPrefillGroup(n, model, codec)` checks the split at start-up (before any actor starts),
starts the actors, forms their process group (rank 0's node hosts the rendezvous) and then
`prefill(token_ids)` runs a prompt through all of them and returns a `GroupResult`: the last
token's logits (sample the first token from them) and, per layer, the N encoded slices that
`GroupResult.layers(request_id)` assembles into the `LayerKV`s a decode worker imports.
"""

from __future__ import annotations

import asyncio

import ray

from zipserve.compress.wire import SliceKV, slice_to_bytes
from zipserve.engine.loading import model_config_for
from zipserve.prefill_group.plan import UnsupportedSplit, plan_heads, token_slices
from zipserve.prefill_group.rank import GroupRank, RankResult
from zipserve.prefill_group.result import GroupResult, merge
from zipserve.transfer.ports import hold_free_port


class GroupMember:
    """The actor body: one GroupRank."""

    def __init__(
        self,
        model: str,
        codec: str,
        rank: int,
        n: int,
        page_size: int,
        device: str | None,
        dtype: str | None,
        max_positions: int | None,
        lowrank_exchange: bool = True,
    ):
        self.member = GroupRank(
            model,
            codec,
            rank,
            n,
            page_size=page_size,
            device=device,
            dtype=dtype,
            max_positions=max_positions,
            lowrank_exchange=lowrank_exchange,
        )

    def address(self) -> str:
        return ray.util.get_node_ip_address()

    def free_port(self) -> int:
        """A port for the group's store, held bound here until connect serves it (rank 0)."""
        return hold_free_port()

    def connect(self, store_addr: str, port: int, timeout_s: float) -> None:
        self.member.connect(store_addr, port, timeout_s, name="prefill-group")

    def prefill(self, token_ids: list[int], request_id: str = "", decode_actor=None) -> RankResult:
        """With decode_actor: each layer's slice goes straight to its import_kv_slice as soon
        as it is encoded (all ranks in parallel); returns once every slice was accepted."""
        if decode_actor is None:
            return self.member.prefill(token_ids)
        sent = []

        def sink(s: SliceKV) -> None:
            sent.append(
                decode_actor.import_kv_slice.remote(slice_to_bytes(s, request_id, self.member.n))
            )

        res = self.member.prefill(token_ids, sink=sink)
        ray.get(sent)
        return res


class RayPrefillGroup:
    def __init__(
        self,
        n: int,
        model: str,
        codec: str = "bf16",
        page_size: int = 64,
        device: str | None = None,
        dtype: str | None = "auto",
        max_positions: int | None = None,
        timeout_s: float = 120.0,
        lowrank_exchange: bool = True,
    ):
        cfg = model_config_for(model)
        plan_heads(cfg.num_heads, cfg.num_kv_heads, n)  # refuse before starting anything
        if getattr(cfg, "lckv", None) is not None:
            raise UnsupportedSplit("prefill group: LCKV checkpoints are not supported")
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self.device = device or ("cuda" if gpus else "cpu")
        free = ray.available_resources().get("GPU", 0)
        if self.device == "cuda" and free < n:  # one whole GPU per member, or Ray waits forever
            raise UnsupportedSplit(
                f"prefill group: {n} workers need {n} free GPUs, Ray has {free:g} free of {gpus}"
            )
        opts = {"num_gpus": 1} if self.device == "cuda" else {"num_cpus": 0}
        cls = ray.remote(**opts)(GroupMember)
        # each actor sees its own GPU as cuda:0
        dev = "cuda:0" if self.device == "cuda" else "cpu"
        self.n, self.page_size = n, page_size
        self.prompts_run = 0
        self.exchange_bytes = 0
        """Bytes the all-to-alls moved between the members, all prompts so far."""
        self.actors = [
            cls.remote(model, codec, r, n, page_size, dev, dtype, max_positions, lowrank_exchange)
            for r in range(n)
        ]
        addr, port = ray.get([self.actors[0].address.remote(), self.actors[0].free_port.remote()])
        ray.get([a.connect.remote(addr, port, timeout_s) for a in self.actors])

    def prefill(self, token_ids: list[int]) -> GroupResult:
        """Every actor runs its slice; raises UnsupportedSplit (a ValueError) for a prompt too
        short for the group, RayError when an actor fails."""
        token_slices(len(token_ids), self.n, self.page_size)  # refuse here, not in N actors
        self.prompts_run += 1
        res = merge(ray.get([a.prefill.remote(list(token_ids)) for a in self.actors]))
        self.exchange_bytes += res.sent_bytes()
        return res

    async def prefill_async(
        self, token_ids: list[int], request_id: str = "", decode_actor=None
    ) -> GroupResult:
        """prefill() for an asyncio caller (the router's event loop is never blocked). With
        decode_actor (a DecodeWorker that reserved request_id), every rank sends its slices
        straight to it and the worker assembles the layers; the result then holds no slices."""
        token_slices(len(token_ids), self.n, self.page_size)
        self.prompts_run += 1
        res = merge(
            list(
                await asyncio.gather(
                    *[
                        a.prefill.remote(list(token_ids), request_id, decode_actor)
                        for a in self.actors
                    ]
                )
            )
        )
        self.exchange_bytes += res.sent_bytes()
        return res

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
