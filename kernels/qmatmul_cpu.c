/* Weight-only quantized matmuls for CPU decoding, in llama.cpp's block formats (AVX2 + FMA + F16C).

   y (M, N) fp32 = x (M, K) fp32 @ W.T, W (N, K) stored in blocks of 32 input columns:
   - Q4_1: 16 bytes of 4-bit codes q in [0, 15] and fp16 (d, m) per block: w = q * d + m.
     Byte j of a block holds code j in its low nibble and code j + 16 in its high nibble.
   - Q8_0: 32 int8 codes q and an fp16 d per block: w = q * d.
   x is first quantized per block of 32 to int8 (Q8_1: xq = round(x / dx), dx = max |x| / 127,
   and sx = dx * sum(xq)), as llama.cpp does, so one block's dot product is integer work:
     Q4_1:  sum_i w_i x_i ~= d * dx * sum(q_i xq_i) + m * sx
     Q8_0:  sum_i w_i x_i ~= d * dx * sum(q_i xq_i)
   Rows of W are split across OpenMP threads (the process's OpenMP runtime: linked against the
   libgomp torch loaded, so torch.set_num_threads sets ours too). For each row, all M inputs are
   read while the row's blocks are in L1, so W is streamed from memory once per call whatever M.
   The Python side (qmatmul_cpu.py) builds this file, checks the CPU, and holds the reference. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define QK 32

/* x (M, K) -> xq (M, K) int8, dx (M, K/32), sx (M, K/32). */
static void quantize_x(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *sx) {
    const int64_t G = K / QK;
    for (int64_t r = 0; r < M * G; r++) {
        const float *v = x + r * QK;
        __m256 amax = _mm256_setzero_ps();
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int j = 0; j < QK; j += 8) amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, _mm256_loadu_ps(v + j)));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float d = _mm_cvtss_f32(m4) / 127.0f;
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK; j++) {
            int q = (int)nearbyintf(v[j] * id);
            q = q > 127 ? 127 : (q < -127 ? -127 : q);
            xq[r * QK + j] = (int8_t)q;
            sum += q;
        }
        dx[r] = d;
        sx[r] = d * (float)sum;
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* The integer dot product of one block as eight fp32 lanes of partial sums. maddubs adds pairs of
   u8 * s8 products into int16 with saturation; u <= 15 (Q4_1) or |w| <= 127 (Q8_0, codes clamped
   to +-127) and |s| <= 127 keep every pair within 2 * 127 * 127 = 32258 < 32767. */
static inline __m256 dot_u8s8(__m256i u, __m256i s) {
    const __m256i p16 = _mm256_maddubs_epi16(u, s);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* x (M, K) quantized into fresh scratch: xq (M, K) int8, then dx and sx (M, K/32) fp32 each, in
   one allocation the caller frees (through xq). NULL: no memory. */
static int8_t *quantized_x(const float *x, int64_t M, int64_t K, float **dx, float **sx) {
    const int64_t G = K / QK;
    char *buf = malloc((size_t)(M * K + 2 * M * G * (int64_t)sizeof(float)));
    if (buf == NULL) return NULL;
    *dx = (float *)(buf + M * K);  /* K is a multiple of 32, so this stays 4-byte aligned */
    *sx = *dx + M * G;
    quantize_x(x, M, K, (int8_t *)buf, *dx, *sx);
    return (int8_t *)buf;
}

/* One Q4_1 block's 32 codes as bytes in column order (low nibbles: codes 0..15, high: 16..31). */
static inline __m256i q4_codes(const uint8_t *block, __m256i low4) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)block);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low4);
}

static inline __m256i load_x(const int8_t *a) { return _mm256_loadu_si256((const __m256i *)a); }

/* s8 * s8: maddubs needs an unsigned side, so |w| times x with w's sign (ggml's trick). */
static inline __m256 dot_s8s8(__m256i w, __m256i x) { return dot_u8s8(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w)); }

