/* llama_decode against a straightforward llama forward in double precision, on a tiny random model.

   The reference carries, beside every value v, a bound e on |v_kernel - v|: a running forward error
   analysis of the float32 operations the kernels do (one rule per operation, stated where applied), so
   the tolerance on each logit is derived from the arithmetic along the whole forward, not tuned. Both
   sides use the same float32 weights, embeddings, norms and rotary tables; the reference applies rotary
   from the angles' double cos and sin in the usual rotate_half form (the tables fold the signs in, as
   LeanLlama's do), attends with grouped-query heads as transformers' repeat_kv does (head h reads kv head
   h / (H / Hkv)) and keeps its own plain cache (position by position, no blocks).

   Left out: the W4A8 route (its activations' rounding jumps with the inputs, so a double reference of
   it is not within a smooth bound; the products themselves are checked in harness.c). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama_ref.h"

struct model M;

static void q4_1_mat(rng_t *r, mat_t *a, long N, long K, double gain) {
    const long G = K / QK;
    *a = (mat_t){N, K, alloc(N * K / 2), alloc(N * K / 2), NULL, alloc(4 * N * G), alloc(4 * N * G), alloc(4 * N * G),
                 alloc(4 * N * G), alloc(8 * N * K), alloc(8 * N * K), gamma_n(K + 6)};
    make_q4_1(r, N, K, gain * sqrt(3.0 / K) / 7.5, a->q, a->d, a->m);
    q4_1_repack(a->q, a->d, a->m, N, K, a->pq, a->pd, a->pm);   /* the panels a prefill reads */
    for (long n = 0; n < N; n++)
        for (long k = 0; k < K; k++) {
            const int q = nibble(a->q, K, n, k);
            const float d = a->d[n * G + k / QK], m = a->m[n * G + k / QK];
            a->w[n * K + k] = q4_1_weight(q, d, m), a->mag[n * K + k] = q * (double)d + fabs(m);
        }
}

void build_model(rng_t *r) {
    M.embed = uniform(r, V * D);
    for (long l = 0; l < L; l++) {
        for (int j = 0; j < 2; j++)
            for (long i = 0; i < D; i++) M.ln[l][j][i] = (float)(1 + 0.1 * rng_uniform(r));
        q4_1_mat(r, &M.qkv[l], NQKV, D, G_QKV), q4_1_mat(r, &M.o[l], D, H * DH, G_O);
        q4_1_mat(r, &M.gu[l], 2 * I, D, G_GU), q4_1_mat(r, &M.down[l], D, I, G_DOWN);
        const mat_t *mats[] = {&M.qkv[l], &M.o[l], &M.gu[l], &M.down[l]};
        const int at[] = {QKV, O, GU, DOWN};
        const void **p = M.w + l * PER_LAYER;
        p[LN1] = M.ln[l][0], p[LN2] = M.ln[l][1];
        for (int i = 0; i < 4; i++) {
            const mat_t *a = mats[i];
            p[at[i] + MQ] = a->q, p[at[i] + MD] = a->d, p[at[i] + MM] = a->m;
            p[at[i] + MPQ] = a->pq, p[at[i] + MPD] = a->pd, p[at[i] + MPM] = a->pm;
        }
    }
    for (long i = 0; i < D; i++) M.norm[i] = (float)(1 + 0.1 * rng_uniform(r));
    mat_t *h = &M.head;
    *h = (mat_t){V, D, NULL, NULL, alloc(V * D), alloc(4 * V * D / QK), NULL, NULL, NULL, alloc(8 * V * D), alloc(8 * V * D), gamma_n(D + 4)};
    make_q8_0(r, V, D, G_HEAD * 2.0 / (127 * sqrt((double)D)), h->q8, h->d);
    for (long i = 0; i < V * D; i++) {
        const double qd = h->q8[i] * (double)h->d[i / QK];
        h->w[i] = (float)qd, h->mag[i] = fabs(qd);
    }
    const void **tail = M.w + L * PER_LAYER;
    tail[0] = M.norm, tail[1] = h->q8, tail[2] = h->d, tail[3] = tail[4] = NULL;
    /* Rotary tables in LeanLlama's layout: [position, Dh], the angle pos / 10000^(2i/Dh) for i and i + Dh/2,
       sin negated in the first half (rotate_half's sign). The reference keeps the angles' cos and sin. */
    for (long t = 0; t < T; t++)
        for (long j = 0; j < DH; j++) {
            const double angle = t / pow(10000.0, (double)(2 * (j % (DH / 2))) / DH);
            M.c[t * DH + j] = cos(angle), M.s[t * DH + j] = sin(angle);
            M.cos[t * DH + j] = (float)cos(angle), M.sin[t * DH + j] = (float)(j < DH / 2 ? -sin(angle) : sin(angle));
        }
}

