/* Native CPU kernels for the batch-1 decode step, built at first use by kiln/native.py (which documents why).

   Owns four kinds of kernel, each replacing a chain of small torch ops (or a slow packed matmul) at batch 1:
   - kiln_gemv_i8: y = scale * (q @ x) (+ bias), int8 rows with one bf16 scale per row, fp32 x;
     kiln_gemv_i8g: one f16 scale per group of weights in a row (exact GGUF codes), x rounded to int16 per
     group, integer dot products, a few rows of x at once; kiln_gemv_q4k / kiln_gemv_q6k: GGUF's Q4_K / Q6_K
     blocks as the file holds them, the same way; kiln_dequant_i8g / _q4k / _q6k: those weights in fp32 (or
     rounded to bf16, for AMX's tiles: native.h's dequant_rows) for a prompt. (The legacy 32-weight blocks
     have theirs in native_legacy.c; native.h holds what both share.)
   - kiln_rms_norm: h = x (+ residual); y = h * rsqrt(mean(h^2) + eps) * (offset + w).
   - kiln_decode_attention: one token's attention at position `pos`: per-head q/k RMSNorm (optional),
     rotate-half RoPE, the k/v write into cache slot `slot`, then softmax(q k^T * scale) v over the n_keys
     slots from `lo`, grouped-query heads. The caller picks the slots (native.py): for a plain cache slot =
     pos and keys 0..pos, or the last `window` of them; for a ring (cache.Ring) every slot written so far.
     With a kiln_kv, each side is f16, bf16, q8_0 or q4_0, maybe in a rotated basis (kv_types), read as stored.
   Not: when they are used (quant/cpu.py, models/base.py), the weights' layout (quant/cpu.py), threads
   (OpenMP: the runtime torch itself uses, which native.py links, so both share one pool; `threads` is
   torch.get_num_threads(), passed in because OpenMP's own setting is per calling thread).

   Everything is fp32 in and out, accumulated in fp32 (kiln_gemv_i8g's dot products in int32). The torch
   twins they are tested against: Int8Linear.dequantize() @ x, native.gemv_i8g_ref, native.gemv_k_ref,
   kquants.dequantize_q4_k / _q6_k, ops.rms_norm_ref, ops.rope_qk_ref + KVCache.update + base.attend. */

#include "native.h"


static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ------------------------------------------------------------------ int8 GEMV
   torch's _weight_int8pack_mm streams ~14 GB/s of int8 weights on two AVX-512 cores where plain loads
   reach ~27-30 GB/s: at batch 1 it is bound by instructions, not bytes. One row at a time (one
   contiguous stream; interleaving rows measured slower), 16 weights per fused multiply-add.
   Shapes: q (N, K) row-major, scale (N,) bf16 bits, x (K,), bias (N,) or NULL, y (N,). */

#ifdef KILN_AVX512
static inline __m512 i8x16_to_f32(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
#endif

static inline float dot_i8(const int8_t *q, const float *x, int64_t k_len) {
    int64_t k = 0;
    float s = 0.f;
#ifdef KILN_AVX512
    /* Two accumulators: one alone leaves each multiply-add waiting on the last (measured 20 vs 26-32 GB/s;
       four are slower again). */
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 32 <= k_len; k += 32) {
        a0 = _mm512_fmadd_ps(i8x16_to_f32(q + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(i8x16_to_f32(q + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    }
    for (; k + 16 <= k_len; k += 16)
        a0 = _mm512_fmadd_ps(i8x16_to_f32(q + k), _mm512_loadu_ps(x + k), a0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    #pragma omp simd reduction(+:s)
    for (int64_t j = 0; j < k_len - k_len % 16; j++)
        s += (float)q[j] * x[j];
    k = k_len - k_len % 16;
#endif
    for (; k < k_len; k++)
        s += (float)q[k] * x[k];
    return s;
}

void kiln_gemv_i8(const int8_t *q, const float *x, const uint16_t *scale, const float *bias, float *y,
                  int64_t n_rows, int64_t k_len, int threads) {
    /* guided: as fast as static on a quiet machine, and a core busy with another process's work does
       not hold the whole product back */
    #pragma omp parallel for schedule(guided, 16) num_threads(threads)
    for (int64_t n = 0; n < n_rows; n++) {
        float v = dot_i8(q + n * k_len, x, k_len) * bf16_to_f32(scale[n]);
        y[n] = bias ? v + bias[n] : v;
    }
}

/* int8 rows with one f16 scale per `group` weights (GGUF blocks whose codes are int8 already: Q8_0, Q5_0,
   Q6_K): y[n] = sum_g ws[n, g] * xs[g] * (q[n, group g] . xq[group g]), each group's dot in int32, x rounded
   to int16 per group (xs = max|x| / 32767, xq = rint(x / xs): 2^-16 of the group's largest value, finer than
   bf16: a row's product stays within ~2e-5 of the exact fp32 matmul that serves many rows). AVX-512: a
   group's codes widened to int16, pairs of products summed into int32 (VNNI's dpwssd, else madd), one fp32 multiply-add per 32 weights. Shapes: q (N, K), scale (N, K / group)
   f16 bits, group dividing K; group 32 or 16 with K % 32 == 0 take the vector steps, others the scalar loop. */



#ifdef KILN_AVX512
/* acc + 32 codes' products (step t of a row), each 16-lane half of int32 pair sums scaled by its group's
   ws * xs: one scale for both halves (group 32) or one each (group 16). */
static inline __m512 step_i8g(const int8_t *qr, const int16_t *xq, const uint16_t *sr, const float *xs,
                              int64_t t, int64_t group, __m512 acc) {
    __m512 sv;
    if (group == 32)
        sv = _mm512_set1_ps(f16_to_f32(sr[t]) * xs[t]);
    else
        sv = _mm512_castpd_ps(_mm512_insertf64x4(
            _mm512_castps_pd(_mm512_set1_ps(f16_to_f32(sr[2 * t]) * xs[2 * t])),
            _mm256_castps_pd(_mm256_set1_ps(f16_to_f32(sr[2 * t + 1]) * xs[2 * t + 1])), 1));
    const __m512i w = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(qr + 32 * t)));
    const __m512i x = _mm512_loadu_si512(xq + 32 * t);
#ifdef __AVX512VNNI__
    const __m512i d = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w, x);
#else
    const __m512i d = _mm512_madd_epi16(w, x);
#endif
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), sv, acc);
}

