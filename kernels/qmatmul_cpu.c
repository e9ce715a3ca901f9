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

/* ---- AVX-512 VNNI, chosen at run time where the CPU has it -----------------------------------

   The same products with vpdpbusd: one instruction multiplies 64 u8 x s8 pairs and adds them in
   fours into 16 int32 lanes, two blocks at once (lanes 0-7 the first block, 8-15 the second), where
   AVX2 needs maddubs + madd per block. Each block's int32 partial sums are scaled by d * dx in fp32
   (the scales of a block pair, expanded to 16 lanes: dxe per input row at quantization, d per weight
   row), as above. Q8_0's codes are signed on both sides: x is stored offset by 128 (unsigned) and
   the offset's share, 128 * sum(w), starts each accumulator negated. Every output row runs the
   same instruction sequence whatever M and wherever it falls in a block of rows, so a row's result
   does not depend on the rows beside it (a batched step equals each sequence alone). Block counts
   must be even (K a multiple of 64); other shapes take the AVX2 code. */
#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma,f16c")))
#define ROWS 8  /* input rows per pass over a weight row: their accumulators stay in registers */

static int vnni_state = -1;  /* -1 not yet asked, 0 AVX2, 1 VNNI */

/* want -1: the current choice (the CPU's best on first use); 0: AVX2; 1: VNNI where the CPU has it.
   Returns the choice now in force (1 VNNI). Not thread-safe against running matmuls: for tests and
   benchmarks, between calls. */
static int cpu_has_vnni(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")
           && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

int qmatmul_has_vnni(void) { return cpu_has_vnni(); }

int qmatmul_isa(int want) {
    if (want >= 0 || vnni_state < 0) vnni_state = want != 0 && cpu_has_vnni();
    return vnni_state;
}

/* x (M, K) -> xq (M, K) int8 (offset to uint8 when `offset`), sx (M, K/32), and the scales: dxe
   (M, K/64, 16), each block pair's dx in 8 lanes each (K a multiple of 64), or where dxe is NULL,
   dx (M, K/32). Bit for bit quantize_x's codes and scales. */
VNNI_TARGET static void quantize_x_vnni(const float *x, int64_t M, int64_t K, int8_t *xq, float *dxe, float *dx,
                                        float *sx, int offset) {
    const int64_t G = K / QK;
    const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
    const __m128i flip = _mm_set1_epi8(offset ? (char)0x80 : 0);
    for (int64_t r = 0; r < M * G; r++) {
        const float *v = x + r * QK;
        const __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
        const float d = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b))) / 127.0f;
        const __m512 id = _mm512_set1_ps(d > 0.0f ? 1.0f / d : 0.0f);
        /* cvtps rounds to nearest even under the default MXCSR, as nearbyintf does */
        const __m512i qa = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, id)), hi), lo);
        const __m512i qb = _mm512_max_epi32(_mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(b, id)), hi), lo);
        _mm_storeu_si128((__m128i *)(xq + r * QK), _mm_xor_si128(_mm512_cvtepi32_epi8(qa), flip));
        _mm_storeu_si128((__m128i *)(xq + r * QK + 16), _mm_xor_si128(_mm512_cvtepi32_epi8(qb), flip));
        if (dxe != NULL)
            _mm256_storeu_ps(dxe + (r / 2) * 16 + (r % 2) * 8, _mm256_set1_ps(d));  /* G even: pairs never span rows */
        else
            dx[r] = d;
        sx[r] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    }
}

/* a . b over n floats (Q4_1's m * sx term of one output). */
VNNI_TARGET static inline float dot_tail(const float *a, const float *b, int64_t n) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
    if (i < n) {
        const __mmask16 m = (__mmask16)((1u << (n - i)) - 1);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* The 32 + 32 codes of a Q4_1 block pair in column order: [b0 low, b0 high, b1 low, b1 high]. */
VNNI_TARGET static inline __m512i q4_pair_codes(const uint8_t *pair) {
    const __m256i packed = _mm256_loadu_si256((const __m256i *)pair);
    const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(packed), _mm256_srli_epi16(packed, 4), 1);
    return _mm512_and_si512(_mm512_shuffle_i64x2(both, both, 0xD8), _mm512_set1_epi8(0x0F));
}

VNNI_TARGET static inline __m512 pair_scale(float d0, float d1) {
    return _mm512_insertf32x8(_mm512_set1_ps(d0), _mm256_set1_ps(d1), 1);
}

/* R (a constant after inlining) input rows from row i0 against Q4_1 weight row n. */
VNNI_TARGET static inline __attribute__((always_inline)) void q4_1_rows_vnni(
        const int8_t *xq, const float *dxe, const float *sx, int64_t i0, int R, int64_t K, const uint8_t *wq,
        const uint16_t *wdm, const float *mw, int64_t n, int64_t N, float *y) {
    const int64_t G = K / QK, P = G / 2;
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
        const __m512i codes = q4_pair_codes(wq + p * 32);
        const __m512 ws = pair_scale(half_to_float(wdm[4 * p]), half_to_float(wdm[4 * p + 2]));
        for (int r = 0; r < R; r++) {
            const int64_t row = i0 + r;
            const __m512i dp = _mm512_dpbusd_epi32(_mm512_setzero_si512(), codes, _mm512_loadu_si512(xq + row * K + p * 64));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_mul_ps(ws, _mm512_loadu_ps(dxe + (row * P + p) * 16)), acc[r]);
        }
    }
    for (int r = 0; r < R; r++)
        y[(i0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]) + dot_tail(mw, sx + (i0 + r) * G, G);
}

