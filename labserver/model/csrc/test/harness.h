/* What the harness's files share: the kernels' entry points (as the sources in toolchain.SOURCES define them), a
   fixed-seed generator, the error constants and the one-line-per-check report. */
#ifndef LABSERVER_HARNESS_H
#define LABSERVER_HARNESS_H

#include <stddef.h>
#include <stdint.h>

#include "../kernels.h"

void q4_1_matmul(const float *x, long M, long K, const void *const *w, long N, float *y, int add);
void q4_1_repack(const uint8_t *q, const float *d, const float *m, long N, long K, uint8_t *pq, float *pd,
                 float *pm);
void q8_0_matmul(const float *x, long M, long K, const int8_t *q, const float *d, long N, float *y, int add);
long q4_1_quantize(const float *w, long N, long K, uint8_t *q, float *d, float *m, float rtol);
long q8_0_quantize(const float *w, long N, long K, int8_t *q, float *d, float rtol);
void w4a8_repack(const uint8_t *q, const float *d, const float *m, long N, long K, uint8_t *pq, float *pd,
                 float *pm);
void w4a8_matmul(const float *x, long M, long K, const void *const *w, long N, float *y, int add);
void w8a8_repack(const int8_t *q, const float *d, long N, long K, uint8_t *pq, float *pd);
void w8a8_matmul(const float *x, long M, long K, const void *const *w, long N, float *y, int add);
const char *kernel_path(void);
const char *kernel_features(void);
void llama_decode(const void **w, const long *dims, float eps, float *x, const long *pos, const long *seqs,
                  const long *tables, const float *cos, const float *sin, float *kc, float *vc, const long *out_rows,
                  float *logits);

/* Unit roundoff of float32 (round to nearest). */
#define U_F32 (1.0 / 16777216.0)
/* gamma_n = n u / (1 - n u): the relative error of n float32 roundings in a row (Higham, Accuracy and
   Stability of Numerical Algorithms, 2nd ed., Lemma 3.1); a sum of n products in any order, with or
   without fused multiply-adds, is within gamma_n * sum |terms| of the exact sum (ibid. eq. 3.5). */
static inline double gamma_n(double n) { return n * U_F32 / (1.0 - n * U_F32); }

/* A fixed-seed generator (splitmix64): the same data on every machine and build. */
typedef struct {
    uint64_t s;
} rng_t;

static inline uint64_t rng_next(rng_t *r) {
    uint64_t z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static inline double rng_uniform(rng_t *r) { return (double)(rng_next(r) >> 11) * 0x1p-53 * 2.0 - 1.0; }  /* [-1, 1) */
static inline long rng_below(rng_t *r, long n) { return (long)(rng_next(r) % (uint64_t)n); }

/* With --perturb every check corrupts one output by a realistic bug's amount first, and must fail. */
extern int perturb;

/* One line for one check: PASS or FAIL, the name, the worst |got - want| / bound (NaN counts as a miss). */
void report(const char *name, int ok, double worst);
/* Compares got to want within bound, element by element; returns the worst ratio (inf on a miss by a
   zero bound or a NaN) and sets *ok. */
double compare(const float *got, const double *want, const double *bound, long n, int *ok);

/* Data (harness.c): zeroed memory or exit; Q4_1 blocks around zero (|w| up to ~7.5 d, m ~ -7.5 d) and
   Q8_0 blocks with a +-127 in each, d ~ scale; the 4-bit value of weight k of row n; the float32 weight
   the kernels make of a Q4_1 value; n uniform floats in [-1, 1). */
void *alloc(size_t bytes);
void make_q4_1(rng_t *r, long N, long K, double scale, uint8_t *q, float *d, float *m);
void make_q8_0(rng_t *r, long N, long K, double scale, int8_t *q, float *d);
int nibble(const uint8_t *q, long K, long n, long k);
double q4_1_weight(int q, float d, float m);
float *uniform(rng_t *r, long n);

/* Section 3 (a8_ref.c): w8 = 0 for W4A8, 1 for W8A8; M rows, K inputs, N outputs, add to y or not. */
void check_a8(rng_t *r, int w8, long M, long K, long N, int add);
void llama_checks(void);

#endif
