"""The pair work of a table-form step and of scoring, fused into one pass over the pairs (a small
C kernel, CPU only, compiled once with the system's cc and cached).

At 10^6 users a step's pairs (4.7*10^7) index only ~75,000 table rows: the rows' projections
T = X V [E', K] fit in cache, and what is left is the per-pair work. Written as torch ops it is a
dozen passes over [P, K] temporaries (gathers, the margin, the loss, its gradient, index_add_),
each a read and a write of ~1 GB. Here it is one pass: for every user (pairs of a user are
contiguous, so a user is an offset range, not a [P] index), for every pair p of it,

    w_u  = softmax(logits_u)                                           before the pass
    s_p = (T[chosen_p] - T[rejected_p]) . w_u                          margin
    nll += weight_u * -log sigmoid(s_p / tau)                          loss
    g_p  = -weight_u * sigmoid(-s_p / tau) / tau                       d nll / d s_p
    G[chosen_p] += g_p w_u,  G[rejected_p] -= g_p w_u                  -> dV = X^T G
    dw_u += g_p (T[chosen_p] - T[rejected_p])                         -> dL/dw_u
    dlogits_u = w_u * (dw_u - w_u . dw_u)                              at u's last pair

reading each pair's two row indices once. The pairs go in blocks of 128 whatever their users: a
block's margins are summed 8 at a time (sum8), its loss and gradient are one vector loop (bt_loss:
the kernel's own exp and log1p, to float32 round-off). Threads take blocks of users, each with its
own G (summed at the end in thread order: the same threads give the same numbers); the loss is
summed in float32 within a block (at most 16 terms a lane) and in float64 across blocks. Where the
rows' T and G outgrow a core's cache (PersonalLLM's 75,216 rows: 4.8 MB), the pairs are first put
in bands of rows (band_pairs, once per fit) and the pass takes the bands in turn, each user's
dL/dw summed across them. Scoring is the same pass without the loss: the hits of s_p > 0 per user.
X V and X^T G read the table's rows in the widest vectors the CPU has (16 floats with AVX-512,
else 8), prefetching each row ahead.

Without a C compiler (or on CUDA) `kernel()` is None and lore.steps / lore.methods use their
torch-op forms, which give the same numbers to float32 round-off (tests/test_scale.py)."""
import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile

import torch

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

/* v8: 8 floats, one AVX register with -march=native (GCC's vector extension: the same code on any
   target). T, G rows are padded to KV v8s (KP = 8 KV floats, K columns then zeros). */
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
#define BLOCK 128  /* pairs (of any users) whose margins, loss and gradient are one vector pass: their
                      rows' lines (2 x 64 B a pair) stay in L1 from the gather to the scatter */
#define AHEAD 32   /* scoring: pairs ahead whose rows are prefetched (the rows are random lines of L3;
                      in the loss's pass, whose blocks take longer, prefetching measured no gain) */
#define INLINE static inline __attribute__((always_inline))

/* ((a0 + a4) + (a1 + a5)) + ((a2 + a6) + (a3 + a7)) in 3 vector adds (written as scalars, without
   -ffast-math, it is 7 dependent scalar adds) */
INLINE float hsum(v8 a) {
  const v4 h = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  const v4 q = h + __builtin_shufflevector(h, h, 1, 0, 3, 2);
  return q[0] + q[2];
}
INLINE v8 load8(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
INLINE void store8(float* p, v8 v) { memcpy(p, &v, sizeof v); }
/* 8 bfloat16 values as float32: the top halves of float32s (exact) */
INLINE v8 load8_bf16(const uint16_t* p) {
  v8h h; memcpy(&h, p, sizeof h);
  v8u u = __builtin_convertvector(h, v8u) << 16; v8 f; memcpy(&f, &u, sizeof f); return f; }
INLINE v8 load8_f32(const float* p) { return load8(p); }
INLINE float load1_bf16(const uint16_t* p) { union { uint32_t u; float f; } b = { (uint32_t)*p << 16 }; return b.f; }
INLINE float load1_f32(const float* p) { return *p; }

/* vw: the widest vector the target has, for X V and X^T G (the table's F features in a row): 16
   floats (one zmm) with AVX-512, else 8; NRMAX rows at once in X V (AVX-512's 32 registers hold
   4 rows x 6 sums, AVX2's 16 hold 2 x 6) */
#ifdef __AVX512F__
#define VW 16
#define NRMAX 4
#else
#define VW 8
#define NRMAX 2
#endif
#define RB 8       /* rows at once in X^T G (16 measured no faster with AVX-512) */
#define PF 256     /* X V and X^T G prefetch each row's features PF ahead into every cache level: the rows
                      stream from memory, and the hardware's prefetcher alone left X V at a third of the
                      read bandwidth on an AMD EPYC; there a non-temporal prefetch 1,024 ahead was best,
                      on an Intel Xeon it halved X V's speed and a third of X^T G's */
typedef float vw __attribute__((vector_size(4 * VW)));
typedef uint16_t vwh __attribute__((vector_size(2 * VW)));
typedef uint32_t vwu __attribute__((vector_size(4 * VW)));
typedef int32_t vwi __attribute__((vector_size(4 * VW)));
INLINE vw loadw_f32(const float* p) { vw v; memcpy(&v, p, sizeof v); return v; }
#if VW == 16
INLINE vw loadw_bf16(const uint16_t* p) {     /* one vpmovzxwd zmm (GCC's generic form takes two) */
  return (vw)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16)); }
#else
INLINE vw loadw_bf16(const uint16_t* p) {
  vwh h; memcpy(&h, p, sizeof h);
  vwu u = __builtin_convertvector(h, vwu) << 16; vw f; memcpy(&f, &u, sizeof f); return f; }
#endif
INLINE void storew(float* p, vw v) { memcpy(p, &v, sizeof v); }
INLINE vw bcastw(float a) { vw v; for (int i = 0; i < VW; ++i) v[i] = a; return v; }
/* the sum of a vw's lanes: its two halves added, then hsum */
INLINE float hsumw(vw a) {
#if VW == 16
  return hsum(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7)
            + __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15));
#else
  return hsum(a);
#endif
}

/* a[0..8) -> the vector of their 8 lane sums: a transposed reduction, 14 shuffles and 7 adds for 8
   sums (a horizontal sum each would be 15 dependent scalar operations) */