VNNI_TARGET static int q4_1_matmul_vnni(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *dm,
                                        int64_t N, float *y) {
    const int64_t G = K / QK;
    char *buf = malloc((size_t)(M * K + (M * K / 4 + M * G) * (int64_t)sizeof(float)));
    if (buf == NULL) return -1;
    int8_t *xq = (int8_t *)buf;
    float *dxe = (float *)(buf + M * K), *sx = dxe + M * K / 4;
    quantize_x_vnni(x, M, K, xq, dxe, NULL, sx, 0);
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wq = qs + n * (K / 2);
        const uint16_t *wdm = dm + n * G * 2;
        float mw[G];
        for (int64_t g = 0; g < G; g++) mw[g] = half_to_float(wdm[2 * g + 1]);
        int64_t i = 0;
        for (; i + ROWS <= M; i += ROWS) q4_1_rows_vnni(xq, dxe, sx, i, ROWS, K, wq, wdm, mw, n, N, y);
        switch (M - i) {  /* constant row counts, so each unrolls with its accumulators in registers */
            case 7: q4_1_rows_vnni(xq, dxe, sx, i, 7, K, wq, wdm, mw, n, N, y); break;
            case 6: q4_1_rows_vnni(xq, dxe, sx, i, 6, K, wq, wdm, mw, n, N, y); break;
            case 5: q4_1_rows_vnni(xq, dxe, sx, i, 5, K, wq, wdm, mw, n, N, y); break;
            case 4: q4_1_rows_vnni(xq, dxe, sx, i, 4, K, wq, wdm, mw, n, N, y); break;
            case 3: q4_1_rows_vnni(xq, dxe, sx, i, 3, K, wq, wdm, mw, n, N, y); break;
            case 2: q4_1_rows_vnni(xq, dxe, sx, i, 2, K, wq, wdm, mw, n, N, y); break;
            case 1: q4_1_rows_vnni(xq, dxe, sx, i, 1, K, wq, wdm, mw, n, N, y); break;
            default: break;
        }
    }
    free(buf);
    return 0;
}

/* R input rows from row i0 against Q8_0 weight row wq (d: its block scales). */
VNNI_TARGET static inline __attribute__((always_inline)) void q8_0_rows_vnni(
        const int8_t *xu, const float *dxe, int64_t i0, int R, int64_t K, const int8_t *wq, const uint16_t *wd,
        int64_t n, int64_t N, float *y) {
    const int64_t P = K / QK / 2;
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; p++) {
        const __m512i w = _mm512_loadu_si512(wq + p * 64);
        /* -(128 * sum of each lane's four codes): what x's +128 offset adds */
        const __m512i start = _mm512_sub_epi32(_mm512_setzero_si512(),
                                               _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi8((char)0x80), w));
        const __m512 ws = pair_scale(half_to_float(wd[2 * p]), half_to_float(wd[2 * p + 1]));
        for (int r = 0; r < R; r++) {
            const int64_t row = i0 + r;
            const __m512i dp = _mm512_dpbusd_epi32(start, _mm512_loadu_si512(xu + row * K + p * 64), w);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dp), _mm512_mul_ps(ws, _mm512_loadu_ps(dxe + (row * P + p) * 16)), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) y[(i0 + r) * N + n] = _mm512_reduce_add_ps(acc[r]);
}

VNNI_TARGET static int q8_0_matmul_vnni(const float *x, int64_t M, int64_t K, const int8_t *qs, const uint16_t *d,
                                        int64_t N, float *y) {
    const int64_t G = K / QK;
    char *buf = malloc((size_t)(M * K + (M * K / 4 + M * G) * (int64_t)sizeof(float)));
    if (buf == NULL) return -1;
    int8_t *xu = (int8_t *)buf;
    float *dxe = (float *)(buf + M * K), *sx = dxe + M * K / 4;
    quantize_x_vnni(x, M, K, xu, dxe, NULL, sx, 1);
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wq = qs + n * K;
        const uint16_t *wd = d + n * G;
        int64_t i = 0;
        for (; i + ROWS <= M; i += ROWS) q8_0_rows_vnni(xu, dxe, i, ROWS, K, wq, wd, n, N, y);
        switch (M - i) {
            case 7: q8_0_rows_vnni(xu, dxe, i, 7, K, wq, wd, n, N, y); break;
            case 6: q8_0_rows_vnni(xu, dxe, i, 6, K, wq, wd, n, N, y); break;
            case 5: q8_0_rows_vnni(xu, dxe, i, 5, K, wq, wd, n, N, y); break;
            case 4: q8_0_rows_vnni(xu, dxe, i, 4, K, wq, wd, n, N, y); break;
            case 3: q8_0_rows_vnni(xu, dxe, i, 3, K, wq, wd, n, N, y); break;
            case 2: q8_0_rows_vnni(xu, dxe, i, 2, K, wq, wd, n, N, y); break;
            case 1: q8_0_rows_vnni(xu, dxe, i, 1, K, wq, wd, n, N, y); break;
            default: break;
        }
    }
    free(buf);
    return 0;
}

/* ---- Q4_1 interleaved by 16 output rows, for VNNI ("x16") ----------------------------------

   The layout above gives each output its own vpdpbusd per block pair and then three fp32 ops to
   scale it: about 16 multiply-adds per instruction. Interleaving 16 weight rows (llama.cpp's
   repacked "x8" formats, and oneDNN's blocked weights, do the same) makes the 16 int32 lanes of
   one vpdpbusd 16 different outputs over 4 input columns, x's 4 bytes broadcast to every lane:
   a block of 32 columns is 8 vpdpbusd into one accumulator with one scale (the block's), then one
   cvt, one multiply and two FMAs for all 16 outputs at once: about 40 multiply-adds an instruction.
   Per (group of 16 rows, block), 256 bytes of codes: byte (t % 4) * 64 + j * 4 + i holds, of row j,
   code 4t + i in its low nibble (t < 4) or high nibble (t >= 4); then the 16 rows' d and m as
   fp16 (16 + 16). The same bytes as Q4_1's, in another order (q4_1_repack_x16 makes them). */
