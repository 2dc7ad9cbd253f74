/* `llama_decode`: one forward of B rows through every layer, each row one token of some sequence at some
   position (a decode step of B sequences, prompts, chunks of prompts that continue their sequence, or a
   mix), the same arithmetic as `LeanLlama`'s torch route: rms norm, rotary, a paged KV cache, grouped-query
   attention and a SiLU MLP around the products of kernels.c (float32 activations) or w4a8.c (8-bit ones).
   Left out: which blocks a sequence gets (the caller's block tables say), models other than llama's. */
#include <math.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#include "kernels.h"
#ifdef __AVX512F__
#include <immintrin.h>
#else
#include "vec_step.h"
#endif

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

/* For each of R query heads r (q + r * Dh, adjacent in a row), out + r * Dh = softmax(q_r . k_t * scale) . v_t
   over a sequence's first n keys and values, which lie in blocks of bs positions: position t at
   k + table[t / bs] * stride + (t % bs) * Dh (v likewise). The R heads share the key-value head (grouped-
   query attention), so each key and value is read once for all R: that read, not the arithmetic, is what a
   long context costs. Walked block by block in key order, and each head's score, maximum, sum and weighted
   sum take the same operations in the same order as one head alone over n contiguous keys: neither where
   the blocks are nor R changes a bit. */
static void attend(const float *q, long R, const float *k, const float *v, const long *table, long bs, long stride,
                   long n, long Dh, float scale, float *out) {
    float scores[R * n], top[R], sum[R];
    for (long r = 0; r < R; r++) top[r] = -INFINITY, sum[r] = 0.0f;
    for (long t0 = 0; t0 < n; t0 += bs) {
        const float *kb = k + table[t0 / bs] * stride;
        for (long t = t0; t < n && t < t0 + bs; t++)
            for (long r = 0; r < R; r++) {
                const float s = dot16(q + r * Dh, kb + (t - t0) * Dh, Dh) * scale;
                scores[r * n + t] = s;
                top[r] = s > top[r] ? s : top[r];
            }
    }
    for (long r = 0; r < R; r++) {
        exp_shifted(scores + r * n, n, top[r]);
        for (long t = 0; t < n; t++) sum[r] += scores[r * n + t];
    }
    for (long j = 0; j < R * Dh; j++) out[j] = 0.0f;
    for (long t0 = 0; t0 < n; t0 += bs) {
        const float *vb = v + table[t0 / bs] * stride;
        for (long t = t0; t < n && t < t0 + bs; t++) {
            const float *vt = vb + (t - t0) * Dh;
            for (long r = 0; r < R; r++) {
                const float pt = scores[r * n + t] / sum[r];
                float *o = out + r * Dh;
                for (long j = 0; j < Dh; j++) o[j] += pt * vt[j];
            }
        }
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
   dims: layers, D, heads, kv_heads, Dh, I (MLP width), V, B, the block size bs, the width of a row of
   `tables`, the number of rows listed in `out_rows` (the rows whose logits are wanted; NULL: every row's),
   1 for the W4A8 route (the matrices' panels are then w4a8.c's and the activations go through 8 bits, also
   the output matrix's when it has W8A8 panels), and the layers a cache block holds (its layer stride: the
   layers of this call, or more when a call runs some layers of a model).
   Row b is a token of sequence seqs[b] at position pos[b]; that sequence's blocks are the row
   tables[seqs[b]] (position p in block table[p / bs] at offset p % bs). Every row's key and value are
   written to its position before any row attends, and row b attends to its sequence's positions
   0..pos[b]: the earlier ones written by this call's rows or by earlier calls (a prefill, a decode step,
   a chunk of a prompt continuing from a previous one, or blocks of a prefix another sequence wrote).
   A decode step is B sequences, one row each; a prefill one run of rows per prompt at positions 0..n-1
   with its last row in `out_rows`. Nothing reads a position no row has written.
   kc, vc: the pool of blocks, [blocks, layer stride, kv_heads, bs, Dh] each, at the first layer of this
   call. x [B, D]: the tokens' embeddings, overwritten.
   One parallel region for the whole step: thread 0 does the small serial parts, the threads take the
   chunks of every product, of the attention heads and of the activation (kernels.h), and spin barriers
   separate the phases. */
void llama_decode(const void **w, const long *dims, float eps, float *x, const long *pos, const long *seqs,
                  const long *tables, const float *cos, const float *sin, float *kc, float *vc, const long *out_rows,
                  float *logits) {
    const long L = dims[0], D = dims[1], H = dims[2], Hkv = dims[3], Dh = dims[4], I = dims[5], V = dims[6];
    const long B = dims[7], bs = dims[8], width = dims[9], group = H / Hkv, Nqkv = (H + 2 * Hkv) * Dh;
    const long layer = Hkv * bs * Dh, stride = dims[12] * layer;  /* floats of one layer of a block; of a block */
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
            float *kl = kc + l * layer, *vl = vc + l * layer;
            if (t == 0) rms_norm(x, p[LN1], h, B, D, eps);
            barrier(&bar, nt);
            product(h, B, D, p + QKV, Nqkv, qkv, 0, a8, &bar, nt);
            barrier(&bar, nt);
            if (t == 0)
                for (long b = 0; b < B; b++) {
                    float *q = qkv + b * Nqkv, *k = q + H * Dh, *v = k + Hkv * Dh;
                    rotary(q, H + Hkv, Dh, cos + pos[b] * Dh, sin + pos[b] * Dh);  /* q and k are adjacent */
                    const long *table = tables + seqs[b] * width;
                    for (long g = 0; g < Hkv; g++) {
                        const long row = table[pos[b] / bs] * stride + (g * bs + pos[b] % bs) * Dh;
                        for (long j = 0; j < Dh; j++) kl[row + j] = k[g * Dh + j], vl[row + j] = v[g * Dh + j];
                    }
                }
            barrier(&bar, nt);
            /* An item is a row's query heads that share a key-value head (they read its keys once), or
               one query head when that leaves too few items to keep every thread busy (a decode step of
               one sequence). Items go key-value head by key-value head, every row of one before the
               next: a prompt's rows then find that head's keys and values still in the core's cache. */
            const long R = B * Hkv >= 4 * nt ? group : 1, per = group / R;
            for (work_t k = phase(B * Hkv * per, 1); take(&k, &n0, &n1);) {
                const long g = n0 / (B * per), b = n0 % (B * per) / per, hd = g * group + n0 % per * R;
                const long head = g * bs * Dh;
                attend(qkv + b * Nqkv + hd * Dh, R, kl + head, vl + head, tables + seqs[b] * width, bs, stride,
                       pos[b] + 1, Dh, scale, att + (b * H + hd) * Dh);
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
        if (R > 0) {  /* none: a call that only fills the cache (the first part of a long prompt) */
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
    }
    free(h), free(qkv), free(att), free(gu), free(act), free(counters);
    if (a8) act8_free(blocks);
}
