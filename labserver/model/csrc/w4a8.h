/* What w4a8.c and w8a8.c share: the panel width, the register tiles per instruction set, and the
   product that quantizes the activations first. */
#ifndef LABSERVER_W4A8_H
#define LABSERVER_W4A8_H

#include "kernels.h"
#if defined(__AVX2__)
#include <immintrin.h>
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#endif

#define NC 16  /* output rows per panel */
#if defined(__AVX2__) && !(defined(__AVX512VNNI__) && defined(__AVX512F__))
#define MR8 4  /* rows of activations per register tile: 8 weight vectors + 4 accumulators of 16 ymm */
#else
#define MR8 8
#endif

/* A tile of `tb` <= MR8 rows, dispatched to a specialisation with a constant row count. */
#if MR8 == 4
#define EACH_ROWS(call) \
    switch (tb) { case 1: call(1); break; case 2: call(2); break; case 3: call(3); break; default: call(4); break; }
#else
#define EACH_ROWS(call) EACH_TILE(call)
#endif

/* vdotq_laneq_s32: 4 rows' lanes, each the sum of 4 products with the 4 bytes of x in one lane of xv. */
#define DOT4(s, w, xv) \
    s = vdotq_laneq_s32(s, w[0], xv, 0), s = vdotq_laneq_s32(s, w[1], xv, 1), \
    s = vdotq_laneq_s32(s, w[2], xv, 2), s = vdotq_laneq_s32(s, w[3], xv, 3)
typedef void share_t(act8_t a, long M, long K, const void *const *w, long N, float *y, int add);

/* y = x . W^T (or y +=) by `share`, the activations quantized first. */
void act8_matmul(share_t share, const float *x, long M, long K, const void *const *w, long N, float *y, int add);

#endif
