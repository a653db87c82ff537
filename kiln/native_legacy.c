/* GGUF's legacy 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), regrouped at load: a GEMV for a few rows of x and
   an fp32 dequantization for a prompt's matmul (kiln/native.py builds this file with native.c).

   Types (GGML numbers): Q4_0 (2) w = d * (q - 8); Q4_1 (3) w = d * q + m; Q5_0 (6) w = d * (q - 16); Q5_1 (7)
   w = d * q + m; Q8_0 (8) w = d * q, q int8; quant/legacy.py draws the file's blocks. native.regroup_lq
   regroups each row's blocks four at a time (128 weights) into the same number of bytes, fields side by side:
     qs   64 bytes: the four blocks' 16 bytes of nibbles (block j at 16j: weight i < 16 the low nibble of byte i,
          16 + i the high nibble);
     qh   16 bytes (5-bit types): the four blocks' low 16 bits of qh (bit i: weight i's fifth bit), then their
          high 16 bits, so that bit 16j + i of the first 8 bytes belongs to byte 16j + i of the low nibbles;
     d    4 f16, then m 4 f16 (_1 types).
   Q8_0's 128 codes take the nibbles' order too: bytes 0-63 the first 16 codes of each block (block j at 16j),
   bytes 64-127 the last 16, each code + 128 as an unsigned byte (its offset, 128, taken like Q5_0's 16).
   So one 64-byte load holds 128 codes that unpack with two masks and a shift, in the order [low nibbles of the
   four blocks, high nibbles of the four blocks], and x is arranged in that order once per call.

   The product: x rounded to integers per 32 weights (|xq| <= XQ_MAX = 32639, xs = max|x| / 32639), xq = 256 * hi
   + lo with both halves signed bytes (as the K-quant GEMVs split it), the
   unsigned codes (0..31) times each half by dpbusd, the halves joined in int32, each block's offset (8 or 16
   times its sum of xq) taken in int32, then per block d * xs in float; the _1 types add m * xs * sum(xq).
   Twin: native.gemv_lq_ref (on the file's blocks). Shapes: rows (N, K / 128 * 4B), K % 128 == 0. */

#include "native.h"

#define LQ_PREFETCH 2048  /* bytes ahead, as the K-quant GEMVs ask (native.c) */

typedef struct {
    int group, qh, d, m, off;  /* bytes per 128 weights; offsets of qh (-1: none), d, m (-1: none); code offset
                                  (128: whole bytes, Q8_0) */
} lq_t;

static lq_t lq_type(int qtype) {
    switch (qtype) {
        case 2: return (lq_t){72, -1, 64, -1, 8};
        case 3: return (lq_t){80, -1, 64, 72, 0};
        case 6: return (lq_t){88, 64, 80, -1, 16};
        case 8: return (lq_t){136, -1, 128, -1, 128};
        default: return (lq_t){96, 64, 80, 88, 0};  /* 7: Q5_1 (native.py passes only these five) */
    }
}

/* Group grp's 128 codes, 0..31 (0..255 for Q8_0), in weight order (block j's weight i at 32j + i). */
static void lq_codes(const uint8_t *grp, lq_t t, uint8_t *out) {
    if (t.off == 128) {
        for (int j = 0; j < 4; j++)
            for (int i = 0; i < 16; i++) {
                out[32 * j + i] = grp[16 * j + i];
                out[32 * j + 16 + i] = grp[64 + 16 * j + i];
            }
        return;
    }
    uint16_t qh[8] = {0};
    if (t.qh >= 0)
        memcpy(qh, grp + t.qh, 16);
    for (int j = 0; j < 4; j++)
        for (int i = 0; i < 16; i++) {
            const uint8_t v = grp[16 * j + i];
            out[32 * j + i] = (uint8_t)((v & 0x0F) | (((qh[j] >> i) & 1) << 4));
            out[32 * j + 16 + i] = (uint8_t)((v >> 4) | (((qh[4 + j] >> i) & 1) << 4));
        }
}

/* Where position p of a group's byte planes takes x from (x_planes_make's order): the codes' order per 128,
   weight 32j + 16h + i of a group at 64h + 16j + i. */
static int64_t lq_order(int64_t p) {
    const int64_t g = p / 128, h = (p % 128) / 64, j = (p % 64) / 16, i = p % 16;
    return 128 * g + 32 * j + 16 * h + i;
}

