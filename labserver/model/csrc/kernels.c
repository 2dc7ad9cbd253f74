/* C kernels for the lean llama: matrix products with GGUF-block weights, and a whole decode step.

   1. Matrix products with block-quantized weights, the GGUF layouts Q4_1 and Q8_0, float32 activations.

   y[M, N] = x[M, K] . W[N, K]^T   (or y += ..., with `add`), W stored in blocks of 32 along K:
     Q4_1: w = q * d + m, q in 0..15, two per byte: byte j of a block holds q[j] (low) and q[j + 16] (high);
     Q8_0: w = q * d,     q in -127..127, one per byte.
   A block is dequantized into float32 registers and multiplied with up to TILE rows of x, so a decode
   step of 8 sequences reads each weight once. Rows of W are taken in chunks by the OpenMP threads of the
   caller as they come free (kernels.h; the same libgomp team torch uses, so `torch.set_num_threads` on
   the calling thread applies).
   `q4_1_quantize` / `q8_0_quantize` (quantize.c) make the blocks and count the weights they would not
   reproduce.
   1b. Q4_1 products of more than PANEL_MIN rows (a prefill, a batch) read a second copy of the blocks,
   laid out in panels of 32 output rows, and run as an ordinary float32 register-tiled product.

   2. (step.c) `llama_decode`: one forward of B rows through every layer (decode steps, prompts, chunks of
      prompts, mixed), the same arithmetic as `LeanLlama`'s torch route (rms norm, rotary, a paged KV cache
      read through block tables, grouped-query attention, SiLU MLP), for a
      model whose matrices are all Q4_1 and whose output matrix is Q8_0. Run from Python it would cost
      ~450 small torch calls, each taking and giving back the GIL; here it is one call.

   3. (w4a8.c) The W4A8 route: the same weights times activations quantized to 8 bits, llama.cpp's
      arithmetic, in integer dot products; `llama_decode` runs either route.

   Vector code: AVX-512 here; AVX2 + FMA, NEON and portable C through simd.h's vector of VL lanes
   (vec_kernels.h), chosen when compiled (`kernel_path()` says which). Every path keeps the weights'
   two roundings and accumulates with fused multiply-adds (kernels.py builds with -ffp-contract=off).

   Left out: other block types, K not a multiple of 32 (the Python side keeps such matrices in another
   format). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "kernels.h"
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define TILE 8
/* Bytes ahead of the weights being read to ask the cache for: measured ~30% off a one-sequence step. */
#define AHEAD 4096

INLINE void store(float *y, float s, int add) { *y = add ? *y + s : s; }

#ifdef __AVX512F__
/* One output row n against `tb` rows of x; `tb` is a literal at every call site, so the loop over rows
   is unrolled and the accumulators stay in registers. */
INLINE void q4_1_tile(const float *x, long K, long N, const uint8_t *q, const float *d, const float *m,
                      float *y, int add, const int tb) {
    __m512 acc[TILE];
    for (int b = 0; b < tb; b++) acc[b] = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi32(15);
    for (long g = 0; g < K / QK; g++) {
        _mm_prefetch((const char *)(q + g * QK / 2 + AHEAD), _MM_HINT_T0);
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + g * QK / 2)));
        __m512 dv = _mm512_set1_ps(d[g]), mv = _mm512_set1_ps(m[g]);
        /* q * d + m rounded twice, as the float32 weights were made: no fused multiply-add here. */
        __m512 w0 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(bytes, low)), dv), mv);
        __m512 w1 = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4)), dv), mv);
        const float *xg = x + g * QK;
        for (int b = 0; b < tb; b++) {
            acc[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg + b * K), acc[b]);
            acc[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + b * K + 16), acc[b]);
        }
    }
    for (int b = 0; b < tb; b++) store(y + b * N, _mm512_reduce_add_ps(acc[b]), add);
}

/* One output row against one row of x (a decode step of one sequence), with fewer operations than a tile:
   sum_j (q_j d + m) x_j = d sum_j q_j x_j + m sum_j x_j, with sum_j x_j per block (`sx`) computed once per
   call. Two accumulators for even and odd blocks keep the chain of additions off the critical path. */
