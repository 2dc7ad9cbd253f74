/* C kernels for the lean llama: matrix products with GGUF-block weights, and a whole decode step.

   1. Matrix products with block-quantized weights, the GGUF layouts Q4_1 and Q8_0, float32 activations.

   y[M, N] = x[M, K] . W[N, K]^T   (or y += ..., with `add`), W stored in blocks of 32 along K:
     Q4_1: w = q * d + m, q in 0..15, two per byte: byte j of a block holds q[j] (low) and q[j + 16] (high);
     Q8_0: w = q * d,     q in -127..127, one per byte.
   A block is dequantized into float32 registers and multiplied with up to TILE rows of x, so a decode
   step of 8 sequences reads each weight once. Rows of W are taken in chunks by the OpenMP threads of the
   caller as they come free (kernels.h; the same libgomp team torch uses, so `torch.set_num_threads` on
   the calling thread applies).
   `q4_1_quantize` / `q8_0_quantize` make the blocks and count the weights they would not reproduce.
   1b. Q4_1 products of more than PANEL_MIN rows (a prefill, a batch) read a second copy of the blocks,
   laid out in panels of 32 output rows, and run as an ordinary float32 register-tiled product.

   2. `llama_decode`: one decode step of B sequences through every layer (or a prefill of prompts), the
      same arithmetic as `LeanLlama.decode_step` (rms norm, rotary, a slot KV cache, grouped-query attention, SiLU MLP), for a
      model whose matrices are all Q4_1 and whose output matrix is Q8_0. Run from Python it would cost
      ~450 small torch calls, each taking and giving back the GIL; here it is one call.

   3. (w4a8.c) The W4A8 route: the same weights times activations quantized to 8 bits, llama.cpp's
      arithmetic, in integer dot products; `llama_decode` runs either route.

   Vector code: AVX-512 here; AVX2 + FMA, NEON and portable C through simd.h's vector of VL lanes
   (vec_kernels.h), chosen when compiled (`kernel_path()` says which). Every path keeps the weights'
   two roundings and accumulates with fused multiply-adds (kernels.py builds with -ffp-contract=off).

   Left out: other block types, K not a multiple of 32 (the Python side keeps such matrices in another
   format), a prefill that continues a filled slot. */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
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
INLINE float clamp(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

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

/* Which vector code this library was compiled to (kernels.py's `path()`), and what the integer route
   of w4a8.c uses and whether the kernels run on OpenMP threads (`features()`). */
const char *kernel_path(void) {
#ifdef __AVX512F__
    return "avx512";
#else
    return SIMD_PATH;
#endif
}

const char *kernel_features(void) {
    return ""
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
           "avx512vnni "
#elif defined(__AVXVNNI__)
           "avxvnni "
#endif
#if defined(__ARM_FEATURE_DOTPROD)
           "dotprod "
#endif
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
           "fma "
#endif
#ifdef _OPENMP
           "openmp"
#else
           "single-thread"
#endif
        ;
}

/* ---- the threads' work: phases cut into chunks (kernels.h) ---------------------------------------- */
static __thread long *team_counters, team_phase, team_count;

/* Counters for `phases` phases of a team of up to omp_get_max_threads() threads (the width, in [0]). */
long *team_counters_alloc(long phases) {
    const long width = omp_get_max_threads();
    long *counters = calloc((phases * width + 1) * PAD, sizeof(long));
    if (counters != NULL) counters[0] = width;
    return counters;
}

void team_begin(long *counters, long phases) {
    team_counters = counters, team_phase = 0, team_count = counters ? phases : 0;
}

work_t phase(long n, long chunk) {
    work_t w = {n, chunk < 1 ? 1 : chunk, NULL, 0};
    if (team_phase < team_count && omp_get_num_threads() <= team_counters[0])
        w.next = team_counters + (team_phase++ * team_counters[0] + 1) * PAD;
    return w;
}

/* Thread t owns the t-th contiguous part of the items and takes its chunks in order (the weights stream
   through it as with a static split); a thread whose part is done takes chunks from the next parts. */
int take(work_t *w, long *i0, long *i1) {
    const long t = omp_get_thread_num(), nt = omp_get_num_threads();
    if (w->next == NULL) {  /* out of counters: this thread's part, once */
        *i0 = w->n * t / nt, *i1 = w->n * (t + 1) / nt;
        return !w->once++ && *i1 > *i0;
    }
    for (long o = 0; o < nt; o++) {
        const long u = (t + o) % nt, end = w->n * (u + 1) / nt;
        /* relaxed: the barriers after each phase order the data */
        *i0 = w->n * u / nt + __atomic_fetch_add(w->next + u * PAD, 1, __ATOMIC_RELAXED) * w->chunk;
        if (*i0 < end) {
            *i1 = *i0 + w->chunk < end ? *i0 + w->chunk : end;
            return 1;
        }
    }
    return 0;
}

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
static void q4_1_share(const float *x, long M, long K, const void *const *w, long N, float *y, int add) {
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

static void q8_0_share(const float *x, long M, long K, const int8_t *q, const float *d, long N, float *y, int add) {
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

static float absmax(const float *x, long n) {
    float top = 0.0f;
    for (long i = 0; i < n; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
    return top;
}

/* Quantize w [N, K] into the blocks above (rounding half to even, as torch.round does); return how many
   weights the blocks miss by more than `rtol` times their row's largest magnitude (0: the blocks are w). */
long q4_1_quantize(const float *w, long N, long K, uint8_t *q, float *d, float *m, float rtol) {
    long missed = 0;
#pragma omp parallel for schedule(static) reduction(+ : missed)
    for (long n = 0; n < N; n++) {
        const float *row = w + n * K, big = absmax(row, K);
        for (long g = 0; g < K / QK; g++) {
            const float *x = row + g * QK;
            float lo = x[0], hi = x[0];
            for (int j = 1; j < QK; j++) lo = x[j] < lo ? x[j] : lo, hi = x[j] > hi ? x[j] : hi;
            const float dg = (hi - lo) / 15.0f, inv = dg > 0.0f ? dg : 1e-30f;
            uint8_t *qg = q + n * K / 2 + g * QK / 2;
            for (int j = 0; j < QK / 2; j++) {
                float a = clamp(nearbyintf((x[j] - lo) / inv), 0.0f, 15.0f);
                float b = clamp(nearbyintf((x[j + QK / 2] - lo) / inv), 0.0f, 15.0f);
                qg[j] = (uint8_t)a | (uint8_t)((uint8_t)b << 4);
                missed += fabsf(a * dg + lo - x[j]) > rtol * big;
                missed += fabsf(b * dg + lo - x[j + QK / 2]) > rtol * big;
            }
            d[n * (K / QK) + g] = dg, m[n * (K / QK) + g] = lo;
        }
    }
    return missed;
}

long q8_0_quantize(const float *w, long N, long K, int8_t *q, float *d, float rtol) {
    long missed = 0;
#pragma omp parallel for schedule(static) reduction(+ : missed)
    for (long n = 0; n < N; n++) {
        const float *row = w + n * K, big = absmax(row, K);
        for (long g = 0; g < K / QK; g++) {
            const float *x = row + g * QK;
            const float dg = absmax(x, QK) / 127.0f, inv = dg > 0.0f ? dg : 1e-30f;
            for (int j = 0; j < QK; j++) {
                float a = clamp(nearbyintf(x[j] / inv), -127.0f, 127.0f);
                q[n * K + g * QK + j] = (int8_t)a;
                missed += fabsf(a * dg - x[j]) > rtol * big;
            }
            d[n * (K / QK) + g] = dg;
        }
    }
    return missed;
}

/* ---- 2. one decode step ------------------------------------------------------------------------------ */

enum { LN1, QKV, O = QKV + MATRIX, LN2 = O + MATRIX, GU, DOWN = GU + MATRIX, PER_LAYER = DOWN + MATRIX };

/* The step's arithmetic outside the products runs in one fixed order on every path, so that with the
   W4A8 route (integer products, w4a8.c) a step gives the same bits on AVX-512, AVX2, NEON and portable C:
   an activation that a different order rounds differently would land on the other side of an 8-bit
   rounding boundary now and then. Sums of n terms: 16 lanes (lane l: terms l, l + 16, ..., each product
   rounded, then added), folded in halves (lanes l + 8, then l + 4, l + 2, l + 1): the order of
   _mm512_reduce_add_ps. e^x: vexp's / exp16's operations, lane by lane. */
#ifdef __AVX512F__
INLINE __mmask16 first(long n) { return n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1); }

static float dot16(const float *a, const float *b, long n) {
    __m512 acc = _mm512_setzero_ps();
    for (long i = 0; i < n; i += 16)
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_maskz_loadu_ps(first(n - i), a + i),
                                               _mm512_maskz_loadu_ps(first(n - i), b + i)));
    return _mm512_reduce_add_ps(acc);
}

/* exp on 16 lanes: 2^n * p(r), n = round(x / ln 2), the Cephes polynomial for p (within 2 ulp of expf);
   x in [-87, 88], as simd.h's vexp. */
INLINE __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* a = silu(g) * u over n values (the MLP's activation: g / (1 + e^-g) * u). */
static void silu_mul(const float *g, const float *u, float *a, long n) {
    for (long i = 0; i < n; i += 16) {
        const __mmask16 k = first(n - i);
        const __m512 gv = _mm512_maskz_loadu_ps(k, g + i), e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_mask_storeu_ps(a + i, k, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                                      _mm512_maskz_loadu_ps(k, u + i)));
    }
}

/* s = e^(s - top) in place */
static void exp_shifted(float *s, long n, float top) {
    for (long i = 0; i < n; i += 16) {
        const __mmask16 k = first(n - i);
        _mm512_mask_storeu_ps(s + i, k, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + i), _mm512_set1_ps(top))));
    }
}
#else
#define dot16 dot16_vec
#define silu_mul silu_mul_vec
#define exp_shifted exp_shifted_vec
#endif

