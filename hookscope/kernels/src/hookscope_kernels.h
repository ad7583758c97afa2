/* hookscope statistics kernels: the C interface.
 *
 * Plain C over raw pointers, sizes and thresholds: no torch or Python header, so one binary serves every torch and
 * Python version. The Python side (hookscope/kernels/_native.py) checks layouts and dtypes and passes pointers with
 * ctypes. Every function returns 0 on success or a negative HS_E* code, in which case nothing was written.
 */
#ifndef HOOKSCOPE_KERNELS_H
#define HOOKSCOPE_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Bumped whenever a signature or a meaning changes; the loader refuses another version. */
#define HS_ABI_VERSION 3

/* Element dtypes. */
#define HS_F32 0
#define HS_F64 1
#define HS_BF16 2
#define HS_F16 3

/* Which saturation bounds are given (bit flags of `bounds`). */
#define HS_LOWER 1
#define HS_UPPER 2

/* Instruction sets (hs_select_isa). */
#define HS_ISA_BEST (-1)
#define HS_ISA_BASELINE 0
#define HS_ISA_AVX2 1
#define HS_ISA_AVX512 2 /* AVX2, and AVX-512 (F, DQ, BW, VL) for the magnitude pass */

/* Error codes. */
#define HS_EDTYPE (-1) /* unknown dtype */
#define HS_ESIZE (-2)  /* a negative size, or sizes whose product overflows */
#define HS_ENULL (-3)  /* a null pointer where data is needed */
#define HS_ENOMEM (-4) /* scratch memory could not be allocated */

/* The ABI version the library was built with (HS_ABI_VERSION). */
int32_t hs_abi_version(void);

/* Hash of the sources the library was built from ("" when the build did not say). */
const char *hs_source_hash(void);

/* The instruction set in use: "avx512", "avx2" or "baseline". */
const char *hs_isa(void);

/* Select the instruction set (HS_ISA_BEST, HS_ISA_BASELINE, HS_ISA_AVX2 or HS_ISA_AVX512; each only where the CPU
 * has it, else the best below it). Returns the one in use afterwards. Not thread-safe: call it before the kernels run (tests use it). */
int32_t hs_select_isa(int32_t isa);

/* Whether the library was built with OpenMP (1) or runs every call on the calling thread (0). */
int32_t hs_openmp(void);

/* Statistics of one activation output, accumulated (+=) into the given float64 outputs.
 *
 * `x` is a dense block of `outer * units * inner` elements of `dtype`, element (o, u, i) at o*units*inner + u*inner
 * + i: unit u's elements are all (o, i). Each output may be NULL (not computed):
 *   positive[u]  += number of elements of unit u with x > 0 (`units` values; NaN is not positive);
 *   *saturated   += number of elements with x < lower (when bounds has HS_LOWER) or x > upper (HS_UPPER), strict and
 *                   exact; NaN never counts. With both bounds and lower > upper every element counts;
 *   *nonfinite   += number of NaN, +inf and -inf elements.
 * Thresholds are compared exactly with the elements' values (a threshold that is not a value of the dtype is
 * rounded in the direction that keeps the comparison exact); a NaN bound counts nothing. All requested quantities come from one pass over x,
 * split over up to `threads` threads. */
int32_t hs_output_stats(const void *x, int32_t dtype, int64_t outer, int64_t units, int64_t inner, double *positive,
                        double *saturated, int32_t bounds, double lower, double upper, double *nonfinite,
                        int32_t threads);

/* Statistics of one gradient of `n` dense elements of `dtype`, accumulated (+=) in one pass:
 *   *sumsq     += (sum of g*g) / scale^2: squares accumulated in float lanes within blocks of 4096 elements and in
 *                 float64 across blocks (float64 lanes throughout for float64 gradients);
 *   *nonfinite += number of NaN, +inf and -inf elements.
 * The scale is read from `scale_ptr` (a float32 or float64 value, `scale_dtype` HS_F32 or HS_F64) when it is not
 * NULL, else it is `scale`; a scale of 1 divides nothing. */
int32_t hs_grad_stats(const void *g, int32_t dtype, int64_t n, double *sumsq, double scale, const void *scale_ptr,
                      int32_t scale_dtype, double *nonfinite, int32_t threads);

/* The same calls with their arguments but the data pointer in one record: the caller can fill it once per site and
 * state row and pass it again with each new tensor of the same dtype and layout (two arguments to convert per call
 * instead of twelve or nine). The meanings are those of the plain calls. */
typedef struct {
    int64_t outer, units, inner;
    double *positive, *saturated, *nonfinite;
    double lower, upper;
    int32_t dtype, bounds, threads, reserved;
} hs_output_args;