void q4_1_repack_x16(const uint8_t *qs, const uint16_t *dm, int64_t N, int64_t K, uint8_t *codes, uint16_t *scales) {
    const int64_t G = K / QK;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < N / 16; nb++) {
        for (int64_t g = 0; g < G; g++) {
            uint8_t *out = codes + (nb * G + g) * 256;
            uint16_t *sc = scales + (nb * G + g) * 32;
            for (int b = 0; b < 256; b++) out[b] = 0;
            for (int j = 0; j < 16; j++) {
                const int64_t n = nb * 16 + j;
                const uint8_t *block = qs + n * (K / 2) + g * 16;
                sc[j] = dm[(n * G + g) * 2];
                sc[16 + j] = dm[(n * G + g) * 2 + 1];
                for (int k = 0; k < QK; k++) {
                    const uint8_t code = k < 16 ? block[k] & 0x0F : block[k - 16] >> 4;
                    const int t = k / 4, i = k % 4;
                    out[(t % 4) * 64 + j * 4 + i] |= (uint8_t)(t < 4 ? code : code << 4);
                }
            }
        }
    }
}

/* R (a constant after inlining) input rows from row i0 against the 16 weight rows of group nb. */
VNNI_TARGET static inline __attribute__((always_inline)) void q4_1_x16_rows(
        const int8_t *xq, const float *dx, const float *sx, int64_t i0, int R, int64_t K, const uint8_t *codes,
        const uint16_t *scales, int64_t nb, int64_t N, float *y) {
    const int64_t G = K / QK;
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const uint8_t *c = codes + g * 256;
        __m512i w[8];
        for (int t = 0; t < 4; t++) {
            const __m512i v = _mm512_loadu_si512(c + 64 * t);
            w[t] = _mm512_and_si512(v, low4);
            w[t + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + g * 32)));
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + g * 32 + 16)));
        for (int r = 0; r < R; r++) {
            const int64_t row = i0 + r;
            const int8_t *a = xq + row * K + g * QK;
            int32_t a4[8];
            __builtin_memcpy(a4, a, 32);
            /* two chains of four: consecutive vpdpbusd do not all wait on one accumulator */
            __m512i s0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[0], _mm512_set1_epi32(a4[0]));
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[1], _mm512_set1_epi32(a4[1]));
            s0 = _mm512_dpbusd_epi32(s0, w[2], _mm512_set1_epi32(a4[2]));
            s1 = _mm512_dpbusd_epi32(s1, w[3], _mm512_set1_epi32(a4[3]));
            s0 = _mm512_dpbusd_epi32(s0, w[4], _mm512_set1_epi32(a4[4]));
            s1 = _mm512_dpbusd_epi32(s1, w[5], _mm512_set1_epi32(a4[5]));
            s0 = _mm512_dpbusd_epi32(s0, w[6], _mm512_set1_epi32(a4[6]));
            s1 = _mm512_dpbusd_epi32(s1, w[7], _mm512_set1_epi32(a4[7]));
            const __m512 sd = _mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1));
            acc[r] = _mm512_fmadd_ps(sd, _mm512_mul_ps(d, _mm512_set1_ps(dx[row * G + g])), acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[row * G + g]), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + (i0 + r) * N + nb * 16, acc[r]);
}

/* x (M, K) fp32 @ W.T with W in the x16 layout (N a multiple of 16). Returns 0, or -1 when out of
   memory or when this CPU has no VNNI. */
VNNI_TARGET static int q4_1_matmul_x16_vnni(const float *x, int64_t M, int64_t K, const uint8_t *codes,
                                            const uint16_t *scales, int64_t N, float *y) {
    const int64_t G = K / QK;
    char *buf = malloc((size_t)(M * K + 2 * M * G * (int64_t)sizeof(float)));
    if (buf == NULL) return -1;
    int8_t *xq = (int8_t *)buf;
    float *dx = (float *)(buf + M * K), *sx = dx + M * G;
    quantize_x_vnni(x, M, K, xq, NULL, dx, sx, 0);
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t nb = 0; nb < N / 16; nb++) {
        const uint8_t *c = codes + nb * G * 256;
        const uint16_t *sc = scales + nb * G * 32;
        int64_t i = 0;
        for (; i + ROWS <= M; i += ROWS) q4_1_x16_rows(xq, dx, sx, i, ROWS, K, c, sc, nb, N, y);
        switch (M - i) {
            case 7: q4_1_x16_rows(xq, dx, sx, i, 7, K, c, sc, nb, N, y); break;
            case 6: q4_1_x16_rows(xq, dx, sx, i, 6, K, c, sc, nb, N, y); break;
            case 5: q4_1_x16_rows(xq, dx, sx, i, 5, K, c, sc, nb, N, y); break;
            case 4: q4_1_x16_rows(xq, dx, sx, i, 4, K, c, sc, nb, N, y); break;
            case 3: q4_1_x16_rows(xq, dx, sx, i, 3, K, c, sc, nb, N, y); break;
            case 2: q4_1_x16_rows(xq, dx, sx, i, 2, K, c, sc, nb, N, y); break;
            case 1: q4_1_x16_rows(xq, dx, sx, i, 1, K, c, sc, nb, N, y); break;
            default: break;
        }
    }
    free(buf);
    return 0;
}

int q4_1_matmul_x16(const float *x, int64_t M, int64_t K, const uint8_t *codes, const uint16_t *scales, int64_t N,
                    float *y) {
    if (!qmatmul_isa(-1) || N % 16) return -1;
    return q4_1_matmul_x16_vnni(x, M, K, codes, scales, N, y);
}

