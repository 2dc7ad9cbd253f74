/* W4A8: Q4_1 weights times activations quantized to 8 bits, in integer dot products.

   The exact route (kernels.c) turns every weight into float32 and spends one FMA per 16 products. Here
   each block of 32 activations is quantized to q_x * d_x (q_x in -127..127, d_x = max |x| / 127) and
   AVX512-VNNI's vpdpbusd does 64 byte products per instruction:
       sum_k w_k x_k = sum_g [ d_w d_x sum_{k in g} q_w q_x  +  m_w sum_{k in g} x_k ]
   The integer sums are exact and the block's float sum of x is kept as it is. This is llama.cpp's
   arithmetic for Q4_1 (its Q8_1 activations) and not the float32 model's: rounding x costs up to half
   a step of d_x per activation, so logits move and a greedy text can part from float32's. `make bench`
   reports how often it does (the route table's agreement columns).

   Layout (`w4a8_repack`, once at load): panels of NC = 16 output rows, one int32 lane each. For block g
   of a panel, 4 loads of 64 bytes: bytes 4c..4c+3 of load i are bytes 4i..4i+3 of row c's block, i.e.
   q[4i..4i+3] in the low nibbles and q[16+4i..16+4i+3] in the high ones: the 4 consecutive k that
   vpdpbusd sums into one lane. Then the block's 16 d and 16 m.

   The output matrix, Q8_0, goes the same way (w8a8.c).

   The same layout serves every path, each to the same integers: AVX512-VNNI (a panel's 16 rows in one
   register), AVX2 (two halves of 8 rows; vpmaddubsw + vpmaddwd, or AVX-VNNI's 256-bit vpdpbusd), NEON
   with the dot product instructions (four quarters; sdot by lane), and plain C. Their float32 operations
   on the integer sums come in one order too, so a product gives the same bits on every path.

   Left out: other block types, a NEON path for cores without the dot product (they run the plain C). */
#include <math.h>
#include <stdlib.h>

#include "w4a8.h"

void w4a8_repack(const uint8_t *q, const float *d, const float *m, long N, long K, uint8_t *pq, float *pd,
                 float *pm) {
    const long G = K / QK;
#pragma omp parallel for schedule(static)
    for (long p = 0; p < N / NC; p++)
        for (long g = 0; g < G; g++) {
            uint8_t *out = pq + (p * G + g) * 4 * 64;
            for (int i = 0; i < 4; i++)
                for (int c = 0; c < NC; c++)
                    for (int j = 0; j < 4; j++) out[i * 64 + c * 4 + j] = q[(p * NC + c) * K / 2 + g * QK / 2 + 4 * i + j];
            for (int c = 0; c < NC; c++)
                pd[(p * G + g) * NC + c] = d[(p * NC + c) * G + g], pm[(p * G + g) * NC + c] = m[(p * NC + c) * G + g];
        }
}

act8_t act8_alloc(long M, long K) {
    const long G = M * (K / QK);
    act8_t a = {malloc(M * K), malloc(sizeof(float) * G), malloc(sizeof(float) * G), malloc(sizeof(int32_t) * G)};
    return a;
}

void act8_free(act8_t a) { free(a.q), free(a.d), free(a.s), free(a.qs); }

/* q = x / d rounded to nearest (ties to even), d = max |x| / 127, over one block of 32; qs = sum of q. */
static void round8(const float *x, int8_t *q, float *d, int32_t *qs) {
#ifdef __AVX512F__
    const __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
    const float dg = top / 127.0f, inv = dg > 0.0f ? 1.0f / dg : 0.0f;
    const __m512 iv = _mm512_set1_ps(inv);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, iv)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, iv));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(q0));
    _mm_storeu_si128((__m128i *)(q + 16), _mm512_cvtepi32_epi8(q1));
    *qs = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
#else
    float top = 0.0f;
    for (int j = 0; j < QK; j++) top = fabsf(x[j]) > top ? fabsf(x[j]) : top;
    const float dg = top / 127.0f, inv = dg > 0.0f ? 1.0f / dg : 0.0f;
    *qs = 0;
    for (int j = 0; j < QK; j++) q[j] = (int8_t)nearbyintf(x[j] * inv), *qs += q[j];
#endif
    *d = dg;
}

/* The sum of a block, in _mm512_reduce_add_ps's order in both builds. */
static float block_sum(const float *x) {
#ifdef __AVX512F__
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16)));
#else
    float t[16];
    for (int j = 0; j < 16; j++) t[j] = x[j] + x[j + 16];
    for (int w = 8; w >= 1; w /= 2)
        for (int j = 0; j < w; j++) t[j] = t[j + w] + t[j];
    return t[0];
#endif
}

