/* What native.c, native_legacy.c and native_step.c share: the vector-extension switch, the kernels one file
   calls from another, f16 reads, the rounding of x to int16 per group, GGUF's K-quant block sizes and Q4_K's
   packed scales. */

#ifndef KILN_NATIVE_H
#define KILN_NATIVE_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__F16C__) || (defined(__AVX512F__) && defined(__AVX512BW__))
#include <immintrin.h>
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define KILN_AVX512 1
#endif

/* The kernels one file calls from another (native_step.c calls the others'). */
void kiln_gemv_i8(const int8_t *, const float *, const uint16_t *, const float *, float *, int64_t, int64_t, int);
void kiln_gemv_i8g(const int8_t *, const float *, const uint16_t *, int64_t, const float *, float *, int64_t, int64_t,
                   int64_t, int);
void kiln_gemv_q4k(const uint8_t *, const float *, const float *, float *, int64_t, int64_t, int64_t, int);
void kiln_gemv_q6k(const uint8_t *, const float *, const float *, float *, int64_t, int64_t, int64_t, int);
void kiln_gemv_lq(const uint8_t *, int, const float *, const float *, float *, int64_t, int64_t, int64_t, int);
void kiln_rms_norm(const float *, const float *, const float *, float, float, float *, float *, int64_t);
enum { KV_F32, KV_F16, KV_BF16, KV_Q8_0, KV_Q4_0 };  /* a KV cache side's stored type (kiln_kv) */
typedef struct {  /* how kiln_decode_attention (native.c) writes and reads a cache that is not plain float32 */
    uint16_t *ks, *vs;                /* q8_0 / q4_0 f16 scales, one per 32 values; else NULL */
    const float *krot, *vrot, *koff;  /* (D, D) each side's basis, (K, D) the keys' offset; NULL: none */
    int64_t kt, vt;                   /* each side's type (KV_*) */
} kiln_kv;
void kiln_decode_attention(const float *, float *, const float *, const float *, void *, void *, int64_t,
                           int64_t, int64_t, int64_t, int64_t, const float *, int64_t, float, const float *,
                           const float *, float, float, float, int64_t, int64_t, int64_t, float *, int,
                           const kiln_kv *);

#define Q4K_BYTES 144  /* one Q4_K block: 256 weights */
#define Q6K_BYTES 210  /* one Q6_K block */
#define XQ_MAX 32639.f  /* |xq| bound where x splits into two signed bytes (127 * 257: 256 * hi + lo) */

