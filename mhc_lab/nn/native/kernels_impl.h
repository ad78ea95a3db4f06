/* The kernels for one element type T (float or double), included twice by kernels.c.
 * Public names end in _SUF (f32, f64); see kernels.c for the legend and the layout. */

/* Threads for a call with `work` elements: torch's number (nt), or 1 below GRAIN elements
 * (torch's own grain size, at::internal::GRAIN_SIZE): a small call (the probe's 64 tokens)
 * runs on the calling thread instead of waking the pool, which on a busy machine can wait a
 * whole time slice for a descheduled thread. */
#ifndef GRAIN
#define GRAIN 32768
#endif
INLINE int CAT(threads_for, SUF)(const int64_t work, const int nt) { return work < GRAIN ? 1 : nt; }

/* ---- stream read: y_in = R[0] x (H_pre x), y_mix[i] = R[1 + i] x (H_res x) ---------------- */

INLINE void CAT(read_forward_token, SUF)(const T *restrict x, const T *restrict R,
                                         T *restrict y_in, T *restrict y_mix, const int64_t n,
                                         const int64_t C)
{
    for (int64_t p = 0; p <= n; p++) {
        T *restrict y = p == 0 ? y_in : y_mix + (p - 1) * C;
        T r[MAX_N];
        for (int64_t j = 0; j < n; j++) r[j] = R[p * n + j];
        for (int64_t c = 0; c < C; c++) {
            T acc = r[0] * x[c];
            for (int64_t j = 1; j < n; j++) acc += r[j] * x[j * C + c];
            y[c] = acc;
        }
    }
}

/* x: (M, n, C), R: (M, n + 1, n), y_in: (M, C), y_mix: (M, n, C); n <= MAX_N. */
void CAT(mhc_read_forward, SUF)(const T *restrict x, const T *restrict R, T *restrict y_in,
                                T *restrict y_mix, int64_t M, int64_t n, int64_t C, int nt)
{
    nt = CAT(threads_for, SUF)(M * n * C, nt);
#define BODY(N)                                                                                \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                              \
    for (int64_t m = 0; m < M; m++)                                                            \
        CAT(read_forward_token, SUF)(x + m * N * C, R + m * (N + 1) * N, y_in + m * C,         \
                                     y_mix + m * N * C, N, C)
    DISPATCH_N(n, BODY)
#undef BODY
}

/* Dot products and sums of squares keep VL partial sums in one vector (64 bytes; GCC's and
 * Clang's vector extension, lowered to the machine's registers) and add them up as a tree:
 * the two halves, then their halves, down to one lane. An `omp simd` reduction adds its
 * lanes one after another, a chain of VL dependent scalar adds per reduction, which at
 * C = 64 cost about as much as the products. Element c goes to lane c % VL; the order of
 * every addition is fixed by C alone. */
typedef T CAT(vec, SUF) __attribute__((vector_size(VL * sizeof(T)), aligned(sizeof(T)), may_alias));
typedef T CAT(half, SUF) __attribute__((vector_size(VL * sizeof(T) / 2), aligned(sizeof(T))));
typedef T CAT(quarter, SUF) __attribute__((vector_size(VL * sizeof(T) / 4), aligned(sizeof(T))));
#define VEC CAT(vec, SUF)
#define VLOAD(p) (*(const VEC *)(p))
#define VSTORE(p, v) (*(VEC *)(p) = (v))

INLINE T CAT(lanes_sum, SUF)(const VEC a)
{
#if defined(__clang__) || __GNUC__ >= 12 /* halves as register shuffles */
#if VL == 16
    const CAT(half, SUF) h = __builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7) +
                             __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15);
    const CAT(quarter, SUF) q = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
#else
    const CAT(half, SUF) h = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    const CAT(quarter, SUF) q = __builtin_shufflevector(h, h, 0, 1) + __builtin_shufflevector(h, h, 2, 3);
#endif
#else
    CAT(half, SUF) h;
    for (int l = 0; l < VL / 2; l++) h[l] = a[l] + a[l + VL / 2];
    CAT(quarter, SUF) q;
    for (int l = 0; l < VL / 4; l++) q[l] = h[l] + h[l + VL / 4];
#endif
#if VL == 16
    return (q[0] + q[2]) + (q[1] + q[3]);
#else
    return q[0] + q[1];
#endif
}

/* the partial sums of the last C % VL elements, as a vector (lanes past them 0) */
INLINE VEC CAT(tail_products, SUF)(const T *restrict v, const T *restrict r, const int64_t rem)
{
    T t[VL];
    for (int64_t l = 0; l < VL; l++) t[l] = l < rem ? v[l] * r[l] : 0;
    VEC out;
    memcpy(&out, t, sizeof out);
    return out;
}

/* sum_c v[c]^2 */
INLINE T CAT(sum_squares, SUF)(const T *restrict v, const int64_t C)
{
    const int64_t Cv = C - C % VL;
    VEC a = {0};
    for (int64_t c = 0; c < Cv; c += VL) a += VLOAD(v + c) * VLOAD(v + c);
    if (Cv < C) a += CAT(tail_products, SUF)(v + Cv, v + Cv, C - Cv);
    return CAT(lanes_sum, SUF)(a);
}

/* out[j] = <v, rows[j]> for rows (k, C): four (then two, then one) dot products per sweep
 * over C (one load of v for several rows). */
