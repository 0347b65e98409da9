"""The router's Backend over Ray for one codec: prefill and decode workers as Ray actors
(control/launch.py makes them, control/worker_pool.py keeps them, their KV channels and their
health), each job walked through its stages by control/lifecycle.py (reserve, prefill, transfer,
admit, decode) with control messages as actor calls, and /health answered from the monitor's
cached stats as a typed report (control/messages.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import ray

from zipserve.control.books import Books
from zipserve.control.config import ServeConfig
from zipserve.control.launch import plan_launch
from zipserve.control.lifecycle import Lifecycle
from zipserve.control.messages import DecodeStats, HealthReport, WorkerHealth
from zipserve.control.worker_pool import WorkerPool, WorkerSlot
from zipserve.engine.loading import model_config_for
from zipserve.engine.tokenizer import load_tokenizer
from zipserve.prefill_group.actors import RayPrefillGroup
from zipserve.router.backend import BackendEvent, Job
from zipserve.transfer.link import LinkUsage


class RayBackend:
    def __init__(
        self,
        cfg: ServeConfig,
        *,
        cluster_workers: int | None = None,
        cluster_decode: int | None = None,
    ):
        """One codec's workers. cluster_workers / cluster_decode: all worker / decode actors
        that share the cluster's GPUs (several codecs: control/multi_codec.py; default: this
        config's own)."""
        if cfg.extra_codecs:
            raise ValueError("RayBackend serves one codec: use control.multi_codec.make_backend")
        self.cfg = cfg
        self.codecs = (cfg.codec,)
        mc = model_config_for(cfg.model)
        launch = plan_launch(
            cfg,
            mc.max_position_embeddings,
            cluster_workers=cluster_workers,
            cluster_decode=cluster_decode,
        )
        self.pool = WorkerPool(
            launch.prefill_cls,
            launch.decode_cls,
            launch.prefill_args,
            launch.decode_args,
            cfg.num_prefill,
            cfg.num_decode,
            link_gbps=cfg.link_gbps,
            link_latency_ms=cfg.link_latency_ms,
            health_interval_s=cfg.health_interval_s,
            prefill_first=launch.prefill_first,
        )
        self.prefill = [w.actor for w in self.pool.prefill]
        self.decode = [w.actor for w in self.pool.decode]
        info = ray.get(self.decode[0].info.remote())
        self.device = info.device
        self.decode_kv = info.decode_kv
        """The decode workers' decode_kv, `auto` resolved by the first of them."""
        self.decode_kv_reason = info.decode_kv_reason
        self.prefill_group = (
            None
            if not cfg.group.enabled
            else RayPrefillGroup(
                cfg.prefill_group,
                cfg.model,
                cfg.codec,
                cfg.engine_options.get("page_size", 64),
                launch.device,
                lowrank_exchange=cfg.group.lowrank_exchange,
            )
        )
        self.page_size = info.page_size
        self.tokenizer = load_tokenizer(cfg.model, cfg.skip_tokenizer)
        self.has_tokenizer = not cfg.skip_tokenizer
        self.model_name = cfg.model_name
        self.max_model_len = mc.max_position_embeddings
        self.vocab_size = mc.vocab_size
        self.kv_bytes_per_token_bf16 = mc.kv_bytes_per_token(2)
        self.books = Books.empty(cfg.num_prefill, cfg.num_decode)
        self.lifecycle = Lifecycle(
            cfg,
            self.pool,
            self.books,
            page_size=self.page_size,
            kv_bytes_per_token_bf16=self.kv_bytes_per_token_bf16,
            prefill_group=self.prefill_group,
        )

    @property
    def counts(self):
        """Failures and retries seen by the request path, by reason."""
        return self.books.counts

    @property
    def prefilling(self) -> dict[int, int]:
        """Prefill worker -> prompts it is running."""
        return self.books.prefilling

    # -- Backend protocol --------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    def token_strings(self, ids: list[int]) -> list[str]:
        if not self.has_tokenizer:  # vLLM's names for tokens without a tokenizer
            return [f"token_id:{i}" for i in ids]
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def stream(self, job: Job) -> AsyncIterator[BackendEvent]:
        return self.lifecycle.run(job)

    async def abort(self, job_id: str) -> None:
        j = self.books.jobs.get(job_id)
        if j is not None:
            await self.decode[j].abort.remote(job_id)

    def health(self) -> dict:
        """/health's backend part (HealthReport.to_json)."""
        return self.health_report().to_json()

    def health_report(self) -> HealthReport:
        """From the monitor's cached stats (never waits on a worker)."""
        failures = self.pool.failures() + self.books.counts
        return HealthReport(
            status="ok" if self.pool.usable_pairs() else "unavailable",
            codec=self.cfg.codec,
            decode_kv=self.decode_kv,
            device=self.device,
            workers=[self._worker_health(w) for w in self.pool.workers],
            pairs=self.pool.pairs_view(),
            degraded=not all(w.healthy for w in self.pool.workers),
            failures=dict(failures),
            events=dict(self.pool.events),
        )

    def _worker_health(self, w: WorkerSlot) -> WorkerHealth:
        st = w.stats
        if w.role == "prefill":
            queued, running = self.books.outstanding[("p", w.index)], self.books.prefilling[w.index]
        else:
            queued, running = self.books.awaiting_kv[w.index], 0 if st is None else st.running
        return WorkerHealth(
            name=w.name,
            role=w.role,
            healthy=w.healthy,
            codec=self.cfg.codec if st is None else st.codec,
            decode_kv=st.decode_kv if isinstance(st, DecodeStats) else None,
            free_pages=0 if st is None else st.free_pages,
            used_pages=0 if st is None else st.used_pages,
            queued_tokens=queued,
            running=running,
            restarts=w.restarts_seen,
            dead=w.dead,
            error=w.last_error,
            cached_pages=0 if st is None else st.cached_pages,
            cache_hit_rate=(
                st.cache_hit_tokens / st.cache_lookup_tokens
                if st is not None and st.cache_lookup_tokens
                else None
            ),
        )

    # -- what serve and the benchmarks use ---------------------------------------------------
    def set_link(self, gbps: float | None, latency_ms: float = 0.0) -> None:
        """Change the emulated prefill -> decode link of every pair (call only when idle)."""
        ray.get([p.set_link.remote(gbps, latency_ms) for p in self.prefill])
        self.cfg.link_gbps, self.cfg.link_latency_ms = gbps, latency_ms

    def link_usage(self, window_s: float) -> LinkUsage | None:
        """Mean busy and hand-off fractions of the emulated links over the last window_s
        seconds (transfer/link.py)."""
        return LinkUsage.mean(ray.get([p.link_usage.remote(window_s) for p in self.prefill]))

    def idle(self) -> bool:
        """No request reserved, waiting or running on any decode worker, every page free."""
        stats = ray.get([d.stats.remote() for d in self.decode])
        return all(
            s.free_pages == s.capacity_pages
            and s.reserved == 0
            and s.running == 0
            and s.waiting == 0
            for s in stats
        )

    def shutdown(self) -> None:
        """Stop the health monitor, the workers' threads and the actors themselves."""
        self.pool.stop()
        # prefill first: its queued sends leave while the decode workers still take them
        for role, actors in (("prefill", self.prefill), ("decode", self.decode)):
            try:
                ray.get([a.shutdown.remote() for a in actors], timeout=15)
            except (ray.exceptions.RayError, TimeoutError) as e:
                print(f"zipserve: {role} workers did not stop cleanly: {e}")
        for actor in self.prefill + self.decode:
            ray.kill(actor)
        if self.prefill_group is not None:
            self.prefill_group.shutdown()
