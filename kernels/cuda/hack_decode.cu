// Decode attention on HACK 2/4-bit pages with tensor cores (mma.sync m16n8k16), one warp per
// (sequence, KV head, page split).  Built offline for sm_90 (kernels/cuda/build.sh) and launched
// through the driver API (kernels/cuda_driver.py); the math is kernels/hack_decode_reference.py's
// "f16" mode.  Fixed geometry: head_dim 128, pages of 64 tokens, GQA group <= 8, one V group per
// plane (GV == DE, what HackCodec uses).  Writes flash-decoding partials part [B, H, 1 + S, D] and
// lse [B, H, 1 + S] (log2 domain) at split slots 1..S; slot 0 (the 16-bit tail) is another launch's.
//
// Lane = 4 * gid + tid (gid 0..7, tid 0..3).  Codes become fp16 with one lop3 each: (w & mask_s) |
// 0x6400 is 1024 + code * 2^(s b) for the bytes 0 and 2 of a word (w >> 8: bytes 1 and 3).
// q~' = q * qk_scale * sK * 2^-(s b) folds the plane's power of two; O's 2^(s b) leaves at the end.
// The 1024 offsets are removed with constant-operand MMAs on the same fp16 operands, per page (an
// fp32 accumulator never carries more than one page of them: over a long split they would bury
// the small values).  The reduction dimension's order is free, so a thread's K word supplies its
// own k rows: logical k (2 tid, 2 tid + 1) <- bytes (0, 2), (8 + 2 tid, 9 + 2 tid) <- bytes (1, 3)
// of word wi = tid * NC + c of plane s's chunk c.  PV pairs two tokens' bytes with prmt.  V min
// terms and l = sum p come from one more MMA against [mV_t,0..NG-1 ; 1].
//   v1 (hack_decode_warp): query heads on the MMA's M rows (rows 8..15 zero), tokens / channels on
//       N: QK A = q~', B = K codes; PV A = p~ (the QK C fragment), B = V codes.
//   v2 (hack_decode_warp_v2, the default as v2o3 = v2 held to 168 registers): tokens on M for QK
//       (A = K codes, B = q~', C = S^T), channels on M for PV (A = V codes^T, B = p~ from S^T by
//       movmatrix): every A register carries codes.  Its numpy mirror: tests/hack_cuda_emulator.py.
#include <stdint.h>

namespace {

constexpr int D = 128;
constexpr int P = 64;
constexpr uint32_t MAGIC = 0x64006400u;      // fp16 1024 in both halves
constexpr uint32_t NEG1024 = 0xE400E400u;    // fp16 -1024
constexpr uint32_t POS1024 = 0x64006400u;
constexpr uint32_t ONE_H = 0x3C00u;          // fp16 1.0
constexpr float GROW = 8.0f;                 // rescale only when the max grows by more (log2 units)
#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ void mma(float& c0, float& c1, uint32_t a0, uint32_t a2, uint32_t b0,
                                    uint32_t b1) {
  // rows 8..15 of A are zero, so rows 8..15 of C and D are never read: left undefined.
  asm("{ .reg .f32 z0, z1;\n"
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, z0, z1}, {%2, %3, %4, %3}, "
      "{%5, %6}, {%0, %1, %7, %7}; }\n"
      : "+f"(c0), "+f"(c1)
      : "r"(a0), "r"(0u), "r"(a2), "r"(b0), "r"(b1), "f"(0.0f));
}

// fp16 pair 1024 + code * 2^(s b) of the bytes 0 and 2 of w, one lop3: (w & mask) | 0x6400 6400.
__device__ __forceinline__ uint32_t magic(uint32_t w, uint32_t mask) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w), "r"(mask), "r"(MAGIC));
  return r;
}

__device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t r;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
  return r;
}

__device__ __forceinline__ float exp2_approx(float x) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
  return r;
}