INLINE void CAT(dot_rows, SUF)(const T *restrict v, const T *restrict rows, const int64_t k,
                               const int64_t C, T *restrict out)
{
    const int64_t Cv = C - C % VL;
    int64_t j = 0;
    for (; j + 4 <= k; j += 4) {
        const T *restrict r0 = rows + j * C, *restrict r1 = r0 + C, *restrict r2 = r1 + C,
                *restrict r3 = r2 + C;
        VEC a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        for (int64_t c = 0; c < Cv; c += VL) {
            const VEC vc = VLOAD(v + c);
            a0 += vc * VLOAD(r0 + c);
            a1 += vc * VLOAD(r1 + c);
            a2 += vc * VLOAD(r2 + c);
            a3 += vc * VLOAD(r3 + c);
        }
        if (Cv < C) {
            a0 += CAT(tail_products, SUF)(v + Cv, r0 + Cv, C - Cv);
            a1 += CAT(tail_products, SUF)(v + Cv, r1 + Cv, C - Cv);
            a2 += CAT(tail_products, SUF)(v + Cv, r2 + Cv, C - Cv);
            a3 += CAT(tail_products, SUF)(v + Cv, r3 + Cv, C - Cv);
        }
        out[j] = CAT(lanes_sum, SUF)(a0);
        out[j + 1] = CAT(lanes_sum, SUF)(a1);
        out[j + 2] = CAT(lanes_sum, SUF)(a2);
        out[j + 3] = CAT(lanes_sum, SUF)(a3);
    }
    for (; j + 2 <= k; j += 2) {
        const T *restrict r0 = rows + j * C, *restrict r1 = r0 + C;
        VEC a0 = {0}, a1 = {0};
        for (int64_t c = 0; c < Cv; c += VL) {
            const VEC vc = VLOAD(v + c);
            a0 += vc * VLOAD(r0 + c);
            a1 += vc * VLOAD(r1 + c);
        }
        if (Cv < C) {
            a0 += CAT(tail_products, SUF)(v + Cv, r0 + Cv, C - Cv);
            a1 += CAT(tail_products, SUF)(v + Cv, r1 + Cv, C - Cv);
        }
        out[j] = CAT(lanes_sum, SUF)(a0);
        out[j + 1] = CAT(lanes_sum, SUF)(a1);
    }
    for (; j < k; j++) {
        const T *restrict r = rows + j * C;
        VEC a = {0};
        for (int64_t c = 0; c < Cv; c += VL) a += VLOAD(v + c) * VLOAD(r + c);
        if (Cv < C) a += CAT(tail_products, SUF)(v + Cv, r + Cv, C - Cv);
        out[j] = CAT(lanes_sum, SUF)(a);
    }
}


/* ---- backward of the read ----------------------------------------------------------------
 * gy_0 = g_in (M, C), gy_{1+i} = g_mix[:, i] (M, n, C).
 * grad_x[j] = sum_p R[p, j] gy_p;  grad_R[p, j] = <gy_p, x_j> over C. */

INLINE void CAT(read_backward_token, SUF)(const T *restrict x, const T *restrict R,
                                          const T *restrict g_in, const T *restrict g_mix,
                                          T *restrict grad_x, T *restrict grad_R,
                                          const int64_t n, const int64_t C)
{
    const T *gy[MAX_N + 1];
    gy[0] = g_in;
    for (int64_t p = 0; p < n; p++) gy[p + 1] = g_mix + p * C;
    if (grad_x) {
        for (int64_t j = 0; j < n; j++) {
            T r[MAX_N + 1];
            for (int64_t p = 0; p <= n; p++) r[p] = R[p * n + j];
            T *restrict gx = grad_x + j * C;
            for (int64_t c = 0; c < C; c++) {
                T acc = r[0] * gy[0][c];
                for (int64_t p = 1; p <= n; p++) acc += r[p] * gy[p][c];
                gx[c] = acc;
            }
        }
    }
    if (grad_R)
        for (int64_t p = 0; p <= n; p++) CAT(dot_rows, SUF)(gy[p], x, n, C, grad_R + p * n);
}

/* grad_x (M, n, C) or NULL, grad_R (M, n + 1, n) or NULL; n <= MAX_N. */
void CAT(mhc_read_backward, SUF)(const T *restrict x, const T *restrict R,
                                 const T *restrict g_in, const T *restrict g_mix,
                                 T *restrict grad_x, T *restrict grad_R, int64_t M, int64_t n,
                                 int64_t C, int nt)
{
    nt = CAT(threads_for, SUF)(M * n * C, nt);
#define BODY(N)                                                                                \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                              \
    for (int64_t m = 0; m < M; m++)                                                            \
        CAT(read_backward_token, SUF)(x + m * N * C, R + m * (N + 1) * N, g_in + m * C,        \
                                      g_mix + m * N * C, grad_x ? grad_x + m * N * C : NULL,   \
                                      grad_R ? grad_R + m * (N + 1) * N : NULL, N, C)
    DISPATCH_N(n, BODY)
#undef BODY
}

/* ---- backward of the stream write out = mixed + H_post^T F ------------------------------- */

INLINE void CAT(write_backward_token, SUF)(const T *restrict g, const T *restrict F,
                                           const T *restrict h, T *restrict grad_F,
                                           T *restrict grad_post, const int64_t n,
                                           const int64_t C)
{
    if (grad_F) {
        T hh[MAX_N];
        for (int64_t i = 0; i < n; i++) hh[i] = h[i];
        for (int64_t c = 0; c < C; c++) {
            T acc = hh[0] * g[c];
            for (int64_t i = 1; i < n; i++) acc += hh[i] * g[i * C + c];
            grad_F[c] = acc;
        }
    }
    if (grad_post) CAT(dot_rows, SUF)(F, g, n, C, grad_post);
}

/* g: (M, n, C), F: (M, C), h_post: (M, n). grad_F = sum_i h_post_i g_i (M, C) or NULL;
 * grad_post_i = <g_i, F> (M, n) or NULL; n <= MAX_N. */
