/* hookscope statistics kernels (see hookscope_kernels.h for the interface).
 *
 * Layout. Every supported tensor is described as a dense block (outer, units, inner); three passes cover it:
 *   - flat: counts over a run of consecutive elements (the whole tensor when no per-unit count is asked or there
 *     is one unit; one unit's run of `inner` elements in the segment pass used when inner >= HS_SEG_MIN);
 *   - rows: rows of L = units * inner elements accumulated position by position into int32 counters, then folded
 *     into units (unit-last layouts, channels_last, and (N, C, small spatial) outputs). Rows shorter than
 *     HS_ROW_MIN are grouped m at a time (a row of m * L elements) so that vector lanes stay full.
 * Vectorisation. The passes are plain loops over element predicates written with comparisons and integer
 * arithmetic only (16-bit floats compare as order-preserving integer keys, never converted), which the compiler
 * vectorises; the file is compiled once for the baseline instruction set and once more for AVX2 (gcc and clang on
 * x86 only), the AVX2 code being chosen at run time when the CPU has it.
 * Threading. Calls of more than HS_GRAIN elements split the work into contiguous ranges over an OpenMP team of
 * ceil(elements / HS_GRAIN) threads at most (the caller says how many it may have), the rule torch's own
 * parallel_for follows for elementwise operations: each thread then mostly reads the part of the tensor it has
 * just written in its own cache (an activation's output, its gradient), instead of one thread reading it all from
 * the other cores' caches. Each thread counts into its own scratch and the results are merged in a fixed order
 * (sums of squares block by block), so results do not depend on the number of threads.
 * Accumulation. Counts are exact (integers, added to the float64 outputs once per call); sums of squares use
 * HS_LANES float partial sums per block of HS_BLOCK elements, float64 across blocks. */

#include "hookscope_kernels.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifndef HS_SOURCE_HASH
#define HS_SOURCE_HASH ""
#endif

#define HS_CAT_(a, b) a##b
#define HS_CAT(a, b) HS_CAT_(a, b)
#define HS_CAT3_(a, b, c) a##_##b##_##c
#define HS_CAT3(a, b, c) HS_CAT3_(a, b, c)
#define HS_STR_(a) #a
#define HS_STR(a) HS_STR_(a)

#if defined(__GNUC__) || defined(__clang__)
#define HS_INLINE inline __attribute__((always_inline))
#define HS_RESTRICT __restrict__
#define HS_EXPORT __attribute__((visibility("default")))
#else
#define HS_INLINE inline
#define HS_RESTRICT
#define HS_EXPORT
#endif

/* Elements per counting chunk (int32 counters never overflow within one). */
#define HS_CHUNK ((int64_t)1 << 30)
/* Elements per block of the sum of squares (float lanes), and float lanes per block. */
#define HS_BLOCK 4096
#define HS_LANES 32
/* Per-unit runs at least this long use the segment pass; shorter ones the rows pass. */
#define HS_SEG_MIN 64
/* The rows pass keeps one int32 counter per position of a row: at most this many (else: segment pass). */
#define HS_ROW_MAX ((int64_t)1 << 16)
/* Rows shorter than this are grouped. */
#define HS_ROW_MIN 64
/* Elements per thread of a parallel call at least: torch's at::internal::GRAIN_SIZE, so that a call splits its
 * tensor as torch split the operation that wrote it. */
#ifndef HS_GRAIN
#define HS_GRAIN ((int64_t)32768)
#endif
#define HS_MAX_THREADS 256

/* Thresholds of one call, in the forms the dtypes compare with. */
typedef struct {
    double lo64, hi64; /* float64: x < lo64, x > hi64 */
    float lo32, hi32;  /* float32 */
    int16_t klo, khi;  /* bfloat16 / float16: integer keys */
} hs_thr;

typedef void (*hs_flat_fn)(const void *x, int64_t n, const hs_thr *t, int64_t *out);
typedef void (*hs_rows_fn)(const void *x, int64_t rows, int64_t L, int32_t *acc, const hs_thr *t, int64_t *out);
typedef void (*hs_sumsq_fn)(const void *x, int64_t n, int64_t b0, int64_t b1, double *part, double *sum,
                            int64_t *bad);