/* Q8_0 in the same interleaving: per (group of 16 rows, block) 512 bytes of codes, byte
   t * 64 + j * 4 + i holding row j's code 4t + i (t < 8); the 16 rows' d (fp16); and, since x
   goes in offset by 128 (vpdpbusd's unsigned side), each row's -128 * sum of the block's codes
   (int32), where its accumulator starts. q8_0_repack_x16 makes them. */
void q8_0_repack_x16(const int8_t *qs, const uint16_t *d, int64_t N, int64_t K, int8_t *codes, uint16_t *scales,
                     int32_t *offsets) {
    const int64_t G = K / QK;
#pragma omp parallel for schedule(static)
    for (int64_t nb = 0; nb < N / 16; nb++) {
        for (int64_t g = 0; g < G; g++) {
            int8_t *out = codes + (nb * G + g) * 512;
            for (int j = 0; j < 16; j++) {
                const int64_t n = nb * 16 + j;
                const int8_t *block = qs + n * K + g * QK;
                int32_t sum = 0;
                for (int k = 0; k < QK; k++) {
                    out[(k / 4) * 64 + j * 4 + k % 4] = block[k];
                    sum += block[k];
                }
                scales[(nb * G + g) * 16 + j] = d[n * G + g];
                offsets[(nb * G + g) * 16 + j] = -128 * sum;
            }
        }
    }
}

VNNI_TARGET static inline __attribute__((always_inline)) void q8_0_x16_rows(
        const int8_t *xu, const float *dx, int64_t i0, int R, int64_t K, const int8_t *codes, const uint16_t *scales,
        const int32_t *offsets, int64_t nb, int64_t N, float *y) {
    const int64_t G = K / QK;
    __m512 acc[ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        const int8_t *c = codes + g * 512;
        __m512i w[8];
        for (int t = 0; t < 8; t++) w[t] = _mm512_loadu_si512(c + 64 * t);
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + g * 16)));
        const __m512i start = _mm512_loadu_si512(offsets + g * 16);
        for (int r = 0; r < R; r++) {
            const int64_t row = i0 + r;
            int32_t a4[8];
            __builtin_memcpy(a4, xu + row * K + g * QK, 32);
            __m512i s0 = _mm512_dpbusd_epi32(start, _mm512_set1_epi32(a4[0]), w[0]);
            __m512i s1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_set1_epi32(a4[1]), w[1]);
            s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(a4[2]), w[2]);
            s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(a4[3]), w[3]);
            s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(a4[4]), w[4]);
            s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(a4[5]), w[5]);
            s0 = _mm512_dpbusd_epi32(s0, _mm512_set1_epi32(a4[6]), w[6]);
            s1 = _mm512_dpbusd_epi32(s1, _mm512_set1_epi32(a4[7]), w[7]);
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0, s1)),
                                     _mm512_mul_ps(d, _mm512_set1_ps(dx[row * G + g])), acc[r]);
        }
    }
    for (int r = 0; r < R; r++) _mm512_storeu_ps(y + (i0 + r) * N + nb * 16, acc[r]);
}

VNNI_TARGET static int q8_0_matmul_x16_vnni(const float *x, int64_t M, int64_t K, const int8_t *codes,
                                            const uint16_t *scales, const int32_t *offsets, int64_t N, float *y) {
    const int64_t G = K / QK;
    char *buf = malloc((size_t)(M * K + 2 * M * G * (int64_t)sizeof(float)));
    if (buf == NULL) return -1;
    int8_t *xu = (int8_t *)buf;
    float *dx = (float *)(buf + M * K), *sx = dx + M * G;
    quantize_x_vnni(x, M, K, xu, NULL, dx, sx, 1);
#pragma omp parallel for schedule(static) if (N * K >= (1 << 16))
    for (int64_t nb = 0; nb < N / 16; nb++) {
        const int8_t *c = codes + nb * G * 512;
        const uint16_t *sc = scales + nb * G * 16;
        const int32_t *o = offsets + nb * G * 16;
        int64_t i = 0;
        for (; i + ROWS <= M; i += ROWS) q8_0_x16_rows(xu, dx, i, ROWS, K, c, sc, o, nb, N, y);
        switch (M - i) {
            case 7: q8_0_x16_rows(xu, dx, i, 7, K, c, sc, o, nb, N, y); break;
            case 6: q8_0_x16_rows(xu, dx, i, 6, K, c, sc, o, nb, N, y); break;
            case 5: q8_0_x16_rows(xu, dx, i, 5, K, c, sc, o, nb, N, y); break;
            case 4: q8_0_x16_rows(xu, dx, i, 4, K, c, sc, o, nb, N, y); break;
            case 3: q8_0_x16_rows(xu, dx, i, 3, K, c, sc, o, nb, N, y); break;
            case 2: q8_0_x16_rows(xu, dx, i, 2, K, c, sc, o, nb, N, y); break;
            case 1: q8_0_x16_rows(xu, dx, i, 1, K, c, sc, o, nb, N, y); break;
            default: break;
        }
    }
    free(buf);
    return 0;
}

/* The offsets sit right after the scales in one buffer: scales (N/16, G, 16) fp16, then offsets
   (N/16, G, 16) int32 (see qmatmul_cpu.repack_q8_0_x16). */
int q8_0_matmul_x16(const float *x, int64_t M, int64_t K, const int8_t *codes, const uint16_t *scales, int64_t N,
                    float *y) {
    if (!qmatmul_isa(-1) || N % 16) return -1;
    const int32_t *offsets = (const int32_t *)(scales + N * (K / QK));
    return q8_0_matmul_x16_vnni(x, M, K, codes, scales, offsets, N, y);
}

