/* W8A8: the output matrix, Q8_0 weights, times the same 8-bit activations as w4a8.c.
   llama.cpp's Q8_0 x Q8_0. vpdpbusd multiplies unsigned bytes by signed ones, so the panels hold q_w + 128
   (1..255) and each block's sum is corrected by 128 * sum q_x:  sum (q_w + 128) q_x - 128 sum q_x.
   Layout (`w8a8_repack`): panels of NC rows; per block 8 loads of 64 bytes (load i: k = 4i..4i+3 of the
   16 rows), then the block's 16 d.
   Left out: other block types. */
#include <math.h>
#include <stdlib.h>

#include "w4a8.h"

void w8a8_repack(const int8_t *q, const float *d, long N, long K, uint8_t *pq, float *pd) {
    const long G = K / QK;
#pragma omp parallel for schedule(static)
    for (long p = 0; p < N / NC; p++)
        for (long g = 0; g < G; g++) {
            uint8_t *out = pq + (p * G + g) * 8 * 64;
            for (int i = 0; i < 8; i++)
                for (int c = 0; c < NC; c++)
                    for (int j = 0; j < 4; j++) out[i * 64 + c * 4 + j] = (uint8_t)(q[(p * NC + c) * K + g * QK + 4 * i + j] + 128);
            for (int c = 0; c < NC; c++) pd[(p * G + g) * NC + c] = d[(p * NC + c) * G + g];
        }
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
INLINE void w8a8_tile(act8_t a, long K, long r0, const uint8_t *pq, const float *pd, float *y, long N, int add,
                      const int mr) {
    const long G = K / QK;
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[MR8];
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m512i w[8];
        for (int i = 0; i < 8; i++) w[i] = _mm512_loadu_si512(pq + (g * 8 + i) * 64);
        const __m512 dw = _mm512_loadu_ps(pd + g * NC);
        for (int r = 0; r < mr; r++) {
            const int32_t *xq = (const int32_t *)(a.q + (r0 + r) * K + g * QK);
            __m512i s0 = _mm512_dpbusd_epi32(zero, w[0], _mm512_set1_epi32(xq[0]));
            __m512i s1 = _mm512_dpbusd_epi32(zero, w[1], _mm512_set1_epi32(xq[1]));
            for (int i = 2; i < 8; i += 2) {
                s0 = _mm512_dpbusd_epi32(s0, w[i], _mm512_set1_epi32(xq[i]));
                s1 = _mm512_dpbusd_epi32(s1, w[i + 1], _mm512_set1_epi32(xq[i + 1]));
            }
            const long at = (r0 + r) * G + g;
            const __m512i s = _mm512_sub_epi32(_mm512_add_epi32(s0, s1), _mm512_set1_epi32(128 * a.qs[at]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(a.d[at])), acc[r]);
        }
    }
    for (int r = 0; r < mr; r++) {
        float *yr = y + (r0 + r) * N;
        _mm512_storeu_ps(yr, add ? _mm512_add_ps(acc[r], _mm512_loadu_ps(yr)) : acc[r]);
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
/* The same integer sum: AVX-VNNI as AVX-512's (q_w + 128, corrected); plain AVX2 with the signs moved
   onto x (|q_w| * (x * sign q_w), u8 x s8 pairs into int16: at most 2 * 127 * 127 < 2^15), then int32. */
INLINE void w8a8_tile(act8_t a, long K, long r0, const uint8_t *pq, const float *pd, float *y, long N, int add,
                      const int mr) {
    const long G = K / QK;
    for (int h = 0; h < 2; h++) {
        __m256 acc[MR8];
        for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
        for (long g = 0; g < G; g++) {
            __m256i w[8];
            for (int i = 0; i < 8; i++) w[i] = _mm256_loadu_si256((const __m256i *)(pq + (g * 8 + i) * 64 + h * 32));
#ifndef __AVXVNNI__
            __m256i mag[8];
            for (int i = 0; i < 8; i++)
                w[i] = _mm256_xor_si256(w[i], _mm256_set1_epi8((char)0x80)), mag[i] = _mm256_abs_epi8(w[i]);
#endif
            const __m256 dw = _mm256_loadu_ps(pd + g * NC + h * 8);
            for (int r = 0; r < mr; r++) {
                const int32_t *xq = (const int32_t *)(a.q + (r0 + r) * K + g * QK);
                const long at = (r0 + r) * G + g;
#ifdef __AVXVNNI__
                __m256i s0 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w[0], _mm256_set1_epi32(xq[0]));
                __m256i s1 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w[1], _mm256_set1_epi32(xq[1]));
                for (int i = 2; i < 8; i += 2) {
                    s0 = _mm256_dpbusd_avx_epi32(s0, w[i], _mm256_set1_epi32(xq[i]));
                    s1 = _mm256_dpbusd_avx_epi32(s1, w[i + 1], _mm256_set1_epi32(xq[i + 1]));
                }
                const __m256i s = _mm256_sub_epi32(_mm256_add_epi32(s0, s1), _mm256_set1_epi32(128 * a.qs[at]));
#else
                const __m256i one = _mm256_set1_epi16(1);
                __m256i s = _mm256_setzero_si256();
                for (int i = 0; i < 8; i++) {
                    const __m256i xs = _mm256_sign_epi8(_mm256_set1_epi32(xq[i]), w[i]);
                    s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(mag[i], xs), one));
                }
#endif
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(a.d[at])), acc[r]);
            }
        }
        for (int r = 0; r < mr; r++) {
            float *yr = y + (r0 + r) * N + h * 8;
            _mm256_storeu_ps(yr, add ? _mm256_add_ps(acc[r], _mm256_loadu_ps(yr)) : acc[r]);
        }
    }
}
#elif defined(__ARM_NEON) && defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
/* Signed by signed: the panel's q_w + 128 back to q_w (flip the top bit), no correction needed. */
INLINE void w8a8_tile(act8_t a, long K, long r0, const uint8_t *pq, const float *pd, float *y, long N, int add,
                      const int mr) {
    const long G = K / QK;
    for (int h = 0; h < 4; h++) {
        float32x4_t acc[MR8];
        for (int r = 0; r < mr; r++) acc[r] = vdupq_n_f32(0.0f);
        for (long g = 0; g < G; g++) {
            int8x16_t w[8];
            for (int i = 0; i < 8; i++)
                w[i] = vreinterpretq_s8_u8(veorq_u8(vld1q_u8(pq + (g * 8 + i) * 64 + h * 16), vdupq_n_u8(0x80)));
            const float32x4_t dw = vld1q_f32(pd + g * NC + h * 4);
            for (int r = 0; r < mr; r++) {
                const int8_t *xq = a.q + (r0 + r) * K + g * QK;
                int32x4_t s = vdupq_n_s32(0);
                DOT4(s, w, vld1q_s8(xq));
                DOT4(s, (w + 4), vld1q_s8(xq + 16));
                const long at = (r0 + r) * G + g;
                acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(s), vmulq_f32(dw, vdupq_n_f32(a.d[at])));
            }
        }
        for (int r = 0; r < mr; r++) {
            float *yr = y + (r0 + r) * N + h * 4;
            vst1q_f32(yr, add ? vaddq_f32(acc[r], vld1q_f32(yr)) : acc[r]);
        }
    }
}
#else
INLINE void w8a8_tile(act8_t a, long K, long r0, const uint8_t *pq, const float *pd, float *y, long N, int add,
                      const int mr) {
    const long G = K / QK;
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < NC; c++) {
            float acc = 0.0f;
            for (long g = 0; g < G; g++) {
                const uint8_t *b = pq + g * 8 * 64 + c * 4;
                const int8_t *xq = a.q + (r0 + r) * K + g * QK;
                int32_t sum = 0;
                for (int i = 0; i < 8; i++)
                    for (int j = 0; j < 4; j++) sum += b[i * 64 + j] * xq[4 * i + j];
                const long at = (r0 + r) * G + g;
                acc = fmaf((float)(sum - 128 * a.qs[at]), pd[g * NC + c] * a.d[at], acc);
            }
            float *yc = y + (r0 + r) * N + c;
            *yc = add ? acc + *yc : acc;
        }
}
#endif

/* y = x . W^T (y += with `add`) for the W8A8 panels w = (pq, pd), x given as its blocks `a`; one phase
   for every thread of a team. */
void w8a8_share(act8_t a, long M, long K, const void *const *w, long N, float *y, int add) {
    const uint8_t *pq = w[0];
    const float *pd = w[1];
    const long G = K / QK;
    long p0, p1;
    for (work_t k = phase(N / NC, 4); take(&k, &p0, &p1);)
        for (long p = p0; p < p1; p++)
            for (long r0 = 0; r0 < M; r0 += MR8) {
                const int tb = M - r0 < MR8 ? (int)(M - r0) : MR8;
#define T8(R) w8a8_tile(a, K, r0, pq + p * G * 8 * 64, pd + p * G * NC, y + p * NC, N, add, R)
                EACH_ROWS(T8)
            }
}

void w8a8_matmul(const float *x, long M, long K, const void *const *w, long N, float *y, int add) {
    act8_matmul(w8a8_share, x, M, K, w, N, y, add);
}