typedef struct {
    hs_flat_fn flat[8]; /* by positive * 4 + saturated * 2 + nonfinite */
    hs_rows_fn rows[4]; /* by saturated * 2 + nonfinite */
    hs_sumsq_fn sumsq[2];
} hs_dtype_fns;

typedef struct {
    const char *name;
    hs_dtype_fns dt[4];
} hs_impl;

/* -- bit helpers shared by every instruction set ---------------------------------------------------------------- */

static HS_INLINE float hs_bits_f32(uint32_t b) {
    float f;
    memcpy(&f, &b, sizeof f);
    return f;
}

static HS_INLINE uint32_t hs_f32_bits(float f) {
    uint32_t b;
    memcpy(&b, &f, sizeof b);
    return b;
}

/* float16 -> float32, exact, with integer arithmetic and normal floats only (correct under flush-to-zero and
 * denormals-are-zero modes; after F. Giesen's half_to_float). */
static HS_INLINE float hs_f16_f32(uint16_t h) {
    uint32_t o = (uint32_t)(h & 0x7fff) << 13;
    uint32_t e = o & (0x7c00u << 13);
    o += (uint32_t)(127 - 15) << 23;
    float f;
    if (e == (0x7c00u << 13)) {
        o += (uint32_t)(128 - 16) << 23; /* infinity, NaN */
        f = hs_bits_f32(o);
    } else if (e == 0) {
        f = hs_bits_f32(o + (1u << 23)) - hs_bits_f32(113u << 23); /* zero, subnormal: renormalise */
    } else {
        f = hs_bits_f32(o);
    }
    return hs_bits_f32(hs_f32_bits(f) | (uint32_t)(h & 0x8000) << 16);
}

/* -- the instruction sets ------------------------------------------------------------------------------------ */

#define HS_HAVE_F16C 0
#define HS_ISA baseline
#include "hs_isa.inc"
#undef HS_ISA
#undef HS_HAVE_F16C

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__)) && !defined(HS_NO_DISPATCH)
#define HS_X86_DISPATCH 1
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#endif
#include <immintrin.h>
#define HS_HAVE_F16C 1
#define HS_ISA avx2
#include "hs_isa.inc"
#include "hs_mag_avx2.inc"
#undef HS_ISA
#undef HS_HAVE_F16C
#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,f16c"))), \
                             apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,f16c")
#endif
#include "hs_mag_avx512.inc"
#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#else
#define HS_X86_DISPATCH 0
#endif

static const hs_impl *g_impl = NULL;
static int g_mag512 = 0; /* the magnitude pass runs its AVX-512 code ("avx512": the other passes run AVX2's) */

#if HS_X86_DISPATCH
static int hs_cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}

static int hs_cpu_has_avx512(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
#endif

HS_EXPORT int32_t hs_select_isa(int32_t isa) {
    g_mag512 = 0;
#if HS_X86_DISPATCH
    if (isa != HS_ISA_BASELINE && hs_cpu_has_avx2()) {
        g_impl = &hs_impl_avx2;
        if (isa != HS_ISA_AVX2 && hs_cpu_has_avx512()) {
            g_mag512 = 1;
            return HS_ISA_AVX512;
        }
        return HS_ISA_AVX2;
    }
#endif
    (void)isa;
    g_impl = &hs_impl_baseline;
    return HS_ISA_BASELINE;
}

static const hs_impl *hs_get_impl(void) {
    if (g_impl == NULL) hs_select_isa(HS_ISA_BEST);
    return g_impl;
}

HS_EXPORT int32_t hs_abi_version(void) { return HS_ABI_VERSION; }
HS_EXPORT const char *hs_source_hash(void) { return HS_SOURCE_HASH; }
HS_EXPORT const char *hs_isa(void) {
    const hs_impl *impl = hs_get_impl();
    return g_mag512 ? "avx512" : impl->name;
}

HS_EXPORT int32_t hs_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* -- threads ---------------------------------------------------------------------------------------------------- */

typedef void (*hs_task)(void *ctx, int t, int nt);

/* Run task(ctx, t, nt) for t < nt on a team of (up to) `threads` threads; nt is the team's actual size. */
static void hs_run(int threads, hs_task task, void *ctx) {
#ifdef _OPENMP
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        task(ctx, omp_get_thread_num(), omp_get_num_threads());
        return;
    }
#endif
    (void)threads;
    task(ctx, 0, 1);
}

