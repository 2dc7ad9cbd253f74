/* A test harness of the C kernels in plain C: no torch, no Python, so that it runs wherever the kernels
   compile, a cross-compiled ARM64 build under an emulator included.

   It makes its own data with a fixed-seed generator and checks each entry point against a reference it
   computes in double precision: the block quantizers' round trip, the float32 products (tiles, panels),
   the 8-bit-activation products against an integer reference (a8_ref.c), and the fused decode step
   against a straightforward llama forward (llama_ref.c, llama_steps.c). Every tolerance is a bound
   derived from the float32 operations the kernels do, stated where it is computed. One line per check, then `N passed, M failed`;
   the exit status is 1 on any failure. `--perturb` corrupts one output of every check by a realistic
   bug's amount (one weight one quantization step off, one unit of an integer sum, one flipped bit of a
   block, two swapped weights of the output matrix) and every check must then fail: the tolerances are
   tight enough to catch it.

   Build (tests/test_kernels_c.py does, for each path), from labserver/model/csrc:
       cc test/harness.c test/a8_ref.c test/llama_ref.c test/llama_steps.c <toolchain.SOURCES> -o harness
          -march=... <toolchain.FLAGS less -shared> -fopenmp -lm
   Left out: timing (benchmarks print speed; this only checks answers). */
#include "harness.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int perturb = 0;
static long passed = 0, failed = 0;
static char first_miss[200];

void report(const char *name, int ok, double worst) {
    printf("%s %s: worst |err|/bound %.3g%s\n", ok ? "PASS" : "FAIL", name, worst, ok ? "" : first_miss);
    ok ? passed++ : failed++;
    first_miss[0] = 0;
}

double compare(const float *got, const double *want, const double *bound, long n, int *ok) {
    double worst = 0.0;
    *ok = 1;
    for (long i = 0; i < n; i++) {
        const double e = fabs((double)got[i] - want[i]);
        double r = bound[i] > 0.0 ? e / bound[i] : (e == 0.0 ? 0.0 : INFINITY);
        if (!(e <= bound[i]) || !isfinite(bound[i])) {  /* an infinite bound would pass anything */
            if (*ok) snprintf(first_miss, sizeof first_miss, " (first miss: [%ld] = %.9g, want %.9g +- %.3g)", i, got[i], want[i], bound[i]);
            *ok = 0, r = isnan(e) ? INFINITY : r;
        }
        worst = r > worst ? r : worst;
    }
    return worst;
}

void *alloc(size_t bytes) {
    void *p = calloc(1, bytes ? bytes : 1);
    if (p == NULL) fprintf(stderr, "out of memory\n"), exit(2);
    return p;
}

/* The 4-bit value of weight k of row n: byte j of a block holds k = j (low nibble) and j + 16 (high). */
int nibble(const uint8_t *q, long K, long n, long k) {
    const uint8_t byte = q[n * K / 2 + (k / QK) * QK / 2 + (k % QK) % (QK / 2)];
    return k % QK < QK / 2 ? byte & 15 : byte >> 4;
}

/* Random Q4_1 blocks around zero, |w| up to ~7.5 d: m ~ -7.5 d, so q d and m cancel (see the bound). */
void make_q4_1(rng_t *r, long N, long K, double scale, uint8_t *q, float *d, float *m) {
    for (long i = 0; i < N * K / 2; i++) q[i] = (uint8_t)rng_next(r);
    for (long i = 0; i < N * (K / QK); i++)
        d[i] = (float)(scale * (0.5 + 0.5 * fabs(rng_uniform(r)))), m[i] = (float)(-7.5 * d[i] * (1 + 0.1 * rng_uniform(r)));
}

void make_q8_0(rng_t *r, long N, long K, double scale, int8_t *q, float *d) {
    for (long i = 0; i < N * K; i++) q[i] = (int8_t)(rng_below(r, 255) - 127);
    for (long i = 0; i < N * (K / QK); i++) d[i] = (float)(scale * (0.5 + 0.5 * fabs(rng_uniform(r)))), q[i * QK + i % QK] = i % 2 ? 127 : -127;
}

/* The float32 weight the kernels make of a Q4_1 value: q * d rounded, plus m rounded (both products and
   sums of two floats of nearby magnitude are exact in double, so each cast is the one float rounding). */
double q4_1_weight(int q, float d, float m) { return (float)((double)(float)((double)q * d) + m); }