static void rms_norm(const float *x, const float *w, float *out, long B, long D, float eps) {
    for (long b = 0; b < B; b++) {
        const float *xb = x + b * D;
        const float r = 1.0f / sqrtf(dot16(xb, xb, D) / D + eps);
        for (long i = 0; i < D; i++) out[b * D + i] = xb[i] * r * w[i];
    }
}

/* x * cos + rotate_half(x) * sin on `n` heads in place; `sin` has rotate_half's signs folded in. */
static void rotary(float *x, long n, long Dh, const float *cos, const float *sin) {
    const long half = Dh / 2;
    for (long h = 0; h < n; h++, x += Dh) {
        float tmp[Dh];
        for (long j = 0; j < half; j++) tmp[j] = x[j] * cos[j] + x[j + half] * sin[j];
        for (long j = half; j < Dh; j++) tmp[j] = x[j] * cos[j] + x[j - half] * sin[j];
        for (long j = 0; j < Dh; j++) x[j] = tmp[j];
    }
}

/* out [Dh] = softmax(q . k_t * scale) . v_t over the n keys and values in k, v ([n, Dh] each). */
static void attend(const float *q, const float *k, const float *v, long n, long Dh, float scale, float *out) {
    float scores[n], top = -INFINITY, sum = 0.0f;
    for (long t = 0; t < n; t++) {
        scores[t] = dot16(q, k + t * Dh, Dh) * scale;
        top = scores[t] > top ? scores[t] : top;
    }
    exp_shifted(scores, n, top);
    for (long t = 0; t < n; t++) sum += scores[t];
    for (long j = 0; j < Dh; j++) out[j] = 0.0f;
    for (long t = 0; t < n; t++) {
        const float pt = scores[t] / sum, *vt = v + t * Dh;
        for (long j = 0; j < Dh; j++) out[j] += pt * vt[j];
    }
}