static float row_i8g_avx512(const int8_t *qr, const int16_t *xq, const uint16_t *sr, const float *xs,
                            int64_t n_groups, int64_t group) {
    const int64_t steps = n_groups * group / 32;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();  /* two chains of multiply-adds */
    int64_t t = 0;
    for (; t + 2 <= steps; t += 2) {
        a0 = step_i8g(qr, xq, sr, xs, t, group, a0);
        a1 = step_i8g(qr, xq, sr, xs, t + 1, group, a1);
    }
    if (t < steps)
        a0 = step_i8g(qr, xq, sr, xs, t, group, a0);
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}
#endif

/* x (M, K) -> y (M, N): each row of q is read from memory once for all M rows of x (it stays in L1). */
void kiln_gemv_i8g(const int8_t *q, const float *x, const uint16_t *scale, int64_t group, const float *bias,
                   float *y, int64_t n_rows, int64_t k_len, int64_t m_rows, int threads) {
    const int64_t n_groups = k_len / group;
    int16_t *xq = malloc(m_rows * k_len * sizeof(int16_t));
    float *xs = malloc(m_rows * n_groups * sizeof(float));
    for (int64_t m = 0; m < m_rows; m++)
        quantize_x16(x + m * k_len, k_len, group, 32767.f, xq + m * k_len, xs + m * n_groups);
#ifdef KILN_AVX512
    const int wide = (group == 16 || group == 32) && k_len % 32 == 0;
#endif
    #pragma omp parallel for schedule(guided, 16) num_threads(threads)
    for (int64_t n = 0; n < n_rows; n++) {
        const int8_t *qr = q + n * k_len;
        const uint16_t *sr = scale + n * n_groups;
        for (int64_t m = 0; m < m_rows; m++) {
            const int16_t *xqm = xq + m * k_len;
            const float *xsm = xs + m * n_groups;
            float v = 0.f;
#ifdef KILN_AVX512
            if (wide)
                v = row_i8g_avx512(qr, xqm, sr, xsm, n_groups, group);
            else
#endif
            for (int64_t g = 0; g < n_groups; g++) {
                int32_t t = 0;
                const int8_t *qg = qr + g * group;
                const int16_t *xg = xqm + g * group;
                #pragma omp simd reduction(+:t)
                for (int64_t j = 0; j < group; j++)
                    t += (int32_t)qg[j] * xg[j];
                v += f16_to_f32(sr[g]) * xsm[g] * (float)t;
            }
            y[m * n_rows + n] = bias ? v + bias[n] : v;
        }
    }
    free(xq);
    free(xs);
}

/* The same weights dequantized, w[n, k] = scale[n, k / group] * q[n, k] in fp32 (out (N, K); bf16 where bf16,
   rounded from those): a prompt's many rows then run the CPU's GEMM over them (torch's own chain of casts and
   multiplies took ~0.6 ns a weight, as long as the product itself at 128 rows). */
typedef struct { const int8_t *q; const uint16_t *scale; int64_t group, k_len; } i8g_rows;

static void i8g_row(const void *ctx, int64_t n, float *o) {
    const i8g_rows *a = (const i8g_rows *)ctx;
    const int64_t n_groups = a->k_len / a->group;
    for (int64_t g = 0; g < n_groups; g++) {
        const float d = f16_to_f32(a->scale[n * n_groups + g]);
        const int8_t *qg = a->q + n * a->k_len + g * a->group;
        #pragma omp simd
        for (int64_t j = 0; j < a->group; j++)
            o[g * a->group + j] = d * (float)qg[j];
    }
}

void kiln_dequant_i8g(const int8_t *q, const uint16_t *scale, int64_t group, void *out, int bf16, int64_t n_rows,
                      int64_t k_len, int threads) {
    const i8g_rows a = {q, scale, group, k_len};
    dequant_rows(i8g_row, &a, out, bf16, n_rows, k_len, threads);
}

/* ------------------------------------------------------------------ Q4_K GEMV
   GGUF's Q4_K blocks as they are in the file: 256 weights in 144 bytes, d and dmin (f16), 12 bytes of eight
   6-bit sub-block scales sc_j and mins m_j, 128 bytes of 4-bit codes (bytes 32c..32c+31: low nibbles are
   weights 64c..64c+31, high nibbles 64c+32..64c+63), w = d * sc_j * q - dmin * m_j per sub-block of 32.
   x is rounded to integers per 256, |xq| <= 32639 (xs = max|x| / 32639), so a block's dot is integer but for
   two floats: y[n] = sum_b xs_b * (d * sum_j sc_j * (q_j . xq_j) - dmin * sum_j m_j * sum(xq_j)), as
   llama.cpp's Q4_K x Q8_K dot with 16 bits of x instead of 8. 32639 = 127 * 257: xq = 256 * hi + lo with
   both halves signed bytes, so the u8 x s8 dot instruction (VNNI's dpbusd: 64 codes a step, the codes as they
   unpack) takes each half, and the two sums join in int32 (per lane and block < 2^31). Twin:
   native.gemv_q4k_ref. Shapes: blocks (N, K / 256 * 144) bytes, K % 256 == 0. Measured on two AVX-512 VNNI
   cores, 8960x1536: 29 G weights/s a core (16-bit codes times int16 x, dpwssd: 23), 54 on two. */

