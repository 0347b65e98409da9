"""What a decode engine keeps of a compressed codec's KV: the codes (`compressed`), or dense pages
holding the codec's dequantized values (`dense`), or a choice made per deployment (`auto`).

- `compressed`: the codec's pages, attended by the codec's kernel (compress/compressed_cache.py).
- `dense`: the same wire form arrives (same bytes, same checksum), each received layer is
  dequantized into the engine's 16-bit paged pool by one kernel (kernels/dequant_pages.py) and
  decode runs the bf16 paged kernel (engine/dense_codec_cache.py). Prompt tokens attend to the
  codec's values; generated tokens stay 16-bit (the compressed engine seals full pages to codes).
- `auto`: `choose_decode_kv` below, once per engine at start.

Low-rank codecs' dense form is their 16-bit tail's (compress/lowrank.py): K at full dimension
(a page's k_red @ k_dec^T), V in its completed basis, which the folded W_o takes as it takes their
own kernel's output; the pool costs what bf16's does (D / r times their reduced pages).
"""

from __future__ import annotations

from dataclasses import dataclass

from zipserve.compress.codec import KVCodec
from zipserve.compress.codecs import codec_entry

DECODE_KV_MODES = ("compressed", "dense", "auto")

# Decode speed per codec as a multiple of the dense (bf16 paged) decode measured in the same run
# (> 1: faster). The engine's whole decode step against the bf16 engine's, with the decode kernel
# the default backend runs (the CUDA HACK kernel, kernels/hack_decode_cuda.py, on both GPUs), CUDA
# graphs, random Llama-3-8B: the figure at batch 8 x 8k decides (a deployment is sized for
# batches; one request alone decodes a few % slower compressed than dense).
# - H100: session 11 (bench/results/session11_h100/issue15, `bench engine --batches 8,32,64
#   --contexts 8192,32768`): hack2 1.04x, hack4 1.05x at 8 x 8k (1.33-1.48x at 32 x 8k and 8 x
#   32k); lowrank+hack2 session 21 (11.28 vs 9.47 ms; 0.88x at 8 x 4k and 0.83x at 2 x 4k in
#   session 23).
# - H200: session 27 (bench/results/session27_h200/h200table, `bench engine --batches 2,8
#   --contexts 4096,8192`): hack2 1.18x, hack4 1.13x, lowrank+hack2 0.90x at 8 x 8k (hack2 1.10x,
#   hack4 1.04x at 8 x 4k; 0.99x / 0.99x at 2 x 4k). fp8, kivi2, kivi4 and lowrank alone are
#   kernel-time ratios against the bf16 paged kernel (session 2, `bench kernels --batches 8
#   --contexts 32768`: 0.51 / 0.29 / 0.30 / 1.55x of SDPA against its 0.92x).
# Dense decode of a codec runs the bf16 step (plus the prompt's values dequantized once on
# arrival). Missing entries are unmeasured.
MEASURED_SPEED_VS_SDPA: dict[str, dict[str, float]] = {
    "h200": {
        "paged-bf16": 1.0,
        "hack2": 1.18,
        "hack4": 1.13,
        "lowrank+hack2": 0.90,
        "fp8": 0.55,
        "kivi2": 0.32,
        "kivi4": 0.33,
        "lowrank": 1.68,
    },
    "h100": {"paged-bf16": 1.0, "hack2": 1.04, "hack4": 1.05, "lowrank+hack2": 0.84},
}
DENSE_KERNEL = "paged-bf16"


def _codec_class(codec: str) -> type[KVCodec]:
    """What `codec` can do (its registered class); the base class, which claims nothing, for a
    name the registry does not know (names are validated where engines are configured)."""
    try:
        return codec_entry(codec).codec_class
    except ValueError:
        return KVCodec


def kernel_speed(codec: str, table: dict[str, float]) -> float | None:
    """The codec's measured decode-kernel speed vs SDPA in `table`, None when unmeasured. A codec
    that runs other codecs' kernels per layer (hack2mix: hack2's and hack4's, its registry entry)
    counts the slowest measured of them."""
    try:
        kernels = codec_entry(codec).kernels
    except ValueError:
        kernels = (codec,)
    speeds = [table[k] for k in kernels if k in table]
    return min(speeds) if speeds else None


