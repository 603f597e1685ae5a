/* binq CPU kernels: y = x W^T + b straight from packed weights, fp32 accumulation.
 *
 * Built on first use by binq/nn/cpu_kernels.py (cc -O3 -march=native -fopenmp -shared) and called
 * through ctypes. Every plane a kernel reads is re-packed once per module (cpu_kernels.py) into rows of
 * 16-column chunks: chunk t of row i is the uint16 at planes[i * chunks + t], column 16 t + k at bit k.
 * Activations are padded with zeros to whole chunks, so padding bits never count.
 *
 * The 1-bit trick (all layouts): sum_j s_j x_j over a chunk, s in {-1, +1}, is 2 P - N with
 * P = sum of x over the set bits and N = sum of x over the chunk; with AVX-512 a set-bit sum of 16
 * columns is one masked add (_mm512_mask_add_ps), so a 1-bit weight costs one instruction per 16
 * weights and the weight stream is 1/32 of fp32's. Multi-bit codes are sums of such planes
 * (bit-serial: sum_j c_j x_j = sum_k 2^k P_k). The portable path computes the same sums in plain C.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#define BINQ_AVX512 1
#else
#define BINQ_AVX512 0
#endif

int binq_isa(void) { return BINQ_AVX512 ? 512 : 0; }

/* ---------------------------------------------------------------- helpers */

#if BINQ_AVX512
typedef __m512 vacc;
static inline vacc vzero(void) { return _mm512_setzero_ps(); }
static inline vacc vmadd(vacc acc, uint16_t mask, const float *x) {
    return _mm512_mask_add_ps(acc, (__mmask16)mask, acc, _mm512_loadu_ps(x));
}
static inline float vsum(vacc acc) { return _mm512_reduce_add_ps(acc); }
#else
typedef float vacc;
static inline vacc vzero(void) { return 0.0f; }
static inline vacc vmadd(vacc acc, uint16_t mask, const float *x) {
    float s = 0.0f;
    for (int k = 0; k < 16; k++) s += (mask >> k & 1) ? x[k] : 0.0f;
    return acc + s;
}
static inline float vsum(vacc acc) { return acc; }
#endif

static inline float chunk_sum(const float *x) {
    float s = 0.0f;
    for (int k = 0; k < 16; k++) s += x[k];
    return s;
}

static inline int bit_at(const uint16_t *plane, int64_t j) { return plane[j >> 4] >> (j & 15) & 1; }

/* ---------------------------------------------------------------- binary layout
 * W[i, j] = alpha[i, b, z] c[j, z] s[i, j] + mu[i, b, z] (structured.BinaryWeight). Zones of
 * non-salient columns: one (dense) or two (concentrated, sparse: the group bitmap's 0 and 1). Salient
 * columns (few) are summed element by element from their compact list, first-order and residual.
 *
 * scales, means: float (rows, blocks, zones). colscale: float (nplain, chunks*16) or NULL (zero on
 * salient columns). nonsalient: uint16 (chunks) or NULL (every column). sal_*: see binary_salient.
 */
typedef struct {
    int rows, chunks, block_chunks, blocks, zones, nplain;
    const uint16_t *signs, *bitmap, *nonsalient;
    const float *scales, *means, *colscale;
    int nsal, salient_groups, block_size;
    const int32_t *sal_cols;
    const uint16_t *residual; /* (rows, sal_chunks) */
    int sal_chunks;
    const float *sal_colscale; /* (nsal, zones - nplain) or NULL */
} binary_weight;

