// row_stream.h: how fast T threads stream rows through one row kernel, for row_kernels.cpp and
// q4_0_layout.cpp. Include after moe_infer.h (with MOE_INFER_IMPLEMENTATION).
#ifndef MOE_BENCH_ROW_STREAM_H
#define MOE_BENCH_ROW_STREAM_H

#include "membw.h"

// `threads` threads each dot their share of `rows` rows (one activation row for all), `passes`
// times over per repetition (a small set then stays in cache); GB/s of weight bytes of the best
// of `reps` repetitions. dot == nullptr: membw::sum_words over the bytes (the probe's loop).
inline double stream_rows_gbs(moe::detail::VecDotFn dot, const uint8_t* w, int64_t rows, int64_t row_bytes, const void* act, int64_t cols,
                              int threads, int reps = 7, int passes = 1) {
    double best = 0;
    for (int rep = 0; rep < reps; ++rep) {
        std::atomic<uint64_t> sink{0};
        const auto t0 = std::chrono::steady_clock::now();
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
                const int64_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads;
                uint64_t local = 0;  // one atomic add per thread: small sets make many short passes
                for (int p = 0; p < passes; ++p) {
                    if (!dot) {
                        local += membw::sum_words(reinterpret_cast<const uint64_t*>(w + r0 * row_bytes), (size_t)((r1 - r0) * row_bytes / 8));
                        continue;
                    }
                    float s = 0;
                    for (int64_t r = r0; r < r1; ++r) s += dot(w + r * row_bytes, act, cols);
                    local += (uint64_t)(s != 0);
                }
                sink += local;
            });
        for (std::thread& th : pool) th.join();
        const double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        best = std::max(best, (double)(rows * row_bytes) * passes / sec / 1e9);
    }
    return best;
}

#endif
