/* moelab's CPU kernels for inference-time products with few activation rows (decode, short prefill).
 *
 * Built on demand by moelab/native.py (cc -O3 -march=native -fopenmp), called through ctypes with pointers to
 * torch tensors. AVX-512 (F, BW, VL, VNNI, BF16). OpenMP threads are those of torch's own libgomp (same soname,
 * loaded first), so the library does not bring a second thread pool.
 *
 * Weight formats (one row n of W [N, K], K % 64 == 0):
 *   BF16: w[n, k] bfloat16.
 *   INT8: q[n, k] int8 in [-127, 127], s[n] bfloat16;            W ≈ q · s.
 *   INT4: W ≈ (q − 8) · s + z per group of G, codes q in 0..15, tiled by 16 rows (N % 16 == 0) so that one
 *         int32 lane of a VNNI product is one row: codes uint8 [N/16, K/32, 4, 16, 4], byte [t, b, j, r, i] =
 *         q[16t + r, 32b + 4j + i] | q[16t + r, 32b + 16 + 4j + i] << 4; s, z bfloat16 [N/16, K/G, 16].
 * Activations for INT8 / INT4 weights are quantized per block of 32 (as llama.cpp's Q8_0): sx_b = max|x| / 127,
 * x̂ = round(x / sx_b) · sx_b; the integer products run on VNNI (vpdpbusd), each block's sum scaled in float:
 *   INT8: y_n = s_n · Σ_b sx_b · Σ_{k∈b} q_nk · x̂q_k
 *   INT4: y_n = Σ_g s_ng · Σ_{b⊂g} sx_b · Σ_{k∈b} q_nk · x̂q_k  +  Σ_g (z_ng − 8 s_ng) · Σ_{k∈g} x̂_k
 * which is Σ_k Ŵ_nk · x̂_k exactly, up to float32 rounding. BF16: Σ_k w_nk · bf16(x_k) (vdpbf16ps).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F_BF16 = 0, F_INT8 = 1, F_INT4 = 2 };
enum { A_SWIGLU = 0, A_GELU = 1 };

typedef struct {
    int32_t fmt, n, k, g;     /* format, rows N, input width K, int4 group size G */
    const void *q;            /* bf16 [N, K] | int8 [N, K] | uint8 [N, K/2] */
    const uint16_t *s;        /* int8: bf16 [N]; int4: bf16 [N/16, K/G, 16] */
    const uint16_t *z;        /* int4: bf16 [N/16, K/G, 16] */
} weight_t;

/* One activation row prepared for the dot products of one weight format. */
typedef struct {
    int k, g;
    uint16_t *xb;      /* bf16 [K] */
    uint8_t *xabs;     /* |x̂q| [K] (int8 weights) */
    __mmask64 *neg;    /* x̂q < 0, per chunk of 64 (int8 weights) */
    int8_t *xq;        /* x̂q [K] (int4 weights) */
    float *sxv;        /* per chunk, 16 lanes: the block scale of each int32 lane, natural order (int8) */
    float *sx;         /* the block scales [K/32] (int4) */
    float *gsum;       /* int4: Σ_{k∈g} x̂_k per group [K/G] */
    void *mem;
} act_t;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline __m512 bf16x16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 64);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static int act_alloc(act_t *a, int k, int g) {
    size_t nc = (size_t)k / 64, sz = 64 * 4 + (size_t)k * 2 + (size_t)k + nc * 8 + (size_t)k + nc * 64 * 2
                                      + ((size_t)k / 32 + 16) * 4;
    a->mem = aligned_alloc(64, (sz + 63) / 64 * 64);
    if (!a->mem) return -1;
    char *p = (char *)a->mem;
    a->k = k;
    a->g = g;
    a->sxv = (float *)p; p += nc * 64;
    a->sx = (float *)p; p += nc * 64;
    a->xb = (uint16_t *)p; p += (size_t)k * 2;
    a->xabs = (uint8_t *)p; p += k;
    a->xq = (int8_t *)p; p += k;
    a->neg = (__mmask64 *)p; p += nc * 8;
    a->gsum = (float *)p;
    return 0;
}

/* 16 floats → bfloat16, rounded to nearest even (NaN kept quiet), as f32_to_bf16. */
static inline __m256i bf16_round16(__m512 v) {
    __m512i u = _mm512_castps_si512(v);
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)),
                         _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))), 16);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(64));
    return _mm512_cvtepi32_epi16(r);
}

/* Prepare x [K] for weights of format fmt (group size g for int4): per block of 32, sx = max|x| / 127 and
 * x̂q = round(x · 127 / max|x|) (to nearest even, as nearbyintf), clamped to ±127. */
static void act_prepare(act_t *a, const float *x, int fmt) {
    int k = a->k, nc = k / 64;
    if (fmt == F_BF16) {
        for (int i = 0; i < k; i += 16) _mm256_storeu_si256((__m256i *)(a->xb + i), bf16_round16(_mm512_loadu_ps(x + i)));
        return;
    }
    const __m512i lim = _mm512_set1_epi32(127), nlim = _mm512_set1_epi32(-127);
    for (int c = 0; c < nc; c++) {
        float sx[2], bsum[2];
        __m512i xq = _mm512_setzero_si512();
        for (int h = 0; h < 2; h++) {
            const float *xs = x + 64 * c + 32 * h;
            __m512 v0 = _mm512_loadu_ps(xs), v1 = _mm512_loadu_ps(xs + 16);
            float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
            float inv = amax > 0.f ? 127.f / amax : 0.f;
            __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
            __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
            q0 = _mm512_max_epi32(_mm512_min_epi32(q0, lim), nlim);
            q1 = _mm512_max_epi32(_mm512_min_epi32(q1, lim), nlim);
            xq = _mm512_inserti32x4(xq, _mm512_cvtepi32_epi8(q0), 2 * h);
            xq = _mm512_inserti32x4(xq, _mm512_cvtepi32_epi8(q1), 2 * h + 1);
            sx[h] = amax / 127.f;
            bsum[h] = sx[h] * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
        }
        if (fmt == F_INT8) {
            _mm512_storeu_si512(a->xabs + 64 * c, _mm512_abs_epi8(xq));
            a->neg[c] = _mm512_movepi8_mask(xq);
            _mm512_storeu_ps(a->sxv + 16 * c,
                             _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(sx[0]), _mm512_set1_ps(sx[1])));
        } else {
            _mm512_storeu_si512(a->xq + 64 * c, xq);
            a->sx[2 * c] = sx[0];
            a->sx[2 * c + 1] = sx[1];
            int per = a->g / 32;
            for (int h = 0; h < 2; h++) {
                int b = 2 * c + h;
                if (b % per == 0) a->gsum[b / per] = 0.f;
                a->gsum[b / per] += bsum[h];
            }
        }
    }
}