/* qs (N, K/2) uint8, dm (N, K/32, 2) fp16 [d, m]. Returns 0, or -1 when out of memory. */
int q4_1_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *dm, int64_t N, float *y) {
    const int64_t G = K / QK;
    float *dx, *sx;
    int8_t *xq = quantized_x(x, M, K, &dx, &sx);
    if (xq == NULL) return -1;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wq = qs + n * (K / 2);
        const uint16_t *wdm = dm + n * G * 2;
        int64_t i = 0;
        /* Four input rows at a time (prefill): each block's codes and scales are unpacked once. */
        for (; i + 4 <= M; i += 4) {
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
            float acc_m[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t g = 0; g < G; g++) {
                const __m256i codes = q4_codes(wq + g * 16, low4);
                const float d = half_to_float(wdm[2 * g]), m = half_to_float(wdm[2 * g + 1]);
                for (int r = 0; r < 4; r++) {  /* unrolled by the compiler: acc stays in registers */
                    const int64_t row = i + r;
                    acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[row * G + g]),
                                             dot_u8s8(codes, load_x(xq + row * K + g * QK)), acc[r]);
                    acc_m[r] += m * sx[row * G + g];
                }
            }
            for (int r = 0; r < 4; r++) y[(i + r) * N + n] = hsum(acc[r]) + acc_m[r];
        }
        for (; i < M; i++) {
            const int8_t *a = xq + i * K;
            const float *adx = dx + i * G, *asx = sx + i * G;
            /* Two blocks per step into two accumulators: consecutive FMAs do not wait on each other. */
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            float acc_m = 0.0f;
            int64_t g = 0;
            for (; g + 1 < G; g += 2) {
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wdm[2 * g]) * adx[g]),
                                       dot_u8s8(q4_codes(wq + g * 16, low4), load_x(a + g * QK)), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wdm[2 * g + 2]) * adx[g + 1]),
                                       dot_u8s8(q4_codes(wq + g * 16 + 16, low4), load_x(a + g * QK + QK)), acc1);
                acc_m += half_to_float(wdm[2 * g + 1]) * asx[g] + half_to_float(wdm[2 * g + 3]) * asx[g + 1];
            }
            if (g < G) {  /* odd block count */
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wdm[2 * g]) * adx[g]),
                                       dot_u8s8(q4_codes(wq + g * 16, low4), load_x(a + g * QK)), acc0);
                acc_m += half_to_float(wdm[2 * g + 1]) * asx[g];
            }
            y[i * N + n] = hsum(_mm256_add_ps(acc0, acc1)) + acc_m;
        }
    }
    free(xq);
    return 0;
}

/* qs (N, K) int8, d (N, K/32) fp16. Returns 0, or -1 when out of memory. */
int q8_0_matmul(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d, int64_t N, float *y) {
    const int64_t G = K / QK;
    float *dx, *sx;
    int8_t *xq = quantized_x(x, M, K, &dx, &sx);
    if (xq == NULL) return -1;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wq = qs + n * K;
        const uint16_t *wd = d + n * G;
        for (int64_t i = 0; i < M; i++) {
            const int8_t *a = xq + i * K;
            const float *adx = dx + i * G;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  /* as in q4_1_matmul */
            int64_t g = 0;
            for (; g + 1 < G; g += 2) {
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wd[g]) * adx[g]),
                                       dot_s8s8(load_x(wq + g * QK), load_x(a + g * QK)), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wd[g + 1]) * adx[g + 1]),
                                       dot_s8s8(load_x(wq + g * QK + QK), load_x(a + g * QK + QK)), acc1);
            }
            if (g < G)
                acc0 = _mm256_fmadd_ps(_mm256_set1_ps(half_to_float(wd[g]) * adx[g]),
                                       dot_s8s8(load_x(wq + g * QK), load_x(a + g * QK)), acc0);
            y[i * N + n] = hsum(_mm256_add_ps(acc0, acc1));
        }
    }
    free(xq);
    return 0;
}

