/* llama_decode's checks: each step of the scenarios runs twice, on caches of its own.

   1. The whole step in one call (both layers), against the reference from the embeddings: the bound
      carries every error from the first operation on, so it grows by ~50-100 times per layer (a worst
      case), but a wrong layer offset, slot, position or head is still far outside it.
   2. One layer per call (dims L = 1 with a layer stride of 2, the layer's pointers followed by the final
      norm and the output matrix's): the kernel overwrites x with the residual stream after its layer, and
      the reference restarts each layer from that x, so each layer's logits and cache rows are checked
      within the bound of that layer alone, ~100 times tighter.
   The kernel's cache is paged through scattered block tables (llama_ref.h), the reference's is plain:
   every written row is compared where the table puts it, and no other row of the pool may change.

   3. A prompt prefilled whole, in three uneven chunks, and as a suffix after a prefix of blocks another
      sequence wrote: the same bits (see chunks_equal_whole).

   4. The W4A8 route: a digest of its bits (see w4a8_digest).

   Perturbed: the last logit of each check as if two neighbouring weights of its row of the output
   matrix were swapped (a wrong interleave on load), the largest such change over the row. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "llama_ref.h"

static cache_t whole, layered;  /* the two runs' caches, kernel's and reference's */

/* Logits against the reference, every cache row written so far where the tables put it, and the rest of
   the pool untouched (still zero); returns ok, raises *worst. */
static int compare_call(const cache_t *C, float *logits, const double *want, const double *bound, long n,
                        const double *hlast, double *worst) {
    double swap = 0.0;
    for (long k = 0; k + 1 < D; k += 2) {
        const double *wr = M.head.w + (V - 1) * D, s = fabs((wr[k] - wr[k + 1]) * (hlast[k] - hlast[k + 1]));
        swap = s > swap ? s : swap;
    }
    if (perturb) logits[n * V - 1] += (float)swap;
    float *got = alloc(sizeof(float) * 2 * CACHE);
    double *cw = alloc(sizeof(double) * 2 * CACHE), *cb = alloc(sizeof(double) * 2 * CACHE);
    char *mine = alloc(CACHE / DH);
    long used = 0, stray = 0;
    for (long c = 0; c < CACHE / DH; c++)
        if (C->written[c]) {  /* c = ((l * S + s) * HKV + g) * T + t */
            const long t = c % T, g = c / T % HKV, s = c / T / HKV % S, l = c / T / HKV / S;
            const long row = pooled(C, l, s, g, t);
            mine[row] = 1;
            for (long j = 0; j < DH; j++, used++) {
                got[used] = C->kc[row * DH + j], cw[used] = C->rk[c * DH + j], cb[used] = C->ek[c * DH + j];
                got[CACHE + used] = C->vc[row * DH + j], cw[CACHE + used] = C->rv[c * DH + j], cb[CACHE + used] = C->ev[c * DH + j];
            }
        }
    for (long i = 0; i < CACHE; i++) stray += !mine[i / DH] && (C->kc[i] != 0.0f || C->vc[i] != 0.0f);
    int ok_logits, ok_k, ok_v;
    *worst = fmax(*worst, compare(logits, want, bound, n * V, &ok_logits));
    *worst = fmax(*worst, fmax(compare(got, cw, cb, used, &ok_k), compare(got + CACHE, cw + CACHE, cb + CACHE, used, &ok_v)));
    free(got), free(cw), free(cb), free(mine);
    return ok_logits && ok_k && ok_v && stray == 0;
}

static void step(const char *what, const long *tok, const long *pos, const long *seqs, long B, const long *rows, long R) {
    const long n = rows ? R : B;
    long dims[13] = {L, D, H, HKV, DH, I, V, B, BS, T / BS, rows ? R : 0, 0, L};
    float *x = alloc(sizeof(float) * B * D), *x0 = alloc(sizeof(float) * B * D), *logits = alloc(sizeof(float) * n * V);
    double *want = alloc(sizeof(double) * n * V), *bound = alloc(sizeof(double) * n * V), hlast[D], worst = 0.0;
    char name[200];

    for (long b = 0; b < B; b++) memcpy(x + b * D, M.embed + tok[b] * D, sizeof(float) * D);
    llama_decode(M.w, dims, EPS, x, pos, seqs, whole.tables[0], M.cos, M.sin, whole.kc, whole.vc, rows, logits);
    forward_ref(&whole, 0, L, NULL, tok, pos, seqs, B, rows, n, want, bound, hlast);
    int ok = compare_call(&whole, logits, want, bound, n, hlast, &worst);
    snprintf(name, sizeof name, "llama_decode %s: %ld logits, the cache", what, n * V);
    report(name, ok, worst);

    const void *w[PER_LAYER + 5];
    const long per_layer = HKV * BS * DH;  /* a layer's floats within a block */
    dims[0] = 1, ok = 1, worst = 0.0;
    for (long b = 0; b < B; b++) memcpy(x + b * D, M.embed + tok[b] * D, sizeof(float) * D);
    for (long l = 0; l < L; l++) {
        memcpy(w, M.w + l * PER_LAYER, sizeof(void *) * PER_LAYER);
        memcpy(w + PER_LAYER, M.w + L * PER_LAYER, sizeof(void *) * 5);
        memcpy(x0, x, sizeof(float) * B * D);
        llama_decode(w, dims, EPS, x, pos, seqs, layered.tables[0], M.cos, M.sin, layered.kc + l * per_layer,
                     layered.vc + l * per_layer, rows, logits);
        forward_ref(&layered, l, l + 1, x0, tok, pos, seqs, B, rows, n, want, bound, hlast);
        ok &= compare_call(&layered, logits, want, bound, n, hlast, &worst);
    }
    snprintf(name, sizeof name, "llama_decode %s, one layer per call: %ld logits per layer, the cache", what, n * V);
    report(name, ok, worst);
    free(x), free(x0), free(logits), free(want), free(bound);
}