/* Software prefetch distance: a dot product asks for the weight bytes this far ahead of the ones it multiplies.
 * The hardware prefetcher alone leaves the loads' latency partly exposed (it restarts at each 4 KiB page). */
#define PREFETCH 8192
static inline void prefetch(const void *p) { _mm_prefetch((const char *)p + PREFETCH, _MM_HINT_T0); }

static inline float dot_bf16(const uint16_t *w, const act_t *a) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int i = 0; i < a->k; i += 64) {
        prefetch(w + i);
        prefetch(w + i + 32);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(a->xb + i));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(w + i + 32),
                                (__m512bh)_mm512_loadu_si512(a->xb + i + 32));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* dot_bf16 of one weight row with R <= 4 activation rows: each 32 weights loaded once for all of them; each row's
 * sums as dot_bf16's (the same floats). */
static inline __attribute__((always_inline)) void dot_bf16_r(const uint16_t *w, const act_t *const *a, const int R,
                                                             float *const *out, size_t at) {
    __m512 acc0[4], acc1[4];
    for (int r = 0; r < R; r++) acc0[r] = acc1[r] = _mm512_setzero_ps();
    for (int i = 0; i < a[0]->k; i += 64) {
        prefetch(w + i);
        prefetch(w + i + 32);
        const __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + i), w1 = (__m512bh)_mm512_loadu_si512(w + i + 32);
        for (int r = 0; r < R; r++) {
            acc0[r] = _mm512_dpbf16_ps(acc0[r], w0, (__m512bh)_mm512_loadu_si512(a[r]->xb + i));
            acc1[r] = _mm512_dpbf16_ps(acc1[r], w1, (__m512bh)_mm512_loadu_si512(a[r]->xb + i + 32));
        }
    }
    for (int r = 0; r < R; r++) out[r][at] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[r], acc1[r]));
}

static void dot_bf16_rows(const uint16_t *w, const act_t *const *a, int R, float *const *out, size_t at) {
    switch (R) {
    case 1: dot_bf16_r(w, a, 1, out, at); break;
    case 2: dot_bf16_r(w, a, 2, out, at); break;
    case 3: dot_bf16_r(w, a, 3, out, at); break;
    default: dot_bf16_r(w, a, 4, out, at);
    }
}

static inline float dot_int8(const int8_t *w, const act_t *a) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    const __m512i zero = _mm512_setzero_si512();
    int c = 0;
    for (; c + 1 < a->k / 64; c += 2) {
        prefetch(w + 64 * c);
        prefetch(w + 64 * c + 64);
        __m512i w0 = _mm512_loadu_si512(w + 64 * c), w1 = _mm512_loadu_si512(w + 64 * c + 64);
        w0 = _mm512_mask_sub_epi8(w0, a->neg[c], zero, w0);
        w1 = _mm512_mask_sub_epi8(w1, a->neg[c + 1], zero, w1);
        __m512i d0 = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(a->xabs + 64 * c), w0);
        __m512i d1 = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(a->xabs + 64 * c + 64), w1);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_loadu_ps(a->sxv + 16 * c), acc0);
        acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d1), _mm512_loadu_ps(a->sxv + 16 * c + 16), acc1);
    }
    for (; c < a->k / 64; c++) {
        __m512i w0 = _mm512_loadu_si512(w + 64 * c);
        w0 = _mm512_mask_sub_epi8(w0, a->neg[c], zero, w0);
        __m512i d0 = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(a->xabs + 64 * c), w0);
        acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d0), _mm512_loadu_ps(a->sxv + 16 * c), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* int4: out[0..16) = rows 16t..16t+15 of W·x̂. One int32 lane per row: each vpdpbusd multiplies 4 codes of
 * each of the 16 rows by the same 4 activation codes (broadcast). */
static inline void tile_int4(const weight_t *w, int t, const act_t *a, float *out) {
    const int nb = a->k / 32, ng = a->k / a->g, bpg = a->g / 32;
    const uint8_t *q = (const uint8_t *)w->q + (size_t)t * nb * 256;
    const uint16_t *s = w->s + (size_t)t * ng * 16, *z = w->z + (size_t)t * ng * 16;
    const int32_t *x4 = (const int32_t *)a->xq;
    const __m512i m4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    __m512 acc = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *qb = q + (size_t)b * 256;
        const int32_t *xb = x4 + 8 * b;
        for (int l = 0; l < 256; l += 64) prefetch(qb + l);
        __m512i d0 = zero, d1 = zero, d2 = zero, d3 = zero;
        __m512i l0 = _mm512_loadu_si512(qb), l1 = _mm512_loadu_si512(qb + 64);
        __m512i l2 = _mm512_loadu_si512(qb + 128), l3 = _mm512_loadu_si512(qb + 192);
        d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(l0, m4), _mm512_set1_epi32(xb[0]));
        d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(l0, 4), m4), _mm512_set1_epi32(xb[4]));
        d2 = _mm512_dpbusd_epi32(d2, _mm512_and_si512(l1, m4), _mm512_set1_epi32(xb[1]));
        d3 = _mm512_dpbusd_epi32(d3, _mm512_and_si512(_mm512_srli_epi16(l1, 4), m4), _mm512_set1_epi32(xb[5]));
        d0 = _mm512_dpbusd_epi32(d0, _mm512_and_si512(l2, m4), _mm512_set1_epi32(xb[2]));
        d1 = _mm512_dpbusd_epi32(d1, _mm512_and_si512(_mm512_srli_epi16(l2, 4), m4), _mm512_set1_epi32(xb[6]));
        d2 = _mm512_dpbusd_epi32(d2, _mm512_and_si512(l3, m4), _mm512_set1_epi32(xb[3]));
        d3 = _mm512_dpbusd_epi32(d3, _mm512_and_si512(_mm512_srli_epi16(l3, 4), m4), _mm512_set1_epi32(xb[7]));
        __m512i d = _mm512_add_epi32(_mm512_add_epi32(d0, d1), _mm512_add_epi32(d2, d3));
        __m512 sc = _mm512_mul_ps(bf16x16(s + (b / bpg) * 16, 0xFFFF), _mm512_set1_ps(a->sx[b]));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sc, acc);
    }
    /* + Σ_g (z_g − 8 s_g) · Σ_{k∈g} x̂_k */
    for (int g = 0; g < ng; g++) {
        __m512 zz = _mm512_fmadd_ps(bf16x16(s + g * 16, 0xFFFF), _mm512_set1_ps(-8.f), bf16x16(z + g * 16, 0xFFFF));
        acc = _mm512_fmadd_ps(zz, _mm512_set1_ps(a->gsum[g]), acc);
    }
    _mm512_storeu_ps(out, acc);
}