static float binary_salient(const binary_weight *w, int i, const float *x) {
    float y = 0.0f;
    const int nsz = w->zones - w->nplain;
    const uint16_t *srow = w->signs + (int64_t)i * w->chunks;
    const uint16_t *brow = w->bitmap ? w->bitmap + (int64_t)i * w->chunks : NULL;
    const uint16_t *rrow = w->residual + (int64_t)i * w->sal_chunks;
    for (int k = 0; k < w->nsal; k++) {
        const int j = w->sal_cols[k];
        const int b = j / w->block_size;
        int z = w->nplain;
        if (w->salient_groups && bit_at(brow, j)) z += 2;
        const float *sc = w->scales + ((int64_t)i * w->blocks + b) * w->zones;
        const float *mu = w->means ? w->means + ((int64_t)i * w->blocks + b) * w->zones : NULL;
        float c0 = 1.0f, c1 = 1.0f;
        if (w->sal_colscale) {
            c0 = w->sal_colscale[(int64_t)k * nsz + (z - w->nplain)];
            c1 = w->sal_colscale[(int64_t)k * nsz + (z + 1 - w->nplain)];
        }
        const float s = bit_at(srow, j) ? 1.0f : -1.0f;
        const float r = bit_at(rrow, k) ? 1.0f : -1.0f;
        float v = sc[z] * c0 * s + sc[z + 1] * c1 * r;
        if (mu) v += mu[z] + mu[z + 1];
        y += v * x[j];
    }
    return y;
}

/* x: (M, cols) floats; copied into zero-padded rows of whole chunks when cols is ragged. */
static float *padded_copy(const float *x, int M, int cols, int width) {
    float *xp = (float *)calloc((size_t)M * width, sizeof(float));
    if (!xp) return NULL;
    for (int m = 0; m < M; m++) memcpy(xp + (int64_t)m * width, x + (int64_t)m * cols, sizeof(float) * cols);
    return xp;
}

#if BINQ_AVX512
static inline vacc vfma(float a, vacc v, vacc acc) { return _mm512_fmadd_ps(_mm512_set1_ps(a), v, acc); }
#else
static inline vacc vfma(float a, vacc v, vacc acc) { return acc + a * v; }
#endif

/* The one-zone form (sign and one scale per block, optional mean: arb-group, Q1_0's layout), four rows
 * at a time so that four independent accumulator chains hide the adds' latency. */
#define QUAD 4
static void binary_one_zone(const binary_weight *w, int M, const float *x, const float *xs, const float *bsum,
                            const float *bsumc, const float *bias, float *out, int threads) {
    const int width = w->chunks * 16;
    const int quads = (w->rows + QUAD - 1) / QUAD;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int qd = 0; qd < quads; qd++) {
        const int i0 = qd * QUAD;
        const int n = w->rows - i0 < QUAD ? w->rows - i0 : QUAD;
        for (int m = 0; m < M; m++) {
            const float *x0 = w->colscale ? xs + (int64_t)m * width : x + (int64_t)m * width;
            const float *bs = bsum + (int64_t)m * w->blocks, *bsc = bsumc + (int64_t)m * w->blocks;
            vacc acc[QUAD];
            float y[QUAD];
            for (int r = 0; r < QUAD; r++) {
                acc[r] = vzero();
                y[r] = 0.0f;
            }
            for (int b = 0; b < w->blocks; b++) {
                const int t0 = b * w->block_chunks;
                const int t1 = t0 + w->block_chunks < w->chunks ? t0 + w->block_chunks : w->chunks;
                vacc p[QUAD];
                for (int r = 0; r < QUAD; r++) p[r] = vzero();
                for (int t = t0; t < t1; t++)
                    for (int r = 0; r < n; r++) p[r] = vmadd(p[r], w->signs[(int64_t)(i0 + r) * w->chunks + t], x0 + 16 * t);
                for (int r = 0; r < n; r++) {
                    const int64_t at = ((int64_t)(i0 + r) * w->blocks + b) * w->zones;
                    acc[r] = vfma(2.0f * w->scales[at], p[r], acc[r]);
                    y[r] -= w->scales[at] * bsc[b];
                    if (w->means) y[r] += w->means[at] * bs[b];
                }
            }
            for (int r = 0; r < n; r++) {
                float v = y[r] + vsum(acc[r]);
                if (bias) v += bias[i0 + r];
                out[(int64_t)m * w->rows + i0 + r] = v;
            }
        }
    }
}

