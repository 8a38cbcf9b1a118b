"""NumPy's legacy draws without replacement, compiled: the same numbers, ~20x faster.

A simulated population draws each user's prompts with `np.random.choice(S, m, replace=False)` from
NumPy's global (legacy, MT19937) generator: the data of every seed depends on those exact numbers.
Legacy `choice` shuffles a whole `arange(S)` (Fisher-Yates from the end, each swap index from
`random_interval`: the next 32-bit MT19937 outputs under the smallest bit mask >= i, rejected while
> i) and keeps its first m, so a user costs S - 1 swaps whatever m is: at 10^7 users and PersonalLLM's
9,402 train prompts that is ~10^11 swaps, over an hour as 10^7 Python calls of ~0.25 ms. This module
runs the same algorithm on the same generator state in C (compiled once with the system's `cc` into
~/.cache/lore, loaded with ctypes) and hands the generator's state back to NumPy advanced exactly as
the calls would have left it. Where no compiler is found it is the loop of NumPy calls.

tests/test_core.py checks it against `np.random.choice` (the draws and the generator's state after).
"""
import ctypes

import numpy as np

from lore.fused import build

SOURCE = r"""
#include <stdint.h>
#include <string.h>
#define MT_N 624
#define MT_M 397

typedef struct { uint32_t key[MT_N]; int pos; uint32_t out[MT_N]; } mt19937;

/* the 624 tempered outputs of the current state, in one vectorizable pass */
static void mt_temper(mt19937 *s) {
  for (int i = 0; i < MT_N; i++) {
    uint32_t y = s->key[i];
    y ^= (y >> 11);
    y ^= (y << 7) & 0x9d2c5680U;
    y ^= (y << 15) & 0xefc60000U;
    y ^= (y >> 18);
    s->out[i] = y;
  }
}

/* NumPy's mt19937_gen: the next 624 words of the state */
static void mt_gen(mt19937 *s) {
  uint32_t y; int i;
  for (i = 0; i < MT_N - MT_M; i++) {
    y = (s->key[i] & 0x80000000U) | (s->key[i + 1] & 0x7fffffffU);
    s->key[i] = s->key[i + MT_M] ^ (y >> 1) ^ (-(y & 1) & 0x9908b0dfU);
  }
  for (; i < MT_N - 1; i++) {
    y = (s->key[i] & 0x80000000U) | (s->key[i + 1] & 0x7fffffffU);
    s->key[i] = s->key[i + (MT_M - MT_N)] ^ (y >> 1) ^ (-(y & 1) & 0x9908b0dfU);
  }
  y = (s->key[MT_N - 1] & 0x80000000U) | (s->key[0] & 0x7fffffffU);
  s->key[MT_N - 1] = s->key[MT_M - 1] ^ (y >> 1) ^ (-(y & 1) & 0x9908b0dfU);
  s->pos = 0;
}

/* NumPy's mt19937_next32: the next tempered output (tempered a block at a time) */
static inline uint32_t mt_next(mt19937 *s) {
  if (s->pos == MT_N) { mt_gen(s); mt_temper(s); }
  return s->out[s->pos++];
}

/* NumPy's random_interval for max < 2^32: uniform on [0, max] by masked rejection */
static inline uint32_t interval(mt19937 *s, uint32_t max) {
  uint32_t mask = max, v;
  mask |= mask >> 1; mask |= mask >> 2; mask |= mask >> 4; mask |= mask >> 8; mask |= mask >> 16;
  while ((v = (mt_next(s) & mask)) > max) {}
  return v;
}

/* for each of n users: permutation(S)[:m] as legacy RandomState.choice(S, m, replace=False) */
void choice_without_replacement(uint32_t *key, int32_t *pos, int64_t n, int64_t S, int64_t m,
                                int64_t *out, int64_t *work) {
  mt19937 s;
  memcpy(s.key, key, sizeof(s.key));
  s.pos = *pos;
  mt_temper(&s);
  for (int64_t u = 0; u < n; ++u) {
    for (int64_t i = 0; i < S; ++i) work[i] = i;
    for (int64_t i = S - 1; i >= 1; --i) {
      int64_t j = interval(&s, (uint32_t)i), t = work[j];
      work[j] = work[i];
      work[i] = t;
    }
    memcpy(out + u * m, work, sizeof(int64_t) * m);
  }
  memcpy(key, s.key, sizeof(s.key));
  *pos = s.pos;
}
"""
FLAGS = ["-O3", "-march=native", "-fPIC"]
_LIBRARY = []   # [ctypes library or None], built on first use


def library():
    """The compiled draws (lore.fused.build: once into ~/.cache/lore, keyed by source and flags), or
    None where no compiler is found."""
    if not _LIBRARY:
        _LIBRARY.append(build(SOURCE, FLAGS))
    return _LIBRARY[0]


def choice_without_replacement(n, S, m):
    """[n, m] int64: row i is `np.random.choice(S, m, replace=False)` of the i-th of n calls in a row
    on NumPy's global generator, which is left as those calls leave it."""
    out = np.empty((n, m), dtype=np.int64)                                         # [N, m]
    lib = library()
    name, key, pos, has_gauss, gauss = np.random.get_state()
    if lib is None or name != "MT19937" or S >= 2**32:
        for i in range(n):   # copied row by row: choice(replace=False) returns a view of an [S] permutation
            out[i] = np.random.choice(S, m, replace=False)
        return out
    key = np.ascontiguousarray(key, dtype=np.uint32)
    pos = np.array([pos], dtype=np.int32)
    work = np.empty(S, dtype=np.int64)
    ptr = lambda a: a.ctypes.data_as(ctypes.c_void_p)
    lib.choice_without_replacement(ptr(key), ptr(pos), ctypes.c_int64(n), ctypes.c_int64(S), ctypes.c_int64(m),
                                   ptr(out), ptr(work))
    np.random.set_state((name, key, int(pos[0]), has_gauss, gauss))
    return out