void CAT(mhc_write_backward, SUF)(const T *restrict g, const T *restrict F,
                                  const T *restrict h_post, T *restrict grad_F,
                                  T *restrict grad_post, int64_t M, int64_t n, int64_t C, int nt)
{
    nt = CAT(threads_for, SUF)(M * n * C, nt);
#define BODY(N)                                                                                \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                              \
    for (int64_t m = 0; m < M; m++)                                                            \
        CAT(write_backward_token, SUF)(g + m * N * C, F + m * C, h_post + m * N,               \
                                       grad_F ? grad_F + m * C : NULL,                         \
                                       grad_post ? grad_post + m * N : NULL, N, C)
    DISPATCH_N(n, BODY)
#undef BODY
}

/* ---- Sinkhorn-Knopp (mhc_lab/sinkhorn.py, the same steps) --------------------------------
 * Per token, z (n, n) logits: P = softmax over i of z (columns), H1 = softmax over j of log P
 * (rows), then iters - 1 column and row normalisations. Tokens go in blocks of SK_BLOCK, each
 * matrix entry a contiguous vector over the block's tokens, so every step is a vectorised
 * loop over tokens. With `trace` (2 * iters block matrices), every step's output is kept for
 * the backward. h, lp: (n * n, SK_BLOCK) scratch, entry-major. */
#ifndef SK_BLOCK
#define SK_BLOCK 64
#endif

/* Iterations 2..iters for a block: each VL-token slice of h (n * n, SK_BLOCK) held as n * n
 * vector registers through all of them (n a literal, so the loops unroll), column then row
 * normalisations with one division per sum; with `slot` (H1's trace slot), every half-step's
 * matrix is stored to the slots after it. The same operations in the same order as one
 * array pass per step, without the memory traffic. */
/* One half-step on registers: each of the n lines (columns: line_step 1, entry_step n; rows:
 * line_step n, entry_step 1) divided by its sum, summed from its first entry on; with `out`,
 * the result is stored to the next trace slot, whose pointer is returned. */
INLINE T *CAT(sinkhorn_half, SUF)(VEC *restrict H, T *out, const int64_t sb, const int64_t n,
                                  const int64_t line_step, const int64_t entry_step)
{
    for (int64_t l = 0; l < n; l++) {
        VEC *line = H + l * line_step;
        VEC sum = line[0];
        for (int64_t e = 1; e < n; e++) sum += line[e * entry_step];
        const VEC r = 1 / sum;
        for (int64_t e = 0; e < n; e++) line[e * entry_step] *= r;
    }
    if (!out) return NULL;
    out += n * n * SK_BLOCK;
    for (int64_t k = 0; k < n * n; k++) VSTORE(out + k * SK_BLOCK + sb, H[k]);
    return out;
}

INLINE void CAT(sinkhorn_later, SUF)(T *restrict h, T *restrict slot, const int64_t iters,
                                     const int64_t n)
{
    const int64_t nn = n * n;
    for (int64_t sb = 0; sb < SK_BLOCK; sb += VL) {
        VEC H[MAX_N * MAX_N];
        for (int64_t k = 0; k < nn; k++) H[k] = VLOAD(h + k * SK_BLOCK + sb);
        T *out = slot;
        for (int64_t t = 1; t < iters; t++) {
            out = CAT(sinkhorn_half, SUF)(H, out, sb, n, 1, n); /* columns: sums over i */
            out = CAT(sinkhorn_half, SUF)(H, out, sb, n, n, 1); /* rows: sums over j */
        }
        for (int64_t k = 0; k < nn; k++) VSTORE(h + k * SK_BLOCK + sb, H[k]);
    }
}

static void CAT(sinkhorn_block, SUF)(const T *z, int64_t zstride, int64_t nb, int64_t n,
                                     int64_t iters, T *restrict h, T *restrict lp,
                                     T *restrict trace)
{
    /* token b's logits are z[b * zstride + (0 .. n * n - 1)] */
    const int64_t nn = n * n;
    T mx[SK_BLOCK], s[SK_BLOCK];
    for (int64_t k = 0; k < nn; k++)
        for (int64_t b = 0; b < nb; b++) lp[k * SK_BLOCK + b] = z[b * zstride + k];
    /* The later steps run over all SK_BLOCK lanes (vectorised); the lanes past nb of a
     * partial block are set to ones, so they stay finite (they are never stored). */
    for (int64_t k = 0; k < nn; k++)
        for (int64_t b = nb; b < SK_BLOCK; b++) h[k * SK_BLOCK + b] = 1;
    for (int64_t j = 0; j < n; j++) { /* log-softmax over i of column j */
        for (int64_t b = 0; b < nb; b++) mx[b] = lp[j * SK_BLOCK + b];
        for (int64_t i = 1; i < n; i++)
            for (int64_t b = 0; b < nb; b++) {
                const T v = lp[(i * n + j) * SK_BLOCK + b];
                mx[b] = v > mx[b] ? v : mx[b];
            }
        for (int64_t b = 0; b < nb; b++) s[b] = 0;
        for (int64_t i = 0; i < n; i++)
            for (int64_t b = 0; b < nb; b++) s[b] += EXP(lp[(i * n + j) * SK_BLOCK + b] - mx[b]);
        for (int64_t b = 0; b < nb; b++) mx[b] += LOG(s[b]);
        for (int64_t i = 0; i < n; i++)
            for (int64_t b = 0; b < nb; b++) lp[(i * n + j) * SK_BLOCK + b] -= mx[b];
    }
    if (trace)
        for (int64_t k = 0; k < nn * SK_BLOCK; k++) trace[k] = EXP(lp[k]);
    for (int64_t i = 0; i < n; i++) { /* softmax over j of row i of log P */
        const T *row = lp + i * n * SK_BLOCK;
        T *hrow = h + i * n * SK_BLOCK;
        for (int64_t b = 0; b < nb; b++) mx[b] = row[b];
        for (int64_t j = 1; j < n; j++)
            for (int64_t b = 0; b < nb; b++)
                mx[b] = row[j * SK_BLOCK + b] > mx[b] ? row[j * SK_BLOCK + b] : mx[b];
        for (int64_t b = 0; b < nb; b++) s[b] = 0;
        for (int64_t j = 0; j < n; j++)
            for (int64_t b = 0; b < nb; b++) {
                hrow[j * SK_BLOCK + b] = EXP(row[j * SK_BLOCK + b] - mx[b]);
                s[b] += hrow[j * SK_BLOCK + b];
            }
        for (int64_t j = 0; j < n; j++)
            for (int64_t b = 0; b < nb; b++) hrow[j * SK_BLOCK + b] /= s[b];
    }
    /* The later steps, VL tokens at a time in registers (`sinkhorn_later`); with the trace,
     * H1 goes to its slot first. */
    if (trace)
        for (int64_t k = 0; k < nn * SK_BLOCK; k++) trace[nn * SK_BLOCK + k] = h[k];
#define BODY(N) CAT(sinkhorn_later, SUF)(h, trace ? trace + nn * SK_BLOCK : NULL, iters, N)
    DISPATCH_N(n, BODY)
#undef BODY
}

