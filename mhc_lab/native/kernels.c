/* Fused CPU kernels for the HC / mHC stream mixing (mhc-lab).
 *
 * Legend: M = tokens (batch * seq), n = residual streams, C = d_model, P = n + 1 rows of the
 * stacked read R = [H_pre; H_res] (DESIGN.md section 2). Every array is row-major and
 * contiguous; the Python side (mhc_lab/native/__init__.py) checks that before calling.
 *
 * Why: torch's batched matmul on per-token 5 x 4 matrices runs at a fraction of memory
 * bandwidth, and the backward of the mixing is several separate passes over the (M, n, C)
 * state. Here one token's streams (n * C floats, a few KiB) stay in L1 while all rows that
 * use them are computed, so each kernel reads and writes the big arrays once.
 * Every output element is computed by one thread in a fixed order: results do not depend
 * on the number of threads.
 *
 * Built at first use by `cc -O3 -march=native -fopenmp -shared`; torch's own libgomp
 * (already loaded) provides the OpenMP runtime.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define DEFINE_KERNELS(T, SUF)                                                               \
/* y_in = R[0] x, y_mix[i] = R[1 + i] x for each token: the stream read, H_pre x and H_res x. \
 * x: (M, n, C), R: (M, n + 1, n), y_in: (M, C), y_mix: (M, n, C). */                        \
