/* CPU kernels for the engine's decode path, called through ctypes (see __init__.py).
 *
 * Plain C with OpenMP, no PyTorch headers: it compiles in about a second with the
 * system gcc, and OpenMP resolves to the libgomp that torch has already loaded, so
 * both share one thread pool.
 *
 *   agora_linear_q4_1 / agora_linear_q8_0 / agora_linear_qu8
 *       y[M, N] = x[M, K] @ W^T (+ bias), W kept as GGUF blocks exactly as the file
 *       stores them (Q4_1, Q8_0) or as QU8 blocks repacked from the other formats (no
 *       dequantized copy is read). Each weight block is unpacked
 *       once per tile of up to 8 rows of x (AVX2: 10; AVX-512: 16 where L1 holds them)
 *       and multiplied in fp32, so the result is
 *       that of fp32 math on the dequantized weights, up to summation order.
 *
 *   agora_paged_decode_attention
 *       one query token per request, reading K/V straight from the paged cache
 *       (no gather into a padded batch, no mask tensor), grouped-query aware,
 *       optional sliding window.
 *
 *   agora_paged_prefill_attention
 *       causal attention of each request's chunk of new tokens over its paged K/V,
 *       flash style (key tiles, running max and sum): no mask, no padding, and a
 *       query never computes a score for a key after its own position.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define AGORA_AVX2 1
#else
#define AGORA_AVX2 0
#endif

/* AMX (Intel's tile matrix unit) for the opt-in bf16 attention: built where -march=native has it. */
#if AGORA_AVX2 && defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define AGORA_AMX 1
#include <sys/syscall.h>
#else
#define AGORA_AMX 0
#endif

#define QK 32 /* weights per GGUF block for Q4_1 and Q8_0 */
#define Q4_1_BYTES 20 /* fp16 d, fp16 m, 16 bytes of nibbles */
#define Q8_0_BYTES 34 /* fp16 d, 32 int8 */
/* QU8: the other GGUF formats (Q5_0, Q5_1, Q5_K, Q6_K), repacked at load time so that each half-block
 * of 16 weights is d * q + m with fp32 d, m and a uint8 code q: fp32 d0 d1 m0 m1, then 32 codes. Each
 * of those formats' dequantized values is exactly that (agora.models.gguf_repack checks it), so the
 * kernel computes the weights transformers dequantizes, as for Q8_0. */
#define QU8_BYTES 48
/* QU4: the 4-bit formats (Q4_0, Q4_1, Q4_K: one d, m per 32 weights) the same way at half QU8's size:
 * fp32 d, m, then Q4_1's 16 bytes of nibbles (low: weights 0-15, high: 16-31). Q4_1 itself is read as
 * stored only by the int8-activation kernels. */
#define QU4_BYTES 24
enum { FMT_Q4_1 = 0, FMT_Q8_0 = 1, FMT_QU8 = 2, FMT_QU4 = 3 }; /* the block formats of the fp32 kernel */
static inline int64_t fmt_bytes(int fmt) {
    return fmt == FMT_Q8_0 ? Q8_0_BYTES : fmt == FMT_QU8 ? QU8_BYTES : fmt == FMT_QU4 ? QU4_BYTES : Q4_1_BYTES;
}
#if defined(__AVX512F__)
#define ROWS 16 /* the most rows of x sharing one unpacked weight block (a tile) */
#elif AGORA_AVX2
#define ROWS 10 /* AVX2: see linear_blocks' tiles */
#else
#define ROWS 8
#endif
/* How far ahead of the block being unpacked the block kernels ask for weights (software prefetch).
 * A decode step streams every weight from memory once, and the hardware prefetcher alone did not
 * keep ahead of a kernel that also spends ~3 ns unpacking each block: one stream reached 4-7 GB/s
 * where memory gives 25 (Intel Xeon with AMX, 2 cores). Asking 4 KB ahead took single-stream
 * decode of SmolLM2-135M from 21.3 to 7.9 ms a step (int8 activations: 6.9 -> 5.2 ms); 2-8 KB
 * measured alike. Prefetching changes no arithmetic. */
#ifndef PF_BYTES
#define PF_BYTES 4096
#endif

int agora_kernels_avx2(void) { return AGORA_AVX2; }
int agora_kernels_avx512(void) {
#if AGORA_AVX2 && defined(__AVX512F__)
    return 1;
#else
    return 0;
#endif
}

/* 1 where this build has the AMX attention path and Linux lets this process use the tile registers
 * (asked once: arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA; oneDNN asks the same for its GEMMs). */
int64_t agora_amx_init(void) {
#if AGORA_AMX
    static int granted = -1;
    if (granted < 0) granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return granted;
#else
    return 0;
#endif
}

/* Optional accounting of the time spent inside the exported kernels (benchmarks/cpu_decode.py
 * sets it to compare a whole engine step with its kernels). Off, it costs one branch a call;
 * on, it sums the caller's wall time in kernels (one calling thread: the engine's). */
static int timing_on;
static int64_t timed_ns;

static inline int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000LL + t.tv_nsec;
}

void agora_kernel_timing(int64_t on) {
    timing_on = on != 0;
    timed_ns = 0;
}

int64_t agora_kernel_time_ns(void) { return timed_ns; }

#define TIMED(call)                                                                                                    \
    do {                                                                                                               \
        if (!timing_on) {                                                                                              \
            call;                                                                                                      \
        } else {                                                                                                       \
            const int64_t t0_ = now_ns();                                                                              \
            call;                                                                                                      \
            timed_ns += now_ns() - t0_;                                                                                \
        }                                                                                                              \
    } while (0)

/* An fp32 field of a block (a separate 4-byte copy: the compiler then broadcasts it straight from memory;
 * copying both of QU4's at once went through a general register, two more shuffle-port uops a block). */
static inline float f32_at(const uint8_t *p) {
    float f;
    memcpy(&f, p, sizeof f);
    return f;
}

static inline float half_to_float(const uint8_t *p) {
    uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#if AGORA_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, mant = h & 0x3ff, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exp = 1;
            while (!(mant & 0x400)) {
                mant <<= 1;
                exp--;
            }
            bits = sign | ((exp + 112) << 23) | ((mant & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

#if AGORA_AVX2
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Unpack 16 bytes of nibbles (low: weights 0-15, high: 16-31) as d * q + m into w[0..3] (8 floats each). */
static inline void unpack_nibbles(const uint8_t *qs, float scale, float offset, __m256 w[4]) {
    const __m128i mask = _mm_set1_epi8(0x0f);
    const __m256 d = _mm256_set1_ps(scale), m = _mm256_set1_ps(offset);
    __m128i q = _mm_loadu_si128((const __m128i *)qs);
    __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), d, m);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), d, m);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), d, m);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), d, m);
}

/* Unpack one block into w[0..3] (8 floats each). */
static inline void unpack_q4_1(const uint8_t *blk, __m256 w[4]) {
    unpack_nibbles(blk + 4, half_to_float(blk), half_to_float(blk + 2), w);
}

static inline void unpack_qu4(const uint8_t *blk, __m256 w[4]) { unpack_nibbles(blk + 8, f32_at(blk), f32_at(blk + 4), w); }

static inline void unpack_qu8(const uint8_t *blk, __m256 w[4]) {
    float s[4];
    memcpy(s, blk, sizeof s);
    const __m256 d0 = _mm256_set1_ps(s[0]), d1 = _mm256_set1_ps(s[1]), m0 = _mm256_set1_ps(s[2]), m1 = _mm256_set1_ps(s[3]);
    __m128i a = _mm_loadu_si128((const __m128i *)(blk + 16)), b = _mm_loadu_si128((const __m128i *)(blk + 32));
    w[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(a)), d0, m0);
    w[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))), d0, m0);
    w[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), d1, m1);
    w[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))), d1, m1);
}

static inline void unpack_q8_0(const uint8_t *blk, __m256 w[4]) {
    __m256 d = _mm256_set1_ps(half_to_float(blk));
    __m128i a = _mm_loadu_si128((const __m128i *)(blk + 2)), b = _mm_loadu_si128((const __m128i *)(blk + 18));
    w[0] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a)), d);
    w[1] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))), d);
    w[2] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), d);
    w[3] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), d);
}

/* One block of the format `fmt` into w[0..3]. */
static inline __attribute__((always_inline)) void unpack_fmt(int fmt, const uint8_t *blk, __m256 w[4]) {
    if (fmt == FMT_Q8_0)
        unpack_q8_0(blk, w);
    else if (fmt == FMT_QU8)
        unpack_qu8(blk, w);
    else if (fmt == FMT_QU4)
        unpack_qu4(blk, w);
    else
        unpack_q4_1(blk, w);
}

#if defined(__AVX512F__)
/* The 16-wide unpackers give one block as w[0..1] (16 floats each), the same d * q + m (one rounding,
 * fused) as the 8-wide ones, so the weights are bit for bit theirs.
 *
 * 16 bytes of nibbles as d * q + m by table: the block's 16 possible weights d * j + m (j = 0..15, each the
 * same fused d * j + m as converting the code and multiplying would give, so the same bits) in one register,
 * looked up by each code (vpermps reads an index's low 4 bits: the low nibble needs no mask). 7 vector uops a
 * block where widening and converting each nibble took 11 (mask, shift, mask, widen twice, convert twice,
 * two FMAs), which bounds a product whose weights come from cache. */
static inline void unpack16_nibbles(const uint8_t *qs, float scale, float offset, __m512 w[2]) {
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512 table = _mm512_fmadd_ps(iota, _mm512_set1_ps(scale), _mm512_set1_ps(offset));
    const __m512i q = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)qs)); /* lane i: byte i */
    w[0] = _mm512_permutexvar_ps(q, table);
    w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), table);
}

static inline void unpack16_q4_1(const uint8_t *blk, __m512 w[2]) {
    unpack16_nibbles(blk + 4, half_to_float(blk), half_to_float(blk + 2), w);
}

static inline void unpack16_qu4(const uint8_t *blk, __m512 w[2]) {
    unpack16_nibbles(blk + 8, f32_at(blk), f32_at(blk + 4), w);
}

static inline void unpack16_qu8(const uint8_t *blk, __m512 w[2]) {
    float s[4];
    memcpy(s, blk, sizeof s);
    const __m128i a = _mm_loadu_si128((const __m128i *)(blk + 16)), b = _mm_loadu_si128((const __m128i *)(blk + 32));
    w[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(a)), _mm512_set1_ps(s[0]), _mm512_set1_ps(s[2]));
    w[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), _mm512_set1_ps(s[1]), _mm512_set1_ps(s[3]));
}

static inline void unpack16_q8_0(const uint8_t *blk, __m512 w[2]) {
    const __m512 d = _mm512_set1_ps(half_to_float(blk));
    const __m128i a = _mm_loadu_si128((const __m128i *)(blk + 2)), b = _mm_loadu_si128((const __m128i *)(blk + 18));
    w[0] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a)), d);
    w[1] = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b)), d);
}

/* One block of the format `fmt` into w[0..1]. */
static inline __attribute__((always_inline)) void unpack16_fmt(int fmt, const uint8_t *blk, __m512 w[2]) {
    if (fmt == FMT_Q8_0)
        unpack16_q8_0(blk, w);
    else if (fmt == FMT_QU8)
        unpack16_qu8(blk, w);
    else if (fmt == FMT_QU4)
        unpack16_qu4(blk, w);
    else
        unpack16_q4_1(blk, w);
}

/* One weight row against R (1..ROWS = 16, a constant after inlining) rows of x, 16 lanes wide: half
 * the FMAs and conversions of the 8-wide loop below, which bound the batched steps. Up to 8 rows, two
 * accumulators a row (one per half block), so one row is not a single chain of dependent FMAs; past
 * 8 rows, one a row (both halves into it, in turn: 9-16 chains are enough to fill the FMA units, and
 * 32 registers do not hold two a row), so one unpacked block meets up to 16 rows instead of 8. Against
 * the 8-wide loop on an Intel Xeon (AMX, 2 cores): 8 rows of x 17-20% faster per linear, a batch-16
 * SmolLM2 decode step 59.9 -> 54.2 ms, one row as fast (it waits on memory). Only the order of the
 * sums changes. */
static inline __attribute__((always_inline)) void row_dot(int fmt, const uint8_t *wrow, int64_t nb, const float *x,
                                                          int64_t ldx, int R, float *out, int64_t ldo, int add) {
    const int two = R <= 8;
    __m512 acc[ROWS][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const int64_t bytes = fmt_bytes(fmt);
    for (int64_t b = 0; b < nb; b++) {
        __m512 w[2];
        if (PF_BYTES)
            _mm_prefetch((const char *)(wrow + b * bytes + PF_BYTES), _MM_HINT_T0);
        unpack16_fmt(fmt, wrow + b * bytes, w);
        const float *xb = x + b * QK;
        for (int r = 0; r < R; r++) {
            const float *xr = xb + r * ldx;
            acc[r][0] = _mm512_fmadd_ps(w[0], _mm512_loadu_ps(xr), acc[r][0]);
            acc[r][two] = _mm512_fmadd_ps(w[1], _mm512_loadu_ps(xr + 16), acc[r][two]);
        }
    }
    if (two) {
        for (int r = 0; r < R; r++) {
            const float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r][0], acc[r][1]));
            out[r * ldo] = add ? out[r * ldo] + s : s;
        }
        return;
    }
    /* 9-16 rows: the accumulators summed as one transpose (lane r of the result is row r's sum),
     * about 45 shuffles and adds instead of a 9-uop reduction per row. */
    __m512 a[16], b[8], c[4];
    for (int r = 0; r < 16; r++) a[r] = r < R ? acc[r][0] : _mm512_setzero_ps();
    for (int i = 0; i < 8; i++) /* per 128-bit lane: rows 2i, 2i+1, 2i, 2i+1 */
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per 128-bit lane: rows 4i .. 4i+3 */
        c[i] = _mm512_add_ps(_mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_ps(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 d0 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 d1 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm512_shuffle_f32x4(c[2], c[3], _MM_SHUFFLE(3, 1, 3, 1)));
    float s[16];
    _mm512_storeu_ps(s, _mm512_add_ps(_mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(2, 0, 2, 0)),
                                      _mm512_shuffle_f32x4(d0, d1, _MM_SHUFFLE(3, 1, 3, 1))));
    for (int r = 0; r < R; r++) out[r * ldo] = add ? out[r * ldo] + s[r] : s[r];
}
#else
/* One weight row against R (1..ROWS, a constant after inlining) rows of x. Each row keeps
 * A = 4 / 2 / 1 independent accumulators for R <= 2 / <= 4 / more: an FMA waits ~5 cycles
 * for the previous one on the same register, so a single chain per row would leave a
 * one- or two-row product (single-stream decode) latency-bound instead of bandwidth-bound. */
static inline __attribute__((always_inline)) void row_dot(int fmt, const uint8_t *wrow, int64_t nb, const float *x,
                                                          int64_t ldx, int R, float *out, int64_t ldo, int add) {
    const int A = R <= 2 ? 4 : R <= 4 ? 2 : 1;
    __m256 acc[ROWS][4];
    for (int r = 0; r < R; r++)
        for (int a = 0; a < A; a++) acc[r][a] = _mm256_setzero_ps();
    const int64_t bytes = fmt_bytes(fmt);
    for (int64_t b = 0; b < nb; b++) {
        __m256 w[4];
        if (PF_BYTES)
            _mm_prefetch((const char *)(wrow + b * bytes + PF_BYTES), _MM_HINT_T0);
        unpack_fmt(fmt, wrow + b * bytes, w);
        const float *xb = x + b * QK;
        for (int r = 0; r < R; r++) {
            const float *xr = xb + r * ldx;
            for (int j = 0; j < 4; j++)
                acc[r][j % A] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xr + 8 * j), acc[r][j % A]);
        }
    }
    for (int r = 0; r < R; r++) {
        __m256 s = acc[r][0];
        for (int a = 1; a < A; a++) s = _mm256_add_ps(s, acc[r][a]);
        out[r * ldo] = add ? out[r * ldo] + hsum(s) : hsum(s);
    }
}
#endif /* __AVX512F__ */
#else
/* 16 bytes of nibbles (low: weights 0-15, high: 16-31) as d * q + m. */
static inline void unpack_block_nibbles(const uint8_t *qs, float d, float m, float w[QK]) {
    for (int j = 0; j < 16; j++) {
        w[j] = d * (float)(qs[j] & 0x0f) + m;
        w[j + 16] = d * (float)(qs[j] >> 4) + m;
    }
}

static inline void unpack_block(int fmt, const uint8_t *blk, float w[QK]) {
    if (fmt == FMT_QU8) {
        float s[4];
        memcpy(s, blk, sizeof s);
        for (int j = 0; j < QK; j++) w[j] = s[j / 16] * (float)blk[16 + j] + s[2 + j / 16];
    } else if (fmt == FMT_Q8_0) {
        float d = half_to_float(blk);
        for (int j = 0; j < QK; j++) w[j] = d * (float)(int8_t)blk[2 + j];
    } else if (fmt == FMT_QU4) {
        unpack_block_nibbles(blk + 8, f32_at(blk), f32_at(blk + 4), w);
    } else {
        unpack_block_nibbles(blk + 4, half_to_float(blk), half_to_float(blk + 2), w);
    }
}