/* Streaming a model's weights from DRAM, these GEMVs reach ~20 GB/s on two cores where plain reads reach 32:
   the unpacking fills the core's window before it has asked for enough lines. Asking for the lines 2 KiB
   ahead (the same row or the next ones, which follow in memory) measured 24-25 GB/s (1 KiB: 20, 4 KiB: 22). */
#define KQ_PREFETCH 2048

static inline void kq_prefetch(const uint8_t *blk, int bytes) {
#ifdef KILN_AVX512
    for (int o = 0; o < bytes; o += 64)
        _mm_prefetch((const char *)blk + KQ_PREFETCH + o, _MM_HINT_T0);
#else
    (void)blk;
    (void)bytes;
#endif
}

/* Where position i of a Q4_K row's byte planes takes x from (x_planes_make's order): per block Q4_K's four
   groups of 64 (group g = 2p + h: the low (h = 0) or high nibbles of bytes 64p..64p+63, i.e. sub-blocks 4p + h,
   then 4p + 2 + h). Q6_K's planes keep the weights' own order. */
static int64_t q4k_order(int64_t i) {
    const int64_t b = i / 256, g = (i % 256) / 64, j = i % 64;
    return 256 * b + 32 * (4 * (g / 2) + g % 2 + (j >= 32 ? 2 : 0)) + j % 32;
}

#ifdef KILN_AVX512

/* q4k_scales' sixteen bytes (scales, then mins) in a register: the 12 packed bytes worked on as the four 32-bit
   lanes of one load (bytes 4-19 of the block), so no store and reload stands between a block's header and its
   products. */
static inline __m128i q4k_scales_v(const uint8_t *blk) {
    const __m128i v = _mm_loadu_si128((const __m128i *)(blk + 4));  /* lanes a, b, c, (the codes' first 4 bytes) */
    const __m128i lo = _mm_and_si128(_mm_srlv_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(2, 1, 2, 0)),
                                                    _mm_set_epi32(4, 0, 0, 0)),
                                     _mm_set_epi32(0x0F0F0F0F, 0x3F3F3F3F, 0x0F0F0F0F, 0x3F3F3F3F));
    const __m128i top = _mm_and_si128(_mm_srli_epi32(_mm_shuffle_epi32(v, _MM_SHUFFLE(1, 1, 0, 0)), 6),
                                      _mm_set_epi32(0x03030303, 0, 0x03030303, 0));
    return _mm_or_si128(lo, _mm_slli_epi32(top, 4));
}

/* A block's codes as bytes, c[g] for group g, and its scales (sm: q4k_scales_v) as int32 lanes, s[g]: sub-block
   4p + h for lanes 0-7, 4p + 2 + h for lanes 8-15. */
static inline void q4k_unpack(const uint8_t *blk, __m128i sm, __m512i *c, __m512i *s) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int p = 0; p < 2; p++) {
        const __m512i v = _mm512_loadu_si512(blk + 16 + 64 * p);
        c[2 * p] = _mm512_and_si512(v, low);
        c[2 * p + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
    const __m512i sc = _mm512_castsi256_si512(_mm256_cvtepu8_epi32(sm));
    s[0] = _mm512_permutexvar_epi32(_mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0), sc);
    s[1] = _mm512_permutexvar_epi32(_mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1), sc);
    s[2] = _mm512_permutexvar_epi32(_mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4), sc);
    s[3] = _mm512_permutexvar_epi32(_mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 5, 5, 5, 5, 5, 5, 5, 5), sc);
}

/* One block's part of one row of x: sum_j sc_j * (q_j . xq_j) into 16 float lanes (acc, times d * xs), the
   mins into 8 (macc). */
static inline void q4k_step(const __m512i *c, const __m512i *s, __m128i sm, float d, float dmin,
                            const int8_t *hi, const int8_t *lo, float xs, const int32_t *xsum,
                            __m512 *acc, __m256 *macc) {
    __m512i tot = _mm512_setzero_si512();
    for (int g = 0; g < 4; g++) {
        const __m512i u = _mm512_add_epi32(_mm512_slli_epi32(dot_u8s8(c[g], hi + 64 * g), 8),
                                           dot_u8s8(c[g], lo + 64 * g));
        tot = _mm512_add_epi32(tot, _mm512_mullo_epi32(u, s[g]));
    }
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot), _mm512_set1_ps(d * xs), *acc);
    const __m256i mins = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)),
                                            _mm256_loadu_si256((const __m256i *)xsum));
    *macc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(dmin * xs), *macc);
}

static inline float q4k_finish(__m512 acc, __m256 macc) {
    const __m128 m4 = _mm_add_ps(_mm256_castps256_ps128(macc), _mm256_extractf128_ps(macc, 1));
    const __m128 m2 = _mm_add_ps(m4, _mm_movehl_ps(m4, m4));
    return _mm512_reduce_add_ps(acc) - _mm_cvtss_f32(_mm_add_ss(m2, _mm_movehdup_ps(m2)));
}
#endif

/* x (M, K) -> y (M, N), M <= 16: each block is unpacked once for all M rows of x (one row: accumulators in
   registers; the same arithmetic either way, so a row's result does not depend on the rows beside it). */
