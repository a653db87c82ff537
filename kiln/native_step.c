/* One CPU decode step through a whole stack of Llama-layout blocks in one call: the block loop of
   models/base.run_blocks for one token, without a return to Python between kernels.

   Owns kiln_decode_layers: for each block, in the residual-stream form models/llama.Block.forward runs,
       h = x + residual (the first block of a step without a residual: h = x);  y = rms_norm(h)
       [q | k | v] = qkv(y);  a = attention (kiln_decode_attention: q/k norms, RoPE, the cache write)
       h = h + post_attn(o(a));  y = rms_norm(h);  [gate | up] = gate_up(y);  x = post_mlp(down(act(gate) * up))
   (post_attn, post_mlp: Gemma 3's norms, else none; act silu, or Gemma's tanh gelu; each block's RoPE one of
   the step's two tables, global or local, and its cache slots as the caller found them: rings included)
   with every matmul one of the block GEMVs (kiln_gemv_q4k / _q6k in native.c, kiln_gemv_lq in
   native_legacy.c) or int8-row GEMVs (kiln_gemv_i8 / _i8g: what the compact load makes of other types) for
   the one row, each projection in up to three parts of consecutive outputs (a joined
   q/k/v whose parts came in different block types), the norms and attention the same C functions the
   block-by-block step calls; x and the residual stream come back for the final norm and the output head.
   Not: deciding which steps and models it serves (models/base.py, ops/cpu.layer_plan), which cache slots a
   token writes and reads (models/base.py), the kernels themselves.

   Its twin is the block-by-block step (the same kernels called from Python; silu(g) * u here in C where
   torch computes it there; gelu likewise), compared in tests/test_native.py. */

#include "native.h"

typedef struct {  /* y (n,) = W x (+ bias): W's n rows in blocks of GGML type qtype (regrouped: legacy), or
                     int8 rows (qtype I8_ROWS: one bf16 scale a row; I8_GROUPS: one f16 scale per `group`) */
    const void *w;
    const float *bias;    /* NULL: none */
    const uint16_t *scale; /* the int8 rows' scales */
    int64_t n, qtype, group;
} kiln_mat;

#define I8_ROWS -1
#define I8_GROUPS -2

typedef struct {  /* one block */
    const float *norm_attn, *norm_mlp;  /* (E,) the norms before attention and before the MLP */
    const float *post_attn, *post_mlp;  /* (E,) Gemma's norms of the attention's and the MLP's outputs, or NULL */
    const float *q_norm, *k_norm;       /* (D,) per-head norms, or NULL */
    kiln_mat qkv[3], o, gate_up[2], down;
    int64_t n_qkv, n_gate_up;           /* parts used */
    int64_t rope, act;                  /* the step's RoPE table (0 or 1); act 0: silu, 1: gelu (tanh) */
    float scale;                        /* of q.k */
} kiln_layer;

typedef struct {  /* what every block shares, and this step's position, RoPE tables and cache slots */
    int64_t n_layers, e, heads, kv_heads, d, inter;
    float eps, offset, qk_eps, qk_offset;
    const float *inv_freq[2];  /* (half,) RoPE frequencies of each table */
    int64_t half[2];
    float attn_factor[2];
    int64_t rows;          /* tokens in this step, one a row (a server's batched decode step: each row its
                              own sequence, position and cache slots) */
    const int64_t *pos;    /* (rows,) each row's position */
    const int64_t *where;  /* (rows, L, 12) per row and block: addresses of its k and v cache (K, S, D) in their
                              types, the head stride, the slot pos is written to, the first slot attended, how
                              many; then kiln_kv's k and v scales, k and v rotations, key offset (0: none)
                              and the types (kt + 16 * vt) */
} kiln_stack;

/* y (rows, n) = x (rows, k) W^T: the block kernels take the rows together, reading each weight once */
static void gemv(const kiln_mat *m, const float *x, float *y, int64_t k, int64_t rows, int threads) {
    if (m->qtype == I8_ROWS) {
        for (int64_t r = 0; r < rows; r++)
            kiln_gemv_i8(m->w, x + r * k, m->scale, m->bias, y + r * m->n, m->n, k, threads);
    } else if (m->qtype == I8_GROUPS)
        kiln_gemv_i8g(m->w, x, m->scale, m->group, m->bias, y, m->n, k, rows, threads);
    else if (m->qtype == 12)
        kiln_gemv_q4k(m->w, x, m->bias, y, m->n, k, rows, threads);
    else if (m->qtype == 14)
        kiln_gemv_q6k(m->w, x, m->bias, y, m->n, k, rows, threads);
    else
        kiln_gemv_lq(m->w, (int)m->qtype, x, m->bias, y, m->n, k, rows, threads);
}

