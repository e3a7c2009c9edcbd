/* One-pass statistics of a flat array of GP_T, included by _native.c once per element type.
 *
 * GP_T: the element type; GP_V/GP_I: vectors of GP_T and of same-width integers; GP_L: lanes;
 * GP_ABS: the mask that clears the sign bit; GP_SUF: the suffix of the function names;
 * GP_MINV/GP_MAXV: lane-wise min/max of (v, acc) keeping acc where v is NaN.
 * Elements are taken in blocks of GP_BLOCK vectors (the last one shorter, then fewer than GP_L
 * elements one by one): within a block every lane accumulates in GP_T, each block's lane sums are
 * added in double (the accumulation error of 1024-element sums). Counts
 * are exact (int32 within a block, double across blocks: exact below 2^53).
 */

#define GP_CAT2(a, b) a##b
#define GP_CAT(a, b) GP_CAT2(a, b)
#define GP_BLOCK (1024 / GP_L)

/* row[SUM, SUMSQ, ABS_SUM, NONZERO, NONFINITE] and row[NEG_MIN, MAX] of x[0..n); extra[0],
 * extra[1] = Σ (x − b)², Σ (x − c)² where b, c are not NULL (extra may be NULL when both are). */
static void GP_CAT(gp_pass_, GP_SUF)(const GP_T *x, const GP_T *b, const GP_T *c, int64_t n,
                                      double *row, double *extra) {
    double s = 0, q = 0, a = 0, nz = 0, nf = 0, d1 = 0, d2 = 0;
    const GP_V zero = {0};
    const GP_V inf = (GP_T)INFINITY - zero;
    GP_V vmn = inf, vmx = -inf;
    int64_t i = 0;
    while (n - i >= GP_L) {  /* whole vectors, GP_BLOCK of them (or fewer, at the end) a block */
        int64_t nb = (n - i) / GP_L < GP_BLOCK ? (n - i) / GP_L : GP_BLOCK;
        GP_V vs = zero, vq = zero, va = zero, v1 = zero, v2 = zero;
        GP_I vnz = {0}, vnf = {0};
        for (int64_t k = 0; k < nb; k++) {
            GP_V v;
            __builtin_memcpy(&v, x + i + k * GP_L, sizeof v);
            GP_V av = (GP_V)((GP_I)v & GP_ABS);
            vs += v;
            vq += v * v;
            va += av;
            vnz -= (GP_I)(v != zero);
            vnf -= (GP_I)~(av < inf);
            vmn = GP_MINV(v, vmn);  /* (v, acc): a NaN v keeps acc */
            vmx = GP_MAXV(v, vmx);
            if (b) {
                GP_V vb, e;
                __builtin_memcpy(&vb, b + i + k * GP_L, sizeof vb);
                e = v - vb;
                v1 += e * e;
            }
            if (c) {
                GP_V vc, e;
                __builtin_memcpy(&vc, c + i + k * GP_L, sizeof vc);
                e = v - vc;
                v2 += e * e;
            }
        }
        GP_T fs = 0, fq = 0, fa = 0, f1 = 0, f2 = 0;
        int64_t cz = 0, cf = 0;
        for (int l = 0; l < GP_L; l++) {
            fs += vs[l]; fq += vq[l]; fa += va[l]; f1 += v1[l]; f2 += v2[l];
            cz += vnz[l]; cf += vnf[l];
        }
        s += fs; q += fq; a += fa; d1 += f1; d2 += f2; nz += (double)cz; nf += (double)cf;
        i += nb * GP_L;
    }
    GP_T mn = INFINITY, mx = -INFINITY;
    for (int l = 0; l < GP_L; l++) {
        if (vmn[l] < mn) mn = vmn[l];
        if (vmx[l] > mx) mx = vmx[l];
    }
    for (; i < n; i++) {
        GP_T v = x[i];
        double dv = v;
        s += dv; q += dv * dv; a += fabs(dv); nz += v != 0; nf += !(fabs(dv) < INFINITY);
        if (v < mn) mn = v;
        if (v > mx) mx = v;
        if (b) d1 += ((double)v - b[i]) * ((double)v - b[i]);
        if (c) d2 += ((double)v - c[i]) * ((double)v - c[i]);
    }
    if (nf > 0) {  /* NaN propagates into the extrema, as torch.amin/amax do */
        for (int64_t j = 0; j < n; j++) {
            if (x[j] != x[j]) {
                mn = mx = NAN;
                break;
            }
        }
    }
    row[GP_SUM] = s; row[GP_SUMSQ] = q; row[GP_ABS_SUM] = a; row[GP_NONZERO] = nz;
    row[GP_NONFINITE] = nf; row[GP_NEG_MIN] = -(double)mn; row[GP_MAX] = mx;
    if (extra) {
        extra[0] = d1;
        extra[1] = d2;
    }
}

