/* The exact route's products written once for the vector of simd.h (AVX2 + FMA, NEON, portable C): the
   same arithmetic as kernels.c's AVX-512 code, included by kernels.c when there is no AVX-512.

   Weights are q * d + m with a vmul and a vadd (two roundings, as the float32 model's weights were made);
   products accumulate with vfma. The register tiles are sized for the register file: a q4_1 tile holds
   TILE accumulators and a block's NV weight vectors (AVX2: 8 + 4 of 16 ymm); a panel tile works on half
   a panel (16 outputs, CV vectors) for MRP rows of x (AVX2: 6 x 2 accumulators + 2 weights + 1 broadcast
   of 16 ymm; NEON: 6 x 4 + 4 + 1 of 32 q registers). */
#ifndef LABSERVER_VEC_KERNELS_H
#define LABSERVER_VEC_KERNELS_H

#include "simd.h"

#define CV (16 / VL)  /* vectors in half a panel's row */
#if VL == 4
#define MRP 6
#elif defined(__AVX2__)
#define MRP 6
#else
#define MRP 4
#endif

INLINE void q4_1_tile(const float *x, long K, long N, const uint8_t *q, const float *d, const float *m,
                      float *y, int add, const int tb) {
    vf acc[TILE];
    for (int b = 0; b < tb; b++) acc[b] = vzero();
    for (long g = 0; g < K / QK; g++) {
        prefetch(q + g * QK / 2 + AHEAD);
        vf w[NV];
        q4_vec(q + g * QK / 2, w);
        const vf dv = vset1(d[g]), mv = vset1(m[g]);
        for (int i = 0; i < NV; i++) w[i] = vadd(vmul(w[i], dv), mv);  /* q * d + m, rounded twice */
        const float *xg = x + g * QK;
        for (int b = 0; b < tb; b++)
            for (int i = 0; i < NV; i++) acc[b] = vfma(w[i], vload(xg + b * K + i * VL), acc[b]);
    }
    for (int b = 0; b < tb; b++) store(y + b * N, vsum(acc[b]), add);
}

/* sum_j q_j x_j of one block, in two chains */
INLINE vf q4_1_block(const uint8_t *q, const float *x) {
    vf w[NV];
    q4_vec(q, w);
    vf p0 = vmul(w[0], vload(x)), p1 = vmul(w[1], vload(x + VL));
    for (int i = 2; i < NV; i += 2) p0 = vfma(w[i], vload(x + i * VL), p0), p1 = vfma(w[i + 1], vload(x + (i + 1) * VL), p1);
    return vadd(p0, p1);
}

/* d sum_j q_j x_j + m sum_j x_j per block, as kernels.c's AVX-512 q4_1_row. */
INLINE float q4_1_row(const float *x, const float *sx, long K, const uint8_t *q, const float *d, const float *m) {
    vf acc0 = vzero(), acc1 = vzero(), mx = vzero();
    const long G = K / QK;
    long g = 0;
    for (; g + 1 < G; g += 2) {
        prefetch(q + g * QK / 2 + AHEAD);
        acc0 = vfma(q4_1_block(q + g * QK / 2, x + g * QK), vset1(d[g]), acc0);
        acc1 = vfma(q4_1_block(q + (g + 1) * QK / 2, x + (g + 1) * QK), vset1(d[g + 1]), acc1);
    }
    if (g < G) acc0 = vfma(q4_1_block(q + g * QK / 2, x + g * QK), vset1(d[g]), acc0);
    long i = 0;
    for (; i + VL <= G; i += VL) mx = vfma(vload(m + i), vload(sx + i), mx);
    float tail = 0.0f;
    for (; i < G; i++) tail += m[i] * sx[i];
    return vsum(vadd(vadd(acc0, acc1), mx)) + tail;
}

INLINE vf q8_0_block(const int8_t *q, const float *x) {
    vf w[NV];
    q8_vec(q, w);
    vf p0 = vmul(w[0], vload(x)), p1 = vmul(w[1], vload(x + VL));
    for (int i = 2; i < NV; i += 2) p0 = vfma(w[i], vload(x + i * VL), p0), p1 = vfma(w[i + 1], vload(x + (i + 1) * VL), p1);
    return vadd(p0, p1);
}

