"""hack2 / hack4: HACK pages (per-page K per channel, V per token in channel groups, code sums,
4 sinks), attended on the codes."""

from __future__ import annotations

import torch

from zipserve.compress.codec import CHANNEL_GROUP, KVCodec, Store
from zipserve.compress.rotation import hadamard, rotate
from zipserve.kernels import dequant_pages as dq
from zipserve.kernels import hack_decode_attention as hack_attn
from zipserve.kernels import hack_encode
from zipserve.kernels import hack_prefill_attention as hack_prefill
from zipserve.kernels.hack_layout import HackPages, hack_bytes_per_token, hack_group_v


class HackCodec(KVCodec):
    """HACK: per-page K per channel, V per token in channel groups, code sums, 4 sinks; attention
    on the codes (Triton on GPU, its torch reference on CPU).

    Beyond the paper, K and V are Hadamard-rotated before quantization (compress/rotation.py):
    measured on the reference model it lowers perplexity at 2 and 4 bits for the cost of rotating
    q, the dense tail and the output per step. group_v 32 (the paper uses 64): see the note in
    bench/RESULTS.md.

    clip: the encoder's range clip (kernels/hack_encode.py: each group quantized over its [min,
    max] shrunk by this fraction of its width on each side; None: the encoder's default per bits,
    0.1 at 2 bits, 0 at 4; 0: plain min/max). Bytes and decoders are the same either way.
    """

    n_sink = 4
    head_dim_multiple = CHANNEL_GROUP

    def __init__(
        self,
        num_kv_heads,
        page_size,
        head_dim,
        bits: int,
        mode: str = "f16",
        group_v: int = 32,
        rotate: bool = True,
        clip: float | None = None,
    ):
        self.name = f"hack{bits}"
        super().__init__(num_kv_heads, page_size, head_dim)
        if mode not in ("f16", "int8"):
            raise ValueError(f"mode: must be 'f16' or 'int8', got {mode!r}")
        self.bits, self.mode = bits, mode
        # The kernel unpacks V in planes of D/E channels; a V group may not split a plane.
        self.group_v = hack_group_v(head_dim, bits, group_v)
        self.rotate = rotate
        self.clip = hack_encode.clip_for(bits, clip)
        self._r: dict[torch.device, torch.Tensor] = {}

    def _rot(self, device: torch.device) -> torch.Tensor:
        if device not in self._r:
            self._r[device] = hadamard(self.head_dim, device)
        return self._r[device]

    def _pages(self, store: Store) -> HackPages:
        return HackPages(**store, bits=self.bits, group_v=self.group_v)

    def new_store(self, num_pages, device):
        return HackPages.empty(
            num_pages,
            self.kvh,
            self.page_size,
            self.head_dim,
            self.bits,
            self.group_v,
            device=device,
        ).tensors()

    def encode(self, store, page_ids, k, v, skip_page=None):
        """Pages k, v [n, KVH, P, D] into page_ids [n]; ids equal to skip_page write nothing."""
        self._encode(store, page_ids, k.contiguous(), v.contiguous(), skip_page=skip_page)

    def seal_rows(self, store, page_ids, k, v, rows, skip_page):
        """In place: the encoder reads rows `rows` of the open pages, programs sealing into
        skip_page write nothing (CUDA-graph safe: the grid is the batch, the skip is in-kernel)."""
        self._encode(store, page_ids, k, v, src_rows=rows, skip_page=skip_page)

    def _encode(self, store, page_ids, k, v, **where):
        """The encode kernel (its torch reference on CPU) into the store, rotation fused."""
        fn = hack_encode.hack_encode_pages if k.is_cuda else hack_encode.hack_encode_pages_ref
        fn(
            k,
            v,
            self.bits,
            self.group_v,
            out=self._pages(store),
            page_ids=page_ids,
            rotation=self._rot(k.device) if self.rotate else None,
            clip=self.clip,
            **where,
        )

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
        fn(
            self._pages(pages),
            page_ids,
            out_k,
            out_v,
            rotation=self._rot(out_k.device) if self.rotate else None,
        )

    reads_tail_in_place = True

    def decode_attention(
        self,
        q,
        store,
        page_table,
        n_full,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        num_splits=1,
        dense_rows=None,
        dense_start=None,
    ):
        """q, the dense tail and the output in the model's basis; the kernel rotates q for the
        pages and the pages' partial output back in its merge (rotation=None: no rotation)."""
        fn = hack_attn.hack_decode_attention if q.is_cuda else hack_attn.hack_decode_attention_ref
        return fn(
            q,
            self._pages(store),
            page_table,
            n_full,
            dense_k,
            dense_v,
            dense_lens,
            scale,
            self.bits,
            n_sink=self.n_sink,
            num_splits=num_splits,
            mode=self.mode,
            dense_rows=dense_rows,
            dense_start=dense_start,
            rotation=self._rot(q.device) if self.rotate else None,
            backend=self.decode_backend,
        )

    decode_backend = "auto"
    """The decode kernel on GPUs (kernels/hack_decode_attention.py resolve_backend): auto, triton,
    cuda."""

    def resolved_backend(self, device: torch.device, group: int | None = None) -> str:
        """The kernel calls on device take (group: query heads per KV head, None if unknown)."""
        return hack_attn.resolve_backend(
            self.decode_backend,
            device,
            head_dim=self.head_dim,
            page_size=self.page_size,
            bits=self.bits,
            group_v=self.group_v,
            group=group,
            mode=self.mode,
        )

    def prefill_attention(self, q, k, v, store, past_pages, sink_k, sink_v, scale):
        """On the codes (kernels/hack_prefill_attention.py; its torch reference on CPU)."""
        fn = (
            hack_prefill.hack_prefill_attention
            if q.is_cuda
            else hack_prefill.hack_prefill_attention_ref
        )
        if not past_pages.numel():  # nothing before the chunk: the sinks are its own tokens
            sink_k, sink_v = sink_k[:, :0], sink_v[:, :0]
        if self.rotate:
            r = self._rot(q.device)
            q, k, v = rotate(q, r), rotate(k, r), rotate(v, r)
            sink_k, sink_v = rotate(sink_k, r), rotate(sink_v, r)
        out = fn(
            q.contiguous(),
            k.contiguous(),
            v.contiguous(),
            self._pages(store),
            past_pages.to(torch.int32).contiguous(),
            sink_k.contiguous(),
            sink_v.contiguous(),
            scale,
            self.bits,
            n_sink=self.n_sink,
            mode=self.mode,
        )
        return rotate(out, self._rot(q.device)) if self.rotate else out

    def num_splits(self, batch, max_len, num_sms):
        backend = "triton"
        if torch.cuda.is_available():
            backend = self.resolved_backend(torch.device("cuda", torch.cuda.current_device()))
        return hack_attn.hack_num_splits(
            batch,
            self.kvh,
            max_len,
            num_sms=num_sms,
            backend=backend,
            bits=self.bits,
            head_dim=self.head_dim,
        )

    def page_bytes_per_token(self):
        # The f16 attention mode reads no code sums, but they are stored (and sent): count them.
        return hack_bytes_per_token(self.head_dim, self.bits, self.group_v, self.page_size)
