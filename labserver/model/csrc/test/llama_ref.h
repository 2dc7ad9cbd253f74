/* What llama_ref.c (the tiny model and the reference forward) and llama_steps.c (the kernel calls and
   their checks) share. */
#ifndef LABSERVER_LLAMA_REF_H
#define LABSERVER_LLAMA_REF_H

#include "harness.h"

/* S sequences of up to T positions, in blocks of BS positions: NB blocks in the kernel's pool. */
enum { L = 2, D = 64, H = 4, HKV = 2, DH = 16, I = 128, V = 96, S = 4, T = 16, NQKV = (H + 2 * HKV) * DH };
enum { BS = 4, NB = S * T / BS };
enum { LN1, QKV, O = QKV + MATRIX, LN2 = O + MATRIX, GU, DOWN = GU + MATRIX, PER_LAYER = DOWN + MATRIX };  /* step.c */
#define EPS 1e-5f
/* The matrices' gains (1: outputs of about the inputs' size). The bound is worst case: input errors go
   through a product as sum |w| e, ~7-10 times their size at gain 1 and these widths, so through two
   layers of gain-1 matrices it would exceed the logits (a bound that overflows counts as a miss: see
   compare). Small gains where the branches join the residual stream (o, down) keep the whole step's
   bound within ~0.4 on logits of ~2, and one layer's (llama_steps.c) within ~0.01; gate_up at gain 0.5
   keeps the SiLU's inputs where it bends. A wrong attention, rotary, cache, exp or SiLU moves the logits
   by far more (each was tried on a mutated copy of the kernels). */
#ifndef G_QKV
#define G_QKV 0.3
#define G_O 0.1
#define G_GU 0.5
#define G_DOWN 0.1
#define G_HEAD 1.0
#endif
#define CACHE (L * S * HKV * T * DH)  /* floats: the reference's [L, S, HKV, T, DH], the pool's [NB, L, HKV, BS, DH] */
/* exp's relative error in the kernels: glibc's expf, libmvec's vector expf and the kernels' own
   polynomial are each within 4 ulp (8 u); silu's derivative is within [-0.1, 1.1]. */
#define C_EXP (8 * U_F32)
#define SILU_SLOPE 1.1

/* A matrix: its blocks (and panels), and for the reference its float32 weights w, |q d| + |m| per weight
   (what the product's rounding bound sums, harness.c section 2) and that bound's gamma. */
typedef struct {
    long N, K;
    uint8_t *q, *pq;
    int8_t *q8;
    float *d, *m, *pd, *pm;
    double *w, *mag, gam;
} mat_t;

/* The kernel's paged cache (a pool of NB blocks, [blocks, layers, kv heads, BS, Dh], and each sequence's
   block table) and the reference's plain one ([layers, sequences, kv heads, positions, Dh]): values, their
   error bounds, and which rows have been written. */
typedef struct {
    float kc[CACHE], vc[CACHE];
    long tables[S][T / BS];
    double rk[CACHE], rv[CACHE], ek[CACHE], ev[CACHE];
    char written[CACHE / DH];
} cache_t;

/* Scattered block tables: sequence s's j-th block is block (s * T / BS + j) * 7 % NB (7 is prime to NB),
   so neighbouring positions across a block boundary are far apart in the pool and no two sequences share. */
void scatter_tables(cache_t *C);
/* The pool's row (in units of Dh floats) holding layer l, kv head g, position t of sequence s. */
long pooled(const cache_t *C, long l, long s, long g, long t);

/* The model: norms, embeddings, rotary tables (float32 for the kernel, the angles' cos and sin for the
   reference), the matrices, and the kernel's pointer array `w` (step.c's layout). */
extern struct model {
    float ln[L][2][D], norm[D], *embed, cos[T * DH], sin[T * DH];
    double c[T * DH], s[T * DH];
    mat_t qkv[L], o[L], gu[L], down[L], head;
    const void *w[L * PER_LAYER + 5];
} M;

void build_model(rng_t *r);
/* Layers l0 .. l1-1 of the reference, from x0 [B, D] (the kernel's residual stream, taken as exact) or,
   when NULL, from the tokens' embeddings; then the final norm and the logits [R, V] of `rows` (NULL:
   every row) with their bounds; hlast: the normed row the last logits came from. */
void forward_ref(cache_t *C, long l0, long l1, const float *x0, const long *tok, const long *pos, const long *slots,
                 long B, const long *rows, long R, double *logits, double *elog, double *hlast);

#endif
