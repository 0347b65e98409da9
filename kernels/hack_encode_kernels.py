"""HACK page encoder, the Triton side: the whole-head kernel (power-of-two head_dim) and the
plane-by-plane kernel (any other head_dim), with their shared quantize / clip helpers.

The host wrapper, argument checks and the pure-torch reference live in hack_encode.py, whose
docstring gives the layout, rounding and clip rules these kernels implement.
"""

import triton
import triton.language as tl


@triton.jit
def _quantize(x, lo, hi, QMAX: tl.constexpr):
    """x fp32, broadcastable lo/hi -> (codes int32, scale, min); scale/min are fp16-rounded fp32."""
    sc = ((hi - lo) / QMAX).to(tl.float16).to(tl.float32)
    mn = lo.to(tl.float16).to(tl.float32)
    ok = sc > 0.0
    y = tl.where(ok, (x - mn) / tl.where(ok, sc, 1.0), 0.0)
    codes = tl.minimum(tl.maximum(tl.floor(y + 0.5), 0.0), QMAX).to(tl.int32)
    return codes, sc, mn


@triton.jit
def _clip(lo, hi, CLIP: tl.constexpr):
    """A group's range [lo, hi] shrunk by CLIP of its width on each side (module doc)."""
    if CLIP > 0.0:
        r = hi - lo
        lo, hi = lo + CLIP * r, hi - CLIP * r
    return lo, hi


