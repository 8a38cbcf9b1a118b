"""The pair work of a table-form step and of scoring, fused into one pass over the pairs (a small
C++ kernel, CPU only, compiled once by torch.utils.cpp_extension and cached).

At 10^6 users a step's pairs (4.7*10^7) index only ~75,000 table rows: the rows' projections
T = X V [E', K] fit in cache, and what is left is the per-pair work. Written as torch ops it is a
dozen passes over [P, K] temporaries (gathers, the margin, the loss, its gradient, index_add_),
each a read and a write of ~1 GB. Here it is one pass: for every user (pairs of a user are
contiguous, so a user is an offset range, not a [P] index), for every pair p of it,

    s_p = (T[chosen_p] - T[rejected_p]) . w_u                          margin
    nll += weight_p * -log sigmoid(s_p / tau)                          loss
    g_p  = -weight_p * sigmoid(-s_p / tau) / tau                       d nll / d s_p
    G[chosen_p] += g_p w_u,  G[rejected_p] -= g_p w_u                  -> dV = X^T G
    dW[u] += g_p (T[chosen_p] - T[rejected_p])                         -> dW

reading each pair's two row indices once. Threads take blocks of users, each with its own G
(summed at the end in thread order: the same threads give the same numbers); sums in float64.
Scoring is the same pass without the loss: the hits of s_p > 0 per user.

Without a C++ compiler (or on CUDA) `kernel()` is None and lore.steps / lore.methods use their
torch-op forms, which give the same numbers to float32 round-off (tests/test_scale.py)."""
import ctypes
import hashlib
import os
import subprocess
import tempfile

import torch

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define L 8        /* T, G rows are padded to KP, a multiple of L floats: one AVX register each */
#define MAXKP 64
#define BLOCK 256  /* pairs of one user whose loss is one vector loop */

/* One pass over the users [0, N) of pairs sorted by user (user u: pairs off[u] .. off[u+1]).
   t [E, KP] (K columns, then zeros), w [N, K], wt [P] float32; c, r [P] int32 or int64.
   Writes the summed loss to *nll, the gradient in T to g_out [E, KP] and in W to dw [N, K].
   Each of the nthreads threads takes one block of users and its own G (scratch [nthreads, E, KP]),
   summed in thread order at the end: the same threads give the same numbers. */
#define PAIR_LOSS(NAME, IDX)                                                                     \
void NAME(const float* t, const float* w, const IDX* c, const IDX* r, const int64_t* off,      \
          const float* wt, int64_t E, int64_t K, int64_t KP, int64_t N, float inv_tau,          \
          int nthreads, float* scratch, double* part, float* g_out, float* dw) {               \
  _Pragma("omp parallel num_threads(nthreads)")                                                 \
  {                                                                                             \
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();                           \
    float* G = scratch + (int64_t)tid * E * KP;                                                 \
    memset(G, 0, sizeof(float) * E * KP);                                                       \
    const int64_t u0 = N * tid / nt, u1 = N * (tid + 1) / nt;                                   \
    double loss = 0.0;                                                                          \
    float s[BLOCK], g[BLOCK];                                                                   \
    for (int64_t u = u0; u < u1; ++u) {                                                         \
      float wu[MAXKP] = {0}, dwu[MAXKP] = {0};                                                  \
      for (int k = 0; k < K; ++k) wu[k] = w[u * K + k];                                         \
      for (int64_t b = off[u]; b < off[u + 1]; b += BLOCK) {                                    \
        const int n = (int)(off[u + 1] - b < BLOCK ? off[u + 1] - b : BLOCK);                   \
        for (int j = 0; j < n; ++j) {                           /* gather -> margin */          \
          const float* tc = t + (int64_t)c[b + j] * KP;                                         \
          const float* tr = t + (int64_t)r[b + j] * KP;                                         \
          float m[L] = {0};                                                                     \
          for (int k0 = 0; k0 < KP; k0 += L)                                                    \
            for (int k = 0; k < L; ++k) m[k] += (tc[k0 + k] - tr[k0 + k]) * wu[k0 + k];         \
          float total = 0.f;                                                                    \
          for (int k = 0; k < L; ++k) total += m[k];                                            \
          s[j] = total;                                                                         \
        }                                                                                       \
        _Pragma("omp simd reduction(+:loss)")                   /* loss -> gradient */          \
        for (int j = 0; j < n; ++j) {                                                           \
          const float x = s[j] * inv_tau;                                                       \
          const float e = expf(-fabsf(x));                      /* exp(-|x|) in (0, 1] */       \
          loss += wt[b + j] * (log1pf(e) + fmaxf(-x, 0.f));     /* -log sigmoid(x) */           \
          g[j] = -wt[b + j] * inv_tau * (x >= 0.f ? e : 1.f) / (1.f + e);  /* sigmoid(-x) */    \
        }                                                                                       \
        for (int j = 0; j < n; ++j) {                           /* scatter */                   \
          float* gc = G + (int64_t)c[b + j] * KP;                                               \
          float* gr = G + (int64_t)r[b + j] * KP;                                               \
          const float* tc = t + (int64_t)c[b + j] * KP;                                         \
          const float* tr = t + (int64_t)r[b + j] * KP;                                         \
          for (int k0 = 0; k0 < KP; k0 += L)                                                    \
            for (int k = 0; k < L; ++k) {                                                       \
              const float gw = g[j] * wu[k0 + k];                                               \
              gc[k0 + k] += gw;                                                                 \
              gr[k0 + k] -= gw;                                                                 \
              dwu[k0 + k] += g[j] * (tc[k0 + k] - tr[k0 + k]);                                  \
            }                                                                                   \
        }                                                                                       \
      }                                                                                         \
      for (int k = 0; k < K; ++k) dw[u * K + k] = dwu[k];                                       \
    }                                                                                           \
    part[tid] = loss;                                                                           \
    _Pragma("omp barrier")                                                                      \
    _Pragma("omp for schedule(static)")                         /* G: the threads' sum */       \
    for (int64_t j = 0; j < E * KP; ++j) {                                                      \
      float total = 0.f;                                                                        \
      for (int i = 0; i < nt; ++i) total += scratch[(int64_t)i * E * KP + j];                   \
      g_out[j] = total;                                                                         \
    }                                                                                           \
  }                                                                                             \
}