/* The backward steps on a block: w = dH * H on entry (entry-major, SK_BLOCK lanes), dz on
 * return; trace from sinkhorn_block. Each step Y = X / sum_d X, backwards:
 * W <- W - Y * sum_d(W) (see sinkhorn._iterate_backward). W stays in n * n vector registers
 * for VL tokens at a time through all 2 * iters steps (n a literal: the loops unroll). */
INLINE void CAT(sinkhorn_back_steps, SUF)(T *restrict w, const T *restrict trace, const int64_t n,
                                          const int64_t iters)
{
    const int64_t nn = n * n;
    for (int64_t sb = 0; sb < SK_BLOCK; sb += VL) {
        VEC W[MAX_N * MAX_N];
        for (int64_t k = 0; k < nn; k++) W[k] = VLOAD(w + k * SK_BLOCK + sb);
        for (int64_t step = 2 * iters - 1; step >= 0; step--) {
            const T *y = trace + step * nn * SK_BLOCK + sb;
            if (step % 2 == 0) /* a column step: sums over i along each column */
                for (int64_t j = 0; j < n; j++) {
                    VEC sum = W[j];
                    for (int64_t i = 1; i < n; i++) sum += W[i * n + j];
                    for (int64_t i = 0; i < n; i++) W[i * n + j] -= VLOAD(y + (i * n + j) * SK_BLOCK) * sum;
                }
            else /* a row step: sums over j along each row */
                for (int64_t i = 0; i < n; i++) {
                    VEC sum = W[i * n];
                    for (int64_t j = 1; j < n; j++) sum += W[i * n + j];
                    for (int64_t j = 0; j < n; j++) W[i * n + j] -= VLOAD(y + (i * n + j) * SK_BLOCK) * sum;
                }
        }
        for (int64_t k = 0; k < nn; k++) VSTORE(w + k * SK_BLOCK + sb, W[k]);
    }
}

static void CAT(sinkhorn_block_backward, SUF)(T *restrict w, const T *restrict trace, int64_t n,
                                              int64_t iters)
{
#define BODY(N) CAT(sinkhorn_back_steps, SUF)(w, trace, N, iters)
    DISPATCH_N(n, BODY)
#undef BODY
}

/* Per-thread scratch: h, lp and (backward) the trace; h and lp start finite (all ones). */
static T *CAT(sinkhorn_scratch, SUF)(int64_t n, int64_t iters, int with_trace)
{
    const size_t per = (size_t)(n * n * SK_BLOCK);
    T *buf = malloc(sizeof(T) * per * (2 + (with_trace ? 2 * (size_t)iters : 0)));
    if (buf)
        for (size_t k = 0; k < 2 * per; k++) buf[k] = 1;
    return buf;
}

/* Sinkhorn-Knopp over all tokens, a block of SK_BLOCK at a time. grad_h NULL: out = H. Else
 * out = dz from dH: recompute the steps, then sinkhorn_block_backward from W = dH * H.
 * z, grad_h, out: (M, n, n); iters >= 1. Returns 0, or -1 if scratch memory could not be had. */