INLINE float q4_1_row(const float *x, const float *sx, long K, const uint8_t *q, const float *d, const float *m) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), mx = _mm512_setzero_ps();
    const __m512i low = _mm512_set1_epi32(15);
    const long G = K / QK;
    long g = 0;
    for (; g + 1 < G; g += 2) {
        _mm_prefetch((const char *)(q + g * QK / 2 + AHEAD), _MM_HINT_T0);
        __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + g * QK / 2)));
        __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + g * QK / 2 + QK / 2)));
        __m512 p0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b0, low)), _mm512_loadu_ps(x + g * QK));
        __m512 p1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b1, low)), _mm512_loadu_ps(x + g * QK + QK));
        p0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), _mm512_loadu_ps(x + g * QK + 16), p0);
        p1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4)), _mm512_loadu_ps(x + g * QK + QK + 16), p1);
        acc0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(d[g]), acc0);
        acc1 = _mm512_fmadd_ps(p1, _mm512_set1_ps(d[g + 1]), acc1);
    }
    if (g < G) {
        __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + g * QK / 2)));
        __m512 p0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b0, low)), _mm512_loadu_ps(x + g * QK));
        p0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), _mm512_loadu_ps(x + g * QK + 16), p0);
        acc0 = _mm512_fmadd_ps(p0, _mm512_set1_ps(d[g]), acc0);
    }
    for (long i = 0; i < G; i += 16) {  /* the minima against the block sums, 16 blocks at a time */
        const __mmask16 k = G - i >= 16 ? 0xFFFF : (__mmask16)((1u << (G - i)) - 1);
        mx = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, m + i), _mm512_maskz_loadu_ps(k, sx + i), mx);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc0, acc1), mx));
}

INLINE __m512 q8_0_block(const int8_t *q, const float *x) {
    __m512 p = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q))),
                             _mm512_loadu_ps(x));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16)))),
                           _mm512_loadu_ps(x + 16), p);
}

/* One output row against one row of x: sum_j q_j d x_j = d sum_j q_j x_j, two blocks at a time. */
INLINE float q8_0_row(const float *x, long K, const int8_t *q, const float *d) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const long G = K / QK;
    long g = 0;
    for (; g + 1 < G; g += 2) {
        _mm_prefetch((const char *)(q + g * QK + AHEAD), _MM_HINT_T0);
        acc0 = _mm512_fmadd_ps(q8_0_block(q + g * QK, x + g * QK), _mm512_set1_ps(d[g]), acc0);
        acc1 = _mm512_fmadd_ps(q8_0_block(q + g * QK + QK, x + g * QK + QK), _mm512_set1_ps(d[g + 1]), acc1);
    }
    if (g < G) acc0 = _mm512_fmadd_ps(q8_0_block(q + g * QK, x + g * QK), _mm512_set1_ps(d[g]), acc0);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

INLINE void q8_0_tile(const float *x, long K, long N, const int8_t *q, const float *d,
                      float *y, int add, const int tb) {
    __m512 acc[TILE];
    for (int b = 0; b < tb; b++) acc[b] = _mm512_setzero_ps();
    for (long g = 0; g < K / QK; g++) {
        _mm_prefetch((const char *)(q + g * QK + AHEAD), _MM_HINT_T0);
        __m512 dv = _mm512_set1_ps(d[g]);
        __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + g * QK)))), dv);
        __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + g * QK + 16)))), dv);
        const float *xg = x + g * QK;
        for (int b = 0; b < tb; b++) {
            acc[b] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xg + b * K), acc[b]);
            acc[b] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xg + b * K + 16), acc[b]);
        }
    }
    for (int b = 0; b < tb; b++) store(y + b * N, _mm512_reduce_add_ps(acc[b]), add);
}
#endif


/* ---- 1b. products of many rows: weights re-laid out in panels of NP output rows ----------------------
   With M rows of x, a block dequantized in registers serves at most TILE rows and each output is a
   horizontal sum: ~120 GFLOP/s here, a third of what the FMA units do. For M > PANEL_MIN the weights are
   also kept (`q4_1_repack`, once at load) as panels of NP = 32 output rows, k-major: for each k, 16 bytes
   hold the 32 rows' 4-bit q (row c low, row c + 16 high), and per block 32 d and 32 m. A panel is
   dequantized once into a [K, 32] float buffer (L2-sized), then a register tile of up to MR rows of x
   times 32 outputs runs over k with one broadcast of x and two FMAs per row: 2-2.5x faster for a prefill. */
#define NP 32
#define MR 12
#define PANEL_MIN 4