def check_decode_kv(codec: str, decode_kv: str) -> None:
    """ValueError naming decode_kv for an unknown mode or `dense` with a codec without a dense
    form (the low-rank codecs)."""
    if decode_kv not in DECODE_KV_MODES:
        raise ValueError(
            f"decode_kv: must be one of {', '.join(DECODE_KV_MODES)}, got {decode_kv!r}"
        )
    cls = _codec_class(codec)
    if decode_kv == "dense" and not cls.dense_form:
        raise ValueError(
            f"decode_kv: 'dense' is not available for codec {codec}: "
            f"{cls.no_dense_form_reason}; use decode_kv='compressed' or 'auto'"
        )


@dataclass(frozen=True)
class DeviceInfo:
    """What `choose_decode_kv` needs to know of the decode engine's device."""

    type: str
    """'cpu' or 'cuda'."""
    name: str = ""
    """torch.cuda.get_device_name() on a GPU, e.g. 'NVIDIA H100 80GB HBM3'."""
    kv_bytes: int = 0
    """Bytes the KV pool may use on this device (the engine's budget after weights)."""


@dataclass(frozen=True)
class DecodeKVChoice:
    mode: str
    """'compressed' or 'dense'."""
    reason: str


def gpu_family(name: str) -> str | None:
    """'h100' / 'h200' from a device name, None for a GPU not in the measured table."""
    low = name.lower()
    return next((f for f in MEASURED_SPEED_VS_SDPA if f in low), None)


def choose_decode_kv(codec: str, device: DeviceInfo, pool_bytes_needed: int) -> DecodeKVChoice:
    """`auto`'s rule, in order:

    1. A codec whose pages are dense already (bf16): dense. A codec without a dense form:
       compressed.
    2. CPU: dense. The compressed path attends through the torch references of the Triton
       kernels there, the dense one through one paged bf16 reference.
    3. GPU, dense pages would not fit (`pool_bytes_needed`, the bytes of the dense pool the
       deployment needs, exceeds `device.kv_bytes`): compressed.
    4. GPU, the codec's decode kernel was measured faster than the dense kernel on this GPU
       family (MEASURED_SPEED_VS_SDPA; an unmeasured dense kernel counts as SDPA, 1.0x):
       compressed.
    5. Otherwise dense: the bf16 paged decode is the faster one for fp8, kivi and lowrank+hack2
       on every GPU measured, and an unmeasured codec kernel is not assumed to beat it.
    """
    cls = _codec_class(codec)
    if cls.dense_pages:
        return DecodeKVChoice("dense", f"{codec} pages are dense")
    if not cls.dense_form:
        return DecodeKVChoice("compressed", f"{codec} has no dense form")
    if device.type != "cuda":
        return DecodeKVChoice("dense", "CPU: the compressed path runs torch references")
    if pool_bytes_needed > device.kv_bytes:
        return DecodeKVChoice(
            "compressed",
            f"dense pages need {pool_bytes_needed >> 20} MiB, "
            f"{device.kv_bytes >> 20} MiB free for KV",
        )
    fam = gpu_family(device.name)
    table = MEASURED_SPEED_VS_SDPA.get(fam or "", {})
    codes, dense = kernel_speed(codec, table), table.get(DENSE_KERNEL, 1.0)
    if codes is not None and codes > dense:
        return DecodeKVChoice(
            "compressed", f"{codec} kernel {codes:.2f}x SDPA vs dense {dense:.2f}x on {fam}"
        )
    what = (
        f"{codec} kernel {codes:.2f}x SDPA vs dense {dense:.2f}x on {fam}"
        if codes is not None
        else f"{codec} kernel not measured on {device.name or 'this GPU'}"
    )
    return DecodeKVChoice("dense", what)


def codec_modes(
    codecs: list[str] | tuple[str, ...], modes: list[str] | tuple[str, ...]
) -> tuple[list[tuple[str, str]], list[str]]:
    """The (codec, decode_kv) runs of a benchmark or demo over codecs x modes, and a note per
    run left out: bf16 (any codec whose pages are dense) runs once (its pages are dense in every
    mode), and a codec without a dense form skips `dense` when another mode is asked too
    (ValueError when it is the only)."""
    runs, skipped = [], []
    for codec in codecs:
        cls = _codec_class(codec)
        for mode in modes:
            if cls.dense_pages and any(r[0] == codec for r in runs):
                skipped.append(f"{codec} {mode}: {codec} pages are dense in every mode, run once")
                continue
            if mode == "dense" and not cls.dense_form:
                if len(modes) == 1:
                    check_decode_kv(codec, mode)  # raises, naming decode_kv
                skipped.append(f"{codec} dense: {codec} has no dense form")
                continue
            runs.append((codec, mode))
    return runs, skipped