/* Returns 0, or -1 when out of memory. Per block, the one-bit sums are weighted in vector registers
 * (alpha (2 P - N) as two FMAs) and reduced once per row: a horizontal sum per block would cost as
 * much as the block's masked adds. */
int binq_binary_gemm(const binary_weight *w, int M, int cols, const float *x_in, const float *bias, float *out,
                     int threads) {
    const int width = w->chunks * 16;
    float *owned = cols == width ? NULL : padded_copy(x_in, M, cols, width);
    if (cols != width && !owned) return -1;
    const float *x = owned ? owned : x_in;
    const int scaled = w->colscale != NULL;
    /* per token: column-scaled copies (colscale), and per block the sums of x (and of the scaled x)
     * over non-salient columns, which are row-independent in the one-zone case */
    float *xs = scaled ? (float *)malloc(sizeof(float) * (size_t)M * w->nplain * width) : NULL;
    float *bsum = (float *)malloc(sizeof(float) * (size_t)M * w->blocks * 2);
    if ((scaled && !xs) || !bsum) {
        free(owned); free(xs); free(bsum);
        return -1;
    }
    float *bsumc = bsum + (int64_t)M * w->blocks;
    for (int m = 0; m < M; m++) {
        const float *xm = x + (int64_t)m * width;
        if (scaled)
            for (int z = 0; z < w->nplain; z++)
                for (int j = 0; j < width; j++)
                    xs[((int64_t)m * w->nplain + z) * width + j] = xm[j] * w->colscale[(int64_t)z * width + j];
        for (int b = 0; b < w->blocks; b++) {
            float s = 0.0f, sc = 0.0f;
            for (int t = b * w->block_chunks; t < (b + 1) * w->block_chunks && t < w->chunks; t++) {
                const uint16_t ns = w->nonsalient ? w->nonsalient[t] : 0xFFFF;
                for (int k = 0; k < 16; k++)
                    if (ns >> k & 1) {
                        s += xm[16 * t + k];
                        if (scaled) sc += xs[(int64_t)m * w->nplain * width + 16 * t + k];
                    }
            }
            bsum[(int64_t)m * w->blocks + b] = s;
            bsumc[(int64_t)m * w->blocks + b] = scaled ? sc : s;
        }
    }
    const int two = w->bitmap != NULL;
    if (!two && !w->nsal && !w->nonsalient) {
        binary_one_zone(w, M, x, xs, bsum, bsumc, bias, out, threads);
        free(owned); free(xs); free(bsum);
        return 0;
    }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < w->rows; i++) {
        const uint16_t *srow = w->signs + (int64_t)i * w->chunks;
        const uint16_t *brow = two ? w->bitmap + (int64_t)i * w->chunks : NULL;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (int64_t)m * width;
            const float *x0 = scaled ? xs + (int64_t)m * w->nplain * width : xm;
            const float *x1 = (scaled && two) ? x0 + width : xm;
            const float *bs = bsum + (int64_t)m * w->blocks, *bsc = bsumc + (int64_t)m * w->blocks;
            vacc acc = vzero();
            float y = 0.0f;
            for (int b = 0; b < w->blocks; b++) {
                const int t0 = b * w->block_chunks;
                const int t1 = t0 + w->block_chunks < w->chunks ? t0 + w->block_chunks : w->chunks;
                const float *sc = w->scales + ((int64_t)i * w->blocks + b) * w->zones;
                const float *mu = w->means ? w->means + ((int64_t)i * w->blocks + b) * w->zones : NULL;
                if (!two) {
                    vacc p = vzero(), q = vzero();
                    int t = t0;
                    if (w->nonsalient) {
                        for (; t + 1 < t1; t += 2) {
                            p = vmadd(p, srow[t] & w->nonsalient[t], x0 + 16 * t);
                            q = vmadd(q, srow[t + 1] & w->nonsalient[t + 1], x0 + 16 * (t + 1));
                        }
                        if (t < t1) p = vmadd(p, srow[t] & w->nonsalient[t], x0 + 16 * t);
                    } else {
                        for (; t + 1 < t1; t += 2) {
                            p = vmadd(p, srow[t], x0 + 16 * t);
                            q = vmadd(q, srow[t + 1], x0 + 16 * (t + 1));
                        }
                        if (t < t1) p = vmadd(p, srow[t], x0 + 16 * t);
                    }
                    acc = vfma(2.0f * sc[0], p, acc);
                    acc = vfma(2.0f * sc[0], q, acc);
                    y -= sc[0] * bsc[b];
                    if (mu) y += mu[0] * bs[b];
                } else {
                    vacc p0 = vzero(), n0 = vzero(), p1 = vzero(), n1 = vzero(), m0 = vzero(), m1 = vzero();
                    for (int t = t0; t < t1; t++) {
                        const uint16_t ns = w->nonsalient ? w->nonsalient[t] : 0xFFFF;
                        const uint16_t z1 = brow[t] & ns, z0 = (uint16_t)(~brow[t]) & ns;
                        const uint16_t s = srow[t];
                        p0 = vmadd(p0, s & z0, x0 + 16 * t);
                        n0 = vmadd(n0, z0, x0 + 16 * t);
                        p1 = vmadd(p1, s & z1, x1 + 16 * t);
                        n1 = vmadd(n1, z1, x1 + 16 * t);
                        if (mu) {
                            m0 = vmadd(m0, z0, xm + 16 * t);
                            m1 = vmadd(m1, z1, xm + 16 * t);
                        }
                    }
                    acc = vfma(2.0f * sc[0], p0, acc);
                    acc = vfma(-sc[0], n0, acc);
                    acc = vfma(2.0f * sc[1], p1, acc);
                    acc = vfma(-sc[1], n1, acc);
                    if (mu) {
                        acc = vfma(mu[0], m0, acc);
                        acc = vfma(mu[1], m1, acc);
                    }
                }
            }
            y += vsum(acc);
            if (w->nsal) y += binary_salient(w, i, xm);
            if (bias) y += bias[i];
            out[(int64_t)m * w->rows + i] = y;
        }
    }
    free(owned); free(xs); free(bsum);
    return 0;
}