/* 3. A prompt of T tokens three ways, each row of every call on the same products (panels: every call has
   more than PANEL_MIN rows) and the same attention (attend walks the blocks in key order): sequence 0
   whole in one call; sequence 1 in chunks of 5, 6 and 5 rows, each continuing from the last (chunks
   cross block boundaries); sequence 2, whose first two blocks are sequence 0's (a cached prefix),
   prefills only positions 8..15. The last logits and every cache row must be the same bits. */
static void chunks_equal_whole(void) {
    static cache_t c;
    const long tables[3][T / BS] = {{5, 2, 7, 0}, {3, 6, 1, 4}, {5, 2, 9, 12}};
    long tok[T], pos[T], seq[T];
    float x[T * D], logits[3][V];
    for (long i = 0; i < T; i++) tok[i] = (i * 37 + 11) % V, pos[i] = i;
    /* calls: (sequence, first position, rows) */
    const long calls[5][3] = {{0, 0, T}, {1, 0, 5}, {1, 5, 6}, {1, 11, 5}, {2, 8, 8}};
    for (int k = 0; k < 5; k++) {
        const long s = calls[k][0], p0 = calls[k][1], B = calls[k][2], last[1] = {B - 1};
        const long dims[13] = {L, D, H, HKV, DH, I, V, B, BS, T / BS, 1, 0, L};
        for (long b = 0; b < B; b++) memcpy(x + b * D, M.embed + tok[p0 + b] * D, sizeof(float) * D), seq[b] = s;
        llama_decode(M.w, dims, EPS, x, pos + p0, seq, tables[0], M.cos, M.sin, c.kc, c.vc, last,
                     logits[k == 0 ? 0 : k < 4 ? 1 : 2]);
    }
    if (perturb) logits[2][V - 1] = nextafterf(logits[2][V - 1], INFINITY);
    int same_rows = 1;
    for (long s = 1; s < 3; s++)  /* sequences 1 and 2's blocks against sequence 0's */
        for (long b = 0; b < T / BS; b++) {
            const long n = L * HKV * BS * DH;
            same_rows &= !memcmp(c.kc + tables[s][b] * n, c.kc + tables[0][b] * n, sizeof(float) * n);
            same_rows &= !memcmp(c.vc + tables[s][b] * n, c.vc + tables[0][b] * n, sizeof(float) * n);
        }
    const int ok = same_rows && !memcmp(logits[1], logits[0], sizeof logits[0]) && !memcmp(logits[2], logits[0], sizeof logits[0]);
    report("llama_decode: a prompt in 3 chunks, and its suffix after a shared prefix, gives the whole prompt's bits", ok, 0.0);
}

/* FNV-1a over the bytes of n floats, continuing from h. */
static uint64_t digest(uint64_t h, const float *x, long n) {
    const unsigned char *b = (const unsigned char *)x;
    for (long i = 0; i < n * (long)sizeof(float); i++) h = (h ^ b[i]) * 0x100000001B3ull;
    return h;
}

/* 3. The W4A8 route of the step (8-bit activations, w4a8.c's panels, the output matrix's W8A8 panels)
   has no smooth reference: rounding the activations jumps with the inputs. The kernels run it in one
   fixed order of float32 operations on every path, so its logits and cache must be the same bits
   everywhere: this prints their digest over a prefill, a step and a batch, and the build's test compares
   the digests of all paths (the x86 paths' against the torch route are tested in Python). */