/* The blocks of x [M, K], one phase for every thread of a team. */
void act8_share(const float *x, long M, long K, act8_t a) {
    long b0, b1;
    for (work_t k = phase(M * (K / QK), 16); take(&k, &b0, &b1);)
        for (long b = b0; b < b1; b++) round8(x + b * QK, a.q + b * QK, a.d + b, a.qs + b), a.s[b] = block_sum(x + b * QK);
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
/* Rows r0..r0+mr of the activations against one panel; `mr` is a literal at every call site. */
INLINE void w4a8_tile(act8_t a, long K, long r0, const uint8_t *pq, const float *pd, const float *pm, float *y,
                      long N, int add, const int mr) {
    const long G = K / QK;
    const __m512i low = _mm512_set1_epi8(15), zero = _mm512_setzero_si512();
    __m512 acc[MR8];
    for (int r = 0; r < mr; r++) acc[r] = _mm512_setzero_ps();
    for (long g = 0; g < G; g++) {
        __m512i w[8];  /* w[i]: k = 4i..4i+3, w[i + 4]: k = 16+4i..16+4i+3, for the 16 rows */
        for (int i = 0; i < 4; i++) {
            const __m512i b = _mm512_loadu_si512(pq + (g * 4 + i) * 64);
            w[i] = _mm512_and_si512(b, low), w[i + 4] = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        }
        const __m512 dw = _mm512_loadu_ps(pd + g * NC), mw = _mm512_loadu_ps(pm + g * NC);
        for (int r = 0; r < mr; r++) {
            const int32_t *xq = (const int32_t *)(a.q + (r0 + r) * K + g * QK);
            __m512i s0 = _mm512_dpbusd_epi32(zero, w[0], _mm512_set1_epi32(xq[0]));  /* two chains */
            __m512i s1 = _mm512_dpbusd_epi32(zero, w[1], _mm512_set1_epi32(xq[1]));
            for (int i = 2; i < 8; i += 2) {
                s0 = _mm512_dpbusd_epi32(s0, w[i], _mm512_set1_epi32(xq[i]));
                s1 = _mm512_dpbusd_epi32(s1, w[i + 1], _mm512_set1_epi32(xq[i + 1]));
            }
            const long at = (r0 + r) * G + g;
            const __m512 f = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            acc[r] = _mm512_fmadd_ps(f, _mm512_mul_ps(dw, _mm512_set1_ps(a.d[at])), acc[r]);
            acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(a.s[at]), acc[r]);
        }
    }
    for (int r = 0; r < mr; r++) {
        float *yr = y + (r0 + r) * N;
        _mm512_storeu_ps(yr, add ? _mm512_add_ps(acc[r], _mm512_loadu_ps(yr)) : acc[r]);
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
/* The 4 products of a row's lane (4 consecutive k) summed into one int32: AVX-VNNI does it in one
   instruction; plain AVX2 in two (u8 x s8 pairs into int16, exact: 2 * 15 * 127 per pair, at most 8
   pairs summed = 30480 < 2^15), as llama.cpp's AVX2 code does. */
INLINE void w4a8_tile(act8_t a, long K, long r0, const uint8_t *pq, const float *pd, const float *pm, float *y,
                      long N, int add, const int mr) {
    const long G = K / QK;
    const __m256i low = _mm256_set1_epi8(15);
    for (int h = 0; h < 2; h++) {  /* rows 0-7 of the panel, then 8-15 */
        __m256 acc[MR8];
        for (int r = 0; r < mr; r++) acc[r] = _mm256_setzero_ps();
        for (long g = 0; g < G; g++) {
            __m256i w[8];
            for (int i = 0; i < 4; i++) {
                const __m256i b = _mm256_loadu_si256((const __m256i *)(pq + (g * 4 + i) * 64 + h * 32));
                w[i] = _mm256_and_si256(b, low), w[i + 4] = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
            }
            const __m256 dw = _mm256_loadu_ps(pd + g * NC + h * 8), mw = _mm256_loadu_ps(pm + g * NC + h * 8);
            for (int r = 0; r < mr; r++) {
                const int32_t *xq = (const int32_t *)(a.q + (r0 + r) * K + g * QK);
#ifdef __AVXVNNI__
                __m256i s0 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w[0], _mm256_set1_epi32(xq[0]));
                __m256i s1 = _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), w[1], _mm256_set1_epi32(xq[1]));
                for (int i = 2; i < 8; i += 2) {
                    s0 = _mm256_dpbusd_avx_epi32(s0, w[i], _mm256_set1_epi32(xq[i]));
                    s1 = _mm256_dpbusd_avx_epi32(s1, w[i + 1], _mm256_set1_epi32(xq[i + 1]));
                }
                const __m256i s = _mm256_add_epi32(s0, s1);
#else
                __m256i p = _mm256_maddubs_epi16(w[0], _mm256_set1_epi32(xq[0]));
                for (int i = 1; i < 8; i++) p = _mm256_add_epi16(p, _mm256_maddubs_epi16(w[i], _mm256_set1_epi32(xq[i])));
                const __m256i s = _mm256_madd_epi16(p, _mm256_set1_epi16(1));
#endif
                const long at = (r0 + r) * G + g;
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(a.d[at])), acc[r]);
                acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(a.s[at]), acc[r]);
            }
        }
        for (int r = 0; r < mr; r++) {
            float *yr = y + (r0 + r) * N + h * 8;
            _mm256_storeu_ps(yr, add ? _mm256_add_ps(acc[r], _mm256_loadu_ps(yr)) : acc[r]);
        }
    }
}
#elif defined(__ARM_NEON) && defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
INLINE void w4a8_tile(act8_t a, long K, long r0, const uint8_t *pq, const float *pd, const float *pm, float *y,
                      long N, int add, const int mr) {
    const long G = K / QK;
    for (int h = 0; h < 4; h++) {  /* rows 4h .. 4h + 3 of the panel */
        float32x4_t acc[MR8];
        for (int r = 0; r < mr; r++) acc[r] = vdupq_n_f32(0.0f);
        for (long g = 0; g < G; g++) {
            int8x16_t lo[4], hi[4];
            for (int i = 0; i < 4; i++) {
                const uint8x16_t b = vld1q_u8(pq + (g * 4 + i) * 64 + h * 16);
                lo[i] = vreinterpretq_s8_u8(vandq_u8(b, vdupq_n_u8(15))), hi[i] = vreinterpretq_s8_u8(vshrq_n_u8(b, 4));
            }
            const float32x4_t dw = vld1q_f32(pd + g * NC + h * 4), mw = vld1q_f32(pm + g * NC + h * 4);
            for (int r = 0; r < mr; r++) {
                const int8_t *xq = a.q + (r0 + r) * K + g * QK;
                const int8x16_t x0 = vld1q_s8(xq), x1 = vld1q_s8(xq + 16);
                int32x4_t s = vdupq_n_s32(0);
                DOT4(s, lo, x0);
                DOT4(s, hi, x1);
                const long at = (r0 + r) * G + g;
                acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(s), vmulq_f32(dw, vdupq_n_f32(a.d[at])));
                acc[r] = vfmaq_f32(acc[r], mw, vdupq_n_f32(a.s[at]));
            }
        }
        for (int r = 0; r < mr; r++) {
            float *yr = y + (r0 + r) * N + h * 4;
            vst1q_f32(yr, add ? vaddq_f32(acc[r], vld1q_f32(yr)) : acc[r]);
        }
    }
}
#else
INLINE void w4a8_tile(act8_t a, long K, long r0, const uint8_t *pq, const float *pd, const float *pm, float *y,
                      long N, int add, const int mr) {
    const long G = K / QK;
    for (int r = 0; r < mr; r++)
        for (int c = 0; c < NC; c++) {
            float acc = 0.0f;
            for (long g = 0; g < G; g++) {
                const uint8_t *b = pq + g * 4 * 64 + c * 4;
                const int8_t *xq = a.q + (r0 + r) * K + g * QK;
                int32_t sum = 0;
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++)
                        sum += (b[i * 64 + j] & 15) * xq[4 * i + j] + (b[i * 64 + j] >> 4) * xq[16 + 4 * i + j];
                const long at = (r0 + r) * G + g;
                acc = fmaf((float)sum, pd[g * NC + c] * a.d[at], acc);
                acc = fmaf(pm[g * NC + c], a.s[at], acc);
            }
            float *yc = y + (r0 + r) * N + c;
            *yc = add ? acc + *yc : acc;
        }
}
#endif