// Full m16n8k16: A = (a0, a1, a2, a3) as PTX orders them (row gid / gid + 8, k low / high), all
// four C / D registers live.
__device__ __forceinline__ void mma4(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                     uint32_t a3, uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Transpose of an 8 x 8 fp16 tile held as one register per lane (row lane / 4, cols 2 (lane % 4) +
// 0, 1): afterwards lane holds row lane / 4 of the transpose.
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t r;
  asm("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(x));
  return r;
}

template <int N>
struct Words;  // N 32-bit words of one aligned vector load
template <>
struct Words<2> {
  uint32_t w[2];
  __device__ __forceinline__ void load(const void* p) {
    uint2 v = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = v.x;
    w[1] = v.y;
  }
};
template <>
struct Words<4> {
  uint32_t w[4];
  __device__ __forceinline__ void load(const void* p) {
    uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
};

__device__ __forceinline__ uint32_t ld_u32(const void* p) {
  return __ldg(reinterpret_cast<const unsigned int*>(p));
}

// q of one head in the pages' basis (q_row: its D floats), as fp16 pairs in this thread's channel
// order (the k rows it owns): lo = channels (0, 2), hi = (1, 3) of word tid * NC + c of plane s.
// qlo / qhi: q * qk_scale (for q . mK); qlo2 / qhi2: q * qk_scale * 2^-(s b) (for q~'). Zero when
// !ok (a padding head).
template <int BITS>
__device__ __forceinline__ void load_q_pairs(
    const float* __restrict__ q_row, bool ok, int tid, float qk_scale,
    uint32_t (&qlo)[8 / BITS][D / (8 / BITS) / 16], uint32_t (&qhi)[8 / BITS][D / (8 / BITS) / 16],
    uint32_t (&qlo2)[8 / BITS][D / (8 / BITS) / 16],
    uint32_t (&qhi2)[8 / BITS][D / (8 / BITS) / 16]) {
  constexpr int E = 8 / BITS, DE = D / E, NC = DE / 16;
#pragma unroll
  for (int s = 0; s < E; ++s) {
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (ok) v = *reinterpret_cast<const float4*>(q_row + s * DE + 4 * (tid * NC + c));
      const float f = qk_scale, f2 = qk_scale / float(1 << (s * BITS));
      qlo[s][c] = pack_f16x2(v.x * f, v.z * f);
      qhi[s][c] = pack_f16x2(v.y * f, v.w * f);
      qlo2[s][c] = pack_f16x2(v.x * f2, v.z * f2);
      qhi2[s][c] = pack_f16x2(v.y * f2, v.w * f2);
    }
  }
}

// Per-token V scales and mins (NG = E fp16 per token row, tok = pool row * P + t0) of the tokens
// t0, t0 + 1 (sv_lo: pairs per group) and t0 + 8, t0 + 9 (sv_hi), and the B operand column gid of
// the aux MMA: mV of group gid (mv_lo / mv_hi, the same token pairs), 1 for column NG, 0 past it.
template <int BITS>
__device__ __forceinline__ void load_v_token_scales(
    const uint16_t* __restrict__ vs, const uint16_t* __restrict__ vm, long long tok, int gid,
    uint32_t (&sv_lo)[8 / BITS], uint32_t (&sv_hi)[8 / BITS], uint32_t& mv_lo, uint32_t& mv_hi) {
  constexpr int NG = 8 / BITS;
  const uint32_t mv_sel = (gid & 1) ? 0x7632u : 0x5410u;
  const uint16_t* vs_t = vs + tok * NG;
  const uint16_t* vm_t = vm + tok * NG;
  if constexpr (NG == 4) {
    const int mv_word = gid >> 1;
    const uint2 a0 = __ldg(reinterpret_cast<const uint2*>(vs_t));
    const uint2 a1 = __ldg(reinterpret_cast<const uint2*>(vs_t + NG));
    const uint2 a8 = __ldg(reinterpret_cast<const uint2*>(vs_t + 8 * NG));
    const uint2 a9 = __ldg(reinterpret_cast<const uint2*>(vs_t + 9 * NG));
    sv_lo[0] = __byte_perm(a0.x, a1.x, 0x5410);
    sv_lo[1] = __byte_perm(a0.x, a1.x, 0x7632);
    sv_lo[2] = __byte_perm(a0.y, a1.y, 0x5410);
    sv_lo[3] = __byte_perm(a0.y, a1.y, 0x7632);
    sv_hi[0] = __byte_perm(a8.x, a9.x, 0x5410);
    sv_hi[1] = __byte_perm(a8.x, a9.x, 0x7632);
    sv_hi[2] = __byte_perm(a8.y, a9.y, 0x5410);
    sv_hi[3] = __byte_perm(a8.y, a9.y, 0x7632);
    const uint2 m0 = __ldg(reinterpret_cast<const uint2*>(vm_t));
    const uint2 m1 = __ldg(reinterpret_cast<const uint2*>(vm_t + NG));
    const uint2 m8 = __ldg(reinterpret_cast<const uint2*>(vm_t + 8 * NG));
    const uint2 m9 = __ldg(reinterpret_cast<const uint2*>(vm_t + 9 * NG));
    mv_lo = __byte_perm(mv_word ? m0.y : m0.x, mv_word ? m1.y : m1.x, mv_sel);
    mv_hi = __byte_perm(mv_word ? m8.y : m8.x, mv_word ? m9.y : m9.x, mv_sel);
  } else {  // NG == 2
    const uint32_t a0 = ld_u32(vs_t), a1 = ld_u32(vs_t + NG);
    const uint32_t a8 = ld_u32(vs_t + 8 * NG), a9 = ld_u32(vs_t + 9 * NG);
    sv_lo[0] = __byte_perm(a0, a1, 0x5410);
    sv_lo[1] = __byte_perm(a0, a1, 0x7632);
    sv_hi[0] = __byte_perm(a8, a9, 0x5410);
    sv_hi[1] = __byte_perm(a8, a9, 0x7632);
    const uint32_t m0 = ld_u32(vm_t), m1 = ld_u32(vm_t + NG);
    const uint32_t m8 = ld_u32(vm_t + 8 * NG), m9 = ld_u32(vm_t + 9 * NG);
    mv_lo = __byte_perm(m0, m1, mv_sel);
    mv_hi = __byte_perm(m8, m9, mv_sel);
  }
  if (gid == NG) {
    mv_lo = mv_hi = ONE_H * 0x00010001u;
  } else if (gid > NG) {
    mv_lo = mv_hi = 0u;
  }
}

template <int BITS>
__device__ __forceinline__ void hack_decode_warp(
    const float* __restrict__ q, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
    const uint16_t* __restrict__ ks, const uint16_t* __restrict__ km,
    const uint16_t* __restrict__ vs, const uint16_t* __restrict__ vm,
    const int32_t* __restrict__ page_table, const int32_t* __restrict__ n_pages,
    float* __restrict__ part, float* __restrict__ lse, float qk_scale, int n_sink, int KVH, int G,
    int S, long long qsb, long long qsh, long long ptb, int b, int kvh, int split) {
  constexpr int E = 8 / BITS;     // planes
  constexpr int DE = D / E;       // bytes per token row
  constexpr int NC = DE / 16;     // QK k-chunks per plane (= words a thread reads per row)
  constexpr int NWC = DE / 32;    // PV word columns (8 words each)
  constexpr int NG = E;           // V groups (GV == DE)
  constexpr uint32_t M1 = (1u << BITS) - 1u;
  const int lane = threadIdx.x & 31;
  const int gid = lane >> 2, tid = lane & 3;
  const int H = KVH * G;
  const bool head_ok = gid < G;
  const int head = kvh * G + gid;

  // ---- q in the pages' basis, fp16 pairs in this thread's channel order (k rows it owns).
  uint32_t qlo[E][NC], qhi[E][NC], qlo2[E][NC], qhi2[E][NC];
  load_q_pairs<BITS>(q + b * qsb + head * qsh, head_ok, tid, qk_scale, qlo, qhi, qlo2, qhi2);

  const int n_pg = n_pages[b];
  const int per = (n_pg + S - 1) / S;
  const int lo = split * per;
  const int hi = min(lo + per, n_pg);

  float m_i = NEG_INF;
  float o[NWC][4][E][2];  // O[head gid][channels of n-tile (wc, byte q, plane s), cols 2 tid, 2 tid + 1]
  float aux[2];           // cols 2 tid, 2 tid + 1 of [sum_t p mV_t,0..NG-1 ; sum_t p]
#pragma unroll
  for (int wc = 0; wc < NWC; ++wc)
#pragma unroll
    for (int bq = 0; bq < 4; ++bq)
#pragma unroll
      for (int s = 0; s < E; ++s) o[wc][bq][s][0] = o[wc][bq][s][1] = 0.f;
  aux[0] = aux[1] = 0.f;


  for (int pg = lo; pg < hi; ++pg) {
    const long long row = (long long)page_table[b * ptb + pg] * KVH + kvh;
    const uint8_t* kc_pg = kc + row * (P * DE);
    const uint8_t* vc_pg = vc + row * (P * DE);

    // ---- q~' = q * qk_scale * sK * 2^-(s b) and the page constant q . mK - 1024 sum q~'
    uint32_t qtlo[E][NC], qthi[E][NC];
    float corr0 = 0.f, corr1 = 0.f;
#pragma unroll
    for (int s = 0; s < E; ++s) {
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int ch = s * DE + 4 * (tid * NC + c);
        Words<2> sk, mk;
        sk.load(ks + row * D + ch);
        mk.load(km + row * D + ch);
        qtlo[s][c] = hmul2(qlo2[s][c], __byte_perm(sk.w[0], sk.w[1], 0x5410));
        qthi[s][c] = hmul2(qhi2[s][c], __byte_perm(sk.w[0], sk.w[1], 0x7632));
        mma(corr0, corr1, qtlo[s][c], qthi[s][c], NEG1024, NEG1024);
        mma(corr0, corr1, qlo[s][c], qhi[s][c], __byte_perm(mk.w[0], mk.w[1], 0x5410),
            __byte_perm(mk.w[0], mk.w[1], 0x7632));
      }
    }

    // ---- scores of the page's 64 tokens: 8 n-tiles, token nt * 8 + gid on B's column gid
    float sc[8][2];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      Words<NC> kw;
      kw.load(kc_pg + (nt * 8 + gid) * DE + 4 * tid * NC);
      sc[nt][0] = corr0;
      sc[nt][1] = corr1;
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const uint32_t w = kw.w[c], w8 = w >> 8;
#pragma unroll
        for (int s = 0; s < E; ++s) {
          const uint32_t mask = (M1 << (s * BITS)) * 0x00010001u;
          mma(sc[nt][0], sc[nt][1], qtlo[s][c], qthi[s][c], magic(w, mask), magic(w8, mask));
        }
      }
    }
    if (pg == 0) {  // sinks live in the 16-bit tail: mask positions < n_sink of quantized page 0
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int t = nt * 8 + 2 * tid;
        if (t < n_sink) sc[nt][0] = NEG_INF;
        if (t + 1 < n_sink) sc[nt][1] = NEG_INF;
      }
    }

    // ---- online softmax over the page (rescale only when some head's max grows by > GROW)
    float mx = NEG_INF;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(sc[nt][0], sc[nt][1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const bool grow = mx > m_i + GROW;
    if (__any_sync(0xffffffffu, grow)) {
      const float m_new = grow ? mx : m_i;
      const float alpha = exp2_approx(m_i - m_new);  // 1 where the max stays; 0 from -inf
#pragma unroll
      for (int wc = 0; wc < NWC; ++wc)
#pragma unroll
        for (int bq = 0; bq < 4; ++bq)
#pragma unroll
          for (int s = 0; s < E; ++s) {
            o[wc][bq][s][0] *= alpha;
            o[wc][bq][s][1] *= alpha;
          }
      aux[0] *= alpha;
      aux[1] *= alpha;
      m_i = m_new;
    }
    const float m_use = (m_i == NEG_INF) ? 0.f : m_i;
    uint32_t pp[8];  // p of n-tile nt, tokens (2 tid, 2 tid + 1), fp16 pair
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
      pp[nt] = pack_f16x2(exp2_approx(sc[nt][0] - m_use), exp2_approx(sc[nt][1] - m_use));

    // ---- PV over 4 chunks of 16 tokens: A = p~ (n-tiles 2 kk, 2 kk + 1), B = V codes; the
    // page's 1024 offsets (1024 sum_t p~_s) leave O when the page ends
    float off[E][2];
#pragma unroll
    for (int s = 0; s < E; ++s) off[s][0] = off[s][1] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      const int t0 = kk * 16 + 2 * tid;  // tokens t0, t0 + 1 (A cols 2 tid..), t0 + 8, t0 + 9
      const uint32_t pa = pp[2 * kk], pb = pp[2 * kk + 1];
      // per-token V scale / min rows (NG fp16 each), paired across two tokens per group
      uint32_t sv_lo[E], sv_hi[E], mv_lo, mv_hi;
      load_v_token_scales<BITS>(vs, vm, row * P + t0, gid, sv_lo, sv_hi, mv_lo, mv_hi);
      mma(aux[0], aux[1], pa, pb, mv_lo, mv_hi);
      uint32_t pt_a[E], pt_b[E];
#pragma unroll
      for (int s = 0; s < E; ++s) {
        pt_a[s] = hmul2(pa, sv_lo[s]);
        pt_b[s] = hmul2(pb, sv_hi[s]);
        mma(off[s][0], off[s][1], pt_a[s], pt_b[s], POS1024, POS1024);
      }
#pragma unroll
      for (int wc = 0; wc < NWC; ++wc) {
        const uint8_t* vrow = vc_pg + 4 * (wc * 8 + gid);
        const uint32_t w0 = ld_u32(vrow + (t0)*DE), w1 = ld_u32(vrow + (t0 + 1) * DE);
        const uint32_t w8 = ld_u32(vrow + (t0 + 8) * DE), w9 = ld_u32(vrow + (t0 + 9) * DE);
        const uint32_t a01 = __byte_perm(w0, w1, 0x5410), b01 = __byte_perm(w0, w1, 0x7632);
        const uint32_t a89 = __byte_perm(w8, w9, 0x5410), b89 = __byte_perm(w8, w9, 0x7632);
        const uint32_t src_lo[4] = {a01, a01 >> 8, b01, b01 >> 8};
        const uint32_t src_hi[4] = {a89, a89 >> 8, b89, b89 >> 8};
#pragma unroll
        for (int bq = 0; bq < 4; ++bq)
#pragma unroll
          for (int s = 0; s < E; ++s) {
            const uint32_t mask = (M1 << (s * BITS)) * 0x00010001u;
            mma(o[wc][bq][s][0], o[wc][bq][s][1], pt_a[s], pt_b[s], magic(src_lo[bq], mask),
                magic(src_hi[bq], mask));
          }
      }
    }
#pragma unroll
    for (int wc = 0; wc < NWC; ++wc)
#pragma unroll
      for (int bq = 0; bq < 4; ++bq)
#pragma unroll
        for (int s = 0; s < E; ++s) {
          o[wc][bq][s][0] -= off[s][0];
          o[wc][bq][s][1] -= off[s][1];
        }
  }

  // ---- finish: l and the min terms from aux (cols of the quad), normalise, store
  const int quad = lane & ~3;
  const float l = __shfl_sync(0xffffffffu, (NG & 1) ? aux[1] : aux[0], quad | (NG >> 1));
  const bool nonempty = l > 0.f;
  const float inv = nonempty ? 1.f / l : 0.f;
  const long long prow = ((long long)b * H + head) * (S + 1) + 1 + split;
