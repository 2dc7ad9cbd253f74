/* step.c's fixed-order helpers for the paths of simd.h: sums of products in 16 lanes folded in halves,
   e^x and the SiLU, a tail shorter than a vector through the same vector code, padded with zeros. */
#ifndef LABSERVER_VEC_STEP_H
#define LABSERVER_VEC_STEP_H

#include "simd.h"

INLINE float fold16(vf acc[16 / VL]) {
    for (int w = 16 / VL / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) acc[i] = vadd(acc[i], acc[i + w]);
    return vsum(acc[0]);
}

static float dot16_vec(const float *a, const float *b, long n) {
    vf acc[16 / VL];
    for (int c = 0; c < 16 / VL; c++) acc[c] = vzero();
    long i = 0;
    for (; i + 16 <= n; i += 16)
        for (int c = 0; c < 16 / VL; c++) acc[c] = vadd(acc[c], vmul(vload(a + i + c * VL), vload(b + i + c * VL)));
    if (i < n) {
        float ta[16] = {0}, tb[16] = {0};
        memcpy(ta, a + i, sizeof(float) * (n - i)), memcpy(tb, b + i, sizeof(float) * (n - i));
        for (int c = 0; c < 16 / VL; c++) acc[c] = vadd(acc[c], vmul(vload(ta + c * VL), vload(tb + c * VL)));
    }
    return fold16(acc);
}

INLINE vf silu_vec(vf gv, vf uv) { return vmul(vdiv(gv, vadd(vset1(1.0f), vexp(vsub(vzero(), gv)))), uv); }

static void silu_mul_vec(const float *g, const float *u, float *a, long n) {
    long i = 0;
    for (; i + VL <= n; i += VL) vstore(a + i, silu_vec(vload(g + i), vload(u + i)));
    if (i < n) {
        float tg[VL] = {0}, tu[VL] = {0}, ta[VL];
        memcpy(tg, g + i, sizeof(float) * (n - i)), memcpy(tu, u + i, sizeof(float) * (n - i));
        vstore(ta, silu_vec(vload(tg), vload(tu)));
        memcpy(a + i, ta, sizeof(float) * (n - i));
    }
}

static void exp_shifted_vec(float *s, long n, float top) {
    long i = 0;
    for (; i + VL <= n; i += VL) vstore(s + i, vexp(vsub(vload(s + i), vset1(top))));
    if (i < n) {
        float t[VL] = {0};
        memcpy(t, s + i, sizeof(float) * (n - i));
        vstore(t, vexp(vsub(vload(t), vset1(top))));
        memcpy(s + i, t, sizeof(float) * (n - i));
    }
}

#endif
