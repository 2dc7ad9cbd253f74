/* What kernels.c and w4a8.c share: the block size, the way work is split between threads, and the
   W4A8 entry points llama_decode calls. */
#ifndef LABSERVER_KERNELS_H
#define LABSERVER_KERNELS_H

#include <stdint.h>

#define QK 32
#define INLINE static inline __attribute__((always_inline))

/* A Q4_1 matrix as the kernels take it: q, d, m, then a second layout of the same blocks in panels
   (pq, pd, pm; NULL when it has none): float32 panels for the exact route, W4A8 panels for that one. */
enum { MQ, MD, MM, MPQ, MPD, MPM, MATRIX };

/* This thread's share [*n0, *n1) of n items, in contiguous ranges (inside an OpenMP parallel region). */
void share(long n, long *n0, long *n1);

/* Activations of M rows quantized to 8 bits per block of 32: q [M, K], scales d and float sums s [M, K/32]. */
typedef struct {
    int8_t *q;
    float *d, *s;
} act8_t;

act8_t act8_alloc(long M, long K);
void act8_free(act8_t a);
void act8_share(const float *x, long M, long K, act8_t a);
void w4a8_share(act8_t a, long M, long K, const void *const *w, long N, float *y, int add);

#endif