int32_t hs_output_stats_prepared(const void *x, const hs_output_args *a);

typedef struct {
    int64_t n;
    double *sumsq, *nonfinite;
    double scale;
    const void *scale_ptr;
    int32_t dtype, scale_dtype, threads, reserved;
} hs_grad_args;

int32_t hs_grad_stats_prepared(const void *g, const hs_grad_args *a);

/* The magnitude pass: statistics of one output of a dense (outer, units, inner) block (as hs_output_stats), all
 * from one pass, accumulated into the given float64 outputs (each may be NULL). With c the element in its compute
 * type (float for float32, bfloat16 and float16; double for float64) and 0 where it is NaN or infinite:
 *   count[u]    += finite elements of unit u;    abs_sum[u] += sum of |c|;    sq_sum[u] += sum of c*c;
 *   abs_max[u]   = max(abs_max[u], max |c|);
 *   *sum        += sum of c;    *quad_sum += sum of (c*c)*(c*c);    *zeros += finite elements equal to 0;
 *   positive[u] += elements > 0;    *nonfinite += NaN and infinite elements;
 *   *saturated  += elements < lower (bounds & HS_LOWER) or > upper (HS_UPPER), every element when both are given
 *                  and lower > upper (the thresholds must be values of the dtype).
 * Squares and fourth powers are taken in the compute type, every sum in float64 (per-site sums in unit order);
 * threads take ranges of units, so the results do not depend on the number of threads. */
typedef struct {
    int64_t outer, units, inner;
    double *count, *abs_sum, *sq_sum, *abs_max, *sum, *quad_sum, *zeros, *positive, *saturated, *nonfinite;
    double lower, upper;
    int32_t dtype, bounds, threads, reserved;
} hs_magnitude_args;

int32_t hs_magnitude_stats_prepared(const void *x, const hs_magnitude_args *a);

/* DeadReLU's per-unit bookkeeping for a block of `T` recorded steps (float64 throughout, one thread).
 *
 * Step k of the block is the recorded step of ordinal `first + k` and number `steps[k]`; unit u belongs to site
 * owners[u] (0 <= owners[u] < S). Inputs: positive[k * pos_stride + u], the positive elements of unit u in step k;
 * elements[k * el_stride + s], the output elements of site s in step k, and inverse[s] (1 / its units); the
 * persistent fired_at[u] (ordinal of the last step it fired in, -inf for never, moved one later for each step since
 * in which its site saw no element: those steps do not count) and silent[u] (output elements since then). For each
 * step, with after = that ordinal as of step k (fired: positive > 0, NaN never; a step k with elements 0 adds 1 to
 * it) and before the same as of step k - 1, these are added (+=) to out, a (3, T, S) block:
 *   out[0][k][s] = the positive elements of site s's units;
 *   out[1][k][s] = its units with after > ordinal - window (alive);
 *   out[2][k][s] = its units whose silent count (elements since the last firing, summed per step in block order as
 *                  a running total minus the total at that firing, or plus the persistent count) >= evidence.
 * When `commit`, the persistent state moves to the end of the block: fired_at and silent; revivals += steps that
 * revived (fired, with before > -inf and before <= ordinal - 1 - window), last_revival, died_at (alive at step k - 1,
 * dead at k) and last_fired are raised to the latest such step number. Without `commit` nothing but `out` is
 * written (the four commit-only pointers may be NULL). */
int32_t hs_dead_units(int64_t T, int64_t U, int64_t S, const double *positive, int64_t pos_stride,
                      const double *elements, int64_t el_stride, const int64_t *owners, const double *inverse,
                      const double *steps, double first, double window, double evidence, double *fired_at,
                      double *silent, int32_t commit, double *revivals, double *last_revival, double *died_at,
                      double *last_fired, double *out);

/* Parameter statistics of `n` tensors in one call. Tensor i has sizes[i] dense elements of dtypes[i] (HS_F32 or
 * HS_F64) at theta[i]; grad[i] (its gradient, same dtype and size) and prev[i] (a copy of it from an earlier step)
 * may be NULL. Writes (=, not +=) out[3i] = sum of theta^2, out[3i + 1] = sum of grad^2 (0 without a gradient) and
 * out[3i + 2] = sum of (theta - prev)^2 (0 without a copy), then copies theta into prev: each tensor is read once.
 * Squares are summed in lanes of the dtype within blocks of 4096 elements and in float64 across blocks; the work
 * is split into runs of 65536 elements over up to `threads` threads and merged in a fixed order. */
int32_t hs_param_stats(int64_t n, const void *const *theta, void *const *prev, const void *const *grad,
                       const int64_t *sizes, const int32_t *dtypes, double *out, int32_t threads);

#ifdef __cplusplus
}
#endif

#endif
