/* exp, log, tanh and sigmoid for one element type T, written so that loops over arrays of
 * them vectorise. Included by kernels.c once per type, with T, SUF, ITYPE / UTYPE (the signed
 * and unsigned integers of T's width), MANT_BITS, EXP_BIAS, LN2_HI, LN2_LO, EXP_HI, EXP_LO,
 * ROUNDER and VMATH_DOUBLE (1 for double: the longer polynomials) defined.
 *
 * Why: libm's expf, logf and tanhf are scalar calls, and GCC vectorises calls to them only
 * with -ffast-math (which would change the rest of the arithmetic). In the fused kernels they
 * dominated at small C (HC's 24 tanh per token, forward and backward; Sinkhorn-Knopp's first,
 * log-domain iteration; the sigmoids of mHC). These versions are plain arithmetic, selects
 * and bit operations, so the loops that call them run on vector registers.
 *
 * Accuracy: the polynomials are long enough for double (truncation below 1e-17 relative); for
 * float (VMATH_DOUBLE 0) they stop after the terms that float can still hold (truncation below
 * 1e-9 relative). Both are exact to rounding (relative error at most 1.5 eps; libm's 1 ulp);
 * tests/test_native.py compares them with torch's exp, log, tanh and sigmoid over wide ranges
 * in both types, NaN and infinities included. Every element is the same sequence of
 * operations whether its loop was vectorised or not (the build lets the compiler fuse a * b + c
 * into one FMA where the CPU has one, in the vector and the scalar code alike). */

