"""The two halves of disaggregated serving on top of LLMEngine.

Prefill side: `prefill_export` runs a prompt, samples its first token and hands out each layer's
KV as soon as the layer is computed (a callback per layer), then frees everything. With a prefix
cache it computes only what its cache does not hold (the cached pages are exported as they are)
and caches the prompt's full pages for the next prompt that starts with them.
Decode side: `reserve` takes pages and a slot before any KV arrives (the leading pages its own
prefix cache holds are shared, and it says how many: the prefill side then sends only the rest,
engine/kv_export.py), `import_layer` writes each arriving layer into them, `admit` puts the
sequence into the running batch once every layer is in and caches the prompt's full pages;
or `prefill_reserved` computes what the reservation's cached pages do not hold right here (a
local prefill: nothing crosses the link). A reservation that is never admitted must be
`abort`ed; that frees its pages and slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zipserve.compress.wire import DeviceLayerKV, LayerKV
from zipserve.engine.config import EngineConfig
from zipserve.engine.detokenizer import Detokenizer
from zipserve.engine.kv_export import export_layer, held_nbytes, import_layer
from zipserve.engine.llm_engine import LLMEngine, RequestOutput
from zipserve.engine.sampling_params import SamplingParams
from zipserve.engine.sequence import Sequence


class Overloaded(RuntimeError):
    """No pages or slots free for this request right now (the caller retries or refuses: 503)."""


@dataclass(frozen=True)
class WarmUp:
    tokens: int
    """Prompt tokens of the warm-up prefill (0: none ran)."""
    kv_bytes: int
    """What one such prompt's exported KV takes (payload bytes of its layers)."""


@dataclass
class PrefillResult:
    request_id: str
    prompt_ids: list[int]
    first_token: int
    first_logprob: float | None
    layers: list[LayerKV | DeviceLayerKV]
    """Every layer's KV (also handed to on_layer as each was computed)."""
    prefill_seconds: float
    first_top_logprobs: list[tuple[int, float]] = field(default_factory=list)
    """The first token's most likely alternatives, when params.logprobs asks for them."""
    cached_tokens: int = 0
    """Prompt tokens whose KV came from this engine's prefix cache instead of being computed."""
    bytes_not_sent: int = 0
    """Wire bytes of the pages left out for the receiver (first_page > 0), over every layer."""


