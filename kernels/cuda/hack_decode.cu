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
// Tokens sit on the MMA's M rows for QK (A = K codes, B = q~', C = S^T), channels for PV (A = V
// codes^T, B = p~ from S^T by movmatrix): every A register carries codes (its numpy mirror:
// tests/hack_cuda_emulator.py).  How a page reaches the registers is the variant (entries at the
// end): straight from global memory (v2, v2o3), with an L2 prefetch of a page ahead (v2p1, v2p2),
// or through a per-warp ring of shared-memory stages that cp.async fills pages ahead (v2s2, v2s3).
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

// Ask L2 for [p, p + bytes) without waiting (sm_90 bulk prefetch; no registers, no smem). The
// range is widened to 16-byte bounds, which the instruction requires.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  const unsigned long long a = reinterpret_cast<unsigned long long>(p);
  const unsigned long long lo = a & ~15ull, hi = (a + bytes + 15ull) & ~15ull;
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(lo), "r"(uint32_t(hi - lo))
               : "memory");
}

// Everything a warp reads of one pool row (one page of one KV head) is six contiguous ranges:
// K codes, V codes, K scales, K mins, V scales, V mins; lane i < 6 asks L2 for range i.  Selects,
// not branches, and nothing kept across pages (a per-lane base pointer held in the loop spilled).
template <int BITS>
__device__ __forceinline__ void prefetch_page(const uint8_t* kc, const uint8_t* vc,
                                              const uint16_t* ks, const uint16_t* km,
                                              const uint16_t* vs, const uint16_t* vm,
                                              long long row, int lane) {
  constexpr int E = 8 / BITS, DE = D / E, NG = E;
  constexpr uint32_t CODES = P * DE, SCALES = D * 2, TOKENS = P * NG * 2;
  const void* base = lane == 0   ? (const void*)kc
                     : lane == 1 ? (const void*)vc
                     : lane == 2 ? (const void*)ks
                     : lane == 3 ? (const void*)km
                     : lane == 4 ? (const void*)vs
                                 : (const void*)vm;
  const uint32_t bytes = lane < 2 ? CODES : lane < 4 ? SCALES : TOKENS;
  if (lane < 6) prefetch_l2(static_cast<const char*>(base) + row * bytes, bytes);
}

// Where a page trip's loads go: global memory by the read-only path, or the warp's shared-memory
// stage (plain loads of a pointer into the dynamic shared array compile to LDS).
struct Gmem {
  static constexpr bool kSwizzleV = false;
  template <class T>
  static __device__ __forceinline__ T ld(const char* p) {
    return __ldg(reinterpret_cast<const T*>(p));
  }
};
struct Smem {
  static constexpr bool kSwizzleV = true;  // V codes sit swizzled in a stage (v_swizzle)
  template <class T>
  static __device__ __forceinline__ T ld(const char* p) {
    return *reinterpret_cast<const T*>(p);
  }
};

// A V-code byte offset within a page -> its place in a shared-memory stage: 16-byte chunk bits 5..6
// XOR offset bits 7..8, so the four token rows (2 tid + const) a PV load instruction reads fall
// into distinct banks (linear: 2-way conflicts at 2 bits, 4-way at 4 bits).  A permutation within
// each 512-byte block, on whole 16-byte chunks (what one cp.async moves).
__device__ __forceinline__ uint32_t v_swizzle(uint32_t off) { return off ^ ((off >> 2) & 0x60u); }

// One page of one KV head: K codes [P][DE] and V codes [P][DE] bytes, K scales and mins [D] fp16,
// V scales and mins [P][NG] fp16.  In the pool these are six tensors' rows; in a shared-memory
// stage one record of PageBytes<BITS>::STAGE bytes in that order.
template <int BITS>
struct PageBytes {
  static constexpr int E = 8 / BITS, DE = D / E, NG = E;
  static constexpr uint32_t CODES = P * DE, SCALES = D * 2, TOKENS = P * NG * 2;
  static constexpr uint32_t V = CODES, KS = 2 * CODES, KM = KS + SCALES, VS = KM + SCALES,
                            VM = VS + TOKENS, STAGE = VM + TOKENS;
};