INLINE float q8_0_row(const float *x, long K, const int8_t *q, const float *d) {
    vf acc0 = vzero(), acc1 = vzero();
    const long G = K / QK;
    long g = 0;
    for (; g + 1 < G; g += 2) {
        prefetch(q + g * QK + AHEAD);
        acc0 = vfma(q8_0_block(q + g * QK, x + g * QK), vset1(d[g]), acc0);
        acc1 = vfma(q8_0_block(q + g * QK + QK, x + g * QK + QK), vset1(d[g + 1]), acc1);
    }
    if (g < G) acc0 = vfma(q8_0_block(q + g * QK, x + g * QK), vset1(d[g]), acc0);
    return vsum(vadd(acc0, acc1));
}

INLINE void q8_0_tile(const float *x, long K, long N, const int8_t *q, const float *d,
                      float *y, int add, const int tb) {
    vf acc[TILE];
    for (int b = 0; b < tb; b++) acc[b] = vzero();
    for (long g = 0; g < K / QK; g++) {
        prefetch(q + g * QK + AHEAD);
        vf w[NV];
        q8_vec(q + g * QK, w);
        const vf dv = vset1(d[g]);
        for (int i = 0; i < NV; i++) w[i] = vmul(w[i], dv);
        const float *xg = x + g * QK;
        for (int b = 0; b < tb; b++)
            for (int i = 0; i < NV; i++) acc[b] = vfma(w[i], vload(xg + b * K + i * VL), acc[b]);
    }
    for (int b = 0; b < tb; b++) store(y + b * N, vsum(acc[b]), add);
}

/* A panel's blocks into the float32 weights [K, NP] (q * d + m rounded twice). */
INLINE void panel_dequant(const uint8_t *pq, const float *pd, const float *pm, long K, float *buf) {
    for (long g = 0; g < K / QK; g++) {
        vf dv[NV], mv[NV];
        for (int i = 0; i < NV; i++) dv[i] = vload(pd + g * NP + i * VL), mv[i] = vload(pm + g * NP + i * VL);
        for (long k = g * QK; k < (g + 1) * QK; k++) {
            vf w[NV];
            q4_vec(pq + k * NP / 2, w);  /* the 32 columns' q at this k */
            for (int i = 0; i < NV; i++) vstore(buf + k * NP + i * VL, vadd(vmul(w[i], dv[i]), mv[i]));
        }
    }
}

/* `mr` rows of x against half a dequantized panel (16 outputs); `mr` is a literal at every call site. */
INLINE void panel_tile(const float *x, long K, const float *buf, float *y, long N, int add, const int mr) {
    vf acc[MRP][CV];
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < CV; c++) acc[r][c] = vzero();
    for (long k = 0; k < K; k++) {
        vf w[CV];
        for (int c = 0; c < CV; c++) w[c] = vload(buf + k * NP + c * VL);
        for (int r = 0; r < mr; r++) {
            const vf xb = vset1(x[r * K + k]);
            for (int c = 0; c < CV; c++) acc[r][c] = vfma(xb, w[c], acc[r][c]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < CV; c++) {
            float *yc = y + r * N + c * VL;
            vstore(yc, add ? vadd(acc[r][c], vload(yc)) : acc[r][c]);
        }
}

/* Panels p0..p1 of y against all M rows of x. */
static void q4_1_panels(const float *x, long M, long K, const uint8_t *pq, const float *pd, const float *pm,
                        long N, float *y, int add, long p0, long p1) {
    const long G = K / QK;
    float *buf = panel_buffer(K);
    for (long p = p0; p < p1; p++) {
        panel_dequant(pq + p * K * NP / 2, pd + p * G * NP, pm + p * G * NP, K, buf);
        /* rows in tiles of nearly equal size (8 rows: 4 + 4, not 6 + 2): a tile of few rows has too few
           accumulators to hide the latency of its FMAs */
        const long tiles = (M + MRP - 1) / MRP;
        for (int half = 0; half < 2; half++)
            for (long t = 0, r0 = 0; t < tiles; t++) {
                const int mr = (int)(M / tiles + (t < M % tiles));
                const float *xr = x + r0 * K;
                float *yr = y + r0 * N + p * NP + half * 16;
#define PV(R) panel_tile(xr, K, buf + half * 16, yr, N, add, R)
                switch (mr) {
                    case 1: PV(1); break; case 2: PV(2); break; case 3: PV(3); break;
#if MRP > 4
                    case 4: PV(4); break; case 5: PV(5); break;
#endif
                    default: PV(MRP); break;
                }
#undef PV
                r0 += mr;
            }
    }
}

#endif