void kiln_gemv_q4k(const uint8_t *blocks, const float *x, const float *bias, float *y, int64_t n_rows,
                   int64_t k_len, int64_t m_rows, int threads) {
    const int64_t nb = k_len / 256, ns = k_len / 32;
    x_planes r = x_planes_make(x, m_rows, k_len, 256, 32, q4k_order);
    const int16_t *xq = r.xq;
    const int8_t *hi = r.hi, *lo = r.lo;
    const float *xs = r.xs;
    const int32_t *xsum = r.xsum;
    (void)xq, (void)hi, (void)lo;  /* the vector steps read hi / lo, the scalar ones xq */
    #pragma omp parallel for schedule(guided, 16) num_threads(threads)
    for (int64_t n = 0; n < n_rows; n++) {
        const uint8_t *row = blocks + n * nb * Q4K_BYTES;
        float d, dmin;
#ifdef KILN_AVX512
        __m512i c[4], s[4];
        if (m_rows == 1) {
            __m512 acc = _mm512_setzero_ps();
            __m256 macc = _mm256_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + b * Q4K_BYTES;
                kq_prefetch(blk, Q4K_BYTES);
                const __m128i smv = q4k_scales_v(blk);
                q4k_unpack(blk, smv, c, s);
                q4k_step(c, s, smv, f16_at(blk), f16_at(blk + 2), hi + 256 * b, lo + 256 * b, xs[b], xsum + 8 * b,
                         &acc, &macc);
            }
            const float v = q4k_finish(acc, macc);
            y[n] = bias ? v + bias[n] : v;
            continue;
        }
        __m512 acc[16];
        __m256 macc[16];
        for (int64_t m = 0; m < m_rows; m++) {
            acc[m] = _mm512_setzero_ps();
            macc[m] = _mm256_setzero_ps();
        }
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * Q4K_BYTES;
            kq_prefetch(blk, Q4K_BYTES);
            const __m128i smv = q4k_scales_v(blk);
            d = f16_at(blk);
            dmin = f16_at(blk + 2);
            q4k_unpack(blk, smv, c, s);
            for (int64_t m = 0; m < m_rows; m++)
                q4k_step(c, s, smv, d, dmin, hi + m * k_len + 256 * b, lo + m * k_len + 256 * b,
                         xs[m * nb + b], xsum + m * ns + 8 * b, &acc[m], &macc[m]);
        }
        for (int64_t m = 0; m < m_rows; m++) {
            const float v = q4k_finish(acc[m], macc[m]);
            y[m * n_rows + n] = bias ? v + bias[n] : v;
        }
#else
        uint8_t sm[16];
        for (int64_t m = 0; m < m_rows; m++) {
            const int16_t *xm = xq + m * k_len;
            float v = 0.f, mins = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + b * Q4K_BYTES;
                q4k_header(blk, &d, &dmin, sm);
                int32_t t = 0, mt = 0;
                for (int cc = 0; cc < 4; cc++)
                    for (int k = 0; k < 32; k++) {
                        const uint8_t code = blk[16 + 32 * cc + k];
                        t += (int32_t)sm[2 * cc] * (code & 0x0F) * xm[b * 256 + 64 * cc + k]
                           + (int32_t)sm[2 * cc + 1] * (code >> 4) * xm[b * 256 + 64 * cc + 32 + k];
                    }
                for (int j = 0; j < 8; j++)
                    mt += (int32_t)sm[8 + j] * xsum[m * ns + 8 * b + j];
                v += d * xs[m * nb + b] * (float)t;
                mins += dmin * xs[m * nb + b] * (float)mt;
            }
            y[m * n_rows + n] = bias ? (v - mins) + bias[n] : v - mins;
        }
#endif
    }
    x_planes_free(&r);
}

/* ------------------------------------------------------------------ Q6_K GEMV
   GGUF's Q6_K blocks as the file holds them: 256 weights in 210 bytes, ql[128] (low 4 bits), qh[64] (high 2
   bits), sixteen int8 scales sc_s, d (f16) at byte 208; w = d * sc_s * (q - 32) per sub-block of 16. In
   each half h of 128 weights (ql + 64h, qh + 32h), weights 0-31 take the low nibbles of ql[0..31] and qh's
   bits 0-1, 32-63 the low nibbles of ql[32..63] and bits 2-3, 64-95 and 96-127 the high nibbles and bits 4-5,
   6-7. x is rounded and split as for Q4_K (|xq| <= 32639, two signed bytes, here in the weights' own order);
   y[n] = sum_b d * xs_b * (sum_s sc_s * (q_s . xq_s) - 32 * sum_s sc_s * sum(xq_s)), with the codes q in
   0..63 as dpbusd's unsigned side; two of the four 64-code steps join in int32 (< 2^31), then float.
   Twin: native.gemv_q6k_ref. Shapes: blocks (N, K / 256 * 210) bytes, K % 256 == 0. */

static inline int q6k_code(const uint8_t *blk, int w) {  /* weight w's 6-bit code, 0..63 */
    const int h = w / 128, l = w % 32, part = (w % 128) / 32;
    const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
    const int low = part % 2 ? ql[l + 32] : ql[l];
    return ((part < 2 ? low & 0x0F : low >> 4) | (((qh[l] >> (2 * part)) & 3) << 4));
}

#ifdef KILN_AVX512
/* A block's codes as bytes in the weights' order, c[r] for weights 64r..64r+63, and its scales as int32
   lanes, s[r]: sub-block 4r + i for lanes 4i..4i+3; sc16 every scale once. */