/* The rows of x rounded per 32 (x_planes_make), with corr (M, K / 128, 16): the int32 each group's lanes
   subtract, off * sum(xq) of block j in lane 4j. */
static x_planes lq_x_make(const float *x, int64_t m_rows, int64_t k_len, int off) {
    const int64_t nb = k_len / 32, ng = k_len / 128;
    x_planes r = x_planes_make(x, m_rows, k_len, 32, 32, lq_order);
    r.corr = calloc(m_rows * ng * 16, sizeof(int32_t));
    for (int64_t m = 0; m < m_rows; m++)
        for (int64_t b = 0; b < nb; b++)
            r.corr[(m * ng + b / 4) * 16 + 4 * (b % 4)] = off * r.xsum[m * nb + b];
    return r;
}

#ifdef KILN_AVX512
/* A group's codes: c[0] the low nibbles of its four blocks, c[1] the high ones, fifth bits added. */
static inline void lq_unpack(const uint8_t *grp, lq_t t, __m512i *c) {
    if (t.off == 128) {
        c[0] = _mm512_loadu_si512(grp);
        c[1] = _mm512_loadu_si512(grp + 64);
        return;
    }
    const __m512i v = _mm512_loadu_si512(grp), low = _mm512_set1_epi8(0x0F);
    c[0] = _mm512_and_si512(v, low);
    c[1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    if (t.qh >= 0) {
        uint64_t lo, hi;
        memcpy(&lo, grp + t.qh, 8);
        memcpy(&hi, grp + t.qh + 8, 8);
        c[0] = _mm512_mask_add_epi8(c[0], (__mmask64)lo, c[0], _mm512_set1_epi8(16));
        c[1] = _mm512_mask_add_epi8(c[1], (__mmask64)hi, c[1], _mm512_set1_epi8(16));
    }
}

/* acc + one group's products for one row of x (hi / lo / corr / xs at the group). */
static inline __m512 lq_step(const __m512i *c, const uint8_t *grp, lq_t t, const int8_t *hi, const int8_t *lo,
                             const int32_t *corr, const float *xs, __m512 acc) {
    const __m512i u = _mm512_add_epi32(
        _mm512_slli_epi32(_mm512_add_epi32(dot_u8s8(c[0], hi), dot_u8s8(c[1], hi + 64)), 8),
        _mm512_add_epi32(dot_u8s8(c[0], lo), dot_u8s8(c[1], lo + 64)));
    const __m512i tot = _mm512_sub_epi32(u, _mm512_loadu_si512(corr));
    const __m128 s4 = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(grp + t.d))), _mm_loadu_ps(xs));
    const __m512 s = _mm512_permutexvar_ps(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0),
                                           _mm512_castps128_ps512(s4));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot), s, acc);
}
#endif

/* x (M, K) -> y (M, N), M <= 16: each group unpacked once for all M rows of x. */
void kiln_gemv_lq(const uint8_t *rows, int qtype, const float *x, const float *bias, float *y, int64_t n_rows,
                  int64_t k_len, int64_t m_rows, int threads) {
    const lq_t t = lq_type(qtype);
    const int64_t nb = k_len / 32, ng = k_len / 128;
    x_planes r = lq_x_make(x, m_rows, k_len, t.off);
    #pragma omp parallel for schedule(guided, 16) num_threads(threads)
    for (int64_t n = 0; n < n_rows; n++) {
        const uint8_t *row = rows + n * ng * t.group;
        float v[16];
#ifdef KILN_AVX512
        __m512 acc[16];
        __m512i c[2];
        for (int64_t m = 0; m < m_rows; m++)
            acc[m] = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            const uint8_t *grp = row + g * t.group;
            for (int o = 0; o < t.group; o += 64)
                _mm_prefetch((const char *)grp + LQ_PREFETCH + o, _MM_HINT_T0);
            lq_unpack(grp, t, c);
            for (int64_t m = 0; m < m_rows; m++)
                acc[m] = lq_step(c, grp, t, r.hi + m * k_len + 128 * g, r.lo + m * k_len + 128 * g,
                                 r.corr + (m * ng + g) * 16, r.xs + m * nb + 4 * g, acc[m]);
        }
        for (int64_t m = 0; m < m_rows; m++)
            v[m] = _mm512_reduce_add_ps(acc[m]);
#else
        uint8_t codes[128];
        for (int64_t m = 0; m < m_rows; m++)
            v[m] = 0.f;
        for (int64_t g = 0; g < ng; g++) {
            const uint8_t *grp = row + g * t.group;
            lq_codes(grp, t, codes);
            for (int64_t m = 0; m < m_rows; m++)
                for (int j = 0; j < 4; j++) {
                    int32_t s = 0;
                    for (int i = 0; i < 32; i++)
                        s += (int32_t)codes[32 * j + i] * r.xq[m * k_len + 128 * g + 32 * j + i];
                    s -= t.off * r.xsum[m * nb + 4 * g + j];
                    v[m] += f16_at(grp + t.d + 2 * j) * r.xs[m * nb + 4 * g + j] * (float)s;
                }
        }
#endif
        for (int64_t m = 0; m < m_rows; m++) {
            if (t.m >= 0)  /* the _1 types' m * xs * sum(xq), per block */
                for (int64_t b = 0; b < nb; b++)
                    v[m] += f16_at(row + (b / 4) * t.group + t.m + 2 * (b % 4)) * r.xs[m * nb + b]
                          * (float)r.xsum[m * nb + b];
            y[m * n_rows + n] = bias ? v[m] + bias[n] : v[m];
        }
    }
    x_planes_free(&r);
}