void q4_1_repack(const uint8_t *q, const float *d, const float *m, long N, long K, uint8_t *pq, float *pd,
                 float *pm) {
    const long G = K / QK;
#pragma omp parallel for schedule(static)
    for (long p = 0; p < N / NP; p++)
        for (long g = 0; g < G; g++) {
            for (int c = 0; c < NP / 2; c++) {
                const uint8_t *lo = q + (p * NP + c) * K / 2 + g * QK / 2, *hi = lo + NP / 2 * K / 2;
                for (int j = 0; j < QK; j++) {
                    const int s = j < QK / 2 ? 0 : 4, b = j % (QK / 2);
                    pq[(p * K + g * QK + j) * (NP / 2) + c] = ((lo[b] >> s) & 15) | (((hi[b] >> s) & 15) << 4);
                }
            }
            for (int c = 0; c < NP; c++)
                pd[(p * G + g) * NP + c] = d[(p * NP + c) * G + g], pm[(p * G + g) * NP + c] = m[(p * NP + c) * G + g];
        }
}

/* This thread's buffer for one dequantized panel, grown on demand and kept. */
static float *panel_buffer(long K) {
    static __thread float *buf = NULL;
    static __thread long cap = 0;
    if (cap < K) {
        free(buf);
        buf = aligned_alloc(64, sizeof(float) * K * NP), cap = K;
    }
    return buf;
}

#ifdef __AVX512F__
INLINE void panel_dequant(const uint8_t *pq, const float *pd, const float *pm, long K, float *buf) {
    const __m512i low = _mm512_set1_epi32(15);
    for (long g = 0; g < K / QK; g++) {
        const __m512 d0 = _mm512_loadu_ps(pd + g * NP), d1 = _mm512_loadu_ps(pd + g * NP + 16);
        const __m512 m0 = _mm512_loadu_ps(pm + g * NP), m1 = _mm512_loadu_ps(pm + g * NP + 16);
        for (long k = g * QK; k < (g + 1) * QK; k++) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(pq + k * NP / 2)));
            /* q * d + m rounded twice, as in q4_1_tile: the panel holds the float32 weights themselves */
            __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, low)), d0);
            __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), d1);
            _mm512_store_ps(buf + k * NP, _mm512_add_ps(w0, m0));
            _mm512_store_ps(buf + k * NP + 16, _mm512_add_ps(w1, m1));
        }
    }
}

/* `mr` rows of x against one dequantized panel; `mr` is a literal at every call site. */
INLINE void panel_tile(const float *x, long K, const float *buf, float *y, long N, int add, const int mr) {
    __m512 a0[MR], a1[MR];
    for (int r = 0; r < mr; r++) a0[r] = a1[r] = _mm512_setzero_ps();
    for (long k = 0; k < K; k++) {
        const __m512 w0 = _mm512_load_ps(buf + k * NP), w1 = _mm512_load_ps(buf + k * NP + 16);
        for (int r = 0; r < mr; r++) {
            const __m512 xb = _mm512_set1_ps(x[r * K + k]);
            a0[r] = _mm512_fmadd_ps(xb, w0, a0[r]);
            a1[r] = _mm512_fmadd_ps(xb, w1, a1[r]);
        }
    }
    for (int r = 0; r < mr; r++) {
        if (add) a0[r] = _mm512_add_ps(a0[r], _mm512_loadu_ps(y + r * N)), a1[r] = _mm512_add_ps(a1[r], _mm512_loadu_ps(y + r * N + 16));
        _mm512_storeu_ps(y + r * N, a0[r]), _mm512_storeu_ps(y + r * N + 16, a1[r]);
    }
}

/* Panels p0..p1 of y against all M rows of x. */
static void q4_1_panels(const float *x, long M, long K, const uint8_t *pq, const float *pd, const float *pm,
                        long N, float *y, int add, long p0, long p1) {
    const long G = K / QK;
    float *buf = panel_buffer(K);
    for (long p = p0; p < p1; p++) {
        panel_dequant(pq + p * K * NP / 2, pd + p * G * NP, pm + p * G * NP, K, buf);
        for (long r0 = 0; r0 < M; r0 += MR) {
            const int mr = M - r0 < MR ? (int)(M - r0) : MR;
            const float *xr = x + r0 * K;
            float *yr = y + r0 * N + p * NP;
#define PT(R) panel_tile(xr, K, buf, yr, N, add, R)
            switch (mr) {
                case 1: PT(1); break; case 2: PT(2); break; case 3: PT(3); break; case 4: PT(4); break;
                case 5: PT(5); break; case 6: PT(6); break; case 7: PT(7); break; case 8: PT(8); break;
                case 9: PT(9); break; case 10: PT(10); break; case 11: PT(11); break; default: PT(12); break;
            }
        }
    }
}
#else
#include "vec_kernels.h"  /* the same products for AVX2, NEON and portable C */
#endif