static int hs_threads(int32_t threads, int64_t work) {
    int64_t most = work < HS_GRAIN ? 1 : (work + HS_GRAIN - 1) / HS_GRAIN;
    if (threads > HS_MAX_THREADS) threads = HS_MAX_THREADS;
    if (most < threads) threads = (int32_t)most;
    return threads < 1 ? 1 : threads;
}

/* [*lo, *hi) of `count` items for thread t of nt, in multiples of `align` items. */
static void hs_range(int64_t count, int t, int nt, int64_t align, int64_t *lo, int64_t *hi) {
    int64_t groups = (count + align - 1) / align;
    int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
    *lo = g0 * align < count ? g0 * align : count;
    *hi = g1 * align < count ? g1 * align : count;
}

/* -- thresholds ------------------------------------------------------------------------------------------------- */

static int hs_elem_size(int32_t dtype) { return dtype == HS_F32 ? 4 : dtype == HS_F64 ? 8 : 2; }

static double hs_key_value(int32_t k, int32_t dtype) {
    uint16_t bits = (uint16_t)(k >= 0 ? k : (0x8000 | -k));
    return dtype == HS_BF16 ? (double)hs_bits_f32((uint32_t)bits << 16) : (double)hs_f16_f32(bits);
}

/* The largest key whose value is <= t (floor) or the smallest whose value is >= t (not floor), t not NaN. */
static int16_t hs_key_round(double t, int32_t dtype, int floor) {
    int32_t inf = dtype == HS_BF16 ? 0x7f80 : 0x7c00;
    int32_t lo = -inf, hi = inf;
    if (floor) {
        if (hs_key_value(hi, dtype) <= t) return (int16_t)hi;
        while (hi - lo > 1) { /* invariant: value(lo) <= t < value(hi) */
            int32_t mid = lo + (hi - lo) / 2;
            if (hs_key_value(mid, dtype) <= t) lo = mid;
            else hi = mid;
        }
        return (int16_t)lo;
    }
    if (hs_key_value(lo, dtype) >= t) return (int16_t)lo;
    while (hi - lo > 1) { /* invariant: value(lo) < t <= value(hi) */
        int32_t mid = lo + (hi - lo) / 2;
        if (hs_key_value(mid, dtype) >= t) hi = mid;
        else lo = mid;
    }
    return (int16_t)hi;
}

static void hs_thresholds(hs_thr *t, int32_t dtype, int32_t bounds, double lower, double upper) {
    /* an absent (or NaN) bound compares false with every element */
    t->lo64 = (bounds & HS_LOWER) && !isnan(lower) ? lower : -INFINITY;
    t->hi64 = (bounds & HS_UPPER) && !isnan(upper) ? upper : INFINITY;
    /* float32: x < lo <=> x < (smallest float >= lo);  x > hi <=> x > (largest float <= hi) */
    float lo = (float)t->lo64, hi = (float)t->hi64;
    if ((double)lo < t->lo64) lo = nextafterf(lo, INFINITY);
    if ((double)hi > t->hi64) hi = nextafterf(hi, -INFINITY);
    t->lo32 = lo;
    t->hi32 = hi;
    t->klo = t->khi = 0;
    if (dtype == HS_BF16 || dtype == HS_F16) {
        t->klo = hs_key_round(t->lo64, dtype, 0);
        t->khi = hs_key_round(t->hi64, dtype, 1);
    }
}

/* -- output statistics ---------------------------------------------------------------------------------------- */