/* tile_int4 for R <= 4 activation rows at once: the tile's codes are loaded and unpacked once per block for all of
 * them; each row's sums run exactly as in tile_int4 (the same operations in the same order: the same floats). */
static inline void tile_int4_rows(const weight_t *w, int t, const act_t *const *a, int R, float *const *out) {
    const int nb = a[0]->k / 32, ng = a[0]->k / a[0]->g, bpg = a[0]->g / 32;
    const uint8_t *q = (const uint8_t *)w->q + (size_t)t * nb * 256;
    const uint16_t *s = w->s + (size_t)t * ng * 16, *z = w->z + (size_t)t * ng * 16;
    const __m512i m4 = _mm512_set1_epi8(0x0F), zero = _mm512_setzero_si512();
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int b = 0; b < nb; b++) {
        const uint8_t *qb = q + (size_t)b * 256;
        for (int l = 0; l < 256; l += 64) prefetch(qb + l);
        __m512i l0 = _mm512_loadu_si512(qb), l1 = _mm512_loadu_si512(qb + 64);
        __m512i l2 = _mm512_loadu_si512(qb + 128), l3 = _mm512_loadu_si512(qb + 192);
        __m512i n0 = _mm512_and_si512(l0, m4), h0 = _mm512_and_si512(_mm512_srli_epi16(l0, 4), m4);
        __m512i n1 = _mm512_and_si512(l1, m4), h1 = _mm512_and_si512(_mm512_srli_epi16(l1, 4), m4);
        __m512i n2 = _mm512_and_si512(l2, m4), h2 = _mm512_and_si512(_mm512_srli_epi16(l2, 4), m4);
        __m512i n3 = _mm512_and_si512(l3, m4), h3 = _mm512_and_si512(_mm512_srli_epi16(l3, 4), m4);
        __m512 sb = bf16x16(s + (b / bpg) * 16, 0xFFFF);
        for (int r = 0; r < R; r++) {
            const int32_t *xb = (const int32_t *)a[r]->xq + 8 * b;
            __m512i d0 = _mm512_dpbusd_epi32(zero, n0, _mm512_set1_epi32(xb[0]));
            __m512i d1 = _mm512_dpbusd_epi32(zero, h0, _mm512_set1_epi32(xb[4]));
            __m512i d2 = _mm512_dpbusd_epi32(zero, n1, _mm512_set1_epi32(xb[1]));
            __m512i d3 = _mm512_dpbusd_epi32(zero, h1, _mm512_set1_epi32(xb[5]));
            d0 = _mm512_dpbusd_epi32(d0, n2, _mm512_set1_epi32(xb[2]));
            d1 = _mm512_dpbusd_epi32(d1, h2, _mm512_set1_epi32(xb[6]));
            d2 = _mm512_dpbusd_epi32(d2, n3, _mm512_set1_epi32(xb[3]));
            d3 = _mm512_dpbusd_epi32(d3, h3, _mm512_set1_epi32(xb[7]));
            __m512i d = _mm512_add_epi32(_mm512_add_epi32(d0, d1), _mm512_add_epi32(d2, d3));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_mul_ps(sb, _mm512_set1_ps(a[r]->sx[b])), acc[r]);
        }
    }
    for (int g = 0; g < ng; g++) {
        __m512 zz = _mm512_fmadd_ps(bf16x16(s + g * 16, 0xFFFF), _mm512_set1_ps(-8.f), bf16x16(z + g * 16, 0xFFFF));
        for (int r = 0; r < R; r++) acc[r] = _mm512_fmadd_ps(zz, _mm512_set1_ps(a[r]->gsum[g]), acc[r]);
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(out[r], acc[r]);
}

/* Rows of one work unit (int4: a tile of 16 rows; otherwise one row): unit u writes rows u·ur.. to out[0..ur). */
static inline int unit_rows(const weight_t *w) { return w->fmt == F_INT4 ? 16 : 1; }

static inline void unit(const weight_t *w, int u, const act_t *a, float *out) {
    switch (w->fmt) {
    case F_BF16:
        out[0] = dot_bf16((const uint16_t *)w->q + (size_t)u * w->k, a);
        break;
    case F_INT8:
        out[0] = bf16_to_f32(w->s[u]) * dot_int8((const int8_t *)w->q + (size_t)u * w->k, a);
        break;
    default:
        tile_int4(w, u, a, out);
    }
}

/* unit u of an int8 or int4 weight for n activation rows: row i's outputs to base[i] + off (int4: up to 4 rows per
 * pass over the tile). bf16 goes by panels (`panel`). */
static inline void units(const weight_t *w, int u, const act_t *const *acts, float *const *base, size_t off, int n) {
    if (w->fmt != F_INT4) {
        for (int i = 0; i < n; i++) unit(w, u, acts[i], base[i] + off);
        return;
    }
    float *o[4];
    for (int i = 0; i < n; i += 4) {
        const int R = n - i < 4 ? n - i : 4;
        for (int r = 0; r < R; r++) o[r] = base[i + r] + off;
        tile_int4_rows(w, u, acts + i, R, o);
    }
}

/* Units per panel: 64 KiB of bf16 weight rows, which stay in L2 while each block of 4 activation rows (in L1)
 * passes over them — the activations are then read once per panel, not once per weight row; other formats one unit
 * (their tiles are unpacked once per block of rows, in `units`). */
static inline int panel_units(const weight_t *w, int n) {
    return n > 4 && w->fmt == F_BF16 && w->k < 32768 ? 32768 / w->k : 1; /* up to 4 rows: one block, no panels */
}

/* The units of panel p (P units per panel, nu in all) for n activation rows, as `units` computes them. */
static inline void panel(const weight_t *w, int p, int P, int nu, const act_t *const *acts, float *const *base,
                         int n) {
    const int u0 = p * P, u1 = u0 + P < nu ? u0 + P : nu;
    if (w->fmt != F_BF16) {
        for (int u = u0; u < u1; u++) units(w, u, acts, base, (size_t)u * unit_rows(w), n);
        return;
    }
    for (int i = 0; i < n; i += 4)
        for (int u = u0; u < u1; u++)
            dot_bf16_rows((const uint16_t *)w->q + (size_t)u * w->k, acts + i, n - i < 4 ? n - i : 4, base + i,
                          (size_t)u);
}

