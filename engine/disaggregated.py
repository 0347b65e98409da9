"""The two halves of disaggregated serving on top of LLMEngine.

Prefill side: `prefill_export` runs a prompt, samples its first token and hands out each layer's
KV as soon as the layer is computed (a callback per layer), then frees everything.
Decode side: `reserve` takes pages and a slot before any KV arrives, `import_layer` writes each
arriving layer into them, `admit` puts the sequence into the running batch once every layer is in.
A reservation that is never admitted must be `abort`ed; that frees its pages and slot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from zipserve.compress.wire import DeviceLayerKV, LayerKV
from zipserve.engine.detokenizer import Detokenizer
from zipserve.engine.kv_export import export_layer, import_layer
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


class DisaggregatedEngine(LLMEngine):
    """LLMEngine plus the prefill-export and decode-import halves."""

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
    ) -> PrefillResult:
        """device_form: hand out DeviceLayerKV (buffers stay on the device) instead of host
        bytes; for channels that carry device tensors. A dense-mode engine (decode_kv=dense)
        cannot: it holds no codes to send (export_layer refuses, ValueError)."""
        seq = self._new_seq(prompt, params, request_id)
        if not self.scheduler.reserve(seq, seq.num_tokens):
            raise Overloaded(f"prefill: no free KV pages for {seq.num_tokens} tokens")
        n = seq.num_tokens
        layers: list[LayerKV] = []

        def layer_done(layer: int) -> None:
            kv = export_layer(self.cache, layer, seq, num_tokens=n, device_form=device_form)
            layers.append(kv)
            if on_layer is not None:
                on_layer(kv)

        t0 = time.perf_counter()
        try:
            logits = self.runner.prefill([seq], on_layer_done=layer_done)  # [1, V]
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
        kept = [
            self.prefill_export(
                ids, SamplingParams(max_tokens=1), f"warm-up-{i}", device_form=device_form
            ).layers
            for i in range(held)
        ]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return WarmUp(n, sum(kv.nbytes() for kv in kept[0]))

    # -- decode side ---------------------------------------------------------------------
    def reserve(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Take pages and a slot for a request whose KV will arrive; raises Overloaded."""
        if request_id in self._seqs:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        seq = self._new_seq(list(prompt_ids), params, request_id)
        if not self.scheduler.reserve(seq, seq.num_tokens):
            raise Overloaded(f"decode: no free KV pages for {seq.num_tokens} tokens")
        self._seqs[request_id] = seq

    def import_layer(self, request_id: str, kv: LayerKV | DeviceLayerKV) -> None:
        seq = self._reserved(request_id)
        if kv.num_tokens != seq.num_tokens:
            raise ValueError(
                f"layer {kv.layer}: KV of {kv.num_tokens} tokens for a prompt of {seq.num_tokens}"
            )
        import_layer(self.cache, kv, seq)

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
        seq.output_ids.append(first_token)
        seq.first_token_time = time.monotonic()
        if seq.params.logprobs is not None:
            seq.logprobs.append(first_logprob if first_logprob is not None else float("nan"))
            seq.top_logprobs.append([tuple(t) for t in first_top_logprobs or []])
        self.scheduler.admit(seq)
        self._check_finish(seq, first_token)
        return self._output(seq)

    def _reserved(self, request_id: str) -> Sequence:
        seq = self._seqs.get(request_id)
        if seq is None or not seq.reserved:
            raise KeyError(f"request {request_id!r} holds no reservation")
        return seq
