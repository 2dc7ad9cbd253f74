/* The W4A8 and W8A8 products (w4a8.c, w8a8.c) against an integer reference: harness.c's checks, section 3. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "harness.h"

/* ---- 3. 8-bit activations (w4a8.c, w8a8.c) ----------------------------------------------------------
   The reference rounds each block of 32 activations as round8 does, in the same float32 steps: top =
   max |x|, d_x = fl(top / 127), inv = fl(1 / d_x) (0 for a zero block), q_x = fl(x inv) rounded to
   nearest, ties to even. The integer sums S_g = sum q_w q_x are then exact in both, so what is left is
   float: per block fl(d_w d_x), (float)S_g (exact, |S_g| < 2^24), the block's float sum of x (31
   additions), 2 fused multiply-adds into a chain of 2G terms and the add:
       |y - y_ref| <= gamma_{2G+4} sum_g (|d_w d_x S_g| + |m_w s_g|) + gamma_31 sum_g |m_w| sum_k |x_k| + u |y0|
   with s_g the exact block sum. The data hold a block whose x inv are exact halves (ties) and a zero
   block. Perturbed: one unit in one block's integer sum (d_w d_x) of the last output. */
static int act8_ref(const float *x, int *qx, double *sum, double *abs_sum) {  /* returns d_x as float bits */
    float top = 0.0f;
    for (int j = 0; j < QK; j++) top = fabsf(x[j]) > top ? fabsf(x[j]) : top;
    const float dx = top / 127.0f, inv = dx > 0.0f ? 1.0f / dx : 0.0f;
    *sum = *abs_sum = 0.0;
    for (int j = 0; j < QK; j++) {
        const float p = x[j] * inv;
        qx[j] = (int)rint((double)p), *sum += x[j], *abs_sum += fabs(x[j]);
    }
    int bits;
    memcpy(&bits, &dx, sizeof bits);
    return bits;
}

static float *activations8(rng_t *r, long M, long K) {
    float *x = uniform(r, M * K);
    if (K >= 2 * QK)  /* block 1 of row 0: d_x = 2^-6 exactly, inv = 64, x inv = k + 1/2: every one a tie */
        for (int j = 0; j < QK; j++) x[QK + j] = j == 0 ? 127.0f / 64 : (float)((rng_below(r, 252) - 126 + 0.5) / 64);
    if (K >= 3 * QK) memset(x + 2 * QK, 0, sizeof(float) * QK);
    return x;
}

void check_a8(rng_t *r, int w8, long M, long K, long N, int add) {
    const long G = K / QK;
    uint8_t *q = alloc(N * K), *pq = alloc(N * K);
    int8_t *q8 = (int8_t *)q;
    float *d = alloc(sizeof(float) * N * G), *m = alloc(sizeof(float) * N * G), *pd = alloc(sizeof(float) * N * G), *pm = alloc(sizeof(float) * N * G);
    float *x = activations8(r, M, K), *y = uniform(r, M * N);
    double *want = alloc(sizeof(double) * M * N), *bound = alloc(sizeof(double) * M * N), step = 0.0;
    for (long i = 0; i < M * N; i++) want[i] = add ? y[i] : 0.0, bound[i] = add ? U_F32 * fabs(y[i]) : 0.0;
    const void *w[MATRIX] = {q, d, m, pq, pd, pm};
    if (w8) {
        make_q8_0(r, N, K, 1.0 / (127 * sqrt((double)K)), q8, d);
        w8a8_repack(q8, d, N, K, pq, pd);
        w8a8_matmul(x, M, K, w + MPQ, N, y, add);
    } else {
        make_q4_1(r, N, K, 1.0 / (7.5 * sqrt((double)K)), q, d, m);
        w4a8_repack(q, d, m, N, K, pq, pd, pm);
        w4a8_matmul(x, M, K, w, N, y, add);
    }
    int qx[QK];
    for (long i = 0; i < M; i++)
        for (long g = 0; g < G; g++) {
            double s, sa;
            const int bits = act8_ref(x + i * K + g * QK, qx, &s, &sa);
            float dx;
            memcpy(&dx, &bits, sizeof dx);
            for (long n = 0; n < N; n++) {
                long S = 0;
                for (int j = 0; j < QK; j++) S += (long)qx[j] * (w8 ? q8[n * K + g * QK + j] : nibble(q, K, n, g * QK + j));
                const double dwdx = (double)d[n * G + g] * dx, mw = w8 ? 0.0 : m[n * G + g];
                want[i * N + n] += dwdx * S + mw * s;
                bound[i * N + n] += gamma_n(2 * G + 4) * (fabs(dwdx * S) + fabs(mw * s)) + gamma_n(31) * fabs(mw) * sa;
                if (i == M - 1 && n == N - 1 && g == 0) step = dwdx;
            }
        }
    if (perturb) y[M * N - 1] += (float)step;
    int ok;
    const double worst = compare(y, want, bound, M * N, &ok);
    char name[160];
    snprintf(name, sizeof name, "%s M=%ld K=%ld N=%ld%s (integer reference)", w8 ? "w8a8_matmul" : "w4a8_matmul", M, K, N, add ? " add" : "");
    report(name, ok, worst);
    free(q), free(pq), free(d), free(m), free(pd), free(pm), free(x), free(y), free(want), free(bound);
}