static inline float f16_to_f32(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF, u;
    if (e == 0x1F)
        u = sign | 0x7F800000u | (m << 13);  /* inf, nan */
    else if (e)
        u = sign | ((e + 112) << 23) | (m << 13);
    else if (!m)
        u = sign;
    else {  /* subnormal: m * 2^-24, normalized */
        e = 113;
        while (!(m & 0x400)) { m <<= 1; e--; }
        u = sign | (e << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

static inline uint16_t f32_to_bf16(float f) {  /* to nearest, ties to even, as torch's .bfloat16() */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)
        return (uint16_t)((u >> 16) | 0x40);  /* nan stays a (quiet) nan */
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* A dequantizer's rows: out (N, K) float32, or bfloat16 (bf16: each row dequantized to float32 in a buffer of the
   thread's, then rounded), row(ctx, n, o) writing row n's K float32 weights at o. */
typedef void (*kiln_row_fn)(const void *ctx, int64_t n, float *o);
static inline void dequant_rows(kiln_row_fn row, const void *ctx, void *out, int bf16, int64_t n_rows, int64_t k_len,
                                int threads) {
    #pragma omp parallel num_threads(threads)
    {
        float *buf = bf16 ? (float *)malloc((size_t)k_len * sizeof(float)) : NULL;
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < n_rows; n++) {
            if (!bf16) {
                row(ctx, n, (float *)out + n * k_len);
                continue;
            }
            uint16_t *o = (uint16_t *)out + n * k_len;
            row(ctx, n, buf);
            #pragma omp simd
            for (int64_t k = 0; k < k_len; k++)
                o[k] = f32_to_bf16(buf[k]);
        }
        free(buf);
    }
}

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

/* xq (K,), xs (K / group,): x's groups rounded to integers within +-qmax (rint: to nearest, ties to even, as
   torch.round). */
static inline void quantize_x16(const float *x, int64_t k_len, int64_t group, float qmax, int16_t *xq, float *xs) {
    for (int64_t g = 0; g < k_len / group; g++) {
        const float *xg = x + g * group;
        float amax = 0.f;
        for (int64_t j = 0; j < group; j++)
            amax = fmaxf(amax, fabsf(xg[j]));
        const float d = amax / qmax, id = d > 0.f ? 1.f / d : 0.f;
        xs[g] = d;
        for (int64_t j = 0; j < group; j++)
            xq[g * group + j] = (int16_t)lrintf(xg[j] * id);
    }
}

/* The eight 6-bit scales (bytes 0-7) and mins (bytes 8-15) of a block's 12 packed bytes: bytes 0-3 hold
   scales 0-3 and the top 2 bits of scales 4-7, bytes 4-7 the same for mins, bytes 8-11 the low 4 bits of
   scales 4-7 (low nibbles) and mins 4-7 (high nibbles); worked on four bytes at a time. */
static inline void q4k_scales(const uint8_t *s, uint8_t *sm) {
    uint32_t a, b, c, o[4];
    memcpy(&a, s, 4);
    memcpy(&b, s + 4, 4);
    memcpy(&c, s + 8, 4);
    o[0] = a & 0x3F3F3F3Fu;
    o[1] = (c & 0x0F0F0F0Fu) | (((a >> 6) & 0x03030303u) << 4);
    o[2] = b & 0x3F3F3F3Fu;
    o[3] = ((c >> 4) & 0x0F0F0F0Fu) | (((b >> 6) & 0x03030303u) << 4);
    memcpy(sm, o, 16);
}

static inline void q4k_header(const uint8_t *blk, float *d, float *dmin, uint8_t *sm) {
    *d = f16_at(blk);
    *dmin = f16_at(blk + 2);
    q4k_scales(blk + 4, sm);
}

/* The rows of x for the block GEMVs: xq (M, K) rounded per `group` to |xq| <= XQ_MAX, xs (M, K / group),
   xsum (M, K / sub) each sub-block's sum of xq, and xq's halves as signed bytes, hi and lo (M, K), xq = 256 * hi
   + lo, position i of a row holding xq[order(i)] (order NULL: i), the order the type's codes unpack in; corr:
   the caller's (freed with the rest). */
typedef struct {
    int16_t *xq;
    int8_t *hi, *lo;
    float *xs;
    int32_t *xsum, *corr;
} x_planes;

static inline x_planes x_planes_make(const float *x, int64_t m_rows, int64_t k_len, int64_t group, int64_t sub,
                              int64_t (*order)(int64_t)) {
    x_planes r = {malloc(m_rows * k_len * sizeof(int16_t)), malloc(m_rows * k_len), malloc(m_rows * k_len),
                  malloc(m_rows * (k_len / group) * sizeof(float)), malloc(m_rows * (k_len / sub) * sizeof(int32_t)),
                  NULL};
    for (int64_t m = 0; m < m_rows; m++) {
        int16_t *xq = r.xq + m * k_len;
        quantize_x16(x + m * k_len, k_len, group, XQ_MAX, xq, r.xs + m * (k_len / group));
        for (int64_t j = 0; j < k_len / sub; j++) {
            int32_t t = 0;
            for (int64_t k = 0; k < sub; k++)
                t += xq[sub * j + k];
            r.xsum[m * (k_len / sub) + j] = t;
        }
        for (int64_t i = 0; i < k_len; i++) {
            const int v = xq[order ? order(i) : i], l = ((v + 128) & 0xFF) - 128;
            r.lo[m * k_len + i] = (int8_t)l;
            r.hi[m * k_len + i] = (int8_t)((v - l) / 256);
        }
    }
    return r;
}

static inline void x_planes_free(x_planes *r) {
    free(r->xq);
    free(r->hi);
    free(r->lo);
    free(r->xs);
    free(r->xsum);
    free(r->corr);
}

#ifdef KILN_AVX512
/* Unsigned codes times signed bytes at x, as 16 int32 lanes: VNNI's dpbusd (lane i: bytes 4i..4i+3). Without
   VNNI the same sum per 128-bit lane (each lane's four int32 hold its 16 products, in another grouping: every
   caller sums a 128-bit lane or more under one scale), widened to 16 bits first so that no pair saturates. */
static inline __m512i dot_u8s8(__m512i codes, const int8_t *x) {
    const __m512i xv = _mm512_loadu_si512(x);
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, xv);
#else
    const __m512i zero = _mm512_setzero_si512();
    const __m512i lo = _mm512_madd_epi16(_mm512_unpacklo_epi8(codes, zero),
                                         _mm512_srai_epi16(_mm512_unpacklo_epi8(xv, xv), 8));
    const __m512i hi = _mm512_madd_epi16(_mm512_unpackhi_epi8(codes, zero),
                                         _mm512_srai_epi16(_mm512_unpackhi_epi8(xv, xv), 8));
    return _mm512_add_epi32(lo, hi);
#endif
}
#endif

#endif