/* qs (N, K/2) uint8, dm (N, K/32, 2) fp16 [d, m]. Returns 0, or -1 when out of memory. */
int q4_1_matmul(const float *x, int64_t M, int64_t K, const uint8_t *qs, const uint16_t *dm, int64_t N, float *y) {
    const int64_t G = K / QK;
    if (G % 2 == 0 && qmatmul_isa(-1)) return q4_1_matmul_vnni(x, M, K, qs, dm, N, y);
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
    if (G % 2 == 0 && qmatmul_isa(-1)) return q8_0_matmul_vnni(x, M, K, qs, d, N, y);
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

/* A Q4_1 projection as the decode layers get it: w[0], w[1] its qs and dm; w[2], w[3] the same
   weight in the x16 layout, or 0 where there is none (q4_1_repack_x16). */
static int q4_1_mm(const float *x, int64_t M, int64_t K, const int64_t *w, int64_t N, float *y) {
    if (w[2] != 0 && N % 16 == 0 && qmatmul_isa(-1))
        return q4_1_matmul_x16(x, M, K, (const uint8_t *)w[2], (const uint16_t *)w[3], N, y);
    return q4_1_matmul(x, M, K, (const uint8_t *)w[0], (const uint16_t *)w[1], N, y);
}

/* ---- One decoder layer of a Llama at one new position, on Q4_1 projections -----------------

   The eager PyTorch decode step spends as long in its ~25 small ops per layer (norms, RoPE, cache
   writes, single-query attention, SiLU, residuals: a few microseconds of dispatch each) as in the
   matmuls; this does the whole layer in one call, in the same order and fp32 arithmetic as
   memlm.model.llama.Block (the tests hold it to that module path):
     h = rms_norm(x) * attn_norm;  [q; k; v] = wqkv h;  q, k rotated (half-split RoPE, sin's first
     half negated: out = v * cos + roll(v, hd/2) * sin);  k, v written at `pos` in the layer's
     cache (KV, S_max, hd; fp32, or fp16 where half);  per query head, softmax(q . k_l / sqrt(hd)) over l in [0, pos] times
     v_l (GQA: head h reads KV head h / (H / KV));  x += wo o;
     h = rms_norm(x) * ffn_norm;  [g; u] = w13 h;  x += w2 (silu(g) * u).
   w: the four projections wqkv, wo, w13, w2, four int64 each (see q4_1_mm).
   parts: 1 the attention half (to x += wo o), 2 the MLP half, 3 both (modules a memory mode
   inserts after the attention, RETRO's cross-attention, run between two calls).
   x (D,) is updated in place. Returns 0, or -1 when out of memory. */
static void rms_norm(const float *x, const float *w, int64_t D, float eps, float *out) {
    double ss = 0.0;
    for (int64_t i = 0; i < D; i++) ss += (double)x[i] * x[i];
    const float r = 1.0f / sqrtf((float)(ss / D) + eps);
    for (int64_t i = 0; i < D; i++) out[i] = x[i] * r * w[i];
}

/* e^x in eight lanes, Cephes' expf (x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6 polynomial in r,
   times 2^n): within about 1 ulp of expf over [-87, 88]; x clamped to that range (softmax and SiLU
   need nothing past it: e^-87 is below the precision of a sum of 1 and more, e^88 makes SiLU's
   x / (1 + e^-x) zero to fp32 precision). */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* v[i] = e^(v[i] - m) for i < n; returns their sum. */
static float exp_sub_sum(float *v, int64_t n, float m) {
    __m256 acc = _mm256_setzero_ps();
    const __m256 vm = _mm256_set1_ps(m);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(v + i), vm));
        _mm256_storeu_ps(v + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float sum = hsum(acc);
    for (; i < n; i++) { v[i] = expf(v[i] - m); sum += v[i]; }
    return sum;
}

/* act[i] = silu(g[i]) * u[i] = g[i] / (1 + e^-g[i]) * u[i], i < n. */
static void silu_mul(const float *g, const float *u, int64_t n, float *act) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
    for (; i + 8 <= n; i += 8) {
        const __m256 vg = _mm256_loadu_ps(g + i);
        const __m256 den = _mm256_add_ps(one, exp256(_mm256_sub_ps(zero, vg)));
        _mm256_storeu_ps(act + i, _mm256_mul_ps(_mm256_div_ps(vg, den), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) act[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void rope(float *v, const float *cos, const float *sin, int64_t hd) {
    float tmp[hd];
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < hd; i++) tmp[i] = v[i] * cos[i] + v[(i + half) % hd] * sin[i];
    for (int64_t i = 0; i < hd; i++) v[i] = tmp[i];
}

/* Eight cache values from element i of a cache row: fp32, or fp16 (half) widened exactly. */
static inline __attribute__((always_inline)) __m256 kv_load(const void *row, int64_t i, int half) {
    return half ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + i)))
                : _mm256_loadu_ps((const float *)row + i);
}

/* s[l] = q . k_l * scale for l < L (keys hd apart): four keys at a time, each its own chain of FMAs,
   so the adds do not all wait on one accumulator (one chain ran at the FMA latency). */
static inline __attribute__((always_inline)) void cache_scores(const float *q, const void *k, int64_t L, int64_t hd,
                                                               float scale, int half, float *s) {
    const int64_t row = hd * (half ? 2 : 4);  /* bytes */
    const char *kb = (const char *)k;
    int64_t l = 0;
    for (; l + 4 <= L; l += 4) {
        const char *k0 = kb + l * row, *k1 = k0 + row, *k2 = k1 + row, *k3 = k2 + row;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) {
            const __m256 vq = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(vq, kv_load(k0, i, half), a0);
            a1 = _mm256_fmadd_ps(vq, kv_load(k1, i, half), a1);
            a2 = _mm256_fmadd_ps(vq, kv_load(k2, i, half), a2);
            a3 = _mm256_fmadd_ps(vq, kv_load(k3, i, half), a3);
        }
        s[l] = hsum(a0) * scale;
        s[l + 1] = hsum(a1) * scale;
        s[l + 2] = hsum(a2) * scale;
        s[l + 3] = hsum(a3) * scale;
    }
    for (; l < L; l++) {
        __m256 a = _mm256_setzero_ps();
        for (int64_t i = 0; i < hd; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv_load(kb + l * row, i, half), a);
        s[l] = hsum(a) * scale;
    }
}