static inline void q6k_unpack(const uint8_t *blk, __m512i *c, __m512i *s, __m512i *sc16) {
    const __m512i low = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x30);
    for (int h = 0; h < 2; h++) {
        const __m512i l = _mm512_loadu_si512(blk + 64 * h);
        const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
        const __m512i qz = _mm512_inserti64x4(_mm512_castsi256_si512(q), _mm256_srli_epi16(q, 2), 1);
        c[2 * h] = _mm512_or_si512(_mm512_and_si512(l, low), _mm512_and_si512(_mm512_slli_epi16(qz, 4), two));
        c[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(l, 4), low), _mm512_and_si512(qz, two));
    }
    *sc16 = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192)));
    for (int r = 0; r < 4; r++)
        s[r] = _mm512_permutexvar_epi32(_mm512_set_epi32(4 * r + 3, 4 * r + 3, 4 * r + 3, 4 * r + 3, 4 * r + 2,
                                                         4 * r + 2, 4 * r + 2, 4 * r + 2, 4 * r + 1, 4 * r + 1,
                                                         4 * r + 1, 4 * r + 1, 4 * r, 4 * r, 4 * r, 4 * r), *sc16);
}

static inline void q6k_step(const __m512i *c, const __m512i *s, __m512i sc16, float d, const int8_t *hi,
                            const int8_t *lo, float xs, const int32_t *xsum, __m512 *acc, __m512 *macc) {
    __m512i v[4];
    for (int r = 0; r < 4; r++)
        v[r] = _mm512_mullo_epi32(_mm512_add_epi32(_mm512_slli_epi32(dot_u8s8(c[r], hi + 64 * r), 8),
                                                   dot_u8s8(c[r], lo + 64 * r)), s[r]);
    const __m512 dx = _mm512_set1_ps(d * xs);
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(v[0], v[1])), dx, *acc);
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(v[2], v[3])), dx, *acc);
    const __m512i offs = _mm512_mullo_epi32(sc16, _mm512_loadu_si512(xsum));
    *macc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(offs), _mm512_set1_ps(32.f * d * xs), *macc);
}
#endif

/* x (M, K) -> y (M, N), M <= 16, as kiln_gemv_q4k. */
void kiln_gemv_q6k(const uint8_t *blocks, const float *x, const float *bias, float *y, int64_t n_rows,
                   int64_t k_len, int64_t m_rows, int threads) {
    const int64_t nb = k_len / 256, ns = k_len / 16;
    x_planes r = x_planes_make(x, m_rows, k_len, 256, 16, NULL);
    const int16_t *xq = r.xq;
    const int8_t *hi = r.hi, *lo = r.lo;
    const float *xs = r.xs;
    const int32_t *xsum = r.xsum;
    (void)xq, (void)hi, (void)lo;  /* the vector steps read hi / lo, the scalar ones xq */
    #pragma omp parallel for schedule(guided, 16) num_threads(threads)
    for (int64_t n = 0; n < n_rows; n++) {
        const uint8_t *row = blocks + n * nb * Q6K_BYTES;
#ifdef KILN_AVX512
        __m512i c[4], s[4], sc16;
        if (m_rows == 1) {  /* accumulators in registers, as kiln_gemv_q4k's one row */
            __m512 acc = _mm512_setzero_ps(), macc = _mm512_setzero_ps();
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + b * Q6K_BYTES;
                kq_prefetch(blk, Q6K_BYTES);
                q6k_unpack(blk, c, s, &sc16);
                q6k_step(c, s, sc16, f16_at(blk + 208), hi + 256 * b, lo + 256 * b, xs[b], xsum + 16 * b, &acc, &macc);
            }
            const float v = _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(macc);
            y[n] = bias ? v + bias[n] : v;
            continue;
        }
        __m512 acc[16], macc[16];
        for (int64_t m = 0; m < m_rows; m++) {
            acc[m] = _mm512_setzero_ps();
            macc[m] = _mm512_setzero_ps();
        }
        for (int64_t b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * Q6K_BYTES;
            kq_prefetch(blk, Q6K_BYTES);
            const float d = f16_at(blk + 208);
            q6k_unpack(blk, c, s, &sc16);
            for (int64_t m = 0; m < m_rows; m++)
                q6k_step(c, s, sc16, d, hi + m * k_len + 256 * b, lo + m * k_len + 256 * b, xs[m * nb + b],
                         xsum + m * ns + 16 * b, &acc[m], &macc[m]);
        }
        for (int64_t m = 0; m < m_rows; m++) {
            const float v = _mm512_reduce_add_ps(acc[m]) - _mm512_reduce_add_ps(macc[m]);
            y[m * n_rows + n] = bias ? v + bias[n] : v;
        }
#else
        for (int64_t m = 0; m < m_rows; m++) {
            const int16_t *xm = xq + m * k_len;
            float v = 0.f, offs = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *blk = row + b * Q6K_BYTES;
                const float d = f16_at(blk + 208);
                int32_t t = 0, o = 0;
                for (int w = 0; w < 256; w++)
                    t += (int32_t)((const int8_t *)blk)[192 + w / 16] * q6k_code(blk, w) * xm[256 * b + w];
                for (int j = 0; j < 16; j++)
                    o += (int32_t)((const int8_t *)blk)[192 + j] * xsum[m * ns + 16 * b + j];
                v += d * xs[m * nb + b] * (float)t;
                offs += 32.f * d * xs[m * nb + b] * (float)o;
            }
            y[m * n_rows + n] = bias ? (v - offs) + bias[n] : v - offs;
        }
#endif
    }
    x_planes_free(&r);
}

/* Q6_K blocks dequantized to fp32, w = (d * sc_s) * (q - 32), rounded as kquants.dequantize_q6_k; each half
   of a block in four runs of 32 (the layout above) that the compiler vectorizes. out: float32, or bfloat16 where
   bf16 (dequant_rows: each row's fp32 weights rounded). */
typedef struct { const uint8_t *blocks; int64_t nb; } k_rows;  /* a K-quant tensor's rows: nb blocks a row */