/* hits[u]: the pairs of user u with a positive margin (T[c] - T[r]) . W[u] */
#define PAIR_HITS(NAME, IDX)                                                                     \
void NAME(const float* t, const float* w, const IDX* c, const IDX* r, const int64_t* off,      \
          int64_t K, int64_t KP, int64_t N, int nthreads, int64_t* hits) {                      \
  _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                           \
  for (int64_t u = 0; u < N; ++u) {                                                             \
    float wu[MAXKP] = {0};                                                                      \
    for (int k = 0; k < K; ++k) wu[k] = w[u * K + k];                                           \
    int64_t n = 0;                                                                              \
    for (int64_t p = off[u]; p < off[u + 1]; ++p) {                                             \
      const float* tc = t + (int64_t)c[p] * KP;                                                 \
      const float* tr = t + (int64_t)r[p] * KP;                                                 \
      float m[L] = {0};                                                                         \
      for (int k0 = 0; k0 < KP; k0 += L)                                                        \
        for (int k = 0; k < L; ++k) m[k] += (tc[k0 + k] - tr[k0 + k]) * wu[k0 + k];             \
      float total = 0.f;                                                                        \
      for (int k = 0; k < L; ++k) total += m[k];                                                \
      n += total > 0.f;                                                                         \
    }                                                                                           \
    hits[u] = n;                                                                                \
  }                                                                                             \
}

PAIR_LOSS(pair_loss_i32, int32_t)
PAIR_LOSS(pair_loss_i64, int64_t)
PAIR_HITS(pair_hits_i32, int32_t)
PAIR_HITS(pair_hits_i64, int64_t)

/* Row reads of a table X [E, F] in float32 or bfloat16 (the top half of a float32: exact). */
static inline float from_f32(float v) { return v; }
static inline float from_bf16(uint16_t h) { union { uint32_t u; float f; } b = { (uint32_t)h << 16 }; return b.f; }

/* out [E, K] = X V, with vt = V^T [K, F]: each row read once, L floats at a time into all K sums */
#define PROJECT(NAME, TYPE, LOAD)                                                                \
void NAME(const TYPE* x, const float* vt, int64_t E, int64_t F, int64_t K, int nthreads,       \
          float* out) {                                                                         \
  _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                           \
  for (int64_t e = 0; e < E; ++e) {                                                             \
    const TYPE* row = x + e * F;                                                                \
    float acc[MAXKP][L] = {{0}};                                                                \
    int64_t f0 = 0;                                                                             \
    for (; f0 + L <= F; f0 += L) {                                                              \
      float xs[L];                                                                              \
      for (int i = 0; i < L; ++i) xs[i] = LOAD(row[f0 + i]);                                    \
      for (int64_t k = 0; k < K; ++k)                                                           \
        for (int i = 0; i < L; ++i) acc[k][i] += xs[i] * vt[k * F + f0 + i];                    \
    }                                                                                           \
    for (int64_t k = 0; k < K; ++k) {                                                           \
      float total = 0.f;                                                                        \
      for (int i = 0; i < L; ++i) total += acc[k][i];                                           \
      for (int64_t f = f0; f < F; ++f) total += LOAD(row[f]) * vt[k * F + f];                   \
      out[e * K + k] = total;                                                                   \
    }                                                                                           \
  }                                                                                             \
}