/* o = sum_l p[l] v_l / sum, v_l hd apart. hd = 64 (SmolLM2's): the output stays in eight
   registers across the keys, instead of a load and a store per key. */
static inline __attribute__((always_inline)) void cache_weighted_sum(const float *p, const void *v, int64_t L,
                                                                     int64_t hd, float sum, int half, float *o) {
    const float r = 1.0f / sum;
    const int64_t row = hd * (half ? 2 : 4);
    const char *vb = (const char *)v;
    if (hd == 64) {
        __m256 o0 = _mm256_setzero_ps(), o1 = _mm256_setzero_ps(), o2 = _mm256_setzero_ps(), o3 = _mm256_setzero_ps();
        __m256 o4 = _mm256_setzero_ps(), o5 = _mm256_setzero_ps(), o6 = _mm256_setzero_ps(), o7 = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; l++) {
            const char *vl = vb + l * row;
            const __m256 a = _mm256_set1_ps(p[l] * r);
            o0 = _mm256_fmadd_ps(a, kv_load(vl, 0, half), o0);
            o1 = _mm256_fmadd_ps(a, kv_load(vl, 8, half), o1);
            o2 = _mm256_fmadd_ps(a, kv_load(vl, 16, half), o2);
            o3 = _mm256_fmadd_ps(a, kv_load(vl, 24, half), o3);
            o4 = _mm256_fmadd_ps(a, kv_load(vl, 32, half), o4);
            o5 = _mm256_fmadd_ps(a, kv_load(vl, 40, half), o5);
            o6 = _mm256_fmadd_ps(a, kv_load(vl, 48, half), o6);
            o7 = _mm256_fmadd_ps(a, kv_load(vl, 56, half), o7);
        }
        _mm256_storeu_ps(o, o0);
        _mm256_storeu_ps(o + 8, o1);
        _mm256_storeu_ps(o + 16, o2);
        _mm256_storeu_ps(o + 24, o3);
        _mm256_storeu_ps(o + 32, o4);
        _mm256_storeu_ps(o + 40, o5);
        _mm256_storeu_ps(o + 48, o6);
        _mm256_storeu_ps(o + 56, o7);
        return;
    }
    for (int64_t i = 0; i < hd; i += 8) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t l = 0; l < L; l++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[l] * r), kv_load(vb + l * row, i, half), acc);
        _mm256_storeu_ps(o + i, acc);
    }
}

static inline __attribute__((always_inline)) void attend_impl(
        const float *q_heads, const void *k_cache, const void *v_cache, int64_t S, int64_t L, int64_t H, int64_t KV,
        int64_t hd, int half, float *scores, float *out) {
    const float scale = 1.0f / sqrtf((float)hd);
    const int64_t group = H / KV, plane = S * hd * (half ? 2 : 4);
#pragma omp parallel for schedule(static) if (H * L * hd >= (1 << 16))
    for (int64_t hh = 0; hh < H; hh++) {
        const float *q = q_heads + hh * hd;
        const char *kc = (const char *)k_cache + (hh / group) * plane, *vc = (const char *)v_cache + (hh / group) * plane;
        float *s = scores + hh * L;
        cache_scores(q, kc, L, hd, scale, half, s);
        float m = -INFINITY;
        for (int64_t l = 0; l < L; l++) m = s[l] > m ? s[l] : m;
        cache_weighted_sum(s, vc, L, hd, exp_sub_sum(s, L, m), half, out + hh * hd);
    }
}

/* Single-query attention of one sequence's new position: per query head h (of q (H, hd)), softmax
   of q . k_l / sqrt(hd) over the L cached positions of KV head h / (H / KV) times v_l, into
   out (H, hd). Caches (KV, S, hd), fp32 or (half) fp16; scores (H, L) scratch. */
static void attend(const float *q_heads, const void *k_cache, const void *v_cache, int64_t S, int64_t L, int64_t H,
                   int64_t KV, int64_t hd, int half, float *scores, float *out) {
    if (half)
        attend_impl(q_heads, k_cache, v_cache, S, L, H, KV, hd, 1, scores, out);
    else
        attend_impl(q_heads, k_cache, v_cache, S, L, H, KV, hd, 0, scores, out);
}

/* One sequence's new position: q and k of qkv (H + 2 KV heads of hd: queries, keys, values) rotated,
   k and v written at `pos` of the caches (KV, S, hd; fp16 where half, rounded to nearest even as
   torch's cast does), then `attend` over [0, pos] into out (H, hd). */
