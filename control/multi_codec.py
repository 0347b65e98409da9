"""Several KV codecs in one deployment (`zipserve serve --codec hack2,bf16`): one `RayBackend` per
codec, each with its own prefill and decode workers (an engine's pages have one codec), behind one
router. A request's `codec` field picks its lane; requests that name none go to the first codec.
Each lane has its own decode_kv (`--decode-kv dense,compressed`: one mode per codec).

The lanes share the cluster's GPUs: each worker asks Ray for its share of all lanes' workers, and
on a shared GPU the decode engines divide the memory between all lanes' decode workers
(control/placement.py). Lanes start one after another, so each sizes its pools from what the
earlier ones left. Every copy of the model's weights costs memory: N codecs hold N times as many.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import AsyncIterator

from zipserve.control.config import ServeConfig
from zipserve.control.messages import MultiCodecHealth
from zipserve.control.ray_backend import RayBackend
from zipserve.router.backend import BackendEvent, FinishEvent, Job
from zipserve.transfer.link import LinkUsage


def make_backend(cfg: ServeConfig) -> RayBackend | MultiCodecBackend:
    """The backend `cfg` asks for: one RayBackend for one codec, lanes for several."""
    return MultiCodecBackend(cfg) if cfg.extra_codecs else RayBackend(cfg)


class MultiCodecBackend:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.codecs = cfg.codecs
        per_lane = cfg.num_prefill + cfg.num_decode
        self.lanes: dict[str, RayBackend] = {}
        try:
            for codec in self.codecs:
                lane_cfg = dataclasses.replace(
                    cfg, codec=codec, extra_codecs=(), decode_kv=cfg.decode_kv_modes[codec]
                )
                self.lanes[codec] = RayBackend(
                    lane_cfg,
                    cluster_workers=len(self.codecs) * per_lane,
                    cluster_decode=len(self.codecs) * cfg.num_decode,
                )
        except BaseException:
            self.shutdown()
            raise
        first = self.lanes[self.codecs[0]]
        self.model_name, self.max_model_len = first.model_name, first.max_model_len
        self.vocab_size = first.vocab_size
        self.has_tokenizer = first.has_tokenizer
        self.device = first.device
        self.prefill = [a for lane in self.lanes.values() for a in lane.prefill]
        self.decode = [a for lane in self.lanes.values() for a in lane.decode]

    def lane(self, codec: str | None) -> RayBackend | None:
        return self.lanes.get(codec or self.codecs[0])

    # -- Backend protocol --------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.lanes[self.codecs[0]].tokenize(text)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.lanes[self.codecs[0]].apply_chat_template(messages)

    def token_strings(self, ids: list[int]) -> list[str]:
        return self.lanes[self.codecs[0]].token_strings(ids)

    async def stream(self, job: Job) -> AsyncIterator[BackendEvent]:
        lane = self.lane(job.codec)
        if lane is None:  # the router refuses these with a 400 first
            yield FinishEvent(
                "error",
                error=f"codec: this deployment serves {', '.join(self.codecs)}, not {job.codec!r}",
            )
            return
        async for ev in lane.stream(job):
            yield ev

    async def abort(self, job_id: str) -> None:
        for lane in self.lanes.values():  # unknown ids are a no-op in the others
            await lane.abort(job_id)

    def health(self) -> dict:
        """/health's backend part (MultiCodecHealth.to_json)."""
        return self.health_report().to_json()

    def health_report(self) -> MultiCodecHealth:
        """Every lane's workers (named codec/role-i) and counters; "ok" while any lane can
        serve, "degraded" when any cannot (or has an unhealthy worker)."""
        views = {codec: lane.health_report() for codec, lane in self.lanes.items()}
        workers = [
            dataclasses.replace(w, name=f"{codec}/{w.name}")
            for codec, v in views.items()
            for w in v.workers
        ]
        failures, events = Counter(), Counter()
        for v in views.values():
            failures.update(v.failures)
            events.update(v.events)
        ok = [v.status == "ok" for v in views.values()]
        return MultiCodecHealth(
            status="ok" if any(ok) else "unavailable",
            codec=self.codecs[0],
            codecs=list(self.codecs),
            device=self.device,
            workers=workers,
            pairs={c: v.pairs for c, v in views.items()},
            degraded=not all(ok) or any(v.degraded for v in views.values()),
            failures=dict(failures),
            events=dict(events),
            lanes={c: v.status for c, v in views.items()},
            decode_kv=self.lanes[self.codecs[0]].decode_kv,
            lane_decode_kv={c: lane.decode_kv for c, lane in self.lanes.items()},
        )

    # -- what serve and the benchmarks use ---------------------------------------------------
    def idle(self) -> bool:
        return all(lane.idle() for lane in self.lanes.values())

    def set_link(self, gbps: float | None, latency_ms: float = 0.0) -> None:
        for lane in self.lanes.values():
            lane.set_link(gbps, latency_ms)

    def link_usage(self, window_s: float) -> LinkUsage | None:
        return LinkUsage.mean([lane.link_usage(window_s) for lane in self.lanes.values()])

    def shutdown(self) -> None:
        for lane in self.lanes.values():
            lane.shutdown()