static inline void row_dot(int fmt, const uint8_t *wrow, int64_t nb, const float *x, int64_t ldx, int R, float *out,
                           int64_t ldo, int add) {
    float acc[ROWS] = {0};
    float w[QK];
    const int64_t bytes = fmt_bytes(fmt);
    for (int64_t b = 0; b < nb; b++) {
        unpack_block(fmt, wrow + b * bytes, w);
        for (int r = 0; r < R; r++) {
            const float *xr = x + r * ldx + b * QK;
            float s = 0.f;
            for (int j = 0; j < QK; j++) s += w[j] * xr[j];
            acc[r] += s;
        }
    }
    for (int r = 0; r < R; r++) out[r * ldo] = add ? out[r * ldo] + acc[r] : acc[r];
}
#endif

/* One weight row against R (1..ROWS) rows of x, R a constant in each case (unrolled apart). */
static inline __attribute__((always_inline)) void rows_dot_fmt(int fmt, const uint8_t *wrow, int64_t nb,
                                                               const float *x, int64_t ldx, int64_t R, float *out,
                                                               int64_t ldo, int add) {
#define ROW_CASE(n)                                                                                                    \
    case n: row_dot(fmt, wrow, nb, x, ldx, n, out, ldo, add); break;
    switch (R) {
#if ROWS > 10
        ROW_CASE(16) ROW_CASE(15) ROW_CASE(14) ROW_CASE(13) ROW_CASE(12) ROW_CASE(11)
#endif
#if ROWS > 8
        ROW_CASE(10) ROW_CASE(9)
#endif
        ROW_CASE(8) ROW_CASE(7) ROW_CASE(6) ROW_CASE(5) ROW_CASE(4) ROW_CASE(3) ROW_CASE(2) ROW_CASE(1)
        default: break;
    }
#undef ROW_CASE
}

/* The same with the format a constant in each case too, so no block's unpacking tests the format. */
static inline void rows_dot(int fmt, const uint8_t *wrow, int64_t nb, const float *x, int64_t ldx, int64_t R,
                            float *out, int64_t ldo, int add) {
    switch (fmt) {
    case FMT_Q8_0: rows_dot_fmt(FMT_Q8_0, wrow, nb, x, ldx, R, out, ldo, add); break;
    case FMT_QU8: rows_dot_fmt(FMT_QU8, wrow, nb, x, ldx, R, out, ldo, add); break;
    case FMT_QU4: rows_dot_fmt(FMT_QU4, wrow, nb, x, ldx, R, out, ldo, add); break;
    default: rows_dot_fmt(FMT_Q4_1, wrow, nb, x, ldx, R, out, ldo, add); break;
    }
}

/* Cache blocking. Each thread takes whole blocks of about NBLK weight rows (the same number of
 * blocks per thread), and within a block goes tile by tile over x (up to ROWS rows), so one tile
 * of x stays in L1 while the block's weight rows (tens of KB) come from L2. Where a tile of x would
 * pass 24 KB (with a 32 KB L1: 8 rows of K > 768), rows are also cut into chunks of about 16 KB (with
 * a 48 KB L1: past 40 KB, into chunks of about 40 KB); a tile of one or a few rows (decode of one
 * stream) is never cut: that would only read each weight row in pieces (3x slower for K = 1536).
 * Measured on 2 Zen 4 cores, batch 16-64: 100-110 -> 150-157 GFLOP/s for K = 576, 95 -> 120 for
 * K = 1536.
 *
 * Tiles of 16 rows (AVX-512) need the larger L1: one unpacked block then meets 16 rows instead of 8,
 * and 16 rows of K = 576 (36 KB) fit it whole. On an Intel Xeon (48 KB L1, 2 cores), SmolLM2's
 * gate/up, down and qkv products against 8-row tiles: 9 rows 1.36x faster (one tile instead of 8 + 1),
 * 16 rows 1.24x, 32 rows 1.23x, 64 rows 1.17x; 1 and 8 rows level. Where L1 is 32 KB (Zen 4) AVX-512
 * tiles stay at 8 rows, as measured there.
 *
 * AVX2 tiles take up to 10 rows: 10 accumulators and the block's 4 unpacked vectors fill 14 of the 16
 * registers (x is each FMA's memory operand), and 10 rows of K = 576 (23 KB) stay under the 24 KB past
 * which a tile is cut. So a verification step of 9 or 10 rows is one tile, not two (5 + 5). On a Zen 3
 * (2 cores), the three products against 8-row tiles (benchmarks/cpu_linear_rows.py --against): 9 rows
 * 0.80-0.90x the time, 10 rows 0.87-0.93x, 17-20 rows 0.91-0.95x, 48-192 rows 0.94-1.00x, 1 and 8 rows
 * level; 11 and 12-row tiles (fewer registers than chains) were no faster than two tiles. */
#define NBLK 64

static int64_t l1d_set; /* agora_set_l1d_bytes: 0, the host's */

static int64_t l1d_bytes(void) {
    static int64_t host;
    if (l1d_set)
        return l1d_set;
    if (!host) {
        const long s = sysconf(_SC_LEVEL1_DCACHE_SIZE);
        host = s > 0 ? s : 32768;
    }
    return host;
}

/* The L1 size the tiling plans for (0: the host's), so tests run both tilings on any host. */
void agora_set_l1d_bytes(int64_t bytes) { l1d_set = bytes; }

/* The most rows of x a tile takes: with AVX-512 16 where L1 holds 48 KB, else 8 (quant.py's row limit
 * on Intel depends on it); with AVX2 10; without either 8. */
int64_t agora_tile_rows(void) {
#if defined(__AVX512F__)
    return l1d_bytes() >= 49152 ? ROWS : 8;
#else
    return ROWS;
#endif
}

static void linear_blocks(int fmt, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                          const float *bias, float *y, int64_t nthreads) {
    const int64_t nb = K / QK, bytes = fmt_bytes(fmt), row_bytes = nb * bytes;
    const int64_t nblocks_target = nthreads * ((N + nthreads * NBLK - 1) / (nthreads * NBLK));
    const int64_t NB = (N + nblocks_target - 1) / nblocks_target, nblocks = (N + NB - 1) / NB;
    /* Tiles as even as they can be: with 8-row tiles 9 rows are 5 + 4, not 8 + 1 (a tile of one row costs
     * about what a single-stream step's products do, since it unpacks every block for one row). */
    const int64_t max_rows = agora_tile_rows(), big_l1 = l1d_bytes() >= 49152;
    /* tiles past `over` bytes are cut into chunks of about `chunk` bytes */
    const int64_t over = big_l1 ? 40960 : 24576, chunk = big_l1 ? 40960 : 16384;
    const int64_t ntiles = (M + max_rows - 1) / max_rows, TR = (M + ntiles - 1) / ntiles;
    const int64_t tile_bytes = TR * K * (int64_t)sizeof(float);
    const int64_t chunks = tile_bytes > over ? (tile_bytes + chunk - 1) / chunk : 1;
    const int64_t cb = (nb + chunks - 1) / chunks; /* blocks per chunk */
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int64_t n0 = blk * NB, n1 = n0 + NB < N ? n0 + NB : N;
        for (int64_t m = 0; m < M; m += TR) {
            const int64_t R = M - m < TR ? M - m : TR;
            for (int64_t kb = 0; kb < nb; kb += cb) {
                const int64_t cnb = nb - kb < cb ? nb - kb : cb;
                for (int64_t n = n0; n < n1; n++)
                    rows_dot(fmt, w + n * row_bytes + kb * bytes, cnb, x + m * K + kb * QK, K, R, y + m * N + n, N,
                             kb > 0);
            }
        }
        if (bias)
            for (int64_t r = 0; r < M; r++)
                for (int64_t n = n0; n < n1; n++) y[r * N + n] += bias[n];
    }
}

/* x: [M, K] fp32 contiguous; w: [N, K / 32] GGUF blocks; bias: [N] or NULL; y: [M, N]. K % 32 == 0. */
void agora_linear_q4_1(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                       float *y, int64_t nthreads) {
    TIMED(linear_blocks(FMT_Q4_1, x, M, K, w, N, bias, y, nthreads));
}

void agora_linear_q8_0(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                       float *y, int64_t nthreads) {
    TIMED(linear_blocks(FMT_Q8_0, x, M, K, w, N, bias, y, nthreads));
}

void agora_linear_qu8(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias, float *y,
                      int64_t nthreads) {
    TIMED(linear_blocks(FMT_QU8, x, M, K, w, N, bias, y, nthreads));
}

void agora_linear_qu4(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias, float *y,
                      int64_t nthreads) {
    TIMED(linear_blocks(FMT_QU4, x, M, K, w, N, bias, y, nthreads));
}

/* W [N, K] in fp32 from its blocks: the very weights the block kernels multiply with (the same unpacking),
 * for the GEMM of a long step through a layer that keeps no fp32 copy (--gguf-weights blocks). */
static void dequant_blocks(int fmt, const uint8_t *w, int64_t N, int64_t K, float *out, int64_t nthreads) {
    const int64_t nb = K / QK, bytes = fmt_bytes(fmt);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * nb * bytes;
        float *o = out + n * K;
        for (int64_t b = 0; b < nb; b++) {
#if AGORA_AVX2
            __m256 v[4];
            unpack_fmt(fmt, row + b * bytes, v);
            for (int i = 0; i < 4; i++) _mm256_storeu_ps(o + b * QK + 8 * i, v[i]);
#else
            unpack_block(fmt, row + b * bytes, o + b * QK);
#endif
        }
    }
}

/* fmt: FMT_*; w: [N, K / 32] blocks of that format; out: [N, K] fp32. K % 32 == 0. */
void agora_dequant(int64_t fmt, const uint8_t *w, int64_t N, int64_t K, float *out, int64_t nthreads) {
    TIMED(dequant_blocks((int)fmt, w, N, K, out, nthreads));
}

/* ---- int8 activations (opt-in: --gguf-activations int8) ---------------------------------------
 *
 * llama.cpp's numerics: each row of x is cut into blocks of 32 and quantized to int8 with one
 * fp32 scale per block (d = max|x| / 127, q = round(x / d)); a weight block then meets an x block
 * in integer arithmetic and only the block's sums are scaled:
 *     Q4_1, QU4 (w = dw * qw + mw, qw in 0..15):  dw dx sum(qw qx) + mw (dx sum(qx))
 *     QU8 (per half block h: w = dh * qw + mh, qw in 0..255):  sum over h of dh dx sum_h(qw qx) + mh (dx sum_h(qx))
 *     Q8_0 (w = dw * qw, qw in -128..127):   dw dx sum(qw qx)
 * sum(qw qx) is exact in int32, so the only rounding beyond fp32's is x's (about 0.4% of a
 * block's largest value). QU4 and QU8 are what a Q4_K_M file's Q4_K/Q4_0 and Q5/Q6_K layers are
 * repacked to (their fp32 scales kept: no weight changes). QU8's codes are kept less 128, as signed
 * bytes, and meet x as Q8_0's do; sum_h(qw qx) = sum_h((qw - 128) qx) + 128 sum_h(qx), in integers.
 *
 * The weights are repacked once (agora_repack_i8) so that 8 output rows are computed together
 * without any horizontal sum: for each group of 8 rows and each block, 4 consecutive weights of
 * each row sit side by side, so one 32-byte vector holds "chunk c" (weights 4c..4c+3) of all 8
 * rows, and x's 4 matching bytes are broadcast against it:
 *
 *     chunk vector c:  row0[4c..4c+3] row1[4c..4c+3] ... row7[4c..4c+3]      (32 bytes)
 *     dpbusd(acc, chunk c, broadcast x[4c..4c+3])  -> lane n += row n's 4 products
 *     after 8 chunks: lane n = row n's integer dot for the block; one FMA scales all 8
 *
 * A group's block ("tile") holds the 8 rows' scales, then the chunk vectors: Q4_1: d[8] m[8] (fp16),
 * then 4 vectors whose low nibbles are chunks 0..3 and high nibbles chunks 4..7 (160 bytes, as the 8
 * source blocks); QU4: the same with fp32 d[8] m[8] (192 bytes); Q8_0: d[8] (fp16), then the 8 chunk
 * vectors (272 bytes); QU8: fp32 d0[8] d1[8] m0[8] m1[8] (half blocks 0 and 1: chunks 0..3 and 4..7),
 * then the 8 chunk vectors (384 bytes). Tiles are group-major ([N / 8, K / 32]), so a group's row of
 * tiles streams contiguously. AVX2 without VNNI uses maddubs (u8 x s8 pairs into s16: Q8_0's and QU8's
 * signs move onto x, |w| <= 128 keeps every pair sum within s16). */
#define I8_GROUP 8
#define I8_ROWS 4 /* rows of x per pass over a group's tiles (accumulators + unpacked chunks fit 16 registers) */

static inline int i8_nibbles(int fmt) { return fmt == FMT_Q4_1 || fmt == FMT_QU4; }
static inline int i8_signed(int fmt) { return fmt == FMT_Q8_0 || fmt == FMT_QU8; } /* codes as int8 in the tiles */
static inline int64_t i8_tile_bytes(int fmt) { return I8_GROUP * fmt_bytes(fmt); /* its 8 blocks' bytes */ }
/* A block's scale fields, in its order (d; d m; d0 d1 m0 m1), and each one's bytes (fp16 or fp32). A tile holds
 * field f of its 8 rows side by side, field after field, then the chunk vectors. */
static inline int i8_field_count(int fmt) { return fmt == FMT_Q8_0 ? 1 : fmt == FMT_QU8 ? 4 : 2; }
static inline int i8_field_bytes(int fmt) { return fmt == FMT_Q4_1 || fmt == FMT_Q8_0 ? 2 : 4; }
static inline int64_t i8_field_at(int fmt, int f, int n) { return i8_field_bytes(fmt) * (I8_GROUP * f + n); }
static inline int64_t i8_chunks_at(int fmt) { return i8_field_at(fmt, i8_field_count(fmt), 0); }

/* One GGUF-layout block's scale fields and 32 codes (as bytes: 0..15, Q8_0's int8 bits, QU8's 0..255) to and
 * from row n of a tile. `to_tile`: block -> tile, else tile -> block. */
static void i8_fields(int fmt, uint8_t *blk, uint8_t *t, int n, uint8_t q[QK], int to_tile) {
    const int w = i8_field_bytes(fmt), fields = i8_field_count(fmt);
    for (int f = 0; f < fields; f++)
        if (to_tile) memcpy(t + i8_field_at(fmt, f, n), blk + w * f, w);
        else memcpy(blk + w * f, t + i8_field_at(fmt, f, n), w);
    uint8_t *qs = blk + w * fields;
    if (!i8_nibbles(fmt)) {
        if (to_tile) memcpy(q, qs, QK); else memcpy(qs, q, QK);
        return;
    }
    for (int j = 0; j < 16; j++)
        if (to_tile) q[j] = qs[j] & 0x0f, q[j + 16] = qs[j] >> 4;
        else qs[j] = (uint8_t)(q[j] | q[j + 16] << 4);
}

/* The chunk vectors' byte for code j (0..31) of row n, and which nibble holds it (-1: a whole byte). */
static inline int64_t i8_code_at(int fmt, int n, int j, int *shift) {
    const int c = j / 4;
    if (!i8_nibbles(fmt)) {
        *shift = -1;
        return i8_chunks_at(fmt) + c * 32 + n * 4 + j % 4;
    }
    *shift = c < 4 ? 0 : 4;
    return i8_chunks_at(fmt) + (c & 3) * 32 + n * 4 + j % 4;
}

/* Code j of row n of a tile as its block holds it (Q8_0: the int8's bits; QU8: 0..255, the tile keeping it less
 * 128). */
static inline uint8_t i8_code(int fmt, const uint8_t *t, int n, int j) {
    int shift;
    const uint8_t byte = t[i8_code_at(fmt, n, j, &shift)];
    if (shift >= 0) return (byte >> shift) & 0x0f;
    return fmt == FMT_QU8 ? byte ^ 0x80 : byte;
}

/* GGUF-layout rows [N, K / 32 blocks] of `fmt` -> tiles [N / 8, K / 32], or back (`to_tile` 0); N % 8 == 0.
 * Nibble tiles are written whole (each byte set from its two codes), so no byte is read before it is set. */