static void rope_cache_attend(float *qkv, const float *cos, const float *sin, void *k_cache, void *v_cache,
                              int64_t S, int64_t pos, int64_t H, int64_t KV, int64_t hd, int half, float *scores,
                              float *out) {
    const int64_t Q = H * hd, KVD = KV * hd;
    for (int64_t j = 0; j < H + KV; j++) rope(qkv + j * hd, cos, sin, hd);  /* queries and keys */
    for (int64_t g = 0; g < KV; g++) {
        const float *k = qkv + Q + g * hd, *v = qkv + Q + KVD + g * hd;
        const int64_t at = (g * S + pos) * hd;
        if (half) {
            uint16_t *kh = (uint16_t *)k_cache + at, *vh = (uint16_t *)v_cache + at;
            for (int64_t i = 0; i < hd; i += 8) {
                _mm_storeu_si128((__m128i *)(kh + i), _mm256_cvtps_ph(_mm256_loadu_ps(k + i), _MM_FROUND_TO_NEAREST_INT));
                _mm_storeu_si128((__m128i *)(vh + i), _mm256_cvtps_ph(_mm256_loadu_ps(v + i), _MM_FROUND_TO_NEAREST_INT));
            }
        } else {
            for (int64_t i = 0; i < hd; i++) {
                ((float *)k_cache)[at + i] = k[i];
                ((float *)v_cache)[at + i] = v[i];
            }
        }
    }
    attend(qkv, k_cache, v_cache, S, pos + 1, H, KV, hd, half, scores, out);
}

int q4_1_decode_layer(float *x, int64_t D, int64_t H, int64_t KV, int64_t hd, int64_t I, float eps,
                      const float *attn_norm, const float *ffn_norm, const int64_t *w,
                      const float *cos, const float *sin, void *k_cache, void *v_cache, int64_t max_seq, int64_t pos,
                      int64_t parts, int64_t half) {
    const int64_t Q = H * hd, KVD = KV * hd, L = pos + 1;
    float *buf = malloc(sizeof(float) * (size_t)(D + Q + 2 * KVD + Q + D + 2 * I + I + H * L));
    if (buf == NULL) return -1;
    float *h = buf, *qkv = h + D, *attn = qkv + Q + 2 * KVD, *y = attn + Q, *gu = y + D, *act = gu + 2 * I;
    float *scores = act + I;  /* (H, L) */
    int rc = 0;

    if (!(parts & 1)) goto mlp;
    rms_norm(x, attn_norm, D, eps, h);
    rc |= q4_1_mm(h, 1, D, w + 0, Q + 2 * KVD, qkv);
    rope_cache_attend(qkv, cos, sin, k_cache, v_cache, max_seq, pos, H, KV, hd, (int)half, scores, attn);
    rc |= q4_1_mm(attn, 1, Q, w + 4, D, y);
    for (int64_t i = 0; i < D; i++) x[i] += y[i];

mlp:
    if (!(parts & 2)) goto done;
    rms_norm(x, ffn_norm, D, eps, h);
    rc |= q4_1_mm(h, 1, D, w + 8, 2 * I, gu);
    silu_mul(gu, gu + I, I, act);
    rc |= q4_1_mm(act, 1, I, w + 12, D, y);
    for (int64_t i = 0; i < D; i++) x[i] += y[i];
done:
    free(buf);
    return rc ? -1 : 0;
}

/* ---- RETRO's chunked cross-attention at one new position, on its layer's own projections ----

   memlm.modes.retro.model.ChunkedCrossAttention at a decode step (one query reading the neighbour
   rows of the chunk it is aligned with) in one call, as the layer above does its attention half:
     h = rms_norm(x) * attn_norm;  q = the query rows of wqkv times h (its first H * hd outputs:
     the keys and values of x are not needed);  q rotated at cos, sin (the query's position in the
     neighbours' frame);  per query head h, softmax(q . k_l / sqrt(hd)) over the L rows of KV head
     h / (H / KV) times v_l;  head h's output times gate[h] (tanh of its learned gate);  x += wo o.
   w: wqkv then wo, four int64 each (see q4_1_mm). k, v (KV, L, hd) fp32, the chunk's valid rows
   only (L >= 1). x (D,) is updated in place. Returns 0, or -1 when out of memory. */
int q4_1_cross_attention_step(float *x, int64_t D, int64_t H, int64_t KV, int64_t hd, float eps,
                              const float *attn_norm, const int64_t *w, const float *cos, const float *sin,
                              const float *k, const float *v, int64_t L, const float *gate) {
    const int64_t Q = H * hd;
    float *buf = malloc(sizeof(float) * (size_t)(D + Q + Q + D + H * L));
    if (buf == NULL) return -1;
    float *h = buf, *q = h + D, *attn = q + Q, *y = attn + Q, *scores = y + D;  /* scores (H, L) */
    rms_norm(x, attn_norm, D, eps, h);
    int rc = q4_1_mm(h, 1, D, w + 0, Q, q);
    for (int64_t j = 0; j < H; j++) rope(q + j * hd, cos, sin, hd);
    attend(q, k, v, L, L, H, KV, hd, 0, scores, attn);
    for (int64_t j = 0; j < H; j++)
        for (int64_t i = 0; i < hd; i++) attn[j * hd + i] *= gate[j];
    rc |= q4_1_mm(attn, 1, Q, w + 4, D, y);
    for (int64_t i = 0; i < D; i++) x[i] += y[i];
    free(buf);
    return rc ? -1 : 0;
}

/* ---- The same layer for B sequences, each at its own new position in its own cache ---------

   q4_1_decode_layer over B rows at once (the batch scheduler's decode step): the projections
   take the B rows in one matmul each (whose blocks of rows share the weight's unpacking), RoPE,
   the cache write and attention run per row on that row's cache. x (B, D) is updated in place;
   cos, sin (B, hd) the rows' RoPE rows; k_caches[b], v_caches[b] (KV, max_seqs[b], hd) fp32 (fp16
   where half), written at positions[b] and read over [0, positions[b]]. Returns 0, or -1 when out of memory. */
