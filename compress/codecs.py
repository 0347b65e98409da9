"""The KV codecs behind one interface: fp8, kivi2/4, hack2/4, hack2mix (HACK with per-layer bits
from a calibrated plan, compress/kvbits.py) (bf16 is the engine's dense cache).

A codec owns the layout of a *full* page of P tokens of one layer (its "store" is a dict of tensors
with the page index first), encodes full 16-bit pages into it, attends to it at decode time and
states its exact bytes. Every codec keeps the open page (the last, partly filled one) in 16-bit
until it is full, so no page is ever re-quantized; HACK also keeps the first 4 tokens (sinks).

Head sizes (`head_dim_rule`): bf16 and fp8 take any even head_dim in [8, 256]; KIVI and HACK a
multiple of their channel group (32) up to 256; lowrank any even size in [8, 256] (its pages are
in the ranks). A codec built for a head_dim it cannot take raises ValueError naming head_dim, the
codec and what it needs, so an engine refuses the model at load, never at its first request.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from zipserve.compress import quantize as qz
from zipserve.compress.reference_attention import (
    compressed_past_prefill_attention,
    dequant_decode_attention,
)
from zipserve.compress.rotation import hadamard, rotate
from zipserve.kernels import baseline_prefill_attention as base_prefill
from zipserve.kernels import dequant_pages as dq
from zipserve.kernels import fp8_decode_attention as fp8_attn
from zipserve.kernels import hack_decode_attention as hack_attn
from zipserve.kernels import hack_encode
from zipserve.kernels import hack_prefill_attention as hack_prefill
from zipserve.kernels import kivi_decode_attention as kivi_attn
from zipserve.kernels.hack_layout import (
    HackPages,
    hack_bytes_per_token,
    hack_group_v,
    pack_planar,
    unpack_planar,
)
from zipserve.kernels.head_dim import MAX_HEAD_DIM, head_dim_ok
from zipserve.kernels.paged_decode_attention import choose_num_splits

Store = dict[str, torch.Tensor]
FP8_MAX = 448.0
CHANNEL_GROUP = 32
"""KIVI's and HACK's channel group: their head_dim must be a multiple of it."""


def head_dim_rule(codec: str) -> str:
    """What `codec` needs of head_dim, in words (errors and the README table)."""
    if codec.startswith(("kivi", "hack")):
        return f"head_dim a multiple of {CHANNEL_GROUP} in [{CHANNEL_GROUP}, {MAX_HEAD_DIM}]"
    return f"an even head_dim in [8, {MAX_HEAD_DIM}]"


def head_dim_supported(codec: str, head_dim: int) -> bool:
    if not head_dim_ok(head_dim):
        return False
    return not codec.startswith(("kivi", "hack")) or head_dim % CHANNEL_GROUP == 0


def check_head_dim(codec: str, head_dim: int) -> None:
    """ValueError naming head_dim, the codec and what it needs, when `codec` cannot take it."""
    if not head_dim_supported(codec, head_dim):
        raise ValueError(f"head_dim: codec {codec} needs {head_dim_rule(codec)} (got {head_dim})")


class KVCodec(ABC):
    name: str
    graph_safe: bool = True
    """decode_attention launches no host syncs on CUDA (can be captured in a CUDA graph)."""
    n_sink: int = 0
    """Leading tokens of a sequence kept in 16-bit beside the pages (attended densely)."""

    def __init__(self, num_kv_heads: int, page_size: int, head_dim: int):
        check_head_dim(getattr(self, "name", "bf16"), head_dim)
        self.kvh, self.page_size, self.head_dim = num_kv_heads, page_size, head_dim

    @abstractmethod
    def new_store(self, num_pages: int, device: torch.device) -> Store:
        """Zeroed storage for num_pages pages of one layer."""

    @abstractmethod
    def encode(self, store: Store, page_ids: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor) -> None:
        """Write full pages: k, v [n, KVH, P, D] into store pages page_ids [n]."""

    @abstractmethod
    def dequantize(self, store: Store, page_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(k, v) fp32 [n, KVH, P, D] of pages page_ids (tests and the quality reference)."""

    def dequantize_into(self, pages: Store, page_ids: torch.Tensor, out_k: torch.Tensor,
                        out_v: torch.Tensor) -> None:
        """decode_kv=dense: write the K/V of every page of `pages` (a store of n pages, e.g. as
        received) into pages page_ids [n] of a dense pool's out_k/out_v [N, KVH, P, D], in the
        model's basis (kernels/dequant_pages.py: Triton on CUDA, its torch reference elsewhere)."""
        raise ValueError(f"decode_kv: codec {self.name} has no dense form (decode_kv='dense' "
                         f"is for fp8, kivi and hack codecs)")

    @abstractmethod
    def page_bytes_per_token(self) -> float:
        """Stored bytes of one full page per token and KV head, K and V together."""

    def decode_attention(self, q, store, page_table, n_full, dense_k, dense_v, dense_lens,
                         scale, num_splits=1):
        """Attention of q [B, H, D] over n_full[b] pages + a dense tail; [B, H, D]."""
        return dequant_decode_attention(self, q, store, page_table, n_full, dense_k, dense_v,
                                        dense_lens, scale)

    def prefill_attention(self, q, k, v, store, past_pages, sink_k, sink_v, scale):
        """A prefill chunk attending to its sequence's encoded pages, sinks and itself (causal).

        q [n, H, D], k/v [n, KVH, D] (the chunk, starting on a page boundary); past_pages [m]
        ids of the full pages before it; sink_k/v [KVH, S, D] the dense sinks (used when m > 0).
        Returns [n, H, D]. This default dequantizes (the reference); codecs with a kernel override.
        """
        return compressed_past_prefill_attention(self, q, k, v, store, past_pages, sink_k, sink_v,
                                                 scale)

    # Hooks of codecs whose values live in a reduced space (compress/lowrank.py); the identity
    # for every other codec.
    def to_dense(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New k/v [.., KVH, D] -> the form kept in the 16-bit open page and sinks (the compressed
        cache attends to that form, in prefill too)."""
        return k, v

    def seal(self, store: Store, page_ids: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Encode full pages given in the dense form (a filled open page) [n, KVH, P, D]."""
        self.encode(store, page_ids, k, v)

    def for_layer(self, layer: int) -> "KVCodec":
        """The codec of one layer (the same for every layer except where ranks differ)."""
        return self

    def num_splits(self, batch: int, max_len: int, num_sms: int) -> int:
        """Flash-decoding splits this codec's kernel wants for a batch (host heuristic)."""
        return choose_num_splits(batch, self.kvh, max_len, num_sms=num_sms)

    def bytes_per_token(self, num_layers: int, seq_len: int | None = None,
                        dense_bytes: int = 2) -> float:
        """Bytes per token of one sequence over all layers. With seq_len, the 16-bit open page
        and sinks of a sequence of that length are amortized in."""
        full = self.kvh * sum(self.for_layer(i).page_bytes_per_token()
                              for i in range(num_layers))
        if seq_len is None:
            return full
        n_full_tokens = (seq_len // self.page_size) * self.page_size
        dense_tokens = seq_len - n_full_tokens + (self.n_sink if n_full_tokens else 0)
        dense = num_layers * self.kvh * 2 * self.head_dim * dense_bytes
        return (full * n_full_tokens + dense * dense_tokens) / seq_len

    def store_nbytes(self, store: Store) -> int:
        return sum(t.numel() * t.element_size() for t in store.values())


class Fp8Codec(KVCodec):
    """e4m3 with one scale per page and KV head."""

    name = "fp8"

    def new_store(self, num_pages, device):
        shape = (num_pages, self.kvh, self.page_size, self.head_dim)
        return {"k": torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device),
                "v": torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device),
                "k_scale": torch.zeros(num_pages, self.kvh, device=device),
                "v_scale": torch.zeros(num_pages, self.kvh, device=device)}

    def encode(self, store, page_ids, k, v):
        for name, x in (("k", k), ("v", v)):
            xf = x.float()
            amax = xf.abs().amax(dim=(2, 3))  # [n, KVH]
            scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
            store[name][page_ids] = (xf / scale[:, :, None, None]).to(torch.float8_e4m3fn)
            store[name + "_scale"][page_ids] = scale

    def dequantize(self, store, page_ids):
        return tuple(store[n][page_ids].float() * store[n + "_scale"][page_ids][:, :, None, None]
                     for n in ("k", "v"))

    def dequantize_into(self, pages, page_ids, out_k, out_v):
        fn = dq.fp8_dequant_pages if out_k.is_cuda else dq.fp8_dequant_pages_ref
        fn(pages["k"], pages["k_scale"], pages["v"], pages["v_scale"], page_ids, out_k, out_v)

    def decode_attention(self, q, store, page_table, n_full, dense_k, dense_v, dense_lens,
                         scale, num_splits=1):
        fn = fp8_attn.fp8_decode_attention if q.is_cuda else fp8_attn.fp8_decode_attention_ref
        return fn(q, store["k"], store["k_scale"], store["v"], store["v_scale"], page_table,
                  n_full, dense_k, dense_v, dense_lens, scale, num_splits=num_splits)

    def prefill_attention(self, q, k, v, store, past_pages, sink_k, sink_v, scale):
        fn = (base_prefill.fp8_prefill_attention if q.is_cuda
              else base_prefill.fp8_prefill_attention_ref)
        dense = k.new_zeros(self.kvh, 0, self.head_dim)  # [KVH, 0, D]: no sinks, whole pages
        return fn(q.contiguous(), k.contiguous(), v.contiguous(), store["k"], store["k_scale"],
                  store["v"], store["v_scale"], past_pages.to(torch.int32).contiguous(), dense,
                  dense, scale)

    def page_bytes_per_token(self):
        return 2 * self.head_dim + 2 * 4 / self.page_size