static void repack_i8(int fmt, uint8_t *w, int64_t N, int64_t K, uint8_t *tiles, int to_tile) {
    const int64_t nb = K / QK, bytes = fmt_bytes(fmt), tb = i8_tile_bytes(fmt);
    for (int64_t g = 0; g < N / I8_GROUP; g++)
        for (int64_t b = 0; b < nb; b++) {
            uint8_t *t = tiles + (g * nb + b) * tb;
            uint8_t q[I8_GROUP][QK];
            if (!to_tile)
                for (int n = 0; n < I8_GROUP; n++)
                    for (int j = 0; j < QK; j++) q[n][j] = i8_code(fmt, t, n, j);
            for (int n = 0; n < I8_GROUP; n++)
                i8_fields(fmt, w + ((g * I8_GROUP + n) * nb + b) * bytes, t, n, q[n], to_tile);
            if (to_tile)
                for (int n = 0; n < I8_GROUP; n++)
                    for (int j = 0; j < QK; j++) {
                        int shift;
                        uint8_t *byte = t + i8_code_at(fmt, n, j, &shift);
                        if (shift < 0) *byte = fmt == FMT_QU8 ? q[n][j] ^ 0x80 : q[n][j]; /* QU8: less 128 */
                        else if (shift == 0) *byte = (uint8_t)(q[n][j] | q[n][j + 16] << 4); /* (both nibbles) */
                    }
        }
}

/* GGUF-layout rows [N, K / 32 blocks] of `fmt` (FMT_*) -> the int8 kernel's tiles [N / 8, K / 32]; N % 8 == 0. */
void agora_repack_i8(const uint8_t *w, int64_t N, int64_t K, int64_t fmt, uint8_t *out) {
    repack_i8((int)fmt, (uint8_t *)w, N, K, out, 1);
}

/* The inverse: tiles back to GGUF-layout rows (to change a layer's format after repacking). */
void agora_unrepack_i8(const uint8_t *tiles, int64_t N, int64_t K, int64_t fmt, uint8_t *out) {
    repack_i8((int)fmt, out, N, K, (uint8_t *)tiles, 0);
}

/* W [N, K] in fp32 from its tiles: each group's 8 rows back to blocks, then dequant_blocks' unpacking, so the same
 * weights agora_dequant gives from the blocks (a long step's GEMM weights under --gguf-weights blocks). 1 where a
 * thread's buffer for a group's blocks could not be allocated. */
static int dequant_i8(int fmt, const uint8_t *tiles, int64_t N, int64_t K, float *out, int64_t nthreads) {
    const int64_t row_bytes = K / QK * fmt_bytes(fmt);
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        uint8_t *rows = malloc((size_t)(I8_GROUP * row_bytes));
        failed |= rows == NULL;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < N / I8_GROUP; g++) {
            if (!rows) continue;
            repack_i8(fmt, rows, I8_GROUP, K, (uint8_t *)tiles + g * I8_GROUP * row_bytes, 0);
            dequant_blocks(fmt, rows, I8_GROUP, K, out + g * I8_GROUP * K, 1);
        }
        free(rows);
    }
    return failed;
}

/* 0, or -1 where memory ran out (out then incomplete) */
int64_t agora_dequant_i8(int64_t fmt, const uint8_t *tiles, int64_t N, int64_t K, float *out, int64_t nthreads) {
    int failed = 0;
    TIMED(failed = dequant_i8((int)fmt, tiles, N, K, out, nthreads));
    return failed ? -1 : 0;
}

typedef struct {
    int8_t *q; /* [M, K] */
    float *d, *s; /* [M, K / 32]: scale, and scale * sum(q) (the offset term) */
    float *n0, *n1; /* [M, K / 32]: sum(q) over each half block (QU8's terms; integers, exact as floats) */
} xq8;

static void quantize_x(const float *x, int64_t M, int64_t K, xq8 out) {
    for (int64_t i = 0; i < M * (K / QK); i++) {
        const float *xb = x + i * QK;
        int8_t *qb = out.q + i * QK;
        float amax = 0.f;
        for (int j = 0; j < QK; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float d = amax / 127.f, id = d > 0.f ? 127.f / amax : 0.f;
        int32_t half[2] = {0, 0};
#if AGORA_AVX2
        const __m256 vid = _mm256_set1_ps(id);
        __m256i q32[4];
        for (int j = 0; j < 4; j++)
            q32[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xb + 8 * j), vid),
                                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        /* pack 32 int32 -> 32 int8 (values are within -127..127), then undo the lane interleave */
        __m256i p8 = _mm256_packs_epi16(_mm256_packs_epi32(q32[0], q32[1]), _mm256_packs_epi32(q32[2], q32[3]));
        p8 = _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)qb, p8);
        for (int h = 0; h < 2; h++) {
            const __m256i s32 = _mm256_add_epi32(q32[2 * h], q32[2 * h + 1]);
            __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s32), _mm256_extracti128_si256(s32, 1));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
            s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
            half[h] = _mm_cvtsi128_si32(s4);
        }
#else
        for (int j = 0; j < QK; j++) {
            const int v = (int)nearbyintf(xb[j] * id);
            qb[j] = (int8_t)v;
            half[j / 16] += v;
        }
#endif
        out.d[i] = d;
        out.s[i] = d * (float)(half[0] + half[1]);
        out.n0[i] = (float)half[0];
        out.n1[i] = (float)half[1];
    }
}

/* Floats of scratch linear_i8 needs for M rows of K (the quantized x and its scales). */
static inline int64_t i8_scratch_floats(int64_t M, int64_t K) { return M * K / 4 + 4 * M * (K / QK) + 16; }

#if AGORA_AVX2
/* lanes += sum over 4-byte groups of u[j] * s[j] (u unsigned, s signed) */
static inline __m256i dot_acc(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* y[r, 8 rows of group] for R (1..I8_ROWS) rows of x, over `nb` tiles of one group; fmt a constant after
 * inlining. */
static inline __attribute__((always_inline)) void group_dot_i8(int fmt, const uint8_t *tiles, int64_t nb, xq8 x,
                                                               int64_t row0, int64_t K, int R, float *y,
                                                               int64_t ldy) {
    __m256 acc[I8_ROWS];
    for (int r = 0; r < R; r++) acc[r] = _mm256_setzero_ps();
    const int64_t tb = i8_tile_bytes(fmt), nbx = K / QK, at0 = i8_chunks_at(fmt);
    const __m256i mask = _mm256_set1_epi8(0x0f);
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *t = tiles + b * tb;
        for (int64_t off = 0; PF_BYTES && off < tb; off += 64)
            _mm_prefetch((const char *)(t + PF_BYTES + off), _MM_HINT_T0);
        /* the 8 rows' fields: d (Q8_0); d, m (Q4_1, QU4); d0, d1, m0, m1 (QU8) */
        __m256 fv[4];
        for (int f = 0; f < i8_field_count(fmt); f++) {
            const uint8_t *at = t + i8_field_at(fmt, f, 0);
            fv[f] = i8_field_bytes(fmt) == 2 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)at))
                                             : _mm256_loadu_ps((const float *)at);
        }
        const __m256 dw = fv[0], dw1 = fmt == FMT_QU8 ? fv[1] : dw;
        const __m256 mw = fmt == FMT_QU8 ? fv[2] : i8_nibbles(fmt) ? fv[1] : dw, mw1 = fmt == FMT_QU8 ? fv[3] : dw;
        __m256i v[8], sg[8];
        if (i8_nibbles(fmt)) {
            for (int c = 0; c < 4; c++) {
                const __m256i p = _mm256_loadu_si256((const __m256i *)(t + at0 + 32 * c));
                v[c] = _mm256_and_si256(p, mask);
                v[c + 4] = _mm256_and_si256(_mm256_srli_epi16(p, 4), mask);
            }
        } else {
            for (int c = 0; c < 8; c++) {
                sg[c] = _mm256_loadu_si256((const __m256i *)(t + at0 + 32 * c));
                v[c] = _mm256_sign_epi8(sg[c], sg[c]); /* |w|; its signs move onto x */
            }
        }
        for (int r = 0; r < R; r++) {
            const int64_t row = row0 + r, at = row * nbx + b;
            const int8_t *xq = x.q + row * K + b * QK;
            __m256i isum[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
            for (int c = 0; c < 8; c++) {
                int32_t four;
                memcpy(&four, xq + 4 * c, 4);
                __m256i xb = _mm256_set1_epi32(four);
                if (i8_signed(fmt)) xb = _mm256_sign_epi8(xb, sg[c]);
                const int h = fmt == FMT_QU8 && c >= 4;
                isum[h] = dot_acc(isum[h], v[c], xb);
            }
            const __m256 xd = _mm256_set1_ps(x.d[at]);
            if (fmt == FMT_QU8) { /* each half's codes less 128 added back: sums of integers under 2^24, exact */
                const float n0 = x.n0[at], n1 = x.n1[at];
                const __m256 i0 = _mm256_add_ps(_mm256_cvtepi32_ps(isum[0]), _mm256_set1_ps(128.f * n0));
                const __m256 i1 = _mm256_add_ps(_mm256_cvtepi32_ps(isum[1]), _mm256_set1_ps(128.f * n1));
                acc[r] = _mm256_fmadd_ps(i0, _mm256_mul_ps(dw, xd), acc[r]);
                acc[r] = _mm256_fmadd_ps(i1, _mm256_mul_ps(dw1, xd), acc[r]);
                acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.d[at] * n0), acc[r]);
                acc[r] = _mm256_fmadd_ps(mw1, _mm256_set1_ps(x.d[at] * n1), acc[r]);
                continue;
            }
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[0]), _mm256_mul_ps(dw, xd), acc[r]);
            if (i8_nibbles(fmt)) {
                acc[r] = _mm256_fmadd_ps(mw, _mm256_set1_ps(x.s[at]), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; r++) _mm256_storeu_ps(y + r * ldy, acc[r]);
}
#else
/* A tile's scale field f (0: d or d0, 1: m or d1, 2: m0, 3: m1) of row n. */
static inline float i8_scale(int fmt, const uint8_t *t, int f, int n) {
    const uint8_t *at = t + i8_field_at(fmt, f, n);
    return i8_field_bytes(fmt) == 2 ? half_to_float(at) : f32_at(at);
}

static inline void group_dot_i8(int fmt, const uint8_t *tiles, int64_t nb, xq8 x, int64_t row0, int64_t K, int R,
                                float *y, int64_t ldy) {
    const int64_t tb = i8_tile_bytes(fmt), nbx = K / QK;
    for (int r = 0; r < R; r++)
        for (int n = 0; n < I8_GROUP; n++) {
            float acc = 0.f;
            for (int64_t b = 0; b < nb; b++) {
                const uint8_t *t = tiles + b * tb;
                const int8_t *xq = x.q + (row0 + r) * K + b * QK;
                const int64_t at = (row0 + r) * nbx + b;
                int32_t dot[2] = {0, 0};
                for (int j = 0; j < QK; j++) {
                    const uint8_t code = i8_code(fmt, t, n, j);
                    dot[fmt == FMT_QU8 && j >= 16] += (fmt == FMT_Q8_0 ? (int8_t)code : code) * xq[j];
                }
                acc += i8_scale(fmt, t, 0, n) * x.d[at] * (float)dot[0];
                if (fmt == FMT_QU8) {
                    acc += i8_scale(fmt, t, 1, n) * x.d[at] * (float)dot[1];
                    acc += i8_scale(fmt, t, 2, n) * (x.d[at] * x.n0[at]) + i8_scale(fmt, t, 3, n) * (x.d[at] * x.n1[at]);
                } else if (i8_nibbles(fmt)) {
                    acc += i8_scale(fmt, t, 1, n) * x.s[at];
                }
            }
            y[r * ldy + n] = acc;
        }
}
#endif

/* One group's tiles against R rows of x, with fmt and R constants in each case. */
static inline __attribute__((always_inline)) void group_rows_i8(int fmt, const uint8_t *tiles, int64_t nb, xq8 x,
                                                                int64_t row0, int64_t K, int64_t R, float *y,
                                                                int64_t ldy) {
    switch (R) {
        case 4: group_dot_i8(fmt, tiles, nb, x, row0, K, 4, y, ldy); break;
        case 3: group_dot_i8(fmt, tiles, nb, x, row0, K, 3, y, ldy); break;
        case 2: group_dot_i8(fmt, tiles, nb, x, row0, K, 2, y, ldy); break;
        default: group_dot_i8(fmt, tiles, nb, x, row0, K, 1, y, ldy); break;
    }
}

/* y[M, N] = x[M, K] @ W^T (+ bias) with x quantized to int8 (into `scratch`, i8_scratch_floats
 * floats) and W repacked by agora_repack_i8. Each thread takes whole groups of 8 weight rows. */
static void linear_i8(int fmt, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N, const float *bias,
                      float *y, float *scratch, int64_t nthreads) {
    const int64_t nb = K / QK, groups = N / I8_GROUP, tb = i8_tile_bytes(fmt);
    xq8 xq = {(int8_t *)(scratch + 4 * M * nb), scratch, scratch + M * nb, scratch + 2 * M * nb, scratch + 3 * M * nb};
    quantize_x(x, M, K, xq);
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *tiles = w + g * nb * tb;
        for (int64_t m = 0; m < M; m += I8_ROWS) {
            const int64_t R = M - m < I8_ROWS ? M - m : I8_ROWS;
            float *yg = y + m * N + g * I8_GROUP;
            switch (fmt) {
                case FMT_Q8_0: group_rows_i8(FMT_Q8_0, tiles, nb, xq, m, K, R, yg, N); break;
                case FMT_QU8: group_rows_i8(FMT_QU8, tiles, nb, xq, m, K, R, yg, N); break;
                case FMT_QU4: group_rows_i8(FMT_QU4, tiles, nb, xq, m, K, R, yg, N); break;
                default: group_rows_i8(FMT_Q4_1, tiles, nb, xq, m, K, R, yg, N); break;
            }
        }
        if (bias)
            for (int64_t r = 0; r < M; r++)
                for (int64_t n = g * I8_GROUP; n < (g + 1) * I8_GROUP; n++) y[r * N + n] += bias[n];
    }
}

int64_t agora_linear_i8_scratch_floats(int64_t M, int64_t K) { return i8_scratch_floats(M, K); }

/* As agora_linear_q4_1 / _q8_0 / _qu4 / _qu8 with int8 activations: fmt FMT_*, W repacked by agora_repack_i8,
 * N % 8 == 0; scratch: agora_linear_i8_scratch_floats(M, K) floats. */
void agora_linear_i8(int64_t fmt, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t N,
                     const float *bias, float *y, float *scratch, int64_t nthreads) {
    TIMED(linear_i8((int)fmt, x, M, K, w, N, bias, y, scratch, nthreads));
}

#if AGORA_AVX2
/* exp(x) for x <= 0 (softmax after subtracting the max), ~2 ulp: 2^n * p(r), r = x - n ln2. */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#if defined(__AVX512F__)
/* exp256's arithmetic on 16 lanes: each lane's result is exactly exp256's for it. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

/* Sums of 8 vectors, lane j of the result = sum of a[j]. */
static inline __m256 hsum8(const __m256 a[8]) {
    __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
    __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
    __m256 s0123 = _mm256_hadd_ps(s01, s23), s4567 = _mm256_hadd_ps(s45, s67);
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}
#endif

/* K/V elements are fp32, fp16 or bf16 (KV_*: what the cache holds; F16C widens 8 fp16 at a time, a bf16 is the
 * top half of its fp32, so a shift widens it); `kv` is a constant in each specialisation below, so the branches
 * cost nothing. Offsets count elements, not bytes. */
#define KV_F32 0
#define KV_F16 1
#define KV_BF16 2
static inline __attribute__((always_inline)) const void *kv_at(const void *p, int64_t i, int kv) {
    return (const char *)p + i * (kv ? 2 : 4);
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, sizeof f);
    return f;
}

static inline __attribute__((always_inline)) float kv_load1(const void *p, int kv) {
    if (kv == KV_BF16) return bf16_to_float(*(const uint16_t *)p);
    return kv ? half_to_float((const uint8_t *)p) : *(const float *)p;
}

#if AGORA_AVX2
static inline __attribute__((always_inline)) __m256 kv_load8(const void *p, int kv) {
    if (kv == KV_BF16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
    return kv ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)) : _mm256_loadu_ps((const float *)p);
}
#endif
#if AGORA_AVX2 && defined(__AVX512F__)
static inline __attribute__((always_inline)) __m512 kv_load16(const void *p, int kv) {
    if (kv == KV_BF16)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
    return kv ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps((const float *)p);
}
#endif

/* Element offset of position pos's token row in a paged cache [blocks, BS, Hkv, D]. */
static inline int64_t token_row(const int64_t *table, int64_t pos, int64_t BS, int64_t tok_stride) {
    return (table[pos / BS] * BS + pos % BS) * tok_stride;
}

/* Software prefetch of the `bytes` of a K or V row at p into L2, KEY_PREFETCH / VALUE_PREFETCH
 * tokens before the loops below reach it. Decode attention reads each cached row once, and its FMAs leave the
 * out-of-order window too short to overlap the misses: without this, compute and memory time
 * added up (2 Zen 4 cores, 32 requests x 1,000 tokens x 30 layers, cold: 110-125 ms per step,
 * 13 GB/s; with it 82-90 ms, 18 GB/s, which is what a bare read of the same scattered 12 KB
 * blocks gets). Into L1 (_MM_HINT_T0) was slower than no prefetch at all. */
