/* A bare read of the K and V rows a decode step's attention must read, in the paged caches' scattered order:
 * the floor under benchmarks/cpu_decode_attention.py's kernel (which also computes, and prefetches). Each task
 * is a chunk of up to 256 positions of one request (so one long request keeps every thread busy, as the
 * kernel's split does): its token rows' K (row_bytes each, from its block table), then the same rows' V.
 * Returns a sum of what it read, so the compiler keeps the reads. Built by the benchmark with the kernels' compiler
 * and flags. */
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

float agora_bench_scattered_read(const char *k, const char *v, const int64_t *tables, int64_t batch, int64_t per_req,
                                 int64_t context, int64_t block, int64_t row_bytes, int64_t nthreads) {
    const int64_t chunk = 256, chunks = (context + chunk - 1) / chunk;
    float total = 0.f;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads) reduction(+ : total)
    for (int64_t t = 0; t < batch * chunks; t++) {
        const int64_t b = t / chunks, lo = t % chunks * chunk, hi = lo + chunk < context ? lo + chunk : context;
        for (int pass = 0; pass < 2; pass++) {
            const char *cache = pass ? v : k;
#if defined(__AVX2__)
            __m256 acc = _mm256_setzero_ps();
#else
            float acc = 0.f;
#endif
            for (int64_t pos = lo; pos < hi; pos++) {
                const char *row = cache + (tables[b * per_req + pos / block] * block + pos % block) * row_bytes;
#if defined(__AVX2__)
                for (int64_t i = 0; i + 32 <= row_bytes; i += 32)
                    acc = _mm256_add_ps(acc, _mm256_loadu_ps((const float *)(row + i)));
#else
                for (int64_t i = 0; i + 4 <= row_bytes; i += 4) acc += *(const float *)(row + i);
#endif
            }
#if defined(__AVX2__)
            float lanes[8];
            _mm256_storeu_ps(lanes, acc);
            for (int i = 0; i < 8; i++) total += lanes[i];
#else
            total += acc;
#endif
        }
    }
    return total;
}