/* Rows r0..r1 of the dense weight, (r1 - r0, width) floats: the prefill path multiplies tiles. */
void binq_binary_dequant(const binary_weight *w, int r0, int r1, float *out, int threads) {
    const int width = w->chunks * 16;
    const int nsz = w->zones - w->nplain;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = r0; i < r1; i++) {
        float *o = out + (int64_t)(i - r0) * width;
        const uint16_t *srow = w->signs + (int64_t)i * w->chunks;
        const uint16_t *brow = w->bitmap ? w->bitmap + (int64_t)i * w->chunks : NULL;
        for (int b = 0; b < w->blocks; b++) {
            const int t0 = b * w->block_chunks;
            const int t1 = t0 + w->block_chunks < w->chunks ? t0 + w->block_chunks : w->chunks;
            const float *sc = w->scales + ((int64_t)i * w->blocks + b) * w->zones;
            const float *mu = w->means ? w->means + ((int64_t)i * w->blocks + b) * w->zones : NULL;
            const float a0 = sc[0], a1 = w->nplain > 1 ? sc[1] : 0.0f;
            const float m0 = mu ? mu[0] : 0.0f, m1 = mu && w->nplain > 1 ? mu[1] : 0.0f;
            for (int t = t0; t < t1; t++) {
                const uint16_t s = srow[t], bm = brow ? brow[t] : 0;
                const uint16_t ns = w->nonsalient ? w->nonsalient[t] : 0xFFFF;
                float *ot = o + 16 * t;
                for (int k = 0; k < 16; k++) {
                    const int z = bm >> k & 1;
                    float c = 1.0f;
                    if (w->colscale) c = w->colscale[(int64_t)z * width + 16 * t + k];
                    const float v = (z ? a1 : a0) * c * ((s >> k & 1) ? 1.0f : -1.0f) + (z ? m1 : m0);
                    ot[k] = (ns >> k & 1) ? v : 0.0f;
                }
            }
        }
        const uint16_t *rrow = w->residual ? w->residual + (int64_t)i * w->sal_chunks : NULL;
        for (int k = 0; k < w->nsal; k++) {
            const int j = w->sal_cols[k];
            const int b = j / w->block_size;
            int z = w->nplain;
            if (w->salient_groups && bit_at(brow, j)) z += 2;
            const float *sc = w->scales + ((int64_t)i * w->blocks + b) * w->zones;
            float c0 = 1.0f, c1 = 1.0f;
            if (w->sal_colscale) {
                c0 = w->sal_colscale[(int64_t)k * nsz + (z - w->nplain)];
                c1 = w->sal_colscale[(int64_t)k * nsz + (z + 1 - w->nplain)];
            }
            float v = sc[z] * c0 * (bit_at(srow, j) ? 1.0f : -1.0f) + sc[z + 1] * c1 * (bit_at(rrow, k) ? 1.0f : -1.0f);
            if (w->means) v += w->means[((int64_t)i * w->blocks + b) * w->zones + z] +
                               w->means[((int64_t)i * w->blocks + b) * w->zones + z + 1];
            o[j] = v;
        }
    }
}