/* rms norm: the kernel's r = 1 / sqrt(sum x^2 / D + eps) and x r w take D + 8 roundings at most (a sum
   of positive terms, /D, +eps, sqrt, 1/, two products); its input errors e move sum x^2 / D + eps by a
   relative rho <= sum (2|x| e + e^2) / (sum x^2 + D eps), and r by at most rho while rho <= 1/2. */
static void rms_ref(const double *x, const double *ex, const float *w, double *h, double *eh) {
    double ss = 0.0, dss = 0.0;
    for (long i = 0; i < D; i++) ss += x[i] * x[i], dss += 2 * fabs(x[i]) * ex[i] + ex[i] * ex[i];
    const double rho = dss / (ss + D * (double)EPS) <= 0.5 ? dss / (ss + D * (double)EPS) : INFINITY;
    const double r = 1.0 / sqrt(ss / D + EPS), th = gamma_n(D + 8);
    for (long i = 0; i < D; i++)
        h[i] = x[i] * r * w[i], eh[i] = fabs(w[i]) * r * (fabs(x[i]) * (rho + th * (1 + rho)) + ex[i] * (1 + rho) * (1 + th));
}

/* y (+)= W v: the product's rounding (harness.c section 2) on the kernel's inputs, |v| + ev, plus the
   input errors carried through the weights, plus the error y already had. */
static void prod_ref(const mat_t *a, const double *v, const double *ev, double *y, double *ey, int add) {
    for (long n = 0; n < a->N; n++) {
        double s = add ? y[n] : 0.0, A = add ? fabs(y[n]) + ey[n] : 0.0, P = add ? ey[n] : 0.0;
        for (long k = 0; k < a->K; k++) {
            s += a->w[n * a->K + k] * v[k];
            A += a->mag[n * a->K + k] * (fabs(v[k]) + ev[k]), P += fabs(a->w[n * a->K + k]) * ev[k];
        }
        y[n] = s, ey[n] = a->gam * A + P;
    }
}

/* x c -+ x' s on one head: two products and a sum over table values within u of c and s: gamma_3. */
static void rotary_ref(double *x, double *e, const double *c, const double *s) {
    double y[DH], ey[DH];
    for (long j = 0; j < DH; j++) {
        const long o = j < DH / 2 ? j + DH / 2 : j - DH / 2;
        const double sn = j < DH / 2 ? -s[j] : s[j];
        y[j] = x[j] * c[j] + x[o] * sn;
        ey[j] = e[j] * fabs(c[j]) + e[o] * fabs(sn) + gamma_n(3) * ((fabs(x[j]) + e[j]) * fabs(c[j]) + (fabs(x[o]) + e[o]) * fabs(sn));
    }
    memcpy(x, y, sizeof y), memcpy(e, ey, sizeof ey);
}

/* softmax(q . k_t / sqrt(Dh)) . v_t over n positions. Scores: a dot of Dh terms and the scale, gamma_{Dh+3},
   plus the input errors (Delta_t). exp(s_t - top) / sum: errors delta_t <= Delta' (scores, and the
   subtraction's rounding) change each weight by a factor within e^{+-2 Delta'}; exp's own error C_EXP on
   each term gives (1 + C)/(1 - C); the sum of n terms and the division gamma_{n+2}. The weighted sum of v:
   gamma_n on the kernel's terms, plus the weights' and the values' errors. */
static void attend_ref(const double *q, const double *eq, const double *k, const double *ek, const double *v,
                       const double *ev, long n, double *out, double *eout) {
    double sc[T], dl[T], top = -INFINITY, dmax = 0.0, sum = 0.0, p[T];
    const double scale = 1.0 / sqrt((double)DH);
    for (long t = 0; t < n; t++) {
        double s = 0.0, prop = 0.0, mag = 0.0;
        for (long j = 0; j < DH; j++) {
            const double a = q[j], b = k[t * DH + j], ea = eq[j], eb = ek[t * DH + j];
            s += a * b, prop += fabs(a) * eb + ea * fabs(b) + ea * eb, mag += (fabs(a) + ea) * (fabs(b) + eb);
        }
        sc[t] = s * scale, dl[t] = scale * (prop + gamma_n(DH + 3) * mag);
        top = sc[t] > top ? sc[t] : top, dmax = dl[t] > dmax ? dl[t] : dmax;
    }
    double big = 0.0;
    for (long t = 0; t < n; t++) {
        const double d = dl[t] + U_F32 * (fabs(sc[t]) + fabs(top) + 2 * dmax);
        big = d > big ? d : big, sum += (p[t] = exp(sc[t] - top));
    }
    const double gn = gamma_n(n + 2);
    const double rho = exp(2 * big) * (1 + C_EXP) / (1 - C_EXP) * (1 + gn) / (1 - gn) - 1;
    for (long j = 0; j < DH; j++) {
        double o = 0.0, e = 0.0, m = 0.0;
        for (long t = 0; t < n; t++) {
            const double pt = p[t] / sum, a = fabs(v[t * DH + j]) + ev[t * DH + j];
            o += pt * v[t * DH + j], e += pt * (rho * a + ev[t * DH + j]), m += pt * a;
        }
        out[j] = o, eout[j] = e + gamma_n(n) * (1 + rho) * m;
    }
}