/* y [M, N] = x [M, K] · Wᵀ. Rows of x are prepared once; W is read once per tile of up to 32 rows of x. */
static int linear_f32(const weight_t *w, const float *x, int m, float *y, int threads) {
    const int k = w->k, n = w->n, tile = 32, ur = unit_rows(w);
    act_t *acts = calloc((size_t)m, sizeof(act_t));
    const act_t **pa = malloc(sizeof(void *) * (size_t)(m ? m : 1));
    float **py = malloc(sizeof(void *) * (size_t)(m ? m : 1));
    int err = !acts || !pa || !py;
    for (int i = 0; i < m && !err; i++) {
        err |= act_alloc(&acts[i], k, w->g);
        pa[i] = &acts[i];
        py[i] = y + (size_t)i * n;
    }
    if (!err) {
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int i = 0; i < m; i++) act_prepare(&acts[i], x + (size_t)i * k, w->fmt);
            for (int m0 = 0; m0 < m; m0 += tile) {
                int m1 = m0 + tile < m ? m0 + tile : m;
                const int P = panel_units(w, m1 - m0);
#pragma omp for schedule(static)
                for (int p = 0; p < (n / ur + P - 1) / P; p++) panel(w, p, P, n / ur, pa + m0, py + m0, m1 - m0);
            }
        }
    }
    if (acts)
        for (int i = 0; i < m; i++) free(acts[i].mem);
    free(acts);
    free(pa);
    free(py);
    return err;
}

static inline float silu(float v) { return v / (1.f + expf(-v)); }
static inline float gelu(float v) { return 0.5f * v * (1.f + erff(v * 0.70710678118654752f)); }

/* One token through k experts: y [D] = Σ_j r_j · down_j(act(gate_up_j(x))), x [D].
 * gate_up_j: [H, D] (SwiGLU: gate rows then up rows, H = 2I; GELU: H = I), down_j: [D, I]. One parallel region:
 * the k first products (rows split statically across threads), the activations, then the k second products
 * accumulated into y (each thread owns the same rows of y for every expert, so no reduction is needed). */
static int moe_decode_f32(const weight_t *const *gate_up, const weight_t *const *down, int k, const float *route,
                          const float *x, float *y, int activation, int threads) {
    const int D = gate_up[0]->k, H = gate_up[0]->n, I = down[0]->k, ug = unit_rows(gate_up[0]),
              ud = unit_rows(down[0]);
    act_t ax = {0}, *aa = calloc((size_t)k, sizeof(act_t));
    float *h = malloc(sizeof(float) * (size_t)k * H), *av = malloc(sizeof(float) * (size_t)k * I);
    int err = !aa || !h || !av || act_alloc(&ax, D, gate_up[0]->g);
    for (int j = 0; j < k && !err; j++) err |= act_alloc(&aa[j], I, down[0]->g);
    if (!err) {
        act_prepare(&ax, x, gate_up[0]->fmt);
#pragma omp parallel num_threads(threads)
        {
            for (int j = 0; j < k; j++) {
#pragma omp for schedule(static) nowait
                for (int u = 0; u < H / ug; u++) unit(gate_up[j], u, &ax, h + (size_t)j * H + (size_t)u * ug);
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (int j = 0; j < k; j++) {
                float *hj = h + (size_t)j * H, *aj = av + (size_t)j * I;
                for (int i = 0; i < I; i++)
                    aj[i] = route[j] * (activation == A_SWIGLU ? silu(hj[i]) * hj[I + i] : gelu(hj[i]));
                act_prepare(&aa[j], aj, down[j]->fmt);
            }
#pragma omp for schedule(static)
            for (int r = 0; r < D; r++) y[r] = 0.f;
            float part[16];
            for (int j = 0; j < k; j++) {
#pragma omp for schedule(static) nowait
                for (int u = 0; u < D / ud; u++) {
                    unit(down[j], u, &aa[j], part);
                    for (int r = 0; r < ud; r++) y[u * ud + r] += part[r];
                }
            }
        }
    }
    if (aa)
        for (int j = 0; j < k; j++) free(aa[j].mem);
    free(ax.mem);
    free(aa);
    free(h);
    free(av);
    return err;
}

/* Where each query row of a step reads: cache row row[b], keys at positions start[b] .. pos[b] (the positions
 * before start[b] are that row's left padding; pos[b] is the query's own position, its key written there). */
typedef struct {
    const long long *row, *pos, *start;
} place_t;

/* Attention of one new query per row over L keys (a decode step), grouped-query: for query head h of kv head
 * g = h / (H/G), out[b, h] = Σ_j softmax_j(scale · q[b, h]·k[b, g, j]) · v[b, g, j], in float32, over the keys
 * j = 0 .. L−1 of row b — or, with a placement pl, over the keys start[b] .. pos[b] of cache row row[b] (pos[b] < L).
 * q, out: float32 [B, H, Dh] contiguous; k, v: bfloat16 (kv_bf16) or float32, element (b, g, j, d) at
 * b·sb + g·sg + j·sl + d (strides in elements: the cache's buffers, read in place). Dh % 16 == 0, H/G <= 16. */
static inline __m512 load16(const void *p, size_t i, int bf16) {
    return bf16 ? bf16x16((const uint16_t *)p + i, 0xFFFF) : _mm512_loadu_ps((const float *)p + i);
}

static int attention_f32(const float *q, const void *k, const void *v, float *out, int B, int H, int G, int L,
                         int Dh, long long ksb, long long ksg, long long ksl, long long vsb, long long vsg,
                         long long vsl, int kv_bf16, float scale, const place_t *pl, int threads) {
    const int rep = H / G;
    int err = 0;
#pragma omp parallel num_threads(threads)
    {
        float *s = malloc(sizeof(float) * (size_t)rep * (L > 0 ? L : 1));
        if (!s) {
#pragma omp atomic write
            err = 1;
        }
#pragma omp for schedule(static)
        for (int u = 0; u < B * G; u++) {
            if (!s) continue;
            const int b = u / G, g = u % G, j0 = pl ? (int)pl->start[b] : 0, j1 = pl ? (int)pl->pos[b] + 1 : L;
            const size_t cb = pl ? (size_t)pl->row[b] : (size_t)b;
            const float *qg = q + ((size_t)b * H + (size_t)g * rep) * Dh;
            float *og = out + ((size_t)b * H + (size_t)g * rep) * Dh;
            float m[16];
            for (int r = 0; r < rep; r++) m[r] = -INFINITY;
            for (int j = j0; j < j1; j++) {
                size_t kj = cb * ksb + (size_t)g * ksg + (size_t)j * ksl;
                __m512 acc[16];
                for (int r = 0; r < rep; r++) acc[r] = _mm512_setzero_ps();
                for (int d = 0; d < Dh; d += 16) {
                    __m512 kv = load16(k, kj + d, kv_bf16);
                    for (int r = 0; r < rep; r++) acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(qg + (size_t)r * Dh + d), kv, acc[r]);
                }
                for (int r = 0; r < rep; r++) {
                    float x = scale * _mm512_reduce_add_ps(acc[r]);
                    s[(size_t)r * L + j - j0] = x;
                    m[r] = fmaxf(m[r], x);
                }
            }
            for (int r = 0; r < rep; r++) {
                float sum = 0.f;
                for (int j = j0; j < j1; j++) {
                    float e = expf(s[(size_t)r * L + j - j0] - m[r]);
                    s[(size_t)r * L + j - j0] = e;
                    sum += e;
                }
                float inv = 1.f / sum;
                for (int j = j0; j < j1; j++) s[(size_t)r * L + j - j0] *= inv;
                memset(og + (size_t)r * Dh, 0, sizeof(float) * Dh);
            }
            for (int j = j0; j < j1; j++) {
                size_t vj = cb * vsb + (size_t)g * vsg + (size_t)j * vsl;
                for (int d = 0; d < Dh; d += 16) {
                    __m512 vv = load16(v, vj + d, kv_bf16);
                    for (int r = 0; r < rep; r++) {
                        float *o = og + (size_t)r * Dh + d;
                        _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_set1_ps(s[(size_t)r * L + j - j0]), vv, _mm512_loadu_ps(o)));
                    }
                }
            }
        }
        free(s);
    }
    return err;
}