class KiviCodec(KVCodec):
    """KIVI-style: K per channel over groups of 32 tokens, V per token in groups of 32 channels;
    the open page is KIVI's 16-bit residual window; attention dequantizes."""

    token_group = channel_group = 32

    def __init__(self, num_kv_heads, page_size, head_dim, bits: int):
        self.bits, self.name = bits, f"kivi{bits}"
        super().__init__(num_kv_heads, page_size, head_dim)
        if page_size % self.token_group:
            raise ValueError(f"page_size: codec {self.name} needs a multiple of "
                             f"{self.token_group} (got {page_size})")

    def new_store(self, num_pages, device):
        n, h, p, d, e = num_pages, self.kvh, self.page_size, self.head_dim, 8 // self.bits
        f16 = dict(dtype=torch.float16, device=device)
        return {"k_codes": torch.zeros(n, h, p, d // e, dtype=torch.uint8, device=device),
                "k_scale": torch.zeros(n, h, p // self.token_group, d, **f16),
                "k_min": torch.zeros(n, h, p // self.token_group, d, **f16),
                "v_codes": torch.zeros(n, h, p, d // e, dtype=torch.uint8, device=device),
                "v_scale": torch.zeros(n, h, p, d // self.channel_group, **f16),
                "v_min": torch.zeros(n, h, p, d // self.channel_group, **f16)}

    def encode(self, store, page_ids, k, v):
        kc, ks, km = qz.k_per_channel(k, self.bits, self.token_group)
        vc, vs, vm = qz.v_per_token(v, self.bits, self.channel_group)
        store["k_codes"][page_ids] = pack_planar(kc, self.bits)
        store["v_codes"][page_ids] = pack_planar(vc, self.bits)
        for name, t in (("k_scale", ks), ("k_min", km), ("v_scale", vs), ("v_min", vm)):
            store[name][page_ids] = t

    def dequantize(self, store, page_ids):
        k = qz.dequant_k(unpack_planar(store["k_codes"][page_ids], self.bits),
                         store["k_scale"][page_ids], store["k_min"][page_ids])
        v = qz.dequant_v(unpack_planar(store["v_codes"][page_ids], self.bits),
                         store["v_scale"][page_ids], store["v_min"][page_ids])
        return k, v

    def dequantize_into(self, pages, page_ids, out_k, out_v):
        fn = dq.kivi_dequant_pages if out_k.is_cuda else dq.kivi_dequant_pages_ref
        fn(pages["k_codes"], pages["k_scale"], pages["k_min"], pages["v_codes"],
           pages["v_scale"], pages["v_min"], self.bits, page_ids, out_k, out_v)

    def decode_attention(self, q, store, page_table, n_full, dense_k, dense_v, dense_lens,
                         scale, num_splits=1):
        fn = kivi_attn.kivi_decode_attention if q.is_cuda else kivi_attn.kivi_decode_attention_ref
        return fn(q, store["k_codes"], store["k_scale"], store["k_min"], store["v_codes"],
                  store["v_scale"], store["v_min"], page_table, n_full, dense_k, dense_v,
                  dense_lens, scale, self.bits, num_splits=num_splits)

    def prefill_attention(self, q, k, v, store, past_pages, sink_k, sink_v, scale):
        fn = (base_prefill.kivi_prefill_attention if q.is_cuda
              else base_prefill.kivi_prefill_attention_ref)
        dense = k.new_zeros(self.kvh, 0, self.head_dim)  # [KVH, 0, D]: no sinks, whole pages
        return fn(q.contiguous(), k.contiguous(), v.contiguous(), store["k_codes"],
                  store["k_scale"], store["k_min"], store["v_codes"], store["v_scale"],
                  store["v_min"], past_pages.to(torch.int32).contiguous(), dense, dense, scale,
                  self.bits)

    def page_bytes_per_token(self):
        d = self.head_dim
        codes = 2 * d * self.bits / 8
        k_side = 2 * d * 2 / self.token_group  # scale + min per channel per 32 tokens
        v_side = 2 * (d // self.channel_group) * 2
        return codes + k_side + v_side


class HackCodec(KVCodec):
    """HACK: per-page K per channel, V per token in channel groups, code sums, 4 sinks; attention
    on the codes (Triton on GPU, its torch reference on CPU).

    Beyond the paper, K and V are Hadamard-rotated before quantization (compress/rotation.py):
    measured on the reference model it lowers perplexity at 2 and 4 bits for the cost of rotating
    q, the dense tail and the output per step. group_v 32 (the paper uses 64): see the note in
    bench/RESULTS.md.
    """

    n_sink = 4

    def __init__(self, num_kv_heads, page_size, head_dim, bits: int, mode: str = "f16",
                 group_v: int = 32, rotate: bool = True):
        self.name = f"hack{bits}"
        super().__init__(num_kv_heads, page_size, head_dim)
        if mode not in ("f16", "int8"):
            raise ValueError(f"mode: must be 'f16' or 'int8', got {mode!r}")
        self.bits, self.mode = bits, mode
        # The kernel unpacks V in planes of D/E channels; a V group may not split a plane.
        self.group_v = hack_group_v(head_dim, bits, group_v)
        self.rotate = rotate
        self._r: dict[torch.device, torch.Tensor] = {}

    def _rot(self, device: torch.device) -> torch.Tensor:
        if device not in self._r:
            self._r[device] = hadamard(self.head_dim, device)
        return self._r[device]

    def _pages(self, store: Store) -> HackPages:
        return HackPages(**store, bits=self.bits, group_v=self.group_v)

    def new_store(self, num_pages, device):
        return HackPages.empty(num_pages, self.kvh, self.page_size, self.head_dim, self.bits,
                               self.group_v, device=device).tensors()

    def encode(self, store, page_ids, k, v):
        fn = hack_encode.hack_encode_pages if k.is_cuda else hack_encode.hack_encode_pages_ref
        fn(k.contiguous(), v.contiguous(), self.bits, self.group_v, out=self._pages(store),
           page_ids=page_ids, rotation=self._rot(k.device) if self.rotate else None)

    def dequantize(self, store, page_ids):
        sub = {name: t[page_ids] for name, t in store.items()}
        k, v = hack_encode.hack_dequantize_ref(self._pages(sub))
        k, v = k.float(), v.float()
        if self.rotate:  # back to the model's basis (the Hadamard matrix is its own inverse)
            r = self._rot(k.device)
            k, v = k @ r, v @ r
        return k, v

    def dequantize_into(self, pages, page_ids, out_k, out_v):
        fn = dq.hack_dequant_pages if out_k.is_cuda else dq.hack_dequant_pages_ref
        fn(self._pages(pages), page_ids, out_k, out_v,
           rotation=self._rot(out_k.device) if self.rotate else None)

    def decode_attention(self, q, store, page_table, n_full, dense_k, dense_v, dense_lens,
                         scale, num_splits=1):
        fn = hack_attn.hack_decode_attention if q.is_cuda else hack_attn.hack_decode_attention_ref
        if self.rotate:
            r = self._rot(q.device)
            q, dense_k, dense_v = rotate(q, r), rotate(dense_k, r), rotate(dense_v, r)
        out = fn(q, self._pages(store), page_table, n_full, dense_k.contiguous(),
                 dense_v.contiguous(), dense_lens, scale, self.bits, n_sink=self.n_sink,
                 num_splits=num_splits, mode=self.mode)
        return rotate(out, self._rot(q.device)) if self.rotate else out

    def prefill_attention(self, q, k, v, store, past_pages, sink_k, sink_v, scale):
        """On the codes (kernels/hack_prefill_attention.py; its torch reference on CPU)."""
        fn = (hack_prefill.hack_prefill_attention if q.is_cuda
              else hack_prefill.hack_prefill_attention_ref)
        if not past_pages.numel():  # nothing before the chunk: the sinks are its own tokens
            sink_k, sink_v = sink_k[:, :0], sink_v[:, :0]
        if self.rotate:
            r = self._rot(q.device)
            q, k, v = rotate(q, r), rotate(k, r), rotate(v, r)
            sink_k, sink_v = rotate(sink_k, r), rotate(sink_v, r)
        out = fn(q.contiguous(), k.contiguous(), v.contiguous(), self._pages(store),
                 past_pages.to(torch.int32).contiguous(), sink_k.contiguous(), sink_v.contiguous(),
                 scale, self.bits, n_sink=self.n_sink, mode=self.mode)
        return rotate(out, self._rot(q.device)) if self.rotate else out

    def num_splits(self, batch, max_len, num_sms):
        return hack_attn.hack_num_splits(batch, self.kvh, max_len, num_sms=num_sms)

    def page_bytes_per_token(self):
        # The f16 attention mode reads no code sums, but they are stored (and sent): count them.
        return hack_bytes_per_token(self.head_dim, self.bits, self.group_v, self.page_size)


CODECS = ("bf16", "fp8", "kivi2", "kivi4", "hack2", "hack4", "hack2mix", "lowrank",
          "lowrank+hack2", "lowrank+hack4")


def make_codec(name: str, num_kv_heads: int, page_size: int, head_dim: int,
               model_dir: str | None = None) -> KVCodec | None:
    """The codec called `name` (None for bf16, the engine's own dense pages). Low-rank codecs
    read the calibrated bases beside the checkpoint in model_dir. A head_dim the codec cannot take
    raises ValueError naming head_dim, the codec and what it needs (`check_head_dim`)."""
    if name not in CODECS:
        raise ValueError(f"codec: unknown codec {name!r}; known: {', '.join(CODECS)}")
    check_head_dim(name, head_dim)
    if name == "bf16":
        return None
    if name == "fp8":
        return Fp8Codec(num_kv_heads, page_size, head_dim)
    if name in ("kivi2", "kivi4"):
        return KiviCodec(num_kv_heads, page_size, head_dim, int(name[-1]))
    if name in ("hack2", "hack4"):
        return HackCodec(num_kv_heads, page_size, head_dim, int(name[-1]))
    if name == "hack2mix":  # per-layer bits from kvbits.json (compress/kvbits.py)
        from zipserve.compress.kvbits import HackMixedCodec

        return HackMixedCodec.load(num_kv_heads, page_size, head_dim, model_dir)
    if name.startswith("lowrank") and name in CODECS:
        from zipserve.compress.lowrank import LowRankBases, LowRankCodec

        if model_dir is None:
            raise ValueError(f"codec: {name} needs a model directory with calibrated bases")
        bits = int(name[-1]) if "+" in name else None
        return LowRankCodec(name, num_kv_heads, page_size, head_dim,
                            LowRankBases.load(model_dir), bits)
    raise ValueError(f"codec: unknown codec {name!r}; known: {', '.join(CODECS)}")