/* out [F, K] = X^T G for G [E, K]: threads take blocks of rows, each adding into its own
   G^T X [K, F] (scratch [nthreads, K, F]), summed in thread order */
#define TABLE_GRAD(NAME, TYPE, LOAD)                                                             \
void NAME(const TYPE* x, const float* g, int64_t E, int64_t F, int64_t K, int nthreads,        \
          float* scratch, float* out) {                                                         \
  _Pragma("omp parallel num_threads(nthreads)")                                                 \
  {                                                                                             \
    const int tid = omp_get_thread_num(), nt = omp_get_num_threads();                           \
    float* acc = scratch + (int64_t)tid * K * F;                                                \
    memset(acc, 0, sizeof(float) * K * F);                                                      \
    for (int64_t e = E * tid / nt; e < E * (tid + 1) / nt; ++e) {                               \
      const TYPE* row = x + e * F;                                                              \
      for (int64_t k = 0; k < K; ++k) {                         /* row read from L1 K times */ \
        const float gk = g[e * K + k];                                                          \
        float* a = acc + k * F;                                                                 \
        for (int64_t f = 0; f < F; ++f) a[f] += gk * LOAD(row[f]);                              \
      }                                                                                         \
    }                                                                                           \
    _Pragma("omp barrier")                                                                      \
    _Pragma("omp for schedule(static)")                                                         \
    for (int64_t j = 0; j < F * K; ++j) {                                                       \
      float total = 0.f;                                                                        \
      for (int i = 0; i < nt; ++i) total += scratch[(int64_t)i * K * F + (j % K) * F + j / K];  \
      out[j] = total;                                                                           \
    }                                                                                           \
  }                                                                                             \
}

