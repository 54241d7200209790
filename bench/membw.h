// membw.h: the read-bandwidth probe shared by moe-bench and llama_bench_peer, so both programs
// divide by the same kind of number. Header-only, no dependencies beyond the C++17 library and
// POSIX (Linux: madvise for huge pages, sysconf for the cache and memory sizes).
//
// measure_read_bandwidth(threads, bytes, reps): one buffer of `bytes`, split into `threads`
// contiguous slices; each thread first-touches (writes) its own slice, then every repetition
// starts all threads together and each sums its slice as 64-bit words. The time of a repetition
// runs from the start signal until the last thread is done; the result is the best repetition,
// in GB/s (1e9 bytes per second). This is the bandwidth a bs=1 decode can hope for: every
// thread streams its own share of the weights once.
#ifndef MOE_BENCH_MEMBW_H
#define MOE_BENCH_MEMBW_H

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace membw {

struct Result {
    double gbs = 0;        // best repetition, 1e9 bytes/s
    double median_gbs = 0;
    size_t bytes = 0;      // buffer size
    int threads = 0;
    int reps = 0;
};

inline size_t llc_bytes() {
#if defined(_SC_LEVEL3_CACHE_SIZE)
    long l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
    if (l3 > 0) return (size_t)l3;
#endif
#if defined(_SC_LEVEL2_CACHE_SIZE)
    long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 > 0) return (size_t)l2;
#endif
    return 32u << 20;
}

inline size_t physical_memory_bytes() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) return (size_t)pages * (size_t)page;
#endif
    return (size_t)8 << 30;
}

// max(1 GiB, 4 x LLC), at most a quarter of physical memory, a multiple of 2 MiB.
inline size_t default_buffer_bytes() {
    size_t want = std::max<size_t>((size_t)1 << 30, 4 * llc_bytes());
    want = std::min(want, physical_memory_bytes() / 4);
    want = std::max<size_t>(want, (size_t)64 << 20);
    return want / ((size_t)2 << 20) * ((size_t)2 << 20);
}

// Sum of n 64-bit words with 8 independent accumulators; GCC/Clang clone it for AVX2 and pick the
// clone at load time (the rest of the program is built for plain x86-64).
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
inline uint64_t sum_words(const uint64_t* p, size_t n) {
    uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 += p[i]; a1 += p[i + 1]; a2 += p[i + 2]; a3 += p[i + 3];
        a4 += p[i + 4]; a5 += p[i + 5]; a6 += p[i + 6]; a7 += p[i + 7];
    }
    for (; i < n; ++i) a0 += p[i];
    return a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7;
}

inline Result measure_read_bandwidth(int threads, size_t bytes = 0, int reps = 7) {
    Result r;
    threads = std::max(1, threads);
    reps = std::max(1, reps);
    if (bytes == 0) bytes = default_buffer_bytes();
    const size_t align = (size_t)2 << 20;
    bytes = (bytes + align - 1) / align * align;
    uint64_t* buf = static_cast<uint64_t*>(std::aligned_alloc(align, bytes));
    if (!buf) return r;
#if defined(MADV_HUGEPAGE)
    madvise(buf, bytes, MADV_HUGEPAGE);  // fewer TLB misses; ignored where unsupported
#endif
    const size_t words = bytes / sizeof(uint64_t);
    // slices of whole 4 KiB pages
    const size_t page_words = 4096 / sizeof(uint64_t);
    std::vector<size_t> begin(threads + 1);
    for (int t = 0; t <= threads; ++t) begin[t] = words / page_words * (size_t)t / (size_t)threads * page_words;
    begin[threads] = words;

    std::atomic<int> go{0}, done{0};
    std::atomic<uint64_t> sink{0};
    std::vector<double> seconds;
    auto work = [&](int t) {
        uint64_t* p = buf + begin[t];
        size_t n = begin[t + 1] - begin[t];
        for (size_t i = 0; i < n; ++i) p[i] = (uint64_t)(i * 0x9E3779B97F4A7C15ull) ^ (uint64_t)t;  // first touch
        done.fetch_add(1);
        for (int rep = 1; rep <= reps; ++rep) {
            while (go.load(std::memory_order_acquire) < rep) std::this_thread::yield();
            sink.fetch_add(sum_words(p, n), std::memory_order_relaxed);
            done.fetch_add(1);
        }
    };
    std::vector<std::thread> pool;
    for (int t = 1; t < threads; ++t) pool.emplace_back(work, t);
    // thread 0 is this one: first touch, then lead each repetition
    {
        uint64_t* p = buf;
        size_t n = begin[1];
        for (size_t i = 0; i < n; ++i) p[i] = (uint64_t)(i * 0x9E3779B97F4A7C15ull);
    }
    while (done.load() < threads - 1) std::this_thread::yield();
    for (int rep = 1; rep <= reps; ++rep) {
        done.store(0);
        auto t0 = std::chrono::steady_clock::now();
        go.store(rep, std::memory_order_release);
        sink.fetch_add(sum_words(buf, begin[1]), std::memory_order_relaxed);
        while (done.load(std::memory_order_acquire) < threads - 1) {}
        auto t1 = std::chrono::steady_clock::now();
        seconds.push_back(std::chrono::duration<double>(t1 - t0).count());
    }
    for (std::thread& th : pool) th.join();
    std::free(buf);
    if (sink.load() == 42) std::fputs("", stderr);  // keep the sums alive

    std::sort(seconds.begin(), seconds.end());
    r.gbs = (double)bytes / seconds.front() / 1e9;
    r.median_gbs = (double)bytes / seconds[seconds.size() / 2] / 1e9;
    r.bytes = bytes;
    r.threads = threads;
    r.reps = reps;
    return r;
}

}  // namespace membw

#endif  // MOE_BENCH_MEMBW_H