/* A barrier for the threads of one parallel region that spins (then yields) instead of sleeping: the
   step's ~150 synchronisations then cost ~1 us each, even when libgomp has gone to futex-sleeping
   workers (it does once the process has more OpenMP threads than cores; notebook 3 shows the cost). */
typedef struct {
    atomic_int count, phase;
} barrier_t;

static void barrier(barrier_t *b, int nt) {
    const int phase = atomic_load(&b->phase);
    if (atomic_fetch_add(&b->count, 1) == nt - 1) {
        atomic_store(&b->count, 0);
        atomic_store(&b->phase, phase + 1);
        return;
    }
    for (long spins = 0; atomic_load(&b->phase) == phase; spins++) {
        if (spins > 2000) sched_yield();  /* the other thread lost its core: give it ours */
        cpu_relax();
    }
}

/* One of a layer's products, called by every thread: float32 activations (q4_1_share), or with `a8` (the
   W4A8 route) the rows quantized first, each thread its share of blocks, and the integer product. */
static void product(const float *x, long B, long K, const void *const *w, long N, float *y, int add,
                    const act8_t *a8, barrier_t *bar, int nt) {
    if (a8 == NULL) {
        q4_1_share(x, B, K, w, N, y, add);
        return;
    }
    act8_share(x, B, K, *a8);
    barrier(bar, nt);
    w4a8_share(*a8, B, K, w, N, y, add);
}

/* w: PER_LAYER pointers per layer (a norm, or a matrix's MATRIX pointers), then the final norm, the
   output matrix's Q8_0 blocks and scales, and its W8A8 panels and their scales (NULL: none).
   dims: layers, D, heads, kv_heads, Dh, I (MLP width), V, B, cache slots S, cache length T, the number
   of rows listed in `out_rows` (the rows whose logits are wanted; NULL: every row's), and 1 for the W4A8
   route (the matrices' panels are then w4a8.c's and the activations go through 8 bits, also the output
   matrix's when it has W8A8 panels).
   A prefill is the same computation: B = the prompt's positions, all in one slot, pos = 0 .. B-1; each
   attends to the keys up to its own position (written for every row before any row attends). Several
   prompts prefill together as one such run of rows each, in their own slots, with their last rows in
   `out_rows`.
   kc, vc: [layers, S, kv_heads, T, Dh]; the new keys go to position pos[b] of slot slots[b], and
   sequence b attends to positions 0..pos[b]. x [B, D]: the tokens' embeddings, overwritten.
   One parallel region for the whole step: thread 0 does the small serial parts, the threads take the
   chunks of every product, of the attention heads and of the activation (kernels.h), and spin barriers
   separate the phases. */