@triton.jit
def _hack_encode_kernel(
    k_ptr,
    v_ptr,
    ids_ptr,
    src_ptr,
    skip_id,
    rot_ptr,  # k/v [n, KVH, P, D] (strided), ids [n], rotation [D, D]
    kc_ptr,
    vc_ptr,
    ks_ptr,
    km_ptr,
    vs_ptr,
    vm_ptr,
    ksum_ptr,
    vsum_ptr,  # contiguous pool tensors
    stride_kn,
    stride_kh,
    stride_kt,
    stride_vn,
    stride_vh,
    stride_vt,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BITS: tl.constexpr,
    GV: tl.constexpr,
    ROTATE: tl.constexpr,
    ROT_PREC: tl.constexpr,
    CLIP: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    E: tl.constexpr = 8 // BITS
    DE: tl.constexpr = HEAD_DIM // E
    NG: tl.constexpr = HEAD_DIM // GV
    QMAX: tl.constexpr = (1 << BITS) - 1
    page = tl.load(ids_ptr + i)
    src = tl.load(src_ptr + i).to(tl.int64)  # input page read by this program
    row = page.to(tl.int64) * tl.num_programs(1) + h  # (page, head) row in the pool
    if page != skip_id:  # rows sealing into the skipped (scratch) page write nothing
        offs_t = tl.arange(0, PAGE)
        offs_d = tl.arange(0, HEAD_DIM)
        offs_c = tl.arange(0, DE)
        offs_g = tl.arange(0, NG)
        shifts = (tl.arange(0, E) * BITS)[None, :, None]  # [1, E, 1] bit offset of plane s
        k = tl.load(
            k_ptr + src * stride_kn + h * stride_kh + offs_t[:, None] * stride_kt + offs_d[None, :]
        ).to(tl.float32)  # [P, D]
        v = tl.load(
            v_ptr + src * stride_vn + h * stride_vh + offs_t[:, None] * stride_vt + offs_d[None, :]
        ).to(tl.float32)  # [P, D]
        if ROTATE:  # x @ R before quantizing (R orthonormal [D, D], fp32)
            r = tl.load(rot_ptr + offs_d[:, None] * HEAD_DIM + offs_d[None, :])  # [D, D]
            k = tl.dot(k, r, input_precision=ROT_PREC)
            v = tl.dot(v, r, input_precision=ROT_PREC)

        # ---- K: per channel over the page's tokens.
        klo, khi = _clip(tl.min(k, axis=0)[None, :], tl.max(k, axis=0)[None, :], CLIP)  # [1, D]
        kq, ksc, kmn = _quantize(k, klo, khi, QMAX)  # [P, D]
        kpack = tl.sum(tl.reshape(kq, (PAGE, E, DE)) << shifts, axis=1)  # [P, DE] planar bytes
        tl.store(
            kc_ptr + row * (PAGE * DE) + offs_t[:, None] * DE + offs_c[None, :], kpack.to(tl.uint8)
        )
        tl.store(ks_ptr + row * HEAD_DIM + offs_d, tl.reshape(ksc, (HEAD_DIM,)).to(tl.float16))
        tl.store(km_ptr + row * HEAD_DIM + offs_d, tl.reshape(kmn, (HEAD_DIM,)).to(tl.float16))
        tl.store(ksum_ptr + row * PAGE + offs_t, tl.sum(kq, axis=1).to(tl.float32))

        # ---- V: per token, in channel groups of GV.
        v3 = tl.reshape(v, (PAGE, NG, GV))
        vlo, vhi = _clip(tl.min(v3, axis=2)[:, :, None], tl.max(v3, axis=2)[:, :, None], CLIP)
        vq3, vsc, vmn = _quantize(v3, vlo, vhi, QMAX)  # ranges [P, NG, 1]
        vq = tl.reshape(vq3, (PAGE, HEAD_DIM))  # [P, D]
        vpack = tl.sum(tl.reshape(vq, (PAGE, E, DE)) << shifts, axis=1)  # [P, DE]
        tl.store(
            vc_ptr + row * (PAGE * DE) + offs_t[:, None] * DE + offs_c[None, :], vpack.to(tl.uint8)
        )
        vptr = row * (PAGE * NG) + offs_t[:, None] * NG + offs_g[None, :]  # [P, NG]
        tl.store(vs_ptr + vptr, tl.reshape(vsc, (PAGE, NG)).to(tl.float16))
        tl.store(vm_ptr + vptr, tl.reshape(vmn, (PAGE, NG)).to(tl.float16))
        tl.store(vsum_ptr + row * HEAD_DIM + offs_d, tl.sum(vq, axis=0).to(tl.float32))


@triton.jit
def _plane(
    x_ptr,
    x_full,
    rot_ptr,
    offs_t,
    stride_t,
    offs_c,
    c_ok,
    offs_d,
    d_ok,
    s: tl.constexpr,
    DE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROTATE: tl.constexpr,
    ROT_PREC: tl.constexpr,
):
    """Channels [s * DE, (s + 1) * DE) of x [P, D] (x_ptr: the (page, head) tile), or of x @ R when
    ROTATE (x_full: x as [P, BD], zeros past D), as fp32 [P, DEP] with zeros past DE."""
    ch = s * DE + offs_c  # [DEP]
    if ROTATE:
        r = tl.load(
            rot_ptr + offs_d[:, None] * HEAD_DIM + ch[None, :],
            mask=d_ok[:, None] & c_ok[None, :],
            other=0.0,
        )  # [BD, DEP] columns of R
        x = tl.dot(x_full, r, input_precision=ROT_PREC)
    else:
        x = tl.load(
            x_ptr + offs_t[:, None] * stride_t + ch[None, :], mask=c_ok[None, :], other=0.0
        ).to(tl.float32)
    return x


@triton.jit
def _k_plane(
    x,
    ks_ptr,
    km_ptr,
    row,
    offs_c,
    c_ok,
    s: tl.constexpr,
    DE: tl.constexpr,
    DEP: tl.constexpr,
    BITS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    CLIP: tl.constexpr,
):
    """K plane x [P, DEP] quantized per channel over the page (range clipped): stores its scales /
    mins and returns (codes shifted into plane s's bits [P, DEP], each token's code sum over the
    plane [P])."""
    lo, hi = _clip(tl.min(x, axis=0)[None, :], tl.max(x, axis=0)[None, :], CLIP)
    q, sc, mn = _quantize(x, lo, hi, (1 << BITS) - 1)
    tl.store(
        ks_ptr + row * HEAD_DIM + s * DE + offs_c, tl.reshape(sc, (DEP,)).to(tl.float16), mask=c_ok
    )
    tl.store(
        km_ptr + row * HEAD_DIM + s * DE + offs_c, tl.reshape(mn, (DEP,)).to(tl.float16), mask=c_ok
    )
    return q << (s * BITS), tl.sum(tl.where(c_ok[None, :], q, 0), axis=1)


@triton.jit
def _v_plane_codes(
    x,
    lo,
    hi,
    vs_ptr,
    vm_ptr,
    vsum_ptr,
    row,
    offs_t,
    offs_c,
    c_ok,
    s: tl.constexpr,
    DE: tl.constexpr,
    GV: tl.constexpr,
    NG: tl.constexpr,
    BITS: tl.constexpr,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """V plane x [P, DEP] quantized per token with its group's range lo / hi [P]: stores the group's
    scale / min (once, from the group's first plane) and the plane's code sums; returns the codes
    shifted into plane s's bits."""
    q, sc, mn = _quantize(x, lo[:, None], hi[:, None], (1 << BITS) - 1)
    if (s * DE) % GV == 0:
        g: tl.constexpr = s * DE // GV
        tl.store(
            vs_ptr + row * (PAGE * NG) + offs_t * NG + g, tl.reshape(sc, (PAGE,)).to(tl.float16)
        )
        tl.store(
            vm_ptr + row * (PAGE * NG) + offs_t * NG + g, tl.reshape(mn, (PAGE,)).to(tl.float16)
        )
    tl.store(
        vsum_ptr + row * HEAD_DIM + s * DE + offs_c, tl.sum(q, axis=0).to(tl.float32), mask=c_ok
    )
    return q << (s * BITS)


@triton.jit
def _row_range(x, c_ok):
    """Per-token min / max [P] of a plane x [P, DEP] over its real channels."""
    return (
        tl.min(tl.where(c_ok[None, :], x, float("inf")), axis=1),
        tl.max(tl.where(c_ok[None, :], x, float("-inf")), axis=1),
    )


@triton.jit
def _hack_encode_planes_kernel(
    k_ptr,
    v_ptr,
    ids_ptr,
    src_ptr,
    skip_id,
    rot_ptr,  # k/v [n, KVH, P, D] (strided), ids [n], rotation [D, D]
    kc_ptr,
    vc_ptr,
    ks_ptr,
    km_ptr,
    vs_ptr,
    vm_ptr,
    ksum_ptr,
    vsum_ptr,  # contiguous pool tensors
    stride_kn,
    stride_kh,
    stride_kt,
    stride_vn,
    stride_vh,
    stride_vt,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DEP: tl.constexpr,
    BITS: tl.constexpr,
    GV: tl.constexpr,
    ROTATE: tl.constexpr,
    ROT_PREC: tl.constexpr,
    CLIP: tl.constexpr,
):
    """The encoder plane by plane, for any D with D % E == 0 and GV a multiple of DE (module doc)."""
    i = tl.program_id(0)
    h = tl.program_id(1)
    E: tl.constexpr = 8 // BITS
    DE: tl.constexpr = HEAD_DIM // E
    NG: tl.constexpr = HEAD_DIM // GV
    PPG: tl.constexpr = GV // DE  # planes per V group: 1, 2 or 4
    page = tl.load(ids_ptr + i)
    src = tl.load(src_ptr + i).to(tl.int64)  # input page read by this program
    row = page.to(tl.int64) * tl.num_programs(1) + h  # (page, head) row in the pool
    if page != skip_id:  # rows sealing into the skipped (scratch) page write nothing
        offs_t = tl.arange(0, PAGE)
        offs_c = tl.arange(0, DEP)  # channels of a plane, >= DE padding
        c_ok = offs_c < DE
        offs_d = tl.arange(0, BLOCK_D)  # channels of a head, >= HEAD_DIM padding
        d_ok = offs_d < HEAD_DIM
        k_tile = k_ptr + src * stride_kn + h * stride_kh
        v_tile = v_ptr + src * stride_vn + h * stride_vh
        if ROTATE:  # the whole head once; each plane is x @ R[:, plane]
            k_full = tl.load(
                k_tile + offs_t[:, None] * stride_kt + offs_d[None, :],
                mask=d_ok[None, :],
                other=0.0,
            ).to(tl.float32)  # [P, BD]
            v_full = tl.load(
                v_tile + offs_t[:, None] * stride_vt + offs_d[None, :],
                mask=d_ok[None, :],
                other=0.0,
            ).to(tl.float32)
        else:
            k_full = tl.zeros([PAGE, BLOCK_D], tl.float32)  # unused
            v_full = k_full

        # ---- K: per channel over the page's tokens, plane by plane.
        x = _plane(
            k_tile,
            k_full,
            rot_ptr,
            offs_t,
            stride_kt,
            offs_c,
            c_ok,
            offs_d,
            d_ok,
            0,
            DE,
            HEAD_DIM,
            ROTATE,
            ROT_PREC,
        )
        kpack, ksum = _k_plane(
            x, ks_ptr, km_ptr, row, offs_c, c_ok, 0, DE, DEP, BITS, HEAD_DIM, CLIP
        )
        for s in tl.static_range(1, E):
            x = _plane(
                k_tile,
                k_full,
                rot_ptr,
                offs_t,
                stride_kt,
                offs_c,
                c_ok,
                offs_d,
                d_ok,
                s,
                DE,
                HEAD_DIM,
                ROTATE,
                ROT_PREC,
            )
            q, qs = _k_plane(x, ks_ptr, km_ptr, row, offs_c, c_ok, s, DE, DEP, BITS, HEAD_DIM, CLIP)
            kpack += q
            ksum += qs
        tl.store(
            kc_ptr + row * (PAGE * DE) + offs_t[:, None] * DE + offs_c[None, :],
            kpack.to(tl.uint8),
            mask=c_ok[None, :],
        )
        tl.store(ksum_ptr + row * PAGE + offs_t, ksum.to(tl.float32))

        # ---- V: per token in groups of GV channels (PPG whole planes); E <= 4 planes held in registers.
        x0 = _plane(
            v_tile,
            v_full,
            rot_ptr,
            offs_t,
            stride_vt,
            offs_c,
            c_ok,
            offs_d,
            d_ok,
            0,
            DE,
            HEAD_DIM,
            ROTATE,
            ROT_PREC,
        )
        x1 = _plane(
            v_tile,
            v_full,
            rot_ptr,
            offs_t,
            stride_vt,
            offs_c,
            c_ok,
            offs_d,
            d_ok,
            1,
            DE,
            HEAD_DIM,
            ROTATE,
            ROT_PREC,
        )
        lo0, hi0 = _row_range(x0, c_ok)
        lo1, hi1 = _row_range(x1, c_ok)
        if E == 4:
            x2 = _plane(
                v_tile,
                v_full,
                rot_ptr,
                offs_t,
                stride_vt,
                offs_c,
                c_ok,
                offs_d,
                d_ok,
                2,
                DE,
                HEAD_DIM,
                ROTATE,
                ROT_PREC,
            )
            x3 = _plane(
                v_tile,
                v_full,
                rot_ptr,
                offs_t,
                stride_vt,
                offs_c,
                c_ok,
                offs_d,
                d_ok,
                3,
                DE,
                HEAD_DIM,
                ROTATE,
                ROT_PREC,
            )
            lo2, hi2 = _row_range(x2, c_ok)
            lo3, hi3 = _row_range(x3, c_ok)
            if PPG == 2:
                lo2 = tl.minimum(lo2, lo3)
                hi2 = tl.maximum(hi2, hi3)
                lo3, hi3 = lo2, hi2
            if PPG == 4:
                lo2 = tl.minimum(tl.minimum(lo0, lo1), tl.minimum(lo2, lo3))
                hi2 = tl.maximum(tl.maximum(hi0, hi1), tl.maximum(hi2, hi3))
                lo0, lo1, lo3 = lo2, lo2, lo2
                hi0, hi1, hi3 = hi2, hi2, hi2
        if PPG == 2:
            lo0 = tl.minimum(lo0, lo1)
            hi0 = tl.maximum(hi0, hi1)
            lo1, hi1 = lo0, hi0
        lo0, hi0 = _clip(lo0, hi0, CLIP)  # each plane's group range (planes of a group: equal)
        lo1, hi1 = _clip(lo1, hi1, CLIP)
        if E == 4:
            lo2, hi2 = _clip(lo2, hi2, CLIP)
            lo3, hi3 = _clip(lo3, hi3, CLIP)
        vpack = _v_plane_codes(
            x0,
            lo0,
            hi0,
            vs_ptr,
            vm_ptr,
            vsum_ptr,
            row,
            offs_t,
            offs_c,
            c_ok,
            0,
            DE,
            GV,
            NG,
            BITS,
            PAGE,
            HEAD_DIM,
        )
        vpack += _v_plane_codes(
            x1,
            lo1,
            hi1,
            vs_ptr,
            vm_ptr,
            vsum_ptr,
            row,
            offs_t,
            offs_c,
            c_ok,
            1,
            DE,
            GV,
            NG,
            BITS,
            PAGE,
            HEAD_DIM,
        )
        if E == 4:
            vpack += _v_plane_codes(
                x2,
                lo2,
                hi2,
                vs_ptr,
                vm_ptr,
                vsum_ptr,
                row,
                offs_t,
                offs_c,
                c_ok,
                2,
                DE,
                GV,
                NG,
                BITS,
                PAGE,
                HEAD_DIM,
            )
            vpack += _v_plane_codes(
                x3,
                lo3,
                hi3,
                vs_ptr,
                vm_ptr,
                vsum_ptr,
                row,
                offs_t,
                offs_c,
                c_ok,
                3,
                DE,
                GV,
                NG,
                BITS,
                PAGE,
                HEAD_DIM,
            )
        tl.store(
            vc_ptr + row * (PAGE * DE) + offs_t[:, None] * DE + offs_c[None, :],
            vpack.to(tl.uint8),
            mask=c_ok[None, :],
        )
