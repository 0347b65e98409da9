"""zipserve: disaggregated prefill/decode LLM serving with a compressed KV cache.

The repository root is the package root; the public offline API lives in `zipserve.engine.llm`.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that `import zipserve.kernels` does not pull in the whole engine.
    if name in ("LLM", "SamplingParams", "RequestOutput"):
        from zipserve.engine import llm, sampling_params

        return {
            "LLM": llm.LLM,
            "RequestOutput": llm.RequestOutput,
            "SamplingParams": sampling_params.SamplingParams,
        }[name]
    raise AttributeError(name)