float *uniform(rng_t *r, long n) {
    float *x = alloc(sizeof(float) * n);
    for (long i = 0; i < n; i++) x[i] = (float)rng_uniform(r);
    return x;
}

/* ---- 1. the quantizers: weights on the grid come back bit for bit; others within half a step -------- */
static void check_quantize(rng_t *r) {
    const long N = 8, K = 128, G = K / QK;
    uint8_t *q = alloc(N * K / 2), *q2 = alloc(N * K / 2);
    int8_t *q8 = alloc(N * K), *q82 = alloc(N * K);
    float *d = alloc(sizeof(float) * N * G), *m = alloc(sizeof(float) * N * G), *w = alloc(sizeof(float) * N * K);
    float *d2 = alloc(sizeof(float) * N * G), *m2 = alloc(sizeof(float) * N * G);
    char name[160];
    /* On the grid, exactly: d = (16..31) 2^-11 and m = -(0..255) 2^-9 make every q d + m a multiple of
       2^-11 below 1, exact in float32; each block holds q = 0 and q = 15, so its min is m and its
       max - min is 15 d, and the quantizer's (max - min) / 15 and (w - min) / d are exact too. */
    make_q4_1(r, N, K, 1.0, q, d, m);
    for (long b = 0; b < N * G; b++) {
        d[b] = (float)((16 + rng_below(r, 16)) * 0x1p-11), m[b] = (float)(-rng_below(r, 256) * 0x1p-9);
        q[b * QK / 2] = (q[b * QK / 2] & 0xF0) | 0x0, q[b * QK / 2 + 1] = (q[b * QK / 2 + 1] & 0xF0) | 0xF;
    }
    for (long n = 0; n < N; n++)
        for (long k = 0; k < K; k++) w[n * K + k] = (float)(nibble(q, K, n, k) * (double)d[n * G + k / QK] + m[n * G + k / QK]);
    long missed = q4_1_quantize(w, N, K, q2, d2, m2, 0.0f);
    if (perturb) q2[0] ^= 1;
    int ok = missed == 0 && !memcmp(q, q2, N * K / 2) && !memcmp(d, d2, sizeof(float) * N * G) && !memcmp(m, m2, sizeof(float) * N * G);
    snprintf(name, sizeof name, "q4_1_quantize N=%ld K=%ld: on-grid weights come back bit for bit (missed %ld)", N, K, missed);
    report(name, ok, 0.0);

    /* Off the grid: the quantizer's float steps (w - min, / d, the rounding of d itself) move a weight by
       at most half a step plus ~63 u d, and the rebuilt weight q d + m by two roundings: within
       d / 2 + gamma_80 (d + |m| + |w|). Every such weight misses at rtol 0. */
    float *x = uniform(r, N * K);
    missed = q4_1_quantize(x, N, K, q2, d2, m2, 0.0f);
    if (perturb) q2[0] ^= 1;
    double worst = 0.0;
    ok = missed > 0;
    for (long n = 0; n < N; n++)
        for (long k = 0; k < K; k++) {
            const long b = n * G + k / QK;
            const double e = fabs(q4_1_weight(nibble(q2, K, n, k), d2[b], m2[b]) - x[n * K + k]);
            const double bound = 0.5 * d2[b] + gamma_n(80) * (d2[b] + fabs(m2[b]) + fabs(x[n * K + k]));
            worst = e / bound > worst ? e / bound : worst, ok &= e <= bound;
        }
    snprintf(name, sizeof name, "q4_1_quantize N=%ld K=%ld: off-grid weights within half a step, counted (missed %ld)", N, K, missed);
    report(name, ok, worst);

    /* Q8_0 on the grid: d = (16..31) 2^-12 and q in -127..127 with a +-127 in every block: q d is exact,
       the block's max |w| / 127 is d exactly and w / d is q. */
    make_q8_0(r, N, K, 1.0, q8, d);
    for (long b = 0; b < N * G; b++) d[b] = (float)((16 + rng_below(r, 16)) * 0x1p-12);
    for (long i = 0; i < N * K; i++) w[i] = (float)(q8[i] * (double)d[i / QK]);
    missed = q8_0_quantize(w, N, K, q82, d2, 0.0f);
    if (perturb) q82[0] ^= 1;
    ok = missed == 0 && !memcmp(q8, q82, N * K) && !memcmp(d, d2, sizeof(float) * N * G);
    snprintf(name, sizeof name, "q8_0_quantize N=%ld K=%ld: on-grid weights come back bit for bit (missed %ld)", N, K, missed);
    report(name, ok, 0.0);

    /* Off the grid: d = fl(max / 127) and fl(w / d) err by ~130 u d, the rebuilt q d by one rounding. */
    missed = q8_0_quantize(x, N, K, q82, d2, 0.0f);
    if (perturb) q82[0] ^= 1;
    worst = 0.0, ok = missed > 0;
    for (long i = 0; i < N * K; i++) {
        const double e = fabs((double)(float)(q82[i] * (double)d2[i / QK]) - x[i]);
        const double bound = 0.5 * d2[i / QK] + gamma_n(140) * d2[i / QK] + gamma_n(2) * fabs(x[i]);
        worst = e / bound > worst ? e / bound : worst, ok &= e <= bound;
    }
    snprintf(name, sizeof name, "q8_0_quantize N=%ld K=%ld: off-grid weights within half a step, counted (missed %ld)", N, K, missed);
    report(name, ok, worst);
    free(q), free(q2), free(q8), free(q82), free(d), free(m), free(w), free(d2), free(m2), free(x);
}