static int CAT(sinkhorn_run, SUF)(const T *restrict z, const T *restrict grad_h, T *restrict out,
                                  int64_t M, int64_t n, int64_t iters, int nt)
{
    nt = CAT(threads_for, SUF)(M * n * n * (iters + 1), nt);
    int failed = 0;
    const int64_t nn = n * n, blocks = (M + SK_BLOCK - 1) / SK_BLOCK;
    _Pragma("omp parallel num_threads(nt) reduction(|:failed)")
    {
        T *buf = CAT(sinkhorn_scratch, SUF)(n, iters, grad_h != NULL);
        if (!buf) failed = 1;
        _Pragma("omp for schedule(static)")
        for (int64_t blk = 0; blk < blocks; blk++) {
            if (!buf) continue;
            const int64_t m0 = blk * SK_BLOCK;
            const int64_t nb = M - m0 < SK_BLOCK ? M - m0 : SK_BLOCK;
            T *w = buf, *lp = buf + nn * SK_BLOCK, *trace = grad_h ? buf + 2 * nn * SK_BLOCK : NULL;
            CAT(sinkhorn_block, SUF)(z + m0 * nn, nn, nb, n, iters, w, lp, trace);
            if (grad_h) {
                for (int64_t b = 0; b < nb; b++) /* W = dH * H */
                    for (int64_t k = 0; k < nn; k++) w[k * SK_BLOCK + b] *= grad_h[(m0 + b) * nn + k];
                CAT(sinkhorn_block_backward, SUF)(w, trace, n, iters);
            }
            for (int64_t b = 0; b < nb; b++)
                for (int64_t k = 0; k < nn; k++) out[(m0 + b) * nn + k] = w[k * SK_BLOCK + b];
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* z, h: (M, n, n); iters >= 1. Returns 0, or -1 if scratch memory could not be had. */
int CAT(mhc_sinkhorn_forward, SUF)(const T *restrict z, T *restrict h, int64_t M, int64_t n,
                                   int64_t iters, int nt)
{
    return CAT(sinkhorn_run, SUF)(z, NULL, h, M, n, iters, nt);
}

/* dz from dH (all (M, n, n)), recomputing the iterations. Returns 0, or -1 as above. */
int CAT(mhc_sinkhorn_backward, SUF)(const T *restrict z, const T *restrict grad_h,
                                    T *restrict grad_z, int64_t M, int64_t n, int64_t iters,
                                    int nt)
{
    return CAT(sinkhorn_run, SUF)(z, grad_h, grad_z, M, n, iters, nt);
}

/* ---- HC: coefficients and stream read fused (connections.HyperConnection, dynamic) --------
 * Per token and stream row x_i (C values), with K = n + 2 folded weight columns
 * Wt = (w * [W_m | W_r | W_beta])^T, shape (K, C):
 *   inv_i = 1 / sqrt(mean(x_i^2) + eps),  p_i = inv_i * (Wt x_i)         (K values)
 *   t_i = tanh(p_i) (or p_i without tanh)
 *   alpha_i = A_i + s_a * t_i[0..n],  beta_i = B_i + s_b * t_i[n + 1]     (HC paper, eq. in
 *   DESIGN.md section 2: [H_pre^T | H_res^T] = alpha, H_post^T = beta)
 *   read R[q][j] = alpha_j[q]: y_in = R[0] x, y_mix = R[1..n] x,  h_res[i][j] = R[1 + i][j].
 * One pass over the token's streams: the norms, the projection and the read. */

INLINE void CAT(hc_forward_token, SUF)(const T *restrict x, const T *restrict Wt,
                                       const T *restrict A, const T *restrict Bv, const T s_a,
                                       const T s_b, const int use_tanh, const T eps,
                                       T *restrict y_in, T *restrict y_mix, T *restrict h_post,
                                       T *restrict h_res, T *restrict p_out, T *restrict inv_out,
                                       const int64_t n, const int64_t C)
{
    const int64_t K = n + 2;
    T R[(MAX_N + 1) * MAX_N], t[MAX_N * (MAX_N + 2)];
    T ss[MAX_N];
    for (int64_t i = 0; i < n; i++) { /* the norms and projections first: no wait on 1/sqrt */
        ss[i] = CAT(sum_squares, SUF)(x + i * C, C);
        CAT(dot_rows, SUF)(x + i * C, Wt, K, C, p_out + i * K);
    }
    for (int64_t i = 0; i < n; i++) inv_out[i] = 1 / SQRT(ss[i] / (T)C + eps);
    for (int64_t i = 0; i < n; i++)
        for (int64_t k = 0; k < K; k++) p_out[i * K + k] *= inv_out[i];
    /* the token's n (n + 2) tanh in one vectorised loop */
    if (use_tanh)
        for (int64_t q = 0; q < n * K; q++) t[q] = TANH(p_out[q]);
    else
        for (int64_t q = 0; q < n * K; q++) t[q] = p_out[q];
    for (int64_t i = 0; i < n; i++) {
        for (int64_t k = 0; k <= n; k++) R[k * n + i] = A[i * (n + 1) + k] + s_a * t[i * K + k];
        h_post[i] = Bv[i] + s_b * t[i * K + n + 1];
    }
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < n; j++) h_res[i * n + j] = R[(1 + i) * n + j];
    CAT(read_forward_token, SUF)(x, R, y_in, y_mix, n, C);
}

/* x: (M, n, C), Wt: (K, C), A: (n, n + 1), Bv: (n,); outputs y_in (M, C), y_mix (M, n, C),
 * h_post (M, n), h_res (M, n, n), and for the backward p (M, n, K), inv (M, n). */
void CAT(mhc_hc_forward, SUF)(const T *restrict x, const T *restrict Wt, const T *restrict A,
                              const T *restrict Bv, double s_a, double s_b, int use_tanh,
                              double eps, T *restrict y_in, T *restrict y_mix,
                              T *restrict h_post, T *restrict h_res, T *restrict p,
                              T *restrict inv, int64_t M, int64_t n, int64_t C, int nt)
{
    nt = CAT(threads_for, SUF)(M * n * C, nt);
#define BODY(N)                                                                                \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                              \
    for (int64_t m = 0; m < M; m++)                                                            \
        CAT(hc_forward_token, SUF)(x + m * N * C, Wt, A, Bv, (T)s_a, (T)s_b, use_tanh, (T)eps,  \
                                   y_in + m * C, y_mix + m * N * C, h_post + m * N,             \
                                   h_res + m * N * N, p + m * N * (N + 2), inv + m * N, N, C)
    DISPATCH_N(n, BODY)
#undef BODY
}

/* Backward of the above, per token: gy_0 = g_in, gy_{1+i} = g_mix[i]; g_post = dL/dH_post
 * and g_hres = dL/dH_res may be NULL (zero).
 *   dR[q][j] = <gy_q, x_j> (+ g_hres),  dalpha_j[q] = dR[q][j]  -> grad_alpha (n, n + 1)
 *   dt_i = s_a * dalpha_i | s_b * g_post_i,  dp_i = dt_i * (1 - t_i^2) (tanh) or dt_i
 *   dp_scaled_i = inv_i * dp_i                      (for dL/dW = sum x_i^T dp_scaled_i)
 *   grad_x_j = sum_q R[q][j] gy_q + Wt^T dp_scaled_j - x_j * inv_j^2 / C * <dp_j, p_j>
 *   gate_parts = (sum_{i, q} dalpha_i[q] t_i[q], sum_i g_post_i t_i[n + 1]): the token's parts
 *   of dL/ds_alpha and dL/ds_beta
 * One pass over the token's streams and their gradients. */
INLINE void CAT(hc_backward_token, SUF)(const T *restrict x, const T *restrict Wt,
                                        const T *restrict A, const T s_a, const T s_b,
                                        const int use_tanh, const T *restrict p,
                                        const T *restrict inv, const T *restrict g_in,
                                        const T *restrict g_mix, const T *restrict g_post,
                                        const T *restrict g_hres, T *restrict grad_x,
                                        T *restrict grad_alpha, T *restrict dp_scaled,
                                        T *restrict gate_parts, const int64_t n, const int64_t C)
{
    const int64_t K = n + 2;
    T ga = 0, gb = 0; /* this token's parts of dL/ds_alpha and dL/ds_beta */
    T R[(MAX_N + 1) * MAX_N], dR[(MAX_N + 1) * MAX_N], coef[MAX_N];
    const T *gy[MAX_N + 1];
    gy[0] = g_in;
    for (int64_t q = 0; q < n; q++) gy[q + 1] = g_mix + q * C;
    for (int64_t q = 0; q <= n; q++) CAT(dot_rows, SUF)(gy[q], x, n, C, dR + q * n);
    if (g_hres)
        for (int64_t k = 0; k < n * n; k++) dR[n + k] += g_hres[k];
    T tt[MAX_N * (MAX_N + 2)]; /* tanh(p), recomputed in one vectorised loop */
    if (use_tanh)
        for (int64_t q = 0; q < n * K; q++) tt[q] = TANH(p[q]);
    else
        for (int64_t q = 0; q < n * K; q++) tt[q] = p[q];
    for (int64_t i = 0; i < n; i++) {
        T sdp = 0;
        for (int64_t k = 0; k < K; k++) {
            const T pk = p[i * K + k];
            const T t = tt[i * K + k];
            T dt;
            if (k <= n) {
                R[k * n + i] = A[i * (n + 1) + k] + s_a * t;
                grad_alpha[i * (n + 1) + k] = dR[k * n + i];
                ga += dR[k * n + i] * t;
                dt = s_a * dR[k * n + i];
            } else {
                gb += g_post ? g_post[i] * t : 0;
                dt = g_post ? s_b * g_post[i] : 0;
            }
            const T dp = use_tanh ? dt * (1 - t * t) : dt;
            sdp += dp * pk;
            dp_scaled[i * K + k] = inv[i] * dp;
        }
        coef[i] = -sdp * inv[i] * inv[i] / (T)C;
    }
    gate_parts[0] = ga;
    gate_parts[1] = gb;
    for (int64_t j = 0; j < n; j++) {
        T r[MAX_N + 1], w[MAX_N + 2];
        for (int64_t q = 0; q <= n; q++) r[q] = R[q * n + j];
        for (int64_t k = 0; k < K; k++) w[k] = dp_scaled[j * K + k];
        const T cj = coef[j];
        const T *restrict xj = x + j * C;
        T *restrict gx = grad_x + j * C;
        for (int64_t c = 0; c < C; c++) {
            T acc = cj * xj[c];
            for (int64_t q = 0; q <= n; q++) acc += r[q] * gy[q][c];
            for (int64_t k = 0; k < K; k++) acc += w[k] * Wt[k * C + c];
            gx[c] = acc;
        }
    }
}

/* grad_x (M, n, C), grad_alpha (M, n, n + 1), dp_scaled (M, n, K), gate_parts (M, 2) out. */
void CAT(mhc_hc_backward, SUF)(const T *restrict x, const T *restrict Wt, const T *restrict A,
                               double s_a, double s_b, int use_tanh, const T *restrict p,
                               const T *restrict inv, const T *restrict g_in,
                               const T *restrict g_mix, const T *restrict g_post,
                               const T *restrict g_hres, T *restrict grad_x,
                               T *restrict grad_alpha, T *restrict dp_scaled,
                               T *restrict gate_parts, int64_t M, int64_t n, int64_t C, int nt)
{
    nt = CAT(threads_for, SUF)(M * n * C, nt);
#define BODY(N)                                                                                \
    _Pragma("omp parallel for num_threads(nt) schedule(static)")                              \
    for (int64_t m = 0; m < M; m++)                                                            \
        CAT(hc_backward_token, SUF)(x + m * N * C, Wt, A, (T)s_a, (T)s_b, use_tanh,             \
                                    p + m * N * (N + 2), inv + m * N, g_in + m * C,             \
                                    g_mix + m * N * C, g_post ? g_post + m * N : NULL,          \
                                    g_hres ? g_hres + m * N * N : NULL, grad_x + m * N * C,     \
                                    grad_alpha + m * N * (N + 1), dp_scaled + m * N * (N + 2),  \
                                    gate_parts + 2 * m, N, C)
    DISPATCH_N(n, BODY)
#undef BODY
}

/* ---- mHC: coefficients and stream read fused (connections.ManifoldHyperConnection) --------
 * Per token, with v = x (n * C values), K = 2n + n^2 and raw = v @ phi (the caller's matmul,
 * phi with the norm weight and the gates folded in):
 *   inv = 1 / sqrt(mean(v^2) + eps),  logits = inv * raw + bias
 *   H_pre = sigmoid(logits[0, n)),  H_post = 2 sigmoid(logits[n, 2n)),
 *   H_res = SinkhornKnopp(logits[2n, K)) (exp for iters = 0)           (mHC paper, DESIGN.md 2)
 *   and the read with R = [H_pre; H_res]: y_in = R[0] x, y_mix = R[1..n] x.
 * Tokens go in blocks of SK_BLOCK: norms and gates per token, Sinkhorn-Knopp over the block
 * (vectorised over tokens), the read per token while the block's streams are in cache. */

/* Per-thread scratch of the mHC kernels: Sinkhorn's (h, lp[, trace]), two (n + 1) x n
 * matrices per token of a block (R and its gradient) and the block's 2n gates (entry-major). */
static T *CAT(mhc_scratch, SUF)(int64_t n, int64_t iters, int with_trace)
{
    const size_t sk = (size_t)(n * n * SK_BLOCK) * (2 + (with_trace ? 2 * (size_t)iters : 0));
    T *buf = malloc(sizeof(T) * (sk + (size_t)((2 * (n + 1) * n + 2 * n) * SK_BLOCK)));
    if (buf)
        for (size_t k = 0; k < sk; k++) buf[k] = 1; /* finite lanes past a partial block */
    return buf;
}

/* The block's gates sigmoid(logits[0, 2n)) into ge (2n, SK_BLOCK) and, for iters = 0,
 * H_res = exp(logits[2n, K)) into h (n * n, SK_BLOCK): entry-major, so that the exp run
 * vectorised over tokens. z: the block's rows of logits (M, K). */
static void CAT(gates_block, SUF)(const T *restrict z, int64_t K, int64_t nb, int64_t n,
                                  int64_t iters, T *restrict ge, T *restrict h)
{
    for (int64_t j = 0; j < 2 * n; j++) {
        T *restrict g = ge + j * SK_BLOCK;
        for (int64_t b = 0; b < nb; b++) g[b] = z[b * K + j];
        for (int64_t b = 0; b < nb; b++) g[b] = SIGMOID(g[b]);
    }
    if (iters == 0)
        for (int64_t k = 0; k < n * n; k++) {
            T *restrict hk = h + k * SK_BLOCK;
            for (int64_t b = 0; b < nb; b++) hk[b] = z[b * K + 2 * n + k];
            for (int64_t b = 0; b < nb; b++) hk[b] = EXP(hk[b]);
        }
}

INLINE void CAT(read_forward_block, SUF)(const T *restrict x, const T *restrict R,
                                         T *restrict y_in, T *restrict y_mix, const int64_t nb,
                                         const int64_t n, const int64_t C)
{
    for (int64_t b = 0; b < nb; b++)
        CAT(read_forward_token, SUF)(x + b * n * C, R + b * (n + 1) * n, y_in + b * C,
                                     y_mix + b * n * C, n, C);
}

/* x: (M, n, C), raw: (M, K), bias: (K,); outputs y_in (M, C), y_mix (M, n, C), h_post (M, n),
 * h_res (M, n, n) and, for the backward, logits (M, K), inv (M,). Returns 0, or -1 if scratch
 * memory could not be had. */
int CAT(mhc_mhc_forward, SUF)(const T *restrict x, const T *restrict raw, const T *restrict bias,
                              double eps, int64_t iters, T *restrict y_in, T *restrict y_mix,
                              T *restrict h_post, T *restrict h_res, T *restrict logits,
                              T *restrict inv, int64_t M, int64_t n, int64_t C, int nt)
{
    nt = CAT(threads_for, SUF)(M * n * C, nt);
    int failed = 0;
    const int64_t nn = n * n, K = 2 * n + nn, D = n * C, blocks = (M + SK_BLOCK - 1) / SK_BLOCK;
    _Pragma("omp parallel num_threads(nt) reduction(|:failed)")
    {
        T *buf = CAT(mhc_scratch, SUF)(n, iters, 0);
        if (!buf) failed = 1;
        T *hb = buf, *lp = buf + nn * SK_BLOCK, *R = buf + 2 * nn * SK_BLOCK;
        T *ge = R + 2 * (n + 1) * n * SK_BLOCK;
        _Pragma("omp for schedule(static)")
        for (int64_t blk = 0; blk < blocks; blk++) {
            if (!buf) continue;
            const int64_t m0 = blk * SK_BLOCK;
            const int64_t nb = M - m0 < SK_BLOCK ? M - m0 : SK_BLOCK;
            for (int64_t b = 0; b < nb; b++) {
                const int64_t m = m0 + b;
                const T *restrict v = x + m * D;
                const T ss = CAT(sum_squares, SUF)(v, D);
                const T r = 1 / SQRT(ss / (T)D + (T)eps);
                inv[m] = r;
                T *lg = logits + m * K;
                for (int64_t k = 0; k < K; k++) lg[k] = raw[m * K + k] * r + bias[k];
            }
            CAT(gates_block, SUF)(logits + m0 * K, K, nb, n, iters, ge, hb);
            if (iters > 0)
                CAT(sinkhorn_block, SUF)(logits + m0 * K + 2 * n, K, nb, n, iters, hb, lp, NULL);
            for (int64_t b = 0; b < nb; b++) {
                for (int64_t j = 0; j < n; j++) R[b * (n + 1) * n + j] = ge[j * SK_BLOCK + b];
                for (int64_t i = 0; i < n; i++) h_post[(m0 + b) * n + i] = 2 * ge[(n + i) * SK_BLOCK + b];
                for (int64_t k = 0; k < nn; k++) {
                    const T h = hb[k * SK_BLOCK + b];
                    R[b * (n + 1) * n + n + k] = h;
                    h_res[(m0 + b) * nn + k] = h;
                }
            }
#define BODY(N) CAT(read_forward_block, SUF)(x + m0 * D, R, y_in + m0 * C, y_mix + m0 * D, nb, N, C)
            DISPATCH_N(n, BODY)
#undef BODY
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* grad_x_j = sum_q R[q][j] gy_q + coef * x_j for one token. */
INLINE void CAT(mixed_grad_token, SUF)(const T *restrict x, const T *restrict R,
                                       const T *restrict g_in, const T *restrict g_mix,
                                       const T coef, T *restrict grad_x, const int64_t n,
                                       const int64_t C)
{
    for (int64_t j = 0; j < n; j++) {
        T r[MAX_N + 1];
        for (int64_t q = 0; q <= n; q++) r[q] = R[q * n + j];
        const T *restrict xj = x + j * C;
        T *restrict gx = grad_x + j * C;
        for (int64_t c = 0; c < C; c++) {
            T acc = coef * xj[c] + r[0] * g_in[c];
            for (int64_t q = 1; q <= n; q++) acc += r[q] * g_mix[(q - 1) * C + c];
            gx[c] = acc;
        }
    }
}

INLINE void CAT(mixed_grad_block, SUF)(const T *restrict x, const T *restrict R,
                                       const T *restrict g_in, const T *restrict g_mix,
                                       const T *restrict coef, T *restrict grad_x,
                                       const int64_t nb, const int64_t n, const int64_t C)
{
    for (int64_t b = 0; b < nb; b++)
        CAT(mixed_grad_token, SUF)(x + b * n * C, R + b * (n + 1) * n, g_in + b * C,
                                   g_mix + b * n * C, coef[b], grad_x + b * n * C, n, C);
}

/* Backward of mhc_mhc_forward up to the projection: gy_0 = g_in, gy_{1+i} = g_mix[i]; g_post
 * and g_hres may be NULL (zero). Per token:
 *   dR[q][j] = <gy_q, x_j> (+ g_hres),  dlogits = the gates' and Sinkhorn-Knopp's backward
 *   grad_x_j = sum_q R[q][j] gy_q - x_j * inv^2 / (nC) * <dlogits, logits - bias>
 * The caller adds the projection's part, (inv * dlogits) @ phi^T, with one matmul.
 * Returns 0, or -1 if scratch memory could not be had. */
int CAT(mhc_mhc_backward, SUF)(const T *restrict x, const T *restrict logits,
                               const T *restrict inv, const T *restrict bias, int64_t iters,
                               const T *restrict g_in, const T *restrict g_mix,
                               const T *restrict g_post, const T *restrict g_hres,
                               T *restrict grad_x, T *restrict dlogits, int64_t M, int64_t n,
                               int64_t C, int nt)
{
    nt = CAT(threads_for, SUF)(M * n * C, nt);
    int failed = 0;
    const int64_t nn = n * n, K = 2 * n + nn, D = n * C, blocks = (M + SK_BLOCK - 1) / SK_BLOCK;
    const int64_t P = (n + 1) * n;
    _Pragma("omp parallel num_threads(nt) reduction(|:failed)")
    {
        T *buf = CAT(mhc_scratch, SUF)(n, iters, 1);
        if (!buf) failed = 1;
        T *w = buf, *lp = buf + nn * SK_BLOCK, *trace = buf + 2 * nn * SK_BLOCK;
        T *R = buf + (2 + 2 * iters) * nn * SK_BLOCK, *dR = R + P * SK_BLOCK, *ge = dR + P * SK_BLOCK;
        _Pragma("omp for schedule(static)")
        for (int64_t blk = 0; blk < blocks; blk++) {
            if (!buf) continue;
            const int64_t m0 = blk * SK_BLOCK;
            const int64_t nb = M - m0 < SK_BLOCK ? M - m0 : SK_BLOCK;
            /* recompute the gates and H_res (w), with Sinkhorn-Knopp's trace */
            CAT(gates_block, SUF)(logits + m0 * K, K, nb, n, iters, ge, w);
            if (iters > 0)
                CAT(sinkhorn_block, SUF)(logits + m0 * K + 2 * n, K, nb, n, iters, w, lp, trace);
            for (int64_t b = 0; b < nb; b++) {
                const int64_t m = m0 + b;
                T *Rb = R + b * P, *dRb = dR + b * P, *dl = dlogits + m * K;
                for (int64_t j = 0; j < n; j++) Rb[j] = ge[j * SK_BLOCK + b];
                for (int64_t k = 0; k < nn; k++) Rb[n + k] = w[k * SK_BLOCK + b];
                CAT(dot_rows, SUF)(g_in + m * C, x + m * D, n, C, dRb);
                for (int64_t q = 0; q < n; q++)
                    CAT(dot_rows, SUF)(g_mix + m * D + q * C, x + m * D, n, C, dRb + (q + 1) * n);
                if (g_hres)
                    for (int64_t k = 0; k < nn; k++) dRb[n + k] += g_hres[m * nn + k];
                for (int64_t j = 0; j < n; j++) /* sigmoid' = s (1 - s) */
                    dl[j] = dRb[j] * Rb[j] * (1 - Rb[j]);
                for (int64_t i = 0; i < n; i++) {
                    const T s = ge[(n + i) * SK_BLOCK + b];
                    dl[n + i] = g_post ? g_post[m * n + i] * 2 * s * (1 - s) : 0;
                }
                if (iters > 0)
                    for (int64_t k = 0; k < nn; k++) w[k * SK_BLOCK + b] *= dRb[n + k]; /* dH * H */
                else
                    for (int64_t k = 0; k < nn; k++) dl[2 * n + k] = dRb[n + k] * Rb[n + k]; /* exp' */
            }
            if (iters > 0) {
                CAT(sinkhorn_block_backward, SUF)(w, trace, n, iters);
                for (int64_t b = 0; b < nb; b++)
                    for (int64_t k = 0; k < nn; k++) dlogits[(m0 + b) * K + 2 * n + k] = w[k * SK_BLOCK + b];
            }
            T coef[SK_BLOCK];
            for (int64_t b = 0; b < nb; b++) {
                const int64_t m = m0 + b;
                T s = 0;
                for (int64_t k = 0; k < K; k++) s += dlogits[m * K + k] * (logits[m * K + k] - bias[k]);
                coef[b] = -s * inv[m] * inv[m] / (T)D;
            }
#define BODY(N) CAT(mixed_grad_block, SUF)(x + m0 * D, R, g_in + m0 * C, g_mix + m0 * D, coef, grad_x + m0 * D, nb, N, C)
            DISPATCH_N(n, BODY)
#undef BODY
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

#undef VEC
#undef VLOAD
#undef VSTORE