/* ------------------------------------------------------------------ entry points: float32 or bfloat16 in and out */

/* p as float32: p itself, or a converted copy in *tmp (freed by the caller). */
static const float *as_f32(const void *p, size_t n, int bf16, float **tmp) {
    *tmp = NULL;
    if (!bf16) return (const float *)p;
    *tmp = malloc(sizeof(float) * (n ? n : 1));
    if (*tmp)
        for (size_t i = 0; i < n; i++) (*tmp)[i] = bf16_to_f32(((const uint16_t *)p)[i]);
    return *tmp;
}

/* Where to compute an output of n floats: y itself, or a buffer in *tmp to convert into y afterwards. */
static float *out_f32(void *y, size_t n, int bf16, float **tmp) {
    *tmp = bf16 ? malloc(sizeof(float) * (n ? n : 1)) : NULL;
    return bf16 ? *tmp : (float *)y;
}

static void finish(void *y, float *tmp, size_t n, int bf16) {
    if (bf16 && tmp)
        for (size_t i = 0; i < n; i++) ((uint16_t *)y)[i] = f32_to_bf16(tmp[i]);
    free(tmp);
}

/* y [M, N] = x [M, K] · Wᵀ; x and y float32 or bfloat16 (flags). */
int moelab_linear(const weight_t *w, const void *x, int x_bf16, int m, void *y, int y_bf16, int threads) {
    float *xt, *yt;
    const float *xf = as_f32(x, (size_t)m * w->k, x_bf16, &xt);
    float *yf = out_f32(y, (size_t)m * w->n, y_bf16, &yt);
    int err = !xf || !yf || linear_f32(w, xf, m, yf, threads);
    if (!err) finish(y, yt, (size_t)m * w->n, y_bf16); else free(yt);
    free(xt);
    return err;
}

int moelab_moe_decode(const weight_t *const *gate_up, const weight_t *const *down, int k, const float *route,
                      const void *x, int x_bf16, void *y, int y_bf16, int activation, int threads) {
    float *xt, *yt;
    const float *xf = as_f32(x, (size_t)gate_up[0]->k, x_bf16, &xt);
    float *yf = out_f32(y, (size_t)down[0]->n, y_bf16, &yt);
    int err = !xf || !yf || moe_decode_f32(gate_up, down, k, route, xf, yf, activation, threads);
    if (!err) finish(y, yt, (size_t)down[0]->n, y_bf16); else free(yt);
    free(xt);
    return err;
}

/* attention_f32 with q and out float32 or bfloat16 (q_bf16). */
static int attention_io(const void *q, int q_bf16, const void *k, const void *v, void *out, int B, int H, int G, int L,
                        int Dh, long long ksb, long long ksg, long long ksl, long long vsb, long long vsg,
                        long long vsl, int kv_bf16, float scale, const place_t *pl, int threads) {
    float *qt, *ot;
    size_t n = (size_t)B * H * Dh;
    const float *qf = as_f32(q, n, q_bf16, &qt);
    float *of = out_f32(out, n, q_bf16, &ot);
    int err = !qf || !of || attention_f32(qf, k, v, of, B, H, G, L, Dh, ksb, ksg, ksl, vsb, vsg, vsl, kv_bf16, scale,
                                          pl, threads);
    if (!err) finish(out, ot, n, q_bf16); else free(ot);
    free(qt);
    return err;
}