#pragma unroll
  for (int s = 0; s < E; ++s) {
    const float mvs = __shfl_sync(0xffffffffu, (s & 1) ? aux[1] : aux[0], quad | (s >> 1));
    const float down = 1.f / float(1 << (s * BITS));
#pragma unroll
    for (int wc = 0; wc < NWC; ++wc) {
      float r[8];
#pragma unroll
      for (int bq = 0; bq < 4; ++bq) {
        r[bq] = (o[wc][bq][s][0] * down + mvs) * inv;
        r[4 + bq] = (o[wc][bq][s][1] * down + mvs) * inv;
      }
      if (head_ok) {
        float* dst = part + prow * D + s * DE + 32 * wc + 8 * tid;
        *reinterpret_cast<float4*>(dst) = make_float4(r[0], r[1], r[2], r[3]);
        *reinterpret_cast<float4*>(dst + 4) = make_float4(r[4], r[5], r[6], r[7]);
      }
    }
  }
  if (head_ok && tid == 0) lse[prow] = nonempty ? m_i + __log2f(l) : NEG_INF;
}


// v2: tokens on M for QK (A = codes, B = q~', C = S^T [tokens, heads]), channels on M for PV
// (A = V codes^T, B = p~ [tokens, heads] from S^T by movmatrix), so every A register carries codes
// and no MMA row is padding; heads sit on N (8 columns, the group's G used).
template <int BITS>
__device__ __forceinline__ void hack_decode_warp_v2(
    const float* __restrict__ q, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
    const uint16_t* __restrict__ ks, const uint16_t* __restrict__ km,
    const uint16_t* __restrict__ vs, const uint16_t* __restrict__ vm,
    const int32_t* __restrict__ page_table, const int32_t* __restrict__ n_pages,
    float* __restrict__ part, float* __restrict__ lse, float qk_scale, int n_sink, int KVH, int G,
    int S, long long qsb, long long qsh, long long ptb, int b, int kvh, int split) {
  constexpr int E = 8 / BITS;
  constexpr int DE = D / E;
  constexpr int NC = DE / 16;
  constexpr int NWC = DE / 32;
  constexpr int NG = E;
  constexpr uint32_t M1 = (1u << BITS) - 1u;
  const int lane = threadIdx.x & 31;
  const int gid = lane >> 2, tid = lane & 3;
  const int H = KVH * G;
  const int head_b = kvh * G + gid;  // B column gid of q~' = head gid of the group

  uint32_t qlo[E][NC], qhi[E][NC], qlo2[E][NC], qhi2[E][NC];
  load_q_pairs<BITS>(q + b * qsb + head_b * qsh, gid < G, tid, qk_scale, qlo, qhi, qlo2, qhi2);

  const int n_pg = n_pages[b];
  const int per = (n_pg + S - 1) / S;
  const int lo = split * per;
  const int hi = min(lo + per, n_pg);

  float m_i[2] = {NEG_INF, NEG_INF};  // heads 2 tid, 2 tid + 1
  float o[NWC][2][E][4];  // O^T [channel rows gid / gid + 8 of m-tile (wc, half, s)] x heads 2 tid..
  float aux[4];           // [sum_t p mV_t,gid ; l] rows gid (gid + 8 unused) x heads 2 tid..
#pragma unroll
  for (int wc = 0; wc < NWC; ++wc)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int s = 0; s < E; ++s)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[wc][hf][s][i] = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) aux[i] = 0.f;


  for (int pg = lo; pg < hi; ++pg) {
    const long long row = (long long)page_table[b * ptb + pg] * KVH + kvh;
    const uint8_t* kc_pg = kc + row * (P * DE);
    const uint8_t* vc_pg = vc + row * (P * DE);

    // q~' (B of QK) and the page constant per head: corr = q . mK - 1024 sum q~'
    uint32_t qtlo[E][NC], qthi[E][NC];
    float corr[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int s = 0; s < E; ++s) {
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const int ch = s * DE + 4 * (tid * NC + c);
        Words<2> sk, mk;
        sk.load(ks + row * D + ch);
        mk.load(km + row * D + ch);
        qtlo[s][c] = hmul2(qlo2[s][c], __byte_perm(sk.w[0], sk.w[1], 0x5410));
        qthi[s][c] = hmul2(qhi2[s][c], __byte_perm(sk.w[0], sk.w[1], 0x7632));
        mma4(corr, NEG1024, NEG1024, NEG1024, NEG1024, qtlo[s][c], qthi[s][c]);
        const uint32_t ml = __byte_perm(mk.w[0], mk.w[1], 0x5410);
        const uint32_t mh = __byte_perm(mk.w[0], mk.w[1], 0x7632);
        mma4(corr, ml, ml, mh, mh, qlo[s][c], qhi[s][c]);
      }
    }

    // S^T of the page: 4 m-tiles of 16 tokens (rows gid, gid + 8), heads 2 tid, 2 tid + 1
    float sc[4][4];
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      Words<NC> ka, kb;
      ka.load(kc_pg + (mt * 16 + gid) * DE + 4 * tid * NC);
      kb.load(kc_pg + (mt * 16 + gid + 8) * DE + 4 * tid * NC);