typedef struct {
    const char *x;
    int esize;
    int64_t outer, units, inner, n;
    const hs_dtype_fns *fns;
    int flags; /* positive * 4 + saturated * 2 + nonfinite */
    hs_thr thr;
    int64_t tot[HS_MAX_THREADS][3];
    int64_t *local;  /* per-thread per-unit counts (units each), or NULL: one thread, into positive */
    int32_t *acc;    /* rows pass: per-thread position counters (lp each) */
    int64_t m, lp;   /* rows pass: rows per group, counters per thread */
    double *positive;
} hs_out_ctx;

static void hs_flat_task(void *p, int t, int nt) {
    hs_out_ctx *c = (hs_out_ctx *)p;
    int64_t lo, hi;
    hs_range(c->n, t, nt, 64, &lo, &hi);
    if (hi > lo) c->fns->flat[c->flags](c->x + lo * c->esize, hi - lo, &c->thr, c->tot[t]);
}

/* One unit's run of `inner` elements at a time. */
static void hs_segment_task(void *p, int t, int nt) {
    hs_out_ctx *c = (hs_out_ctx *)p;
    int64_t lo, hi;
    hs_range(c->outer * c->units, t, nt, 1, &lo, &hi);
    hs_flat_fn fn = c->fns->flat[c->flags];
    int64_t *local = c->local ? c->local + (int64_t)t * c->units : NULL;
    for (int64_t s = lo; s < hi; s++) {
        int64_t before = c->tot[t][0];
        fn(c->x + s * c->inner * c->esize, c->inner, &c->thr, c->tot[t]);
        int64_t u = s % c->units, count = c->tot[t][0] - before;
        if (local) local[u] += count;
        else c->positive[u] += (double)count;
    }
}

/* Groups of m rows (a row: units * inner elements) accumulated position by position, then folded into units. */
static void hs_rows_task(void *p, int t, int nt) {
    hs_out_ctx *c = (hs_out_ctx *)p;
    int64_t L = c->units * c->inner, groups = c->outer / c->m, rest = c->outer % c->m;
    int64_t lo, hi;
    hs_range(groups, t, nt, 1, &lo, &hi);
    int32_t *acc = c->acc + (int64_t)t * c->lp;
    int64_t *local = c->local ? c->local + (int64_t)t * c->units : NULL;
    hs_rows_fn fn = c->fns->rows[c->flags & 3];
    int last = t == nt - 1 && rest > 0;
    int64_t limit = ((int64_t)1 << 30); /* groups per flush: int32 counters never overflow */
    for (int64_t g = lo; g < hi || last; g += limit) {
        int64_t count = hi - g < limit ? hi - g : limit;
        if (count < 0) count = 0;
        memset(acc, 0, (size_t)c->lp * sizeof *acc);
        if (count > 0) fn(c->x + g * c->lp * c->esize, count, c->lp, acc, &c->thr, c->tot[t]);
        if (last && g + count >= hi) { /* the rows that do not fill a group, as one shorter row */
            fn(c->x + groups * c->lp * c->esize, 1, rest * L, acc, &c->thr, c->tot[t]);
            last = 0;
        }
        for (int64_t r = 0, j = 0; r < c->m; r++)
            for (int64_t u = 0; u < c->units; u++) {
                int64_t s = 0;
                for (int64_t i = 0; i < c->inner; i++, j++) s += acc[j];
                if (local) local[u] += s;
                else c->positive[u] += (double)s;
            }
        if (count == 0) break;
    }
}

