"""The offline API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch
from tqdm.auto import tqdm

from zipserve.engine.config import EngineConfig
from zipserve.engine.llm_engine import LLMEngine, RequestOutput
from zipserve.engine.sampling_params import SamplingParams

__all__ = ["LLM", "RequestOutput", "SamplingParams"]


class LLM:
    """A model ready to generate.

    model: a Hugging Face model directory, or `random:tiny` / `random:llama3-8b`.
    dtype: 'auto' (bf16 on GPU, fp32 on CPU), 'bfloat16', 'float16' or 'float32'.
    device: 'cuda', 'cpu' or None (GPU when there is one).
    """

    def __init__(
        self,
        model: str,
        dtype: str | torch.dtype | None = "auto",
        device: str | None = None,
        max_model_len: int | None = None,
        seed: int = 0,
        **engine_options,
    ):
        self.engine = LLMEngine(
            model,
            dtype=dtype,
            device=device,
            engine_config=EngineConfig(**engine_options),
            max_model_len=max_model_len,
            seed=seed,
        )

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Seq[str | list[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Generate for one prompt or a list; outputs come back in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: need at least one prompt")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        params = list(params)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} SamplingParams for {len(prompts)} prompts")
        engine = self.engine
        ids: list[str] = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(engine.add_request(prompt, p))
            final: dict[str, RequestOutput] = {}
            bar = tqdm(total=len(ids), desc="generate", disable=not use_tqdm)
            while engine.has_unfinished():
                for out in engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        bar.update(1)
            bar.close()
            return [final[i] for i in ids]
        finally:
            for i in ids:  # on any error, nothing stays queued or holds pages
                engine.abort(i)
                engine.release(i)

    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """[T, vocab] fp32 logits of one sequence at every position."""
        return self.engine.logits(token_ids)
