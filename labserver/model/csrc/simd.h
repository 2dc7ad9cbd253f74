/* A float vector of VL lanes for the kernels' AVX2, NEON and portable paths (the AVX-512 path has its
   own intrinsics in kernels.c), in the style of ggml's GGML_F32_VEC: the exact-route kernels
   (vec_kernels.h) are written once against these few operations.

   vmul and vadd round once each; vfma(a, b, c) = a * b + c rounded once, only where it is asked for.
   The library is built with -ffp-contract=off (kernels.py): GCC implements vector operators and many
   intrinsics (_mm256_mul_ps, vaddq_f32) as `a * b` and `+`, which it would otherwise fuse, and the
   exact route's weights q * d + m must be rounded twice, as the float32 model's were.

   q4_vec / q8_vec give a block's 32 quantized values as QK / VL float vectors in k order (a Q4_1 block's
   byte j holds q[j] low and q[j + 16] high). Left out: anything not used by the kernels. */
#ifndef LABSERVER_SIMD_H
#define LABSERVER_SIMD_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#include "kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SIMD_PATH "avx2"
#define VL 8
typedef __m256 vf;
INLINE vf vzero(void) { return _mm256_setzero_ps(); }
INLINE vf vset1(float a) { return _mm256_set1_ps(a); }
INLINE vf vload(const float *p) { return _mm256_loadu_ps(p); }
INLINE void vstore(float *p, vf a) { _mm256_storeu_ps(p, a); }
INLINE vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
INLINE vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
INLINE vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
INLINE vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
INLINE vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
INLINE vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
INLINE vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
INLINE vf vfnma(vf a, vf b, vf c) { return _mm256_fnmadd_ps(a, b, c); }  /* c - a * b */
INLINE vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
/* a * 2^n for whole n in [-126, 127]: n + 127 into the exponent field */
INLINE vf vldexp(vf a, vf n) {
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(a, _mm256_castsi256_ps(e));
}
INLINE float vsum(vf a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
INLINE void q4_vec(const uint8_t *q, vf o[QK / VL]) {
    const __m128i b = _mm_loadu_si128((const __m128i *)q);
    const __m256i b0 = _mm256_cvtepu8_epi32(b), b1 = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    const __m256i low = _mm256_set1_epi32(15);
    o[0] = _mm256_cvtepi32_ps(_mm256_and_si256(b0, low)), o[1] = _mm256_cvtepi32_ps(_mm256_and_si256(b1, low));
    o[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), o[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4));
}
INLINE void q8_vec(const int8_t *q, vf o[QK / VL]) {
    for (int i = 0; i < 4; i++)
        o[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * i))));
}
INLINE void prefetch(const void *p) { _mm_prefetch((const char *)p, _MM_HINT_T0); }

#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define SIMD_PATH "neon"
#define VL 4
typedef float32x4_t vf;
INLINE vf vzero(void) { return vdupq_n_f32(0.0f); }
INLINE vf vset1(float a) { return vdupq_n_f32(a); }
INLINE vf vload(const float *p) { return vld1q_f32(p); }
INLINE void vstore(float *p, vf a) { vst1q_f32(p, a); }
INLINE vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
INLINE vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
INLINE vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
INLINE vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
INLINE vf vmin(vf a, vf b) { return vminq_f32(a, b); }
INLINE vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
INLINE vf vfma(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
INLINE vf vfnma(vf a, vf b, vf c) { return vfmsq_f32(c, a, b); }
INLINE vf vround(vf a) { return vrndnq_f32(a); }
INLINE vf vldexp(vf a, vf n) {
    const int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(a, vreinterpretq_f32_s32(e));
}
INLINE float vsum(vf a) {  /* lanes l + 2, then l + 1: the other paths' order (vaddvq_f32 pairs l + 1 first) */
    const float32x2_t s = vadd_f32(vget_low_f32(a), vget_high_f32(a));
    return vget_lane_f32(s, 0) + vget_lane_f32(s, 1);
}
INLINE void q4_vec(const uint8_t *q, vf o[QK / VL]) {
    const uint8x16_t b = vld1q_u8(q), lo = vandq_u8(b, vdupq_n_u8(15)), hi = vshrq_n_u8(b, 4);
    const uint16x8_t h[4] = {vmovl_u8(vget_low_u8(lo)), vmovl_u8(vget_high_u8(lo)), vmovl_u8(vget_low_u8(hi)),
                             vmovl_u8(vget_high_u8(hi))};
    for (int i = 0; i < 4; i++)
        o[2 * i] = vcvtq_f32_u32(vmovl_u16(vget_low_u16(h[i]))), o[2 * i + 1] = vcvtq_f32_u32(vmovl_u16(vget_high_u16(h[i])));
}
INLINE void q8_vec(const int8_t *q, vf o[QK / VL]) {
    for (int i = 0; i < 2; i++) {
        const int8x16_t b = vld1q_s8(q + 16 * i);
        const int16x8_t h0 = vmovl_s8(vget_low_s8(b)), h1 = vmovl_s8(vget_high_s8(b));
        o[4 * i] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h0))), o[4 * i + 1] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(h0)));
        o[4 * i + 2] = vcvtq_f32_s32(vmovl_s16(vget_low_s16(h1))), o[4 * i + 3] = vcvtq_f32_s32(vmovl_s16(vget_high_s16(h1)));
    }
}
INLINE void prefetch(const void *p) { __builtin_prefetch(p); }