static int hs_mul(int64_t a, int64_t b, int64_t *out) {
    if (a < 0 || b < 0) return 0;
    if (a != 0 && b > INT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}

HS_EXPORT int32_t hs_output_stats(const void *x, int32_t dtype, int64_t outer, int64_t units, int64_t inner,
                                  double *positive, double *saturated, int32_t bounds, double lower, double upper,
                                  double *nonfinite, int32_t threads) {
    if (dtype < HS_F32 || dtype > HS_F16) return HS_EDTYPE;
    int64_t plane, n;
    if (!hs_mul(units, inner, &plane) || !hs_mul(outer, plane, &n)) return HS_ESIZE;
    if (n == 0) return 0;
    if (x == NULL) return HS_ENULL;
    int want_pos = positive != NULL;
    int sat_all = saturated != NULL && (bounds & 3) == 3 && lower > upper; /* the bands cover every value */
    int want_sat = saturated != NULL && !sat_all && (bounds & 3) != 0;
    int want_nf = nonfinite != NULL;

    hs_out_ctx ctx, *c = &ctx; /* on the stack: no allocation for the common single-threaded call */
    c->x = (const char *)x;
    c->esize = hs_elem_size(dtype);
    c->outer = outer;
    c->units = units;
    c->inner = inner;
    c->n = n;
    c->fns = &hs_get_impl()->dt[dtype];
    c->local = NULL;
    c->acc = NULL;
    c->m = c->lp = 0;
    c->positive = positive;
    hs_thresholds(&c->thr, dtype, bounds, lower, upper);
    int nt = hs_threads(threads, n);
    hs_task task = hs_flat_task;
    if (want_pos && units > 1) {
        if (inner >= HS_SEG_MIN || plane > HS_ROW_MAX) {
            task = hs_segment_task;
        } else {
            task = hs_rows_task;
            c->m = plane >= HS_ROW_MIN ? 1 : (HS_ROW_MIN + plane - 1) / plane;
            if (c->m > outer) c->m = outer;
            c->lp = c->m * plane;
            if (outer / c->m < nt) nt = (int)(outer / c->m) > 0 ? (int)(outer / c->m) : 1;
            c->acc = (int32_t *)malloc((size_t)(nt * c->lp) * sizeof *c->acc);
            if (c->acc == NULL) return HS_ENOMEM;
        }
        if (nt > 1) {
            c->local = (int64_t *)calloc((size_t)(nt * units), sizeof *c->local);
            if (c->local == NULL) {
                free(c->acc);
                return HS_ENOMEM;
            }
        }
    }
    c->flags = (want_pos ? 4 : 0) | (want_sat ? 2 : 0) | (want_nf ? 1 : 0);
    memset(c->tot, 0, (size_t)nt * sizeof c->tot[0]);
    hs_run(nt, task, c);

    int64_t pos = 0, sat = 0, nf = 0;
    for (int t = 0; t < nt; t++) {
        pos += c->tot[t][0];
        sat += c->tot[t][1];
        nf += c->tot[t][2];
    }
    if (want_pos) {
        if (task == hs_flat_task) positive[0] += (double)pos; /* one unit */
        else if (c->local)
            for (int64_t u = 0; u < units; u++) {
                int64_t s = 0;
                for (int t = 0; t < nt; t++) s += c->local[(int64_t)t * units + u];
                positive[u] += (double)s;
            }
    }
    if (saturated) *saturated += sat_all ? (double)n : (double)sat;
    if (nonfinite) *nonfinite += (double)nf;
    free(c->local);
    free(c->acc);
    return 0;
}

HS_EXPORT int32_t hs_output_stats_prepared(const void *x, const hs_output_args *a) {
    return hs_output_stats(x, a->dtype, a->outer, a->units, a->inner, a->positive, a->saturated, a->bounds, a->lower,
                           a->upper, a->nonfinite, a->threads);
}

/* -- gradient statistics -------------------------------------------------------------------------------------- */

typedef struct {
    const char *x;
    int64_t n, blocks;
    hs_sumsq_fn fn;
    double *part;
    int64_t bad[HS_MAX_THREADS];
} hs_grad_ctx;

static void hs_grad_task(void *p, int t, int nt) {
    hs_grad_ctx *c = (hs_grad_ctx *)p;
    int64_t lo, hi;
    hs_range(c->blocks, t, nt, 1, &lo, &hi);
    if (hi > lo) c->fn(c->x, c->n, lo, hi, c->part + lo, NULL, &c->bad[t]);
}

HS_EXPORT int32_t hs_grad_stats(const void *g, int32_t dtype, int64_t n, double *sumsq, double scale,
                                const void *scale_ptr, int32_t scale_dtype, double *nonfinite, int32_t threads) {
    if (dtype < HS_F32 || dtype > HS_F16) return HS_EDTYPE;
    if (n < 0) return HS_ESIZE;
    if (n == 0) return 0;
    if (g == NULL) return HS_ENULL;
    if (scale_ptr != NULL) {
        if (scale_dtype == HS_F32) scale = (double)*(const float *)scale_ptr;
        else if (scale_dtype == HS_F64) scale = *(const double *)scale_ptr;
        else return HS_EDTYPE;
    }
    const hs_dtype_fns *fns = &hs_get_impl()->dt[dtype];
    int want_nf = nonfinite != NULL;
    double total = 0.0;
    int64_t bad = 0;
    int64_t blocks = (n + HS_BLOCK - 1) / HS_BLOCK;
    int nt = hs_threads(threads, n);
    if (nt == 1) {
        fns->sumsq[want_nf](g, n, 0, blocks, NULL, &total, &bad);
    } else {
        hs_grad_ctx *c = (hs_grad_ctx *)calloc(1, sizeof *c);
        double *part = (double *)malloc((size_t)blocks * sizeof *part);
        if (c == NULL || part == NULL) {
            free(c);
            free(part);
            return HS_ENOMEM;
        }
        c->x = (const char *)g;
        c->n = n;
        c->blocks = blocks;
        c->fn = fns->sumsq[want_nf];
        c->part = part;
        hs_run(nt, hs_grad_task, c);
        for (int64_t b = 0; b < blocks; b++) total += part[b]; /* block order: as with one thread */
        for (int t = 0; t < nt; t++) bad += c->bad[t];
        free(part);
        free(c);
    }
    if (sumsq) *sumsq += scale == 1.0 ? total : total / (scale * scale);
    if (nonfinite) *nonfinite += (double)bad;
    return 0;
}

HS_EXPORT int32_t hs_grad_stats_prepared(const void *g, const hs_grad_args *a) {
    return hs_grad_stats(g, a->dtype, a->n, a->sumsq, a->scale, a->scale_ptr, a->scale_dtype, a->nonfinite,
                         a->threads);
}

/* -- DeadReLU's per-unit bookkeeping (float64, scalar: one pass over a few thousand to a few hundred thousand
 * values once per ring of steps; the arithmetic follows the ATen formulation in collectors/dead_relu.py step by
 * step, so both give the same values) ------------------------------------------------------------------------- */

HS_EXPORT int32_t hs_dead_units(int64_t T, int64_t U, int64_t S, const double *positive, int64_t pos_stride,
                                const double *elements, int64_t el_stride, const int64_t *owners,
                                const double *inverse, const double *steps, double first, double window,
                                double evidence, double *fired_at, double *silent, int32_t commit, double *revivals,
                                double *last_revival, double *died_at, double *last_fired, double *out) {
    if (T < 0 || U < 0 || S < 0 || (T > 1 && (pos_stride < U || el_stride < S))) return HS_ESIZE;
    if (T == 0 || U == 0) return 0;
    if (!positive || !elements || !owners || !inverse || !steps || !fired_at || !silent || !out) return HS_ENULL;
    if (commit && (!revivals || !last_revival || !died_at || !last_fired)) return HS_ENULL;
    for (int64_t u = 0; u < U; u++)
        if (owners[u] < 0 || owners[u] >= S) return HS_ESIZE;
    double *alive_out = out + T * S, *confirmed_out = out + 2 * T * S;
    for (int64_t u = 0; u < U; u++) {
        const int64_t s = owners[u];
        const double per_unit = inverse[s], kept = silent[u];
        double after = fired_at[u], total = 0.0, at_fire = 0.0, quiet = kept;
        double revived = 0.0, revived_at = -INFINITY, died = -INFINITY, fired_last = -INFINITY;
        int fired_in_block = 0;
        for (int64_t k = 0; k < T; k++) {
            const double o = first + (double)k, p = positive[k * pos_stride + u], before = after;
            const int fired = p > 0.0; /* NaN never fires */
            const double seen = elements[k * el_stride + s];
            if (seen == 0.0) after += 1.0; /* a step in which the site saw nothing does not count: see dead_relu.py */
            total += seen * per_unit;
            if (fired) {
                if (o > after) after = o;
                fired_in_block = 1;
                at_fire = total;
            }
            const int alive = after > o - window;
            quiet = fired_in_block ? total - at_fire : total + kept;
            out[k * S + s] += p;
            alive_out[k * S + s] += (double)alive;
            confirmed_out[k * S + s] += (double)(quiet >= evidence);
            if (commit) {
                const double t = steps[k], edge = o - 1.0 - window;
                if (fired && before > -INFINITY && before <= edge) {
                    revived += 1.0;
                    if (t > revived_at) revived_at = t;
                }
                if (before > edge && !alive && t > died) died = t;
                if (fired && t > fired_last) fired_last = t;
            }
        }
        if (commit) {
            fired_at[u] = after;
            silent[u] = quiet;
            revivals[u] += revived;
            if (revived_at > last_revival[u]) last_revival[u] = revived_at;
            if (died > died_at[u]) died_at[u] = died;
            if (fired_last > last_fired[u]) last_fired[u] = fired_last;
        }
    }
    return 0;
}

/* -- parameter statistics: norms of the weights and gradients and the size of the update, in one pass ---------- */

/* Work items of hs_param_stats: a run of at most HS_PARAM_CHUNK elements of one tensor. */
#define HS_PARAM_CHUNK ((int64_t)1 << 16)

typedef struct {
    int64_t n;
    const void *const *theta;
    void *const *prev;
    const void *const *grad;
    const int64_t *sizes;
    const int32_t *dtypes;
    const int64_t *first; /* first chunk of each tensor; first[n] chunks in all */
    double *part;         /* 3 sums per chunk */
} hs_param_ctx;

#define HS_PARAM_BLOCK(T, L)                                                                                        \
    static void hs_param_block_##T(const T *HS_RESTRICT t, T *HS_RESTRICT p, const T *HS_RESTRICT g, int64_t len,  \
                                   double *out) {                                                                   \
        for (int64_t b = 0; b < len; b += HS_BLOCK) {                                                              \
            const int64_t m = len - b < HS_BLOCK ? len - b : HS_BLOCK;                                             \
            L w[HS_LANES] = {0}, d[HS_LANES] = {0}, q[HS_LANES] = {0};                                             \
            const T *tb = t + b;                                                                                   \
            int64_t j = 0;                                                                                         \
            for (; j + HS_LANES <= m; j += HS_LANES)                                                               \
                for (int l = 0; l < HS_LANES; l++) w[l] += (L)tb[j + l] * (L)tb[j + l];                           \
            for (; j < m; j++) w[0] += (L)tb[j] * (L)tb[j];                                                        \
            if (p != NULL) {                                                                                       \
                T *pb = p + b;                                                                                     \
                for (j = 0; j + HS_LANES <= m; j += HS_LANES)                                                      \
                    for (int l = 0; l < HS_LANES; l++) {                                                           \
                        const L v = (L)tb[j + l] - (L)pb[j + l];                                                   \
                        d[l] += v * v;                                                                             \
                        pb[j + l] = tb[j + l];                                                                     \
                    }                                                                                              \
                for (; j < m; j++) {                                                                               \
                    const L v = (L)tb[j] - (L)pb[j];                                                               \
                    d[0] += v * v;                                                                                 \
                    pb[j] = tb[j];                                                                                 \
                }                                                                                                  \
            }                                                                                                      \
            if (g != NULL) {                                                                                       \
                const T *gb = g + b;                                                                               \
                for (j = 0; j + HS_LANES <= m; j += HS_LANES)                                                      \
                    for (int l = 0; l < HS_LANES; l++) q[l] += (L)gb[j + l] * (L)gb[j + l];                       \
                for (; j < m; j++) q[0] += (L)gb[j] * (L)gb[j];                                                    \
            }                                                                                                      \
            double sw = 0.0, sd = 0.0, sq = 0.0;                                                                   \
            for (int l = 0; l < HS_LANES; l++) {                                                                   \
                sw += (double)w[l];                                                                                \
                sd += (double)d[l];                                                                                \
                sq += (double)q[l];                                                                                \
            }                                                                                                      \
            out[0] += sw;                                                                                          \
            out[1] += sq;                                                                                          \
            out[2] += sd;                                                                                          \
        }                                                                                                          \
    }