/* ---- Dequantization, for many input rows at once (prefill) ----------------------------------

   The matmuls above quantize x and stream W once per call, so their cost grows with M at the
   rate of the integer dot products (~4x fewer products per cycle than an fp32 GEMM's blocked
   FMAs on AVX2). From a few dozen rows on, writing W out in fp32 (N x K x 4 bytes, once) and
   handing it to the BLAS GEMM is faster: the Python side picks by M (`PREFILL_ROWS`).
   w (N, K) fp32 out. */
void q4_1_dequantize(const uint8_t *qs, const uint16_t *dm, int64_t N, int64_t K, float *w) {
    const int64_t G = K / QK;
    const __m256i low4 = _mm256_set1_epi8(0x0F);
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            const __m256i codes = q4_codes(qs + n * (K / 2) + g * 16, low4);
            const __m256 d = _mm256_set1_ps(half_to_float(dm[(n * G + g) * 2]));
            const __m256 m = _mm256_set1_ps(half_to_float(dm[(n * G + g) * 2 + 1]));
            float *out = w + n * K + g * QK;
            const __m128i lo = _mm256_castsi256_si128(codes), hi = _mm256_extracti128_si256(codes, 1);
            const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(out + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[j])), d, m));
        }
    }
}

void q8_0_dequantize(const int8_t *qs, const uint16_t *d, int64_t N, int64_t K, float *w) {
    const int64_t G = K / QK;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        for (int64_t g = 0; g < G; g++) {
            const __m256 s = _mm256_set1_ps(half_to_float(d[n * G + g]));
            const int8_t *in = qs + n * K + g * QK;
            float *out = w + n * K + g * QK;
            for (int j = 0; j < 4; j++)
                _mm256_storeu_ps(out + 8 * j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(in + 8 * j)))), s));
        }
    }
}

/* ---- One decoder layer of a Llama at one new position, on Q4_1 projections -----------------

   The eager PyTorch decode step spends as long in its ~25 small ops per layer (norms, RoPE, cache
   writes, single-query attention, SiLU, residuals: a few microseconds of dispatch each) as in the
   matmuls; this does the whole layer in one call, in the same order and fp32 arithmetic as
   memlm.model.llama.Block (the tests hold it to that module path):
     h = rms_norm(x) * attn_norm;  [q; k; v] = wqkv h;  q, k rotated (half-split RoPE, sin's first
     half negated: out = v * cos + roll(v, hd/2) * sin);  k, v written at `pos` in the layer's
     cache (KV, S_max, hd);  per query head, softmax(q . k_l / sqrt(hd)) over l in [0, pos] times
     v_l (GQA: head h reads KV head h / (H / KV));  x += wo o;
     h = rms_norm(x) * ffn_norm;  [g; u] = w13 h;  x += w2 (silu(g) * u).
   parts: 1 the attention half (to x += wo o), 2 the MLP half, 3 both (modules a memory mode
   inserts after the attention, RETRO's cross-attention, run between two calls).
   x (D,) is updated in place. Returns 0, or -1 when out of memory. */
static void rms_norm(const float *x, const float *w, int64_t D, float eps, float *out) {
    double ss = 0.0;
    for (int64_t i = 0; i < D; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / D) + eps);
    for (int64_t i = 0; i < D; i++) out[i] = x[i] * r * w[i];
}

/* hd is a multiple of 8 (checked by the caller). */
static inline float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    return hsum(acc);
}

static inline void axpy_f32(float a, const float *x, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    for (int64_t i = 0; i < n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
}

static void rope(float *v, const float *cos, const float *sin, int64_t hd) {
    float tmp[hd];
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < hd; i++) tmp[i] = v[i] * cos[i] + v[(i + half) % hd] * sin[i];
    for (int64_t i = 0; i < hd; i++) v[i] = tmp[i];
}