static void w4a8_digest(void) {
    static cache_t c;
    const void *w[L * PER_LAYER + 5];
    memcpy(w, M.w, sizeof w);
    for (long l = 0; l < L; l++) {
        const mat_t *mats[] = {&M.qkv[l], &M.o[l], &M.gu[l], &M.down[l]};
        const int at[] = {QKV, O, GU, DOWN};
        for (int i = 0; i < 4; i++) {
            const mat_t *a = mats[i];
            const long G = a->K / QK;
            uint8_t *pq = alloc(a->N * a->K / 2);
            float *pd = alloc(sizeof(float) * a->N * G), *pm = alloc(sizeof(float) * a->N * G);
            w4a8_repack(a->q, a->d, a->m, a->N, a->K, pq, pd, pm);
            w[l * PER_LAYER + at[i] + MPQ] = pq, w[l * PER_LAYER + at[i] + MPD] = pd, w[l * PER_LAYER + at[i] + MPM] = pm;
        }
    }
    uint8_t *hq = alloc(V * D);
    float *hd = alloc(sizeof(float) * V * D / QK);
    w8a8_repack(M.head.q8, M.head.d, V, D, hq, hd);
    w[L * PER_LAYER + 3] = hq, w[L * PER_LAYER + 4] = hd;
    /* a prefill of 5 in sequence 1, a step, a batch of 3, a chunk of 4 continuing sequence 1 */
    const long tok[5] = {3, 17, 95, 42, 0}, calls = 4, Bs[4] = {5, 1, 3, 4};
    const long pos[4][5] = {{0, 1, 2, 3, 4}, {5}, {6, 0, 0}, {7, 8, 9, 10}}, last[4][1] = {{4}, {0}, {0}, {3}};
    const long seqs[4][5] = {{1, 1, 1, 1, 1}, {1}, {1, 0, 2}, {1, 1, 1, 1}};
    uint64_t h = 0xCBF29CE484222325ull;
    float x[5 * D], logits[3 * V];
    scatter_tables(&c);
    for (long i = 0; i < calls; i++) {
        const int some = i == 0 || i == 3;  /* the calls that want their last row's logits only */
        const long B = Bs[i], dims[13] = {L, D, H, HKV, DH, I, V, B, BS, T / BS, some, 1, L};
        for (long b = 0; b < B; b++) memcpy(x + b * D, M.embed + tok[(b + i) % 5] * D, sizeof(float) * D);
        llama_decode(w, dims, EPS, x, pos[i], seqs[i], c.tables[0], M.cos, M.sin, c.kc, c.vc, some ? last[i] : NULL, logits);
        h = digest(h, logits, (some ? 1 : B) * V);
    }
    printf("digest of the w4a8 step: %016llx\n", (unsigned long long)digest(digest(h, c.kc, CACHE), c.vc, CACHE));
}

void llama_checks(void) {
    rng_t r = {4};
    build_model(&r);
    scatter_tables(&whole), scatter_tables(&layered);
    const long tok[8] = {3, 17, 95, 42, 0, 64, 8, 71}, rows1[1] = {4}, rows2[2] = {4, 7};
    char what[120];
    for (long p = 0; p < 4; p++) {  /* one sequence (2), token by token */
        const long pos[1] = {p}, seq[1] = {2};
        snprintf(what, sizeof what, "one sequence, position %ld", p);
        step(what, tok + p, pos, seq, 1, NULL, 0);
    }
    /* A batch of 3 of sequences 0, 1, 3 at different positions (the first had one step alone). */
    step("batch: the first sequence alone, position 0", tok, (long[]){0}, (long[]){0}, 1, NULL, 0);
    step("batch of 3 at positions 1, 0, 0", tok + 1, (long[]){1, 0, 0}, (long[]){0, 1, 3}, 3, NULL, 0);
    step("batch of 3 at positions 2, 1, 1", tok + 4, (long[]){2, 1, 1}, (long[]){0, 1, 3}, 3, NULL, 0);
    /* A prefill of a 5-token prompt (5 rows: the panel products), its last row's logits, then a step on. */
    step("prefill of 5 tokens in sequence 1", tok, (long[]){0, 1, 2, 3, 4}, (long[]){1, 1, 1, 1, 1}, 5, rows1, 1);
    step("a step after the prefill, position 5", tok + 5, (long[]){5}, (long[]){1}, 1, NULL, 0);
    /* Two prompts together, 5 tokens in sequence 2 and 3 in sequence 3, then both decode in one batch. */
    step("prefill of prompts of 5 and 3 tokens", tok, (long[]){0, 1, 2, 3, 4, 0, 1, 2}, (long[]){2, 2, 2, 2, 2, 3, 3, 3}, 8,
         rows2, 2);
    step("batch of 2 after that prefill, positions 5, 3", tok + 6, (long[]){5, 3}, (long[]){2, 3}, 2, NULL, 0);
    /* A chunk of 4 continuing sequence 1 (positions 6..9, across a block boundary), then one call
       mixing steps of sequences 3 and 2 with a chunk of sequence 1 (positions 10..12). */
    step("a chunk continuing sequence 1, positions 6..9", tok + 2, (long[]){6, 7, 8, 9}, (long[]){1, 1, 1, 1}, 4,
         (long[]){3}, 1);
    step("steps of sequences 3, 2 at 4, 6 mixed with a chunk of sequence 1 at 10..12", tok + 1, (long[]){4, 10, 11, 12, 6},
         (long[]){3, 1, 1, 1, 2}, 5, (long[]){0, 3, 4}, 3);
    chunks_equal_whole();
    w4a8_digest();
}