/* ---- 2. float32 products ---------------------------------------------------------------------------
   The kernels compute y = sum_k w_k x_k (+ y0) in float32 either as written (tiles, panels, portable C,
   where the compiler may fuse q d + m into one rounding) or per block as d sum q_k x_k + m sum x_k (the
   one-row paths). With w_k = fl(fl(q_k d) + m), each form is within 2u (|q_k d| + |m|) per weight
   of the other, and a sum of K products in any order errs by gamma_K sum |terms| (harness.h), so
       |y - (sum_k w_k x_k + y0)| <= gamma_{K+6} A,   A = sum_k (|q_k d| + |m|) |x_k| + |y0|
   (K products and sums, 2 roundings of the weight, d and m applied, the add). It must be A and not
   sum |w_k x_k|: in the second form q d and m cancel only after rounding. For Q8_0, w_k = fl(q_k d):
   A = sum |q_k d x_k| + |y0| and gamma_{K+4}. Perturbed: one weight one step (d) off, at the largest
   |d x_k| of the last output. */
static void check_q4_1(rng_t *r, long M, long K, long N, int panels, int add) {
    const long G = K / QK;
    uint8_t *q = alloc(N * K / 2), *pq = alloc(N * K / 2);
    float *d = alloc(sizeof(float) * N * G), *m = alloc(sizeof(float) * N * G), *pd = alloc(sizeof(float) * N * G), *pm = alloc(sizeof(float) * N * G);
    make_q4_1(r, N, K, 1.0 / (7.5 * sqrt((double)K)), q, d, m);
    float *x = uniform(r, M * K), *y = uniform(r, M * N);
    double *want = alloc(sizeof(double) * M * N), *bound = alloc(sizeof(double) * M * N);
    for (long i = 0; i < M * N; i++) want[i] = add ? y[i] : 0.0, bound[i] = add ? fabs(y[i]) : 0.0;
    const void *w[MATRIX] = {q, d, m, NULL, NULL, NULL};
    if (panels) q4_1_repack(q, d, m, N, K, pq, pd, pm), w[MPQ] = pq, w[MPD] = pd, w[MPM] = pm;
    q4_1_matmul(x, M, K, w, N, y, add);
    double step = 0.0;
    for (long i = 0; i < M; i++)
        for (long n = 0; n < N; n++) {
            for (long k = 0; k < K; k++) {
                const float dg = d[n * G + k / QK], mg = m[n * G + k / QK];
                const int qk = nibble(q, K, n, k);
                want[i * N + n] += q4_1_weight(qk, dg, mg) * x[i * K + k];
                bound[i * N + n] += (qk * (double)dg + fabs(mg)) * fabs(x[i * K + k]);
                if (i == M - 1 && n == N - 1 && dg * fabs(x[i * K + k]) > step) step = dg * fabs(x[i * K + k]);
            }
            bound[i * N + n] *= gamma_n(K + 6);
        }
    if (perturb) y[M * N - 1] += (float)step;
    int ok;
    const double worst = compare(y, want, bound, M * N, &ok);
    char name[160];
    snprintf(name, sizeof name, "q4_1_matmul M=%ld K=%ld N=%ld%s%s", M, K, N, panels ? " panels" : "", add ? " add" : "");
    report(name, ok, worst);
    free(q), free(pq), free(d), free(m), free(pd), free(pm), free(x), free(y), free(want), free(bound);
}