/* Single-query attention of one sequence's new position: per query head h (of q (H, hd)), softmax
   of q . k_l / sqrt(hd) over the L cached positions of KV head h / (H / KV) times v_l, into
   out (H, hd). Caches (KV, S, hd); scores (H, L) scratch. */
static void attend(const float *q_heads, const float *k_cache, const float *v_cache, int64_t S, int64_t L, int64_t H,
                   int64_t KV, int64_t hd, float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t group = H / KV;
#pragma omp parallel for schedule(static) if (H * L * hd >= (1 << 16))
    for (int64_t hh = 0; hh < H; hh++) {
        const float *q = q_heads + hh * hd, *kc = k_cache + (hh / group) * S * hd, *vc = v_cache + (hh / group) * S * hd;
        float *s = scores + hh * L, *o = out + hh * hd;
        float m = -INFINITY;
        for (int64_t l = 0; l < L; l++) {
            s[l] = dot_f32(q, kc + l * hd, hd) * scale;
            m = s[l] > m ? s[l] : m;
        }
        float sum = 0.0f;
        for (int64_t l = 0; l < L; l++) { s[l] = expf(s[l] - m); sum += s[l]; }
        for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
        for (int64_t l = 0; l < L; l++) axpy_f32(s[l] / sum, vc + l * hd, o, hd);
    }
}

int q4_1_decode_layer(float *x, int64_t D, int64_t H, int64_t KV, int64_t hd, int64_t I, float eps,
                      const float *attn_norm, const float *ffn_norm,
                      const uint8_t *wqkv_qs, const uint16_t *wqkv_dm, const uint8_t *wo_qs, const uint16_t *wo_dm,
                      const uint8_t *w13_qs, const uint16_t *w13_dm, const uint8_t *w2_qs, const uint16_t *w2_dm,
                      const float *cos, const float *sin, float *k_cache, float *v_cache, int64_t max_seq, int64_t pos,
                      int64_t parts) {
    const int64_t Q = H * hd, KVD = KV * hd, L = pos + 1;
    float *buf = malloc(sizeof(float) * (size_t)(D + Q + 2 * KVD + Q + D + 2 * I + I + H * L));
    if (buf == NULL) return -1;
    float *h = buf, *qkv = h + D, *attn = qkv + Q + 2 * KVD, *y = attn + Q, *gu = y + D, *act = gu + 2 * I;
    float *scores = act + I;  /* (H, L) */
    int rc = 0;

    if (!(parts & 1)) goto mlp;
    rms_norm(x, attn_norm, D, eps, h);
    rc |= q4_1_matmul(h, 1, D, wqkv_qs, wqkv_dm, Q + 2 * KVD, qkv);
    for (int64_t j = 0; j < H + KV; j++) rope(qkv + j * hd, cos, sin, hd);  /* queries and keys */
    for (int64_t g = 0; g < KV; g++) {
        for (int64_t i = 0; i < hd; i++) {
            k_cache[(g * max_seq + pos) * hd + i] = qkv[Q + g * hd + i];
            v_cache[(g * max_seq + pos) * hd + i] = qkv[Q + KVD + g * hd + i];
        }
    }
    attend(qkv, k_cache, v_cache, max_seq, L, H, KV, hd, scores, attn);
    rc |= q4_1_matmul(attn, 1, Q, wo_qs, wo_dm, D, y);
    for (int64_t i = 0; i < D; i++) x[i] += y[i];

mlp:
    if (!(parts & 2)) goto done;
    rms_norm(x, ffn_norm, D, eps, h);
    rc |= q4_1_matmul(h, 1, D, w13_qs, w13_dm, 2 * I, gu);
    for (int64_t i = 0; i < I; i++) act[i] = gu[i] / (1.0f + expf(-gu[i])) * gu[I + i];
    rc |= q4_1_matmul(act, 1, I, w2_qs, w2_dm, D, y);
    for (int64_t i = 0; i < D; i++) x[i] += y[i];
done:
    free(buf);
    return rc ? -1 : 0;
}