/* The weight (N, K) in fp32, w = d * (q - off) or d * q + m, bit-equal to quant/legacy.py's dequantizers
   (d * q is exact in fp32: an 11-bit significand times a 5-bit code); bfloat16 where bf16, rounded from those. */
typedef struct { const uint8_t *rows; lq_t t; int64_t ng; } lq_rows;

static void lq_row(const void *ctx, int64_t n, float *out) {
    const lq_rows *a = (const lq_rows *)ctx;
    const lq_t t = a->t;
    for (int64_t g = 0; g < a->ng; g++) {
        const uint8_t *grp = a->rows + (n * a->ng + g) * t.group;
        uint8_t c[128];
        lq_codes(grp, t, c);
        for (int j = 0; j < 4; j++) {
            const float d = f16_at(grp + t.d + 2 * j), m = t.m >= 0 ? f16_at(grp + t.m + 2 * j) : 0.f;
            float *o = out + 128 * g + 32 * j;
            for (int i = 0; i < 32; i++)  /* no "+ 0" for the symmetric types: it would turn -0 into +0 */
                o[i] = t.m >= 0 ? d * (float)c[32 * j + i] + m : d * (float)(c[32 * j + i] - t.off);
        }
    }
}

void kiln_dequant_lq(const uint8_t *rows, int qtype, void *out, int bf16, int64_t n_rows, int64_t k_len,
                     int threads) {
    const lq_rows a = {rows, lq_type(qtype), k_len / 128};
    dequant_rows(lq_row, &a, out, bf16, n_rows, k_len, threads);
}

/* The load's regrouping (native.regroup_lq): every group of `group` bytes (four blocks) of src rewritten in
   dst as `n_runs` runs, run r copying len[r] bytes from src offset from[r] to dst offset to[r], XORed with
   0x80 where flip[r] (Q8_0's codes); native.py reads the runs off regroup_lq's torch form, the reference. */
void kiln_permute_groups(const uint8_t *src, uint8_t *dst, int64_t n_groups, int64_t group, int64_t n_runs,
                         const int16_t *runs, int threads) {
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t g = 0; g < n_groups; g++) {
        const uint8_t *s = src + g * group;
        uint8_t *d = dst + g * group;
        for (int64_t r = 0; r < n_runs; r++) {
            const int16_t *run = runs + 4 * r;  /* to, from, len, flip */
            const uint8_t x = run[3] ? 0x80 : 0;
            if (run[2] == 16) {  /* the runs are 16 bytes (codes) or 2 (scales, high bits): fixed-size copies */
                uint64_t a, b, m = x * 0x0101010101010101ull;
                memcpy(&a, s + run[1], 8);
                memcpy(&b, s + run[1] + 8, 8);
                a ^= m;
                b ^= m;
                memcpy(d + run[0], &a, 8);
                memcpy(d + run[0] + 8, &b, 8);
            } else if (run[2] == 2) {
                d[run[0]] = s[run[1]] ^ x;
                d[run[0] + 1] = s[run[1] + 1] ^ x;
            } else {
                for (int16_t i = 0; i < run[2]; i++)
                    d[run[0] + i] = s[run[1] + i] ^ x;
            }
        }
    }
}