INLINE v8 sum8(const v8* a) {
  v8 b[4], c[2];
  for (int i = 0; i < 4; ++i)
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14)
         + __builtin_shufflevector(a[2 * i], a[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13)
         + __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return __builtin_shufflevector(c[0], c[1], 0, 1, 2, 3, 8, 9, 10, 11)
       + __builtin_shufflevector(c[0], c[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

INLINE v8 bcast(float a) { return (v8){a, a, a, a, a, a, a, a}; }
/* n (1..8) floats at p as a v8, the other lanes 0 (nothing past p + n read); a v8's first n lanes
   to p: a user's K <= 8 logits and gradient, the rows of T at stride K in scoring */
#if defined(__AVX512VL__)
typedef __mmask8 tailmask;
INLINE tailmask tail_mask(int n) { return (tailmask)((1u << n) - 1); }
INLINE v8 load8_tail(const float* p, tailmask m) { return (v8)_mm256_maskz_loadu_ps(m, p); }
INLINE void store8_tail(float* p, tailmask m, v8 v) { _mm256_mask_storeu_ps(p, m, (__m256)v); }
#elif defined(__AVX2__)
typedef __m256i tailmask;
INLINE tailmask tail_mask(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
INLINE v8 load8_tail(const float* p, tailmask m) { return (v8)_mm256_maskload_ps(p, m); }
INLINE void store8_tail(float* p, tailmask m, v8 v) { _mm256_maskstore_ps(p, m, (__m256)v); }
#else
typedef int tailmask;
INLINE tailmask tail_mask(int n) { return n; }
INLINE v8 load8_tail(const float* p, tailmask n) { v8 v = {0}; memcpy(&v, p, sizeof(float) * n); return v; }
INLINE void store8_tail(float* p, tailmask n, v8 v) { memcpy(p, &v, sizeof(float) * n); }
#endif
/* For a vector type V of floats and VI of int32 of its width (v8; and vw, in which the loss takes
   16 pairs at a time with AVX-512: the same operations lane by lane, so the same numbers):
   sel: m ? a : b, lane by lane.
   exp_neg: exp(y) for y <= 0 (y below -87 taken as -87: exp(-87) = 1.6e-38): y = r - k ln2 with
   |r| <= ln2 / 2 (ln2 in two parts, Cody-Waite), exp(r) by its Taylor series to r^7 (truncation
   < 6e-9 relative), times 2^-k in the exponent bits.
   log1p01w (the loss's only): log(1 + e) for e in [0, 1]: e q(e), q a degree-8 Chebyshev fit of
   log1p(e) / e (relative error at most 2e-7 in float32: tests/test_scale.py bounds the loss
   against float64). */
#define VECTOR_MATH(S, V, VI)                                                                     \
INLINE V as_f##S(VI a) { V f; memcpy(&f, &a, sizeof f); return f; }                               \
INLINE VI as_i##S(V a) { VI i; memcpy(&i, &a, sizeof i); return i; }                              \
INLINE V sel##S(VI m, V a, V b) { return as_f##S((m & as_i##S(a)) | (~m & as_i##S(b))); }         \
INLINE V exp_neg##S(V y) {                                                                        \
  y = sel##S(y > -87.f, y, (V){0} - 87.f);                                                        \
  const VI k = __builtin_convertvector(y * -1.44269504f + 0.5f, VI);   /* round(-y / ln2) >= 0 */ \
  const V kf = __builtin_convertvector(k, V);                                                     \
  const V r = (y + kf * 0.693359375f) + kf * -2.12194440e-4f;                                     \
  V p = r * (1.f / 5040) + 1.f / 720;                                                             \
  p = p * r + 1.f / 120; p = p * r + 1.f / 24; p = p * r + 1.f / 6; p = p * r + 0.5f;             \
  p = p * r + 1.f; p = p * r + 1.f;                                                               \
  return p * as_f##S((127 - k) << 23);                                                            \
}
VECTOR_MATH(, v8, v8i)      /* the users' softmax */
VECTOR_MATH(w, vw, vwi)     /* the loss */
INLINE vw log1p01w(vw e) {
  vw q = e * 0.005253457929939032f - 0.02958850748836994f;
  q = q * e + 0.07836166769266129f; q = q * e - 0.13674770295619965f; q = q * e + 0.19111430644989014f;
  q = q * e - 0.24844369292259216f; q = q * e + 0.33319270610809326f; q = q * e - 0.49999502301216125f;
  q = q * e + 1.f;
  return e * q;
}
/* margins s [n], weights wt [n] (n a multiple of VW) -> g [n] = d/ds of wt * -log sigmoid(s inv_tau);
   returns the summed loss (float32 within the block, <= 16 terms a lane, then as float64).
   -log sigmoid(x) = log(1 + e^-|x|) + max(-x, 0) and
   sigmoid(-x) = (x >= 0 ? e^-|x| : 1) / (1 + e^-|x|): one exp, no overflow for any x. */
INLINE double bt_loss(const float* restrict s, const float* restrict wt, float* restrict g, int n, float inv_tau) {
  vw acc = {0};                  /* the block's (<= 16 terms a lane) in float32, then as float64 */
  for (int j = 0; j < n; j += VW) {
    const vw x = loadw_f32(s + j) * inv_tau, w = loadw_f32(wt + j);
    const vwi pos = x >= 0.f;
    const vw e = exp_negw(selw(pos, -x, x));                                    /* e^-|x| in (0, 1] */
    acc += w * (log1p01w(e) + selw(pos, (vw){0}, -x));
    storew(g + j, (w * -inv_tau) * selw(pos, e, (vw){0} + 1.f) / (1.f + e));
  }
  double total = 0.0;
  for (int i = 0; i < VW; ++i) total += acc[i];
  return total;
}

/* a user's weights w = softmax(x) of its K logits x (lw + v K), into KV v8s (padding lanes 0): their
   max m, exp(x - m) by exp_neg (x - m <= 0), each over their sum. For K <= 8, in one v8 (the max
   and the sum as shuffles): as scalars, lane by lane, it was ~25 ns a user on an Intel Xeon. */
INLINE v8 max8(v8 a, v8 b) { return sel(a > b, a, b); }
INLINE void softmax_w(v8* restrict wv, const float* restrict lw, int64_t v, int64_t K, const int KV) {
  if (KV == 1) {
    const v8i valid = (v8i){0, 1, 2, 3, 4, 5, 6, 7} < (int)K;
    v8 x = load8_tail(lw + v * K, tail_mask((int)K));
    x = sel(valid, x, bcast(x[0]));                                       /* the max of K lanes */
    v8 m = max8(x, __builtin_shufflevector(x, x, 4, 5, 6, 7, 0, 1, 2, 3));
    m = max8(m, __builtin_shufflevector(m, m, 2, 3, 0, 1, 6, 7, 4, 5));
    m = max8(m, __builtin_shufflevector(m, m, 1, 0, 3, 2, 5, 4, 7, 6));
    const v8 e = sel(valid, exp_neg(x - m), bcast(0.f));
    wv[0] = e / hsum(e);
    return;
  }
  const float* x = lw + v * K;
  float mx = x[0], total = 0.f;
  for (int k = 1; k < K; ++k) mx = x[k] > mx ? x[k] : mx;
  for (int i = 0; i < KV; ++i) wv[i] = bcast(0.f);
  for (int k = 0; k < K; ++k) wv[k / 8][k % 8] = x[k] - mx;
  for (int i = 0; i < KV; ++i) wv[i] = exp_neg(wv[i]);
  for (int k = K; k < 8 * KV; ++k) wv[k / 8][k % 8] = 0.f;
  for (int k = 0; k < K; ++k) total += wv[k / 8][k % 8];
  for (int i = 0; i < KV; ++i) wv[i] = wv[i] / total;
}
/* the softmax's backward at a user's last pair: d [K] = dL/dw -> out [K] = dL/dx = w (d - w . d) */
INLINE void softmax_back(float* restrict out, const v8* restrict wv, const v8* restrict d, int64_t K) {
  if (K <= 8) {
    store8_tail(out, tail_mask((int)K), wv[0] * (d[0] - hsum(wv[0] * d[0])));
    return;
  }
  float dot = 0.f;
  for (int k = 0; k < K; ++k) dot += wv[k / 8][k % 8] * d[k / 8][k % 8];
  for (int k = 0; k < K; ++k) out[k] = wv[k / 8][k % 8] * (d[k / 8][k % 8] - dot);
}

/* for every user v with pairs in [b, e) (the block's first user u on): the statements ... with
   the pairs [p0, p1) of v in the block */
#define EACH_USER_OF_BLOCK(u, b, e, ...)                                                          \
  for (int64_t v = u; off[v] < e; ++v) {                                                          \
    const int64_t p0 = off[v] > b ? off[v] : b, p1 = off[v + 1] < e ? off[v + 1] : e;             \
    __VA_ARGS__                                                                                   \
  }

/* the products (T[c_p] - T[r_p]) * w_v of the block's pairs (summed over their KV v8s) into
   m [BLOCK]; then their lane sums, the margins, into s. Each user with pairs in the block: its
   weights (ws + v K) into wc, its loss weight uw[v] into wb. */
#define MARGINS(tg, STRIDE)                                                                       \
  int nu = 0;                                                                                     \
  EACH_USER_OF_BLOCK(u, b, e,                                                                     \
    if (p0 == p1) continue;                                   /* no pairs (here) */               \
    v8* wv = wc + nu++ * KV; load_k(wv, ws + v * K, K, KV);                                       \
    const float uwv = uw[v];                                                                      \
    for (int64_t p = p0; p < p1; ++p) {                                                           \
      const v8* tc = tg + (int64_t)c[p] * STRIDE;                                                 \
      const v8* tr = tg + (int64_t)r[p] * STRIDE;                                                 \
      v8 mp = (tc[0] - tr[0]) * wv[0];                                                            \
      for (int i = 1; i < KV; ++i) mp += (tc[i] - tr[i]) * wv[i];                                 \
      m[p - b] = mp;                                                                              \
      wb[p - b] = uwv;                                                                            \
    })                                                                                            \
  for (int j = n; j < n8; ++j) m[j] = bcast(0.f);                                                 \
  for (int j = 0; j < n8; j += 8) store8(s + j, sum8(m + j));

/* K floats at p (a user's weights or dL/dw) as KV v8s, padding lanes 0; and back */
INLINE void load_k(v8* restrict d, const float* restrict p, int64_t K, const int KV) {
  for (int i = 0; i + 1 < KV; ++i) d[i] = load8(p + 8 * i);
  d[KV - 1] = load8_tail(p + 8 * (KV - 1), tail_mask((int)(K - 8 * (KV - 1))));
}
INLINE void store_k(float* restrict p, const v8* restrict d, int64_t K, const int KV) {
  for (int i = 0; i + 1 < KV; ++i) store8(p + 8 * i, d[i]);
  store8_tail(p + 8 * (KV - 1), tail_mask((int)(K - 8 * (KV - 1))), d[KV - 1]);
}

/* pair p's gradient g[p - b] into G[c_p], G[r_p] (the T row's line) and into the sum dwv */
#define SCATTER(p, dwv)                                                                           \
  {                                                                                               \
    v8* tc = tg + (int64_t)c[p] * 2 * KV;                                                         \
    v8* tr = tg + (int64_t)r[p] * 2 * KV;                                                         \
    const float gp = g[(p) - b];                                                                  \
    for (int i = 0; i < KV; ++i) {                                                                \
      dwv[i] += gp * (tc[i] - tr[i]);                                                             \
      tc[KV + i] += gp * wv[i];                                                                   \
      tr[KV + i] -= gp * wv[i];                                                                   \
    }                                                                                             \
  }

/* Band `band` of users [u0, u1): their pairs sorted by user (user u: pairs off[u] .. off[u+1]), ws
   [N, K] their weights, uw [N] the loss weight of each of a user's pairs: the summed loss,
   G [E, KP] += the gradient in T, dw [N, K] += the gradient in the logits. The pairs go in blocks
   of BLOCK, whatever their users (a user has ~50 pairs: per user, the loss would be a vector loop
   and a scalar tail): per block, the margins, then the loss and its gradient 8 pairs at a time,
   then the scatter. A user's dL/dw is two running sums, over its pairs at even and at odd places
   from its first in the band (two chains of adds: half the FMA latency a pair), carried across
   block boundaries (the same numbers wherever the blocks start: a torchrun shard's pairs start at
   its first user), added to the earlier bands' sum in dw and, in its last band (last[v]; all in
   band 0 without bands), turned into dL/dlogits (softmax_back). KV a constant where inlined. */
#define PAIR_LOSS_USERS(NAME, IDX)                                                                \
INLINE double NAME(v8* restrict tg, const float* restrict ws, const IDX* restrict c,             \
                   const IDX* restrict r, const int64_t* restrict off, int band,                  \
                   const uint8_t* restrict last, const float* restrict uw, int64_t K, const int KV, \
                   int64_t u0, int64_t u1, float inv_tau, float* restrict dw) {                   \
  double loss = 0.0;                                                                              \
  v8 m[BLOCK], dwh[2][8], wc[BLOCK * 8];         /* wc: the weights of the block's users, KV each */ \
  float s[BLOCK], g[BLOCK], wb[BLOCK];                                                            \
  const int64_t end = off[u1];                                                                    \
  int64_t u = u0, held = -1;         /* held: the user whose dL/dw sum (dwh) a block boundary cut */ \
  for (int64_t b = off[u0]; b < end; b += BLOCK) {                                                \
    const int64_t e = end - b < BLOCK ? end : b + BLOCK;                                          \
    const int n = (int)(e - b), n8 = (n + 7) & ~7;                                                \
    while (off[u + 1] <= b) ++u;                              /* the block's first user */       \
    MARGINS(tg, 2 * KV)                                                                           \
    const int nw = (n + VW - 1) / VW * VW;                    /* the loss's vectors: VW pairs */  \
    for (int j = n; j < nw; ++j) wb[j] = 0.f;                 /* padding: no loss, no gradient */ \
    for (int j = n8; j < nw; ++j) s[j] = 0.f;                                                     \
    loss += bt_loss(s, wb, g, nw, inv_tau);                                                       \
    nu = 0;                                                                                       \
    EACH_USER_OF_BLOCK(u, b, e,                               /* scatter, into the rows' lines */ \
      if (p0 == p1) continue;                                                                     \
      const v8* wv = wc + nu++ * KV;                                                              \
      v8 dwv[2][8];                   /* v's pairs at even and odd places: two chains of adds */  \
      for (int i = 0; i < KV; ++i) {                                                              \
        dwv[0][i] = v == held ? dwh[0][i] : bcast(0.f);                                           \
        dwv[1][i] = v == held ? dwh[1][i] : bcast(0.f);                                           \
      }                                                                                           \
      int64_t p = p0;                                                                             \
      if ((p - off[v]) & 1) { SCATTER(p, dwv[1]); ++p; }                                          \
      for (; p + 1 < p1; p += 2) { SCATTER(p, dwv[0]); SCATTER(p + 1, dwv[1]); }                  \
      if (p < p1) SCATTER(p, dwv[0]);                                                             \
      if (p1 < off[v + 1]) {                                  /* v goes on in the next block */   \
        held = v;                                                                                 \
        for (int i = 0; i < KV; ++i) { dwh[0][i] = dwv[0][i]; dwh[1][i] = dwv[1][i]; }            \
      } else {                                                                                    \
        for (int i = 0; i < KV; ++i) dwv[0][i] += dwv[1][i];                                      \
        if (band > 0) {                                       /* v's sum in the bands before */   \
          v8 d[8]; load_k(d, dw + v * K, K, KV);                                                  \
          for (int i = 0; i < KV; ++i) dwv[0][i] += d[i];                                         \
        }                                                                                         \
        if (last == NULL || last[v] == band) softmax_back(dw + v * K, wv, dwv[0], K);              \
        else store_k(dw + v * K, dwv[0], K, KV);                                                  \
      })                                                                                          \
  }                                                                                               \
  return loss;                                                                                    \
}

/* The pass over users [0, N): t [E, KP], lw [N, K] logits, uw [N] float32; c, r [P] int32 or int64,
   user u's pairs off[u] .. off[u + 1], or in B bands (band_pairs): band b's at off[b (N + 1) + u]
   .., each user's last band last[u] (NULL for B = 1). Writes the summed loss to part (one per
   thread), the gradient in T to g_out [E, KP], in the logits to dw [N, K]; ws [N, K]: the users'
   weights (softmax of lw, each user's once, before the bands).
   Each of the nthreads threads takes one block of users and its own copy of T with G beside it
   (scratch [nthreads, E, 2 KP]: row e's T and G in one 64-byte line for K <= 8, so that a pair's
   scatter writes the lines its gather read), the G summed in thread order at the end: the same
   threads give the same numbers. */
#define PAIR_LOSS(NAME, IDX)                                                                      \
PAIR_LOSS_USERS(NAME##_users, IDX)                                                                \
void NAME(const float* t, const float* lw, const IDX* c, const IDX* r, const int64_t* off,      \
          int B, const uint8_t* last, const float* uw, int64_t E, int64_t K, int64_t KP,         \
          int64_t N, float inv_tau, int nthreads, float* scratch, double* part, float* g_out,    \
          float* dw, float* ws) {                                                                \
  _Pragma("omp parallel num_threads(nthreads)")                                                  \
  {                                                                                              \
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();                            \
    float* tg = scratch + (int64_t)tid * E * 2 * KP;                                             \
    for (int64_t e = 0; e < E; ++e) {                                                            \
      memcpy(tg + e * 2 * KP, t + e * KP, sizeof(float) * KP);                                   \
      memset(tg + e * 2 * KP + KP, 0, sizeof(float) * KP);                                       \
    }                                                                                            \
    const int64_t u0 = N * tid / nt, u1 = N * (tid + 1) / nt;                                    \
    memset(dw + u0 * K, 0, sizeof(float) * (u1 - u0) * K);    /* users without pairs */           \
    for (int64_t u = u0; u < u1; ++u) {                        /* the users' weights, into ws */  \
      v8 w[8];                                                                                   \
      if (KP == 8) { softmax_w(w, lw, u, K, 1); store_k(ws + u * K, w, K, 1); }                  \
      else { softmax_w(w, lw, u, K, (int)(KP / 8)); store_k(ws + u * K, w, K, (int)(KP / 8)); }  \
    }                                                                                            \
    double loss = 0.0;                                                                           \
    for (int b = 0; b < B; ++b) {                                                              \
      const int64_t* ob = off + b * (N + 1);                                                     \
      loss += KP == 8 ? NAME##_users((v8*)tg, ws, c, r, ob, b, last, uw, K, 1, u0, u1, inv_tau, dw) \
                      : NAME##_users((v8*)tg, ws, c, r, ob, b, last, uw, K, (int)(KP / 8), u0, u1, inv_tau, dw); \
    }                                                                                            \
    part[tid] = loss;                                                                            \
    _Pragma("omp barrier")                                                                       \
    _Pragma("omp for schedule(static)")                         /* G: the threads' sum */        \
    for (int64_t e = 0; e < E; ++e)                                                              \
      for (int64_t k = 0; k < KP; ++k) {                                                         \
        float total = 0.f;                                                                       \
        for (int i = 0; i < nt; ++i) total += scratch[((int64_t)i * E + e) * 2 * KP + KP + k];   \
        g_out[e * KP + k] = total;                                                               \
      }                                                                                          \
  }                                                                                              \
}

/* hits[u]: the pairs of user u with a positive margin (T[c] - T[r]) . W[u]; acc[u]: their share of
   u's pairs (either may be NULL). T [E, K] unpadded, its rows read as KV v8s (the last one K's tail
   lanes by a masked load): at K = 5, 20 bytes a row rather than 32, and a table of 83,216 rows fits
   a 2 MB L2 (scoring took 1.4x as long with the rows padded, on an Intel Xeon). */
#define PAIR_HITS(NAME, IDX)                                                                      \
INLINE void NAME##_users(const float* restrict t, const float* restrict w, const IDX* restrict c,  \
                         const IDX* restrict r, const int64_t* restrict off, int64_t K, const int KV, \
                         int64_t u0, int64_t u1, int64_t* restrict hits, double* restrict acc) {  \
  const tailmask tm = tail_mask((int)(K - 8 * (KV - 1)));                                        \
  const int64_t last = 8 * (KV - 1);                               /* the tail vector's lanes */  \
  for (int64_t u = u0; u < u1; ++u) {                                                            \
    v8 wu[8];                                                                                    \
    load_k(wu, w + u * K, K, KV);                                                                \
    int64_t n = 0;                                                                               \
    for (int64_t p = off[u]; p < off[u + 1]; ++p) {                                              \
      if (p + AHEAD < off[u1]) {                                                                 \
        __builtin_prefetch(t + (int64_t)c[p + AHEAD] * K, 0, 3);                                 \
        __builtin_prefetch(t + (int64_t)r[p + AHEAD] * K, 0, 3);                                 \
      }                                                                                          \
      const float* tc = t + (int64_t)c[p] * K;                                                   \
      const float* tr = t + (int64_t)r[p] * K;                                                   \
      v8 m = (load8_tail(tc + last, tm) - load8_tail(tr + last, tm)) * wu[KV - 1];               \
      for (int i = 0; i + 1 < KV; ++i) m += (load8(tc + 8 * i) - load8(tr + 8 * i)) * wu[i];     \
      n += hsum(m) > 0.f;                                                                        \
    }                                                                                            \
    if (hits) hits[u] = n;                                                                       \
    if (acc) acc[u] = (double)n / (double)(off[u + 1] - off[u]);     /* 0 / 0: NaN, no pairs */    \
  }                                                                                              \
}                                                                                                \
void NAME(const float* t, const float* w, const IDX* c, const IDX* r, const int64_t* off,       \
          int64_t K, int64_t N, int nthreads, int64_t* hits, double* acc) {                      \
  _Pragma("omp parallel num_threads(nthreads)")                                                  \
  {                                                                                              \
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();                            \
    const int64_t u0 = N * tid / nt, u1 = N * (tid + 1) / nt;                                    \
    if (K <= 8) NAME##_users(t, w, c, r, off, K, 1, u0, u1, hits, acc);                          \
    else NAME##_users(t, w, c, r, off, K, (int)((K + 7) / 8), u0, u1, hits, acc);                \
  }                                                                                              \
}

PAIR_LOSS(pair_loss_i32, int32_t)
PAIR_LOSS(pair_loss_i64, int64_t)

/* The pairs (c, r [P], users' offsets off [N + 1]) in band-major order into cb, rb: band b's pairs,
   those whose chosen row is in c / per = b (the last band takes the rest), of user 0, 1, ... in
   their order, band after band; boff [B, N + 1]: band b's pairs of user u are boff[b (N + 1) + u]
   .. boff[b (N + 1) + u + 1]; last [N]: each user's last band with pairs (0 without pairs).
   Threads take blocks of users: counts, then (one thread) their running sums, then the copy. */
/* the band of a row: per rows a band, the last one the rest */
INLINE int band_of(int64_t row, int64_t per, int B) { return row / per < B - 1 ? (int)(row / per) : B - 1; }
#define BAND_PAIRS(NAME, IDX)                                                                     \
void NAME(const IDX* c, const IDX* r, const int64_t* off, int64_t N, int64_t per, int B,        \
          int nthreads, IDX* cb, IDX* rb, int64_t* boff, uint8_t* last) {                        \
  _Pragma("omp parallel num_threads(nthreads)")                                                  \
  {                                                                                              \
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();                            \
    const int64_t u0 = N * tid / nt, u1 = N * (tid + 1) / nt;                                    \
    for (int64_t u = u0; u < u1; ++u) {                        /* counts into boff[.., u + 1] */ \
      int64_t n[64] = {0};                                                                       \
      for (int64_t p = off[u]; p < off[u + 1]; ++p) ++n[band_of(c[p], per, B)];                 \
      last[u] = 0;                                                                               \
      for (int b = 0; b < B; ++b) {                                                              \
        boff[b * (N + 1) + u + 1] = n[b];                                                        \
        if (n[b]) last[u] = (uint8_t)b;                                                          \
      }                                                                                          \
    }                                                                                            \
    _Pragma("omp barrier")                                                                       \
    _Pragma("omp single")                                                                        \
    {                                                                                            \
      int64_t total = 0;                                                                         \
      for (int b = 0; b < B; ++b) {                                                              \
        boff[b * (N + 1)] = total;                                                               \
        for (int64_t u = 0; u < N; ++u) total = boff[b * (N + 1) + u + 1] += total;              \
      }                                                                                          \
    }                                                                                            \
    for (int64_t u = u0; u < u1; ++u) {                        /* the copy */                    \
      int64_t at[64];                                                                            \
      for (int b = 0; b < B; ++b) at[b] = boff[b * (N + 1) + u];                                 \
      for (int64_t p = off[u]; p < off[u + 1]; ++p) {                                            \
        const int b = band_of(c[p], per, B);                                                     \
        cb[at[b]] = c[p]; rb[at[b]] = r[p]; ++at[b];                                             \
      }                                                                                          \
    }                                                                                            \
  }                                                                                              \
}

PAIR_HITS(pair_hits_i32, int32_t)
PAIR_HITS(pair_hits_i64, int64_t)
BAND_PAIRS(band_pairs_i32, int32_t)
BAND_PAIRS(band_pairs_i64, int64_t)

/* dst[i] = features f0 .. f0 + VW of rows src + i F, i < n, each row's features PF ahead prefetched
   (X V's and X^T G's reads of the table) */
#define STREAM_ROWS(dst, src, n, LOADW)                                                           \
  for (int i = 0; i < (n); ++i) {                                                                \
    __builtin_prefetch(src + i * F + f0 + PF, 0, 3);                                             \
    dst[i] = LOADW(src + i * F + f0);                                                            \
  }

/* out [E, K] = X V for a table X [E, F] (float32 or bfloat16), vt = V^T [K, F]: each row read once,
   VW features at a time into KG <= 8 sums held in registers, NR = NRMAX rows at once where KG <= 6
   (each V load serves them all, and the independent sums hide the FMA latency; KG, NR constants
   where inlined) */
#define PROJECT_ROWS(NAME, TYPE, LOADW, LOAD1)                                                    \
INLINE void NAME(const TYPE* restrict row, const float* restrict vt, int64_t F, const int KG,   \
                 const int NR, float* restrict out, int64_t K) {                                 \
  vw acc[NRMAX][8] = {{{0}}};                                                                    \
  int64_t f0 = 0;                                                                                \
  for (; f0 + VW <= F; f0 += VW) {                                                               \
    vw x[NRMAX];                                                                                 \
    STREAM_ROWS(x, row, NR, LOADW)                                                               \
    for (int k = 0; k < KG; ++k) {                                                               \
      const vw v = loadw_f32(vt + k * F + f0);                                                   \
      for (int i = 0; i < NR; ++i) acc[i][k] += x[i] * v;                                        \
    }                                                                                            \
  }                                                                                              \
  for (int i = 0; i < NR; ++i)                                                                   \
    for (int k = 0; k < KG; ++k) {                                                               \
      float total = hsumw(acc[i][k]);                                                            \
      for (int64_t f = f0; f < F; ++f) total += LOAD1(row + i * F + f) * vt[k * F + f];          \
      out[i * K + k] = total;                                                                    \
    }                                                                                            \
}

#define PROJECT(NAME, TYPE, KIND)                                                                 \
PROJECT_ROWS(NAME##_rows, TYPE, loadw_##KIND, load1_##KIND)                                       \
void NAME(const TYPE* x, const float* vt, int64_t E, int64_t F, int64_t K, int nthreads,        \
          float* out) {                                                                          \
  _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                            \
  for (int64_t e = 0; e < E; e += NRMAX)                       /* rows e .. e + NRMAX - 1 */     \
    for (int64_t k0 = 0; k0 < K; k0 += 8) {                    /* K in groups of 8 columns */    \
      const TYPE* row = x + e * F; const float* v = vt + k0 * F; float* o = out + e * K + k0;    \
      const int kg = (int)(K - k0 < 8 ? K - k0 : 8);                                             \
      if (e + NRMAX <= E && kg <= 6) {                                                           \
        switch (kg) {                                                                            \
          case 1: NAME##_rows(row, v, F, 1, NRMAX, o, K); break;                                 \
          case 2: NAME##_rows(row, v, F, 2, NRMAX, o, K); break;                                 \
          case 3: NAME##_rows(row, v, F, 3, NRMAX, o, K); break;                                 \
          case 4: NAME##_rows(row, v, F, 4, NRMAX, o, K); break;                                 \
          case 5: NAME##_rows(row, v, F, 5, NRMAX, o, K); break;                                 \
          default: NAME##_rows(row, v, F, 6, NRMAX, o, K); break;                                \
        }                                                                                        \
        continue;                                                                                \
      }                                                                                          \
      for (int64_t i = e; i < e + NRMAX && i < E; ++i, row += F, o += K)                         \
        switch (kg) {                                                                            \
          case 1: NAME##_rows(row, v, F, 1, 1, o, K); break;                                     \
          case 2: NAME##_rows(row, v, F, 2, 1, o, K); break;                                     \
          case 3: NAME##_rows(row, v, F, 3, 1, o, K); break;                                     \
          case 4: NAME##_rows(row, v, F, 4, 1, o, K); break;                                     \
          case 5: NAME##_rows(row, v, F, 5, 1, o, K); break;                                     \
          case 6: NAME##_rows(row, v, F, 6, 1, o, K); break;                                     \
          case 7: NAME##_rows(row, v, F, 7, 1, o, K); break;                                     \
          default: NAME##_rows(row, v, F, 8, 1, o, K); break;                                    \
        }                                                                                        \
    }                                                                                            \
}

/* acc += G[e0:e0+RB]^T X[e0:e0+RB] for RB consecutive rows: per VW features, the RB rows' values
   (from L1/L2) into each of the K sums, so that acc is read and written once per RB rows; even and
   odd rows in two sums (two FMA chains: ~15% less time). acc holds G^T X [K, F] as VW features at
   a time of each k in turn (ACC_AT: the K sums of VW features are K x VW contiguous floats; as
   [K, F], 16 KB apart, X^T G took 1.7x as long on an Intel Xeon), K x FR floats, FR = F rounded up
   to VW. */
#define ACC_AT(f, k) (((f) / VW) * VW * K + (k) * VW + (f) % VW)
#define GRAD_ROWS(NAME, TYPE, LOADW, LOAD1)                                                       \
INLINE void NAME(const TYPE* restrict x, const float* restrict g, int64_t F, int64_t K,         \
                 const int nr, float* restrict acc) {                                            \
  int64_t f0 = 0;                                                                                \
  for (; f0 + VW <= F; f0 += VW) {                                                               \
    vw xs[RB];                                                                                   \
    STREAM_ROWS(xs, x, nr, LOADW)                                                                \
    for (int64_t k = 0; k < K; ++k) {                         /* two chains: half the latency */ \
      vw a = loadw_f32(acc + ACC_AT(f0, k)), b = bcastw(0.f);                                       \
      for (int i = 0; i + 1 < nr; i += 2) {                                                      \
        a += g[i * K + k] * xs[i];                                                               \
        b += g[(i + 1) * K + k] * xs[i + 1];                                                     \
      }                                                                                          \
      if (nr & 1) a += g[(nr - 1) * K + k] * xs[nr - 1];                                         \
      storew(acc + ACC_AT(f0, k), a + b);                                                           \
    }                                                                                            \
  }                                                                                              \
  for (; f0 < F; ++f0)                                                                           \
    for (int64_t k = 0; k < K; ++k)                                                              \
      for (int i = 0; i < nr; ++i) acc[ACC_AT(f0, k)] += g[i * K + k] * LOAD1(x + i * F + f0);      \
}

/* out [F, K] = X^T G for G [E, K]: threads take blocks of rows, each adding into its own
   G^T X (scratch [nthreads, K FR], GRAD_ROWS' order), summed in thread order */
#define TABLE_GRAD(NAME, TYPE, KIND)                                                              \
GRAD_ROWS(NAME##_rows, TYPE, loadw_##KIND, load1_##KIND)                                          \
void NAME(const TYPE* x, const float* g, int64_t E, int64_t F, int64_t K, int nthreads,         \
          float* scratch, float* out) {                                                          \
  _Pragma("omp parallel num_threads(nthreads)")                                                  \
  {                                                                                              \
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();                            \
    const int64_t size = K * ((F + VW - 1) / VW * VW);                                           \
    float* acc = scratch + (int64_t)tid * size;                                                  \
    memset(acc, 0, sizeof(float) * size);                                                        \
    const int64_t e1 = E * (tid + 1) / nt;                                                       \
    for (int64_t e = E * tid / nt; e < e1; e += RB) {                                            \
      if (e + RB <= e1) NAME##_rows(x + e * F, g + e * K, F, K, RB, acc);                        \
      else NAME##_rows(x + e * F, g + e * K, F, K, (int)(e1 - e), acc);                          \
    }                                                                                            \
    _Pragma("omp barrier")                                                                       \
    _Pragma("omp for schedule(static)")                                                          \
    for (int64_t j = 0; j < F * K; ++j) {                                                        \
      float total = 0.f;                                                                         \
      for (int i = 0; i < nt; ++i) total += scratch[(int64_t)i * size + ACC_AT(j / K, j % K)];   \
      out[j] = total;                                                                            \
    }                                                                                            \
  }                                                                                              \
}

int vector_floats(void) { return VW; }   /* the floats in X V's and X^T G's vectors */

PROJECT(project_f32, float, f32)
PROJECT(project_bf16, uint16_t, bf16)
TABLE_GRAD(table_grad_f32, float, f32)
TABLE_GRAD(table_grad_bf16, uint16_t, bf16)
"""

# No -ffast-math: the loss's exp and log1p are the kernel's own (bt_loss), and every sum is taken
# in the order the source writes it.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC"]
_KERNEL = []   # [ctypes library or None], built on first use


def cpu():
    """The machine's processor as a compiler's -march=native sees it: its architecture and, on
    Linux, the instruction sets /proc/cpuinfo lists (a build for one CPU can crash on another)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return f"{platform.machine()} {platform.processor()} {flags.strip()}"


def build(source, flags):
    """A ctypes library of C source compiled with flags, built once into ~/.cache/lore keyed by
    both, the compiler and the CPU (~1 s of gcc; a home folder shared by machines of different
    CPUs keeps a build for each), or None where it cannot be built (no compiler)."""
    cc = os.environ.get("CC", "cc")
    key = hashlib.sha256("\n".join([source, " ".join(flags), cc, cpu()]).encode()).hexdigest()[:16]
    path = os.path.join(os.path.expanduser("~"), ".cache", "lore", f"fused_{key}.so")
    try:
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                c_file, o_file, so_file = (os.path.join(tmp, f"fused.{e}") for e in ("c", "o", "so"))
                with open(c_file, "w") as f:
                    f.write(source)
                subprocess.run([cc, *flags, "-c", c_file, "-o", o_file], check=True, capture_output=True)
                subprocess.run([cc, "-shared", "-fopenmp", o_file, "-o", so_file, "-lm"], check=True,
                               capture_output=True)
                os.replace(so_file, path)   # atomic: a concurrent build never loads half a file
        return ctypes.CDLL(path)
    except (OSError, subprocess.CalledProcessError):
        return None


def kernel():
    """The compiled kernel (SOURCE built with FLAGS), or None where it cannot be built (no
    compiler): then the torch-op forms."""
    if not _KERNEL:
        _KERNEL.append(build(SOURCE, FLAGS))
    return _KERNEL[0]


def vector_floats():
    """The floats in one vector of X V and X^T G as built for this CPU (16 with AVX-512, else 8), or
    None without a kernel: what a benchmark's record says about the machine."""
    lib = kernel()
    return None if lib is None else int(lib.vector_floats())


def usable(*tensors):
    """Whether the fused kernel applies: every tensor on the CPU and the kernel built."""
    return all(t.device.type == "cpu" for t in tensors) and kernel() is not None


def reads(X):
    """Whether project and table_grad read X: a float32 or bfloat16 table on the CPU."""
    return X.dtype in (torch.float32, torch.bfloat16) and usable(X)


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _checked(T, W, chosen, rejected, offsets):
    """-> (W contiguous float32, the index kind)."""
    K, W = T.shape[1], W.float().contiguous()
    if W.shape[1] != K or K > 64 or offsets.shape[-1] != len(W) + 1:
        raise ValueError(f"T {tuple(T.shape)}, W {tuple(W.shape)}, offsets {tuple(offsets.shape)}: K <= 64 and N + 1 offsets")
    return W, _kind(chosen, rejected)


def _kind(chosen, rejected):
    """The kernels' suffix for the row indices' dtype."""
    if chosen.dtype != rejected.dtype or chosen.dtype not in (torch.int32, torch.int64):
        raise ValueError("chosen and rejected: both int32 or both int64")
    return "i32" if chosen.dtype == torch.int32 else "i64"


def threads():
    return min(torch.get_num_threads(), 1024)


# a band's rows of T and G in the pair pass at most: 1.25 MB (PersonalLLM's 75,216 rows at K <= 8 in
# 4 bands; on an Intel Xeon with a 2 MB L2, 4 bands took 0.142 s a pass at 10^6 users, 1 band 0.210,
# 8 bands 0.189: each band costs each user its own dL/dw sum)
BAND_BYTES = 5 << 18


def bands(E, K):
    """How many bands the pair pass splits a table of E rows into, for K columns: as few as keep a
    band's rows of T and G (2 x 8 ceil(K / 8) floats a row) within BAND_BYTES, at most 64. 1: none."""
    row_bytes = 2 * 4 * -(-K // 8) * 8
    return max(1, min(64, -(-E * row_bytes // BAND_BYTES)))


def band_pairs(chosen, rejected, offsets, E, B, lib=None):
    """The pairs (chosen, rejected [P] of users' offsets [N + 1]) in band-major order, band b those
    whose chosen row is in b * ceil(E / B) .. (b + 1) * ceil(E / B) (pair_loss takes the bands in
    turn: a band's rows stay in cache) -> (chosen, rejected [P], offsets [B, N + 1]: band b's pairs
    of user u at offsets[b, u]:offsets[b, u + 1], last [N] uint8: each user's last band with pairs).
    New tensors; within a band, the pairs of a user keep their order."""
    kind, N = _kind(chosen, rejected), len(offsets) - 1
    if not (1 < B <= 64) or offsets.dim() != 1:
        raise ValueError(f"B = {B}, offsets {tuple(offsets.shape)}: 2 .. 64 bands of [N + 1] offsets")
    c, r, off = chosen.contiguous(), rejected.contiguous(), offsets.contiguous()   # held: the kernel reads them
    cb, rb = torch.empty_like(c), torch.empty_like(r)
    boff, last = torch.empty(B, N + 1, dtype=torch.int64), torch.empty(N, dtype=torch.uint8)
    getattr(lib or kernel(), f"band_pairs_{kind}")(
        _ptr(c), _ptr(r), _ptr(off), ctypes.c_int64(N), ctypes.c_int64(-(-E // B)), ctypes.c_int(B),
        ctypes.c_int(threads()), _ptr(cb), _ptr(rb), _ptr(boff), _ptr(last))
    return cb, rb, boff, last


def pair_loss(T, logits, chosen, rejected, offsets, user_weight, temperature, last=None, lib=None):
    """-> (nll [] float64, G [E', K], dlogits [N, K]) of sum_p weight_p * -log sigmoid(s_p / temperature),
    s_p = (T[chosen_p] - T[rejected_p]) . softmax(logits[user_p]), user u's pairs
    offsets[u]:offsets[u+1], each of them weighing user_weight[u] ([N]: no [P] weights): the loss
    and its gradients in T and in the logits, in one pass over the pairs (each user's softmax and
    its backward inside it). Or band_pairs' pairs: offsets [B, N + 1] and last [N] (the pass takes
    the bands in turn). lib: a build() of another source (default kernel();
    benchmarks/bench_fused.py compares two)."""
    W, kind = _checked(T, logits, chosen, rejected, offsets)
    (E, K), N, n = T.shape, len(W), threads()
    KP = -(-K // 8) * 8
    Tp = torch.zeros(E, KP)                                                       # [E, KP]: rows of KV v8s
    Tp[:, :K] = T
    if user_weight.shape != (N,):
        raise ValueError(f"user_weight {tuple(user_weight.shape)}: one weight per user, [{N}]")
    B = 1 if offsets.dim() == 1 else len(offsets)
    if B > 1 and (last is None or last.shape != (N,) or last.dtype != torch.uint8):
        raise ValueError(f"offsets of {B} bands: band_pairs' last [{N}] uint8 goes with them")
    # every tensor the kernel reads held in a name until it returns (a temporary's memory is freed
    # as soon as its pointer is taken)
    c, r, off, uw = chosen.contiguous(), rejected.contiguous(), offsets.contiguous(), user_weight.float().contiguous()
    lst = None if B == 1 else last.contiguous()
    scratch = torch.empty(n, E, 2 * KP)                                           # each thread's T and G
    part, G, dW = torch.zeros(n, dtype=torch.float64), torch.empty(E, KP), torch.empty(N, K)
    weights = torch.empty(N, K)                                                   # the users' softmax
    getattr(lib or kernel(), f"pair_loss_{kind}")(
        _ptr(Tp), _ptr(W), _ptr(c), _ptr(r), _ptr(off), ctypes.c_int(B),
        ctypes.c_void_p(None) if lst is None else _ptr(lst), _ptr(uw), ctypes.c_int64(E),
        ctypes.c_int64(K), ctypes.c_int64(KP), ctypes.c_int64(N), ctypes.c_float(1.0 / temperature),
        ctypes.c_int(n), _ptr(scratch), _ptr(part), _ptr(G), _ptr(dW), _ptr(weights))
    return part.sum(), G[:, :K], dW


def pair_hits(T, W, chosen, rejected, offsets, accuracy=False, lib=None):
    """-> hits [N] int64: every user's pairs with (T[chosen_p] - T[rejected_p]) . W[user_p] > 0.
    accuracy=True: their share of the user's pairs instead ([N] float64, NaN for a user without
    pairs), divided in the pass: no [N] temporaries (each is 80 MB of fresh pages at 10^7 users)."""
    W, kind = _checked(T, W, chosen, rejected, offsets)
    T = T.float().contiguous()                                                     # [E, K], unpadded
    out = torch.empty(len(W), dtype=torch.float64 if accuracy else torch.int64)
    hits, acc = (ctypes.c_void_p(None), _ptr(out)) if accuracy else (_ptr(out), ctypes.c_void_p(None))
    c, r, off = chosen.contiguous(), rejected.contiguous(), offsets.contiguous()  # held while the kernel reads them
    getattr(lib or kernel(), f"pair_hits_{kind}")(
        _ptr(T), _ptr(W), _ptr(c), _ptr(r), _ptr(off),
        ctypes.c_int64(T.shape[1]), ctypes.c_int64(len(W)), ctypes.c_int(threads()), hits, acc)
    return out


def _rows(X):
    """-> (X contiguous, its kernel suffix): bfloat16 rows are read as 16-bit words."""
    X = X.contiguous()
    return (X.view(torch.int16), "bf16") if X.dtype == torch.bfloat16 else (X, "f32")


def project(X, V, lib=None):
    """X V [E, K] for a table X [E, F] (float32 or bfloat16, read once, as float32) and V [F, K]."""
    (E, F), K = X.shape, V.shape[1]
    X, kind = _rows(X)
    Vt, out = V.float().t().contiguous(), torch.empty(E, K)                       # [K, F], [E, K]
    getattr(lib or kernel(), f"project_{kind}")(_ptr(X), _ptr(Vt), ctypes.c_int64(E), ctypes.c_int64(F),
                                         ctypes.c_int64(K), ctypes.c_int(threads()), _ptr(out))
    return out


def table_grad(X, G, lib=None):
    """X^T G [F, K] for a table X [E, F] (float32 or bfloat16, read once) and G [E, K]."""
    (E, F), K, n = X.shape, G.shape[1], threads()
    X, kind = _rows(X)
    vw = (lib or kernel()).vector_floats()
    G, scratch, out = G.float().contiguous(), torch.empty(n, K * -(-F // vw) * vw), torch.empty(F, K)
    getattr(lib or kernel(), f"table_grad_{kind}")(_ptr(X), _ptr(G), ctypes.c_int64(E), ctypes.c_int64(F),
                                            ctypes.c_int64(K), ctypes.c_int(n), _ptr(scratch), _ptr(out))
    return out
