/* N:M masks on CPU in one pass over the weights (see nm_cpu.py).
 *
 * For each group of m consecutive float32 weights, keep the n largest |w|: the rank of entry i
 * counts the entries that beat it (larger, or equal and to its left); NaN counts as -1, below
 * every magnitude. The mask is kept two ways: bool (0/1 bytes) and mask - 1 floats (the buffers
 * of lit_eff.sparsity.Mask, which agree on entry). Only entries whose mask changes are written:
 * from one optimizer step to the next few do, so most of both buffers stays clean in the cache
 * and is never written back to memory. Returns how many weights were not finite. */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline float magnitude(float v) {
  v = fabsf(v);
  return v == v ? v : -1.0f;
}

static inline int32_t nonfinite(float v) { return !(fabsf(v) <= FLT_MAX); }

static inline void store(int64_t at, int32_t keep, uint8_t *mask, float *kept_minus_one) {
  if (mask[at] != keep) {
    mask[at] = (uint8_t)keep;
    kept_minus_one[at] = (float)(keep - 1);
  }
}

/* 16 entries at a time, in vector types GCC and clang lower to what the CPU has */
typedef int32_t i16 __attribute__((vector_size(64)));
typedef uint8_t u16 __attribute__((vector_size(16)));
typedef float f16 __attribute__((vector_size(64)));

#if defined(__clang__)  /* clang has no shuffle by a vector of indices: element by element */
static inline i16 ROTATED(i16 v, i16 index) {
  i16 out;
  for (int i = 0; i < 16; ++i) out[i] = v[index[i]];
  return out;
}
#else
#define ROTATED(v, index) __builtin_shuffle(v, index)
#endif

/* m in {2, 4, 8, 16}, so groups lie inside vectors of 16 entries. Magnitudes are compared as
 * integers: the bits of |w| order like its values (+0 = -0), NaN becomes -1. Each entry meets its
 * group's others by rotating the group by r = 1 .. m-1 places: the entry r places on is to its left
 * where the entry's place + r >= m, and then beats it when equal too: beats = other > key - left,
 * one comparison. Sets *done to the entries handled (a multiple of 16); returns the non-finite. */
static inline __attribute__((always_inline)) int64_t keep_vectors(const float *w, int64_t numel, int32_t n,
                                                                  const int m, uint8_t *mask,
                                                                  float *kept_minus_one, int64_t *done) {
  const int32_t inf = 0x7f800000;
  i16 finite = {0};
  int64_t at = 0;
  for (; at + 16 <= numel; at += 16) {
    i16 key, rank = {0};
    memcpy(&key, w + at, sizeof key);
    key &= 0x7fffffff;                       /* |w| */
    finite -= key < inf;                     /* counts up: comparisons give -1 for true */
    key |= key > inf;                        /* NaN: -1 */
#pragma GCC unroll 16
    for (int r = 1; r < m; ++r) {  /* unrolled: each rotation's indices are constants */
      i16 index, left;
      for (int i = 0; i < 16; ++i) {
        index[i] = (i & ~(m - 1)) | ((i + r) & (m - 1));
        left[i] = (i & (m - 1)) + r >= m;
      }
      rank -= ROTATED(key, index) > key - left;
    }
    i16 keep = (rank < n) & 1;
    u16 bytes = __builtin_convertvector(keep, u16), old;
    uint64_t differ[2];
    memcpy(&old, mask + at, sizeof old);
    old ^= bytes;
    memcpy(differ, &old, sizeof differ);
    if (differ[0] | differ[1]) {
      f16 values = __builtin_convertvector(keep - 1, f16);
      memcpy(mask + at, &bytes, sizeof bytes);
      memcpy(kept_minus_one + at, &values, sizeof values);
    }
  }
  int64_t counted = 0;
  for (int i = 0; i < 16; ++i) counted += finite[i];
  *done = at;
  return at - counted;
}

/* groups = numel / m; m <= 64 */
int64_t nm_keep(const float *w, int64_t groups, int32_t n, int32_t m, uint8_t *mask, float *kept_minus_one) {
  int64_t bad = 0, done = 0;
  switch (m) {  /* one copy of the vector loop per m, its rotations fixed */
    case 2: bad = keep_vectors(w, groups * m, n, 2, mask, kept_minus_one, &done); break;
    case 4: bad = keep_vectors(w, groups * m, n, 4, mask, kept_minus_one, &done); break;
    case 8: bad = keep_vectors(w, groups * m, n, 8, mask, kept_minus_one, &done); break;
    case 16: bad = keep_vectors(w, groups * m, n, 16, mask, kept_minus_one, &done); break;
  }
  float mag[64];
  for (int64_t g = done / m; g < groups; ++g) {  /* the rest, a group at a time */
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

/* The SR-STE term: grad += scale * w where the mask prunes (mask 0), reading the bool mask. */
void add_pruned(float *restrict grad, const float *restrict w, const uint8_t *restrict mask, int64_t numel,
                float scale) {
  for (int64_t i = 0; i < numel; ++i) {
    float term = scale * w[i];
    grad[i] += mask[i] ? 0.0f : term;
  }
}

/* Every layer of a model in one call: count weights, bad[k] for each (one call from Python). */
void nm_keep_all(int64_t count, float *const *w, const int64_t *groups, int32_t n, int32_t m, uint8_t *const *mask,
                 float *const *kept_minus_one, int64_t *bad) {
  for (int64_t k = 0; k < count; ++k) bad[k] = nm_keep(w[k], groups[k], n, m, mask[k], kept_minus_one[k]);
}

void add_pruned_all(int64_t count, float *const *grad, float *const *w, uint8_t *const *mask, const int64_t *numel,
                    float scale) {
  for (int64_t k = 0; k < count; ++k) add_pruned(grad[k], w[k], mask[k], numel[k], scale);
}