HS_PARAM_BLOCK(float, float)
HS_PARAM_BLOCK(double, double)

static void hs_param_task(void *ctx, int t, int nt) {
    const hs_param_ctx *c = (const hs_param_ctx *)ctx;
    int64_t lo, hi;
    hs_range(c->first[c->n], t, nt, 1, &lo, &hi);
    int64_t i = 0;
    for (int64_t k = lo; k < hi; k++) {
        while (c->first[i + 1] <= k) i++;
        const int64_t start = (k - c->first[i]) * HS_PARAM_CHUNK;
        const int64_t len = c->sizes[i] - start < HS_PARAM_CHUNK ? c->sizes[i] - start : HS_PARAM_CHUNK;
        double *out = c->part + 3 * k;
        if (c->dtypes[i] == HS_F32)
            hs_param_block_float((const float *)c->theta[i] + start, c->prev[i] ? (float *)c->prev[i] + start : NULL,
                                 c->grad[i] ? (const float *)c->grad[i] + start : NULL, len, out);
        else
            hs_param_block_double((const double *)c->theta[i] + start,
                                  c->prev[i] ? (double *)c->prev[i] + start : NULL,
                                  c->grad[i] ? (const double *)c->grad[i] + start : NULL, len, out);
    }
}

HS_EXPORT int32_t hs_param_stats(int64_t n, const void *const *theta, void *const *prev, const void *const *grad,
                                 const int64_t *sizes, const int32_t *dtypes, double *out, int32_t threads) {
    if (n < 0) return HS_ESIZE;
    if (n == 0) return 0;
    if (!theta || !prev || !grad || !sizes || !dtypes || !out) return HS_ENULL;
    int64_t *first = (int64_t *)malloc((size_t)(n + 1) * sizeof *first);
    if (first == NULL) return HS_ENOMEM;
    int64_t total = 0;
    first[0] = 0;
    for (int64_t i = 0; i < n; i++) {
        if (dtypes[i] != HS_F32 && dtypes[i] != HS_F64) {
            free(first);
            return HS_EDTYPE;
        }
        if (sizes[i] < 0) {
            free(first);
            return HS_ESIZE;
        }
        if (sizes[i] > 0 && theta[i] == NULL) {
            free(first);
            return HS_ENULL;
        }
        first[i + 1] = first[i] + (sizes[i] + HS_PARAM_CHUNK - 1) / HS_PARAM_CHUNK;
        total += sizes[i];
    }
    double *part = (double *)calloc((size_t)(3 * first[n] + 1), sizeof *part);
    if (part == NULL) {
        free(first);
        return HS_ENOMEM;
    }
    hs_param_ctx c = {n, theta, prev, grad, sizes, dtypes, first, part};
    hs_run(hs_threads(threads, total), hs_param_task, &c);
    for (int64_t i = 0; i < n; i++) { /* chunk order: the same sums whatever the number of threads */
        double s[3] = {0.0, 0.0, 0.0};
        for (int64_t k = first[i]; k < first[i + 1]; k++)
            for (int j = 0; j < 3; j++) s[j] += part[3 * k + j];
        for (int j = 0; j < 3; j++) out[3 * i + j] = s[j];
    }
    free(part);
    free(first);
    return 0;
}

/* -- the magnitude pass ------------------------------------------------------------------------------------------ */

#include "hs_magnitude.inc"