/* y = x . W^T (y += with `add`), x given as its blocks `a`, one phase for every thread of a team: the
   threads take panels as they come free, each panel against all M rows. */
void w4a8_share(act8_t a, long M, long K, const void *const *w, long N, float *y, int add) {
    const uint8_t *pq = w[MPQ];
    const float *pd = w[MPD], *pm = w[MPM];
    const long G = K / QK;
    long p, end;
    for (work_t k = phase(N / NC, 1); take(&k, &p, &end);)  /* one panel at a time */
        for (long r0 = 0; r0 < M; r0 += MR8) {
            const int tb = M - r0 < MR8 ? (int)(M - r0) : MR8;
#define T4(R) w4a8_tile(a, K, r0, pq + p * G * 4 * 64, pd + p * G * NC, pm + p * G * NC, y + p * NC, N, add, R)
            EACH_ROWS(T4)
        }
}

/* y = x . W^T (or y +=) by `share`, the activations quantized first. */
void act8_matmul(share_t share, const float *x, long M, long K, const void *const *w, long N, float *y,
                        int add) {
    act8_t a = act8_alloc(M, K);
    long *counters = team_counters_alloc(2);
#pragma omp parallel
    {
        team_begin(counters, 2);
        act8_share(x, M, K, a);
#pragma omp barrier
        share(a, M, K, w, N, y, add);
    }
    act8_free(a), free(counters);
}

/* For a matrix with W4A8 panels (w: its MATRIX pointers). */
void w4a8_matmul(const float *x, long M, long K, const void *const *w, long N, float *y, int add) {
    act8_matmul(w4a8_share, x, M, K, w, N, y, add);
}