#define KEY_PREFETCH 16
#define VALUE_PREFETCH 64
#if AGORA_AVX2
static inline __attribute__((always_inline)) void prefetch_row(const void *p, int64_t bytes) {
#ifdef AGORA_NO_PREFETCH /* for the side-by-side in benchmarks/cpu_decode_attention.py */
    (void)p, (void)bytes;
    return;
#endif
    const char *c = (const char *)p;
    for (int64_t l = 0; l < bytes; l += 64) _mm_prefetch(c + l, _MM_HINT_T1);
    _mm_prefetch(c + bytes - 1, _MM_HINT_T1);
}

/* Lines [from, to) of a run of rows (`lines` 64-byte lines each, row after row) into L2, counted from each row's
 * line-aligned start: a share of a few rows' lines, so that the prefetches of the rows ahead are spread over the
 * arithmetic meanwhile. Asked for a whole row (or 8) at a time, they stalled on the full miss queues: on a Zen 3
 * the scores pass over K took 1.8x a bare read of the same rows, spread about as long as the read. */
static inline __attribute__((always_inline)) void prefetch_lines(const void *const *rows, int64_t lines, int64_t from,
                                                                 int64_t to) {
#ifdef AGORA_NO_PREFETCH
    (void)rows, (void)lines, (void)from, (void)to;
    return;
#endif
    for (int64_t l = from; l < to; l++)
        _mm_prefetch((const char *)((uintptr_t)rows[l / lines] & ~(uintptr_t)63) + l % lines * 64, _MM_HINT_T1);
}
#endif

/* Bytes of a token row that G query heads (`group` per KV head) read: their KV heads' slices. */
static inline int64_t kv_row_bytes(int64_t G, int64_t group, int64_t D, int kv) {
    return (G + group - 1) / group * D * (kv ? 2 : 4);
}

/* Decode attention takes NH (1..3, a constant in each call) query heads that share a KV head in one pass, each key
 * (or value) slice loaded and widened once for all NH of them: 16 lanes at a time with AVX-512, 8 with AVX2.
 * How many query heads from head g on one pass takes: those of g's KV head left, at most 3. */
static inline int heads_in_pass(int64_t g, int64_t group) {
    const int64_t left = group - g % group;
    return left < 3 ? (int)left : 3;
}

/* The passes (heads_in_pass at a time) that cover G query heads. */
static inline int64_t head_passes(int64_t G, int64_t group) {
    int64_t passes = 0;
    for (int64_t g = 0; g < G; g += heads_in_pass(g, group)) passes++;
    return passes;
}

/* The pass's head count (heads_in_pass) as a constant NH in each call, so its loops over heads unroll. */
#define BY_HEADS(nh, call)                                                                                             \
    switch (nh) {                                                                                                      \
    case 3: { const int NH = 3; call; } break;                                                                         \
    case 2: { const int NH = 2; call; } break;                                                                         \
    default: { const int NH = 1; call; } break;                                                                        \
    }

#if AGORA_AVX2
/* scores[h * n + i ..] for keys i .. i + 4: NH heads' queries q + h * D against the slices at kp[j] + off, 8 lanes.
 * 3 heads x 4 keys of accumulators, 3 queries and a key: all 16 registers. Each score is summed as hsum8 sums it. */
static inline __attribute__((always_inline)) void score_keys4(const float *q, const void **kp, int64_t i, int64_t n,
                                                              int64_t off, int64_t D, __m128 vs, float *scores,
                                                              int kv, int NH) {
    __m256 acc[3][4];
    for (int h = 0; h < NH; h++)
        for (int j = 0; j < 4; j++) acc[h][j] = _mm256_setzero_ps();
    for (int64_t d = 0; d < D; d += 8) {
        __m256 qv[3];
        for (int h = 0; h < NH; h++) qv[h] = _mm256_loadu_ps(q + h * D + d);
        for (int j = 0; j < 4; j++) {
            const __m256 k = kv_load8(kv_at(kp[i + j], off + d, kv), kv);
            for (int h = 0; h < NH; h++) acc[h][j] = _mm256_fmadd_ps(qv[h], k, acc[h][j]);
        }
    }
    for (int h = 0; h < NH; h++) {
        const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
        const __m128 sum = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        _mm_storeu_ps(scores + h * n + i, _mm_mul_ps(sum, vs));
    }
}

/* o[h * D + dc .. + 32] += sum_{i0 <= i < i1} probs[h * n + i] * v_i[off + dc .. + 32] for NH heads, 8 lanes. Each
 * token's step also prefetches lines [pf_from, pf_to) of the row VALUE_PREFETCH tokens on (`lines` a row). */
static inline __attribute__((always_inline)) void value_rows32(const float *probs, const void **vp, int64_t i0,
                                                               int64_t i1, int64_t n, int64_t off, int64_t D,
                                                               float *o, int64_t lines, int64_t pf_from,
                                                               int64_t pf_to, int kv, int NH) {
    __m256 a[3][4];
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < 4; u++) a[h][u] = _mm256_loadu_ps(o + h * D + 8 * u);
    for (int64_t i = i0; i < i1; i++) {
        if (i + VALUE_PREFETCH < n) prefetch_lines(vp + i + VALUE_PREFETCH, lines, pf_from, pf_to);
        const void *v = kv_at(vp[i], off, kv);
        __m256 p[3];
        for (int h = 0; h < NH; h++) p[h] = _mm256_set1_ps(probs[h * n + i]);
        for (int u = 0; u < 4; u++) {
            const __m256 x = kv_load8(kv_at(v, 8 * u, kv), kv);
            for (int h = 0; h < NH; h++) a[h][u] = _mm256_fmadd_ps(p[h], x, a[h][u]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < 4; u++) _mm256_storeu_ps(o + h * D + 8 * u, a[h][u]);
}
#endif

#if AGORA_AVX2 && defined(__AVX512F__)

/* scores[h * n + j] for keys i .. i + 8: NH heads' queries q + h * D against the slices at kp[j] + off. */
static inline __attribute__((always_inline)) void score_keys8(const float *q, const void **kp, int64_t i, int64_t n,
                                                              int64_t off, int64_t D, __m256 vs, float *scores,
                                                              int kv, int NH) {
    __m512 acc[3][8];
    for (int h = 0; h < NH; h++)
        for (int j = 0; j < 8; j++) acc[h][j] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        __m512 qv[3];
        for (int h = 0; h < NH; h++) qv[h] = _mm512_loadu_ps(q + h * D + d);
        for (int j = 0; j < 8; j++) {
            const __m512 k = kv_load16(kv_at(kp[i + j], off + d, kv), kv);
            for (int h = 0; h < NH; h++) acc[h][j] = _mm512_fmadd_ps(qv[h], k, acc[h][j]);
        }
    }
    for (int h = 0; h < NH; h++) {
        __m256 a8[8];
        for (int j = 0; j < 8; j++)
            a8[j] = _mm256_add_ps(_mm512_castps512_ps256(acc[h][j]),
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[h][j]), 1)));
        _mm256_storeu_ps(scores + h * n + i, _mm256_mul_ps(hsum8(a8), vs));
    }
}

/* o[h * D + dc .. + 64] += sum_{i0 <= i < i1} probs[h * n + i] * v_i[off + dc .. + 64] for NH heads. */
static inline __attribute__((always_inline)) void value_rows64(const float *probs, const void **vp, int64_t i0,
                                                               int64_t i1, int64_t n, int64_t off, int64_t D,
                                                               float *o, int prefetch, int64_t row_bytes, int kv,
                                                               int NH) {
    __m512 a[3][4];
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < 4; u++) a[h][u] = _mm512_loadu_ps(o + h * D + 16 * u);
    for (int64_t i = i0; i < i1; i++) {
        if (prefetch && i + VALUE_PREFETCH < n) prefetch_row(vp[i + VALUE_PREFETCH], row_bytes);
        const void *v = kv_at(vp[i], off, kv);
        __m512 x[4];
        for (int u = 0; u < 4; u++) x[u] = kv_load16(kv_at(v, 16 * u, kv), kv);
        for (int h = 0; h < NH; h++) {
            const __m512 p = _mm512_set1_ps(probs[h * n + i]);
            for (int u = 0; u < 4; u++) a[h][u] = _mm512_fmadd_ps(p, x[u], a[h][u]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int u = 0; u < 4; u++) _mm512_storeu_ps(o + h * D + 16 * u, a[h][u]);
}
#endif

/* Scores of G query heads against keys kp[0..n) (pointers to token rows), scaled, into
 * scores[g * n + i]. Query head g reads the key at kp[i] + (g / group) * D, so one call can
 * cover several KV heads of a token row (read whole and in order). */
static inline __attribute__((always_inline)) void attn_scores(const float *qh, const void **kp, int64_t n, int64_t G,
                                                              int64_t group, int64_t D, float scale, float *scores,
                                                              int kv) {
    int64_t i = 0;
#if AGORA_AVX2 && defined(__AVX512F__)
    if (D % 16 == 0) {
        const __m256 vs = _mm256_set1_ps(scale);
        const int64_t row_bytes = kv_row_bytes(G, group, D, kv);
        for (; i + 8 <= n; i += 8) {
            for (int64_t j = i + KEY_PREFETCH; j < i + KEY_PREFETCH + 8 && j < n; j++) prefetch_row(kp[j], row_bytes);
            for (int64_t g = 0; g < G;) {
                const int nh = heads_in_pass(g, group);
                const int64_t off = (g / group) * D;
                const float *q = qh + g * D;
                BY_HEADS(nh, score_keys8(q, kp, i, n, off, D, vs, scores + g * n, kv, NH));
                g += nh;
            }
        }
    }
#endif
#if AGORA_AVX2
    if (D % 8 == 0) {
        const __m128 vs = _mm_set1_ps(scale);
        const int64_t lines = (kv_row_bytes(G, group, D, kv) + 63) / 64;
        const int64_t calls = 2 * head_passes(G, group); /* score_keys4 calls per 8 keys */
        for (; i + 8 <= n; i += 8) {
            /* the 8 rows KEY_PREFETCH tokens on, a share of their lines before each call */
            const int64_t ahead = i + KEY_PREFETCH, rows = n - ahead < 8 ? (n > ahead ? n - ahead : 0) : 8;
            const int64_t total = rows * lines, per = (total + calls - 1) / calls;
            int64_t next = 0;
            for (int64_t g = 0; g < G;) {
                const int nh = heads_in_pass(g, group);
                const int64_t off = (g / group) * D;
                const float *q = qh + g * D;
                for (int64_t j = i; j < i + 8; j += 4) {
                    prefetch_lines(kp + ahead, lines, next, next + per < total ? next + per : total);
                    next += per;
                    BY_HEADS(nh, score_keys4(q, kp, j, n, off, D, vs, scores + g * n, kv, NH));
                }
                g += nh;
            }
        }
    }
#endif
    for (; i < n; i++) {
        for (int64_t g = 0; g < G; g++) {
            const float *qg = qh + g * D;
            const void *k = kv_at(kp[i], (g / group) * D, kv);
            float s = 0.f;
            for (int64_t d = 0; d < D; d++) s += qg[d] * kv_load1(kv_at(k, d, kv), kv);
            scores[g * n + i] = s * scale;
        }
    }
}

/* max(m, s[0..n)). */
static inline float row_max(const float *s, int64_t n, float m) {
    int64_t i = 0;
#if AGORA_AVX2
    if (n >= 8) {
        __m256 vmax = _mm256_set1_ps(m);
        for (; i + 8 <= n; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + i));
        __m128 h4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        h4 = _mm_max_ps(h4, _mm_movehl_ps(h4, h4));
        h4 = _mm_max_ss(h4, _mm_movehdup_ps(h4));
        m = _mm_cvtss_f32(h4);
    }
#endif
    for (; i < n; i++) m = s[i] > m ? s[i] : m;
    return m;
}

/* In place s[i] <- exp(s[i] - m) for i < n (m >= every s[i]); returns their sum. */
static inline float exp_sum(float *s, int64_t n, float m) {
    int64_t i = 0;
    float sum = 0.f;
#if AGORA_AVX2
    const __m256 vm = _mm256_set1_ps(m);
    __m256 vsum = _mm256_setzero_ps();
#if defined(__AVX512F__)
    /* 16 at a time; the sum still adds each 8 in turn, as the loop below does, so it is the same sum */
    for (const __m512 vm16 = _mm512_set1_ps(m); i + 16 <= n; i += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm16));
        _mm512_storeu_ps(s + i, e);
        vsum = _mm256_add_ps(vsum, _mm512_castps512_ps256(e));
        vsum = _mm256_add_ps(vsum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    }
#endif
    for (; i + 8 <= n; i += 8) {
        const __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(s + i), vm));
        _mm256_storeu_ps(s + i, e);
        vsum = _mm256_add_ps(vsum, e);
    }
    sum = hsum(vsum);
#endif
    for (; i < n; i++) {
        s[i] = expf(s[i] - m);
        sum += s[i];
    }
    return sum;
}

/* out[g] = sum_i probs[g * n + i] * (vp[i] + (g / group) * D). Token-major, so each V row is
 * read once, in order; the accumulators ([G, D], a few KB) stay in L1. */
static inline __attribute__((always_inline)) void attn_values(const float *probs, const void **vp, int64_t n,
                                                              int64_t G, int64_t group, int64_t D, float *out,
                                                              int kv) {
    memset(out, 0, sizeof(float) * G * D);
#if AGORA_AVX2 && defined(__AVX512F__)
    if (D % 64 == 0) { /* as below, 16 lanes wide and each V slice widened once for up to 3 heads */
        const int64_t row_bytes = kv_row_bytes(G, group, D, kv);
        for (int64_t i0 = 0; i0 < n; i0 += 64) {
            const int64_t i1 = i0 + 64 < n ? i0 + 64 : n;
            for (int64_t g = 0; g < G;) {
                const int nh = heads_in_pass(g, group);
                const int64_t off = (g / group) * D;
                for (int64_t dc = 0; dc < D; dc += 64) {
                    const int pf = g == 0 && dc == 0;
                    float *o = out + g * D + dc;
                    BY_HEADS(nh, value_rows64(probs + g * n, vp, i0, i1, n, off + dc, D, o, pf, row_bytes, kv, NH));
                }
                g += nh;
            }
        }
        return;
    }
#endif
#if AGORA_AVX2
    if (D % 32 == 0) {
        /* Tiles of 64 tokens (their V rows stay in L2 while the heads pass over them); per pass of up to 3 heads
         * and 32-wide slice of D, their accumulators live in registers. Each pass over a tile prefetches its
         * share of the lines of the rows VALUE_PREFETCH tokens on (prefetch_lines). */
        const int64_t lines = (kv_row_bytes(G, group, D, kv) + 63) / 64;
        const int64_t passes = head_passes(G, group) * (D / 32); /* over a tile: of up to 3 heads and 32 columns */
        const int64_t per = (lines + passes - 1) / passes; /* lines of each row ahead a pass prefetches */
        for (int64_t i0 = 0; i0 < n; i0 += 64) {
            const int64_t i1 = i0 + 64 < n ? i0 + 64 : n;
            int64_t from = 0;
            for (int64_t g = 0; g < G;) {
                const int nh = heads_in_pass(g, group);
                const int64_t off = (g / group) * D;
                for (int64_t dc = 0; dc < D; dc += 32) {
                    const int64_t to = from + per < lines ? from + per : lines;
                    float *o = out + g * D + dc;
                    BY_HEADS(nh, value_rows32(probs + g * n, vp, i0, i1, n, off + dc, D, o, lines, from, to, kv, NH));
                    from = to;
                }
                g += nh;
            }
        }
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) {
        for (int64_t g = 0; g < G; g++) {
            const float p = probs[g * n + i];
            const void *v = kv_at(vp[i], (g / group) * D, kv);
            float *o = out + g * D;
            int64_t d = 0;
#if AGORA_AVX2
            const __m256 vp8 = _mm256_set1_ps(p);
            for (; d + 8 <= D; d += 8)
                _mm256_storeu_ps(o + d, _mm256_fmadd_ps(vp8, kv_load8(kv_at(v, d, kv), kv), _mm256_loadu_ps(o + d)));
#endif
            for (; d < D; d++) o[d] += p * kv_load1(kv_at(v, d, kv), kv);
        }
    }
}

/* Attention of B single-token queries over their paged K/V.
 *   q:            [B, H, D] contiguous
 *   k/v caches:   [num_blocks, BS, Hkv, D] contiguous, fp32, fp16 or bf16 (kv: KV_F32, KV_F16, KV_BF16)
 *   block_tables: [B, bt_stride] (row b lists request b's blocks in order)
 *   seq_lens:     [B] keys per request, the query's own already written to the cache
 *   window:       > 0 attends to the last `window` keys only
 *   out:          [B, H, D]
 *   nthreads:     the caller's torch.get_num_threads() (an OpenMP thread's own default may differ)
 * One task per (request, KV head): its G = H / Hkv query heads share every K/V read. With few
 * requests (single-stream decode) that leaves threads idle (3 KV heads on 2 threads: one waits
 * half the step), so each request's keys are also cut into `split` chunks of at least MIN_SPLIT
 * keys, flash-decoding style: a chunk keeps its own max, sum and unnormalised output, and a
 * second pass merges them.
 */
