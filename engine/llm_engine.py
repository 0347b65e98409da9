"""The engine loop: validated requests in, one scheduled forward per step, finished outputs out.

LLMEngine owns the model, its page pool and the scheduler. `step()` runs one packed prefill or one
decode step, samples, applies stop conditions and frees the pages of every sequence that ends;
`launch_step` / `finish_step` split it where the host may queue other GPU work in between.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from zipserve.compress.codecs import make_codec
from zipserve.engine.config import EngineConfig
from zipserve.engine.decode_kv import DecodeKVChoice, DeviceInfo, choose_decode_kv
from zipserve.engine.detokenizer import Detokenizer, check_stop
from zipserve.engine.kv_cache import KVCache
from zipserve.engine.kv_memory import build_cache, bytes_per_page
from zipserve.engine.loading import build_model, model_config_for, resolve_dtype
from zipserve.engine.model_runner import ModelRunner
from zipserve.engine.page_pool import PagePool, pages_for
from zipserve.engine.prefix_cache import PrefixCache, PrefixCacheStats
from zipserve.engine.sampler import Sampler, SampleResult
from zipserve.engine.sampling_params import SamplingParams
from zipserve.engine.scheduler import Scheduler
from zipserve.engine.sequence import Sequence
from zipserve.engine.tokenizer import load_tokenizer


@dataclass
class LaunchedStep:
    """A queued forward + sampling whose tokens are on their way to the host (launch_step ->
    finish_step)."""

    seqs: list[Sequence]
    token_ids: torch.Tensor
    """[B] int64 on the host (pinned, filled when `ready` completes)."""
    logprobs: torch.Tensor | None
    """[B] float32 on the host, or None when no row asked for logprobs."""
    top_logprobs: list[list[tuple[int, float]] | None]
    ready: torch.cuda.Event | None
    """Recorded after the copies on the GPU; None on a CPU (the tensors are final)."""

    @classmethod
    def queue(cls, seqs: list[Sequence], result: SampleResult) -> LaunchedStep:
        """Start the copies of a SampleResult's tensors to the host without waiting."""
        tokens, logprobs = result.token_ids, result.logprobs
        if tokens.device.type != "cuda":
            return cls(seqs, tokens, logprobs, result.top_logprobs, None)
        tokens = tokens.to("cpu", non_blocking=True)  # pinned: no host wait
        if logprobs is not None:
            logprobs = logprobs.to("cpu", non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(seqs, tokens, logprobs, result.top_logprobs, ready)

    def done(self) -> bool:
        """Whether the tokens are on the host (never waits)."""
        return self.ready is None or self.ready.query()

    def read(self) -> tuple[list[int], list[float] | None]:
        """Wait for the copies; the token ids and logprobs as Python lists."""
        if self.ready is not None:
            self.ready.synchronize()
        logprobs = self.logprobs.tolist() if self.logprobs is not None else None
        return self.token_ids.tolist(), logprobs


@dataclass
class RequestOutput:
    """What a request produced so far (final once `finished`)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None
    finished: bool
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    cached_tokens: int = 0
    """Prompt tokens whose KV came from the prefix cache (OpenAI's
    usage.prompt_tokens_details.cached_tokens)."""


class LLMEngine:
    def __init__(
        self,
        model: str,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        engine_config: EngineConfig | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
    ):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.engine_config = ec = engine_config or EngineConfig()
        config = model_config_for(model)
        # Refused before any weight is read: a missing tokenizer.json without skip_tokenizer, a
        # codec that cannot take the model (its head size, compress/codecs.py: check_head_dim).
        self.tokenizer = load_tokenizer(model, ec.skip_tokenizer)
        # Calibrated codecs read their files beside the checkpoint (lowrank: in lowrank_bases when
        # set; a random: model gets random bases or bits, compress/lowrank.py, compress/kvbits.py).
        self.codec = make_codec(
            ec.codec,
            config.num_kv_heads,
            ec.page_size,
            config.head_dim,
            model_dir=model,
            bases_dir=ec.lowrank_bases,
            dtype=resolve_dtype(dtype, config, self.device),
        )
        self.max_model_len = min(
            max_model_len or config.max_position_embeddings, config.max_position_embeddings
        )
        self.config, self.model, self.dtype = build_model(
            model, dtype, self.device, self.max_model_len, seed
        )
        self.model_name = model
        self.codec.prepare_model(self.model, fold=ec.lowrank_fold)
        choice = self._resolve_decode_kv()
        self.decode_kv, self.decode_kv_reason = choice.mode, choice.reason
        """decode_kv: 'dense' (16-bit pages: bf16, or a codec's values with decode_kv=dense) or
        'compressed' (the codec's pages), `auto` resolved (engine/decode_kv.py); and why."""
        num_pages = ec.num_pages or self._size_pool()
        self.cache = build_cache(
            self.codec,
            self.decode_kv,
            self.config,
            num_pages,
            ec.page_size,
            ec.max_num_seqs,
            self.dtype,
            self.device,
        )
        self.pool = PagePool(num_pages)
        self.prefix_cache: PrefixCache | None = None
        self.prefix_caching_reason = "off: prefix_caching=False"
        """Why prefix caching is on or off for this engine."""
        if ec.prefix_caching and self.config.lckv is not None:
            self.prefix_caching_reason = (
                "off: an LCKV model encodes a prompt in passes over all of it, so a cached "
                "prefix would change how the rest is encoded"
            )
        elif ec.prefix_caching:
            exact = not self.cache.scores_by_page
            self.prefix_cache = PrefixCache(self.pool, ec.page_size, self.cache, exact)
            self.prefix_caching_reason = (
                "on: exact pages" if exact else "on: the suffix attends to the codec's prefix"
            )
        self.scheduler = Scheduler(
            self.pool,
            ec.page_size,
            ec.max_num_seqs,
            ec.max_prefill_tokens,
            ec.max_prefill_chunk,
            self.prefix_cache,
        )
        self.runner = ModelRunner(
            self.model, self.cache, self.config, ec, self.max_model_len, self.device
        )
        self.sampler = Sampler()
        self._ids = itertools.count()
        self._seq_ids = itertools.count()
        self._seqs: dict[str, Sequence] = {}
        self._eos = set(self.config.eos_token_ids) | set(self.tokenizer.eos_token_ids)

    # -- memory ------------------------------------------------------------------------------
    def _resolve_decode_kv(self) -> DecodeKVChoice:
        """The engine's decode_kv with `auto` decided (choose_decode_kv): on a GPU from the
        measured kernel table and whether dense pages fit (the pool the operator asked for in
        num_pages, else one request of the whole context)."""
        ec = self.engine_config
        if self.codec.dense_pages:  # dense in every mode: nothing to measure
            return choose_decode_kv(self.codec.name, DeviceInfo(self.device.type), 0)
        if ec.decode_kv != "auto":
            return DecodeKVChoice(ec.decode_kv, "asked for")
        if self.device.type != "cuda":
            return choose_decode_kv(self.codec.name, DeviceInfo("cpu"), 0)
        dense_page = KVCache.bytes_per_page(self.config, ec.page_size, self.dtype)
        need = (ec.num_pages or pages_for(self.max_model_len, ec.page_size) + 1) * dense_page
        info = DeviceInfo("cuda", torch.cuda.get_device_name(self.device), self._kv_budget())
        return choose_decode_kv(self.codec.name, info, need)

    def _size_pool(self) -> int:
        ec = self.engine_config
        page_bytes = bytes_per_page(
            self.codec, self.decode_kv, self.config, ec.page_size, self.dtype
        )
        if self.device.type != "cuda":
            return pages_for(ec.max_kv_tokens, ec.page_size) + 1
        free = self._kv_budget()
        if free < 2 * page_bytes:
            raise RuntimeError(
                f"no GPU memory left for the KV pool (weights use "
                f"{torch.cuda.memory_allocated(self.device) >> 20} MiB)"
            )
        return free // page_bytes

    def _kv_budget(self) -> int:
        """Bytes of GPU memory the KV pool may take: the configured fraction less the weights,
        activations and 1 GiB of slack, and never more than is free right now."""
        ec = self.engine_config
        torch.cuda.synchronize(self.device)
        total = torch.cuda.get_device_properties(self.device).total_memory
        used = torch.cuda.memory_allocated(self.device)
        # Activations of the largest prefill and the decode graphs' logits, measured roughly.
        act = (
            ec.max_prefill_tokens
            * (self.config.hidden_size * 6 + self.config.intermediate_size * 3)
            * 2
            + ec.max_num_seqs * self.config.vocab_size * 8
        )
        free = int(total * ec.gpu_memory_fraction) - used - act - (1 << 30)
        # Other engines (in this process or others) may already hold part of the device: never
        # plan on more than is free right now.
        return min(free, torch.cuda.mem_get_info(self.device)[0] - act - (1 << 30))

    # -- requests ----------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError("params: must be a SamplingParams")
        self._check_params(params)
        text, ids = self._prompt_ids(prompt)
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._seqs:
            raise ValueError(f"request_id: {rid!r} is already in use")
        max_total = min(len(ids) + params.max_tokens, self.max_model_len)
        if pages_for(max_total, self.engine_config.page_size) > self.pool.capacity:
            raise ValueError(
                f"max_tokens: prompt ({len(ids)}) + max_tokens ({params.max_tokens})"
                f" needs more KV pages than the pool holds ({self.pool.capacity})"
            )
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=rid,
            prompt_ids=ids,
            params=params,
            prompt_text=text,
        )
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq.detok = Detokenizer(self.tokenizer.decode, ids)
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def _check_params(self, params: SamplingParams) -> None:
        """What params ask that this engine cannot do (stop strings without a tokenizer)."""
        if params.stop and self.engine_config.skip_tokenizer:
            raise ValueError(
                "stop: stop strings need a tokenizer and this engine runs without "
                "one (skip_tokenizer); use stop_token_ids"
            )

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise ValueError("prompt: token ids must be integers")
            ids, text = list(prompt), None
            bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
            if bad:
                raise ValueError(
                    f"prompt: token ids {bad[:5]} are outside the vocabulary "
                    f"[0, {self.config.vocab_size})"
                )
        else:
            raise ValueError("prompt: must be a string or a list of token ids")
        if not ids:
            raise ValueError("prompt: must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt: {len(ids)} tokens; the model's context is "
                f"{self.max_model_len} tokens (prompt must leave room for output)"
            )
        return text, ids

    def abort(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its pages; False if unknown or finished."""
        seq = self._seqs.get(request_id)
        if seq is None or seq.finished:
            return False
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One forward; returns an output for every sequence that advanced or finished."""
        launched = self.launch_step()
        return self.finish_step(launched) if launched is not None else []

    def launch_step(self) -> LaunchedStep | None:
        """Schedule and queue one forward and its sampling without waiting for the GPU: the
        chosen tokens travel to pinned host memory behind an event. The caller may queue other
        work meanwhile (the decode worker imports received layers into reserved pages) and must
        then call `finish_step` before anything else schedules. None: nothing to sample (no
        batch, or a prefill chunk that completes no prompt)."""
        batch = self.scheduler.schedule()
        if batch is None:
            return None
        seqs = batch.seqs
        if batch.is_prefill:
            logits = self.runner.prefill(seqs, ends=batch.chunk_ends)
            if self.prefix_cache is not None:  # their pages are written: reusable from now on
                for seq in seqs:
                    self.prefix_cache.register(seq)
            done = [i for i in range(len(seqs)) if batch.completes(i)]
            if len(done) < len(seqs):  # sequences mid-prompt sample nothing yet
                seqs, logits = [seqs[i] for i in done], logits[done]
                if not seqs:
                    return None
        else:
            logits = self.runner.decode(seqs)
        result = self.sampler.sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        return LaunchedStep.queue(seqs, result)

    def finish_step(self, launched: LaunchedStep) -> list[RequestOutput]:
        """Wait for a launched step's tokens; append them, apply stop conditions (freeing the
        pages of every sequence that ends) and return an output per sequence."""
        token_ids, logprobs = launched.read()
        now = time.monotonic()
        outputs = []
        for i, seq in enumerate(launched.seqs):
            seq.output_ids.append(token_ids[i])
            if seq.first_token_time is None:
                seq.first_token_time = now
            if seq.params.logprobs is not None:
                seq.logprobs.append(logprobs[i])
                seq.top_logprobs.append(launched.top_logprobs[i] or [])
            self._check_finish(seq, token_ids[i])
            outputs.append(self._output(seq))
        return outputs

    def _check_finish(self, seq: Sequence, token: int) -> None:
        delta = seq.detok.add_token(token)
        seq.output_text = seq.detok.text
        reason = self._finish_reason(seq, token, delta)
        if reason is None:
            return
        if not isinstance(seq.stop_reason, str):  # not cut at a stop string: release held text
            seq.output_text += seq.detok.flush()
        self.scheduler.finish(seq, reason)

    def _finish_reason(self, seq: Sequence, token: int, delta: str) -> str | None:
        p, n_out = seq.params, len(seq.output_ids)
        if n_out >= p.min_tokens:
            if (not p.ignore_eos and token in self._eos) or token in p.stop_token_ids:
                seq.stop_reason = token
                return "stop"
            if p.stop:
                matched, cut = check_stop(seq.output_text, len(delta), p.stop)
                if matched is not None:
                    seq.output_text, seq.stop_reason = seq.output_text[:cut], matched
                    return "stop"
        if n_out >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _output(self, seq: Sequence) -> RequestOutput:
        want_lp = seq.params.logprobs is not None
        return RequestOutput(
            request_id=seq.request_id,
            prompt=seq.prompt_text,
            prompt_token_ids=seq.prompt_ids,
            text=seq.output_text,
            token_ids=list(seq.output_ids),
            finish_reason=seq.finish_reason,
            finished=seq.finished,
            logprobs=list(seq.logprobs) if want_lp else None,
            top_logprobs=list(seq.top_logprobs) if want_lp else None,
            metrics={
                "arrival": seq.arrival_time,
                "first_token": seq.first_token_time or 0.0,
                "preemptions": seq.num_preemptions,
            },
            cached_tokens=seq.cached_tokens,
        )

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Lookups, hit tokens, evictions, pages cached (None when prefix caching is off)."""
        return self.prefix_cache.stats if self.prefix_cache is not None else None

    def release(self, request_id: str) -> None:
        """Forget a finished request (its pages were freed when it finished)."""
        seq = self._seqs.get(request_id)
        if seq is not None and seq.finished:
            del self._seqs[request_id]

    # -- scoring -----------------------------------------------------------------------------
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[T, vocab] fp32 logits of one sequence at every position (pages borrowed, returned).

        Where the cache scores by page (a codec's values, not the exact K/V), the sequence is
        scored page by page: each token attends to the encoded full pages before its own page
        and densely to its page, as it would at decode time.
        """
        _, ids = self._prompt_ids(list(token_ids))
        seq = Sequence(
            seq_id=-1 - next(self._seq_ids),
            request_id="<logits>",
            prompt_ids=ids,
            params=SamplingParams(max_tokens=1),
            slot=self.engine_config.max_num_seqs,
        )
        p = self.engine_config.page_size
        pages = self.pool.allocate(pages_for(len(ids), p), seq.seq_id)
        if pages is None:
            raise RuntimeError("logits: not enough free KV pages for this sequence right now")
        seq.pages = pages
        try:
            if not self.cache.scores_by_page:
                return self.runner.prefill([seq], all_logits=True)
            chunks = []
            for end in range(p, len(ids) + p, p):
                seq.prompt_ids = ids[: min(end, len(ids))]
                chunks.append(self.runner.prefill([seq], all_logits=True))
            return torch.cat(chunks)
        finally:
            self.pool.free(pages, seq.seq_id)
