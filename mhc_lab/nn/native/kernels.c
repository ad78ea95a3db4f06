/* Fused CPU kernels for the HC / mHC stream mixing and Sinkhorn-Knopp (mhc-lab).
 *
 * Legend: M = tokens (batch * seq), n = residual streams, C = d_model, P = n + 1 rows of the
 * stacked read R = [H_pre; H_res] (DESIGN.md section 2). Every array is row-major and
 * contiguous, of the shapes given at each kernel; the Python side (mhc_lab/native/__init__.py)
 * checks dtype, layout and every shape before calling.
 *
 * Why: torch's batched matmul on per-token 5 x 4 matrices runs at a fraction of memory
 * bandwidth, and the backward of the mixing is several separate passes over the (M, n, C)
 * state. Here one token's streams (n * C values, a few KiB) stay in L1 while every row that
 * uses them is computed, so each kernel reads and writes the big arrays once.
 *
 * Determinism: every output element is computed by one thread, in an order fixed by the
 * shapes alone, so results do not depend on the number of threads.
 *
 * kernels_impl.h holds the kernels once, written for a type T; it is included here for
 * float (suffix f32) and double (f64). Built at first use by
 * `cc -O3 -march=native -fopenmp -shared`; torch's own libgomp, already loaded, serves the
 * OpenMP calls.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define INLINE static inline __attribute__((always_inline))
#define MAX_N 8  /* the most streams the mixing kernels take (arrays per token are sized by it) */

/* Calls BODY(k) with k a literal for n = 1..MAX_N, so loops over streams unroll. Any other n
 * does nothing: the Python wrappers refuse it before calling (mhc_lab/native/__init__.py). */
#define DISPATCH_N(n, BODY)                                                                    \
    switch (n) {                                                                               \
    case 1: BODY(1); break;                                                                    \
    case 2: BODY(2); break;                                                                    \
    case 3: BODY(3); break;                                                                    \
    case 4: BODY(4); break;                                                                    \
    case 5: BODY(5); break;                                                                    \
    case 6: BODY(6); break;                                                                    \
    case 7: BODY(7); break;                                                                    \
    case 8: BODY(8); break;                                                                    \
    default: break;                                                                            \
    }

/* exp, log, tanh, sigmoid: vmath.h's vectorisable versions (see there); sqrt: libm's (an
 * instruction). */
#define EXP CAT(vexp, SUF)
#define LOG CAT(vlog, SUF)
#define TANH CAT(vtanh, SUF)
#define SIGMOID CAT(vsigmoid, SUF)

#define T float
#define SUF f32
#define ITYPE int32_t
#define UTYPE uint32_t
#define MANT_BITS 23
#define EXP_BIAS 127
#define LN2_HI 0.693359375            /* 355 / 512: k * LN2_HI is exact in float */
#define LN2_LO -2.12194440054690583e-4 /* ln 2 - LN2_HI */
#define EXP_HI 89.0                   /* exp overflows float above 88.72 */
#define EXP_LO -104.0                 /* and is 0 below -103.97 */
#define SQRT sqrtf
#define VL 16                         /* lanes of partial sums: 64 bytes */
#define ROUNDER 12582912.0        /* 1.5 * 2^23 */
#define VMATH_DOUBLE 0
#include "vmath.h"
#include "kernels_impl.h"
#undef T
#undef SUF
#undef ITYPE
#undef UTYPE
#undef MANT_BITS
#undef EXP_BIAS
#undef LN2_HI
#undef LN2_LO
#undef EXP_HI
#undef EXP_LO
#undef SQRT
#undef VL
#undef ROUNDER
#undef VMATH_DOUBLE

#define T double
#define SUF f64
#define ITYPE int64_t
#define UTYPE uint64_t
#define MANT_BITS 52
#define EXP_BIAS 1023
#define LN2_HI 6.93147180369123816490e-01 /* fdlibm's split of ln 2: k * LN2_HI exact */
#define LN2_LO 1.90821492927058770002e-10
#define EXP_HI 710.0                      /* exp overflows double above 709.78 */
#define EXP_LO -746.0                     /* and is 0 below -745.13 */
#define SQRT sqrt
#define VL 8
#define ROUNDER 6755399441055744.0 /* 1.5 * 2^52 */
#define VMATH_DOUBLE 1
#include "vmath.h"
#include "kernels_impl.h"