#define MIN_SPLIT 256

/* Row `row` of a task cut into `split` chunks, merged into dst[0 .. D): each chunk's part (part_size floats apart)
 * holds `rows` rows' unnormalised outputs [rows, D], then their maxes [rows], then their sums [rows];
 * out = sum_c o_c e^(m_c - m) / sum_c l_c e^(m_c - m) (a chunk that holds none of a row's keys has m_c = -inf
 * and adds nothing). */
static inline void merge_parts(const float *part, int64_t split, int64_t part_size, int64_t rows, int64_t row,
                               int64_t D, float *dst) {
    const int64_t at_mx = rows * D + row, at_sum = at_mx + rows;
    float m = -INFINITY, total = 0.f, w[split];
    for (int64_t c = 0; c < split; c++) {
        const float mc = part[c * part_size + at_mx];
        m = mc > m ? mc : m;
    }
    for (int64_t c = 0; c < split; c++) {
        const float mc = part[c * part_size + at_mx];
        w[c] = mc == -INFINITY ? 0.f : expf(mc - m);
        total += w[c] * part[c * part_size + at_sum];
    }
    for (int64_t d = 0; d < D; d++) {
        float acc = 0.f;
        for (int64_t c = 0; c < split; c++) acc += w[c] * part[c * part_size + row * D + d];
        dst[d] = acc / total;
    }
}

static inline __attribute__((always_inline)) void paged_decode(const float *q, const void *k_cache,
                                                                const void *v_cache, const int64_t *block_tables,
                                                                int64_t bt_stride, const int64_t *seq_lens, int64_t B,
                                                                int64_t H, int64_t Hkv, int64_t D, int64_t BS,
                                                                int64_t window, float scale, float *out,
                                                                int64_t nthreads, int kv) {
    const int64_t G = H / Hkv, tok_stride = Hkv * D;
    /* Enough requests to keep every thread busy: one task reads a request's whole token rows
     * (all KV heads, contiguous within a block). Otherwise one task per (request, KV head). */
    const int64_t kv_per_task = B >= 2 * nthreads ? Hkv : 1, head_tasks = B * (Hkv / kv_per_task);
    const int64_t GG = G * kv_per_task; /* query heads per task */
    int64_t split = 1;
    if (head_tasks < 4 * nthreads) {
        int64_t longest = 0;
        for (int64_t b = 0; b < B; b++) {
            const int64_t n = window > 0 && seq_lens[b] > window ? window : seq_lens[b];
            longest = n > longest ? n : longest;
        }
        split = (8 * nthreads + head_tasks - 1) / head_tasks;
        if (split > longest / MIN_SPLIT) split = longest / MIN_SPLIT;
        if (split < 1) split = 1;
    }
    const int64_t tasks = head_tasks * split, part_size = GG * (D + 2); /* outputs, maxes, sums */
    float *parts = split > 1 ? (float *)malloc(sizeof(float) * tasks * part_size) : NULL;
#pragma omp parallel num_threads(nthreads)
    {
        float *buf = NULL;
        const void **ptrs = NULL;
        int64_t cap = 0;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t ht = task / split, c = task % split;
            const int64_t b = ht / (Hkv / kv_per_task), h0 = (ht % (Hkv / kv_per_task)) * kv_per_task;
            const int64_t len = seq_lens[b];
            const int64_t start = (window > 0 && len > window) ? len - window : 0;
            const int64_t c0 = start + (len - start) * c / split, n = start + (len - start) * (c + 1) / split - c0;
            if (n > cap) {
                free(buf);
                free(ptrs);
                cap = n + 1024;
                buf = (float *)malloc(sizeof(float) * GG * cap);
                ptrs = (const void **)malloc(sizeof(void *) * 2 * cap);
            }
            const void **kp = ptrs, **vp = ptrs + cap;
            const int64_t *table = block_tables + b * bt_stride;
            for (int64_t i = 0; i < n; i++) {
                const int64_t off = token_row(table, c0 + i, BS, tok_stride) + h0 * D;
                kp[i] = kv_at(k_cache, off, kv);
                vp[i] = kv_at(v_cache, off, kv);
            }
            float *o = split > 1 ? parts + task * part_size : out + (b * H + h0 * G) * D;
            attn_scores(q + (b * H + h0 * G) * D, kp, n, GG, G, D, scale, buf, kv);
            float mx[GG], sum[GG];
            for (int64_t g = 0; g < GG; g++) {
                mx[g] = row_max(buf + g * n, n, -INFINITY);
                sum[g] = n ? exp_sum(buf + g * n, n, mx[g]) : 0.f;
            }
            attn_values(buf, vp, n, GG, G, D, o, kv);
            if (split > 1) {
                memcpy(o + GG * D, mx, sizeof mx);
                memcpy(o + GG * D + GG, sum, sizeof sum);
            } else {
                for (int64_t g = 0; g < GG; g++)
                    for (int64_t d = 0; d < D; d++) o[g * D + d] /= sum[g];
            }
        }
        free(buf);
        free(ptrs);
        if (split > 1) { /* each query head's chunks merged */
#pragma omp for schedule(static)
            for (int64_t r = 0; r < head_tasks * GG; r++) {
                const int64_t ht = r / GG, g = r % GG;
                const int64_t b = ht / (Hkv / kv_per_task), h0 = (ht % (Hkv / kv_per_task)) * kv_per_task;
                merge_parts(parts + ht * split * part_size, split, part_size, GG, g, D, out + (b * H + h0 * G + g) * D);
            }
        }
    }
    free(parts);
}

/* The three cache element types, each its own specialisation of paged_decode. */
static void paged_decode_kv(const float *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                            int64_t bt_stride, const int64_t *seq_lens, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                            int64_t BS, int64_t window, float scale, float *out, int64_t nthreads, int64_t kv) {
    if (kv == KV_F16)
        paged_decode(q, k_cache, v_cache, block_tables, bt_stride, seq_lens, B, H, Hkv, D, BS, window, scale, out,
                     nthreads, KV_F16);
    else if (kv == KV_BF16)
        paged_decode(q, k_cache, v_cache, block_tables, bt_stride, seq_lens, B, H, Hkv, D, BS, window, scale, out,
                     nthreads, KV_BF16);
    else
        paged_decode(q, k_cache, v_cache, block_tables, bt_stride, seq_lens, B, H, Hkv, D, BS, window, scale, out,
                     nthreads, KV_F32);
}

/* kv: the caches' element type (KV_F32, KV_F16, KV_BF16) */
void agora_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache,
                                  const int64_t *block_tables, int64_t bt_stride, const int64_t *seq_lens, int64_t B,
                                  int64_t H, int64_t Hkv, int64_t D, int64_t BS, int64_t window, float scale,
                                  float *out, int64_t nthreads, int64_t kv) {
    TIMED(paged_decode_kv(q, k_cache, v_cache, block_tables, bt_stride, seq_lens, B, H, Hkv, D, BS, window, scale,
                          out, nthreads, kv));
}

/* Causal attention of chunks of new tokens (prefill, or a prompt's uncached tail) over their
 * paged K/V, flash style: keys are visited in tiles of KT, with a running max and sum per
 * query row, so no [queries, keys] matrix is ever built and no key past a query's own
 * position is touched.
 *   q:           [T, H, D] fp32, the group's query tokens, request after request
 *   q_offsets:   [B + 1] first row of each request's queries in q (cumulative)
 *   ctx_starts:  [B] position of each request's first query (its tokens before are cached)
 *   block_tables, caches, window, scale, nthreads: as for paged decode
 *   out:         [T, H, D]
 * One task per (request, KV head, tile of QT queries), or with AVX-512 and enough tiles per (request, tile)
 * over all KV heads. Too few tasks to keep the threads evenly busy (one agent's verification step: 3 KV
 * heads on 2 threads) and each task's keys are also cut into chunks of at least MIN_SPLIT keys, merged
 * after as decode attention's are (prefill_split; 8 drafts after 1,300 tokens 0.21 -> 0.18 ms a layer, the
 * one case whose bits change: another summation order). In a task, the tile's QT * G query rows of a head
 * share every K/V tile, which is unpacked once
 * (transposed for QK^T, fp16 and bf16 widened) into L1/L2. With AVX-512 the scores and P V run in register
 * blocks of 6 rows (score_block, pv_block), the same arithmetic in the same order: bit for bit the
 * row-at-a-time result, 1.2-1.6x faster (Intel Xeon with AMX, 2 cores, SmolLM2's heads:
 * benchmarks/cpu_prefill_attention.py --against; 16 requests x 6 queries after 1,300 tokens 4.15 ->
 * 2.67 ms a layer, 2,048 fresh queries 42.5 -> 28.0 ms). */
#define QT 16
#define KT 64

/* Register-blocked micro-kernels for a tile's scores and P V: a block of PB query rows shares every
 * load of a key (or value) vector, where the row-at-a-time loops loaded one vector per FMA. Each
 * output element is the same chain of FMAs in the same order as the row-at-a-time loops', so the
 * result is bit for bit theirs. PW: keys (or value columns) of one block, 4 vectors. */
#if defined(__AVX512F__)
typedef __m512 pvec;
#define PVW 16
#define PB 6 /* 6 rows x 4 vectors of accumulators + 4 of keys: 28 of 32 registers */
#define PF_PER_D 2 /* prefetcher lines asked for at each step of score_block's loop (see the AVX2 one) */
#define IN_REGISTER(x) (void)0 /* (left to the compiler: 28 of 32 registers are in use, and the empty asm's "x"
                                  * names only the first 16) */
#define pv_load _mm512_loadu_ps
#define pv_store _mm512_storeu_ps
#define pv_set1 _mm512_set1_ps
#define pv_fma _mm512_fmadd_ps
#define pv_mul _mm512_mul_ps
#define PBLOCKED 1
#elif AGORA_AVX2
typedef __m256 pvec;
#define PVW 8
/* 2 rows x 4 vectors of accumulators + 4 of keys + a query: 13 of 16 registers. 3 rows (12 accumulators) left
 * the keys as the FMAs' memory operands, a load per FMA as in the row-at-a-time loop: on a Zen 3 (2 cores,
 * benchmarks/cpu_prefill_attention.py --against 249ceec) prompt chunks took 1.1-1.3x the row-at-a-time time and
 * now 0.75-0.88x of 3 rows' (2,048 fresh queries 76.6 -> 57.7 ms a layer), 16 x 6 verification queries 0.93x,
 * 16 x 2 level. (An Intel Xeon built for AVX2 had measured 2 rows about as 3.) */
#define PB 2
/* One prefetcher line per step of score_block's loop, not two as with AVX-512: its 2-row blocks take 3x the
 * steps of 6-row ones, so one a step still asks for a whole next tile before the tile ends (K and V of 64 keys,
 * every KV head of the task), and asking twice as fast stalled on full miss queues. Zen 3, 2 cores,
 * SmolLM2's heads after 1,300 tokens, alternating in one process (the same output, bit for bit): 16 requests
 * x 6 queries 7.9 -> 7.0 ms a layer, 16 x 2 5.0 -> 4.4, 4 x 8 2.8 -> 2.5, one request's 8 0.60 -> 0.59;
 * prompt chunks (several tiles of queries: no prefetching) level. */
#define PF_PER_D 1
/* GCC folds each key (or value) vector's load into the FMAs that use it, as their memory operand: one load per
 * row of the block, 10 loads for 8 FMAs, past the 2 a cycle a Zen 3 core takes. Held in a register, each is
 * loaded once for both rows (6 for 8): the same arithmetic, prompt chunks 0.85-0.95x the time with cold caches
 * (a 150-token turn after 750 0.90x), verification steps level (hot, 16 x 6 queries 0.95x; Zen 3,
 * benchmarks/cpu_prefill_attention.py --against). */
#define IN_REGISTER(x) __asm__("" : "+x"(x))
#define pv_load _mm256_loadu_ps
#define pv_store _mm256_storeu_ps
#define pv_set1 _mm256_set1_ps
#define pv_fma _mm256_fmadd_ps
#define pv_mul _mm256_mul_ps
#define PBLOCKED 1
#else
#define PBLOCKED 0
#endif

#if PBLOCKED
#define PW (4 * PVW)
/* The next key tile's K and V rows, line after line, for the micro-kernels to prefetch into L2 a few lines
 * at a time: spread over a whole tile's arithmetic, the misses overlap it, where a tile's worth asked for
 * at once stalled on the full miss queues (a quarter of the kernel's time sat on prefetch instructions). */
typedef struct {
    const char *k, *v; /* the caches, at the task's first head */
    const int64_t *off; /* each token's row offset in elements */
    int64_t n, lines, tok, line; /* tokens, lines a row; the next line to ask for */
    int esz, which; /* element bytes; K (0) or V (1) */
} prefetcher;

static inline __attribute__((always_inline)) void prefetch_next(prefetcher *p) {
    if (p->tok >= p->n) return;
    _mm_prefetch((const char *)((p->which ? p->v : p->k) + p->off[p->tok] * p->esz + p->line * 64), _MM_HINT_T1);
    if (++p->line == p->lines) {
        p->line = 0;
        if (++p->which == 2) p->which = 0, p->tok++;
    }
}
/* s[r * KT + c0 + ...] = qt[r] . kt[:, c0 + ...] for the nr rows from r0, PW keys from c0. */
static inline __attribute__((always_inline)) void score_block(const float *qt, const float *kt, float *s, int64_t r0,
                                                              int nr, int64_t c0, int64_t D, prefetcher *pf) {
    pvec acc[PB][4];
    for (int i = 0; i < nr; i++)
        for (int v = 0; v < 4; v++) acc[i][v] = pv_set1(0.f);
    for (int64_t d = 0; d < D; d++) {
        prefetch_next(pf);
        if (PF_PER_D > 1) prefetch_next(pf);
        pvec k[4];
        for (int v = 0; v < 4; v++) {
            k[v] = pv_load(kt + d * KT + c0 + v * PVW);
            IN_REGISTER(k[v]);
        }
        for (int i = 0; i < nr; i++) {
            const pvec q = pv_set1(qt[(r0 + i) * D + d]);
            for (int v = 0; v < 4; v++) acc[i][v] = pv_fma(q, k[v], acc[i][v]);
        }
    }
    for (int i = 0; i < nr; i++)
        for (int v = 0; v < 4; v++) pv_store(s + (r0 + i) * KT + c0 + v * PVW, acc[i][v]);
}

/* o[r, dc + ...] = o[r, dc + ...] * alpha[r] + sum_{j in [jlo, jhi)} s[r * KT + j] * vrow[j][dc + ...] for the
 * nr rows from r0, PW columns from dc (a row's probabilities are 0 outside its own keys). */
static inline __attribute__((always_inline)) void pv_block(const float *s, const float *const *vrow,
                                                           const float *alpha, float *o, int64_t r0, int nr,
                                                           int64_t dc, int64_t jlo, int64_t jhi, int64_t D,
                                                           prefetcher *pf) {
    pvec acc[PB][4];
    for (int i = 0; i < nr; i++) {
        const pvec a = pv_set1(alpha[r0 + i]);
        for (int v = 0; v < 4; v++) acc[i][v] = pv_mul(pv_load(o + (r0 + i) * D + dc + v * PVW), a);
    }
    for (int64_t j = jlo; j < jhi; j++) {
        prefetch_next(pf);
        pvec x[4];
        for (int v = 0; v < 4; v++) {
            x[v] = pv_load(vrow[j] + dc + v * PVW);
            IN_REGISTER(x[v]);
        }
        for (int i = 0; i < nr; i++) {
            const pvec p = pv_set1(s[(r0 + i) * KT + j]);
            for (int v = 0; v < 4; v++) acc[i][v] = pv_fma(p, x[v], acc[i][v]);
        }
    }
    for (int i = 0; i < nr; i++)
        for (int v = 0; v < 4; v++) pv_store(o + (r0 + i) * D + dc + v * PVW, acc[i][v]);
}

/* The row count (1 .. PB) as a constant in each call, so the loops over rows unroll into registers. */
#if PB == 6
#define BY_ROWS(nr, call)                                                                                              \
    switch (nr) {                                                                                                      \
    case 1: { const int NR = 1; call; } break;                                                                         \
    case 2: { const int NR = 2; call; } break;                                                                         \
    case 3: { const int NR = 3; call; } break;                                                                         \
    case 4: { const int NR = 4; call; } break;                                                                         \
    case 5: { const int NR = 5; call; } break;                                                                         \
    default: { const int NR = 6; call; } break;                                                                        \
    }
#else
#define BY_ROWS(nr, call)                                                                                              \
    switch (nr) {                                                                                                      \
    case 1: { const int NR = 1; call; } break;                                                                         \
    default: { const int NR = 2; call; } break;                                                                        \
    }