/* a = silu(g) u: |silu'| <= 1.1 carries g's error; the kernel's exp, 1 +, /, * add (1 + C_EXP)(1 + gamma_3). */
static void silu_ref(const double *g, const double *eg, const double *u, const double *eu, double *a, double *ea) {
    const double rho = (1 + C_EXP) * (1 + gamma_n(3)) - 1;
    for (long i = 0; i < I; i++) {
        const double sg = g[i] / (1 + exp(-g[i]));
        a[i] = sg * u[i];
        ea[i] = fabs(sg) * eu[i] + SILU_SLOPE * eg[i] * (fabs(u[i]) + eu[i]) + rho * (fabs(sg) + SILU_SLOPE * eg[i]) * (fabs(u[i]) + eu[i]);
    }
}

static long at(long l, long slot, long g, long t) { return ((l * S + slot) * HKV + g) * T + t; }

void scatter_tables(cache_t *C) {
    for (long s = 0; s < S; s++)
        for (long j = 0; j < T / BS; j++) C->tables[s][j] = (s * T / BS + j) * 7 % NB;
}

long pooled(const cache_t *C, long l, long s, long g, long t) {
    return ((C->tables[s][t / BS] * L + l) * HKV + g) * BS + t % BS;
}

void forward_ref(cache_t *C, long l0, long l1, const float *x0, const long *tok, const long *pos, const long *slots,
                 long B, const long *rows, long R, double *logits, double *elog, double *hlast) {
    double *x = alloc(8 * B * D), *ex = alloc(8 * B * D), *h = alloc(8 * D), *eh = alloc(8 * D);
    double *att = alloc(8 * B * H * DH), *eatt = alloc(8 * B * H * DH), qkv[NQKV], eq[NQKV], gu[2 * I], eg[2 * I];
    double a[I], ea[I];
    for (long b = 0; b < B; b++)  /* x0 as it is: errors are counted from there */
        for (long i = 0; i < D; i++) x[b * D + i] = x0 ? x0[b * D + i] : M.embed[tok[b] * D + i];
    for (long l = l0; l < l1; l++) {
        for (long b = 0; b < B; b++) {  /* every row's keys and values go to the cache before any row attends */
            rms_ref(x + b * D, ex + b * D, M.ln[l][0], h, eh);
            prod_ref(&M.qkv[l], h, eh, qkv, eq, 0);
            for (long hd = 0; hd < H + HKV; hd++) rotary_ref(qkv + hd * DH, eq + hd * DH, M.c + pos[b] * DH, M.s + pos[b] * DH);
            for (long g = 0; g < HKV; g++) {
                const long c = at(l, slots[b], g, pos[b]);
                memcpy(C->rk + c * DH, qkv + (H + g) * DH, 8 * DH), memcpy(C->ek + c * DH, eq + (H + g) * DH, 8 * DH);
                memcpy(C->rv + c * DH, qkv + (H + HKV + g) * DH, 8 * DH), memcpy(C->ev + c * DH, eq + (H + HKV + g) * DH, 8 * DH);
                C->written[c] = 1;
            }
            memcpy(att + b * H * DH, qkv, 8 * H * DH), memcpy(eatt + b * H * DH, eq, 8 * H * DH);  /* the queries */
        }
        for (long b = 0; b < B; b++)
            for (long hd = 0; hd < H; hd++) {
                const long c = at(l, slots[b], hd / (H / HKV), 0) * DH;
                double q[DH], e[DH];
                memcpy(q, att + (b * H + hd) * DH, sizeof q), memcpy(e, eatt + (b * H + hd) * DH, sizeof e);
                attend_ref(q, e, C->rk + c, C->ek + c, C->rv + c, C->ev + c, pos[b] + 1, att + (b * H + hd) * DH, eatt + (b * H + hd) * DH);
            }
        for (long b = 0; b < B; b++) {
            prod_ref(&M.o[l], att + b * H * DH, eatt + b * H * DH, x + b * D, ex + b * D, 1);
            rms_ref(x + b * D, ex + b * D, M.ln[l][1], h, eh);
            prod_ref(&M.gu[l], h, eh, gu, eg, 0);
            silu_ref(gu, eg, gu + I, eg + I, a, ea);
            prod_ref(&M.down[l], a, ea, x + b * D, ex + b * D, 1);
        }
    }
    for (long r = 0; r < R; r++) {
        const long b = rows ? rows[r] : r;
        rms_ref(x + b * D, ex + b * D, M.norm, h, eh);
        prod_ref(&M.head, h, eh, logits + r * V, elog + r * V, 0);
    }
    memcpy(hlast, h, 8 * D);
    free(x), free(ex), free(h), free(eh), free(att), free(eatt);
}