/* Rows per chunk of a product by rows: ~64 KB of weights, so taking one costs ~1% of reading it. */
static long row_chunk(long row_bytes) { return (65536 + row_bytes - 1) / row_bytes; }

static void block_sums(const float *x, long G, float *sx) {
    for (long g = 0; g < G; g++) {
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int j = 0; j < QK; j++) s += x[g * QK + j];
        sx[g] = s;
    }
}

/* Rows n0..n1 of y; with one row of x, `sx` holds its block sums. */
static void q4_1_rows(const float *x, const float *sx, long M, long K, const uint8_t *q, const float *d,
                      const float *m, long N, float *y, int add, long n0, long n1) {
    const long G = K / QK;
    if (M == 1) {
        for (long n = n0; n < n1; n++) store(y + n, q4_1_row(x, sx, K, q + n * K / 2, d + n * G, m + n * G), add);
        return;
    }
    for (long n = n0; n < n1; n++)
        for (long b0 = 0; b0 < M; b0 += TILE) {
            const int tb = M - b0 < TILE ? (int)(M - b0) : TILE;
#define Q4(T) q4_1_tile(x + b0 * K, K, N, q + n * K / 2, d + n * G, m + n * G, y + b0 * N + n, add, T)
            EACH_TILE(Q4)
        }
}

static void q8_0_rows(const float *x, long M, long K, const int8_t *q, const float *d, long N, float *y, int add,
                      long n0, long n1) {
    const long G = K / QK;
    if (M == 1) {
        for (long n = n0; n < n1; n++) store(y + n, q8_0_row(x, K, q + n * K, d + n * G), add);
        return;
    }
    for (long n = n0; n < n1; n++)
        for (long b0 = 0; b0 < M; b0 += TILE) {
            const int tb = M - b0 < TILE ? (int)(M - b0) : TILE;
#define Q8(T) q8_0_tile(x + b0 * K, K, N, q + n * K, d + n * G, y + b0 * N + n, add, T)
            EACH_TILE(Q8)
        }
}

/* y = x . W^T (y += with `add`), one phase of work for every thread of a team. */
void q4_1_share(const float *x, long M, long K, const void *const *w, long N, float *y, int add) {
    long n0, n1;
    if (M > PANEL_MIN && w[MPQ] != NULL) {
        for (work_t k = phase(N / NP, 1); take(&k, &n0, &n1);)
            q4_1_panels(x, M, K, w[MPQ], w[MPD], w[MPM], N, y, add, n0, n1);
        return;
    }
    const long G = K / QK;
    float sx[G];
    if (M == 1) block_sums(x, G, sx);
    for (work_t k = phase(N, row_chunk(K / 2 + 8 * G)); take(&k, &n0, &n1);)
        q4_1_rows(x, sx, M, K, w[MQ], w[MD], w[MM], N, y, add, n0, n1);
}

void q8_0_share(const float *x, long M, long K, const int8_t *q, const float *d, long N, float *y, int add) {
    long n0, n1;
    for (work_t k = phase(N, row_chunk(K + 4 * K / QK)); take(&k, &n0, &n1);) q8_0_rows(x, M, K, q, d, N, y, add, n0, n1);
}

void q4_1_matmul(const float *x, long M, long K, const void *const *w, long N, float *y, int add) {
    long *counters = team_counters_alloc(1);
#pragma omp parallel
    {
        team_begin(counters, 1);
        q4_1_share(x, M, K, w, N, y, add);
    }
    free(counters);
}

void q8_0_matmul(const float *x, long M, long K, const int8_t *q, const float *d, long N, float *y, int add) {
    long *counters = team_counters_alloc(1);
#pragma omp parallel
    {
        team_begin(counters, 1);
        q8_0_share(x, M, K, q, d, N, y, add);
    }
    free(counters);
}
