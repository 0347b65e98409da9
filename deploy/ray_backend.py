"""The router's Backend over Ray: prefill and decode workers as Ray actors (deploy/worker_pool.py
keeps them, their KV channels and their health), control messages (reserve, prefill, admit,
poll, release) as actor calls.

A job: wait (FIFO, bounded by `page_wait_s` and the job's timeout) until some healthy
(prefill, decode) pair's decode worker reserves the job's pages -> prefill, which streams the KV
layer by layer to that decode worker -> admit -> poll tokens until finished -> release. So
prefill never computes KV that no decode worker can take. A job whose prefill or decode worker
fails before its first token is tried again on another pair (`retries`); after a token was sent
it fails with a clear error. A request the engine refuses for one of its own values (token ids
outside the vocabulary, ...) fails at once with that message as a client error
(deploy/request_faults.py), without waiting for pages or a retry. Phase times come from the
workers' own clocks (time.time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import ray
from zipserve.decode_worker.worker import DecodeWorker
from zipserve.deploy.placement import gpu_share, role_engine_options
from zipserve.deploy.request_faults import RequestRefused, request_fault
from zipserve.deploy.worker_pool import WorkerPool
from zipserve.engine.disaggregated import Overloaded
from zipserve.engine.loading import model_config_for
from zipserve.engine.page_pool import pages_for
from zipserve.engine.sampling_params import SamplingParams
from zipserve.engine.tokenizer import load_tokenizer
from zipserve.prefill_group.actors import RayPrefillGroup
from zipserve.prefill_group.serving import group_prefill
from zipserve.prefill_worker.worker import PrefillWorker
from zipserve.router.backend import (
    BackendEvent,
    FinishEvent,
    Job,
    PhaseEvent,
    TokenEvent,
)


@dataclass
class ServeConfig:
    """What `zipserve serve` starts."""

    model: str
    codec: str = "bf16"
    """The deployment's KV codec: requests that name none use it."""
    extra_codecs: tuple[str, ...] = ()
    """More codecs served beside `codec`, each by its own prefill and decode workers
    (deploy/multi_codec.py); a request picks one with its `codec` field."""
    num_prefill: int = 1
    num_decode: int = 1
    device: str | None = None
    """'cuda', 'cpu' or None (GPU when Ray sees one)."""
    link_gbps: float | None = None
    """Emulated link bandwidth between prefill and decode (None: as fast as the channel)."""
    link_latency_ms: float = 0.0
    transfer_deadline_s: float = 30.0
    engine_options: dict = field(default_factory=dict)
    max_restarts: int = 3
    """Times Ray restarts a worker actor that died (then it stays dead)."""
    retries: int = 1
    """Times a job whose worker failed before its first token is tried again on another pair."""
    page_wait_s: float = 30.0
    """Longest a job waits for a healthy pair whose decode worker has pages for it."""
    health_interval_s: float = 0.5
    """How often every worker is asked for its stats (and restarts are noticed)."""
    prefill_resource: str | None = None
    """A custom Ray resource each prefill actor needs one unit of (pins them to nodes that
    offer it, e.g. a KubeRay prefill worker group); None: no custom resource."""
    decode_resource: str | None = None
    """The same for decode actors."""
    prefill_group: int = 0
    """Workers of the sequence-parallel prefill group (0: none); see prefill_group/."""
    prefill_group_min_tokens: int = 16384
    """Prompts of at least this many tokens go to the group."""
    prefill_group_exchange: str = "lowrank"
    """With a lowrank codec: "lowrank" exchanges projected Q/K/V, "full" the full ones."""
    served_model_name: str | None = None
    """The model's name in the API (/v1/models, a request's `model`); None: the last part of
    `model` (a checkpoint's directory name, never its absolute path)."""
    decode_kv: str = "compressed"
    """What decode workers keep of the codec's KV (engine/decode_kv.py): compressed, dense or
    auto; one mode for every lane, or one per codec separated by commas in `codecs` order.
    Only decode workers get it: prefill workers always send the codec's wire form."""
    skip_tokenizer: bool = False
    """Serve without a tokenizer (`--skip-tokenizer`; engine/no_tokenizer.py): prompts are token
    ids, completions answer with token ids and empty text, text prompts, chat and stop strings
    get a 400 naming the field. Passed to every worker's engine."""

    @property
    def model_name(self) -> str:
        return self.served_model_name or served_name(self.model)

    @property
    def codecs(self) -> tuple[str, ...]:
        """Every codec served, the default first."""
        return (self.codec,) + tuple(self.extra_codecs)

    @property
    def decode_kv_modes(self) -> dict[str, str]:
        """codec -> its lane's decode_kv."""
        modes = [m.strip() for m in self.decode_kv.split(",")]
        return dict(zip(self.codecs, modes * len(self.codecs) if len(modes) == 1 else modes))

    def __post_init__(self) -> None:
        from zipserve.compress.codecs import CODECS

        self.extra_codecs = tuple(self.extra_codecs)
        for c in self.codecs:
            if c not in CODECS:
                raise ValueError(f"--codec: unknown codec {c!r}; known: {', '.join(CODECS)}")
        if len(set(self.codecs)) != len(self.codecs):
            raise ValueError(f"--codec: a codec is named twice in {','.join(self.codecs)}")
        from zipserve.engine.config import EngineConfig

        if self.engine_options.get("skip_tokenizer") is True:  # --engine-option skip_tokenizer=true
            self.skip_tokenizer = True
        if self.skip_tokenizer:
            self.engine_options = {**self.engine_options, "skip_tokenizer": True}
        try:  # the workers build exactly this; refuse here, not as a Ray actor traceback
            EngineConfig(codec=self.codec, **self.engine_options)
        except (TypeError, ValueError) as e:  # unknown field / bad value
            raise ValueError(f"--engine-option: {e}") from None
        self._check_model()
        if "decode_kv" in self.engine_options:
            raise ValueError("--engine-option: decode_kv applies to decode workers only; "
                             "use --decode-kv")
        self._check_decode_kv()
        bases = str(self.engine_options.get("lowrank_bases") or self.model)
        lowrank = [c for c in self.codecs if c.startswith("lowrank")]
        if lowrank and not bases.startswith("random:") and \
                not (Path(bases) / "lowrank.safetensors").is_file():
            raise ValueError(f"--codec: {lowrank[0]} needs calibrated bases at "
                             f"{Path(bases) / 'lowrank.safetensors'}; create them with "
                             f"`zipserve calibrate --model {self.model}`")
        if "hack2mix" in self.codecs and not str(self.model).startswith("random:"):
            from zipserve.compress.kvbits import load_bits

            load_bits(self.model)  # a missing/invalid kvbits.json, named, before any worker starts
        if self.extra_codecs and self.prefill_group:
            raise ValueError("--prefill-group: serves one codec; not with several in --codec")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("--served-model-name: must not be empty")
        if self.num_prefill < 1 or self.num_decode < 1:
            raise ValueError("--prefill and --decode: need at least one worker of each")
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts: must be >= 0, got {self.max_restarts}")
        if self.retries < 0:
            raise ValueError(f"retries: must be >= 0, got {self.retries}")
        for name in ("transfer_deadline_s", "page_wait_s", "health_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("prefill_resource", "decode_resource"):
            if getattr(self, name) is not None and not getattr(self, name).strip():
                raise ValueError(f"{name}: must be a non-empty resource name")
        from zipserve.prefill_group.config import validate_group

        self.group = validate_group(self.model, self.prefill_group,
                                    self.prefill_group_min_tokens,
                                    self.engine_options.get("page_size", 64),
                                    self.prefill_group_exchange)

    def _check_model(self) -> None:
        """What the workers would refuse at load, refused before any of them starts: a head
        size a codec cannot take, a model directory without tokenizer.json."""
        from zipserve.compress.codecs import check_head_dim

        try:
            head_dim = model_config_for(self.model).head_dim
        except ValueError as e:
            raise ValueError(f"--model: {e}") from None
        for c in self.codecs:
            try:
                check_head_dim(c, head_dim)
            except ValueError as e:
                raise ValueError(f"--codec: {e}") from None
        if (not self.skip_tokenizer and not self.model.startswith("random:")
                and not (Path(self.model) / "tokenizer.json").is_file()):
            raise ValueError(f"--model: no tokenizer.json in {self.model}; to serve it on token "
                             f"ids (prompts as lists of ids, no text out) pass --skip-tokenizer")

    def _check_decode_kv(self) -> None:
        from zipserve.engine.decode_kv import check_decode_kv

        if not isinstance(self.decode_kv, str):
            raise ValueError(f"--decode-kv: must be a string, got {self.decode_kv!r}")
        modes = [m.strip() for m in self.decode_kv.split(",")]
        if len(modes) not in (1, len(self.codecs)):
            raise ValueError(f"--decode-kv: give one mode, or one per codec ({len(self.codecs)}:"
                             f" {','.join(self.codecs)}), got {self.decode_kv!r}")
        for codec, mode in self.decode_kv_modes.items():
            try:
                check_decode_kv(codec, mode)
            except ValueError as e:
                raise ValueError(f"--decode-kv: {str(e).removeprefix('decode_kv: ')}") from None


def served_name(model: str) -> str:
    """"/abs/path/models/zipserve-ref" -> "zipserve-ref"; "random:tiny" stays as it is."""
    return Path(model.rstrip("/")).name or model if "/" in model else model


RESERVE_TIMEOUT_S = 5.0
"""Longest wait for a decode worker to answer a reservation."""


class _Retry(Exception):
    """This attempt failed before any token was sent: the job may run on another pair."""


class RayBackend:
    def __init__(self, cfg: ServeConfig, *, cluster_workers: int | None = None,
                 cluster_decode: int | None = None):
        """One codec's workers. cluster_workers / cluster_decode: all worker / decode actors
        that share the cluster's GPUs (several codecs: deploy/multi_codec.py; default: this
        config's own)."""
        if cfg.extra_codecs:
            raise ValueError("RayBackend serves one codec: use deploy.multi_codec.make_backend")
        self.cfg = cfg
        self.codecs = (cfg.codec,)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        device = cfg.device or ("cuda" if gpus else "cpu")
        workers = cluster_workers or cfg.num_prefill + cfg.num_decode
        share = gpu_share(gpus, workers, pinned=bool(cfg.prefill_resource or cfg.decode_resource))
        opts = {"num_gpus": share} if device.startswith("cuda") else {"num_cpus": 0}
        opts.update(max_restarts=cfg.max_restarts, max_task_retries=0)
        prefill_opts, decode_opts = dict(opts), dict(opts)
        if cfg.prefill_resource:
            prefill_opts["resources"] = {cfg.prefill_resource: 1}
        if cfg.decode_resource:
            decode_opts["resources"] = {cfg.decode_resource: 1}
        # Prefill runs one prompt at a time (a lock inside); the extra concurrency lets stats
        # and health checks answer while it runs.
        prefill_cls = ray.remote(max_concurrency=4, **prefill_opts)(PrefillWorker)
        decode_cls = ray.remote(max_concurrency=64, **decode_opts)(DecodeWorker)
        mc = model_config_for(cfg.model)
        args = {role: dict(model=cfg.model, codec=cfg.codec, device=device,
                           engine_options=role_engine_options(
                               cfg.engine_options, role, device=device, share=share, gpus=gpus,
                               num_decode=cluster_decode or cfg.num_decode,
                               max_model_len=mc.max_position_embeddings))
                for role in ("prefill", "decode")}
        args["decode"]["engine_options"]["decode_kv"] = cfg.decode_kv_modes[cfg.codec]
        self.pool = WorkerPool(prefill_cls, decode_cls, args["prefill"], args["decode"],
                               cfg.num_prefill, cfg.num_decode, link_gbps=cfg.link_gbps,
                               link_latency_ms=cfg.link_latency_ms,
                               health_interval_s=cfg.health_interval_s,
                               prefill_first=device.startswith("cuda") and share < 1.0)
        self.prefill = [w.actor for w in self.pool.prefill]
        self.decode = [w.actor for w in self.pool.decode]
        info = ray.get(self.decode[0].info.remote())
        self.device = info["device"]
        self.decode_kv = info.get("decode_kv", "compressed")
        """The decode workers' decode_kv, `auto` resolved by the first of them."""
        self.prefill_group = None if not cfg.group.enabled else RayPrefillGroup(
            cfg.prefill_group, cfg.model, cfg.codec, cfg.engine_options.get("page_size", 64),
            device, lowrank_exchange=cfg.group.lowrank_exchange)
        self.page_size = info["page_size"]
        self.tokenizer = load_tokenizer(cfg.model, cfg.skip_tokenizer)
        self.has_tokenizer = not cfg.skip_tokenizer
        self.model_name = cfg.model_name
        self.max_model_len = mc.max_position_embeddings
        self.vocab_size = mc.vocab_size
        self.kv_bytes_per_token_bf16 = mc.kv_bytes_per_token(2)
        self.outstanding = {("p", i): 0 for i in range(cfg.num_prefill)}
        self.outstanding.update({("d", j): 0 for j in range(cfg.num_decode)})
        self.prefilling = {i: 0 for i in range(cfg.num_prefill)}
        self.awaiting_kv = {j: 0 for j in range(cfg.num_decode)}
        """Prompt tokens reserved on each decode worker whose KV is not in yet."""
        self.counts: Counter[str] = Counter()
        """Failures and retries seen by the request path, by reason."""
        self._jobs: dict[str, int] = {}  # job id -> decode index
        self._reserve_lock: asyncio.Lock | None = None
        self._released: asyncio.Event | None = None

    # -- Backend protocol --------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def apply_chat_template(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages)

    def token_strings(self, ids: list[int]) -> list[str]:
        if not self.has_tokenizer:  # vLLM's names for tokens without a tokenizer
            return [f"token_id:{i}" for i in ids]
        return [self.tokenizer.decode([i], skip_special_tokens=False) for i in ids]

    def health(self) -> dict:
        """From the monitor's cached stats (never waits on a worker)."""
        workers = []
        for w in self.pool.workers:
            st = w.stats
            if w.role == "prefill":
                queued, running = self.outstanding[("p", w.index)], self.prefilling[w.index]
            else:
                queued, running = self.awaiting_kv[w.index], int(st.get("running", 0))
            workers.append({"name": w.name, "role": w.role, "healthy": w.healthy,
                            "codec": st.get("codec", self.cfg.codec),
                            "decode_kv": st.get("decode_kv"),
                            "free_pages": int(st.get("free_pages", 0)),
                            "used_pages": int(st.get("used_pages", 0)),
                            "queued_tokens": queued, "running": running,
                            "restarts": w.restarts_seen, "dead": w.dead,
                            "error": w.last_error})
        failures = self.pool.failures() + self.counts
        usable = bool(self.pool.usable_pairs())
        return {"status": "ok" if usable else "unavailable", "codec": self.cfg.codec,
                "decode_kv": self.decode_kv, "device": self.device, "workers": workers,
                "pairs": self.pool.pairs_view(),
                "degraded": not all(w.healthy for w in self.pool.workers),
                "failures": dict(failures), "events": dict(self.pool.events)}

    async def abort(self, job_id: str) -> None:
        j = self._jobs.get(job_id)
        if j is not None:
            await self.decode[j].abort.remote(job_id)

    def _candidates(self, job: Job) -> list[tuple[int, int]]:
        """Usable pairs, least loaded first, skipping decode workers short of pages by their
        last stats (the reservation itself decides)."""
        need = pages_for(len(job.prompt_ids) + 1, self.page_size)
        pairs = [(i, j) for i, j in self.pool.usable_pairs()
                 if self.pool.decode[j].stats.get("capacity_pages", need) >= need]
        return sorted(pairs, key=lambda ij: (self.outstanding[("d", ij[1])],
                                             self.outstanding[("p", ij[0])]))

    async def _acquire(self, job: Job, params: SamplingParams,
                       wait_until: float) -> tuple[int, int] | str:
        """Reserve the job's pages on some usable pair's decode worker, waiting in FIFO order
        while there is none; the pair, or why there is none (an error message)."""
        if self._reserve_lock is None:
            self._reserve_lock, self._released = asyncio.Lock(), asyncio.Event()
        need = pages_for(len(job.prompt_ids) + 1, self.page_size)
        async with self._reserve_lock:
            why = "no healthy prefill/decode pair"
            while True:
                for pi, dj in self._candidates(job):
                    try:  # a reservation that outlives its timeout here expires on the
                        # worker at the transfer deadline, so nothing leaks
                        await asyncio.wait_for(self.decode[dj].reserve.remote(
                            job.id, job.prompt_ids, params, self.cfg.transfer_deadline_s),
                            RESERVE_TIMEOUT_S)
                        return pi, dj
                    except (ray.exceptions.RayActorError, asyncio.TimeoutError) as e:
                        self.pool.suspect(self.pool.decode[dj], f"{type(e).__name__}: {e}")
                        why = f"decode worker {dj} failed: {type(e).__name__}"
                    except ray.exceptions.RayTaskError as e:
                        if (fault := request_fault(e)) is not None:
                            raise RequestRefused(fault) from None  # waiting cannot help
                        why = (f"no decode worker has free KV pages ({e.cause})"
                               if isinstance(e.cause, Overloaded) else
                               f"decode worker {dj} refused the reservation: "
                               f"{type(e.cause).__name__}: {e.cause}")
                    except asyncio.CancelledError:  # the job ended while reserving: undo it
                        self.decode[dj].release.remote(job.id)
                        raise
                else:
                    if not self.pool.usable_pairs():
                        why = "no healthy prefill/decode pair"
                        for role in ("prefill", "decode"):
                            if self.pool.all_dead(role):
                                return f"unavailable: every {role} worker is dead"
                    elif not self._candidates(job):
                        cap = max(w.stats.get("capacity_pages", 0) for w in self.pool.decode)
                        return (f"overloaded: the request needs {need} KV pages; a decode "
                                f"worker holds at most {cap}")
                left = wait_until - time.time()
                if left <= 0:
                    kind = "unavailable" if "healthy" in why or "failed" in why else "overloaded"
                    return f"{kind}: {why} within {self.cfg.page_wait_s:g} s"
                self._released.clear()
                try:
                    await asyncio.wait_for(self._released.wait(), min(0.1, left))
                except asyncio.TimeoutError:
                    pass

    async def _prefill_then_admit(self, job: Job, params: SamplingParams, pi: int, dj: int):
        """The prefill report and the admit result; `_Retry` when a worker failed."""
        dec, pre = self.decode[dj], self.prefill[pi]
        n = len(job.prompt_ids)
        self.outstanding[("p", pi)] += n
        self.prefilling[pi] += 1
        self.awaiting_kv[dj] += n
        try:
            if self.prefill_group is not None and self.cfg.group.use_group(n):
                rep = await group_prefill(self.prefill_group, dec, job.id, job.prompt_ids, params)
            else:
                rep = await pre.prefill.remote(job.id, job.prompt_ids, params, f"d{dj}")
        except ray.exceptions.RayActorError as e:  # the actor died under the job
            self.pool.suspect(self.pool.prefill[pi], f"{type(e).__name__}: {e}")
            self.counts["prefill_worker_died"] += 1
            raise _Retry(f"prefill worker {pi} died: {type(e).__name__}") from e
        except ray.exceptions.RayTaskError as e:  # it raised, e.g. its KV could not be sent
            if (fault := request_fault(e)) is not None:
                raise RequestRefused(fault) from None  # another pair would refuse it too
            cause = getattr(e, "cause", None) or e
            self.counts["prefill_failed"] += 1
            raise _Retry(f"prefill worker {pi} failed: {type(cause).__name__}: {cause}") from e
        finally:
            self.outstanding[("p", pi)] -= n
            self.prefilling[pi] -= 1
        try:
            res = await dec.admit.remote(job.id, rep.first_token, rep.first_logprob,
                                         self.cfg.transfer_deadline_s, rep.first_top_logprobs)
        except ray.exceptions.RayError as e:
            if isinstance(e, ray.exceptions.RayActorError):
                self.pool.suspect(self.pool.decode[dj], f"{type(e).__name__}: {e}")
            self.counts["decode_worker_died"] += 1
            raise _Retry(f"decode worker {dj} failed: {type(e).__name__}") from e
        finally:
            self.awaiting_kv[dj] -= n
        return rep, res

    async def stream(self, job: Job) -> AsyncIterator[BackendEvent]:
        if job.codec not in (None, self.cfg.codec):
            yield FinishEvent("error", error=f"codec: this deployment serves {self.cfg.codec!r}"
                                             f", not {job.codec!r}")
            return
        try:
            params = SamplingParams(max_tokens=job.max_tokens, temperature=job.temperature,
                                    top_p=job.top_p, top_k=max(job.top_k, 0), seed=job.seed,
                                    stop=tuple(job.stop), ignore_eos=job.ignore_eos,
                                    min_tokens=job.min_tokens, logprobs=job.logprobs)
        except ValueError as e:  # its message names the field
            yield FinishEvent("error", error=str(e), client_error=True, codec=self.cfg.codec)
            return
        wait = self.cfg.page_wait_s if job.timeout_s is None else \
            min(self.cfg.page_wait_s, job.timeout_s)
        wait_until = job.arrival + wait
        cost = len(job.prompt_ids) + job.max_tokens
        errors: list[str] = []
        released = None  # the failed attempt's release, awaited before the next reservation
        for attempt in range(self.cfg.retries + 1):
            if released is not None:
                try:
                    await asyncio.wait_for(released, RESERVE_TIMEOUT_S)
                except (ray.exceptions.RayError, asyncio.TimeoutError):
                    pass  # that worker is gone: so is the reservation
            try:
                got = await self._acquire(job, params, max(wait_until, time.time() + 1.0)
                                          if attempt else wait_until)
            except RequestRefused as e:
                yield FinishEvent("error", error=str(e), client_error=True, codec=self.cfg.codec)
                return
            if isinstance(got, str):
                yield FinishEvent("error", error="; ".join([got] + errors[-1:]),
                                  codec=self.cfg.codec)
                return
            pi, dj = got
            self.outstanding[("d", dj)] += cost
            self._jobs[job.id] = dj
            dec = self.decode[dj]
            try:
                try:
                    rep, res = await self._prefill_then_admit(job, params, pi, dj)
                except RequestRefused as e:
                    yield FinishEvent("error", error=str(e), client_error=True,
                                      codec=self.cfg.codec)
                    return
                except _Retry as e:
                    errors.append(str(e))
                    self.counts["retried"] += attempt < self.cfg.retries
                    continue
                start = max(job.arrival, rep.prefill_start)
                yield PhaseEvent("queue", job.arrival, start)
                yield PhaseEvent("prefill", start, max(start, rep.prefill_end))
                async for ev in self._tokens(dec, job.id, res, max(start, rep.prefill_end)):
                    if isinstance(ev, FinishEvent):  # the prefill side knows what it sent
                        ev = dataclasses.replace(ev, kv_bytes=rep.bytes_sent, kv_bytes_bf16=len(
                            job.prompt_ids) * self.kv_bytes_per_token_bf16)
                    yield ev
                return
            finally:
                self.outstanding[("d", dj)] -= cost
                self._jobs.pop(job.id, None)
                released = dec.release.remote(job.id)
                if self._released is not None:
                    self._released.set()
        yield FinishEvent("error", error=f"unavailable: {errors[-1]} (tried "
                                         f"{self.cfg.retries + 1} times)", codec=self.cfg.codec)

    async def _tokens(self, dec, job_id: str, res: dict,
                      prefill_end: float) -> AsyncIterator[BackendEvent]:
        """Token events as they are decoded, and the phases after prefill. Layers stream while
        prefill runs, so the transfer phase is only what remains after prefill ended (0 when
        the transfer was fully overlapped); each phase starts where the previous one ended, so
        the phases tile the job from its arrival to the router receiving its last token."""
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
            lps, tops = res.get("logprobs") or [], res.get("top_logprobs") or []
            for k, tok in enumerate(new):  # the batch's new text rides on its last token
                delta = res["text"][len(text):] if k == len(new) - 1 else ""
                text += delta
                yield TokenEvent(tok, delta, lps[k] if k < len(lps) else None,
                                 tuple(map(tuple, tops[k])) if k < len(tops) else ())
            sent += len(new)
            if res["finished"]:
                # Decode ends when the router holds the last token, i.e. when it handles the
                # finish event: the span is left open here and the router closes it with the
                # same stamp as the job's end (a stamp taken here could be a GIL switch
                # interval, 5 ms, earlier), so the phases tile the JCT exactly.
                yield PhaseEvent("decode", decode_start)
                yield FinishEvent(res["finish_reason"], error=res["error"],
                                  codec=self.cfg.codec)
                return
            try:
                res = await dec.poll.remote(job_id, sent, 1.0)
            except ray.exceptions.RayError as e:  # the decode worker died mid-stream
                self.counts["decode_worker_died"] += 1
                yield FinishEvent("error", error=f"unavailable: decode worker failed while "
                                                 f"decoding: {type(e).__name__}",
                                  codec=self.cfg.codec)
                return

    def set_link(self, gbps: float | None, latency_ms: float = 0.0) -> None:
        """Change the emulated prefill -> decode link of every pair (call only when idle)."""
        ray.get([p.set_link.remote(gbps, latency_ms) for p in self.prefill])
        self.cfg.link_gbps, self.cfg.link_latency_ms = gbps, latency_ms

    def link_busy(self, window_s: float) -> float | None:
        """Mean busy fraction of the emulated links over the last window_s seconds."""
        vals = [v for v in ray.get([p.link_busy.remote(window_s) for p in self.prefill])
                if v is not None]
        return sum(vals) / len(vals) if vals else None

    def idle(self) -> bool:
        """No request reserved, waiting or running on any decode worker, every page free."""
        stats = ray.get([d.stats.remote() for d in self.decode])
        return all(s["free_pages"] == s["capacity_pages"] and s["reserved"] == 0
                   and s["running"] == 0 and s["waiting"] == 0 for s in stats)

    def shutdown(self) -> None:
        """Stop the health monitor, the workers' threads and the actors themselves."""
        self.pool.stop()
        try:
            ray.get([d.shutdown.remote() for d in self.decode], timeout=10)
        except (ray.exceptions.RayError, TimeoutError) as e:
            print(f"zipserve: decode workers did not stop cleanly: {e}")
        for actor in self.prefill + self.decode:
            ray.kill(actor)
        if self.prefill_group is not None:
            self.prefill_group.shutdown()