#endif
#define BLOCKED_D(D) ((D) % PW == 0) /* the head sizes the micro-kernels take */
#else
#define BLOCKED_D(D) 0
#endif

/* off[j] = the element offset of the token row at position pos + j, j < n (one division, not one a key). */
static inline void tile_rows(const int64_t *table, int64_t pos, int64_t n, int64_t BS, int64_t tok_stride,
                             int64_t *off) {
    int64_t bi = pos / BS, bo = pos % BS;
    for (int64_t j = 0; j < n; j++) {
        off[j] = (table[bi] * BS + bo) * tok_stride;
        if (++bo == BS) bo = 0, bi++;
    }
}

/* Row sr of a tile's scores, for the query at position p against keys k0 .. k0 + nk - 1: its keys [*lo, *hi) (causal,
 * and within the window), then the online softmax step over them: the scores become exp(s - max) in place, *mx
 * and *sum carry on. Returns the factor the row's output so far is rescaled by (0 on its first keys, mx being
 * -inf; 1 when the tile holds none of its keys, and then mx and sum are left as they are). */
static inline float softmax_row(float *sr, int64_t p, int64_t k0, int64_t nk, int64_t window, float *mx, float *sum,
                                int64_t *lo, int64_t *hi) {
    *lo = window > 0 ? p - window + 1 - k0 : 0, *hi = p - k0 + 1;
    if (*lo < 0) *lo = 0;
    if (*hi > nk) *hi = nk;
    if (*lo >= *hi) return 1.f;
    const float m = row_max(sr + *lo, *hi - *lo, *mx);
    const float alpha = expf(*mx - m);
    *mx = m;
    *sum = *sum * alpha + exp_sum(sr + *lo, *hi - *lo, m);
    return alpha;
}

/* Tiles of QT queries of request b. */
static inline int64_t q_tiles(const int64_t *q_offsets, int64_t b) {
    return (q_offsets[b + 1] - q_offsets[b] + QT - 1) / QT;
}

#if AGORA_AVX2
/* In place: r[i] lane j <- r[j] lane i. */
static inline __attribute__((always_inline)) void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
#endif

/* Task t of a prefill group (tasks numbered request by request, then by query tile, then by group of hpt KV
 * heads): its request *b, first KV head *h0, and its query tile: the request's queries *q0 .. *q0 + *nq - 1. */
static inline void prefill_task(const int64_t *q_offsets, int64_t hgroups, int64_t hpt, int64_t t, int64_t *b,
                                int64_t *h0, int64_t *q0, int64_t *nq) {
    for (*b = 0;; (*b)++) {
        const int64_t n = hgroups * q_tiles(q_offsets, *b);
        if (t < n) break;
        t -= n;
    }
    const int64_t left = q_offsets[*b + 1] - q_offsets[*b] - t / hgroups * QT;
    *h0 = t % hgroups * hpt, *q0 = t / hgroups * QT, *nq = left < QT ? left : QT;
}

/* Chunks to cut each of `tasks` tasks' keys into, for nthreads threads: the count that ends the work soonest,
 * counting a task as one unit and chunks as dealt evenly (3 tasks on 2 threads: 2 units uncut, 1.5 cut in two),
 * the fewest chunks of those, and none shorter than MIN_SPLIT keys of the `longest` a task visits. */
static inline int64_t prefill_split(int64_t tasks, int64_t nthreads, int64_t longest) {
    if (tasks >= 4 * nthreads) return 1; /* enough to go round */
    int64_t best = 1, most = longest / MIN_SPLIT;
    if (most > 8) most = 8;
    const double uncut = (double)((tasks + nthreads - 1) / nthreads);
    double best_units = uncut;
    for (int64_t split = 2; split <= most; split++) {
        const double units = (double)((tasks * split + nthreads - 1) / nthreads) / (double)split;
        if (units < best_units - 1e-9) best = split, best_units = units;
    }
    return best_units <= 0.9 * uncut ? best : 1; /* a cut's merge and shorter loops cost something */
}

#if PBLOCKED
/* A key tile's rows in the blocked path: mask and online softmax row by row (a row's probabilities outside
 * its keys set to 0, [klo, khi) its keys in the tile, alpha its output's rescaling). */
static inline void softmax_rows(float *s, int64_t rows, int64_t p0, int64_t G, int64_t k0, int64_t nk,
                                int64_t window, float *mx, float *sum, float *alpha, int64_t *klo, int64_t *khi) {
    for (int64_t r = 0; r < rows; r++) {
        float *sr = s + r * KT;
        int64_t lo, hi;
        alpha[r] = softmax_row(sr, p0 + r / G, k0, nk, window, mx + r, sum + r, &lo, &hi);
        if (lo >= hi) { /* no key of this tile: nothing to add, whatever the block's others see */
            for (int64_t j = 0; j < nk; j++) sr[j] = 0.f;
            klo[r] = nk, khi[r] = 0;
            continue;
        }
        for (int64_t j = 0; j < lo; j++) sr[j] = 0.f;
        for (int64_t j = hi; j < nk; j++) sr[j] = 0.f;
        klo[r] = lo, khi[r] = hi;
    }
}
#endif

#if AGORA_AMX
/* ---- bf16 attention on AMX (opt-in: --dtype bfloat16 on a CPU with AMX) -------------------------
 *
 * The same tiles, task split, masks and fp32 online softmax as the blocked path; the two products run on
 * the tile unit instead of FMAs: S = Q K^T and P V with Q, K, P and V rounded to bf16 (round to nearest
 * even), fp32 accumulation. A tile multiply (TDPBF16PS) is 16 x 16 outputs over 32 products each, so the
 * operands are laid out as AMX reads them: Q and P as rows (A), K^T and V as pairs of adjacent elements
 * of the reduced dimension (B: row r of a B tile holds, for each of its 16 columns, elements 2r and 2r + 1). */
#define AMX_ROWS 16
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) amx_config;

/* Every tile register 16 rows of 64 bytes: 16 x 16 fp32 (C) or 16 x 32 bf16 (A, B). */
static void amx_configure(void) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = AMX_ROWS;
    _tile_loadconfig(&c);
}

/* 32 floats at p (two vectors) as 32 bf16: one vector of 16 pairs. */
static inline __m512i bf16x32(__m512 lo, __m512 hi) { return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); }

/* dst [rows rounded up to AMX_ROWS, cols] bf16 = src [rows, cols] fp32 rounded, the rows past `rows` zero (an A
 * operand's whole tiles: queries, probabilities); cols a multiple of 32. */
static void amx_rows_bf16(const float *src, int64_t rows, int64_t cols, uint16_t *dst) {
    for (int64_t r = 0; r < (rows + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS; r++)
        for (int64_t c = 0; c < cols; c += 32) {
            const float *x = src + r * cols + c;
            _mm512_storeu_si512(dst + r * cols + c, r < rows ? bf16x32(_mm512_loadu_ps(x), _mm512_loadu_ps(x + 16))
                                                             : _mm512_setzero_si512());
        }
}

/* In place: r[i] lane j <- r[j] lane i, 32-bit lanes. */
static inline __attribute__((always_inline)) void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) { /* u[i + e] lane L = rows i..i+3, element 4L + e */
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int e = 0; e < 4; e++) { /* the 4 x 4 transpose of 128-bit lanes across the groups */
        const __m512i a = _mm512_shuffle_i32x4(r[e], r[4 + e], 0x44), b = _mm512_shuffle_i32x4(r[e], r[4 + e], 0xee);
        const __m512i c = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0x44);
        const __m512i d = _mm512_shuffle_i32x4(r[8 + e], r[12 + e], 0xee);
        t[e] = _mm512_shuffle_i32x4(a, c, 0x88), t[4 + e] = _mm512_shuffle_i32x4(a, c, 0xdd);
        t[8 + e] = _mm512_shuffle_i32x4(b, d, 0x88), t[12 + e] = _mm512_shuffle_i32x4(b, d, 0xdd);
    }
    for (int i = 0; i < 16; i++) r[i] = t[i];
}

/* The key tile as B tiles of K^T: for 32 dims c and 16 keys j, kb[(c * KT / 16 + j) * 512 + r * 32 + 2 n + i]
 * = K[16 j + n][32 c + 2 r + i] (keys past nk zero). Both packings advance the blocked path's prefetcher (the
 * next tile's rows, a few lines at a time: 512 lines a head, what SmolLM2's 3 heads of fp32 rows need; asked
 * for a token's whole row at once, the misses stalled, and 16 x 6 queries after 1,300 tokens took 1.05x the fp32
 * kernel's time instead of 0.92x). */
static void amx_pack_keys(const void *k_cache, const int64_t *toff, int64_t h, int64_t D, int64_t nk, int kv,
                          uint16_t *kb, prefetcher *pf) {
    for (int64_t j = 0; j < KT / 16; j++)
        for (int64_t c = 0; c < D / 32; c++) {
            __m512i r[16];
            for (int n = 0; n < 16; n++) {
                const int64_t key = 16 * j + n;
                prefetch_next(pf), prefetch_next(pf), prefetch_next(pf); /* (with the values': the next tile's rows) */
                if (key >= nk) {
                    r[n] = _mm512_setzero_si512();
                    continue;
                }
                const void *kr = kv_at(k_cache, toff[key] + h * D + 32 * c, kv);
                r[n] = bf16x32(kv_load16(kr, kv), kv_load16(kv_at(kr, 16, kv), kv));
            }
            transpose16(r); /* r[n] = key n's dims (2m, 2m + 1) in lane m -> r[m] = dims (2m, 2m + 1) of key n */
            for (int m = 0; m < 16; m++) _mm512_storeu_si512(kb + (c * (KT / 16) + j) * 512 + m * 32, r[m]);
        }
}

/* The key tile's values as B tiles: for 32 keys kc and 16 dims t, vb[(kc * D / 16 + t) * 512 + r * 32 + 2 n + i]
 * = V[32 kc + 2 r + i][16 t + n] (keys past nk zero). */
static void amx_pack_values(const void *v_cache, const int64_t *toff, int64_t h, int64_t D, int64_t nk, int kv,
                            uint16_t *vb, prefetcher *pf) {
    /* element 2n of a row <- key 2r's dim n (the low half of cvtne2ps), 2n + 1 <- key 2r + 1's (the high half) */
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t kc = 0; kc < KT / 32; kc++)
        for (int r = 0; r < 16; r++) {
            const int64_t key = 32 * kc + 2 * r;
            prefetch_next(pf), prefetch_next(pf), prefetch_next(pf), prefetch_next(pf);
            const void *v0 = key < nk ? kv_at(v_cache, toff[key] + h * D, kv) : NULL;
            const void *v1 = key + 1 < nk ? kv_at(v_cache, toff[key + 1] + h * D, kv) : NULL;
            for (int64_t t = 0; t < D / 16; t++) {
                const __m512 a = v0 ? kv_load16(kv_at(v0, 16 * t, kv), kv) : _mm512_setzero_ps();
                const __m512 b = v1 ? kv_load16(kv_at(v1, 16 * t, kv), kv) : _mm512_setzero_ps();
                uint16_t *row = vb + (kc * (D / 16) + t) * 512 + r * 32;
                _mm512_storeu_si512(row, _mm512_permutexvar_epi16(inter, bf16x32(a, b)));
            }
        }
}

/* A row of 4 C tiles, c[16, 64] fp32 (row stride ldc bytes): the sum over `steps` chunks of an A tile (16 rows of
 * 32 bf16 at a + i * astep, row stride lda bytes) times the chunk's 4 B tiles (from b + i * bstep, 512 apart). */
static inline void amx_tile_row(const uint16_t *a, int64_t lda, int64_t astep, const uint16_t *b, int64_t bstep,
                                int64_t steps, float *c, int64_t ldc) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t i = 0; i < steps; i++) {
        const uint16_t *bt = b + i * bstep;
        _tile_loadd(4, a + i * astep, lda);
        _tile_loadd(5, bt, 64);
        _tile_loadd(6, bt + 512, 64);
        _tile_dpbf16ps(0, 4, 5);
        _tile_loadd(7, bt + 1024, 64);
        _tile_dpbf16ps(1, 4, 6);
        _tile_loadd(5, bt + 1536, 64);
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 4, 5);
    }
    _tile_stored(0, c, ldc);
    _tile_stored(1, c + 16, ldc);
    _tile_stored(2, c + 32, ldc);
    _tile_stored(3, c + 48, ldc);
}

/* s[r, 0 .. KT) = qb[r] . K^T for the tile's rows in blocks of 16 (qb: [rows rounded up to 16, D] bf16,
 * pre-scaled; rows past the tile's own zero). */
static void amx_scores(const uint16_t *qb, const uint16_t *kb, float *s, int64_t rows, int64_t D) {
    for (int64_t r0 = 0; r0 < rows; r0 += AMX_ROWS)
        amx_tile_row(qb + r0 * D, D * 2, 32, kb, (KT / 16) * 512, D / 32, s + r0 * KT, KT * 4);
}

/* o[r] = o[r] * alpha[r] + P[r] V for the tile's rows: P the probabilities in s (0 outside each row's keys), as
 * bf16 rows in pb; 64 columns of o at a time (4 C tiles), the products staged in pv [16, 64]. */
static void amx_values(const float *s, const uint16_t *vb, const float *alpha, float *o, int64_t rows, int64_t D,
                       uint16_t *pb, float *pv) {
    amx_rows_bf16(s, rows, KT, pb);
    for (int64_t r0 = 0; r0 < rows; r0 += AMX_ROWS)
        for (int64_t d0 = 0; d0 < D; d0 += 64) {
            amx_tile_row(pb + r0 * KT, KT * 2, 32, vb + d0 / 16 * 512, (D / 16) * 512, KT / 32, pv, 256);
            const int64_t nr = rows - r0 < AMX_ROWS ? rows - r0 : AMX_ROWS;
            for (int64_t i = 0; i < nr; i++) {
                const __m512 a = _mm512_set1_ps(alpha[r0 + i]);
                float *orow = o + (r0 + i) * D + d0;
                for (int v = 0; v < 4; v++)
                    _mm512_storeu_ps(orow + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(orow + 16 * v), a,
                                                                    _mm512_loadu_ps(pv + i * 64 + 16 * v)));
            }
        }
}
#endif