/* 2^k as a T, for k within the normal exponents. */
INLINE T CAT(pow2i, SUF)(const ITYPE k)
{
    const UTYPE bits = (UTYPE)(k + EXP_BIAS) << MANT_BITS;
    T out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* exp(x) = 2^k e^r with k = round(x / ln 2) and |r| <= ln(2) / 2 (r by Cody and Waite's two-part
 * ln 2); e^r by its Taylor polynomial of degree 13 (double; truncation < 5e-18 relative) or 8; 2^k applied
 * as two factors, so that overflow gives inf and underflow 0 (or a denormal), as libm does.
 * NaN gives NaN. */
INLINE T CAT(vexp, SUF)(const T x)
{
    const T xc = x > (T)EXP_HI ? (T)EXP_HI : (x < (T)EXP_LO ? (T)EXP_LO : x); /* NaN stays */
    /* round to nearest by adding and subtracting 1.5 * 2^MANT_BITS (|x / ln 2| < 1100) */
    T kf = (xc * (T)1.44269504088896340736 + (T)ROUNDER) - (T)ROUNDER;
    const T r = (xc - kf * (T)LN2_HI) - kf * (T)LN2_LO;
    kf = kf == kf ? kf : 0; /* NaN: r carries it; no NaN into the integer conversion */
#if VMATH_DOUBLE
    T p = (T)(1.0 / 6227020800.0);     /* 1/13! */
    p = p * r + (T)(1.0 / 479001600.0); /* 1/12! */
    p = p * r + (T)(1.0 / 39916800.0);
    p = p * r + (T)(1.0 / 3628800.0);
    p = p * r + (T)(1.0 / 362880.0);
    p = p * r + (T)(1.0 / 40320.0);
    p = p * r + (T)(1.0 / 5040.0);
#else /* float: degree 8 (truncation < 3e-10 relative) */
    T p = (T)(1.0 / 40320.0);
    p = p * r + (T)(1.0 / 5040.0);
#endif
    p = p * r + (T)(1.0 / 720.0);
    p = p * r + (T)(1.0 / 120.0);
    p = p * r + (T)(1.0 / 24.0);
    p = p * r + (T)(1.0 / 6.0);
    p = p * r + (T)0.5;
    p = p * r + 1;
    p = p * r + 1;
    const ITYPE k = (ITYPE)kf, k1 = k / 2;
    return p * CAT(pow2i, SUF)(k1) * CAT(pow2i, SUF)(k - k1);
}

/* log(s) for positive, finite, normal s (Sinkhorn-Knopp's sums, in [1, n]): s = 2^e m with m in
 * [sqrt(1/2), sqrt(2)), log m = 2 atanh(u) = 2 (u + u^3/3 + ... + u^23/23 (double) or
 * u^13/13), u = (m-1)/(m+1), |u| <= 0.172 (truncation < 1e-18 or 1e-11). NaN (and inf) give NaN. */
INLINE T CAT(vlog, SUF)(const T s)
{
    UTYPE bits;
    memcpy(&bits, &s, sizeof bits);
    ITYPE e = (ITYPE)(bits >> MANT_BITS) - EXP_BIAS;
    const UTYPE mbits = (bits & (((UTYPE)1 << MANT_BITS) - 1)) | ((UTYPE)EXP_BIAS << MANT_BITS);
    T m;
    memcpy(&m, &mbits, sizeof m); /* [1, 2) */
    const int big = m > (T)1.41421356237309504880; /* then halve m: [sqrt(1/2), 1) */
    m = m * (big ? (T)0.5 : (T)1);
    e = e + big;
    const T u = (m - 1) / (m + 1), u2 = u * u;
#if VMATH_DOUBLE
    T p = (T)(1.0 / 23.0);
    p = p * u2 + (T)(1.0 / 21.0);
    p = p * u2 + (T)(1.0 / 19.0);
    p = p * u2 + (T)(1.0 / 17.0);
    p = p * u2 + (T)(1.0 / 15.0);
    p = p * u2 + (T)(1.0 / 13.0);
    p = p * u2 + (T)(1.0 / 11.0);
#else /* float: to u^13 (truncation < 1e-11) */
    T p = (T)(1.0 / 11.0);
#endif
    p = p * u2 + (T)(1.0 / 9.0);
    p = p * u2 + (T)(1.0 / 7.0);
    p = p * u2 + (T)(1.0 / 5.0);
    p = p * u2 + (T)(1.0 / 3.0);
    p = p * u2 + 1;
    const T ef = (T)e;
    /* + (s - s): 0 for finite s, NaN for NaN (a select here would stop the vectoriser) */
    return ef * (T)LN2_HI + (2 * u * p + ef * (T)LN2_LO) + (s - s);
}

/* tanh(x): for |x| < 0.3 its Taylor series to x^23 (double) or x^13 (coefficients
 * 2^2k (2^2k - 1) B_2k / (2k)!; truncation < 5e-18 or 3e-10 relative at 0.3), else (1 - e) / (1 + e) with e = exp(-2|x|) and the
 * sign of x (no overflow; +-inf give +-1). NaN gives NaN. */
INLINE T CAT(vtanh, SUF)(const T x)
{
    const T a = x < 0 ? -x : x, x2 = x * x;
#if VMATH_DOUBLE
    T p = (T)-3.927832388331683e-05; /* x^23 */
    p = p * x2 + (T)9.691537956929451e-05;
    p = p * x2 + (T)-0.00023912911424355248;
    p = p * x2 + (T)0.000590027440945586;
    p = p * x2 + (T)-0.0014558343870513183;
    p = p * x2 + (T)0.003592128036572481;
#else /* float: to x^13 (truncation < 3e-10 relative at 0.3) */
    T p = (T)0.003592128036572481;
#endif
    p = p * x2 + (T)-0.008863235529902197;
    p = p * x2 + (T)0.021869488536155203;
    p = p * x2 + (T)-0.05396825396825397;
    p = p * x2 + (T)0.13333333333333333;
    p = p * x2 + (T)-0.3333333333333333;
    p = p * x2 + 1;
    const T e = CAT(vexp, SUF)(-2 * a);
    T big = (1 - e) / (1 + e);
    big = x < 0 ? -big : big;
    return a < (T)0.3 ? x * p : big;
}

/* sigmoid(x) = 1 / (1 + exp(-x)): 0 below about -88 (float) or -709 (double), 1 far above. */
INLINE T CAT(vsigmoid, SUF)(const T x) { return 1 / (1 + CAT(vexp, SUF)(-x)); }

/* The four functions over an array, for the tests (tests/test_native.py): which = 0 exp,
 * 1 log, 2 tanh, 3 sigmoid. */
void CAT(mhc_vmath, SUF)(int which, const T *restrict x, T *restrict y, int64_t m)
{
    if (which == 0)
        for (int64_t k = 0; k < m; k++) y[k] = CAT(vexp, SUF)(x[k]);
    else if (which == 1)
        for (int64_t k = 0; k < m; k++) y[k] = CAT(vlog, SUF)(x[k]);
    else if (which == 2)
        for (int64_t k = 0; k < m; k++) y[k] = CAT(vtanh, SUF)(x[k]);
    else
        for (int64_t k = 0; k < m; k++) y[k] = CAT(vsigmoid, SUF)(x[k]);
}