static void check_q8_0(rng_t *r, long M, long K, long N, int add) {
    const long G = K / QK;
    int8_t *q = alloc(N * K);
    float *d = alloc(sizeof(float) * N * G), *x = uniform(r, M * K), *y = uniform(r, M * N);
    make_q8_0(r, N, K, 1.0 / (127 * sqrt((double)K)), q, d);
    double *want = alloc(sizeof(double) * M * N), *bound = alloc(sizeof(double) * M * N), step = 0.0;
    for (long i = 0; i < M * N; i++) want[i] = add ? y[i] : 0.0, bound[i] = add ? fabs(y[i]) : 0.0;
    q8_0_matmul(x, M, K, q, d, N, y, add);
    for (long i = 0; i < M; i++)
        for (long n = 0; n < N; n++) {
            for (long k = 0; k < K; k++) {
                const double qd = q[n * K + k] * (double)d[n * G + k / QK];
                want[i * N + n] += (double)(float)qd * x[i * K + k], bound[i * N + n] += fabs(qd * x[i * K + k]);
                if (i == M - 1 && n == N - 1 && d[n * G + k / QK] * fabs(x[i * K + k]) > step) step = d[n * G + k / QK] * fabs(x[i * K + k]);
            }
            bound[i * N + n] *= gamma_n(K + 4);
        }
    if (perturb) y[M * N - 1] += (float)step;
    int ok;
    const double worst = compare(y, want, bound, M * N, &ok);
    char name[160];
    snprintf(name, sizeof name, "q8_0_matmul M=%ld K=%ld N=%ld%s", M, K, N, add ? " add" : "");
    report(name, ok, worst);
    free(q), free(d), free(x), free(y), free(want), free(bound);
}

/* The vector code the kernels were compiled to and what else they use, as the library reports them. */
static void print_build(void) { printf("build: path=%s features=%s\n", kernel_path(), kernel_features()); }

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--perturb")) perturb = 1;
        else return fprintf(stderr, "usage: %s [--perturb]\n", argv[0]), 2;
    }
    print_build();
    rng_t r = {20261130};
    check_quantize(&r);
    /* One row, tiles of 2..8 rows, 13 = a tile of 8 and one of 5; K = 96 has an odd number of blocks
       (the one-row path pairs them); N = 40 is not whole panels. */
    for (long M = 1; M <= 8; M++) check_q4_1(&r, M, 96, 40, 0, 0), check_q8_0(&r, M, 96, 40, 0);
    check_q4_1(&r, 13, 96, 40, 0, 0), check_q8_0(&r, 13, 96, 40, 0);
    check_q4_1(&r, 1, 96, 40, 0, 1), check_q4_1(&r, 3, 96, 40, 0, 1), check_q8_0(&r, 1, 96, 40, 1), check_q8_0(&r, 3, 96, 40, 1);
    check_q8_0(&r, 1, 256, 96, 0);
    /* K = 160: five blocks, more than a vector of block minima (4 or 8 lanes) and a scalar rest. */
    check_q4_1(&r, 1, 160, 40, 0, 0), check_q4_1(&r, 3, 160, 40, 0, 0), check_q8_0(&r, 1, 160, 40, 0);
    /* With panels (N = 96: three of 32), used from 5 rows on; 12 rows = one register tile, 13 and 29 not. */
    const long panel_rows[] = {1, 4, 5, 12, 13, 29};
    for (int i = 0; i < 6; i++) check_q4_1(&r, panel_rows[i], 256, 96, 1, 0);
    check_q4_1(&r, 13, 256, 96, 1, 1);
    /* 8-bit activations: panels of 16 rows, register tiles of 8 rows (13 = 8 + 5). */
    const long a8_rows[] = {1, 3, 8, 13};
    for (int i = 0; i < 4; i++) check_a8(&r, 0, a8_rows[i], 96, 48, 0), check_a8(&r, 1, a8_rows[i], 96, 48, 0);
    check_a8(&r, 0, 13, 256, 32, 1), check_a8(&r, 1, 13, 256, 32, 1);
    llama_checks();
    printf("%ld passed, %ld failed\n", passed, failed);
    return failed > 0;
}