/* ---------------------------------------------------------------- uniform layout (bit-serial)
 * W[i, j] = scale[i, g] (code[i, j] - zero[i, g]). Columns are re-ordered so that every group is a
 * run of whole chunks (act-order groups gathered, each group padded to 16 columns): colmap gives,
 * for each padded position, the source column or -1. planes: uint16 (rows, chunks, bits).
 * group_chunk: (groups + 1) chunk offsets. scales, zeros: float (rows, groups).
 */
typedef struct {
    int rows, chunks, bits, groups, cols;
    const uint16_t *planes;
    const int32_t *group_chunk, *colmap;
    const float *scales, *zeros;
} uniform_weight;

int binq_uniform_gemm(const uniform_weight *w, int M, const float *x, const float *bias, float *out, int threads) {
    const int width = w->chunks * 16;
    float *xp = (float *)malloc(sizeof(float) * (size_t)M * (width + w->groups));
    if (!xp) return -1;
    float *gsum = xp + (int64_t)M * width;
    for (int m = 0; m < M; m++) {
        float *xm = xp + (int64_t)m * width;
        for (int p = 0; p < width; p++) xm[p] = w->colmap[p] >= 0 ? x[(int64_t)m * w->cols + w->colmap[p]] : 0.0f;
        for (int g = 0; g < w->groups; g++) {
            float s = 0.0f;
            for (int t = w->group_chunk[g]; t < w->group_chunk[g + 1]; t++) s += chunk_sum(xm + 16 * t);
            gsum[(int64_t)m * w->groups + g] = s;
        }
    }
    const int bits = w->bits;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < w->rows; i++) {
        const uint16_t *prow = w->planes + (int64_t)i * w->chunks * bits;
        for (int m = 0; m < M; m++) {
            const float *xm = xp + (int64_t)m * width;
            vacc total = vzero();
            float y = 0.0f;
            for (int g = 0; g < w->groups; g++) {
                vacc acc[8];
                for (int k = 0; k < bits; k++) acc[k] = vzero();
                for (int t = w->group_chunk[g]; t < w->group_chunk[g + 1]; t++)
                    for (int k = 0; k < bits; k++) acc[k] = vmadd(acc[k], prow[(int64_t)t * bits + k], xm + 16 * t);
                const int64_t ig = (int64_t)i * w->groups + g;
                for (int k = 0; k < bits; k++) total = vfma(w->scales[ig] * (float)(1 << k), acc[k], total);
                y -= w->scales[ig] * w->zeros[ig] * gsum[(int64_t)m * w->groups + g];
            }
            y += vsum(total);
            if (bias) y += bias[i];
            out[(int64_t)m * w->rows + i] = y;
        }
    }
    free(xp);
    return 0;
}