// Page `row` of the pool's six tensors, each address computed where it is used (the tensors'
// bases are kernel parameters: only row stays live across a trip), read by the read-only path.
template <int BITS>
struct PoolPage {
  using PB = PageBytes<BITS>;
  using Mem = Gmem;
  const uint8_t *kc, *vc;
  const uint16_t *ks, *km, *vs, *vm;
  long long row;
  __device__ __forceinline__ const char* k() const {
    return reinterpret_cast<const char*>(kc) + row * PB::CODES;
  }
  __device__ __forceinline__ const char* v() const {
    return reinterpret_cast<const char*>(vc) + row * PB::CODES;
  }
  __device__ __forceinline__ const char* k_scale(int ch = 0) const {  // from channel ch
    return reinterpret_cast<const char*>(ks + row * D + ch);
  }
  __device__ __forceinline__ const char* k_min(int ch = 0) const {
    return reinterpret_cast<const char*>(km + row * D + ch);
  }
  __device__ __forceinline__ const char* v_scale(int t = 0) const {  // from token t
    return reinterpret_cast<const char*>(vs + (row * P + t) * PB::NG);
  }
  __device__ __forceinline__ const char* v_min(int t = 0) const {
    return reinterpret_cast<const char*>(vm + (row * P + t) * PB::NG);
  }
};

// The same page as one record in a shared-memory stage (V codes swizzled).
template <int BITS>
struct StagePage {
  using PB = PageBytes<BITS>;
  using Mem = Smem;
  const char* stage;
  __device__ __forceinline__ const char* k() const { return stage; }
  __device__ __forceinline__ const char* v() const { return stage + PB::V; }
  __device__ __forceinline__ const char* k_scale(int ch = 0) const {
    return stage + PB::KS + 2 * ch;
  }
  __device__ __forceinline__ const char* k_min(int ch = 0) const { return stage + PB::KM + 2 * ch; }
  __device__ __forceinline__ const char* v_scale(int t = 0) const {
    return stage + PB::VS + t * PB::NG * 2;
  }
  __device__ __forceinline__ const char* v_min(int t = 0) const {
    return stage + PB::VM + t * PB::NG * 2;
  }
};

// Start copying one pool page into a stage: 16-byte cp.async chunks, chunk lane + 32 j from lane
// (the record's regions are 16-byte multiples; V chunks land swizzled).  Commit is the caller's.
template <int BITS>
__device__ __forceinline__ void copy_page_async(const PoolPage<BITS>& src, char* stage, int lane) {
  using PB = PageBytes<BITS>;
  static_assert(PB::STAGE % 512 == 0, "a stage is whole 32-lane rounds of 16-byte chunks");
  const uint32_t base = static_cast<uint32_t>(__cvta_generic_to_shared(stage));
#pragma unroll
  for (uint32_t j = 0; j < PB::STAGE / 512; ++j) {
    const uint32_t off = 16 * lane + 512 * j;
    const char* g;
    uint32_t dst = off;
    if (off < PB::V) {
      g = src.k() + off;
    } else if (off < PB::KS) {
      g = src.v() + (off - PB::V);
      dst = PB::V + v_swizzle(off - PB::V);
    } else if (off < PB::KM) {
      g = src.k_scale() + (off - PB::KS);
    } else if (off < PB::VS) {
      g = src.k_min() + (off - PB::KM);
    } else if (off < PB::VM) {
      g = src.v_scale() + (off - PB::VS);
    } else {
      g = src.v_min() + (off - PB::VM);
    }
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(base + dst), "l"(g)
                 : "memory");
  }
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;" ::: "memory");
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
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

