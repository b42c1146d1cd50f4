/* N:M masks on CPU in one pass over the weights (see nm_cpu.py).
 *
 * For each group of m consecutive float32 weights, keep the n largest |w|: the rank of entry i
 * counts the entries that beat it (larger, or equal and to its left); NaN counts as -1, below
 * every magnitude. Writes the mask two ways at once: bool (0/1 bytes) and mask - 1 floats
 * (the buffers of lit_eff.sparsity.Mask); returns how many weights were not finite. */
#include <float.h>
#include <math.h>
#include <stdint.h>

static inline float magnitude(float v) {
  v = fabsf(v);
  return v == v ? v : -1.0f;
}

static inline int32_t nonfinite(float v) { return !(fabsf(v) <= FLT_MAX); }

static inline void store(int64_t at, int32_t keep, uint8_t *mask, float *kept_minus_one) {
  mask[at] = (uint8_t)keep;
  kept_minus_one[at] = (float)(keep - 1);
}

/* ranks of the 4 entries of one group from its 6 comparisons (a >= b: a beats b, being left) */
#define RANKS(a, b, c, d, r0, r1, r2, r3)                                  \
  int32_t ab = a >= b, ac = a >= c, ad = a >= d, bc = b >= c, bd = b >= d, cd = c >= d; \
  r0 = 3 - ab - ac - ad;                                                  \
  r1 = ab + 2 - bc - bd;                                                  \
  r2 = ac + bc + 1 - cd;                                                  \
  r3 = ad + bd + cd;

#define BLOCK 64 /* groups of 4 per iteration: fixed-size loops of one type the compiler vectorises */

static int64_t keep_of_4(const float *restrict w, int64_t groups, int32_t n, uint8_t *restrict mask,
                         float *restrict kept_minus_one) {
  int64_t start = 0, bad = 0;
  for (; start + BLOCK <= groups; start += BLOCK) {
    float a[BLOCK], b[BLOCK], c[BLOCK], d[BLOCK];
    int32_t rank[4 * BLOCK], block_bad = 0;
    const float *x = w + 4 * start;
    for (int i = 0; i < 4 * BLOCK; ++i) block_bad += nonfinite(x[i]);
    bad += block_bad;
    for (int i = 0; i < BLOCK; ++i) {
      a[i] = magnitude(x[4 * i]);
      b[i] = magnitude(x[4 * i + 1]);
      c[i] = magnitude(x[4 * i + 2]);
      d[i] = magnitude(x[4 * i + 3]);
    }
    for (int i = 0; i < BLOCK; ++i) {
      RANKS(a[i], b[i], c[i], d[i], rank[4 * i], rank[4 * i + 1], rank[4 * i + 2], rank[4 * i + 3])
    }
    for (int i = 0; i < 4 * BLOCK; ++i) store(4 * start + i, rank[i] < n, mask, kept_minus_one);
  }
  for (int64_t g = start; g < groups; ++g) {
    const float *x = w + 4 * g;
    int32_t r0, r1, r2, r3;
    bad += nonfinite(x[0]) + nonfinite(x[1]) + nonfinite(x[2]) + nonfinite(x[3]);
    float a = magnitude(x[0]), b = magnitude(x[1]), c = magnitude(x[2]), d = magnitude(x[3]);
    RANKS(a, b, c, d, r0, r1, r2, r3)
    store(4 * g, r0 < n, mask, kept_minus_one);
    store(4 * g + 1, r1 < n, mask, kept_minus_one);
    store(4 * g + 2, r2 < n, mask, kept_minus_one);
    store(4 * g + 3, r3 < n, mask, kept_minus_one);
  }
  return bad;
}

/* groups = numel / m; m <= 64 */
int64_t nm_keep(const float *w, int64_t groups, int32_t n, int32_t m, uint8_t *mask, float *kept_minus_one) {
  if (m == 4) return keep_of_4(w, groups, n, mask, kept_minus_one);
  int64_t bad = 0;
  float mag[64];
  for (int64_t g = 0; g < groups; ++g) {
    for (int i = 0; i < m; ++i) {
      mag[i] = magnitude(w[g * m + i]);
      bad += nonfinite(w[g * m + i]);
    }
    for (int i = 0; i < m; ++i) {
      int32_t beaten_by = 0;
      for (int j = 0; j < i; ++j) beaten_by += mag[j] >= mag[i];
      for (int j = i + 1; j < m; ++j) beaten_by += mag[j] > mag[i];
      store(g * m + i, beaten_by < n, mask, kept_minus_one);
    }
  }
  return bad;
}