int moelab_decode_attention(const void *q, int q_bf16, const void *k, const void *v, void *out, int B, int H, int G,
                            int L, int Dh, long long ksb, long long ksg, long long ksl, long long vsb, long long vsg,
                            long long vsl, int kv_bf16, float scale, int threads) {
    return attention_io(q, q_bf16, k, v, out, B, H, G, L, Dh, ksb, ksg, ksl, vsb, vsg, vsl, kv_bf16, scale, NULL,
                        threads);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline float load_elem(const void *p, size_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_elem(void *p, size_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* RMSNorm of `rows` rows of width `dim`, as moelab.layers.rms_norm: n = x / sqrt(mean(x²) + eps) in float32,
 * rounded to x's dtype, then y = w ⊙ n in that dtype; row i takes weight row i % w_rows (x, y, w: one dtype). */
int moelab_rms_norm(const void *x, void *y, const void *w, int bf16, int rows, int dim, int w_rows, float eps) {
    for (int i = 0; i < rows; i++) {
        size_t o = (size_t)i * dim, wo = (size_t)(i % w_rows) * dim;
        float ss = 0.f;
        for (int d = 0; d < dim; d++) {
            float v = load_elem(x, o + d, bf16);
            ss += v * v;
        }
        float r = 1.f / sqrtf(ss / (float)dim + eps);
        for (int d = 0; d < dim; d++) {
            float n = load_elem(x, o + d, bf16) * r;
            if (bf16) n = round_bf16(n);
            store_elem(y, o + d, load_elem(w, wo + d, bf16) * n, bf16);
        }
    }
    return 0;
}

/* Rotate-half RoPE of `rows` rows of width dh at one position, as moelab.layers.apply_rope: the first r channels,
 * halves a = x[:r/2], b = x[r/2:r]: y = (x·cos + [−b, a]·sin) in float32, rounded to x's dtype; the rest copied. */
int moelab_rope(const void *x, void *y, int bf16, int rows, int dh, int r, const float *cos, const float *sin) {
    const int h = r / 2;
    for (int i = 0; i < rows; i++) {
        size_t o = (size_t)i * dh;
        for (int d = 0; d < r; d++) {
            float v = load_elem(x, o + d, bf16);
            float rot = d < h ? -load_elem(x, o + d + h, bf16) : load_elem(x, o + d - h, bf16);
            float a = v * cos[d], b = rot * sin[d];
            store_elem(y, o + d, a + b, bf16);
        }
        for (int d = r; d < dh; d++) store_elem(y, o + d, load_elem(x, o + d, bf16), bf16);
    }
    return 0;
}

/* y = round(a + b) elementwise in the dtype (bfloat16: each sum rounded, as torch adds two bfloat16 tensors). */
static void add_into(void *y, const void *a, const void *b, size_t n, int bf16) {
    for (size_t i = 0; i < n; i++) store_elem(y, i, load_elem(a, i, bf16) + load_elem(b, i, bf16), bf16);
}

/* The fixed arguments of one grouped-query attention block (built once per layer by moelab/native.py). */
typedef struct {
    int32_t bf16;                        /* x, the norms' weights, the biases and the cache: bfloat16, else float32 */
    int32_t H, G, Dh, rot;               /* query heads, kv heads, head width, rotated channels */
    int32_t qk_full;                     /* q/k RMSNorm over all heads at once (q_w [H·Dh], k_w [G·Dh]), else per head */
    float eps, qk_eps, scale;
    const void *norm_w, *qkv_bias, *q_w, *k_w, *o_bias;  /* the optional ones NULL when absent */
    const weight_t *wqkv, *wo;
} attn_args_t;

/* One decode step of a grouped-query attention block for one token (B = S = 1), as moelab.model computes it,
 * each intermediate rounded to the model's dtype where the torch code holds it in that dtype:
 *   h = RMSNorm(x; norm_w);  q|k|v = h·Wqkvᵀ (+ bias);  q, k = RMSNorm per head, or over all heads (qk_full),
 *   (q_w, k_w: optional) then RoPE;
 *   k, v appended to the cache at position L;  a = attention(q; keys and values 0..L);  out = x + (a·Woᵀ (+ bias)).
 * Cache element (g, j, d) at g·sg + j·sl + d. Returns nonzero when out of memory. The B-row step (attention_rows,
 * below) with one row placed at L: one implementation for both. */
static int attention_rows(const attn_args_t *a, int B, const void *x, void *out, const float *cos, const float *sin,
                          void *kbuf, void *vbuf, long long sb, long long sg, long long sl, const place_t *pl,
                          int threads);

int moelab_attention_block(const attn_args_t *a, const void *x, void *out, const float *cos, const float *sin,
                           void *kbuf, void *vbuf, long long sg, long long sl, int L, int threads) {
    const long long first = 0, at = L; /* the one row: cache row 0, position L, every key from 0 */
    const place_t pl = {&first, &at, &first};
    return attention_rows(a, 1, x, out, cos, sin, kbuf, vbuf, 0, sg, sl, &pl, threads);
}

/* Top-k softmax routing of one token, as moelab.routing.Router computes it for a "topk_softmax" router:
 *   z = x·Wᵀ [E] in float32 (W [E, D] float32; each row's products summed in 16 lanes, then the lanes);
 *   idx = the k largest z in decreasing order (ties: the lower index);
 *   weight_j = softmax over the k chosen logits (renorm) or the softmax over all E at the chosen (otherwise),
 *   times scale. x, W float32; logits [E] float32, idx [k] int64, weight [k] float32. */
static void route_f32(const float *x, const float *w, int E, int D, int k, int renorm, float scale, float *z,
                      long long *idx, float *weight, int threads) {
    const __mmask16 tail = (__mmask16)((1u << (D % 16)) - 1);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int e = 0; e < E; e++) {
        const float *we = w + (size_t)e * D;
        __m512 acc = _mm512_setzero_ps();
        int d = 0;
        for (; d + 16 <= D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(we + d), _mm512_loadu_ps(x + d), acc);
        if (tail) acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, we + d), _mm512_maskz_loadu_ps(tail, x + d), acc);
        z[e] = _mm512_reduce_add_ps(acc);
    }
    for (int j = 0; j < k; j++) { /* selection: k passes over E (k, E small) */
        int best = -1;
        for (int e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j && !taken; i++) taken = idx[i] == e;
            if (!taken && (best < 0 || z[e] > z[best])) best = e;
        }
        idx[j] = best;
    }
    const float m = z[idx[0]];
    float sum = 0.f;
    if (renorm)
        for (int j = 0; j < k; j++) sum += expf(z[idx[j]] - m);
    else {
        float zmax = z[0];
        for (int e = 1; e < E; e++) zmax = fmaxf(zmax, z[e]);
        for (int e = 0; e < E; e++) sum += expf(z[e] - zmax);
        for (int j = 0; j < k; j++) weight[j] = expf(z[idx[j]] - zmax) / sum * scale;
        return;
    }
    for (int j = 0; j < k; j++) weight[j] = expf(z[idx[j]] - m) / sum * scale;
}

int moelab_route(const void *x, int bf16, const float *w, int E, int D, int k, int renorm, float scale, float *logits,
                 long long *idx, float *weight, int threads) {
    float *xt;
    const float *xf = as_f32(x, (size_t)D, bf16, &xt);
    if (!xf) return 1;
    route_f32(xf, w, E, D, k, renorm, scale, logits, idx, weight, threads);
    free(xt);
    return 0;
}

/* The fixed arguments of one MoE feed-forward block (built once per layer by moelab/native.py). */
typedef struct {
    int32_t bf16, E, k, renorm, activation;
    float eps, scale;
    const void *norm_w;                        /* x's dtype */
    const float *router_w;                     /* [E, D] float32 */
    const weight_t *const *gate_up, *const *down;  /* the E experts (one format) */
} moe_args_t;

/* One decode step of an MoE feed-forward block for one token, as moelab.model computes it on the decode path:
 *   h = RMSNorm(x; norm_w) (rounded to the dtype);  idx, weight = route(h) (route_f32);
 *   y = Σ_j weight_j · FFN_idx_j(h) (moe_decode_f32, rounded to the dtype);  out = x + y.
 * The chosen experts are written to idx [k] (unless NULL). Returns nonzero when out of memory. */
int moelab_moe_block(const moe_args_t *a, const void *x, void *out, long long *idx, int threads) {
    const int bf16 = a->bf16, E = a->E, k = a->k, D = a->gate_up[0]->k;
    const size_t es = bf16 ? 2 : 4;
    char *mem = malloc((2 * sizeof(void *) + sizeof(long long)) * (size_t)k
                       + sizeof(float) * (2 * (size_t)D + (size_t)E + (size_t)k) + 2 * es * (size_t)D);
    if (!mem) return 1;
    const weight_t **gu = (const weight_t **)mem, **dn = gu + k;
    long long *chosen = (long long *)(dn + k);
    if (!idx) idx = chosen;
    float *hf = (float *)(chosen + k), *yf = hf + D, *z = yf + D, *weight = z + E;
    void *h = weight + k, *y = (char *)h + es * D;
    moelab_rms_norm(x, h, a->norm_w, bf16, 1, D, 1, a->eps);
    for (int d = 0; d < D; d++) hf[d] = load_elem(h, d, bf16);
    route_f32(hf, a->router_w, E, D, k, a->renorm, a->scale, z, idx, weight, threads);
    for (int j = 0; j < k; j++) {
        gu[j] = a->gate_up[idx[j]];
        dn[j] = a->down[idx[j]];
    }
    int err = moe_decode_f32(gu, dn, k, weight, hf, yf, a->activation, threads);
    for (int d = 0; d < D; d++) store_elem(y, d, yf[d], bf16);
    add_into(out, x, y, (size_t)D, bf16);
    free(mem);
    return err;
}

