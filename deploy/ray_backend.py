"""The router's Backend over Ray: prefill and decode workers as Ray actors, one KV channel per
(prefill, decode) pair, control messages (reserve, admit, poll, abort) as actor calls.

A job: pick the pair with the fewest outstanding tokens -> reserve pages on its decode worker
(refused at once when short: 503) -> prefill, which streams the KV layer by layer to the decode
worker -> admit -> poll tokens until finished -> release. Phase times come from the workers'
own clocks (time.time on one host).
"""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import dataclass, field
from typing import AsyncIterator

import ray

from zipserve.decode_worker.worker import DecodeWorker
from zipserve.engine.loading import model_config_for
from zipserve.engine.sampling_params import SamplingParams
from zipserve.engine.tokenizer import load_tokenizer
from zipserve.prefill_group.actors import RayPrefillGroup
from zipserve.prefill_group.serving import group_prefill
from zipserve.prefill_worker.worker import PrefillWorker
from zipserve.router.backend import BackendEvent, FinishEvent, Job, PhaseEvent, TokenEvent


@dataclass
class ServeConfig:
    """What `zipserve serve` starts."""

    model: str
    codec: str = "bf16"
    num_prefill: int = 1
    num_decode: int = 1
    device: str | None = None
    """'cuda', 'cpu' or None (GPU when Ray sees one)."""
    link_gbps: float | None = None
    """Emulated link bandwidth between prefill and decode (None: as fast as the channel)."""
    link_latency_ms: float = 0.0
    transfer_deadline_s: float = 30.0
    engine_options: dict = field(default_factory=dict)
    prefill_group: int = 0
    """Workers of the sequence-parallel prefill group (0: none); see prefill_group/."""
    prefill_group_min_tokens: int = 16384
    """Prompts of at least this many tokens go to the group."""

    def __post_init__(self) -> None:
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("--prefill and --decode: need at least one worker of each")
        from zipserve.prefill_group.config import validate_group

        self.group = validate_group(self.model, self.prefill_group,
                                    self.prefill_group_min_tokens,
                                    self.engine_options.get("page_size", 64))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayBackend:
    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        gpus = int(ray.cluster_resources().get("GPU", 0))
        device = cfg.device or ("cuda" if gpus else "cpu")
        workers = cfg.num_prefill + cfg.num_decode
        share = 1.0 if gpus >= workers else (gpus / workers if gpus else 0)
        opts = {"num_gpus": share} if device == "cuda" else {"num_cpus": 0}
        prefill_cls = ray.remote(**opts)(PrefillWorker)
        decode_cls = ray.remote(max_concurrency=64, **opts)(DecodeWorker)
        args = dict(model=cfg.model, codec=cfg.codec, device=device,
                    engine_options=cfg.engine_options)
        self.prefill = [prefill_cls.remote(**args) for _ in range(cfg.num_prefill)]
        self.decode = [decode_cls.remote(**args) for _ in range(cfg.num_decode)]
        info = ray.get(self.decode[0].info.remote())
        self.device = info["device"]
        # One KV channel per pair: prefill is rank 0 (hosts the rendezvous), decode rank 1.
        calls = []
        for i, p in enumerate(self.prefill):
            for j, d in enumerate(self.decode):
                port, name = _free_port(), f"p{i}-d{j}"
                calls += [p.connect.remote(f"d{j}", "127.0.0.1", port, 0, name, cfg.link_gbps,
                                           cfg.link_latency_ms),
                          d.connect.remote(f"p{i}", "127.0.0.1", port, 1, name, cfg.link_gbps,
                                           cfg.link_latency_ms)]
        ray.get(calls)
        self.prefill_group = None if not cfg.group.enabled else RayPrefillGroup(
            cfg.prefill_group, cfg.model, cfg.codec, cfg.engine_options.get("page_size", 64),
            device)
        self.tokenizer = load_tokenizer(cfg.model)
        mc = model_config_for(cfg.model)
        self.model_name = cfg.model
        self.max_model_len = mc.max_position_embeddings
        self.kv_bytes_per_token_bf16 = mc.kv_bytes_per_token(2)
        self.outstanding = {("p", i): 0 for i in range(cfg.num_prefill)}
        self.outstanding.update({("d", j): 0 for j in range(cfg.num_decode)})
        self._jobs: dict[str, int] = {}  # job id -> decode index

    # -- Backend protocol --------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    def health(self) -> dict:
        try:
            stats = ray.get([d.stats.remote() for d in self.decode], timeout=5)
        except Exception as e:  # a worker is down
            return {"status": "degraded", "error": str(e)}
        return {"status": "ok", "codec": self.cfg.codec, "device": self.device,
                "decode_workers": stats, "prefill_workers": len(self.prefill)}

    async def abort(self, job_id: str) -> None:
        j = self._jobs.get(job_id)
        if j is not None:
            await self.decode[j].abort.remote(job_id)

    def _pick(self, kind: str, n: int) -> int:
        return min(range(n), key=lambda i: self.outstanding[(kind, i)])

    async def stream(self, job: Job) -> AsyncIterator[BackendEvent]:
        if job.codec not in (None, self.cfg.codec):
            yield FinishEvent("error", error=f"codec: this deployment serves {self.cfg.codec!r}"
                                             f", not {job.codec!r}")
            return
        params = SamplingParams(max_tokens=job.max_tokens, temperature=job.temperature,
                                top_p=job.top_p, top_k=max(job.top_k, 0), seed=job.seed,
                                stop=tuple(job.stop))
        pi, dj = self._pick("p", len(self.prefill)), self._pick("d", len(self.decode))
        cost = len(job.prompt_ids) + job.max_tokens
        self.outstanding[("p", pi)] += len(job.prompt_ids)
        self.outstanding[("d", dj)] += cost
        self._jobs[job.id] = dj
        dec, pre = self.decode[dj], self.prefill[pi]
        try:
            try:
                await dec.reserve.remote(job.id, job.prompt_ids, params,
                                         self.cfg.transfer_deadline_s)
            except ray.exceptions.RayTaskError as e:
                yield FinishEvent("error", error=f"overloaded: {e.cause}", codec=self.cfg.codec)
                return
            try:
                if self.prefill_group and self.cfg.group.use_group(len(job.prompt_ids)):
                    rep = await group_prefill(self.prefill_group, dec, job.id, job.prompt_ids,
                                              params)
                else:
                    rep = await pre.prefill.remote(job.id, job.prompt_ids, params, f"d{dj}")
            except ray.exceptions.RayError as e:  # the worker died or raised: fail this job
                cause = getattr(e, "cause", None) or e
                yield FinishEvent("error", error=f"unavailable: prefill worker {pi} failed: "
                                                 f"{type(cause).__name__}: {cause}",
                                  codec=self.cfg.codec)
                return
            self.outstanding[("p", pi)] -= len(job.prompt_ids)
            pi = None
            start = max(job.arrival, rep.prefill_start)
            yield PhaseEvent("queue", job.arrival, start)
            yield PhaseEvent("prefill", start, max(start, rep.prefill_end))
            try:
                res = await dec.admit.remote(job.id, rep.first_token, rep.first_logprob,
                                             self.cfg.transfer_deadline_s)
            except ray.exceptions.RayError as e:
                yield FinishEvent("error", error=f"unavailable: decode worker {dj} failed: {e}",
                                  codec=self.cfg.codec)
                return
            async for ev in self._tokens(dec, job.id, res, max(start, rep.prefill_end)):
                if isinstance(ev, FinishEvent):  # the prefill side knows what it sent
                    ev = dataclasses.replace(ev, kv_bytes=rep.bytes_sent, kv_bytes_bf16=len(
                        job.prompt_ids) * self.kv_bytes_per_token_bf16)
                yield ev
        finally:
            if pi is not None:
                self.outstanding[("p", pi)] -= len(job.prompt_ids)
            self.outstanding[("d", dj)] -= cost
            self._jobs.pop(job.id, None)
            dec.release.remote(job.id)

    async def _tokens(self, dec, job_id: str, res: dict,
                      prefill_end: float) -> AsyncIterator[BackendEvent]:
        """Token events as they are decoded, and the phases after prefill. Layers stream while
        prefill runs, so the transfer phase is only what remains after prefill ended (0 when
        the transfer was fully overlapped); each phase starts where the previous one ended."""
        sent, text, phases_done, decode_start = 0, "", False, prefill_end
        while True:
            new = res["tokens"]
            times = res["times"]
            if not phases_done and ("admitted" in times or res["finished"]):
                phases_done = True
                t_kv = max(prefill_end, times.get("kv_complete", prefill_end))
                t_adm = max(t_kv, times.get("admitted", t_kv))
                yield PhaseEvent("transfer", prefill_end, t_kv)
                yield PhaseEvent("decode_queue", t_kv, t_adm)
                decode_start = t_adm
            for k, tok in enumerate(new):  # the batch's new text rides on its last token
                delta = res["text"][len(text):] if k == len(new) - 1 else ""
                text += delta
                yield TokenEvent(tok, delta)
            sent += len(new)
            if res["finished"]:
                yield PhaseEvent("decode", decode_start, max(decode_start, times["finished"]))
                yield FinishEvent(res["finish_reason"], error=res["error"],
                                  codec=self.cfg.codec)
                return
            try:
                res = await dec.poll.remote(job_id, sent, 1.0)
            except ray.exceptions.RayError as e:  # the decode worker died mid-stream
                yield FinishEvent("error", error=f"unavailable: decode worker failed while "
                                                 f"decoding: {type(e).__name__}",
                                  codec=self.cfg.codec)
                return

    def shutdown(self) -> None:
        """Stop the workers' threads and the actors themselves."""
        try:
            ray.get([d.shutdown.remote() for d in self.decode], timeout=10)
        except (ray.exceptions.RayError, TimeoutError) as e:
            print(f"zipserve: decode workers did not stop cleanly: {e}")
        for actor in self.prefill + self.decode:
            ray.kill(actor)
        if self.prefill_group is not None:
            self.prefill_group.shutdown()