static void q6k_row(const void *ctx, int64_t n, float *out) {
    const k_rows *a = (const k_rows *)ctx;
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *blk = a->blocks + (n * a->nb + b) * Q6K_BYTES;
        const int8_t *sc = (const int8_t *)(blk + 192);
        const float d = f16_at(blk + 208);
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
            float *o = out + b * 256 + 128 * h;
            for (int half = 0; half < 2; half++) {  /* l in 0..15, then 16..31: one scale each */
                const float d0 = d * (float)sc[8 * h + half], d1 = d * (float)sc[8 * h + half + 2];
                const float d2 = d * (float)sc[8 * h + half + 4], d3 = d * (float)sc[8 * h + half + 6];
                #pragma omp simd
                for (int l = 16 * half; l < 16 * half + 16; l++) {
                    o[l] = d0 * (float)(((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32);
                    o[l + 32] = d1 * (float)(((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32);
                    o[l + 64] = d2 * (float)(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
                    o[l + 96] = d3 * (float)(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
                }
            }
        }
    }
}

void kiln_dequant_q6k(const uint8_t *blocks, void *out, int bf16, int64_t n_rows, int64_t k_len, int threads) {
    const k_rows a = {blocks, k_len / 256};
    dequant_rows(q6k_row, &a, out, bf16, n_rows, k_len, threads);
}

/* The same blocks dequantized to fp32 (out (N, K); bfloat16 where bf16, rounded from those), w = (d * sc_j) * q -
   dmin * m_j rounded as kquants.dequantize_q4_k rounds it (two products, then the difference: no fused
   multiply-add). */
__attribute__((optimize("fp-contract=off")))
static void q4k_row(const void *ctx, int64_t n, float *out) {
    const k_rows *a = (const k_rows *)ctx;
    for (int64_t b = 0; b < a->nb; b++) {
        const uint8_t *blk = a->blocks + (n * a->nb + b) * Q4K_BYTES;
        float d, dmin;
        uint8_t sm[16], *sc = sm, *mn = sm + 8;
        q4k_header(blk, &d, &dmin, sm);
        float *o = out + b * 256;
        for (int c = 0; c < 4; c++) {
            const float dl0 = d * (float)sc[2 * c], ml0 = dmin * (float)mn[2 * c];
            const float dl1 = d * (float)sc[2 * c + 1], ml1 = dmin * (float)mn[2 * c + 1];
            const uint8_t *qs = blk + 16 + 32 * c;
            #pragma omp simd
            for (int k = 0; k < 32; k++) {
                const float lo = dl0 * (float)(qs[k] & 0x0F), hi = dl1 * (float)(qs[k] >> 4);
                o[64 * c + k] = lo - ml0;
                o[64 * c + 32 + k] = hi - ml1;
            }
        }
    }
}

void kiln_dequant_q4k(const uint8_t *blocks, void *out, int bf16, int64_t n_rows, int64_t k_len, int threads) {
    const k_rows a = {blocks, k_len / 256};
    dequant_rows(q4k_row, &a, out, bf16, n_rows, k_len, threads);
}

/* ------------------------------------------------------------------ RMSNorm
   x, residual (NULL: none), h (written when residual is given), y: (E,); w (E,). */

static float inv_rms(const float *x, int64_t e, float eps) {
    float ss = 0.f;
    #pragma omp simd reduction(+:ss)
    for (int64_t i = 0; i < e; i++)
        ss += x[i] * x[i];
    return 1.f / sqrtf(ss / (float)e + eps);
}

void kiln_rms_norm(const float *x, const float *residual, const float *w, float eps, float offset,
                   float *y, float *h, int64_t e) {
    if (residual) {
        for (int64_t i = 0; i < e; i++)
            h[i] = x[i] + residual[i];
        x = h;
    }
    float r = inv_rms(x, e, eps);
    for (int64_t i = 0; i < e; i++)
        y[i] = x[i] * r * (offset + w[i]);
}

/* ------------------------------------------------------------------ decode attention
   q (H, D) in, qr (H, D) scratch for the rotated q, k/v (KH, D) the new token's keys and values (k is
   rotated into the cache, not in place); k_cache/v_cache: element [g, s, d] at g * head_stride +
   s * D + d; out (H, D). RoPE: pairs (i, i + R/2) for i < R/2 = n_freq, cos/sin of pos * inv_freq[i]
   times attn_factor; dims past R kept. Norms (qn_w, kn_w non-NULL): per head, before RoPE. */

static void rope_head(const float *x, float *o, const float *nw, float eps, float offset, int64_t d,
                      const float *cs, const float *sn, int64_t half) {
    float buf[1024];  /* head dims: native.py only sends d <= 1024 */
    if (nw) {
        float r = inv_rms(x, d, eps);
        for (int64_t i = 0; i < d; i++)
            buf[i] = x[i] * r * (offset + nw[i]);
        x = buf;
    }
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        o[i] = a * cs[i] - b * sn[i];
        o[i + half] = b * cs[i] + a * sn[i];
    }
    for (int64_t i = 2 * half; i < d; i++)
        o[i] = x[i];
}

/* p (n,) -> exp(p - max p) / sum, in place: the exponentials 16 lanes at a time where AVX-512 is built
   (exp512: 2^k * e^r with |r| <= ln2 / 2, Cephes' polynomial, within 2 ulp of expf), expf otherwise. */
#ifdef KILN_AVX512
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.f));  /* below: 0 after scalef, as expf gives */
    const __m512 k = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(k, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(y, k);
}
#endif

static void softmax_exp(float *p, int64_t n) {
    float mx = -INFINITY, sum = 0.f;
    for (int64_t s = 0; s < n; s++)
        mx = p[s] > mx ? p[s] : mx;
    int64_t s = 0;
#ifdef KILN_AVX512
    __m512 acc = _mm512_setzero_ps();
    for (; s + 16 <= n; s += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(p + s), _mm512_set1_ps(mx)));
        _mm512_storeu_ps(p + s, e);
        acc = _mm512_add_ps(acc, e);
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; s < n; s++) {
        p[s] = expf(p[s] - mx);
        sum += p[s];
    }
    const float inv = 1.f / sum;
    for (s = 0; s < n; s++)
        p[s] *= inv;
}