/* One layer of a decode step: its attention block's fixed arguments, its cache buffers, and its MoE block's. */
typedef struct {
    const attn_args_t *attn;
    const moe_args_t *moe;
    void *kbuf, *vbuf;
    long long sg, sl, sb;  /* the cache buffers' strides: kv head, position, row (rows: moelab_decode_rows) */
} layer_t;

/* n layers of one decode step for one token at position L: x [D] (the residual stream, in the layers' dtype)
 * is replaced by its value after them; each layer's k and v are appended at L; the experts layer i chose go to
 * idx + i·k (idx NULL: not kept; every layer routes to the same k). As moelab_attention_block then
 * moelab_moe_block, layer by layer. Returns nonzero when out of memory. */
int moelab_decode_layers(const layer_t *layers, int n, void *x, const float *cos, const float *sin, int L,
                         long long *idx, int threads) {
    if (n <= 0) return 0;
    const size_t bytes = (size_t)layers[0].attn->wqkv->k * (layers[0].attn->bf16 ? 2 : 4);
    void *t = malloc(bytes);
    int err = !t;
    for (int i = 0; i < n && !err; i++) {
        const layer_t *l = &layers[i];
        err |= moelab_attention_block(l->attn, x, t, cos, sin, l->kbuf, l->vbuf, l->sg, l->sl, L, threads);
        err |= moelab_moe_block(l->moe, t, x, idx ? idx + (size_t)i * l->moe->k : NULL, threads);
    }
    free(t);
    return err;
}

/* ------------------------------------------------------------------ a decode step of B rows (continuous batching)
 * Each row is computed exactly as moelab_decode_layers computes it alone (the same products on the same prepared
 * activations, the same sums in the same order: bit-identical), but a weight is read once per step for all the rows
 * that use it — the projections of attention once for the B rows, each expert once for the rows routed to it. */

/* B tokens through their k experts each: y_b = Σ_j r_bj · FFN_{e_bj}(x_b), the k terms of a row summed in the order j
 * (as moe_decode_f32 sums them). idx, route [B, k]; x, y [B, D] float32. One parallel region: the rows' activations
 * prepared; for each expert used, its first product for all its rows (work split over its weight rows); the
 * activations; each expert's second product into a buffer per (row, j); the sums per row. */
static int moe_rows_f32(const weight_t *const *gate_up, const weight_t *const *down, int E, int k, int B,
                        const long long *idx, const float *route, const float *x, float *y, int activation,
                        int threads) {
    const int D = gate_up[0]->k, H = gate_up[0]->n, I = down[0]->k, ug = unit_rows(gate_up[0]),
              ud = unit_rows(down[0]), n = B * k;
    int *off = calloc((size_t)E + 1, sizeof(int)), *order = malloc(sizeof(int) * (size_t)n),
        *fill = calloc((size_t)E, sizeof(int));
    act_t *ax = calloc((size_t)B, sizeof(act_t)), *aa = calloc((size_t)n, sizeof(act_t));
    float *h = malloc(sizeof(float) * (size_t)n * H), *av = malloc(sizeof(float) * (size_t)n * I),
          *part = malloc(sizeof(float) * (size_t)n * D);
    const act_t **ga = malloc(sizeof(void *) * (size_t)n), **da = malloc(sizeof(void *) * (size_t)n);
    float **gh = malloc(sizeof(void *) * (size_t)n), **dp = malloc(sizeof(void *) * (size_t)n);
    int err = !off || !order || !fill || !ax || !aa || !h || !av || !part || !ga || !da || !gh || !dp;
    for (int b = 0; b < B && !err; b++) err |= act_alloc(&ax[b], D, gate_up[0]->g);
    for (int p = 0; p < n && !err; p++) err |= act_alloc(&aa[p], I, down[0]->g);
    if (!err) {
        for (int p = 0; p < n; p++) off[idx[p] + 1]++; /* the (row, j) pairs grouped by expert, in row order */
        for (int e = 0; e < E; e++) off[e + 1] += off[e];
        for (int p = 0; p < n; p++) order[off[idx[p]] + fill[idx[p]]++] = p;
        for (int i = 0; i < n; i++) { /* per pair, in expert order: its activations and outputs */
            ga[i] = &ax[order[i] / k];
            gh[i] = h + (size_t)order[i] * H;
            da[i] = &aa[order[i]];
            dp[i] = part + (size_t)order[i] * D;
        }
#pragma omp parallel num_threads(threads)
        {
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) act_prepare(&ax[b], x + (size_t)b * D, gate_up[0]->fmt);
            for (int e = 0; e < E; e++) {
                if (off[e] == off[e + 1]) continue;
                const int pg = panel_units(gate_up[e], off[e + 1] - off[e]);
#pragma omp for schedule(static) nowait
                for (int p = 0; p < (H / ug + pg - 1) / pg; p++)
                    panel(gate_up[e], p, pg, H / ug, ga + off[e], gh + off[e], off[e + 1] - off[e]);
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (int p = 0; p < n; p++) {
                float *hp = h + (size_t)p * H, *ap = av + (size_t)p * I;
                for (int i = 0; i < I; i++)
                    ap[i] = route[p] * (activation == A_SWIGLU ? silu(hp[i]) * hp[I + i] : gelu(hp[i]));
                act_prepare(&aa[p], ap, down[0]->fmt);
            }
            for (int e = 0; e < E; e++) {
                if (off[e] == off[e + 1]) continue;
                const int pd = panel_units(down[e], off[e + 1] - off[e]);
#pragma omp for schedule(static) nowait
                for (int p = 0; p < (D / ud + pd - 1) / pd; p++)
                    panel(down[e], p, pd, D / ud, da + off[e], dp + off[e], off[e + 1] - off[e]);
            }
#pragma omp barrier
#pragma omp for schedule(static)
            for (int b = 0; b < B; b++) {
                float *yb = y + (size_t)b * D;
                for (int r = 0; r < D; r++) yb[r] = 0.f;
                for (int j = 0; j < k; j++) {
                    const float *pj = part + ((size_t)b * k + j) * D;
                    for (int r = 0; r < D; r++) yb[r] += pj[r];
                }
            }
        }
    }
    if (ax)
        for (int b = 0; b < B; b++) free(ax[b].mem);
    if (aa)
        for (int p = 0; p < n; p++) free(aa[p].mem);
    free(off);
    free(order);
    free(fill);
    free(ga);
    free(da);
    free(gh);
    free(dp);
    free(ax);
    free(aa);
    free(h);
    free(av);
    free(part);
    return err;
}