void llama_decode(const void **w, const long *dims, float eps, float *x, const long *pos, const long *slots,
                  const float *cos, const float *sin, float *kc, float *vc, const long *out_rows, float *logits) {
    const long L = dims[0], D = dims[1], H = dims[2], Hkv = dims[3], Dh = dims[4], I = dims[5], V = dims[6];
    const long B = dims[7], S = dims[8], T = dims[9], group = H / Hkv, Nqkv = (H + 2 * Hkv) * Dh;
    float *h = malloc(sizeof(float) * B * D), *qkv = malloc(sizeof(float) * B * Nqkv);
    float *att = malloc(sizeof(float) * B * H * Dh), *gu = malloc(sizeof(float) * B * 2 * I);
    float *act = malloc(sizeof(float) * B * I);
    const long widest = D > I ? (D > H * Dh ? D : H * Dh) : (I > H * Dh ? I : H * Dh);
    act8_t blocks = dims[11] ? act8_alloc(B, widest) : (act8_t){0}, *a8 = dims[11] ? &blocks : NULL;
    const long phases = L * 12 + 4;  /* a layer opens 10 phases (W4A8: 4 products, each after its
                                        quantization, the heads, the activation); the output matrix 2 */
    long *counters = team_counters_alloc(phases);
    const float scale = 1.0f / sqrtf((float)Dh);
    barrier_t bar = {0, 0};
#pragma omp parallel
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        long n0, n1;
        team_begin(counters, phases);
        for (long l = 0; l < L; l++) {
            const void **p = w + l * PER_LAYER;
            float *kl = kc + l * S * Hkv * T * Dh, *vl = vc + l * S * Hkv * T * Dh;
            if (t == 0) rms_norm(x, p[LN1], h, B, D, eps);
            barrier(&bar, nt);
            product(h, B, D, p + QKV, Nqkv, qkv, 0, a8, &bar, nt);
            barrier(&bar, nt);
            if (t == 0)
                for (long b = 0; b < B; b++) {
                    float *q = qkv + b * Nqkv, *k = q + H * Dh, *v = k + Hkv * Dh;
                    rotary(q, H + Hkv, Dh, cos + pos[b] * Dh, sin + pos[b] * Dh);  /* q and k are adjacent */
                    for (long g = 0; g < Hkv; g++) {
                        const long row = ((slots[b] * Hkv + g) * T + pos[b]) * Dh;
                        for (long j = 0; j < Dh; j++) kl[row + j] = k[g * Dh + j], vl[row + j] = v[g * Dh + j];
                    }
                }
            barrier(&bar, nt);
            for (work_t k = phase(B * H, 1); take(&k, &n0, &n1);) {
                const long b = n0 / H, hd = n0 % H, base = (slots[b] * Hkv + hd / group) * T * Dh;
                attend(qkv + b * Nqkv + hd * Dh, kl + base, vl + base, pos[b] + 1, Dh, scale, att + n0 * Dh);
            }
            barrier(&bar, nt);
            product(att, B, H * Dh, p + O, D, x, 1, a8, &bar, nt);
            barrier(&bar, nt);
            if (t == 0) rms_norm(x, p[LN2], h, B, D, eps);
            barrier(&bar, nt);
            product(h, B, D, p + GU, 2 * I, gu, 0, a8, &bar, nt);
            barrier(&bar, nt);
            for (work_t k = phase(I, 256); take(&k, &n0, &n1);)
                for (long b = 0; b < B; b++)
                    silu_mul(gu + b * 2 * I + n0, gu + b * 2 * I + I + n0, act + b * I + n0, n1 - n0);
            barrier(&bar, nt);
            product(act, B, I, p + DOWN, D, x, 1, a8, &bar, nt);
            barrier(&bar, nt);
        }
        const void **tail = w + L * PER_LAYER;
        const long R = out_rows ? dims[10] : B;  /* a prefill wants each prompt's last position only */
        if (t == 0)
            for (long r = 0; r < R; r++) rms_norm(x + (out_rows ? out_rows[r] : r) * D, tail[0], h + r * D, 1, D, eps);
        barrier(&bar, nt);
        if (a8 != NULL && tail[3] != NULL) {
            act8_share(h, R, D, *a8);
            barrier(&bar, nt);
            w8a8_share(*a8, R, D, tail + 3, V, logits, 0);
        } else
            q8_0_share(h, R, D, tail[1], tail[2], V, logits, 0);
    }
    free(h), free(qkv), free(att), free(gu), free(act), free(counters);
    if (a8) act8_free(blocks);
}
