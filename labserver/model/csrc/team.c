/* The threads' share of the work (kernels.h), and what the library was compiled to. */
#include <stdlib.h>

#include "kernels.h"
#if !defined(__AVX512F__)
#include "simd.h"
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