/* moelab_attention_block for B rows placed by pl (place_t): row b's token has its own rotary angles (cos, sin
 * [B, rot]); its key and value go to (row[b], pos[b]) before any row attends. Cache element (r, g, j, d) at
 * r·sb + g·sg + j·sl + d. */
static int attention_rows(const attn_args_t *a, int B, const void *x, void *out, const float *cos, const float *sin,
                          void *kbuf, void *vbuf, long long sb, long long sg, long long sl, const place_t *pl,
                          int threads) {
    const int bf16 = a->bf16, H = a->H, G = a->G, Dh = a->Dh;
    const int D = a->wqkv->k, nq = H * Dh, nk = G * Dh, nqkv = nq + 2 * nk;
    const size_t es = bf16 ? 2 : 4;
    char *mem = malloc(es * (size_t)B * (2 * (size_t)D + 2 * (size_t)nqkv + 2 * (size_t)nq));
    if (!mem) return 1;
    char *h = mem, *qkv = h + es * B * D, *qk = qkv + es * B * nqkv, *q = qk + es * B * nqkv, *att = q + es * B * nq,
         *o = att + es * B * nq;
    int err = 0;
    moelab_rms_norm(x, h, a->norm_w, bf16, B, D, 1, a->eps);
    err |= moelab_linear(a->wqkv, h, bf16, B, qkv, bf16, threads);
    for (int b = 0; b < B; b++) {
        char *row = qkv + es * b * nqkv, *rq = qk + es * b * nqkv;
        if (a->qkv_bias) add_into(row, row, a->qkv_bias, (size_t)nqkv, bf16);
        if (a->q_w) {
            const int qr = a->qk_full ? 1 : H, kr = a->qk_full ? 1 : G, qd = a->qk_full ? nq : Dh,
                      kd = a->qk_full ? nk : Dh;
            moelab_rms_norm(row, row, a->q_w, bf16, qr, qd, 1, a->qk_eps);
            moelab_rms_norm(row + es * nq, row + es * nq, a->k_w, bf16, kr, kd, 1, a->qk_eps);
        }
        moelab_rope(row, rq, bf16, H + G, Dh, a->rot, cos + (size_t)b * a->rot, sin + (size_t)b * a->rot);
        for (int g = 0; g < G; g++) {
            size_t at = (size_t)pl->row[b] * sb + (size_t)g * sg + (size_t)pl->pos[b] * sl;
            memcpy((char *)kbuf + es * at, rq + es * ((size_t)nq + (size_t)g * Dh), es * Dh);
            memcpy((char *)vbuf + es * at, row + es * ((size_t)nq + nk + (size_t)g * Dh), es * Dh);
        }
        memcpy(q + es * b * nq, rq, es * nq);
    }
    int L = 0;
    for (int b = 0; b < B; b++) L = pl->pos[b] + 1 > L ? (int)pl->pos[b] + 1 : L;
    err |= attention_io(q, bf16, kbuf, vbuf, att, B, H, G, L, Dh, sb, sg, sl, sb, sg, sl, bf16, a->scale, pl, threads);
    err |= moelab_linear(a->wo, att, bf16, B, o, bf16, threads);
    for (int b = 0; b < B; b++) {
        char *ob = o + es * b * D;
        if (a->o_bias) add_into(ob, ob, a->o_bias, (size_t)D, bf16);
        add_into((char *)out + es * b * D, (const char *)x + es * b * D, ob, (size_t)D, bf16);
    }
    free(mem);
    return err;
}

/* moelab_moe_block for B rows x [B, D]; the chosen experts to idx [B, k]. */
static int moe_rows(const moe_args_t *a, int B, const void *x, void *out, long long *idx, int threads) {
    if (B == 1) return moelab_moe_block(a, x, out, idx, threads); /* the one-row routine: the same floats, faster */
    const int bf16 = a->bf16, E = a->E, k = a->k, D = a->gate_up[0]->k;
    const size_t es = bf16 ? 2 : 4;
    char *mem = malloc(sizeof(float) * (size_t)B * (2 * (size_t)D + (size_t)E + (size_t)k) + 2 * es * (size_t)B * D);
    if (!mem) return 1;
    float *hf = (float *)mem, *yf = hf + (size_t)B * D, *z = yf + (size_t)B * D, *weight = z + (size_t)B * E;
    char *h = (char *)(weight + (size_t)B * k), *y = h + es * B * D;
    moelab_rms_norm(x, h, a->norm_w, bf16, B, D, 1, a->eps);
    for (size_t i = 0; i < (size_t)B * D; i++) hf[i] = load_elem(h, i, bf16);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int b = 0; b < B; b++)
        route_f32(hf + (size_t)b * D, a->router_w, E, D, k, a->renorm, a->scale, z + (size_t)b * E, idx + (size_t)b * k,
                  weight + (size_t)b * k, 1);
    int err = moe_rows_f32(a->gate_up, a->down, E, k, B, idx, weight, hf, yf, a->activation, threads);
    for (size_t i = 0; i < (size_t)B * D; i++) store_elem(y, i, yf[i], bf16);
    add_into(out, x, y, (size_t)B * D, bf16);
    free(mem);
    return err;
}

/* n layers of one step for B tokens placed in the cache by row, pos, start [B] (place_t: a decode step of B rows
 * — row b, all at one position — or a chunk of one row's prompt — row 0, consecutive positions — or both), each
 * with its rotary angles (row b of cos, sin [B, rot]): x [B, D] is replaced by its value after them; each layer's
 * k and v of token b are written at (row[b], pos[b]); the experts each token chose in layer i go to idx [n, B, k].
 * Each token is computed as moelab_decode_layers computes it alone. Returns nonzero when out of memory. */
int moelab_decode_rows(const layer_t *layers, int n, int B, void *x, const float *cos, const float *sin,
                       const long long *row, const long long *pos, const long long *start, long long *idx,
                       int threads) {
    const place_t pl = {row, pos, start};
    if (n <= 0 || B <= 0) return 0;
    const size_t es = layers[0].attn->bf16 ? 2 : 4, D = (size_t)layers[0].attn->wqkv->k;
    void *t = malloc(es * (size_t)B * D);
    int err = !t;
    for (int i = 0; i < n && !err; i++) {
        const layer_t *l = &layers[i];
        err |= attention_rows(l->attn, B, x, t, cos, sin, l->kbuf, l->vbuf, l->sb, l->sg, l->sl, &pl, threads);
        err |= moe_rows(l->moe, B, t, x, idx + (size_t)i * B * l->moe->k, threads);
    }
    free(t);
    return err;
}