#else
/* Portable C: 8 independent lanes the compiler can keep in vector registers of any width. */
#define SIMD_PATH "portable"
#define SIMD_PORTABLE
#define VL 8
typedef struct {
    float v[VL];
} vf;
#define LANES(expr)                                  \
    vf r;                                            \
    for (int i = 0; i < VL; i++) r.v[i] = (expr);    \
    return r
INLINE vf vzero(void) { LANES(0.0f); }
INLINE vf vset1(float a) { LANES(a); }
INLINE vf vload(const float *p) { LANES(p[i]); }
INLINE void vstore(float *p, vf a) { memcpy(p, a.v, sizeof a.v); }
INLINE vf vadd(vf a, vf b) { LANES(a.v[i] + b.v[i]); }
INLINE vf vsub(vf a, vf b) { LANES(a.v[i] - b.v[i]); }
INLINE vf vmul(vf a, vf b) { LANES(a.v[i] * b.v[i]); }
INLINE vf vdiv(vf a, vf b) { LANES(a.v[i] / b.v[i]); }
INLINE vf vmin(vf a, vf b) { LANES(a.v[i] < b.v[i] ? a.v[i] : b.v[i]); }
INLINE vf vmax(vf a, vf b) { LANES(a.v[i] > b.v[i] ? a.v[i] : b.v[i]); }
/* One rounding where the CPU fuses in hardware; else two (a libm fmaf per product would crawl): the
   error bounds the tests use hold for both. */
#ifdef __FP_FAST_FMAF
INLINE vf vfma(vf a, vf b, vf c) { LANES(__builtin_fmaf(a.v[i], b.v[i], c.v[i])); }
INLINE vf vfnma(vf a, vf b, vf c) { LANES(__builtin_fmaf(-a.v[i], b.v[i], c.v[i])); }
#else
INLINE vf vfma(vf a, vf b, vf c) { LANES(a.v[i] * b.v[i] + c.v[i]); }
INLINE vf vfnma(vf a, vf b, vf c) { LANES(c.v[i] - a.v[i] * b.v[i]); }
#endif
/* One rounding always (a libm call without hardware FMA): for the exponential, which must give the same
   bits as the vector paths' (kernels.c: the step's fixed order). */
INLINE vf vfma1(vf a, vf b, vf c) { LANES(__builtin_fmaf(a.v[i], b.v[i], c.v[i])); }
INLINE vf vfnma1(vf a, vf b, vf c) { LANES(__builtin_fmaf(-a.v[i], b.v[i], c.v[i])); }
INLINE vf vround(vf a) { LANES(nearbyintf(a.v[i])); }
INLINE vf vldexp(vf a, vf n) { LANES(ldexpf(a.v[i], (int)n.v[i])); }
INLINE float vsum(vf a) {  /* a tree, as the vector paths reduce */
    for (int w = VL / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) a.v[i] += a.v[i + w];
    return a.v[0];
}
INLINE void q4_vec(const uint8_t *q, vf o[QK / VL]) {
    for (int j = 0; j < QK / 2; j++) o[j / VL].v[j % VL] = (float)(q[j] & 15), o[(j + QK / 2) / VL].v[j % VL] = (float)(q[j] >> 4);
}
INLINE void q8_vec(const int8_t *q, vf o[QK / VL]) {
    for (int j = 0; j < QK; j++) o[j / VL].v[j % VL] = (float)q[j];
}
INLINE void prefetch(const void *p) { __builtin_prefetch(p); }
#undef LANES
#endif

#ifndef SIMD_PORTABLE
#define vfma1 vfma
#define vfnma1 vfnma
#endif
#define NV (QK / VL)  /* vectors per block */

/* e^x, 2^n * p(r) with n = round(x / ln 2) and the Cephes polynomial (as kernels.c's exp16). x is kept
   in [-87, 88] so that 2^n stays a normal float; SiLU only needs e^-g to saturate there. */
INLINE vf vexp(vf x) {
    x = vmin(vmax(x, vset1(-87.0f)), vset1(88.0f));
    const vf n = vround(vmul(x, vset1(1.44269504088896341f)));
    vf r = vfnma1(n, vset1(0.693359375f), x);
    r = vfnma1(n, vset1(-2.12194440e-4f), r);
    vf p = vset1(1.9875691500e-4f);
    p = vfma1(p, r, vset1(1.3981999507e-3f));
    p = vfma1(p, r, vset1(8.3334519073e-3f));
    p = vfma1(p, r, vset1(4.1665795894e-2f));
    p = vfma1(p, r, vset1(1.6666665459e-1f));
    p = vfma1(p, r, vset1(5.0000001201e-1f));
    p = vfma1(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vldexp(p, n);
}

#endif