#pragma unroll
      for (int i = 0; i < 4; ++i) sc[mt][i] = corr[i];
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        const uint32_t wa = ka.w[c], wa8 = wa >> 8, wb = kb.w[c], wb8 = wb >> 8;
#pragma unroll
        for (int s = 0; s < E; ++s) {
          const uint32_t mask = (M1 << (s * BITS)) * 0x00010001u;
          mma4(sc[mt], magic(wa, mask), magic(wb, mask), magic(wa8, mask), magic(wb8, mask),
               qtlo[s][c], qthi[s][c]);
        }
      }
    }
    if (pg == 0) {
#pragma unroll
      for (int mt = 0; mt < 4; ++mt) {
        if (mt * 16 + gid < n_sink) sc[mt][0] = sc[mt][1] = NEG_INF;
        if (mt * 16 + gid + 8 < n_sink) sc[mt][2] = sc[mt][3] = NEG_INF;
      }
    }

    // online softmax per head (2 per thread), reduced over the token rows (lanes of one tid)
    float mx[2] = {NEG_INF, NEG_INF};
#pragma unroll
    for (int mt = 0; mt < 4; ++mt) {
      mx[0] = fmaxf(mx[0], fmaxf(sc[mt][0], sc[mt][2]));
      mx[1] = fmaxf(mx[1], fmaxf(sc[mt][1], sc[mt][3]));
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 4));
      mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 8));
      mx[j] = fmaxf(mx[j], __shfl_xor_sync(0xffffffffu, mx[j], 16));
    }
    const bool grow0 = mx[0] > m_i[0] + GROW, grow1 = mx[1] > m_i[1] + GROW;
    if (__any_sync(0xffffffffu, grow0 || grow1)) {
      const float n0 = grow0 ? mx[0] : m_i[0], n1 = grow1 ? mx[1] : m_i[1];
      const float a0 = exp2_approx(m_i[0] - n0), a1 = exp2_approx(m_i[1] - n1);
#pragma unroll
      for (int wc = 0; wc < NWC; ++wc)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
          for (int s = 0; s < E; ++s) {
            o[wc][hf][s][0] *= a0;
            o[wc][hf][s][1] *= a1;
            o[wc][hf][s][2] *= a0;
            o[wc][hf][s][3] *= a1;
          }
      aux[0] *= a0;
      aux[1] *= a1;
      aux[2] *= a0;
      aux[3] *= a1;
      m_i[0] = n0;
      m_i[1] = n1;
    }
    const float mu0 = (m_i[0] == NEG_INF) ? 0.f : m_i[0];
    const float mu1 = (m_i[1] == NEG_INF) ? 0.f : m_i[1];

    // 1024 sum_t p~_s of this page per head (all rows equal), taken out of O when the page ends:
    // O then never carries more than one page's offsets, whose cancellation stays exact enough.
    float off[E][4];