/* Caches not in float32 (kiln_kv): each side's rows in f16, bf16, q8_0 or q4_0 (kv_types), in the float
   cache's layout: element [g, s, i] at e = g * head_stride + s * D + i (q4_0's byte at e / 2: element j of a
   32-block in the low nibble of its byte j, element j + 16 in the high one; a block type's f16 scale at e / 32),
   each side possibly stored in a rotated basis (kv_types.Basis): a key row is k (after RoPE) less koff[g], times
   krot; a value row v times vrot; the query is rotated as the keys and each head's output back as the values
   (vrot^T). NULL: no rotation, no offset. */
static inline uint16_t f32_to_f16(float f) {  /* to nearest, ties to even, as torch's .half() */
#ifdef __F16C__
    return _cvtss_sh(f, 0);
#else
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t sign = (u >> 16) & 0x8000, a = u & 0x7FFFFFFFu;
    if (a >= 0x7F800000u)
        return (uint16_t)(sign | 0x7C00 | (a > 0x7F800000u ? 0x200 : 0));  /* inf, nan */
    if (a >= 0x477FF000u)
        return (uint16_t)(sign | 0x7C00);  /* rounds past 65504: inf */
    if (a < 0x38800000u) {  /* below 2^-14: a subnormal (or zero) of 2^-24 steps */
        float m;
        memcpy(&m, &a, sizeof m);
        return (uint16_t)(sign | (uint16_t)nearbyintf(m * 16777216.f));
    }
    const uint32_t r = a + 0xFFF + ((a >> 13) & 1);  /* round the 13 dropped bits, ties to even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
#endif
}

/* y = x @ m, or x @ m^T (t), for one (d,) row and a (d, d) matrix; both forms walk m's rows (vectorized) */
static void matvec(const float *x, const float *m, float *y, int64_t d, int t) {
    if (t) {
        for (int64_t i = 0; i < d; i++) {
            float acc = 0.f;
            #pragma omp simd reduction(+:acc)
            for (int64_t j = 0; j < d; j++)
                acc += x[j] * m[i * d + j];
            y[i] = acc;
        }
        return;
    }
    memset(y, 0, (size_t)d * sizeof(float));
    for (int64_t j = 0; j < d; j++) {
        const float xj = x[j];
        #pragma omp simd
        for (int64_t i = 0; i < d; i++)
            y[i] += xj * m[j * d + i];
    }
}

/* x (d,) into q8_0 codes (d,) and d / 32 f16 scales, as kv_types.quantize_q8_0 (amax / 127, round to nearest
   even) */
static void quantize_q8_0_row(const float *x, int8_t *q, uint16_t *sc, int64_t d) {
    for (int64_t b = 0; b < d / 32; b++) {
        const float *xb = x + b * 32;
        float amax = 0.f;
        for (int j = 0; j < 32; j++)
            amax = fmaxf(amax, fabsf(xb[j]));
        const float dd = amax / 127.f, div = dd == 0.f ? 1.f : dd;
        for (int j = 0; j < 32; j++) {
            float r = nearbyintf(xb[j] / div);
            q[b * 32 + j] = (int8_t)(r > 127.f ? 127.f : r < -127.f ? -127.f : r);
        }
        sc[b] = f32_to_f16(dd);
    }
}

/* x (d,) into q4_0 bytes (d / 2,) and d / 32 f16 scales, as kv_types.quantize_q4_0 (scale: the first element
   of largest magnitude, with its sign, over -8; codes floor(x / scale + 8.5) within 0..15) */
static void quantize_q4_0_row(const float *x, uint8_t *q, uint16_t *sc, int64_t d) {
    for (int64_t b = 0; b < d / 32; b++) {
        const float *xb = x + b * 32;
        float mx = 0.f;
        for (int j = 0; j < 32; j++)
            mx = fabsf(xb[j]) > fabsf(mx) ? xb[j] : mx;
        const float dd = mx / -8.f, div = dd == 0.f ? 1.f : dd;
        uint8_t c[32];
        for (int j = 0; j < 32; j++) {
            float y = xb[j] / div + 8.5f;
            y = y < 0.f ? 0.f : y > 15.99f ? 15.99f : y;
            c[j] = (uint8_t)y > 15 ? 15 : (uint8_t)y;
        }
        for (int j = 0; j < 16; j++)
            q[b * 16 + j] = (uint8_t)(c[j] | (c[j + 16] << 4));
        sc[b] = f32_to_f16(dd);
    }
}

/* The new row of one kv head (a RoPE'd key or a value): less off, into the side's basis (rot), stored as its
   type at element e of the float layout */
static void put_row(const float *x, const float *off, const float *rot, int64_t kind, void *c, uint16_t *sc,
                    int64_t e, int64_t d) {
    float t[1024], y[1024];
    for (int64_t i = 0; i < d; i++)
        t[i] = off ? x[i] - off[i] : x[i];
    if (rot)
        matvec(t, rot, y, d, 0);
    const float *r = rot ? y : t;
    if (kind == KV_Q4_0)
        quantize_q4_0_row(r, (uint8_t *)c + e / 2, sc + e / 32, d);
    else if (kind == KV_Q8_0)
        quantize_q8_0_row(r, (int8_t *)c + e, sc + e / 32, d);
    else if (kind == KV_F16 || kind == KV_BF16)
        for (int64_t i = 0; i < d; i++)
            ((uint16_t *)c)[e + i] = kind == KV_F16 ? f32_to_f16(r[i]) : f32_to_bf16(r[i]);
    else
        memcpy((float *)c + e, r, (size_t)d * sizeof(float));
}

/* The stored row at element e back to floats (d,): float32's in place, any other type decoded into buf */
static const float *get_row(int64_t kind, const void *c, const uint16_t *sc, int64_t e, int64_t d, float *buf) {
    if (kind == KV_F32)
        return (const float *)c + e;
    if (kind == KV_Q8_0 || kind == KV_Q4_0) {
        for (int64_t b = 0; b < d / 32; b++) {
            const float f = f16_to_f32(sc[e / 32 + b]);
            float *xb = buf + b * 32;
            if (kind == KV_Q8_0) {
                const int8_t *qb = (const int8_t *)c + e + b * 32;
                #pragma omp simd
                for (int j = 0; j < 32; j++)
                    xb[j] = f * (float)qb[j];
            } else {
                const uint8_t *qb = (const uint8_t *)c + e / 2 + b * 16;
                #pragma omp simd
                for (int j = 0; j < 16; j++) {
                    xb[j] = f * (float)((qb[j] & 15) - 8);
                    xb[16 + j] = f * (float)((qb[j] >> 4) - 8);
                }
            }
        }
        return buf;
    }
    const uint16_t *h = (const uint16_t *)c + e;
    int64_t i = 0;
    if (kind == KV_BF16) {
        #pragma omp simd
        for (i = 0; i < d; i++)
            buf[i] = bf16_to_f32(h[i]);
        return buf;
    }
#ifdef __F16C__
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(buf + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
#endif
    for (; i < d; i++)
        buf[i] = f16_to_f32(h[i]);
    return buf;
}

void kiln_decode_attention(const float *q, float *qr, const float *k, const float *v, void *k_cache,
                           void *v_cache, int64_t head_stride, int64_t pos, int64_t n_heads,
                           int64_t n_kv, int64_t d, const float *inv_freq, int64_t half, float attn_factor,
                           const float *qn_w, const float *kn_w, float eps, float offset, float scale,
                           int64_t slot, int64_t lo, int64_t n_keys, float *out, int threads,
                           const kiln_kv *kv) {
    static const kiln_kv plain = {NULL, NULL, NULL, NULL, NULL, KV_F32, KV_F32};
    kv = kv ? kv : &plain;
    float cs[512], sn[512];  /* half <= 512 (native.py checks) */
    for (int64_t i = 0; i < half; i++) {
        float f = (float)pos * inv_freq[i];
        cs[i] = cosf(f) * attn_factor;
        sn[i] = sinf(f) * attn_factor;
    }
    for (int64_t g = 0; g < n_kv; g++) {  /* RoPE into a row of scratch, then the side's basis and type */
        float kr[1024];
        const int64_t e = g * head_stride + slot * d;
        rope_head(k + g * d, kr, kn_w, eps, offset, d, cs, sn, half);
        put_row(kr, kv->koff ? kv->koff + g * d : NULL, kv->krot, kv->kt, k_cache, kv->ks, e, d);
        put_row(v + g * d, NULL, kv->vrot, kv->vt, v_cache, kv->vs, e, d);
    }
    /* One work item: a kv head and a share of its query heads, so that each key and value row is read (and
       decoded) once for all of them (the cache streams from memory once a step); a kv head's heads split
       further where there are fewer kv heads than threads. */
    const int64_t group = n_heads / n_kv;
    int64_t split = threads > n_kv ? (threads + n_kv - 1) / n_kv : 1;
    split = split > group ? group : split;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < n_kv * split; item++) {
        const int64_t g = item / split, part = item % split;
        const int64_t h0 = g * group + part * group / split, nh = g * group + (part + 1) * group / split - h0;
        const int64_t base = g * head_stride + lo * d;  /* this kv head's first attended row */
        float *p = malloc((size_t)(nh * n_keys) * sizeof(float));
        for (int64_t j = 0; j < nh; j++) {
            float *qh = qr + (h0 + j) * d;
            rope_head(q + (h0 + j) * d, qh, qn_w, eps, offset, d, cs, sn, half);
            if (kv->krot) {  /* the query into the keys' basis */
                float t[1024];
                memcpy(t, qh, (size_t)d * sizeof(float));
                matvec(t, kv->krot, qh, d, 0);
            }
            memset(out + (h0 + j) * d, 0, (size_t)d * sizeof(float));
        }
        float row[1024];  /* a stored row in floats: decoded once for all nh heads */
        for (int64_t s = 0; s < n_keys; s++) {
            const float *kr = get_row(kv->kt, k_cache, kv->ks, base + s * d, d, row);
            for (int64_t j = 0; j < nh; j++) {
                const float *qh = qr + (h0 + j) * d;
                float dot = 0.f;
                #pragma omp simd reduction(+:dot)
                for (int64_t i = 0; i < d; i++)
                    dot += qh[i] * kr[i];
                p[j * n_keys + s] = dot * scale;
            }
        }
        for (int64_t j = 0; j < nh; j++)
            softmax_exp(p + j * n_keys, n_keys);
        for (int64_t s = 0; s < n_keys; s++) {
            const float *vr = get_row(kv->vt, v_cache, kv->vs, base + s * d, d, row);
            for (int64_t j = 0; j < nh; j++) {
                float *oh = out + (h0 + j) * d;
                const float e = p[j * n_keys + s];
                #pragma omp simd
                for (int64_t i = 0; i < d; i++)
                    oh[i] += e * vr[i];
            }
        }
        if (kv->vrot)  /* each head's output back from the values' basis */
            for (int64_t j = 0; j < nh; j++) {
                float t[1024];
                memcpy(t, out + (h0 + j) * d, (size_t)d * sizeof(float));
                matvec(t, kv->vrot, out + (h0 + j) * d, d, 1);
            }
        free(p);
    }
}
