/* Float32 matrices into Q4_1 and Q8_0 blocks (kernels.c's layouts), counting the weights the blocks
   would not reproduce: a matrix goes into blocks only when they are its weights. */
#include <math.h>
#include <stdint.h>

#include "kernels.h"

static float clamp(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

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