#pragma unroll
    for (int s = 0; s < E; ++s)
#pragma unroll
      for (int i = 0; i < 4; ++i) off[s][i] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {  // PV chunk kk = m-tile kk's 16 tokens
      // p [tokens, heads] -> B fragments: (tokens 2 tid, 2 tid + 1; head gid), same for + 8
      const uint32_t pa = transpose8x8(pack_f16x2(exp2_approx(sc[kk][0] - mu0),
                                                  exp2_approx(sc[kk][1] - mu1)));
      const uint32_t pb = transpose8x8(pack_f16x2(exp2_approx(sc[kk][2] - mu0),
                                                  exp2_approx(sc[kk][3] - mu1)));
      const int t0 = kk * 16 + 2 * tid;
      uint32_t sv_lo[E], sv_hi[E], mv_lo, mv_hi;
      load_v_token_scales<BITS>(vs, vm, row * P + t0, gid, sv_lo, sv_hi, mv_lo, mv_hi);
      mma4(aux, mv_lo, 0u, mv_hi, 0u, pa, pb);
      uint32_t pt_a[E], pt_b[E];
#pragma unroll
      for (int s = 0; s < E; ++s) {
        pt_a[s] = hmul2(pa, sv_lo[s]);
        pt_b[s] = hmul2(pb, sv_hi[s]);
        mma4(off[s], POS1024, POS1024, POS1024, POS1024, pt_a[s], pt_b[s]);
      }
#pragma unroll
      for (int wc = 0; wc < NWC; ++wc) {
        const uint8_t* vrow = vc_pg + 4 * (wc * 8 + gid);
        const uint32_t w0 = ld_u32(vrow + t0 * DE), w1 = ld_u32(vrow + (t0 + 1) * DE);
        const uint32_t w8 = ld_u32(vrow + (t0 + 8) * DE), w9 = ld_u32(vrow + (t0 + 9) * DE);
        const uint32_t a01 = __byte_perm(w0, w1, 0x5410), b01 = __byte_perm(w0, w1, 0x7632);
        const uint32_t a89 = __byte_perm(w8, w9, 0x5410), b89 = __byte_perm(w8, w9, 0x7632);
        // half 0: rows gid / gid + 8 = bytes 0 / 1 of word wc * 8 + gid; half 1: bytes 2 / 3
        const uint32_t r_lo[2] = {a01, b01}, r_hi[2] = {a89, b89};
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const uint32_t x = r_lo[hf], x8 = x >> 8, y = r_hi[hf], y8 = y >> 8;
#pragma unroll
          for (int s = 0; s < E; ++s) {
            const uint32_t mask = (M1 << (s * BITS)) * 0x00010001u;
            mma4(o[wc][hf][s], magic(x, mask), magic(x8, mask), magic(y, mask), magic(y8, mask),
                 pt_a[s], pt_b[s]);
          }
        }
      }
    }
