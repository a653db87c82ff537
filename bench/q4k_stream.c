/* Is the CPU's Q4_K GEMV bound by its instructions or by DRAM? kiln's own one-row kernel (kiln_gemv_q4k, x rounded
   to 16 bits: two dpbusd a 64-code group) against the same with x in 8 bits (one dpbusd: llama.cpp's
   Q8_K), on a 8960x1536 matrix hot in the L3 and on 72 of them (556 MB) streamed from DRAM, beside a plain AVX-512
   read of the same bytes; one and two threads. Timing only: the weights are made-up bytes.
   Build and run (repo root): gcc -O3 -march=native -fopenmp bench/q4k_stream.c -o /tmp/q4k_stream -lm && /tmp/q4k_stream */
#include "../kiln/native.c"
#include <omp.h>
#include <stdio.h>
#include <time.h>

static inline void q4k_step8(const __m512i *c, const __m512i *s, __m128i sm, float d, float dmin,
                             const int8_t *x8, float xs, const int32_t *xsum, __m512 *acc, __m256 *macc) {
    __m512i tot = _mm512_setzero_si512();
    for (int g = 0; g < 4; g++)
        tot = _mm512_add_epi32(tot, _mm512_mullo_epi32(dot_u8s8(c[g], x8 + 64 * g), s[g]));
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot), _mm512_set1_ps(d * xs), *acc);
    const __m256i mins = _mm256_mullo_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8)),
                                            _mm256_loadu_si256((const __m256i *)xsum));
    *macc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(dmin * xs), *macc);
}

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + 1e-9 * t.tv_nsec; }

/* y = W x, W (n_rows, nb * 256) Q4_K: mode 0 kiln_gemv_q4k itself (x rounded to 16 bits inside it), mode 1 the
   same blocks and unpacking with x in 8 bits (x8: codes, xs: one scale a block, xsum: sums a 32). */
static void gemv(int mode, const uint8_t *blocks, int64_t n_rows, int64_t nb, const float *x, const int8_t *x8,
                 const float *xs, const int32_t *xsum, float *y, int threads) {
    if (mode == 0) {
        kiln_gemv_q4k(blocks, x, NULL, y, n_rows, nb * 256, 1, threads);
        return;
    }
    #pragma omp parallel for schedule(guided, 16) num_threads(threads)
    for (int64_t n = 0; n < n_rows; n++) {
        __m512i c[4], s[4];
        __m512 acc = _mm512_setzero_ps();
        __m256 macc = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {  /* kiln_gemv_q4k's one-row loop, with q4k_step8 */
            const uint8_t *blk = blocks + (n * nb + b) * Q4K_BYTES;
            kq_prefetch(blk, Q4K_BYTES);
            const __m128i sm = q4k_scales_v(blk);
            q4k_unpack(blk, sm, c, s);
            q4k_step8(c, s, sm, f16_at(blk), f16_at(blk + 2), x8 + 256 * b, xs[b], xsum + 8 * b, &acc, &macc);
        }
        y[n] = q4k_finish(acc, macc);
    }
}

static uint64_t plain_read(const uint8_t *p, size_t bytes, int threads) {
    uint64_t tot = 0;
    #pragma omp parallel for schedule(static) num_threads(threads) reduction(+:tot)
    for (size_t c = 0; c < bytes / 65536; c++) {
        __m512i a = _mm512_setzero_si512(), b = _mm512_setzero_si512();
        const uint8_t *q = p + c * 65536;
        for (int o = 0; o < 65536; o += 128) {
            a = _mm512_add_epi64(a, _mm512_loadu_si512(q + o));
            b = _mm512_add_epi64(b, _mm512_loadu_si512(q + o + 64));
        }
        tot += _mm512_reduce_add_epi64(_mm512_add_epi64(a, b));
    }
    return tot;
}

int main(void) {
    const int64_t K = 1536, nb = K / 256, N = 8960, MATS = 72;
    const size_t mbytes = (size_t)N * nb * Q4K_BYTES;
    uint8_t *w = aligned_alloc(64, mbytes * MATS + 4096);
    for (size_t i = 0; i < mbytes * MATS; i++) w[i] = (uint8_t)(i * 2654435761u >> 13);
    for (size_t r = 0; r < (size_t)N * nb * MATS; r++) { w[r * Q4K_BYTES] = 0x00; w[r * Q4K_BYTES + 1] = 0x3C; w[r * Q4K_BYTES + 2] = 0x00; w[r * Q4K_BYTES + 3] = 0x38; }
    int8_t x8[1536];
    float x[1536], xs[6];
    int32_t xsum[48];
    float *y = malloc(N * 4);
    for (int i = 0; i < 1536; i++) {
        x8[i] = (int8_t)(i * 7);
        x[i] = (float)((i * 37) % 101 - 50) / 50.f;
    }
    for (int i = 0; i < 6; i++)
        xs[i] = 0.01f;
    for (int i = 0; i < 48; i++)
        xsum[i] = i;
    for (int threads = 1; threads <= 2; threads++)
        for (int round = 0; round < 3; round++) {
            double t0 = now();
            uint64_t z = plain_read(w, mbytes * MATS, threads) + plain_read(w, mbytes * MATS, threads);
            printf("threads %d plain read: %.1f GB/s (%llu)\n", threads, 2.0 * mbytes * MATS / (now() - t0) / 1e9, (unsigned long long)(z & 1));
            for (int mode = 0; mode < 2; mode++) {
                /* hot: one matrix (7.7 MB) 40 times; DRAM: 72 matrices (556 MB) once each, twice */
                gemv(mode, w, N, nb, x, x8, xs, xsum, y, threads);
                double t = now();
                for (int r = 0; r < 40; r++) gemv(mode, w, N, nb, x, x8, xs, xsum, y, threads);
                double hot = 40.0 * N * K / (now() - t) / 1e9;
                t = now();
                for (int r = 0; r < 2; r++) for (int m = 0; m < MATS; m++) gemv(mode, w + m * mbytes, N, nb, x, x8, xs, xsum, y, threads);
                double dram_s = now() - t;
                printf("threads %d mode %s: hot %.1f G weights/s, DRAM %.1f G weights/s (%.1f GB/s)\n", threads,
                       mode ? "8-bit x " : "16-bit x", hot, 2.0 * MATS * N * K / dram_s / 1e9, 2.0 * MATS * mbytes / dram_s / 1e9);
            }
        }
    return 0;
}