// Per-token V scales and mins (NG = E fp16 per token row; vs_t / vm_t point at token t0's) of the
// tokens t0, t0 + 1 (sv_lo: pairs per group) and t0 + 8, t0 + 9 (sv_hi), and the B operand column
// gid of the aux MMA: mV of group gid (mv_lo / mv_hi, the same token pairs), 1 for column NG, 0
// past it.
template <int BITS, class Mem>
__device__ __forceinline__ void load_v_token_scales(const char* vs_t, const char* vm_t, int gid,
                                                    uint32_t (&sv_lo)[8 / BITS],
                                                    uint32_t (&sv_hi)[8 / BITS], uint32_t& mv_lo,
                                                    uint32_t& mv_hi) {
  constexpr int NG = 8 / BITS;
  constexpr int ROW = NG * 2;  // bytes per token
  const uint32_t mv_sel = (gid & 1) ? 0x7632u : 0x5410u;
  if constexpr (NG == 4) {
    const int mv_word = gid >> 1;
    const uint2 a0 = Mem::template ld<uint2>(vs_t);
    const uint2 a1 = Mem::template ld<uint2>(vs_t + ROW);
    const uint2 a8 = Mem::template ld<uint2>(vs_t + 8 * ROW);
    const uint2 a9 = Mem::template ld<uint2>(vs_t + 9 * ROW);
    sv_lo[0] = __byte_perm(a0.x, a1.x, 0x5410);
    sv_lo[1] = __byte_perm(a0.x, a1.x, 0x7632);
    sv_lo[2] = __byte_perm(a0.y, a1.y, 0x5410);
    sv_lo[3] = __byte_perm(a0.y, a1.y, 0x7632);
    sv_hi[0] = __byte_perm(a8.x, a9.x, 0x5410);
    sv_hi[1] = __byte_perm(a8.x, a9.x, 0x7632);
    sv_hi[2] = __byte_perm(a8.y, a9.y, 0x5410);
    sv_hi[3] = __byte_perm(a8.y, a9.y, 0x7632);
    const uint2 m0 = Mem::template ld<uint2>(vm_t);
    const uint2 m1 = Mem::template ld<uint2>(vm_t + ROW);
    const uint2 m8 = Mem::template ld<uint2>(vm_t + 8 * ROW);
    const uint2 m9 = Mem::template ld<uint2>(vm_t + 9 * ROW);
    mv_lo = __byte_perm(mv_word ? m0.y : m0.x, mv_word ? m1.y : m1.x, mv_sel);
    mv_hi = __byte_perm(mv_word ? m8.y : m8.x, mv_word ? m9.y : m9.x, mv_sel);
  } else {  // NG == 2
    const uint32_t a0 = Mem::template ld<unsigned>(vs_t);
    const uint32_t a1 = Mem::template ld<unsigned>(vs_t + ROW);
    const uint32_t a8 = Mem::template ld<unsigned>(vs_t + 8 * ROW);
    const uint32_t a9 = Mem::template ld<unsigned>(vs_t + 9 * ROW);
    sv_lo[0] = __byte_perm(a0, a1, 0x5410);
    sv_lo[1] = __byte_perm(a0, a1, 0x7632);
    sv_hi[0] = __byte_perm(a8, a9, 0x5410);
    sv_hi[1] = __byte_perm(a8, a9, 0x7632);
    const uint32_t m0 = Mem::template ld<unsigned>(vm_t);
    const uint32_t m1 = Mem::template ld<unsigned>(vm_t + ROW);
    const uint32_t m8 = Mem::template ld<unsigned>(vm_t + 8 * ROW);
    const uint32_t m9 = Mem::template ld<unsigned>(vm_t + 9 * ROW);
    mv_lo = __byte_perm(m0, m1, mv_sel);
    mv_hi = __byte_perm(m8, m9, mv_sel);
  }
  if (gid == NG) {
    mv_lo = mv_hi = ONE_H * 0x00010001u;
  } else if (gid > NG) {
    mv_lo = mv_hi = 0u;
  }
}