PROJECT(project_f32, float, from_f32)
PROJECT(project_bf16, uint16_t, from_bf16)
TABLE_GRAD(table_grad_f32, float, from_f32)
TABLE_GRAD(table_grad_bf16, uint16_t, from_bf16)
"""

# -ffast-math lets the loss loop call glibc's vector expf/log1pf. It is given to the compile only:
# at the link it would add crtfastmath.o, which switches the whole process to flush-to-zero.
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC"]
_KERNEL = []   # [ctypes library or None], built on first use


def kernel():
    """The compiled kernel (a ctypes library, built once into ~/.cache/lore keyed by its source and
    flags: ~1 s of gcc), or None where it cannot be built (no compiler): then the torch-op forms."""
    if not _KERNEL:
        key = hashlib.sha256((SOURCE + " ".join(FLAGS)).encode()).hexdigest()[:16]
        path = os.path.join(os.path.expanduser("~"), ".cache", "lore", f"fused_{key}.so")
        try:
            if not os.path.exists(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with tempfile.TemporaryDirectory() as tmp:
                    c_file, o_file, so_file = (os.path.join(tmp, f"fused.{e}") for e in ("c", "o", "so"))
                    with open(c_file, "w") as f:
                        f.write(SOURCE)
                    cc = os.environ.get("CC", "cc")
                    subprocess.run([cc, *FLAGS, "-c", c_file, "-o", o_file], check=True, capture_output=True)
                    subprocess.run([cc, "-shared", "-fopenmp", o_file, "-o", so_file, "-lm"], check=True,
                                   capture_output=True)
                    os.replace(so_file, path)   # atomic: a concurrent build never loads half a file
            _KERNEL.append(ctypes.CDLL(path))
        except (OSError, subprocess.CalledProcessError):
            _KERNEL.append(None)
    return _KERNEL[0]


def usable(*tensors):
    """Whether the fused kernel applies: every tensor on the CPU and the kernel built."""
    return all(t.device.type == "cpu" for t in tensors) and kernel() is not None


def reads(X):
    """Whether project and table_grad read X: a float32 or bfloat16 table on the CPU."""
    return X.dtype in (torch.float32, torch.bfloat16) and usable(X)


def user_offsets(user, n_users):
    """offsets [N + 1] int64 of pairs sorted by user (user u's pairs are offsets[u]:offsets[u+1]),
    or None when the users are not in increasing order."""
    if len(user) > 1 and not bool((user[1:] >= user[:-1]).all()):
        return None
    offsets = torch.zeros(n_users + 1, dtype=torch.int64, device=user.device)
    torch.cumsum(torch.bincount(user, minlength=n_users), 0, out=offsets[1:])
    return offsets


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr())


def _checked(T, W, chosen, rejected, offsets):
    """-> (T padded to [E, KP], W contiguous, KP, the index kind)."""
    (E, K), W = T.shape, W.float().contiguous()
    if W.shape[1] != K or K > 64 or len(offsets) != len(W) + 1:
        raise ValueError(f"T {tuple(T.shape)}, W {tuple(W.shape)}, offsets {len(offsets)}: K <= 64 and N + 1 offsets")
    if chosen.dtype != rejected.dtype or chosen.dtype not in (torch.int32, torch.int64):
        raise ValueError("chosen and rejected: both int32 or both int64")
    KP = -(-K // 8) * 8
    Tp = torch.zeros(E, KP)
    Tp[:, :K] = T
    return Tp, W, KP, "i32" if chosen.dtype == torch.int32 else "i64"


def threads():
    return min(torch.get_num_threads(), 1024)


def pair_loss(T, W, chosen, rejected, offsets, weight, temperature):
    """-> (nll [] float64, G [E', K], dW [N, K]) of sum_p weight_p * -log sigmoid(s_p / temperature),
    s_p = (T[chosen_p] - T[rejected_p]) . W[user_p], user u's pairs offsets[u]:offsets[u+1]: the
    loss and its gradients in T and W, in one pass over the pairs."""
    Tp, W, KP, kind = _checked(T, W, chosen, rejected, offsets)
    (E, K), N, n = T.shape, len(W), threads()
    scratch = torch.empty(n, E, KP)                                               # each thread's G
    part, G, dW = torch.zeros(n, dtype=torch.float64), torch.empty(E, KP), torch.empty(N, K)
    getattr(kernel(), f"pair_loss_{kind}")(
        _ptr(Tp), _ptr(W), _ptr(chosen.contiguous()), _ptr(rejected.contiguous()), _ptr(offsets),
        _ptr(weight.float().contiguous()), ctypes.c_int64(E), ctypes.c_int64(K), ctypes.c_int64(KP),
        ctypes.c_int64(N), ctypes.c_float(1.0 / temperature), ctypes.c_int(n), _ptr(scratch), _ptr(part),
        _ptr(G), _ptr(dW))
    return part.sum(), G[:, :K], dW


def pair_hits(T, W, chosen, rejected, offsets):
    """-> hits [N] int64: every user's pairs with (T[chosen_p] - T[rejected_p]) . W[user_p] > 0."""
    Tp, W, KP, kind = _checked(T, W, chosen, rejected, offsets)
    hits = torch.empty(len(W), dtype=torch.int64)
    getattr(kernel(), f"pair_hits_{kind}")(
        _ptr(Tp), _ptr(W), _ptr(chosen.contiguous()), _ptr(rejected.contiguous()), _ptr(offsets),
        ctypes.c_int64(T.shape[1]), ctypes.c_int64(KP), ctypes.c_int64(len(W)), ctypes.c_int(threads()), _ptr(hits))
    return hits


def _rows(X):
    """-> (X contiguous, its kernel suffix): bfloat16 rows are read as 16-bit words."""
    X = X.contiguous()
    return (X.view(torch.int16), "bf16") if X.dtype == torch.bfloat16 else (X, "f32")


def project(X, V):
    """X V [E, K] for a table X [E, F] (float32 or bfloat16, read once, as float32) and V [F, K]."""
    (E, F), K = X.shape, V.shape[1]
    X, kind = _rows(X)
    Vt, out = V.float().t().contiguous(), torch.empty(E, K)                       # [K, F], [E, K]
    getattr(kernel(), f"project_{kind}")(_ptr(X), _ptr(Vt), ctypes.c_int64(E), ctypes.c_int64(F),
                                         ctypes.c_int64(K), ctypes.c_int(threads()), _ptr(out))
    return out


def table_grad(X, G):
    """X^T G [F, K] for a table X [E, F] (float32 or bfloat16, read once) and G [E, K]."""
    (E, F), K, n = X.shape, G.shape[1], threads()
    X, kind = _rows(X)
    G, scratch, out = G.float().contiguous(), torch.empty(n, K, F), torch.empty(F, K)
    getattr(kernel(), f"table_grad_{kind}")(_ptr(X), _ptr(G), ctypes.c_int64(E), ctypes.c_int64(F),
                                            ctypes.c_int64(K), ctypes.c_int(n), _ptr(scratch), _ptr(out))
    return out
