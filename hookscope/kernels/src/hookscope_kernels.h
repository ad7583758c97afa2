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
#define HS_ABI_VERSION 1

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

/* Error codes. */
#define HS_EDTYPE (-1) /* unknown dtype */
#define HS_ESIZE (-2)  /* a negative size, or sizes whose product overflows */
#define HS_ENULL (-3)  /* a null pointer where data is needed */
#define HS_ENOMEM (-4) /* scratch memory could not be allocated */

/* The ABI version the library was built with (HS_ABI_VERSION). */
int32_t hs_abi_version(void);

/* Hash of the sources the library was built from ("" when the build did not say). */
const char *hs_source_hash(void);

/* The instruction set in use: "avx2" or "baseline". */
const char *hs_isa(void);

/* Select the instruction set (HS_ISA_BEST, HS_ISA_BASELINE or HS_ISA_AVX2; AVX2 only where the CPU has it).
 * Returns the one in use afterwards. Not thread-safe: call it before the kernels run (tests use it). */
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

#ifdef __cplusplus
}
#endif

#endif
