"""ZeroC-style low-rank KV: each layer's K and V are stored projected onto calibrated per-KV-head
bases (post-RoPE for K), optionally quantized further with HACK (`lowrank+hack2/4`).

What a query sees, in prefill and decode alike:
- V lives in its completed basis T = [v_enc | C] (compress/lowrank_fold.py: complete_basis, T^-1's
  first r_v rows are v_dec^T): pages hold the first r_v coordinates v @ v_enc, the 16-bit open page
  and sinks all D of them, v @ T (`to_dense`: exact, only a change of basis). Every attention output
  is o_T [.., H, D] in that basis (pages add to its first r_v columns), and W_o is replaced at load
  time by W_o folded with T^-1 (same size as W_o): no per-step lift exists.
- K: pages hold k @ k_enc (projected after RoPE by the encode kernel that stores them,
  kernels/lowrank_encode.py; a filled open page is projected by the same kernel when sealed).
  Scores against pages use q_red = q @ k_dec, q projected after RoPE (RoPE rotates by position, so
  Bk cannot be folded into W_q for post-RoPE keys: a D x r_k product per query head and step).
  The open page and sinks keep K at full dimension and are scored with q itself.
Why the tail keeps V exact: the model's attention mass sits mostly on the open page in most layers
(bench/QUALITY_BREAKDOWN.md), so projecting its values cost more than the pages' projection: with
the tail's V projected (the codec before V's basis was completed, the shipped ranks) 4 held-out
windows lost +8.1% perplexity, with it exact +5.4% (bench/QUALITY_BREAKDOWN.md, "lowrank").
Keeping the tail's K projected too cost +31.6% in an earlier measurement (layers with small r_k
lose the exact scores of the most recent tokens).
Pages of layer l hold exactly r_k(l) and r_v(l) float16 columns (or HACK codes of both, zero
padded to the layer's HACK width, whose bytes page_bytes_per_token counts: one power of two >= 64
for lowrank+hack2/4, the measured plan's per-layer width and bits for lowrank+hack2mix,
compress/lowrank_plan.py). The dense buffers keep head_dim columns, as counted by
bytes_per_token's dense term. Ranks: `zipserve calibrate` (compress/calibrate.py) measures them.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from zipserve.compress.codec import KVCodec
from zipserve.compress.hack import HackCodec
from zipserve.compress.lowrank_bases import LowRankBases
from zipserve.compress.lowrank_fold import apply_lowrank_output, complete_basis
from zipserve.compress.wire import LayoutError, check_fields
from zipserve.kernels import hack_decode_attention as hack_attn
from zipserve.kernels import lowrank_decode_attention as lr_attn
from zipserve.kernels import lowrank_encode, page_query
from zipserve.kernels import lowrank_tail_merge as tail_merge
from zipserve.kernels.dequant_pages import check_dense_out
from zipserve.kernels.step_constants import kept_outside_capture, row_ids, zero_ids


def _pad_pow2(r: int, lo: int = 64) -> int:
    p = lo
    while p < r:
        p *= 2
    return p


class LowRankLayerCodec(KVCodec):
    """One layer's low-rank codec (pages: projected K/V, float16 or HACK codes); values and the
    attention output live in V's completed basis (module docstring). Its dense form
    (decode_kv=dense) is the 16-bit tail's: K at full dimension (pages: k_red @ k_dec^T, scoring
    as q_red . k_red does), V in the completed basis (pages: zero past r_v); the model's folded
    W_o takes the bf16 kernel's output as it takes this codec's."""

    def __init__(
        self,
        name,
        num_kv_heads,
        page_size,
        head_dim,
        bases: dict[str, torch.Tensor],
        bits: int | None,
        width: int | None = None,
    ):
        """bits: HACK's on the reduced dims (None: float16 pages); width: HACK's head size, >=
        both ranks (default: the next power of two >= 64)."""
        self.name, self.bits = name, bits
        super().__init__(num_kv_heads, page_size, head_dim)
        self.rk, self.rv = bases["k_enc"].shape[-1], bases["v_enc"].shape[-1]
        self._bases_cpu = {n: b.float().contiguous() for n, b in bases.items()}  # [KVH, D, r]
        # V's completed basis and its inverse (transposed), [KVH, D, D]: the tail's V and W_o's fold
        self.v_enc_full, self.v_dec_full = complete_basis(bases["v_enc"], bases["v_dec"])
        self.v_folded = False
        """The model's V projection emits v @ T (set by prepare_model's fold, lowrank_fold.py):
        to_dense leaves v as it is and encode takes it as already in V's completed basis."""
        self._bases_cpu["v_enc_full"] = self.v_enc_full
        self._dev: dict[torch.device, dict[str, torch.Tensor]] = {}
        self.inner = None
        if bits is not None:  # HACK on the reduced dims, both padded to one width
            self.width = width or _pad_pow2(max(self.rk, self.rv))
            if self.width < max(self.rk, self.rv):
                raise ValueError(
                    f"codec: {name} width {self.width} is below its ranks {self.rk} / {self.rv}"
                )
            self.inner = HackCodec(num_kv_heads, page_size, self.width, bits)
            self.n_sink = HackCodec.n_sink
            # k_dec zero padded to the HACK width [KVH, D, W]: q @ it is the pages' query as
            # their kernel takes it, zeros past r_k, in one product
            self._bases_cpu["k_dec_width"] = (
                _width(self._bases_cpu["k_dec"], self.width).float().contiguous()
            )

    def _bases(self, device) -> dict[str, torch.Tensor]:
        if device not in self._dev:
            self._dev[device] = {n: b.to(device) for n, b in self._bases_cpu.items()}
        return self._dev[device]

    # -- the reduced space -----------------------------------------------------------------------
    def _project_query(self, q: torch.Tensor) -> torch.Tensor:
        """q [B, H, D] after RoPE -> q_red [B, H, r_k] (q @ k_dec of each query head's KV head)."""
        b, h, d = q.shape
        k_dec = self._bases(q.device)["k_dec"]  # [KVH, D, r_k]
        qr = torch.einsum("bkgd,kdr->bkgr", q.float().view(b, self.kvh, h // self.kvh, d), k_dec)
        return qr.reshape(b, h, self.rk).to(q.dtype)

    def to_dense(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """New k/v [.., KVH, D] -> what the open page and sinks keep: k as it is, v in V's
        completed basis, v @ [v_enc | C] [.., KVH, D] (its first r_v columns are what a page
        stores). A 16-bit v meets the basis rounded to its dtype (one matmul with fp32
        accumulation, not a cast, an fp32 matmul and a cast back: a decode step asks every layer).
        With v_folded (the model's V projection emits v @ T already: lowrank_fold.py) v is
        returned as it is."""
        if self.v_folded:
            return k, v
        bases = self._bases(v.device)
        if v.dtype == torch.float32:
            return k, torch.einsum("...hd,hde->...he", v, bases["v_enc_full"])
        basis = kept_outside_capture(
            bases, f"v_enc_full_{v.dtype}", lambda: bases["v_enc_full"].to(v.dtype)
        )
        return k, torch.einsum("...hd,hde->...he", v, basis)

    def lift_v(self, vt: torch.Tensor) -> torch.Tensor:
        """Values [.., KVH, P, D] in V's completed basis (pages: zero past r_v) -> the model's
        basis (vt @ v_dec_full^T), fp32: what attention to them stands for."""
        dec = self.v_dec_full.to(vt.device)  # [KVH, D, D]
        return torch.einsum("...hpe,hde->...hpd", vt.float(), dec)

    # -- pages -----------------------------------------------------------------------------------
    def new_store(self, num_pages, device):
        shape = (num_pages, self.kvh, self.page_size)
        if self.inner is None:
            return {
                "k": torch.zeros(*shape, self.rk, dtype=torch.float16, device=device),
                "v": torch.zeros(*shape, self.rv, dtype=torch.float16, device=device),
            }
        return self.inner.new_store(num_pages, device)

    def _encode(self, store, page_ids, k, v, v_projected: bool, src_rows=None, skip_page=None):
        """Pages i of k/v (rows src_rows[i] when given, read in place) into page_ids[i]; ids equal
        to skip_page write nothing. v_projected: v is in V's completed basis (the dense form), of
        which a page keeps the first r_v columns."""
        b = self._bases(k.device)
        fn = (
            lowrank_encode.lowrank_encode_pages
            if k.is_cuda
            else lowrank_encode.lowrank_encode_pages_ref
        )
        k, v = _last_contiguous(k), _last_contiguous(v)
        v_basis = None if v_projected else b["v_enc"]
        v_cols = self.rv if v_projected else None
        where = dict(src_rows=src_rows, skip_page=skip_page, v_cols=v_cols)
        if self.inner is None:
            fn(k, v, b["k_enc"], v_basis, store["k"], store["v"], page_ids, **where)
            return
        # lowrank+hack: the kernel's fp32 output, zero padded to the HACK width, is quantized.
        # Page i goes through tmp row i; the projection skips the rows whose pool page is
        # skip_page (skip_ids), and HACK skips the page itself.
        n = page_ids.shape[0]
        tmp_k = torch.empty(n, self.kvh, self.page_size, self.width, device=k.device)
        tmp_v = torch.empty_like(tmp_k)
        tmp_rows = row_ids(n, k.device)  # [n] int32 (a shared view, read only)
        if skip_page is not None:
            where["skip_ids"] = page_ids
        fn(k, v, b["k_enc"], v_basis, tmp_k, tmp_v, tmp_rows, **where)
        self.inner.encode(store, page_ids, tmp_k, tmp_v, skip_page=skip_page)

    def encode(self, store, page_ids, k, v):
        """Full-dimension post-RoPE pages k, v [n, KVH, P, D] -> projected pages (v in V's
        completed basis when v_folded: the model's projection made it so)."""
        self._encode(store, page_ids, k, v, v_projected=self.v_folded)

    def seal(self, store, page_ids, k, v):
        """Filled open pages in the dense form (k full, v in V's completed basis) -> projected
        pages."""
        self._encode(store, page_ids, k, v, v_projected=True)

    def seal_rows(self, store, page_ids, k, v, rows, skip_page):
        """A decode step's seal, in place: rows `rows` of the open pages (the dense form), programs
        sealing into skip_page write nothing (the grid is the batch: CUDA-graph safe, and a step
        that fills no page costs one launch of empty programs, not the batch's projections)."""
        self._encode(store, page_ids, k, v, v_projected=True, src_rows=rows, skip_page=skip_page)

    def _reduced(self, store, page_ids) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored reduced K [n, KVH, P, r_k] and V [n, KVH, P, r_v] (fp32)."""
        if self.inner is None:
            return store["k"][page_ids].float(), store["v"][page_ids].float()
        kr, vr = self.inner.dequantize(store, page_ids)
        return kr[..., : self.rk], vr[..., : self.rv]

    def dequantize(self, store, page_ids):
        """Pages in the dense tail's form, [n, KVH, P, D] fp32: K as the full-dimension stand-in
        k_red @ k_dec^T (q . it == q_red . k_red), V in its completed basis (the stored r_v
        coordinates, zeros past them; `lift_v` takes them to the model's basis). The references
        attend to these."""
        return self._dense_form(*self._reduced(store, page_ids))

    def _dense_form(self, kr, vr) -> tuple[torch.Tensor, torch.Tensor]:
        """Reduced K [n, KVH, P, r_k] and V [n, KVH, P, r_v] -> K [n, KVH, P, D] (k_red @ k_dec^T)
        and V [n, KVH, P, D] (zero past r_v), fp32."""
        k_dec = self._bases(kr.device)["k_dec"]  # [KVH, D, r_k]
        return torch.einsum("nhpr,hdr->nhpd", kr, k_dec), _width(vr, self.head_dim)

    def dequantize_into(self, pages, page_ids, out_k, out_v):
        """decode_kv=dense: the n pages of store `pages` -> out pages page_ids [n] of a 16-bit pool
        [N, KVH, P, D] in the dense form (`dequantize`'s values), HACK's codes through their
        dequantize kernel on a GPU (kernels/dequant_pages.py), then K's lift (one product).
        ValueError naming the argument when the store is not this codec's or the pool does not fit."""
        n, dev = self._check_store(pages)
        check_dense_out(n, self.kvh, self.page_size, self.head_dim, page_ids, out_k, out_v, dev)
        k, v = self._dense_form(*self._reduced_all(pages))  # fp32 [n, KVH, P, D] each
        ids = page_ids.long()
        out_k[ids] = k.to(out_k.dtype)
        out_v[ids] = v.to(out_v.dtype)

    @functools.cached_property
    def _empty_store(self) -> dict[str, torch.Tensor]:
        """A store of no pages: the fields, dtypes and per-page shapes a store has."""
        return self.new_store(0, "cpu")

    def _check_store(self, pages) -> tuple[int, torch.device]:
        """(pages, device) of a store of this codec's layout (wire/pages.py: check_fields)."""
        if not isinstance(pages, dict):
            raise ValueError(f"pages: must be a {self.name} store, got {type(pages).__name__}")
        try:
            check_fields(pages, self._empty_store)
        except LayoutError as e:
            raise ValueError(f"pages: {e}") from None
        sizes = {t.shape[0] for t in pages.values()}
        devices = {t.device for t in pages.values()}
        if len(sizes) != 1 or len(devices) != 1:
            raise ValueError("pages: every tensor must hold the same pages on one device")
        return sizes.pop(), devices.pop()

    def _reduced_all(self, pages) -> tuple[torch.Tensor, torch.Tensor]:
        """All n pages of a store: reduced K [n, KVH, P, r_k] and V [n, KVH, P, r_v] (fp32)."""
        if self.inner is None:
            return pages["k"].float(), pages["v"].float()
        hp = self.inner._pages(pages)
        n, dev = hp.num_pages, hp.device
        tmp_k = torch.empty(n, self.kvh, self.page_size, self.width, device=dev)
        tmp_v = torch.empty_like(tmp_k)
        self.inner.dequantize_into(pages, torch.arange(n, device=dev), tmp_k, tmp_v)
        return tmp_k[..., : self.rk], tmp_v[..., : self.rv]

    @property
    def reads_tail_in_place(self) -> bool:
        """lowrank+hack reads the cache's tail buffer in place (row, start, length: the fused
        tail-merge kernel); plain lowrank's kernel takes it gathered."""
        return self.inner is not None

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
        """q [B, H, D] after RoPE; dense_k full, dense_v in V's completed basis (lowrank+hack: the
        tail buffer, sequence b's range from column dense_start[b] of row dense_rows[b]). Returns
        o_T [B, H, D] in that basis."""
        if self.inner is not None:
            return self._hack_decode(
                q,
                store,
                page_table,
                n_full,
                dense_k,
                dense_v,
                dense_lens,
                scale,
                num_splits,
                dense_rows,
                dense_start,
            )
        fn = lr_attn.lowrank_decode_attention if q.is_cuda else lr_attn.lowrank_decode_attention_ref
        return fn(
            q,
            self._project_query(q),
            store["k"],
            store["v"],
            page_table,
            n_full,
            dense_k,
            dense_v,
            dense_lens,
            scale,
            num_splits=num_splits,
        )

    def _hack_decode(
        self,
        q,
        store,
        page_table,
        n_full,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        num_splits,
        dense_rows=None,
        dense_start=None,
    ):
        """lowrank+hack: the pages (reduced K and V, HACK codes at the inner width) through the HACK
        decode kernel with the projected query and no tail, then the 16-bit tail (full K, V in its
        completed basis) attended and merged with them by their log-sum-exps in one launch
        (kernels/lowrank_tail_merge.py), which also merges the HACK kernel's split partials (3 launches
        with the query's projection). No host syncs: CUDA graphs capture it. o_T [B, H, D] in
        V's completed basis (pages fill its first r_v)."""
        b = q.shape[0]
        q_red, rot = self._page_query(q)  # [B, H, W] fp32 in the pages' basis, [W, W] or None
        no_tail = self._no_tail(q.device)  # [1, KVH, 1, W] fp32 zeros: the pages have no tail
        zeros = zero_ids(b, q.device)  # [B] int32: tail lengths, rows and columns all 0
        hack = hack_attn.hack_decode_attention if q.is_cuda else hack_attn.hack_decode_attention_ref
        inner = self.inner
        o_p, lse_p = hack(  # unmerged: the tail merge below merges the splits too
            q_red,
            inner._pages(store),
            page_table,
            n_full,
            no_tail,
            no_tail,
            zeros,
            scale,
            inner.bits,
            n_sink=self.n_sink,
            num_splits=num_splits,
            mode=inner.mode,
            dense_rows=zeros,
            dense_start=zeros,
            backend=inner.decode_backend,
            return_partials=True,
        )  # [B, H, S, W] partials in the pages' basis (o R), [B, H, S] log2 units
        merge = tail_merge.lowrank_tail_merge if q.is_cuda else tail_merge.lowrank_tail_merge_ref
        return merge(
            q,
            dense_k,
            dense_v,
            dense_lens,
            scale,
            o_p,
            lse_p,
            self.rv,
            dense_rows=dense_rows,
            dense_start=dense_start,
            rotation=rot,
        )

    def _no_tail(self, device) -> torch.Tensor:
        """[1, KVH, 1, W] fp32 zeros: the dense tail the page attention is given (none), kept per
        device."""
        return kept_outside_capture(
            self._bases(device),
            "no_tail",
            lambda: torch.zeros(1, self.kvh, 1, self.width, device=device),
        )

    def _page_query(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """lowrank+hack: q [B, H, D] after RoPE -> (q_red [B, H, W] fp32, the pages' query in their
        (rotated) basis, zeros past r_k; R [W, W] to take their output back, or None)."""
        k_dec, rot = self._page_query_basis(q.device)  # [KVH, D, W] fp32
        project = page_query.project_query if q.is_cuda else page_query.project_query_ref
        return project(q, k_dec), rot  # one launch on a GPU (was a cast, 2 copies and a bmm)

    def _page_query_basis(self, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(k_dec_width @ R [KVH, D, W], R [W, W]) fp32 with HACK's rotation R, else (k_dec_width,
        None): q @ the first is the pages' query in their basis (q_red R: HACK then needs no query
        rotation), and the tail merge takes the pages' output back with R (kernels/
        lowrank_tail_merge.py), so the HACK kernel's rotating merge is not needed either."""
        bases = self._bases(device)
        if not self.inner.rotate:
            return bases["k_dec_width"], None
        rot = self.inner._rot(device)  # [W, W] fp32, symmetric orthonormal (cached by HackCodec)
        if "k_dec_rotated" not in bases:
            bases["k_dec_rotated"] = (bases["k_dec_width"].float() @ rot).contiguous()
        return bases["k_dec_rotated"], rot

    def num_splits(self, batch, max_len, num_sms):
        if self.inner is not None:
            return self.inner.num_splits(batch, max_len, num_sms)
        return super().num_splits(batch, max_len, num_sms)

    def page_bytes_per_token(self):
        if self.inner is None:
            return lr_attn.lowrank_bytes_per_token(self.rk, self.rv)
        return self.inner.page_bytes_per_token()


def _width(x: torch.Tensor, w: int) -> torch.Tensor:
    """The first w columns of x [.., C]: a slice when C >= w, zero padded when C < w."""
    c = x.shape[-1]
    return x[..., :w] if c >= w else torch.nn.functional.pad(x, (0, w - c))


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class LowRankCodec(KVCodec):
    """Dispatches to one LowRankLayerCodec per layer (ranks, and with HACK its bits and width,
    may differ between layers: lowrank+hack2mix, compress/lowrank_plan.py)."""

    def __init__(
        self,
        name,
        num_kv_heads,
        page_size,
        head_dim,
        bases: LowRankBases,
        bits: int | Sequence[int] | None = None,
        widths: Sequence[int] | None = None,
    ):
        """bits: HACK's, one for all layers or one per layer (None: float16 pages); widths:
        HACK's head size per layer (default: see LowRankLayerCodec)."""
        self.name, self.bases = name, bases
        super().__init__(num_kv_heads, page_size, head_dim)
        n = len(bases.layers)
        per_bits = [bits] * n if bits is None or isinstance(bits, int) else list(bits)
        per_width = [None] * n if widths is None else list(widths)
        if len(per_bits) != n or len(per_width) != n:
            raise ValueError(
                f"codec: {name} has bases for {n} layers, bits / widths for "
                f"{len(per_bits)} / {len(per_width)}"
            )
        if len({b is None for b in per_bits}) > 1:  # the cache keeps one set of sinks
            raise ValueError(f"codec: {name} needs HACK bits in every layer or in none")
        for i, b in enumerate(bases.layers):
            for n, t in b.items():
                if (
                    t.dim() != 3
                    or t.shape[:2] != (num_kv_heads, head_dim)
                    or not 1 <= t.shape[2] <= head_dim
                ):
                    raise ValueError(
                        f"codec: lowrank basis layers.{i}.{n} has shape {tuple(t.shape)}, "
                        f"expected [KVH={num_kv_heads}, D={head_dim}, r<=D]"
                    )
        self.layers = [
            LowRankLayerCodec(name, num_kv_heads, page_size, head_dim, b, bt, w)
            for b, bt, w in zip(bases.layers, per_bits, per_width)
        ]
        self.n_sink = self.layers[0].n_sink

    def for_layer(self, layer: int) -> KVCodec:
        return self.layers[layer]

    def prepare_model(self, model, fold: bool = True) -> None:
        """The attention output is in V's completed basis: its inverse folded into W_o
        (compress/lowrank_fold.py; fold False: lifted back every step, the unfolded reference)."""
        apply_lowrank_output(model, self, fold=fold)

    def _per_layer(self, *_):
        raise TypeError("LowRankCodec has one codec per layer: use for_layer(layer)")

    new_store = encode = seal = dequantize = dequantize_into = to_dense = _per_layer

    def page_bytes_per_token(self):
        return sum(c.page_bytes_per_token() for c in self.layers) / len(self.layers)
