"""Torch fp32 reference of the HACK decode kernel (kernels/hack_decode_attention.py): the same
signature, math and int8 roundings, computed sequence by sequence; what the CPU runs and what the
kernel's tests compare against."""

import torch

from zipserve.kernels.hack_layout import check_decode_args, unpack_planar

_LOG2E = 1.4426950408889634


def hack_decode_attention_ref(
    q,
    pages,
    page_table,
    n_pages,
    dense_k,
    dense_v,
    dense_lens,
    scale,
    bits,
    n_sink=4,
    num_splits=1,
    mode="f16",
    out=None,
    dense_rows=None,
    dense_start=None,
    rotation=None,
    backend="auto",
    return_lse=False,
    return_partials=False,
):
    """Torch fp32 reference of hack_decode_attention (same signature, math and int8 rounding; syncs
    on lengths; ignores splits and the backend choice). return_lse: also the log2-sum-exp2 of each
    row's scores (in log2 units, -inf for a padding row) as [B, H] fp32. return_partials: the
    result as one partial, (part [B, H, 1, D], lse [B, H, 1]) fp32: partials whose merge is the
    kernel's (which leaves 1 + num_splits of them)."""
    if return_partials and (rotation is not None or return_lse or out is not None):
        raise ValueError("return_partials: not with rotation, return_lse or out")
    B, H, KVH, P, D = check_decode_args(
        q,
        pages,
        page_table,
        n_pages,
        dense_k,
        dense_v,
        dense_lens,
        scale,
        bits,
        n_sink,
        num_splits,
        mode,
        out,
        dense_rows,
        dense_start,
        rotation,
    )
    rows = list(range(B)) if dense_rows is None else dense_rows.tolist()
    starts = [0] * B if dense_start is None else dense_start.tolist()
    q_pages = q.float() if rotation is None else q.float() @ rotation.float()  # pages' basis
    G, E, GV = H // KVH, 8 // pages.bits, pages.group_v
    DE, NG = D // E, D // GV
    qk, half = float(scale) * _LOG2E, ((1 << pages.bits) - 1) / 2.0
    res = torch.zeros((B, H, D), dtype=torch.float32, device=q.device)
    lse = torch.full((B, H), float("-inf"), dtype=torch.float32, device=q.device)
    for b, (npg, dl) in enumerate(zip(n_pages.tolist(), dense_lens.tolist())):
        if npg <= 0 and dl <= 0:
            continue
        qb = q_pages[b].view(KVH, G, D) * qk  # [KVH, G, D]
        ids = page_table[b, : max(npg, 0)].long()
        n = ids.numel()
        kc = unpack_planar(pages.k_codes[ids], pages.bits).float()  # [n, KVH, P, D]
        ks, km = pages.k_scale[ids].float(), pages.k_min[ids].float()  # [n, KVH, D]
        qt = qb[None] * ks[:, :, None, :]  # q~ [n, KVH, G, D]
        qm = (qb[None] * km[:, :, None, :]).sum(-1)  # [n, KVH, G]
        if mode == "int8":
            qt5 = qt.view(n, KVH, G, E, DE)
            sig = qt5.abs().amax(-1) / 127.0  # [n, KVH, G, E]
            q8 = torch.floor(qt5 / torch.where(sig > 0, sig, 1.0)[..., None] + 0.5)
            d = torch.einsum(
                "nkges,nkpes->nkgpe", q8, kc.view(n, KVH, P, E, DE) - half
            )  # centred codes
            s = (d * sig[:, :, :, None, :]).sum(-1) + half * qt.sum(-1)[..., None]  # [n, KVH, G, P]
        else:
            s = torch.einsum("nkgd,nkpd->nkgp", qt, kc)
        s = s + qm[..., None]
        if n > 0 and n_sink > 0:
            s[0, :, :, :n_sink] = float("-inf")  # sinks are attended through the dense tail
        dk = dense_k[rows[b], :, starts[b] : starts[b] + dl].float()  # [KVH, dl, D]
        dv = dense_v[rows[b], :, starts[b] : starts[b] + dl].float()
        if rotation is not None:  # everything in the pages' basis (q R . k R = q . k)
            dk, dv = dk @ rotation.float(), dv @ rotation.float()
        sd = torch.einsum("kgd,ktd->kgt", q_pages[b].view(KVH, G, D), dk) * qk
        m = torch.cat([s.permute(1, 2, 0, 3).reshape(KVH, G, -1), sd], -1).amax(-1)  # [KVH, G]
        pq = torch.exp2(s - m[None, :, :, None])  # [n, KVH, G, P]
        pd = torch.exp2(sd - m[..., None])  # [KVH, G, dl]
        l = pq.sum(dim=(0, 3)) + pd.sum(-1)  # noqa: E741  [KVH, G]
        vc = unpack_planar(pages.v_codes[ids], pages.bits).float().view(n, KVH, P, NG, GV)
        vs, vm = pages.v_scale[ids].float(), pages.v_min[ids].float()  # [n, KVH, P, NG]
        pt = pq[..., None] * vs[:, :, None]  # p~ [n, KVH, G, P, NG]
        vmt = (pq[..., None] * vm[:, :, None]).sum(3)  # [n, KVH, G, NG]
        if mode == "int8":
            sig = pt.amax(3) / 255.0  # [n, KVH, G, NG]
            p8 = (
                torch.floor(pt / torch.where(sig > 0, sig, 1.0)[:, :, :, None] + 0.5).clamp_max(255)
                - 128
            )
            d = torch.einsum("nkgpj,nkpjc->nkgjc", p8, vc)  # [n, KVH, G, NG, GV]
            vsum = pages.v_sums[ids].float().view(n, KVH, 1, NG, GV)
            cent = (
                d - half * p8.sum(3)[..., None] + 128.0 * (vsum - P * half)
            )  # sum (p'+128)(v'-half)
            oq = sig[..., None] * cent + (half * pt.sum(3) + vmt)[..., None]
        else:
            oq = torch.einsum("nkgpj,nkpjc->nkgjc", pt, vc) + vmt[..., None]
        o = oq.sum(0).reshape(KVH, G, D) + torch.einsum("kgt,ktd->kgd", pd, dv)
        res[b] = (o / torch.where(l > 0, l, 1.0)[..., None]).reshape(H, D)
        lse[b] = torch.where(l > 0, m + torch.log2(torch.where(l > 0, l, 1.0)), float("-inf")).view(
            H
        )
    if return_partials:
        return res[:, :, None], lse[:, :, None]
    if rotation is not None:  # back to the model's basis (R is its own inverse)
        res = res @ rotation.float()
    if out is None:
        out = res.to(q.dtype)
    else:
        out.copy_(res)
    return (out, lse) if return_lse else out