static inline __attribute__((always_inline)) void paged_prefill(const float *q, const void *k_cache,
                                                                 const void *v_cache, const int64_t *block_tables,
                                                                 int64_t bt_stride, const int64_t *q_offsets,
                                                                 const int64_t *ctx_starts, int64_t B, int64_t H,
                                                                 int64_t Hkv, int64_t D, int64_t BS, int64_t window,
                                                                 float scale, float *out, int64_t nthreads, int kv,
                                                                 int amx) {
    const int64_t G = H / Hkv, tok_stride = Hkv * D, R = QT * G;
#if AGORA_AMX
    /* (its tiles are the blocked path's: 64 columns of o at a time; and without the kernel's leave, a tile
     * instruction is an illegal one) */
    amx = amx && BLOCKED_D(D) && agora_amx_init();
#else
    amx = 0;
#endif
    /* Tasks, numbered request by request: (b, group of kv heads, query tile). With AVX-512 and enough tiles
     * to keep every thread busy, a task takes all the KV heads of its tile, so a token's K (and V) row is
     * read whole, in one pass, where a task per head read a third of it (SmolLM2) and left the rest of
     * what the hardware prefetcher fetched to other tasks, later. */
    int64_t all_tiles = 0;
    for (int64_t b = 0; b < B; b++) all_tiles += q_tiles(q_offsets, b);
    const int64_t hpt = PBLOCKED && all_tiles >= 2 * nthreads ? Hkv : 1; /* KV heads a task takes */
    const int64_t hgroups = Hkv / hpt, tile_tasks = all_tiles * hgroups;
    int64_t longest = 0; /* the most keys a task visits */
    for (int64_t b = 0; b < B; b++) {
        int64_t n = ctx_starts[b] + q_offsets[b + 1] - q_offsets[b];
        if (window > 0 && n > window + QT) n = window + QT;
        longest = n > longest ? n : longest;
    }
    const int64_t split = prefill_split(tile_tasks, nthreads, longest), tasks = tile_tasks * split;
    /* Cut tasks leave their unnormalised outputs, maxes and sums here, one part each, for the merge. */
    const int64_t part_size = hpt * R * (D + 2);
    float *parts = split > 1 ? (float *)malloc(sizeof(float) * (size_t)(tasks * part_size)) : NULL;
#pragma omp parallel num_threads(nthreads)
    {
        const size_t floats = (size_t)(hpt * (2 * R * D + 2 * R) + D * KT + KT * D + R * KT + R);
        float *qtb = (float *)malloc(sizeof(float) * floats);
        /* a task's outputs, maxes and sums, laid out as a part (a cut task works in its own part instead) */
        float *const own = qtb + hpt * R * D;
        float *kt = own + part_size, *vt = kt + D * KT, *s = vt + KT * D;
#if PBLOCKED
        float *alpha = s + R * KT; /* each row's rescaling by the current tile (blocked path) */
        /* each row's keys in the tile, [klo, khi) */
        int64_t *klo = (int64_t *)malloc(sizeof(int64_t) * (size_t)(2 * R)), *khi = klo + R;
#endif
#if AGORA_AMX
        /* bf16 operands: the task's queries, a key tile's K^T and V, a tile's probabilities; C tiles staged in pv */
        uint16_t *qb = NULL, *kb = NULL, *vb = NULL, *pb = NULL;
        float *pv = NULL;
        if (amx) {
            qb = (uint16_t *)malloc(sizeof(uint16_t) * (size_t)(hpt * R * D + 2 * D * KT + R * KT));
            kb = qb + hpt * R * D, vb = kb + D * KT, pb = vb + D * KT;
            pv = (float *)malloc(sizeof(float) * AMX_ROWS * 64);
            amx_configure();
        }
#endif
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t b, h0, q0, nq;
            prefill_task(q_offsets, hgroups, hpt, task / split, &b, &h0, &q0, &nq);
            const int64_t rows = nq * G;
            const int64_t p0 = ctx_starts[b] + q0, plast = p0 + nq - 1; /* positions of the tile's queries */
            const int64_t *table = block_tables + b * bt_stride;
            float *const ob = split > 1 ? parts + task * part_size : own;
            float *const mxb = ob + hpt * R * D, *const sumb = mxb + hpt * R;
            /* A request with one tile of queries (a verification step's drafts, a short chunk) reads its
             * keys once, from memory: they are prefetched a tile ahead, as decode attention does (by the
             * micro-kernels, a few lines at each step, where they take the tile). With several tiles, the
             * later ones find the keys in cache, where prefetching only costs. With value rows read in
             * place (below): 16 requests x 6 queries x 1,300 cached tokens 4.9 -> 3.5 ms a layer, cold
             * caches (benchmarks/cpu_prefill_attention.py --against). */
            const int ahead_too = q_tiles(q_offsets, b) == 1;
            /* KV head h0 + hh: row r = i * G + g of its block: query i of the tile, head (h0 + hh) * G + g;
             * pre-scaled. */
            for (int64_t hh = 0; hh < hpt; hh++)
                for (int64_t i = 0; i < nq; i++)
                    for (int64_t g = 0; g < G; g++) {
                        const float *src = q + ((q_offsets[b] + q0 + i) * H + (h0 + hh) * G + g) * D;
                        float *dst = qtb + (hh * R + i * G + g) * D;
                        for (int64_t d = 0; d < D; d++) dst[d] = src[d] * scale;
                    }
#if AGORA_AMX
            if (amx) /* the queries in bf16 */
                for (int64_t hh = 0; hh < hpt; hh++) amx_rows_bf16(qtb + hh * R * D, rows, D, qb + hh * R * D);
#endif
            memset(ob, 0, sizeof(float) * hpt * R * D);
            for (int64_t r = 0; r < hpt * R; r++) mxb[r] = -INFINITY, sumb[r] = 0.f;
            int64_t kmin = window > 0 ? p0 - window + 1 : 0;
            if (kmin < 0) kmin = 0;
            /* This task's chunk of the tile's keys, [kbeg, kend) */
            const int64_t chunk = task % split, nkeys = plast + 1 - kmin;
            const int64_t kbeg = kmin + nkeys * chunk / split, kend = kmin + nkeys * (chunk + 1) / split;
            int64_t toff[KT], tnext[KT]; /* the token rows of this tile and of the next */
#if PBLOCKED
            prefetcher pf;
#endif
            for (int64_t k0 = kbeg; k0 < kend; k0 += KT) {
                for (int64_t hh = 0; hh < hpt; hh++) {
                    const int64_t nk = kend - k0 < KT ? kend - k0 : KT, h = h0 + hh;
                    if (hh == 0) {
                        tile_rows(table, k0, nk, BS, tok_stride, toff);
                        const int64_t later = kend - (k0 + KT) < KT ? kend - (k0 + KT) : KT;
                        if (ahead_too && later > 0) tile_rows(table, k0 + KT, later, BS, tok_stride, tnext);
#if PBLOCKED
                        pf = (prefetcher){(const char *)kv_at(k_cache, h0 * D, kv),
                                          (const char *)kv_at(v_cache, h0 * D, kv),
                                          tnext, ahead_too && later > 0 ? later : 0,
                                          (kv_row_bytes(hpt, 1, D, kv) + 63) / 64, 0, 0, kv ? 2 : 4, 0};
#endif
                    }
                    float *qt = qtb + hh * R * D, *o = ob + hh * R * D, *mx = mxb + hh * R, *sum = sumb + hh * R;
                    /* The next tile's rows of all the task's heads, fetched into L2 meanwhile (by the first head) */
                    const int ahead = ahead_too && hh == 0;
                    const int64_t ahead_bytes = kv_row_bytes(hpt, 1, D, kv);
                    (void)ahead, (void)ahead_bytes; /* (a build without AVX2 does not prefetch) */
#if AGORA_AMX
                    if (amx) {
                        amx_pack_keys(k_cache, toff, h, D, nk, kv, kb, &pf);
                        amx_scores(qb + hh * R * D, kb, s, rows, D);
                        softmax_rows(s, rows, p0, G, k0, nk, window, mx, sum, alpha, klo, khi);
                        amx_pack_values(v_cache, toff, h, D, nk, kv, vb, &pf);
                        amx_values(s, vb, alpha, o, rows, D, pb, pv);
                        continue;
                    }
#endif
                    /* Unpack the key tile transposed (kt[d * KT + j]); value rows are read where they are
                     * (vrow[j]), except a 2-byte cache's, widened into vt first. */
                    const float *vrow[KT];
                    int64_t j = 0;
#if AGORA_AVX2
                    if (D % 8 == 0) /* 8 keys x 8 dims at a time, transposed in registers */
                        for (; j + 8 <= nk; j += 8) {
                            const void *kr[8];
                            for (int u = 0; u < 8; u++) {
                                /* (a tile the micro-kernels take, they prefetch as they go) */
                                if (ahead && k0 + KT + j + u < kend && !BLOCKED_D(D)) {
                                    const int64_t at = tnext[j + u] + h0 * D;
                                    prefetch_row(kv_at(k_cache, at, kv), ahead_bytes);
                                    prefetch_row(kv_at(v_cache, at, kv), ahead_bytes);
                                }
                                const int64_t off = toff[j + u] + h * D;
                                kr[u] = kv_at(k_cache, off, kv);
                                const void *vr = kv_at(v_cache, off, kv);
                                if (kv) {
                                    for (int64_t d = 0; d < D; d += 8)
                                        _mm256_storeu_ps(vt + (j + u) * D + d, kv_load8(kv_at(vr, d, kv), kv));
                                    vrow[j + u] = vt + (j + u) * D;
                                } else {
                                    vrow[j + u] = (const float *)vr;
                                }
                            }
                            for (int64_t d = 0; d < D; d += 8) {
                                __m256 r[8];
                                for (int u = 0; u < 8; u++) r[u] = kv_load8(kv_at(kr[u], d, kv), kv);
                                transpose8(r);
                                for (int u = 0; u < 8; u++) _mm256_storeu_ps(kt + (d + u) * KT + j, r[u]);
                            }
                        }
#endif
                    for (; j < nk; j++) {
                        const int64_t off = toff[j] + h * D;
                        const void *kr = kv_at(k_cache, off, kv), *vr = kv_at(v_cache, off, kv);
                        for (int64_t d = 0; d < D; d++) {
                            kt[d * KT + j] = kv_load1(kv_at(kr, d, kv), kv);
                            if (kv) vt[j * D + d] = kv_load1(kv_at(vr, d, kv), kv);
                        }
                        vrow[j] = kv ? vt + j * D : (const float *)vr;
                    }
                    for (int64_t j = nk; j < KT; j++)
                        for (int64_t d = 0; d < D; d++) kt[d * KT + j] = 0.f;
                    /* Scores: s[r, :] = qt[r] . kt (a row of KT keys per FMA sweep, vectorised over keys). */
#if PBLOCKED
                    const int blocked = BLOCKED_D(D);
                    if (blocked)
                        for (int64_t c0 = 0; c0 < nk; c0 += PW)
                            for (int64_t r0 = 0; r0 < rows; r0 += PB) {
                                const int nr = rows - r0 < PB ? (int)(rows - r0) : PB;
                                BY_ROWS(nr, score_block(qt, kt, s, r0, NR, c0, D, &pf));
                            }
                    for (int64_t r = 0; r < rows && !blocked; r++) {
#else
                    for (int64_t r = 0; r < rows; r++) {
#endif
                        float acc[KT] __attribute__((aligned(32))) = {0};
                        const float *qr = qt + r * D;
                        for (int64_t d = 0; d < D; d++) {
                            const float qv = qr[d];
                            const float *kd = kt + d * KT;
                            for (int j = 0; j < KT; j++) acc[j] += qv * kd[j];
                        }
                        memcpy(s + r * KT, acc, sizeof acc);
                    }
#if PBLOCKED
                    if (blocked) {
                        /* Mask and online softmax row by row, then P V in blocks of rows over the keys any of
                         * them sees. */
                        softmax_rows(s, rows, p0, G, k0, nk, window, mx, sum, alpha, klo, khi);
                        for (int64_t r0 = 0; r0 < rows; r0 += PB) {
                            const int nr = rows - r0 < PB ? (int)(rows - r0) : PB;
                            int64_t jlo = nk, jhi = 0;
                            for (int i = 0; i < nr; i++) {
                                jlo = klo[r0 + i] < jlo ? klo[r0 + i] : jlo;
                                jhi = khi[r0 + i] > jhi ? khi[r0 + i] : jhi;
                            }
                            if (jlo >= jhi) continue; /* no row of the block sees a key of this tile */
                            for (int64_t dc = 0; dc < D; dc += PW)
                                BY_ROWS(nr, pv_block(s, vrow, alpha, o, r0, NR, dc, jlo, jhi, D, &pf));
                        }
                        continue;
                    }
#endif
                    /* Mask, online softmax, accumulate P V. */
                    for (int64_t r = 0; r < rows; r++) {
                        float *sr = s + r * KT;
                        int64_t lo, hi;
                        const float alpha = softmax_row(sr, p0 + r / G, k0, nk, window, mx + r, sum + r, &lo, &hi);
                        if (lo >= hi) continue;
                        /* o[r] = o[r] * alpha + sum_j p_j v_j, 64 columns at a time held in registers. */
                        for (int64_t dc = 0; dc < D; dc += 64) {
                            float *orow = o + r * D + dc;
                            if (D - dc >= 64) {
#if AGORA_AVX2
                                const __m256 va = _mm256_set1_ps(alpha);
                                __m256 a[8];
                                for (int u = 0; u < 8; u++) a[u] = _mm256_mul_ps(_mm256_loadu_ps(orow + 8 * u), va);
                                for (int64_t jj = lo; jj < hi; jj++) {
                                    const __m256 pj = _mm256_set1_ps(sr[jj]);
                                    const float *vj = vrow[jj] + dc;
                                    for (int u = 0; u < 8; u++)
                                        a[u] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8 * u), a[u]);
                                }
                                for (int u = 0; u < 8; u++) _mm256_storeu_ps(orow + 8 * u, a[u]);
#else
                                float acc[64];
                                for (int d = 0; d < 64; d++) acc[d] = orow[d] * alpha;
                                for (int64_t jj = lo; jj < hi; jj++) {
                                    const float pj = sr[jj];
                                    const float *vj = vrow[jj] + dc;
                                    for (int d = 0; d < 64; d++) acc[d] += pj * vj[d];
                                }
                                memcpy(orow, acc, sizeof acc);
#endif
                            } else {
                                const int64_t w = D - dc;
                                for (int64_t d = 0; d < w; d++) orow[d] *= alpha;
                                for (int64_t jj = lo; jj < hi; jj++)
                                    for (int64_t d = 0; d < w; d++) orow[d] += sr[jj] * vrow[jj][dc + d];
                            }
                        }
                    }
                }
            }
            if (split > 1) continue; /* merged below */
            for (int64_t hh = 0; hh < hpt; hh++)
                for (int64_t i = 0; i < nq; i++)
                    for (int64_t g = 0; g < G; g++) {
                        const int64_t r = hh * R + i * G + g;
                        const float inv = 1.f / sumb[r];
                        float *dst = out + ((q_offsets[b] + q0 + i) * H + (h0 + hh) * G + g) * D;
                        for (int64_t d = 0; d < D; d++) dst[d] = ob[r * D + d] * inv;
                    }
        }
        free(qtb);
#if PBLOCKED
        free(klo);
#endif
#if AGORA_AMX
        if (amx) {
            _tile_release();
            free(qb);
            free(pv);
        }
#endif
        if (split > 1) { /* each query row's chunks merged */
#pragma omp for schedule(static)
            for (int64_t x = 0; x < tile_tasks * hpt * R; x++) {
                const int64_t tt = x / (hpt * R), hr = x % (hpt * R), hh = hr / R, r = hr % R;
                int64_t b, h0, q0, nq;
                prefill_task(q_offsets, hgroups, hpt, tt, &b, &h0, &q0, &nq);
                if (r >= nq * G) continue;
                merge_parts(parts + tt * split * part_size, split, part_size, hpt * R, hh * R + r, D,
                            out + ((q_offsets[b] + q0 + r / G) * H + (h0 + hh) * G + r % G) * D);
            }
        }
    }
    free(parts);
}

static void paged_prefill_kv(const float *q, const void *k_cache, const void *v_cache, const int64_t *block_tables,
                             int64_t bt_stride, const int64_t *q_offsets, const int64_t *ctx_starts, int64_t B,
                             int64_t H, int64_t Hkv, int64_t D, int64_t BS, int64_t window, float scale, float *out,
                             int64_t nthreads, int64_t kv, int amx) {
    if (kv == KV_F16)
        paged_prefill(q, k_cache, v_cache, block_tables, bt_stride, q_offsets, ctx_starts, B, H, Hkv, D, BS, window,
                      scale, out, nthreads, KV_F16, amx);
    else if (kv == KV_BF16)
        paged_prefill(q, k_cache, v_cache, block_tables, bt_stride, q_offsets, ctx_starts, B, H, Hkv, D, BS, window,
                      scale, out, nthreads, KV_BF16, amx);
    else
        paged_prefill(q, k_cache, v_cache, block_tables, bt_stride, q_offsets, ctx_starts, B, H, Hkv, D, BS, window,
                      scale, out, nthreads, KV_F32, amx);
}

/* kv: the caches' element type (KV_F32, KV_F16, KV_BF16); amx: the products in bf16 on AMX where it can */
void agora_paged_prefill_attention(const float *q, const void *k_cache, const void *v_cache,
                                   const int64_t *block_tables, int64_t bt_stride, const int64_t *q_offsets,
                                   const int64_t *ctx_starts, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                                   int64_t BS, int64_t window, float scale, float *out, int64_t nthreads, int64_t kv,
                                   int64_t amx) {
    TIMED(paged_prefill_kv(q, k_cache, v_cache, block_tables, bt_stride, q_offsets, ctx_starts, B, H, Hkv, D, BS,
                           window, scale, out, nthreads, kv, amx != 0));
}

/* Rotary embedding in place, "rotate half" layout (HF Llama): for i < D/2,
 *   x[i] <- x[i] cos[i] - x[i + D/2] sin[i],   x[i + D/2] <- x[i + D/2] cos[i] + x[i] sin[i]
 * q: T tokens of Hq heads (row stride q_stride floats), k likewise; cos/sin: [max_pos, D]. */
static void rope(float *q, int64_t q_stride, int64_t Hq, float *k, int64_t k_stride, int64_t Hk, const int64_t *pos,
                 const float *cos_t, const float *sin_t, int64_t T, int64_t D, int64_t nthreads) {
    const int64_t half = D / 2;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T > 16)
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_t + pos[t] * D, *s = sin_t + pos[t] * D;
        for (int64_t h = 0; h < Hq + Hk; h++) {
            float *x = h < Hq ? q + t * q_stride + h * D : k + t * k_stride + (h - Hq) * D;
            for (int64_t i = 0; i < half; i++) {
                const float a = x[i], b = x[i + half];
                x[i] = a * c[i] - b * s[i];
                x[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* y[t, :] = x[t, :] / sqrt(mean(x[t, :]^2) + eps) * w, for T contiguous rows of H floats. */
static void rms_norm(const float *x, int64_t T, int64_t H, const float *w, float eps, float *y, int64_t nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * H >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * H;
        float *yr = y + t * H;
        int64_t i = 0;
        float ss = 0.f;
#if AGORA_AVX2
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 16 <= H; i += 16) {
            __m256 u = _mm256_loadu_ps(xr + i), v = _mm256_loadu_ps(xr + i + 8);
            a0 = _mm256_fmadd_ps(u, u, a0);
            a1 = _mm256_fmadd_ps(v, v, a1);
        }
        ss = hsum(_mm256_add_ps(a0, a1));
#endif
        for (; i < H; i++) ss += xr[i] * xr[i];
        const float scale = 1.f / sqrtf(ss / (float)H + eps);
        i = 0;
#if AGORA_AVX2
        const __m256 s = _mm256_set1_ps(scale);
        for (; i + 8 <= H; i += 8)
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), s), _mm256_loadu_ps(w + i)));
#endif
        for (; i < H; i++) yr[i] = xr[i] * scale * w[i];
    }
}