void mhc_read_forward_##SUF(const T *restrict x, const T *restrict R, T *restrict y_in,      \
                            T *restrict y_mix, int64_t M, int64_t n, int64_t C, int nt)      \
{                                                                                            \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                            \
    for (int64_t m = 0; m < M; m++) {                                                        \
        const T *xm = x + m * n * C;                                                         \
        const T *Rm = R + m * (n + 1) * n;                                                   \
        for (int64_t i = 0; i <= n; i++) {                                                   \
            T *y = i == 0 ? y_in + m * C : y_mix + (m * n + i - 1) * C;                      \
            const T *r = Rm + i * n;                                                         \
            const T r0 = r[0];                                                               \
            for (int64_t c = 0; c < C; c++) y[c] = r0 * xm[c];                               \
            for (int64_t j = 1; j < n; j++) {                                                \
                const T rj = r[j];                                                           \
                const T *xj = xm + j * C;                                                    \
                for (int64_t c = 0; c < C; c++) y[c] += rj * xj[c];                          \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* Backward of the read. gy_0 = g_in (M, C), gy_{1+i} = g_mix[:, i] (M, n, C).               \
 * grad_x[j] = sum_p R[p, j] gy_p (skipped if grad_x is NULL);                              \
 * grad_R[p, j] = <gy_p, x_j> over C (skipped if grad_R is NULL). */                         \
void mhc_read_backward_##SUF(const T *restrict x, const T *restrict R,                       \
                             const T *restrict g_in, const T *restrict g_mix,                \
                             T *restrict grad_x, T *restrict grad_R, int64_t M, int64_t n,   \
                             int64_t C, int nt)                                              \
{                                                                                            \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                            \
    for (int64_t m = 0; m < M; m++) {                                                        \
        const T *xm = x + m * n * C;                                                         \
        const T *Rm = R + m * (n + 1) * n;                                                   \
        const T *gin = g_in + m * C;                                                         \
        const T *gmix = g_mix + m * n * C;                                                   \
        if (grad_x) {                                                                        \
            for (int64_t j = 0; j < n; j++) {                                                \
                T *gx = grad_x + (m * n + j) * C;                                            \
                const T r0 = Rm[j];                                                          \
                for (int64_t c = 0; c < C; c++) gx[c] = r0 * gin[c];                         \
                for (int64_t i = 0; i < n; i++) {                                            \
                    const T ri = Rm[(i + 1) * n + j];                                        \
                    const T *gi = gmix + i * C;                                              \
                    for (int64_t c = 0; c < C; c++) gx[c] += ri * gi[c];                     \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
        if (grad_R) {                                                                        \
            T *gR = grad_R + m * (n + 1) * n;                                                \
            for (int64_t p = 0; p <= n; p++) {                                               \
                const T *gp = p == 0 ? gin : gmix + (p - 1) * C;                             \
                for (int64_t j = 0; j < n; j++) {                                            \
                    const T *xj = xm + j * C;                                                \
                    T acc = 0;                                                               \
                    _Pragma("omp simd reduction(+:acc)")                                     \
                    for (int64_t c = 0; c < C; c++) acc += gp[c] * xj[c];                    \
                    gR[p * n + j] = acc;                                                     \
                }                                                                            \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* Backward of the write out = mixed + H_post^T F: g (M, n, C), F (M, C), h_post (M, n).     \
 * grad_F = sum_i h_post_i g_i (skipped if NULL); grad_post_i = <g_i, F> (skipped if NULL). */ \
void mhc_write_backward_##SUF(const T *restrict g, const T *restrict F,                      \
                              const T *restrict h_post, T *restrict grad_F,                  \
                              T *restrict grad_post, int64_t M, int64_t n, int64_t C,        \
                              int nt)                                                        \
{                                                                                            \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                            \
    for (int64_t m = 0; m < M; m++) {                                                        \
        const T *gm = g + m * n * C;                                                         \
        const T *fm = F + m * C;                                                             \
        if (grad_F) {                                                                        \
            T *gf = grad_F + m * C;                                                          \
            const T *h = h_post + m * n;                                                     \
            const T h0 = h[0];                                                               \
            for (int64_t c = 0; c < C; c++) gf[c] = h0 * gm[c];                              \
            for (int64_t i = 1; i < n; i++) {                                                \
                const T hi = h[i];                                                           \
                const T *gi = gm + i * C;                                                    \
                for (int64_t c = 0; c < C; c++) gf[c] += hi * gi[c];                         \
            }                                                                                \
        }                                                                                    \
        if (grad_post) {                                                                     \
            for (int64_t i = 0; i < n; i++) {                                                \
                const T *gi = gm + i * C;                                                    \
                T acc = 0;                                                                   \
                _Pragma("omp simd reduction(+:acc)")                                         \
                for (int64_t c = 0; c < C; c++) acc += gi[c] * fm[c];                        \
                grad_post[m * n + i] = acc;                                                  \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)

/* Sinkhorn-Knopp (mhc_lab/sinkhorn.py, the same steps): per token, z (n, n) logits;
 * P = softmax over i of z (columns), H1 = softmax over j of log P (rows), then iters - 1
 * column and row normalisations. Tokens go in blocks of SK_BLOCK, each matrix entry a
 * contiguous vector over the block's tokens, so every step is a vectorised loop over tokens.
 * With `trace` (2 * iters block matrices), every step's output is kept for the backward. */
#define SK_BLOCK 64
#define DEFINE_SINKHORN(T, SUF, EXP, LOG)                                                    \
static void sinkhorn_block_##SUF(const T *z, int64_t nb, int64_t n, int64_t iters,          \
                                 T *restrict h, T *restrict lp, T *restrict trace)          \
{                                                                                            \
    /* z: nb tokens of (n, n), token-major; h, lp: (n * n, SK_BLOCK), entry-major */        \
    const int64_t nn = n * n;                                                                \
    T mx[SK_BLOCK], s[SK_BLOCK];                                                             \
    for (int64_t k = 0; k < nn; k++)                                                         \
        for (int64_t b = 0; b < nb; b++) lp[k * SK_BLOCK + b] = z[b * nn + k];               \
    for (int64_t j = 0; j < n; j++) { /* log-softmax over i of column j */                   \
        for (int64_t b = 0; b < nb; b++) mx[b] = lp[j * SK_BLOCK + b];                       \
        for (int64_t i = 1; i < n; i++)                                                      \
            for (int64_t b = 0; b < nb; b++) {                                               \
                const T v = lp[(i * n + j) * SK_BLOCK + b];                                  \
                mx[b] = v > mx[b] ? v : mx[b];                                               \
            }                                                                                \
        for (int64_t b = 0; b < nb; b++) s[b] = 0;                                           \
        for (int64_t i = 0; i < n; i++)                                                      \
            for (int64_t b = 0; b < nb; b++) s[b] += EXP(lp[(i * n + j) * SK_BLOCK + b] - mx[b]); \
        for (int64_t b = 0; b < nb; b++) mx[b] += LOG(s[b]);                                 \
        for (int64_t i = 0; i < n; i++)                                                      \
            for (int64_t b = 0; b < nb; b++) lp[(i * n + j) * SK_BLOCK + b] -= mx[b];        \
    }                                                                                        \
    if (trace)                                                                               \
        for (int64_t k = 0; k < nn * SK_BLOCK; k++) trace[k] = EXP(lp[k]);                   \
    for (int64_t i = 0; i < n; i++) { /* softmax over j of row i of log P */                 \
        const T *row = lp + i * n * SK_BLOCK;                                                \
        T *hrow = h + i * n * SK_BLOCK;                                                      \
        for (int64_t b = 0; b < nb; b++) mx[b] = row[b];                                     \
        for (int64_t j = 1; j < n; j++)                                                      \
            for (int64_t b = 0; b < nb; b++) mx[b] = row[j * SK_BLOCK + b] > mx[b] ? row[j * SK_BLOCK + b] : mx[b]; \
        for (int64_t b = 0; b < nb; b++) s[b] = 0;                                           \
        for (int64_t j = 0; j < n; j++)                                                      \
            for (int64_t b = 0; b < nb; b++) {                                               \
                hrow[j * SK_BLOCK + b] = EXP(row[j * SK_BLOCK + b] - mx[b]);                 \
                s[b] += hrow[j * SK_BLOCK + b];                                              \
            }                                                                                \
        for (int64_t j = 0; j < n; j++)                                                      \
            for (int64_t b = 0; b < nb; b++) hrow[j * SK_BLOCK + b] /= s[b];                 \
    }                                                                                        \
    T *out = trace ? trace + nn * SK_BLOCK : NULL;                                           \
    if (out)                                                                                 \
        for (int64_t k = 0; k < nn * SK_BLOCK; k++) out[k] = h[k];                           \
    for (int64_t t = 1; t < iters; t++) {                                                    \
        for (int64_t j = 0; j < n; j++) { /* columns: sums over i */                         \
            for (int64_t b = 0; b < SK_BLOCK; b++) s[b] = 0;                                 \
            for (int64_t i = 0; i < n; i++)                                                  \
                for (int64_t b = 0; b < SK_BLOCK; b++) s[b] += h[(i * n + j) * SK_BLOCK + b]; \
            for (int64_t i = 0; i < n; i++)                                                  \
                for (int64_t b = 0; b < SK_BLOCK; b++) h[(i * n + j) * SK_BLOCK + b] /= s[b]; \
        }                                                                                    \
        if (out) {                                                                           \
            out += nn * SK_BLOCK;                                                            \
            for (int64_t k = 0; k < nn * SK_BLOCK; k++) out[k] = h[k];                       \
        }                                                                                    \
        for (int64_t i = 0; i < n; i++) { /* rows: sums over j */                            \
            T *hrow = h + i * n * SK_BLOCK;                                                  \
            for (int64_t b = 0; b < SK_BLOCK; b++) s[b] = 0;                                 \
            for (int64_t j = 0; j < n; j++)                                                  \
                for (int64_t b = 0; b < SK_BLOCK; b++) s[b] += hrow[j * SK_BLOCK + b];       \
            for (int64_t j = 0; j < n; j++)                                                  \
                for (int64_t b = 0; b < SK_BLOCK; b++) hrow[j * SK_BLOCK + b] /= s[b];       \
        }                                                                                    \
        if (out) {                                                                           \
            out += nn * SK_BLOCK;                                                            \
            for (int64_t k = 0; k < nn * SK_BLOCK; k++) out[k] = h[k];                       \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* Per-thread scratch for the blocks: h, lp and (backward) the trace. */                    \
static T *sinkhorn_scratch_##SUF(int64_t n, int64_t iters, int with_trace)                   \
{                                                                                            \
    const size_t per = (size_t)(n * n * SK_BLOCK);                                           \
    T *buf = malloc(sizeof(T) * per * (2 + (with_trace ? 2 * (size_t)iters : 0)));           \
    if (buf) /* padding lanes of a partial block: keep them finite (they are never stored) */ \
        for (size_t k = 0; k < 2 * per; k++) buf[k] = 1;                                     \
    return buf;                                                                              \
}                                                                                            \
                                                                                             \
/* z, h: (M, n, n); iters >= 1. Returns 0, or -1 if scratch memory could not be had. */     \
int mhc_sinkhorn_forward_##SUF(const T *restrict z, T *restrict h, int64_t M, int64_t n,    \
                               int64_t iters, int nt)                                        \
{                                                                                            \
    int failed = 0;                                                                          \
    const int64_t nn = n * n, blocks = (M + SK_BLOCK - 1) / SK_BLOCK;                        \
    _Pragma("omp parallel num_threads(nt) reduction(|:failed)")                              \
    {                                                                                        \
        T *buf = sinkhorn_scratch_##SUF(n, iters, 0);                                        \
        if (!buf) failed = 1;                                                                \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t blk = 0; blk < blocks; blk++) {                                         \
            if (!buf) continue;                                                              \
            const int64_t m0 = blk * SK_BLOCK;                                               \
            const int64_t nb = M - m0 < SK_BLOCK ? M - m0 : SK_BLOCK;                        \
            T *hb = buf, *lp = buf + nn * SK_BLOCK;                                          \
            sinkhorn_block_##SUF(z + m0 * nn, nb, n, iters, hb, lp, NULL);                   \
            for (int64_t b = 0; b < nb; b++)                                                 \
                for (int64_t k = 0; k < nn; k++) h[(m0 + b) * nn + k] = hb[k * SK_BLOCK + b]; \
        }                                                                                    \
        free(buf);                                                                           \
    }                                                                                        \
    return failed ? -1 : 0;                                                                  \
}                                                                                            \
                                                                                             \
/* dz from dH: recompute the steps, then for each step Y = X / sum_d X backwards,            \
 * W <- W - Y * sum_d(W), starting from W = dH * H (see sinkhorn._iterate_backward).         \
 * Returns 0, or -1 if scratch memory could not be had. */                                   \
int mhc_sinkhorn_backward_##SUF(const T *restrict z, const T *restrict grad_h,               \
                                T *restrict grad_z, int64_t M, int64_t n, int64_t iters,     \
                                int nt)                                                      \
{                                                                                            \
    int failed = 0;                                                                          \
    const int64_t nn = n * n, blocks = (M + SK_BLOCK - 1) / SK_BLOCK;                        \
    _Pragma("omp parallel num_threads(nt) reduction(|:failed)")                              \
    {                                                                                        \
        T *buf = sinkhorn_scratch_##SUF(n, iters, 1);                                        \
        if (!buf) failed = 1;                                                                \
        _Pragma("omp for schedule(static)")                                                  \
        for (int64_t blk = 0; blk < blocks; blk++) {                                         \
            if (!buf) continue;                                                              \
            const int64_t m0 = blk * SK_BLOCK;                                               \
            const int64_t nb = M - m0 < SK_BLOCK ? M - m0 : SK_BLOCK;                        \
            T *w = buf, *lp = buf + nn * SK_BLOCK, *trace = buf + 2 * nn * SK_BLOCK;          \
            sinkhorn_block_##SUF(z + m0 * nn, nb, n, iters, w, lp, trace);                   \
            for (int64_t b = 0; b < nb; b++) /* W = dH * H */                                \
                for (int64_t k = 0; k < nn; k++) w[k * SK_BLOCK + b] *= grad_h[(m0 + b) * nn + k]; \
            for (int64_t step = 2 * iters - 1; step >= 0; step--) {                          \
                const T *y = trace + step * nn * SK_BLOCK;                                   \
                T sum[SK_BLOCK];                                                             \
                for (int64_t a = 0; a < n; a++) {                                            \
                    /* column step (even): line a is column j = a, entries (i, a);          \
                       row step (odd): line a is row i = a, entries (a, j) */              \
                    const int64_t base = step % 2 == 0 ? a : a * n;                          \
                    const int64_t stride = step % 2 == 0 ? n : 1;                            \
                    for (int64_t b = 0; b < SK_BLOCK; b++) sum[b] = 0;                       \
                    for (int64_t e = 0; e < n; e++)                                          \
                        for (int64_t b = 0; b < SK_BLOCK; b++) sum[b] += w[(base + e * stride) * SK_BLOCK + b]; \
                    for (int64_t e = 0; e < n; e++)                                          \
                        for (int64_t b = 0; b < SK_BLOCK; b++)                               \
                            w[(base + e * stride) * SK_BLOCK + b] -= y[(base + e * stride) * SK_BLOCK + b] * sum[b]; \
                }                                                                            \
            }                                                                                \
            for (int64_t b = 0; b < nb; b++)                                                 \
                for (int64_t k = 0; k < nn; k++) grad_z[(m0 + b) * nn + k] = w[k * SK_BLOCK + b]; \
        }                                                                                    \
        free(buf);                                                                           \
    }                                                                                        \
    return failed ? -1 : 0;                                                                  \
}

DEFINE_SINKHORN(float, f32, expf, logf)
DEFINE_SINKHORN(double, f64, exp, log)
