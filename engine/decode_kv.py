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

# Decode speed per codec as a multiple of a reference measured in the same run (> 1: faster).
# H200: decode-attention kernel time at batch 8 x 32k, Llama-3-8B heads, against torch SDPA on
# contiguous bf16 K/V ("paged-bf16" is the kernel a dense engine decodes with; bench/RESULTS.md
# session 2, `bench kernels --batches 8 --contexts 32768`; kivi4 from session 1); these predate the
# CUDA HACK kernel. H100: the whole decode step of the engine against the bf16 engine's, with the
# HACK decode kernel the default backend runs there (the CUDA one, kernels/hack_decode_cuda.py,
# variant v2s2; session 11, bench/results/session11_h100/issue15: `bench engine --model
# random:llama3-8b --batches 8,32,64 --contexts 8192,32768`, CUDA graphs): the lowest ratio
# measured where both fit, batch 8 x 8k (hack2 1.04x, hack4 1.05x; 1.33-1.48x at 32 x 8k and
# 8 x 32k). Dense decode of hack2 measured 0.89-0.97x bf16's there (the bf16 kernel, plus the
# prompt's values dequantized once). One request alone (batch 1, 8k context) decodes 4% slower
# compressed than dense (bench/results/session11_h100/close15); a deployment is sized for
# batches, so the batch-8 figure decides. lowrank+hack2 on the H100: its engine step against
# bf16's at 8 x 8k, session 21 (bench/results/session21_h100, 11.28 vs 9.47 ms; 8 x 4k 0.88x and
# 2 x 4k 0.83x in session 23); its dense mode runs the bf16 kernel. Missing entries are unmeasured.
MEASURED_SPEED_VS_SDPA: dict[str, dict[str, float]] = {
    "h200": {
        "paged-bf16": 0.92,
        "fp8": 0.51,
        "kivi2": 0.29,
        "kivi4": 0.30,
        "hack2": 0.75,
        "hack4": 0.72,
        "lowrank": 1.55,
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
    5. Otherwise dense: on every GPU measured, the bf16 paged kernel is the faster one for every
       other codec (H200: 0.92x SDPA vs 0.29-0.75x for fp8, kivi, hack), and an unmeasured
       codec kernel is not assumed to beat it.
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