template <int N, class Mem>
__device__ __forceinline__ void load_words(const char* p, uint32_t (&w)[N]) {
  static_assert(N == 2 || N == 4, "8- or 16-byte vector loads");
  if constexpr (N == 2) {
    const uint2 v = Mem::template ld<uint2>(p);
    w[0] = v.x;
    w[1] = v.y;
  } else {
    const uint4 v = Mem::template ld<uint4>(p);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
}

// V code bytes [row_off + col, + 4) of a page, vrow = its V codes + col: global pages read there;
// a stage's V codes sit swizzled (v_swizzle), so the whole offset moves.
template <class Page>
__device__ __forceinline__ uint32_t v_word(const char* vrow, uint32_t row_off, uint32_t col) {
  using Mem = typename Page::Mem;
  if constexpr (Mem::kSwizzleV)
    return Mem::template ld<unsigned>(vrow - col + v_swizzle(row_off + col));
  else
    return Mem::template ld<unsigned>(vrow + row_off);
}

// One page trip of a warp: S^T = codes . q~' on the MMA, the online softmax update over the page's
// 64 tokens, then O^T += V codes^T . p~ and the per-page offset removal.
template <int BITS, class Page>
__device__ __forceinline__ void attend_page(
    const Page& pv, bool first_page, int n_sink, int gid, int tid,
    const uint32_t (&qlo)[8 / BITS][D / (8 / BITS) / 16],
    const uint32_t (&qhi)[8 / BITS][D / (8 / BITS) / 16],
    const uint32_t (&qlo2)[8 / BITS][D / (8 / BITS) / 16],
    const uint32_t (&qhi2)[8 / BITS][D / (8 / BITS) / 16], float (&m_i)[2],
    float (&o)[D / (8 / BITS) / 32][2][8 / BITS][4], float (&aux)[4]) {
  constexpr int E = 8 / BITS;
  constexpr int DE = D / E;
  constexpr int NC = DE / 16;
  constexpr int NWC = DE / 32;
  constexpr uint32_t M1 = (1u << BITS) - 1u;
  using Mem = typename Page::Mem;

  // q~' (B of QK) and the page constant per head: corr = q . mK - 1024 sum q~'
  uint32_t qtlo[E][NC], qthi[E][NC];
  float corr[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int s = 0; s < E; ++s) {
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const int ch = s * DE + 4 * (tid * NC + c);
      const uint2 sk = Mem::template ld<uint2>(pv.k_scale(ch));
      const uint2 mk = Mem::template ld<uint2>(pv.k_min(ch));
      qtlo[s][c] = hmul2(qlo2[s][c], __byte_perm(sk.x, sk.y, 0x5410));
      qthi[s][c] = hmul2(qhi2[s][c], __byte_perm(sk.x, sk.y, 0x7632));
      mma4(corr, NEG1024, NEG1024, NEG1024, NEG1024, qtlo[s][c], qthi[s][c]);
      const uint32_t ml = __byte_perm(mk.x, mk.y, 0x5410);
      const uint32_t mh = __byte_perm(mk.x, mk.y, 0x7632);
      mma4(corr, ml, ml, mh, mh, qlo[s][c], qhi[s][c]);
    }
  }

  // S^T of the page: 4 m-tiles of 16 tokens (rows gid, gid + 8), heads 2 tid, 2 tid + 1
  float sc[4][4];
#pragma unroll
  for (int mt = 0; mt < 4; ++mt) {
    uint32_t ka[NC], kb[NC];
    load_words<NC, Mem>(pv.k() + (mt * 16 + gid) * DE + 4 * tid * NC, ka);
    load_words<NC, Mem>(pv.k() + (mt * 16 + gid + 8) * DE + 4 * tid * NC, kb);
#pragma unroll
    for (int i = 0; i < 4; ++i) sc[mt][i] = corr[i];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      const uint32_t wa = ka[c], wa8 = wa >> 8, wb = kb[c], wb8 = wb >> 8;
#pragma unroll
      for (int s = 0; s < E; ++s) {
        const uint32_t mask = (M1 << (s * BITS)) * 0x00010001u;
        mma4(sc[mt], magic(wa, mask), magic(wb, mask), magic(wa8, mask), magic(wb8, mask),
             qtlo[s][c], qthi[s][c]);
      }
    }
  }
  if (first_page) {
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
  float off[E][4] = {};
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {  // PV chunk kk = m-tile kk's 16 tokens
    // p [tokens, heads] -> B fragments: (tokens 2 tid, 2 tid + 1; head gid), same for + 8
    const uint32_t pa = transpose8x8(pack_f16x2(exp2_approx(sc[kk][0] - mu0),
                                                exp2_approx(sc[kk][1] - mu1)));
    const uint32_t pb = transpose8x8(pack_f16x2(exp2_approx(sc[kk][2] - mu0),
                                                exp2_approx(sc[kk][3] - mu1)));
    const int t0 = kk * 16 + 2 * tid;
    uint32_t sv_lo[E], sv_hi[E], mv_lo, mv_hi;
    load_v_token_scales<BITS, Mem>(pv.v_scale(t0), pv.v_min(t0), gid, sv_lo, sv_hi, mv_lo, mv_hi);
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
      // V code word wc * 8 + gid of the tokens t0, t0 + 1, t0 + 8, t0 + 9
      const char* vrow = pv.v() + 4 * (wc * 8 + gid);
      const uint32_t w0 = v_word<Page>(vrow, t0 * DE, 4 * (wc * 8 + gid));
      const uint32_t w1 = v_word<Page>(vrow, (t0 + 1) * DE, 4 * (wc * 8 + gid));
      const uint32_t w8 = v_word<Page>(vrow, (t0 + 8) * DE, 4 * (wc * 8 + gid));
      const uint32_t w9 = v_word<Page>(vrow, (t0 + 9) * DE, 4 * (wc * 8 + gid));
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

// A warp's split: heads sit on the MMA's N (8 columns, the group's G used).  AHEAD > 0 (global
// loads): each trip first asks L2 for the page AHEAD trips on.  STAGES > 0: pages come through
// STAGES shared-memory stages of this warp (warp_smem), STAGES - 1 pages copied ahead by cp.async.
template <int BITS, int AHEAD, int STAGES>
__device__ __forceinline__ void hack_decode_warp_v2(
    const float* __restrict__ q, const uint8_t* __restrict__ kc, const uint8_t* __restrict__ vc,
    const uint16_t* __restrict__ ks, const uint16_t* __restrict__ km,
    const uint16_t* __restrict__ vs, const uint16_t* __restrict__ vm,
    const int32_t* __restrict__ page_table, const int32_t* __restrict__ n_pages,
    float* __restrict__ part, float* __restrict__ lse, float qk_scale, int n_sink, int KVH, int G,
    int S, long long qsb, long long qsh, long long ptb, int b, int kvh, int split,
    char* warp_smem) {
  static_assert(AHEAD == 0 || STAGES == 0, "an L2 prefetch or a shared-memory ring, not both");
  constexpr int E = 8 / BITS;
  constexpr int DE = D / E;
  constexpr int NC = DE / 16;
  constexpr int NWC = DE / 32;
  constexpr int NG = E;
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
  float o[NWC][2][E][4] = {};  // O^T [channel rows gid / gid + 8 of m-tile (wc, half, s)] x heads
  float aux[4] = {};           // [sum_t p mV_t,gid ; l] rows gid (gid + 8 unused) x heads 2 tid..

  if constexpr (STAGES > 0) {
    constexpr uint32_t STAGE = PageBytes<BITS>::STAGE;
#pragma unroll
    for (int a = 0; a < STAGES - 1; ++a) {
      if (lo + a < hi) {
        const long long row = (long long)page_table[b * ptb + lo + a] * KVH + kvh;
        copy_page_async<BITS>(PoolPage<BITS>{kc, vc, ks, km, vs, vm, row}, warp_smem + a * STAGE,
                              lane);
      }
      cp_async_commit();
    }
    for (int pg = lo; pg < hi; ++pg) {
      const int use = (pg - lo) % STAGES, fill = (pg - lo + STAGES - 1) % STAGES;
      __syncwarp();  // every lane is done with stage `fill` (last trip's)
      if (pg + STAGES - 1 < hi) {
        const long long row = (long long)page_table[b * ptb + pg + STAGES - 1] * KVH + kvh;
        copy_page_async<BITS>(PoolPage<BITS>{kc, vc, ks, km, vs, vm, row},
                              warp_smem + fill * STAGE, lane);
      }
      cp_async_commit();
      cp_async_wait<STAGES - 1>();  // this lane's copies of page pg have landed
      __syncwarp();                 // and every other lane's
      attend_page<BITS>(StagePage<BITS>{warp_smem + use * STAGE}, pg == 0, n_sink, gid, tid, qlo,
                        qhi, qlo2, qhi2, m_i, o, aux);
    }
    cp_async_wait<0>();
  } else {
    if constexpr (AHEAD > 1) {
#pragma unroll
      for (int a = 1; a < AHEAD; ++a)
        if (lo + a < hi)
          prefetch_page<BITS>(kc, vc, ks, km, vs, vm,
                              (long long)page_table[b * ptb + lo + a] * KVH + kvh, lane);
    }
    for (int pg = lo; pg < hi; ++pg) {
      if constexpr (AHEAD > 0) {
        if (pg + AHEAD < hi)
          prefetch_page<BITS>(kc, vc, ks, km, vs, vm,
                              (long long)page_table[b * ptb + pg + AHEAD] * KVH + kvh, lane);
      }
      const long long row = (long long)page_table[b * ptb + pg] * KVH + kvh;
      attend_page<BITS>(PoolPage<BITS>{kc, vc, ks, km, vs, vm, row}, pg == 0, n_sink, gid, tid,
                        qlo, qhi, qlo2, qhi2, m_i, o, aux);
    }
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

template <int BITS, int AHEAD, int STAGES>
__device__ __forceinline__ void hack_decode_entry(
    const float* q, const uint8_t* kc, const uint8_t* vc, const uint16_t* ks, const uint16_t* km,
    const uint16_t* vs, const uint16_t* vm, const int32_t* page_table, const int32_t* n_pages,
    float* part, float* lse, float qk_scale, int n_sink, int B, int KVH, int G, int S,
    long long qsb, long long qsh, long long ptb) {
  extern __shared__ __align__(128) char smem_raw[];  // STAGES > 0: the launch's dynamic bytes
  const int warp = threadIdx.x >> 5;
  const int item = blockIdx.x * (blockDim.x >> 5) + warp;
  if (item >= B * KVH * S) return;  // whole warps only: every lane of a warp agrees
  const int split = item % S;
  const int kvh = (item / S) % KVH;
  const int b = item / (S * KVH);
  char* warp_smem = smem_raw + warp * STAGES * PageBytes<BITS>::STAGE;
  hack_decode_warp_v2<BITS, AHEAD, STAGES>(q, kc, vc, ks, km, vs, vm, page_table, n_pages, part,
                                           lse, qk_scale, n_sink, KVH, G, S, qsb, qsh, ptb, b,
                                           kvh, split, warp_smem);
}

}  // namespace

#define HACK_DECODE_ENTRY(NAME, BITS, AHEAD, STAGES, MIN_BLOCKS)                              \
  extern "C" __global__ void __launch_bounds__(128, MIN_BLOCKS) NAME(                         \
      const float* q, const uint8_t* kc, const uint8_t* vc, const uint16_t* ks,                \
      const uint16_t* km, const uint16_t* vs, const uint16_t* vm, const int32_t* page_table,   \
      const int32_t* n_pages, float* part, float* lse, float qk_scale, int n_sink, int B,      \
      int KVH, int G, int S, long long qsb, long long qsh, long long ptb) {                    \
    hack_decode_entry<BITS, AHEAD, STAGES>(q, kc, vc, ks, km, vs, vm, page_table, n_pages,     \
                                           part, lse, qk_scale, n_sink, B, KVH, G, S, qsb, qsh, \
                                           ptb);                                               \
  }

// (name, bits, L2 prefetch distance, shared-memory stages, resident blocks the registers allow)
// v2: global loads, 2 blocks of 4 warps per SM; v2o3: the same held to 168 registers (3 blocks);
// v2p1 / v2p2: v2o3 + the L2 prefetch of the page 1 / 2 trips ahead; v2s2 / v2s3: v2o3 reading
// pages from 2 / 3 shared-memory stages per warp (dynamic shared memory: 4 warps x stages x
// PageBytes<BITS>::STAGE bytes per block, kernels/hack_decode_cuda.py sizes it).
HACK_DECODE_ENTRY(hack_decode_v2_b2, 2, 0, 0, 1)
HACK_DECODE_ENTRY(hack_decode_v2_b4, 4, 0, 0, 1)
HACK_DECODE_ENTRY(hack_decode_v2o3_b2, 2, 0, 0, 3)
HACK_DECODE_ENTRY(hack_decode_v2o3_b4, 4, 0, 0, 3)
HACK_DECODE_ENTRY(hack_decode_v2p1_b2, 2, 1, 0, 3)
HACK_DECODE_ENTRY(hack_decode_v2p1_b4, 4, 1, 0, 3)
HACK_DECODE_ENTRY(hack_decode_v2p2_b2, 2, 2, 0, 3)
HACK_DECODE_ENTRY(hack_decode_v2p2_b4, 4, 2, 0, 3)
HACK_DECODE_ENTRY(hack_decode_v2s2_b2, 2, 0, 2, 3)
HACK_DECODE_ENTRY(hack_decode_v2s2_b4, 4, 0, 2, 3)
HACK_DECODE_ENTRY(hack_decode_v2s3_b2, 2, 0, 3, 3)
HACK_DECODE_ENTRY(hack_decode_v2s3_b4, 4, 0, 3, 3)
// v2o4 / v2s2o4: v2o3 / v2s2 held to 128 registers (4 blocks per SM where the shared memory
// allows; the offline compile spills 10-26 loop-invariant registers per page trip to L1)
HACK_DECODE_ENTRY(hack_decode_v2o4_b2, 2, 0, 0, 4)
HACK_DECODE_ENTRY(hack_decode_v2o4_b4, 4, 0, 0, 4)
HACK_DECODE_ENTRY(hack_decode_v2s2o4_b2, 2, 0, 2, 4)
HACK_DECODE_ENTRY(hack_decode_v2s2o4_b4, 4, 0, 2, 4)
