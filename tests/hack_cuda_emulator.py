"""Numpy emulation of one warp of hack_decode_warp_v2 (kernels/cuda/hack_decode.cu), lane by lane,
reading its pages from the pool (global loads) or through a shared-memory stage (v2s* variants).

CI has no GPU, so tests/test_hack_cuda_emulation.py checks the CUDA kernel's fragment bookkeeping
here: every index, byte permutation, lop3 mask, mma / movmatrix fragment (PTX ISA layouts of
mma.m16n8k16 .f16 and movmatrix.m8n8.trans.b16) and shuffle of the v2 kernel, transcribed by hand,
against a float64 softmax over one page split.  It checks the transcription, not the compiled
kernel: a change to hack_decode_warp_v2 must be mirrored here (the GPU tests check the binary).
"""

import numpy as np
import torch

from zipserve.kernels.hack_layout import unpack_planar

D, P = 128, 64
lane = np.arange(32)
gid, tid = lane >> 2, lane & 3
f16 = np.float16


def h2(lo, hi):  # two fp16 arrays -> uint32 [32]
    lo = np.asarray(lo, f16).view(np.uint16).astype(np.uint32)
    hi = np.asarray(hi, f16).view(np.uint16).astype(np.uint32)
    return lo | (hi << 16)


def unh2(x):  # uint32 [32] -> (lo, hi) float32
    x = np.asarray(x, np.uint32)
    lo = (x & 0xFFFF).astype(np.uint16).view(f16).astype(np.float32)
    hi = (x >> 16).astype(np.uint16).view(f16).astype(np.float32)
    return lo, hi


def byte_perm(a, b, sel):
    a = np.asarray(a, np.uint64) if np.ndim(a) else np.full(32, a, np.uint64)
    b = np.asarray(b, np.uint64) if np.ndim(b) else np.full(32, b, np.uint64)
    sel = np.asarray(sel, np.uint64) if np.ndim(sel) else np.full(32, sel, np.uint64)
    x = a | (b << 32)
    out = np.zeros(32, np.uint64)
    for i in range(4):
        s = (sel >> (4 * i)) & 7
        out |= ((x >> (8 * s)) & 0xFF) << (8 * i)
    return out.astype(np.uint32)


def magic(w, mask):
    return (np.asarray(w, np.uint32) & np.uint32(mask)) | np.uint32(0x64006400)


def full(v):
    return np.full(32, v, np.uint32)