/* Rows r0..r1 in the source column order, (r1 - r0, cols) floats. */
void binq_uniform_dequant(const uniform_weight *w, int r0, int r1, float *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = r0; i < r1; i++) {
        const uint16_t *prow = w->planes + (int64_t)i * w->chunks * w->bits;
        float *o = out + (int64_t)(i - r0) * w->cols;
        for (int g = 0; g < w->groups; g++) {
            const int64_t ig = (int64_t)i * w->groups + g;
            const float scale = w->scales[ig], zero = w->zeros[ig];
            for (int t = w->group_chunk[g]; t < w->group_chunk[g + 1]; t++) {
                int codes[16] = {0};
                for (int q = 0; q < w->bits; q++) {
                    const uint16_t plane = prow[(int64_t)t * w->bits + q];
                    for (int k = 0; k < 16; k++) codes[k] |= (plane >> k & 1) << q;
                }
                for (int k = 0; k < 16; k++) {
                    const int j = w->colmap[16 * t + k];
                    if (j >= 0) o[j] = scale * ((float)codes[k] - zero);
                }
            }
        }
    }
}

/* ---------------------------------------------------------------- multiscale layout
 * W[i, j] = s[i, j] scales[u(i), b, idx[i, j]]; idx from ibits planes uint16 (rows, chunks, ibits);
 * scales float (units, blocks, groups). Exact zeros: CSR lists (zrow (rows + 1), zcol) subtracted.
 */
typedef struct {
    int rows, chunks, ibits, groups, blocks, block_chunks, per_row;
    const uint16_t *signs, *index;
    const float *scales;
    const int64_t *zrow;
    const int32_t *zcol;
} multiscale_weight;

static inline int ms_index(const multiscale_weight *w, const uint16_t *irow, int t, int k) {
    int idx = 0;
    for (int q = 0; q < w->ibits; q++) idx |= (irow[(int64_t)t * w->ibits + q] >> k & 1) << q;
    return idx;
}

int binq_multiscale_gemm(const multiscale_weight *w, int M, int cols, const float *x_in, const float *bias, float *out,
                         int threads) {
    const int width = w->chunks * 16;
    float *owned = cols == width ? NULL : padded_copy(x_in, M, cols, width);
    if (cols != width && !owned) return -1;
    const float *x = owned ? owned : x_in;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < w->rows; i++) {
        const uint16_t *srow = w->signs + (int64_t)i * w->chunks;
        const uint16_t *irow = w->index + (int64_t)i * w->chunks * w->ibits;
        const int u = w->per_row ? i : 0;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (int64_t)m * width;
            float y = 0.0f;
            for (int b = 0; b < w->blocks; b++) {
                const float *table = w->scales + ((int64_t)u * w->blocks + b) * w->groups;
                const int t0 = b * w->block_chunks;
                const int t1 = t0 + w->block_chunks < w->chunks ? t0 + w->block_chunks : w->chunks;
#if BINQ_AVX512
                if (w->groups <= 32) {
                    float padded[32] = {0};
                    memcpy(padded, table, sizeof(float) * w->groups);
                    const __m512 lo = _mm512_loadu_ps(padded), hi = _mm512_loadu_ps(padded + 16);
                    __m512 acc = _mm512_setzero_ps();
                    for (int t = t0; t < t1; t++) {
                        __m512i idx = _mm512_setzero_si512();
                        for (int q = 0; q < w->ibits; q++)
                            idx = _mm512_mask_add_epi32(idx, (__mmask16)irow[(int64_t)t * w->ibits + q], idx,
                                                        _mm512_set1_epi32(1 << q));
                        __m512 v = _mm512_permutex2var_ps(lo, idx, hi);
                        v = _mm512_mask_sub_ps(v, (__mmask16)(~srow[t]), _mm512_setzero_ps(), v);
                        acc = _mm512_fmadd_ps(v, _mm512_loadu_ps(xm + 16 * t), acc);
                    }
                    y += _mm512_reduce_add_ps(acc);
                    continue;
                }
#endif
                for (int t = t0; t < t1; t++)
                    for (int k = 0; k < 16; k++) {
                        const float v = table[ms_index(w, irow, t, k)];
                        y += ((srow[t] >> k & 1) ? v : -v) * xm[16 * t + k];
                    }
            }
            for (int64_t q = w->zrow[i]; q < w->zrow[i + 1]; q++) {
                const int j = w->zcol[q];
                const int t = j >> 4, k = j & 15;
                const float v = w->scales[((int64_t)u * w->blocks + t / w->block_chunks) * w->groups +
                                          ms_index(w, irow, t, k)];
                y -= ((srow[t] >> k & 1) ? v : -v) * xm[j];
            }
            if (bias) y += bias[i];
            out[(int64_t)m * w->rows + i] = y;
        }
    }
    free(owned);
    return 0;
}