#pragma unroll
    for (int wc = 0; wc < NWC; ++wc)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int s = 0; s < E; ++s)
#pragma unroll
          for (int i = 0; i < 4; ++i) o[wc][hf][s][i] -= off[s][i];
  }

  // finish: l (aux row NG) and mV terms (aux row s) from the lanes of this tid, per head
  const float l0 = __shfl_sync(0xffffffffu, aux[0], NG * 4 + tid);
  const float l1 = __shfl_sync(0xffffffffu, aux[1], NG * 4 + tid);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int h0 = 2 * tid;  // heads h0, h0 + 1 of the group
  const long long prow0 = ((long long)b * H + kvh * G + h0) * (S + 1) + 1 + split;
  const long long prow1 = prow0 + (S + 1);
#pragma unroll
  for (int s = 0; s < E; ++s) {
    const float mv0 = __shfl_sync(0xffffffffu, aux[0], s * 4 + tid);
    const float mv1 = __shfl_sync(0xffffffffu, aux[1], s * 4 + tid);
    const float down = 1.f / float(1 << (s * BITS));
#pragma unroll
    for (int wc = 0; wc < NWC; ++wc) {
      // channels s * DE + 4 (wc * 8 + gid) + (0, 1, 2, 3) = (half 0 rows gid, gid + 8, half 1 ...)
      const float4 r0 = make_float4((o[wc][0][s][0] * down + mv0) * inv0,
                                    (o[wc][0][s][2] * down + mv0) * inv0,
                                    (o[wc][1][s][0] * down + mv0) * inv0,
                                    (o[wc][1][s][2] * down + mv0) * inv0);
      const float4 r1 = make_float4((o[wc][0][s][1] * down + mv1) * inv1,
                                    (o[wc][0][s][3] * down + mv1) * inv1,
                                    (o[wc][1][s][1] * down + mv1) * inv1,
                                    (o[wc][1][s][3] * down + mv1) * inv1);
      const int ch = s * DE + 4 * (wc * 8 + gid);
      if (h0 < G) *reinterpret_cast<float4*>(part + prow0 * D + ch) = r0;
      if (h0 + 1 < G) *reinterpret_cast<float4*>(part + prow1 * D + ch) = r1;
    }
  }
  if (gid == 0) {
    if (h0 < G) lse[prow0] = l0 > 0.f ? m_i[0] + __log2f(l0) : NEG_INF;
    if (h0 + 1 < G) lse[prow1] = l1 > 0.f ? m_i[1] + __log2f(l1) : NEG_INF;
  }
}