/* Σ x² of x[0..n): blocks in GP_T, blocks added in double (the always-on tier's norms). */
static double GP_CAT(gp_sq_, GP_SUF)(const GP_T *x, int64_t n) {
    const GP_V zero = {0};
    double q = 0;
    int64_t i = 0;
    while (n - i >= GP_L) {
        int64_t nb = (n - i) / GP_L < GP_BLOCK ? (n - i) / GP_L : GP_BLOCK;
        GP_V vq = zero;
        for (int64_t k = 0; k < nb; k++) {
            GP_V v;
            __builtin_memcpy(&v, x + i + k * GP_L, sizeof v);
            vq += v * v;
        }
        GP_T fq = 0;
        for (int l = 0; l < GP_L; l++)
            fq += vq[l];
        q += fq;
        i += nb * GP_L;
    }
    for (; i < n; i++)
        q += (double)x[i] * x[i];
    return q;
}

/* out[j] = ‖x_j‖₂ (float32) of the k arrays x_j = ptrs[j] of ns[j] elements. */
void GP_CAT(gp_norms_, GP_SUF)(int64_t k, const int64_t *ptrs, const int64_t *ns, float *out) {
    for (int64_t j = 0; j < k; j++)
        out[j] = (float)sqrt(GP_CAT(gp_sq_, GP_SUF)((const GP_T *)(intptr_t)ptrs[j], ns[j]));
}

/* Rows of k arrays: rows[j * GP_NSTATS + field] for x = ptrs[j] of ns[j] elements. */
void GP_CAT(gp_rows_, GP_SUF)(int64_t k, const int64_t *ptrs, const int64_t *ns, double *rows) {
    for (int64_t j = 0; j < k; j++)
        GP_CAT(gp_pass_, GP_SUF)((const GP_T *)(intptr_t)ptrs[j], 0, 0, ns[j],
                                  rows + j * GP_NSTATS, 0);
}

/* Rows of the outer x m arrays of n elements at base + s * stride + r * n (the stage's runs):
 * out[(s * m + r) * GP_NSTATS + field]. */
void GP_CAT(gp_blocks_, GP_SUF)(const GP_T *base, int64_t outer, int64_t stride, int64_t m,
                                int64_t n, double *out) {
    for (int64_t s = 0; s < outer; s++)
        for (int64_t r = 0; r < m; r++)
            GP_CAT(gp_pass_, GP_SUF)(base + s * stride + r * n, 0, 0, n,
                                      out + (s * m + r) * GP_NSTATS, 0);
}

/* The row of w, then out[GP_NSTATS] = Σ (w − prev)², out[GP_NSTATS + 1] = Σ (w − init)²
 * (0 where prev / init is NULL), in one pass over w; where cols > 0, w seen as rows of cols
 * elements: out[GP_NSTATS + 2] = Σ_j (Σ_i w[i, j])², the squared norm of its column sums
 * (64 rows at a time in GP_T, then in double; a second pass while w is still in cache).
 * Returns 0, or 1 where the column sums could not be allocated (out[GP_NSTATS + 2] is then
 * left as it was). */
int GP_CAT(gp_weight_, GP_SUF)(const GP_T *w, const GP_T *prev, const GP_T *init, int64_t n,
                               int64_t cols, double *out) {
    GP_CAT(gp_pass_, GP_SUF)(w, prev, init, n, out, out + GP_NSTATS);
    if (cols <= 0 || n % cols != 0)
        return 0;
    /* column sums of 64 rows at a time in GP_T (vectorised), added into double ones */
    double *cs = calloc((size_t)cols, sizeof(double));
    GP_T *part = calloc((size_t)cols, sizeof(GP_T));
    if (!cs || !part) {
        free(cs);
        free(part);
        return 1;
    }
    int64_t rows = n / cols;
    for (int64_t r0 = 0; r0 < rows; r0 += 64) {
        int64_t r1 = r0 + 64 < rows ? r0 + 64 : rows;
        for (int64_t r = r0; r < r1; r++) {
            const GP_T *row = w + r * cols;
            for (int64_t j = 0; j < cols; j++)
                part[j] += row[j];
        }
        for (int64_t j = 0; j < cols; j++) {
            cs[j] += part[j];
            part[j] = 0;
        }
    }
    double t = 0;
    for (int64_t j = 0; j < cols; j++)
        t += cs[j] * cs[j];
    free(cs);
    free(part);
    out[GP_NSTATS + 2] = t;
    return 0;
}

#undef GP_BLOCK