class DisaggregatedEngine(LLMEngine):
    """LLMEngine plus the prefill-export and decode-import halves."""

    @classmethod
    def for_worker(
        cls,
        model: str,
        codec: str,
        device: str | None,
        dtype: str,
        engine_options: dict | None,
    ) -> DisaggregatedEngine:
        """The engine a prefill or decode worker runs: `codec`'s pages, the deployment's
        `--engine-option`s (validated by EngineConfig)."""
        return cls(
            model,
            dtype=dtype,
            device=device,
            engine_config=EngineConfig(codec=codec, **(engine_options or {})),
        )

    def _new_seq(self, prompt, params: SamplingParams, request_id: str) -> Sequence:
        self._check_params(params)
        text, ids = self._prompt_ids(prompt)
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id=request_id,
            prompt_ids=ids,
            params=params,
            prompt_text=text,
        )
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.device).manual_seed(params.seed)
        seq.detok = Detokenizer(self.tokenizer.decode, ids)
        return seq

    # -- prefill side --------------------------------------------------------------------
    def prefill_export(
        self,
        prompt,
        params: SamplingParams,
        request_id: str,
        on_layer: Callable[[LayerKV | DeviceLayerKV], None] | None = None,
        device_form: bool = False,
        first_page: int = 0,
        use_cache: bool = True,
    ) -> PrefillResult:
        """device_form: hand out DeviceLayerKV (buffers stay on the device) instead of host
        bytes; for channels that carry device tensors. A dense-mode engine (decode_kv=dense)
        cannot: it holds no codes to send (export_layer refuses, ValueError). first_page: the
        receiver holds the prompt's first pages already (a delta transfer: they and the sinks
        are left out). use_cache: reuse and fill the prefix cache (when the engine has one)."""
        seq = self._new_seq(prompt, params, request_id)
        n, p = seq.num_tokens, self.engine_config.page_size
        if not 0 <= first_page <= n // p:
            raise ValueError(
                f"first_page: {first_page} is outside the prompt's {n // p} full pages"
            )
        cache = self.prefix_cache if use_cache else None
        hit = cache.match(seq) if cache is not None else None
        if not self.scheduler.reserve(seq, n, hit):
            raise Overloaded(f"prefill: no free KV pages for {n} tokens")
        layers: list[LayerKV] = []
        not_sent = [0]

        def layer_done(layer: int) -> None:
            kv = export_layer(
                self.cache, layer, seq, num_tokens=n, device_form=device_form, first_page=first_page
            )
            not_sent[0] += held_nbytes(self.cache, layer, seq, n, first_page)
            layers.append(kv)
            if on_layer is not None:
                on_layer(kv)

        t0 = time.perf_counter()
        try:
            logits = self.runner.prefill([seq], on_layer_done=layer_done)  # [1, V]
            if cache is not None:  # its pages are written: the next prompt may start with them
                cache.register(seq)
            res = self.sampler.sample(logits, [params], [seq.generator])
            lp = None if res.logprobs is None else float(res.logprobs[0])
            return PrefillResult(
                request_id,
                seq.prompt_ids,
                int(res.token_ids[0]),
                lp,
                layers,
                time.perf_counter() - t0,
                res.top_logprobs[0] or [],
                seq.cached_tokens,
                not_sent[0],
            )
        finally:
            self.scheduler.finish(seq, "stop")  # pages and slot back to the pool

    def warm_up_prefill(self, num_tokens: int, device_form: bool = False, held: int = 1) -> WarmUp:
        """Prefill a prompt of `num_tokens` (capped by the pool and max_model_len) `held` times,
        keeping every exported layer until the last one is done, then drop it all: the
        activations, the kernels and `held` requests' exported KV of the largest prompt are
        allocated and compiled now. On a GPU the caching allocator keeps that memory, so a
        decode engine that starts later on the same GPU cannot plan on it (without this, long
        prompts under load ran the prefill worker out of memory)."""
        n = min(
            num_tokens,
            self.max_model_len - 1,
            (self.pool.capacity - 1) * self.engine_config.page_size,
        )
        if n < 1:
            return WarmUp(0, 0)
        ids = [3 + i % (self.config.vocab_size - 3) for i in range(n)]
        kept = [  # each computes the whole prompt (no prefix cache) and keeps its KV
            self.prefill_export(
                ids,
                SamplingParams(max_tokens=1),
                f"warm-up-{i}",
                device_form=device_form,
                use_cache=False,
            ).layers
            for i in range(held)
        ]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return WarmUp(n, sum(kv.nbytes() for kv in kept[0]))

    # -- decode side ---------------------------------------------------------------------
    def reserve(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        use_cache: bool = True,
    ) -> int:
        """Take pages and a slot for a request whose KV will arrive; raises Overloaded. Returns
        the prompt's leading full pages taken from the prefix cache (use_cache and the engine
        has one): they are the request's already, only the pages after them need to arrive."""
        if request_id in self._seqs:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        seq = self._new_seq(list(prompt_ids), params, request_id)
        cache = self.prefix_cache if use_cache else None
        hit = cache.match(seq) if cache is not None else None
        if not self.scheduler.reserve(seq, seq.num_tokens, hit):
            raise Overloaded(f"decode: no free KV pages for {seq.num_tokens} tokens")
        self._seqs[request_id] = seq
        return len(hit or [])

    def held_pages(self, request_id: str) -> int:
        """Leading pages of a reservation that came from the prefix cache."""
        return self._reserved(request_id).num_cached // self.engine_config.page_size

    def cached_prefix_pages(self, prompt_ids: list[int]) -> int:
        """Leading full pages of a prompt this engine's prefix cache holds now (what `reserve`
        would share, if nothing is evicted meanwhile); 0 without a prefix cache."""
        if self.prefix_cache is None or not prompt_ids:
            return 0
        probe = Sequence(-1, "<probe>", list(prompt_ids), SamplingParams(max_tokens=1))
        return len(self.prefix_cache.match(probe))

    def import_layer(self, request_id: str, kv: LayerKV | DeviceLayerKV) -> None:
        seq = self._reserved(request_id)
        if kv.num_tokens != seq.num_tokens:
            raise ValueError(
                f"layer {kv.layer}: KV of {kv.num_tokens} tokens for a prompt of {seq.num_tokens}"
            )
        import_layer(self.cache, kv, seq, held=self.held_pages(request_id))

    def admit(
        self,
        request_id: str,
        first_token: int,
        first_logprob: float | None = None,
        first_top_logprobs: list[tuple[int, float]] | None = None,
    ) -> RequestOutput:
        """All layers are in: start decoding after the prefill's first token (and its logprob
        and top alternatives, when the request asked for logprobs)."""
        seq = self._reserved(request_id)
        seq.num_cached = seq.num_tokens
        if self.prefix_cache is not None:  # the prompt's pages as a prefill made them
            self.prefix_cache.register(seq)
        seq.output_ids.append(first_token)
        seq.first_token_time = time.monotonic()
        if seq.params.logprobs is not None:
            seq.logprobs.append(first_logprob if first_logprob is not None else float("nan"))
            seq.top_logprobs.append([tuple(t) for t in first_top_logprobs or []])
        self.scheduler.admit(seq)
        self._check_finish(seq, first_token)
        return self._output(seq)

    def prefill_reserved(self, request_id: str) -> None:
        """Compute a reserved request's uncached prompt tokens on this engine instead of
        receiving them (a local prefill, for a short suffix after the cached pages): it
        prefills with the next step, samples its first token itself and decodes on."""
        self.scheduler.prefill_reserved(self._reserved(request_id))

    def _reserved(self, request_id: str) -> Sequence:
        seq = self._seqs.get(request_id)
        if seq is None or not seq.reserved:
            raise KeyError(f"request {request_id!r} holds no reservation")
        return seq