template <int BITS, int VARIANT>
__device__ __forceinline__ void hack_decode_entry(
    const float* q, const uint8_t* kc, const uint8_t* vc, const uint16_t* ks, const uint16_t* km,
    const uint16_t* vs, const uint16_t* vm, const int32_t* page_table, const int32_t* n_pages,
    float* part, float* lse, float qk_scale, int n_sink, int B, int KVH, int G, int S,
    long long qsb, long long qsh, long long ptb) {
  const int item = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (item >= B * KVH * S) return;  // whole warps only: every lane of a warp agrees
  const int split = item % S;
  const int kvh = (item / S) % KVH;
  const int b = item / (S * KVH);
  if constexpr (VARIANT == 1)
    hack_decode_warp<BITS>(q, kc, vc, ks, km, vs, vm, page_table, n_pages, part, lse, qk_scale,
                           n_sink, KVH, G, S, qsb, qsh, ptb, b, kvh, split);
  else
    hack_decode_warp_v2<BITS>(q, kc, vc, ks, km, vs, vm, page_table, n_pages, part, lse, qk_scale,
                              n_sink, KVH, G, S, qsb, qsh, ptb, b, kvh, split);
}

}  // namespace

#define HACK_DECODE_ENTRY(NAME, BITS, VARIANT, MIN_BLOCKS)                                                          \
  extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS) NAME(                                      \
      const float* q, const uint8_t* kc, const uint8_t* vc, const uint16_t* ks,                \
      const uint16_t* km, const uint16_t* vs, const uint16_t* vm, const int32_t* page_table,   \
      const int32_t* n_pages, float* part, float* lse, float qk_scale, int n_sink, int B,      \
      int KVH, int G, int S, long long qsb, long long qsh, long long ptb) {                    \
    hack_decode_entry<BITS, VARIANT>(q, kc, vc, ks, km, vs, vm, page_table, n_pages, part, lse,         \
                            qk_scale, n_sink, B, KVH, G, S, qsb, qsh, ptb);                    \
  }

// v1 (heads on M), v2 (tokens / channels on M) at 2 resident blocks of 4 warps per SM, v2 at 3
HACK_DECODE_ENTRY(hack_decode_v1_b2, 2, 1, 1)
HACK_DECODE_ENTRY(hack_decode_v1_b4, 4, 1, 1)
HACK_DECODE_ENTRY(hack_decode_v2_b2, 2, 2, 1)
HACK_DECODE_ENTRY(hack_decode_v2_b4, 4, 2, 1)
HACK_DECODE_ENTRY(hack_decode_v2o3_b2, 2, 2, 3)
HACK_DECODE_ENTRY(hack_decode_v2o3_b4, 4, 2, 3)