void binq_multiscale_dequant(const multiscale_weight *w, int r0, int r1, float *out, int threads) {
    const int width = w->chunks * 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = r0; i < r1; i++) {
        const uint16_t *srow = w->signs + (int64_t)i * w->chunks;
        const uint16_t *irow = w->index + (int64_t)i * w->chunks * w->ibits;
        const int u = w->per_row ? i : 0;
        float *o = out + (int64_t)(i - r0) * width;
        for (int t = 0; t < w->chunks; t++) {
            const float *table = w->scales + ((int64_t)u * w->blocks + t / w->block_chunks) * w->groups;
            int idx[16] = {0};
            for (int q = 0; q < w->ibits; q++) {
                const uint16_t plane = irow[(int64_t)t * w->ibits + q];
                for (int k = 0; k < 16; k++) idx[k] |= (plane >> k & 1) << q;
            }
            for (int k = 0; k < 16; k++) o[16 * t + k] = (srow[t] >> k & 1) ? table[idx[k]] : -table[idx[k]];
        }
        for (int64_t q = w->zrow[i]; q < w->zrow[i + 1]; q++) o[w->zcol[q]] = 0.0f;
    }
}

/* ---------------------------------------------------------------- fp16 weights (embeddings, lm_head)
 * y = x W^T + b with W stored as IEEE half (uint16 bits), converted exactly to fp32 on the fly. */
static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31;
    uint32_t exp = h >> 10 & 0x1F, man = h & 0x3FF, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal */
            int e = -1;
            do { e++; man <<= 1; } while (!(man & 0x400));
            bits = sign | (uint32_t)(127 - 15 - e) << 23 | (man & 0x3FF) << 13;
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | man << 13;
    } else {
        bits = sign | (exp + 112) << 23 | man << 13;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

void binq_half_gemm(int M, int rows, int cols, const float *x, const uint16_t *w, const float *bias, float *out,
                    int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int i = 0; i < rows; i++) {
        const uint16_t *wr = w + (int64_t)i * cols;
        for (int m = 0; m < M; m++) {
            const float *xm = x + (int64_t)m * cols;
            float y = 0.0f;
            int j = 0;
#if BINQ_AVX512
            __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
            for (; j + 32 <= cols; j += 32) {
                acc0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wr + j))),
                                       _mm512_loadu_ps(xm + j), acc0);
                acc1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(wr + j + 16))),
                                       _mm512_loadu_ps(xm + j + 16), acc1);
            }
            y = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#endif
            for (; j < cols; j++) y += half_to_float(wr[j]) * xm[j];
            if (bias) y += bias[i];
            out[(int64_t)m * rows + i] = y;
        }
    }
}