/* ---- The same layer for B sequences, each at its own new position in its own cache ---------

   q4_1_decode_layer over B rows at once (the batch scheduler's decode step): the projections
   take the B rows in one q4_1_matmul each (its 4-row blocks share the weight's unpacking), RoPE,
   the cache write and attention run per row on that row's cache. x (B, D) is updated in place;
   cos, sin (B, hd) the rows' RoPE rows; k_caches[b], v_caches[b] (KV, max_seqs[b], hd) fp32,
   written at positions[b] and read over [0, positions[b]]. Returns 0, or -1 when out of memory. */
int q4_1_decode_layer_batch(float *x, int64_t B, int64_t D, int64_t H, int64_t KV, int64_t hd, int64_t I, float eps,
                            const float *attn_norm, const float *ffn_norm,
                            const uint8_t *wqkv_qs, const uint16_t *wqkv_dm, const uint8_t *wo_qs, const uint16_t *wo_dm,
                            const uint8_t *w13_qs, const uint16_t *w13_dm, const uint8_t *w2_qs, const uint16_t *w2_dm,
                            const float *cos, const float *sin, float *const *k_caches, float *const *v_caches,
                            const int64_t *max_seqs, const int64_t *positions) {
    const int64_t Q = H * hd, KVD = KV * hd, QKV = Q + 2 * KVD;
    int64_t L_max = 0;
    for (int64_t b = 0; b < B; b++) L_max = positions[b] + 1 > L_max ? positions[b] + 1 : L_max;
    float *buf = malloc(sizeof(float) * (size_t)(B * (D + QKV + Q + D + 2 * I + I) + H * L_max));
    if (buf == NULL) return -1;
    float *h = buf, *qkv = h + B * D, *attn = qkv + B * QKV, *y = attn + B * Q, *gu = y + B * D, *act = gu + B * 2 * I;
    float *scores = act + B * I;  /* (H, L_max), reused row by row */
    int rc = 0;

    for (int64_t b = 0; b < B; b++) rms_norm(x + b * D, attn_norm, D, eps, h + b * D);
    rc |= q4_1_matmul(h, B, D, wqkv_qs, wqkv_dm, QKV, qkv);
    for (int64_t b = 0; b < B; b++) {
        float *row = qkv + b * QKV;
        const int64_t pos = positions[b], S = max_seqs[b], L = pos + 1;
        float *k_cache = k_caches[b], *v_cache = v_caches[b];
        for (int64_t j = 0; j < H + KV; j++) rope(row + j * hd, cos + b * hd, sin + b * hd, hd);
        for (int64_t g = 0; g < KV; g++) {
            for (int64_t i = 0; i < hd; i++) {
                k_cache[(g * S + pos) * hd + i] = row[Q + g * hd + i];
                v_cache[(g * S + pos) * hd + i] = row[Q + KVD + g * hd + i];
            }
        }
        attend(row, k_cache, v_cache, S, L, H, KV, hd, scores, attn + b * Q);
    }
    rc |= q4_1_matmul(attn, B, Q, wo_qs, wo_dm, D, y);
    for (int64_t i = 0; i < B * D; i++) x[i] += y[i];

    for (int64_t b = 0; b < B; b++) rms_norm(x + b * D, ffn_norm, D, eps, h + b * D);
    rc |= q4_1_matmul(h, B, D, w13_qs, w13_dm, 2 * I, gu);
    for (int64_t b = 0; b < B; b++) {
        const float *g = gu + b * 2 * I;
        float *a = act + b * I;
        for (int64_t i = 0; i < I; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * g[I + i];
    }
    rc |= q4_1_matmul(act, B, I, w2_qs, w2_dm, D, y);
    for (int64_t i = 0; i < B * D; i++) x[i] += y[i];
    free(buf);
    return rc ? -1 : 0;
}