/* y (rows, sum of the parts' n): the parts' outputs side by side in each row (one part: written in place) */
static void gemv_parts(const kiln_mat *m, int64_t parts, const float *x, float *y, int64_t k, int64_t rows,
                       float *tmp, int threads) {
    if (parts == 1) {
        gemv(m, x, y, k, rows, threads);
        return;
    }
    int64_t width = 0, off = 0;
    for (int64_t p = 0; p < parts; p++)
        width += m[p].n;
    for (int64_t p = 0; p < parts; off += m[p].n, p++) {
        float *out = rows == 1 ? y + off : tmp;
        gemv(&m[p], x, out, k, rows, threads);
        for (int64_t r = 0; rows > 1 && r < rows; r++)
            memcpy(y + r * width + off, tmp + r * m[p].n, (size_t)m[p].n * sizeof(float));
    }
}

/* x (rows, E): the first block's input, overwritten with the last block's MLP output; residual (rows, E): the
   stream coming in (has_residual 0: none yet), overwritten with the stream going out. */
void kiln_decode_layers(const kiln_layer *layers, const kiln_stack *s, float *x, float *residual,
                        int has_residual, int threads) {
    const int64_t e = s->e, hd = s->heads * s->d, kvd = s->kv_heads * s->d, inter = s->inter, rows = s->rows;
    const int64_t nqkv = hd + 2 * kvd, widest = 2 * inter > nqkv ? 2 * inter : nqkv;
    float *y = malloc((size_t)rows * (e + nqkv + 2 * hd + e + 3 * inter + widest) * sizeof(float));
    float *qkv = y + rows * e, *att = qkv + rows * nqkv, *qr = att + rows * hd, *o = qr + rows * hd;
    float *gu = o + rows * e, *act = gu + rows * 2 * inter, *tmp = act + rows * inter;
    for (int64_t l = 0; l < s->n_layers; l++) {
        const kiln_layer *b = &layers[l];
        const int64_t r = b->rope;
        for (int64_t i = 0; i < rows; i++) {
            float *xi = x + i * e, *ri = residual + i * e;
            if (l == 0 && !has_residual) {
                memcpy(ri, xi, (size_t)e * sizeof(float));
                kiln_rms_norm(xi, NULL, b->norm_attn, s->eps, s->offset, y + i * e, NULL, e);
            } else {
                kiln_rms_norm(xi, ri, b->norm_attn, s->eps, s->offset, y + i * e, ri, e);
            }
        }
        gemv_parts(b->qkv, b->n_qkv, y, qkv, e, rows, tmp, threads);
        for (int64_t i = 0; i < rows; i++) {
            const int64_t *at = s->where + 12 * (i * s->n_layers + l);
            float *qi = qkv + i * nqkv;
            const kiln_kv kv = {(uint16_t *)(intptr_t)at[6], (uint16_t *)(intptr_t)at[7],
                                (const float *)(intptr_t)at[8], (const float *)(intptr_t)at[9],
                                (const float *)(intptr_t)at[10], at[11] % 16, at[11] / 16};
            kiln_decode_attention(qi, qr + i * hd, qi + hd, qi + hd + kvd, (void *)(intptr_t)at[0],
                                  (void *)(intptr_t)at[1], at[2], s->pos[i], s->heads, s->kv_heads, s->d,
                                  s->inv_freq[r], s->half[r], s->attn_factor[r], b->q_norm, b->k_norm, s->qk_eps,
                                  s->qk_offset, b->scale, at[3], at[4], at[5], att + i * hd, threads,
                                  &kv);
        }
        gemv(&b->o, att, o, hd, rows, threads);
        for (int64_t i = 0; i < rows; i++) {
            float *oi = o + i * e;
            if (b->post_attn)  /* in place: the norm reads all of o before it writes */
                kiln_rms_norm(oi, NULL, b->post_attn, s->eps, s->offset, oi, NULL, e);
            kiln_rms_norm(oi, residual + i * e, b->norm_mlp, s->eps, s->offset, y + i * e, residual + i * e, e);
        }
        gemv_parts(b->gate_up, b->n_gate_up, y, gu, e, rows, tmp, threads);
        for (int64_t i = 0; i < rows; i++) {
            const float *g = gu + i * 2 * inter, *u = g + inter;
            float *a = act + i * inter;
            if (b->act == 0) {
                for (int64_t j = 0; j < inter; j++)
                    a[j] = g[j] / (1.f + expf(-g[j])) * u[j];
            } else {
                for (int64_t j = 0; j < inter; j++)
                    a[j] = 0.5f * g[j] * (1.f + tanhf(0.7978845608028654f * (g[j] + 0.044715f * g[j] * g[j] * g[j])))
                           * u[j];
            }
        }
        gemv(&b->down, act, x, inter, rows, threads);
        for (int64_t i = 0; b->post_mlp && i < rows; i++)
            kiln_rms_norm(x + i * e, NULL, b->post_mlp, s->eps, s->offset, x + i * e, NULL, e);
    }
    free(y);
}