int q4_1_decode_layer_batch(float *x, int64_t B, int64_t D, int64_t H, int64_t KV, int64_t hd, int64_t I, float eps,
                            const float *attn_norm, const float *ffn_norm, const int64_t *w,
                            const float *cos, const float *sin, void *const *k_caches, void *const *v_caches,
                            const int64_t *max_seqs, const int64_t *positions, int64_t half) {
    const int64_t Q = H * hd, KVD = KV * hd, QKV = Q + 2 * KVD;
    int64_t L_max = 0;
    for (int64_t b = 0; b < B; b++) L_max = positions[b] + 1 > L_max ? positions[b] + 1 : L_max;
    float *buf = malloc(sizeof(float) * (size_t)(B * (D + QKV + Q + D + 2 * I + I + H * L_max)));
    if (buf == NULL) return -1;
    float *h = buf, *qkv = h + B * D, *attn = qkv + B * QKV, *y = attn + B * Q, *gu = y + B * D, *act = gu + B * 2 * I;
    float *scores = act + B * I;  /* (B, H, L_max) */
    int rc = 0;

    for (int64_t b = 0; b < B; b++) rms_norm(x + b * D, attn_norm, D, eps, h + b * D);
    rc |= q4_1_mm(h, B, D, w + 0, QKV, qkv);
    /* Rows across threads (attend's own loop over heads then runs in one thread: OpenMP does not
       nest by default); each row's arithmetic is the same wherever it runs. One row: attend's
       loop over heads is the parallel one (a region nested in an inactive one builds a new team). */
#define ROW_ATTENTION(b) rope_cache_attend(qkv + (b) * QKV, cos + (b) * hd, sin + (b) * hd, k_caches[b], v_caches[b], \
                                           max_seqs[b], positions[b], H, KV, hd, (int)half, scores + (b) * H * L_max, attn + (b) * Q)
    if (B == 1) {
        ROW_ATTENTION(0);
    } else {
#pragma omp parallel for schedule(dynamic)
        for (int64_t b = 0; b < B; b++) ROW_ATTENTION(b);
    }
#undef ROW_ATTENTION
    rc |= q4_1_mm(attn, B, Q, w + 4, D, y);
    for (int64_t i = 0; i < B * D; i++) x[i] += y[i];

    for (int64_t b = 0; b < B; b++) rms_norm(x + b * D, ffn_norm, D, eps, h + b * D);
    rc |= q4_1_mm(h, B, D, w + 8, 2 * I, gu);
    for (int64_t b = 0; b < B; b++) silu_mul(gu + b * 2 * I, gu + b * 2 * I + I, I, act + b * I);
    rc |= q4_1_mm(act, B, I, w + 12, D, y);
    for (int64_t i = 0; i < B * D; i++) x[i] += y[i];
    free(buf);
    return rc ? -1 : 0;
}

/* The whole decoder stack of a decode step of B sequences (every one feeding one token), in one
   call: `q4_1_decode_layer_batch` for each of the n_layers layers in turn, the same arithmetic as
   that many calls, without a trip through Python between layers (~40 us each, a fifth of a
   batched step at B = 8). attn_norms[l], ffn_norms[l]: layer l's norm weights (pointers);
   w[16 l ..]: its four projections; k_caches[l B + b], v_caches[l B + b]: sequence b's caches of
   layer l. cos, sin, max_seqs, positions as for one layer (the same at every layer).

   cross: NULL, or STACK_CROSS int64 per layer for one sequence (B = 1) whose layers carry a
   module after their attention that this call runs (RETRO's chunked cross-attention):
     [0] 0 a plain layer; 1 the layer's attention half, then `q4_1_cross_attention_step`, then its
         MLP half; 2 the two halves with nothing between (the module reads nothing this token);
     [1] the cross step's ProjectionPair pointers; [2], [3] its k, v rows; [4] their count L;
     [5] its gates (tanh'd); [6], [7] its RoPE rows cos, sin;
     [8] 0, or where to copy x after the attention half (the module's input, D floats).
   Halves run as `q4_1_decode_layer`'s parts 1 and 2, which together equal part 3 bit for bit. */
#define STACK_CROSS 10
int q4_1_decode_stack_batch(float *x, int64_t B, int64_t D, int64_t H, int64_t KV, int64_t hd, int64_t I, float eps,
                            int64_t n_layers, const int64_t *attn_norms, const int64_t *ffn_norms, const int64_t *w,
                            const float *cos, const float *sin, void *const *k_caches, void *const *v_caches,
                            const int64_t *max_seqs, const int64_t *positions, int64_t half, const int64_t *cross) {
    for (int64_t l = 0; l < n_layers; l++) {
        const int64_t *c = cross ? cross + STACK_CROSS * l : NULL;
        const float *an = (const float *)attn_norms[l], *fn = (const float *)ffn_norms[l];
        if (c == NULL || c[0] == 0) {
            if (q4_1_decode_layer_batch(x, B, D, H, KV, hd, I, eps, an, fn, w + 16 * l, cos, sin, k_caches + l * B,
                                        v_caches + l * B, max_seqs, positions, half) != 0)
                return -1;
            continue;
        }
        if (B != 1) return -1;
        if (q4_1_decode_layer(x, D, H, KV, hd, I, eps, an, fn, w + 16 * l, cos, sin, k_caches[l], v_caches[l],
                              max_seqs[0], positions[0], 1, half) != 0)
            return -1;
        if (c[8] != 0)
            for (int64_t i = 0; i < D; i++) ((float *)c[8])[i] = x[i];
        if (c[0] == 1 && q4_1_cross_attention_step(x, D, H, KV, hd, eps, an, (const int64_t *)c[1], (const float *)c[6],
                                                   (const float *)c[7], (const float *)c[2], (const float *)c[3],
                                                   c[4], (const float *)c[5]) != 0)
            return -1;
        if (q4_1_decode_layer(x, D, H, KV, hd, I, eps, an, fn, w + 16 * l, cos, sin, k_caches[l], v_caches[l],
                              max_seqs[0], positions[0], 2, half) != 0)
            return -1;
    }
    return 0;
}