def mma4(c, a0, a1, a2, a3, b0, b1):
    """c: [4, 32] float32; regs [32] uint32 -> new c."""
    A = np.zeros((16, 16), np.float32)
    B = np.zeros((16, 8), np.float32)
    C = np.zeros((16, 8), np.float32)
    regs = [a0, a1, a2, a3]
    for r in range(4):
        lo, hi = unh2(regs[r] if np.ndim(regs[r]) else full(regs[r]))
        row = gid + 8 * (r % 2)
        col = 2 * tid + 8 * (r // 2)
        A[row, col] = lo
        A[row, col + 1] = hi
    for r, reg in enumerate([b0, b1]):
        lo, hi = unh2(reg if np.ndim(reg) else full(reg))
        k = 2 * tid + 8 * r
        B[k, gid] = lo
        B[k + 1, gid] = hi
    for i in range(4):
        C[gid + 8 * (i // 2), 2 * tid + (i % 2)] = c[i]
    Dm = A.astype(np.float64) @ B.astype(np.float64) + C
    return np.stack([Dm[gid + 8 * (i // 2), 2 * tid + (i % 2)] for i in range(4)]).astype(
        np.float32
    )


def movmatrix_trans(x):
    lo, hi = unh2(x)
    M = np.zeros((8, 8), np.float32)
    M[gid, 2 * tid] = lo
    M[gid, 2 * tid + 1] = hi
    T = M.T
    return h2(T[gid, 2 * tid], T[gid, 2 * tid + 1])


def shfl(v, src):
    return v[src]


def shfl_xor(v, m):
    return v[lane ^ m]


def ld_bytes(
    buf, offs, n
):  # buf: flat uint8 numpy; offs [32] -> n bytes -> uint32 words [n//4][32]
    return [
        np.array(
            [int.from_bytes(buf[o + 4 * i : o + 4 * i + 4].tobytes(), "little") for o in offs],
            np.uint32,
        )
        for i in range(n // 4)
    ]


def v_swizzle(off):
    """hack_decode.cu's v_swizzle: a V-code byte offset's place in a shared-memory stage."""
    off = np.asarray(off, np.int64)
    return off ^ ((off >> 2) & 0x60)


class PoolPage:
    """hack_decode.cu's PoolPage: page `row` of the six pool tensors, offsets page-relative."""

    def __init__(self, pool, row, bits):
        de, self.ng = D * bits // 8, 8 // bits
        self.codes, self.tokens = P * de, P * self.ng * 2
        self.kc = pool.k_codes.numpy().reshape(-1)
        self.vc = pool.v_codes.numpy().reshape(-1)
        self.ks, self.km, self.vs, self.vm = (
            t.numpy().view(np.uint8).reshape(-1)
            for t in (pool.k_scale, pool.k_min, pool.v_scale, pool.v_min)
        )
        self.row = row

    def k(self, off, n):  # K code bytes [off, off + n) -> n // 4 words
        return ld_bytes(self.kc, self.row * self.codes + np.asarray(off), n)

    def v_word(self, row_off, col):  # V code bytes [row_off + col, + 4)
        return ld_bytes(self.vc, self.row * self.codes + np.asarray(row_off + col), 4)[0]

    def k_scale(self, ch, n):  # n fp16 K scales from channel ch
        return ld_bytes(self.ks, self.row * 2 * D + 2 * np.asarray(ch), 2 * n)

    def k_min(self, ch, n):
        return ld_bytes(self.km, self.row * 2 * D + 2 * np.asarray(ch), 2 * n)

    def v_scale(self, t, n):  # n fp16 V scales from token t's
        return ld_bytes(self.vs, self.row * self.tokens + 2 * self.ng * np.asarray(t), 2 * n)

    def v_min(self, t, n):
        return ld_bytes(self.vm, self.row * self.tokens + 2 * self.ng * np.asarray(t), 2 * n)


class StagePage:
    """hack_decode.cu's StagePage: the page copied into a shared-memory stage by copy_page_async
    (16-byte chunk lane + 32 j of lane, one region of six each, V chunks swizzled), then read
    where the kernel reads it."""

    def __init__(self, pool, row, bits):
        src = PoolPage(pool, row, bits)
        codes, tokens, self.ng = src.codes, src.tokens, src.ng
        self.V, self.KS = codes, 2 * codes
        self.KM = self.KS + 2 * D
        self.VS = self.KM + 2 * D
        self.VM = self.VS + tokens
        stage_bytes = self.VM + tokens
        assert stage_bytes % 512 == 0
        regions = [  # (start in the stage, the pool tensor, its row's first byte)
            (0, src.kc, row * codes),
            (self.V, src.vc, row * codes),
            (self.KS, src.ks, row * 2 * D),
            (self.KM, src.km, row * 2 * D),
            (self.VS, src.vs, row * tokens),
            (self.VM, src.vm, row * tokens),
        ]
        self.buf = np.full(stage_bytes, 0xAB, np.uint8)  # unwritten bytes show up as garbage
        written = np.zeros(stage_bytes, bool)
        for j in range(stage_bytes // 512):
            for ln in range(32):
                off = 16 * ln + 512 * j
                start, buf, base = next(r for r in reversed(regions) if r[0] <= off)
                g = base + (off - start)
                dst = off if start != self.V else self.V + int(v_swizzle(off - self.V))
                assert not written[dst : dst + 16].any(), "two chunks land on the same bytes"
                self.buf[dst : dst + 16] = buf[g : g + 16]
                written[dst : dst + 16] = True
        assert written.all()

    def k(self, off, n):
        return ld_bytes(self.buf, np.asarray(off), n)

    def v_word(self, row_off, col):  # the kernel's v_word: vrow - col + v_swizzle(row_off + col)
        vrow = self.V + np.asarray(col)
        return ld_bytes(self.buf, vrow - col + v_swizzle(row_off + col), 4)[0]

    def k_scale(self, ch, n):
        return ld_bytes(self.buf, self.KS + 2 * np.asarray(ch), 2 * n)

    def k_min(self, ch, n):
        return ld_bytes(self.buf, self.KM + 2 * np.asarray(ch), 2 * n)

    def v_scale(self, t, n):
        return ld_bytes(self.buf, self.VS + 2 * self.ng * np.asarray(t), 2 * n)

    def v_min(self, t, n):
        return ld_bytes(self.buf, self.VM + 2 * self.ng * np.asarray(t), 2 * n)


def warp_v2(
    BITS, q_pages, pool, table_row, n_pg, G, kvh, S, split, qk_scale, n_sink, page=PoolPage
):
    """One warp's split; page: how a trip reads its page (PoolPage: global loads; StagePage: the
    v2s* variants' shared-memory stage)."""
    E, DE = 8 // BITS, D // (8 // BITS)
    NC, NWC, NG = DE // 16, DE // 32, 8 // BITS
    M1 = (1 << BITS) - 1
    KVH = pool.num_kv_heads
    qlo, qhi, qlo2, qhi2 = {}, {}, {}, {}
    for s in range(E):
        for c in range(NC):
            v = np.zeros((32, 4), np.float32)
            ok = gid < G
            for L in range(32):
                if ok[L]:
                    base = s * DE + 4 * (tid[L] * NC + c)
                    v[L] = q_pages[kvh * G + gid[L], base : base + 4]
            f, f2 = qk_scale, qk_scale / float(1 << (s * BITS))
            qlo[s, c] = h2(v[:, 0] * f, v[:, 2] * f)
            qhi[s, c] = h2(v[:, 1] * f, v[:, 3] * f)
            qlo2[s, c] = h2(v[:, 0] * f2, v[:, 2] * f2)
            qhi2[s, c] = h2(v[:, 1] * f2, v[:, 3] * f2)
    per = -(-n_pg // S)
    lo = split * per
    hi = min(lo + per, n_pg)
    m_i = [np.full(32, -np.inf, np.float32) for _ in range(2)]
    o = {
        (wc, hf, s): np.zeros((4, 32), np.float32)
        for wc in range(NWC)
        for hf in range(2)
        for s in range(E)
    }
    aux = np.zeros((4, 32), np.float32)
    mv_sel = np.where(gid & 1, 0x7632, 0x5410).astype(np.uint32)
    mv_word = gid >> 1
    for pg in range(lo, hi):
        row = int(table_row[pg]) * KVH + kvh
        pv = page(pool, row, BITS)
        qtlo, qthi = {}, {}
        corr = np.zeros((4, 32), np.float32)
        for s in range(E):
            for c in range(NC):
                ch = s * DE + 4 * (tid * NC + c)
                sk = pv.k_scale(ch, 4)
                mk = pv.k_min(ch, 4)
                a = unh2(qlo2[s, c])
                bb = unh2(byte_perm(sk[0], sk[1], 0x5410))
                qtlo[s, c] = h2(a[0] * bb[0], a[1] * bb[1])
                a = unh2(qhi2[s, c])
                bb = unh2(byte_perm(sk[0], sk[1], 0x7632))
                qthi[s, c] = h2(a[0] * bb[0], a[1] * bb[1])
                N1 = 0xE400E400
                corr = mma4(corr, N1, N1, N1, N1, qtlo[s, c], qthi[s, c])
                ml = byte_perm(mk[0], mk[1], 0x5410)
                mh = byte_perm(mk[0], mk[1], 0x7632)
                corr = mma4(corr, ml, ml, mh, mh, qlo[s, c], qhi[s, c])
        sc = {}
        for mt in range(4):
            ka = pv.k((mt * 16 + gid) * DE + 4 * tid * NC, 4 * NC)
            kb = pv.k((mt * 16 + gid + 8) * DE + 4 * tid * NC, 4 * NC)
            acc = corr.copy()
            for c in range(NC):
                wa, wb = ka[c], kb[c]
                wa8, wb8 = wa >> 8, wb >> 8
                for s in range(E):
                    mask = (M1 << (s * BITS)) * 0x00010001
                    acc = mma4(
                        acc,
                        magic(wa, mask),
                        magic(wb, mask),
                        magic(wa8, mask),
                        magic(wb8, mask),
                        qtlo[s, c],
                        qthi[s, c],
                    )
            sc[mt] = acc
        if pg == 0:
            for mt in range(4):
                m = (mt * 16 + gid) < n_sink
                sc[mt][0][m] = -np.inf
                sc[mt][1][m] = -np.inf
                m = (mt * 16 + gid + 8) < n_sink
                sc[mt][2][m] = -np.inf
                sc[mt][3][m] = -np.inf
        mx = [np.full(32, -np.inf, np.float32) for _ in range(2)]
        for mt in range(4):
            mx[0] = np.maximum(mx[0], np.maximum(sc[mt][0], sc[mt][2]))
            mx[1] = np.maximum(mx[1], np.maximum(sc[mt][1], sc[mt][3]))
        for j in range(2):
            for m in (4, 8, 16):
                mx[j] = np.maximum(mx[j], shfl_xor(mx[j], m))
        grow = [mx[j] > m_i[j] + 8.0 for j in range(2)]
        if (grow[0] | grow[1]).any():
            n = [np.where(grow[j], mx[j], m_i[j]) for j in range(2)]
            with np.errstate(invalid="ignore"):
                a = [np.exp2(m_i[j] - n[j]) for j in range(2)]
            a = [np.where(np.isnan(x), 1.0, x).astype(np.float32) for x in a]
            for key in o:
                o[key] = o[key] * np.stack([a[0], a[1], a[0], a[1]])
            aux = aux * np.stack([a[0], a[1], a[0], a[1]])
            m_i = n
        mu = [np.where(m_i[j] == -np.inf, 0, m_i[j]) for j in range(2)]
        off = {s: np.zeros((4, 32), np.float32) for s in range(E)}  # this page's offsets
        for kk in range(4):
            pa = movmatrix_trans(h2(np.exp2(sc[kk][0] - mu[0]), np.exp2(sc[kk][1] - mu[1])))
            pb = movmatrix_trans(h2(np.exp2(sc[kk][2] - mu[0]), np.exp2(sc[kk][3] - mu[1])))
            t0 = kk * 16 + 2 * tid
            if NG == 4:
                A0, A1, A8, A9 = (pv.v_scale(t0 + d, 4) for d in (0, 1, 8, 9))
                sv_lo = [
                    byte_perm(A0[0], A1[0], 0x5410),
                    byte_perm(A0[0], A1[0], 0x7632),
                    byte_perm(A0[1], A1[1], 0x5410),
                    byte_perm(A0[1], A1[1], 0x7632),
                ]
                sv_hi = [
                    byte_perm(A8[0], A9[0], 0x5410),
                    byte_perm(A8[0], A9[0], 0x7632),
                    byte_perm(A8[1], A9[1], 0x5410),
                    byte_perm(A8[1], A9[1], 0x7632),
                ]
                M0, M1_, M8, M9 = (pv.v_min(t0 + d, 4) for d in (0, 1, 8, 9))
                pick = lambda X: np.where(mv_word == 1, X[1], X[0])  # noqa
                mv_lo = byte_perm(pick(M0), pick(M1_), mv_sel)
                mv_hi = byte_perm(pick(M8), pick(M9), mv_sel)
            else:
                A0, A1, A8, A9 = (pv.v_scale(t0 + d, 2)[0] for d in (0, 1, 8, 9))
                sv_lo = [byte_perm(A0, A1, 0x5410), byte_perm(A0, A1, 0x7632)]
                sv_hi = [byte_perm(A8, A9, 0x5410), byte_perm(A8, A9, 0x7632)]
                M0, M1_, M8, M9 = (pv.v_min(t0 + d, 2)[0] for d in (0, 1, 8, 9))
                mv_lo = byte_perm(M0, M1_, mv_sel)
                mv_hi = byte_perm(M8, M9, mv_sel)
            mv_lo = np.where(gid == NG, 0x3C003C00, np.where(gid > NG, 0, mv_lo)).astype(np.uint32)
            mv_hi = np.where(gid == NG, 0x3C003C00, np.where(gid > NG, 0, mv_hi)).astype(np.uint32)
            aux = mma4(aux, mv_lo, 0, mv_hi, 0, pa, pb)
            pt_a, pt_b = {}, {}
            for s in range(E):
                x, y = unh2(pa), unh2(sv_lo[s])
                pt_a[s] = h2(x[0] * y[0], x[1] * y[1])
                x, y = unh2(pb), unh2(sv_hi[s])
                pt_b[s] = h2(x[0] * y[0], x[1] * y[1])
                P1 = 0x64006400
                off[s] = mma4(off[s], P1, P1, P1, P1, pt_a[s], pt_b[s])
            for wc in range(NWC):
                col = 4 * (wc * 8 + gid)
                w0 = pv.v_word(t0 * DE, col)
                w1 = pv.v_word((t0 + 1) * DE, col)
                w8 = pv.v_word((t0 + 8) * DE, col)
                w9 = pv.v_word((t0 + 9) * DE, col)
                a01, b01 = byte_perm(w0, w1, 0x5410), byte_perm(w0, w1, 0x7632)
                a89, b89 = byte_perm(w8, w9, 0x5410), byte_perm(w8, w9, 0x7632)
                r_lo, r_hi = [a01, b01], [a89, b89]
                for hf in range(2):
                    x, y = r_lo[hf], r_hi[hf]
                    x8, y8 = x >> 8, y >> 8
                    for s in range(E):
                        mask = (M1 << (s * BITS)) * 0x00010001
                        o[wc, hf, s] = mma4(
                            o[wc, hf, s],
                            magic(x, mask),
                            magic(x8, mask),
                            magic(y, mask),
                            magic(y8, mask),
                            pt_a[s],
                            pt_b[s],
                        )
        for key in o:  # the page's 1024 offsets leave O when the page ends
            o[key] = o[key] - off[key[2]]
    # finish
    l0 = shfl(aux[0], NG * 4 + tid)
    l1 = shfl(aux[1], NG * 4 + tid)
    inv0 = np.where(l0 > 0, 1 / np.where(l0 > 0, l0, 1), 0)
    inv1 = np.where(l1 > 0, 1 / np.where(l1 > 0, l1, 1), 0)
    out = np.zeros((G, D), np.float32)
    lse = np.full(G, -np.inf, np.float32)
    h0 = 2 * tid
    for s in range(E):
        mv0 = shfl(aux[0], s * 4 + tid)
        mv1 = shfl(aux[1], s * 4 + tid)
        down = 1.0 / (1 << (s * BITS))
        for wc in range(NWC):
            r0 = [
                (o[wc, 0, s][0] * down + mv0) * inv0,
                (o[wc, 0, s][2] * down + mv0) * inv0,
                (o[wc, 1, s][0] * down + mv0) * inv0,
                (o[wc, 1, s][2] * down + mv0) * inv0,
            ]
            r1 = [
                (o[wc, 0, s][1] * down + mv1) * inv1,
                (o[wc, 0, s][3] * down + mv1) * inv1,
                (o[wc, 1, s][1] * down + mv1) * inv1,
                (o[wc, 1, s][3] * down + mv1) * inv1,
            ]
            ch = s * DE + 4 * (wc * 8 + gid)
            for L in range(32):
                if h0[L] < G:
                    out[h0[L], ch[L] : ch[L] + 4] = [r[L] for r in r0]
                if h0[L] + 1 < G:
                    out[h0[L] + 1, ch[L] : ch[L] + 4] = [r[L] for r in r1]
    for L in range(32):
        if gid[L] == 0:
            if h0[L] < G:
                lse[h0[L]] = m_i[0][L] + np.log2(l0[L]) if l0[L] > 0 else -np.inf
            if h0[L] + 1 < G:
                lse[h0[L] + 1] = m_i[1][L] + np.log2(l1[L]) if l1[L] > 0 else -np.inf
    return out, lse


def reference_split(BITS, q_pages, pool, table_row, n_pg, G, kvh, S, split, qk_scale, n_sink):
    """Softmax over the split's quantized tokens (dequantized in fp64), in log2 units."""
    per = -(-n_pg // S)
    lo, hi = split * per, min(split * per + per, n_pg)
    ks, vs = [], []
    for pg in range(lo, hi):
        row = int(table_row[pg])
        kc = unpack_planar(pool.k_codes[row, kvh], BITS).double()  # [P, D]
        vcode = unpack_planar(pool.v_codes[row, kvh], BITS).double()
        k = kc * pool.k_scale[row, kvh].double()[None] + pool.k_min[row, kvh].double()[None]
        gv = pool.group_v
        vsc = pool.v_scale[row, kvh].double().repeat_interleave(gv, dim=1)
        vmn = pool.v_min[row, kvh].double().repeat_interleave(gv, dim=1)
        v = vcode * vsc + vmn
        pos = pg * P + torch.arange(P)
        keep = pos >= n_sink
        ks.append(k[keep])
        vs.append(v[keep])
    if not ks:
        return np.zeros((G, D)), np.full(G, -np.inf)
    K, V = torch.cat(ks), torch.cat(vs)
    q = torch.tensor(q_pages[kvh * G : kvh * G + G], dtype=torch.float64) * qk_scale
    s = q @ K.T
    m = s.max(dim=1).values
    p = torch.exp2(s - m[:, None])
    l = p.sum(1)
    return ((p @ V) / l[:, None]).numpy(), (m + torch.log2(l)).numpy()