/* The MLP's activations, 8 lanes or one value at a time.
 * silu(x) = x sigmoid(x); exp256 wants x <= 0: e = exp(-|x|), sigmoid(x) = x >= 0 ? 1 / (1 + e) : e / (1 + e).
 * gelu_tanh(x) = x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))) (Gemma's), with
 * tanh(z) = sign(z) (1 - e) / (1 + e), e = exp(-2 |z|): only its absolute error counts, as 1 is added to it. */
#define GELU_C 0.7978845608028654f
#define GELU_A 0.044715f
#if AGORA_AVX2
static inline __m256 silu8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.f), zero = _mm256_setzero_ps();
    const __m256 e = exp256(_mm256_sub_ps(zero, _mm256_andnot_ps(_mm256_set1_ps(-0.f), x)));
    const __m256 r = _mm256_div_ps(one, _mm256_add_ps(one, e));
    return _mm256_mul_ps(x, _mm256_blendv_ps(_mm256_mul_ps(e, r), r, _mm256_cmp_ps(x, zero, _CMP_GE_OQ)));
}

static inline __m256 gelu8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
    const __m256 z = _mm256_mul_ps(_mm256_set1_ps(GELU_C),
                                   _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(GELU_A), x), _mm256_mul_ps(x, x), x));
    const __m256 e = exp256(_mm256_mul_ps(_mm256_set1_ps(-2.f), _mm256_andnot_ps(sign, z)));
    const __m256 th = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
    const __m256 tanh_z = _mm256_or_ps(th, _mm256_and_ps(sign, z));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, tanh_z));
}
#endif

static inline float silu1(float x) { return x / (1.f + expf(-x)); }

static inline float gelu1(float x) {
    const float z = GELU_C * (GELU_A * x * (x * x) + x), e = expf(-2.f * fabsf(z));
    return 0.5f * x * (1.f + copysignf((1.f - e) / (1.f + e), z));
}

/* y[t, :] = act(gu[t, :I]) * gu[t, I:], for T rows of a fused gate/up projection [T, 2I]; act: SiLU, or
 * GELU-tanh where `gelu`. */
static void gated_mul(const float *gu, int64_t T, int64_t I, float *y, int64_t nthreads, int gelu) {
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T * I >= 32768)
    for (int64_t t = 0; t < T; t++) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *yr = y + t * I;
        int64_t i = 0;
#if AGORA_AVX2
        for (; i + 8 <= I; i += 8) {
            const __m256 x = _mm256_loadu_ps(g + i);
            _mm256_storeu_ps(yr + i, _mm256_mul_ps(gelu ? gelu8(x) : silu8(x), _mm256_loadu_ps(u + i)));
        }
#endif
        for (; i < I; i++) yr[i] = (gelu ? gelu1(g[i]) : silu1(g[i])) * u[i];
    }
}

void agora_rope(float *q, int64_t q_stride, int64_t Hq, float *k, int64_t k_stride, int64_t Hk, const int64_t *pos,
                const float *cos_t, const float *sin_t, int64_t T, int64_t D, int64_t nthreads) {
    TIMED(rope(q, q_stride, Hq, k, k_stride, Hk, pos, cos_t, sin_t, T, D, nthreads));
}

void agora_rms_norm(const float *x, int64_t T, int64_t H, const float *w, float eps, float *y, int64_t nthreads) {
    TIMED(rms_norm(x, T, H, w, eps, y, nthreads));
}

void agora_gelu_tanh_mul(const float *gu, int64_t T, int64_t I, float *y, int64_t nthreads) {
    TIMED(gated_mul(gu, T, I, y, nthreads, 1));
}

void agora_silu_mul(const float *gu, int64_t T, int64_t I, float *y, int64_t nthreads) {
    TIMED(gated_mul(gu, T, I, y, nthreads, 0));
}

/* ---- argmax of each row (the greedy sampler) ----------------------------------------------------
 *
 * torch.argmax on the CPU takes 6.8 ms for a 16-agent verification step's logits (144 rows of SmolLM2's
 * 49,152; amax takes 0.5): here each lane keeps its largest value and where it was, a strictly greater
 * value replaces it (so each lane keeps its first), and the lanes' winners are compared last (the smallest
 * index among equal values). As torch.argmax: the first index of the largest value, and a NaN counts as
 * larger than anything (the first NaN's index). */
static int64_t row_argmax(const float *x, int64_t n) {
    if (n <= 0) return 0;
    int64_t j = 0, best = 0;
    float bv = x[0];
    int nan = 0;
#if AGORA_AVX2
    if (n >= 8) {
        __m256 vmax = _mm256_loadu_ps(x), vnan = _mm256_cmp_ps(vmax, vmax, _CMP_UNORD_Q);
        __m256i vidx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), cur = vidx;
        const __m256i eight = _mm256_set1_epi32(8);
        for (j = 8; j + 8 <= n; j += 8) {
            const __m256 v = _mm256_loadu_ps(x + j);
            cur = _mm256_add_epi32(cur, eight);
            vnan = _mm256_or_ps(vnan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            const __m256 gt = _mm256_cmp_ps(v, vmax, _CMP_GT_OQ);
            vmax = _mm256_blendv_ps(vmax, v, gt);
            vidx = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(vidx), _mm256_castsi256_ps(cur), gt));
        }
        nan = _mm256_movemask_ps(vnan) != 0;
        float lv[8];
        int32_t li[8];
        _mm256_storeu_ps(lv, vmax);
        _mm256_storeu_si256((__m256i *)li, vidx);
        bv = lv[0], best = li[0];
        for (int l = 1; l < 8; l++)
            if (lv[l] > bv || (lv[l] == bv && li[l] < best)) bv = lv[l], best = li[l];
    }
#endif
    for (; j < n; j++) {
        nan |= x[j] != x[j];
        if (x[j] > bv) bv = x[j], best = j;
    }
    if (nan || bv != bv)
        for (j = 0; j < n; j++)
            if (x[j] != x[j]) return j;
    return best;
}

/* out[r] = argmax of row r of x [R, n] (row stride ld floats). */
void agora_argmax(const float *x, int64_t R, int64_t n, int64_t ld, int64_t *out, int64_t nthreads) {
    if (R * n < 65536) nthreads = 1; /* a decode step's few rows: not worth waking the threads */
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < R; r++) out[r] = row_argmax(x + r * ld, n);
}

/* ---- one decoder layer in one call (Llama family and Gemma 3, GGUF block linears) -------------
 *
 * A single-stream decode step made ~12 calls per layer (norm, QKV, RoPE, cache write, attention,
 * o_proj, residual, norm, gate/up, SiLU, down, residual), each through ctypes and PyTorch's
 * dispatcher with fresh output tensors: about a third of the step. agora_llama_layer runs the
 * same kernels in the same order on preallocated scratch, so its result is bit for bit the
 * module path's (tests/kernels/test_native_layers.py holds it to that).
 *
 *   x [T, H] -> h = rms(x) -> qkv = h Wqkv^T (+b) -> (q, k per-head rms: Qwen3, Gemma) -> RoPE(q, k)
 *            -> k, v into the paged cache at slots[t] -> attention per group -> o = attn Wo^T (+b)
 *            -> (Gemma: o = rms(o)) -> x += o -> h = rms(x) -> gu = h Wgu^T (+b)
 *            -> a = silu(g) * u (Gemma: gelu_tanh(g) * u) -> m = a Wdown^T (+b) -> (Gemma: m = rms(m)) -> x += m
 */
typedef struct {
    const uint8_t *w; /* GGUF blocks [n, k / 32 * block bytes] */
    const float *bias; /* [n] or NULL */
    int64_t n, k, fmt; /* FMT_Q4_1, FMT_Q8_0, FMT_QU8 or FMT_QU4 */
    int64_t i8; /* int8 activations (linear_blocks_i8) */
} agora_qlinear;

typedef struct {
    int64_t layer, hidden, heads, kv_heads, head_dim, inter;
    float eps;
    const float *in_norm, *post_norm; /* [hidden] */
    const float *q_norm, *k_norm; /* [head_dim] per-head RMSNorm of q and k (Qwen3), or NULL */
    agora_qlinear qkv, o, gate_up, down; /* qkv rows: q, k, v; gate_up rows: gate, up */
    /* Gemma 3: norms of the attention's and the MLP's outputs before each residual add (else NULL), and the
     * MLP's activation: 0 SiLU, 1 GELU-tanh. (Its norms' 1 + w scales are passed as the weights.) */
    const float *post_attn_norm, *post_mlp_norm;
    int64_t gelu;
} agora_llama_weights;

/* One attention group of a step: requests computing one token each (decode, `seq_lens`), or
 * chunks of tokens (`q_offsets`, `ctx_starts`), as agora.engine.attention.AttentionGroup. */
typedef struct {
    int64_t decode, n_tokens;
    const int64_t *token_index; /* [n_tokens] the group's rows of the step, or NULL: every row, in order */
    int64_t batch;
    const int64_t *block_tables;
    int64_t bt_stride;
    const int64_t *seq_lens, *q_offsets, *ctx_starts;
} agora_attn_group;

/* The step's attention as the engine's backend describes it (agora.engine.attention). */
typedef struct {
    void *const *k_caches, *const *v_caches; /* per layer: [blocks, block_size, kv_heads, head_dim] */
    const int64_t *windows; /* per layer: 0 or a sliding window */
    const int64_t *slots; /* [T] cache slot of each token of the step */
    int64_t block_size, kv; /* the caches' element type: KV_F32, KV_F16 or KV_BF16 */
    int64_t amx; /* prefill attention's products in bf16 on AMX (--dtype bfloat16) */
    float scale;
    int64_t n_groups;
    agora_attn_group groups[2];
} agora_attention;

/* Floats of scratch a layer needs for T tokens. */
int64_t agora_llama_scratch_floats(const agora_llama_weights *L, int64_t T) {
    const int64_t qd = L->heads * L->head_dim, widest = L->inter > L->hidden ? L->inter : L->hidden;
    return T * (L->hidden + L->qkv.n + 3 * qd + L->gate_up.n + L->inter + L->hidden) +
           i8_scratch_floats(T, widest > qd ? widest : qd);
}

static inline uint16_t float_to_half(float f) {
#if AGORA_AVX2
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    const uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0)); /* inf, nan */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00); /* rounds past the largest half */
    if (ax < 0x38800000u) { /* subnormal half (or zero): round 2^-24 units to nearest even */
        const float scaled = fabsf(f) * 16777216.f; /* exact: a power-of-two scale */
        return (uint16_t)(sign | (uint32_t)nearbyintf(scaled));
    }
    const uint32_t mant = ax & 0x7fffff, exp = (ax >> 23) - 112, keep = mant >> 13, rest = mant & 0x1fff;
    uint32_t h = (exp << 10) | keep;
    if (rest > 0x1000 || (rest == 0x1000 && (keep & 1))) h++; /* carries into the exponent correctly */
    return (uint16_t)(sign | h);
#endif
}

/* Rounded to the nearest bf16, ties to even, as PyTorch's .to(torch.bfloat16) (a NaN as its 0xffff). */
static inline uint16_t float_to_bf16(float f) {
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0xffff;
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

static void qlinear(const agora_qlinear *l, const float *x, int64_t M, float *y, float *i8_scratch,
                    int64_t nthreads) {
    if (l->i8)
        linear_i8((int)l->fmt, x, M, l->k, l->w, l->n, l->bias, y, i8_scratch, nthreads);
    else
        linear_blocks((int)l->fmt, x, M, l->k, l->w, l->n, l->bias, y, nthreads);
}

static void add_into(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

static void layer_attention(const agora_llama_weights *L, const agora_attention *A, const float *qkv, int64_t T,
                            float *qbuf, float *obuf, float *attn, int64_t nthreads) {
    const int64_t H = L->heads, Hkv = L->kv_heads, D = L->head_dim, qd = H * D, stride = L->qkv.n;
    const void *kc = A->k_caches[L->layer], *vc = A->v_caches[L->layer];
    const int64_t window = A->windows[L->layer];
    (void)T;
    for (int64_t gi = 0; gi < A->n_groups; gi++) {
        const agora_attn_group *g = &A->groups[gi];
        for (int64_t i = 0; i < g->n_tokens; i++) {
            const int64_t t = g->token_index ? g->token_index[i] : i;
            memcpy(qbuf + i * qd, qkv + t * stride, sizeof(float) * qd);
        }
        float *out = g->token_index ? obuf : attn;
        if (g->decode)
            paged_decode_kv(qbuf, kc, vc, g->block_tables, g->bt_stride, g->seq_lens, g->batch, H, Hkv, D,
                            A->block_size, window, A->scale, out, nthreads, A->kv);
        else
            paged_prefill_kv(qbuf, kc, vc, g->block_tables, g->bt_stride, g->q_offsets, g->ctx_starts, g->batch, H,
                             Hkv, D, A->block_size, window, A->scale, out, nthreads, A->kv, A->amx != 0);
        if (g->token_index)
            for (int64_t i = 0; i < g->n_tokens; i++)
                memcpy(attn + g->token_index[i] * qd, obuf + i * qd, sizeof(float) * qd);
    }
}

/* x [T, hidden] in place; positions [T]; cos/sin [max_pos, head_dim]; scratch: see agora_llama_scratch_floats. */
static void llama_layer(const agora_llama_weights *L, const agora_attention *A, float *x, int64_t T,
                        const int64_t *positions, const float *cos_t, const float *sin_t, float *scratch,
                        int64_t nthreads) {
    const int64_t Hd = L->hidden, H = L->heads, Hkv = L->kv_heads, D = L->head_dim, qd = H * D, kvd = Hkv * D;
    const int64_t stride = L->qkv.n;
    float *h = scratch, *qkv = h + T * Hd, *qbuf = qkv + T * stride, *obuf = qbuf + T * qd, *attn = obuf + T * qd;
    float *gu = attn + T * qd, *act = gu + T * L->gate_up.n, *y = act + T * L->inter, *i8 = y + T * Hd;

    rms_norm(x, T, Hd, L->in_norm, L->eps, h, nthreads);
    qlinear(&L->qkv, h, T, qkv, i8, nthreads);
    if (L->q_norm)
        for (int64_t t = 0; t < T; t++) {
            rms_norm(qkv + t * stride, H, D, L->q_norm, L->eps, qkv + t * stride, 1);
            rms_norm(qkv + t * stride + qd, Hkv, D, L->k_norm, L->eps, qkv + t * stride + qd, 1);
        }
    rope(qkv, stride, H, qkv + qd, stride, Hkv, positions, cos_t, sin_t, T, D, nthreads);
    /* k and v of each token into its cache slot */
    void *kc = A->k_caches[L->layer], *vc = A->v_caches[L->layer];
    for (int64_t t = 0; t < T; t++) {
        const float *k = qkv + t * stride + qd, *v = k + kvd;
        const int64_t off = A->slots[t] * kvd;
        if (A->kv == KV_BF16) {
            uint16_t *kd = (uint16_t *)kc + off, *vd = (uint16_t *)vc + off;
            for (int64_t i = 0; i < kvd; i++) kd[i] = float_to_bf16(k[i]), vd[i] = float_to_bf16(v[i]);
        } else if (A->kv) {
            uint16_t *kd = (uint16_t *)kc + off, *vd = (uint16_t *)vc + off;
            for (int64_t i = 0; i < kvd; i++) kd[i] = float_to_half(k[i]), vd[i] = float_to_half(v[i]);
        } else {
            memcpy((float *)kc + off, k, sizeof(float) * kvd);
            memcpy((float *)vc + off, v, sizeof(float) * kvd);
        }
    }
    layer_attention(L, A, qkv, T, qbuf, obuf, attn, nthreads);
    qlinear(&L->o, attn, T, y, i8, nthreads);
    if (L->post_attn_norm) rms_norm(y, T, Hd, L->post_attn_norm, L->eps, y, nthreads); /* in place: row by row */
    add_into(x, y, T * Hd);
    rms_norm(x, T, Hd, L->post_norm, L->eps, h, nthreads);
    qlinear(&L->gate_up, h, T, gu, i8, nthreads);
    gated_mul(gu, T, L->inter, act, nthreads, (int)L->gelu);
    qlinear(&L->down, act, T, y, i8, nthreads);
    if (L->post_mlp_norm) rms_norm(y, T, Hd, L->post_mlp_norm, L->eps, y, nthreads);
    add_into(x, y, T * Hd);
}

void agora_llama_layer(const agora_llama_weights *L, const agora_attention *A, float *x, int64_t T,
                       const int64_t *positions, const float *cos_t, const float *sin_t, float *scratch,
                       int64_t nthreads) {
    TIMED(llama_layer(L, A, x, T, positions, cos_t, sin_t, scratch, nthreads));
}
