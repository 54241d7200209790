// row_kernels: one thread's throughput of each tensor type's row dot kernel, per ISA of this CPU,
// on rows that miss the caches (16 MiB of weights per type, read once per repetition). What a
// decode matmul costs per byte when it is compute-bound (the 2-core case): a kernel well below the
// machine's per-core read bandwidth here is the bottleneck.
//
//   g++ -O3 -std=c++17 -pthread -I. bench/row_kernels.cpp -o build/row_kernels
//   build/row_kernels [COLS]          (row length, default 2048; 768 = Qwen3-30B-A3B's ffn_down rows)
//
//   build/row_kernels COLS --stream T  (T threads stream 1 GiB of rows each repetition, from memory:
//                                       the detected ISA's kernels of the decode types next to a
//                                       plain sum of the same bytes, membw.h's read loop)
//   build/row_kernels COLS --stream T --kib K  (the same on K KiB of rows read again and again,
//                                       ~1 GiB per repetition: from L1/L2 when K is small, so a
//                                       kernel's own speed with no memory stalls)
//
// Weights: random block bytes with finite scales (tests/kernel_cases.h); the kernels' cost does
// not depend on the values. Output: GB/s of weight bytes, best of 7 repetitions.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"
#include "../tests/kernel_cases.h"
#include "row_stream.h"

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

int stream_mode(int64_t cols, int threads, size_t kib) {
    using namespace moe::detail;
    const moe::Isa isa = moe::detected_isa();
    const size_t bytes = kib ? kib << 10 : (size_t)1 << 30, huge = (size_t)2 << 20;
    const int passes = (int)std::max<size_t>(1, ((size_t)1 << 30) / bytes);  // ~1 GiB read per repetition
    char where[64] = "1 GiB of rows from memory";
    if (kib) std::snprintf(where, sizeof where, "%zu KiB of rows read %d times", kib, passes);
    std::printf("row_kernels --stream: %lld columns, %d threads, %s, GB/s of weights (best of 7), %s\n", (long long)cols, threads, where,
                moe::isa_name(isa));
    std::printf("| rows | GB/s |\n|---|---:|\n");
    uint8_t* w = static_cast<uint8_t*>(std::aligned_alloc(huge, (bytes + huge - 1) / huge * huge));
    if (!w) return 1;
#if defined(MADV_HUGEPAGE)
    madvise(w, bytes, MADV_HUGEPAGE);  // as the probe and the mapped model (LoadOptions::huge_pages)
#endif
    std::memset(w, 1, bytes);
    std::printf("| plain sum of the bytes (membw.h) | %.2f |\n", stream_rows_gbs(nullptr, w, (int64_t)(bytes / 4096), 4096, nullptr, 0, threads, 7, passes));
    std::mt19937 rng(7);
    const moe::TensorType types[] = {moe::TensorType::q4_0, moe::TensorType::q8_0, moe::TensorType::q4_k, moe::TensorType::q6_k};
    for (moe::TensorType t : types) {
        const QuantType* qt = quant_type((uint32_t)t);
        if (cols % qt->block_elems) continue;
        const int64_t row_bytes = cols / qt->block_elems * qt->block_bytes;
        const int64_t rows = (int64_t)(bytes / (size_t)row_bytes);
        if (rows < threads) {  // a share of no rows per thread: nothing to time
            std::printf("| %s | (fewer rows than threads) |\n", qt->name);
            continue;
        }
        const std::vector<uint8_t> one = kernel_cases::make_weights(t, 64 * cols, kernel_cases::WeightKind::random_bytes, rng);
        for (int64_t r = 0; r < rows; ++r) std::memcpy(w + r * row_bytes, one.data() + (r % 64) * row_bytes, (size_t)row_bytes);
        const std::vector<float> x = kernel_cases::make_activations(cols, kernel_cases::ActKind::gaussian, rng);
        const RowKernel k = row_kernel(*qt, isa, cols);
        std::vector<uint8_t> act(act_row_bytes(k.act, cols) + 64);
        quantize_act_with(k.act, moe::Isa::scalar, act.data(), x.data(), cols);
        std::printf("| %s | %.2f |\n", qt->name, stream_rows_gbs(k.vec_dot, w, rows, row_bytes, act.data(), cols, threads, 7, passes));
    }
    std::free(w);
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    using namespace moe::detail;
    const int64_t cols = argc > 1 ? std::atoll(argv[1]) : 2048;
    if (cols <= 0 || cols % 256) {
        std::fprintf(stderr, "COLS must be a positive multiple of 256\n");
        return 1;
    }
    if (argc > 3 && std::string(argv[2]) == "--stream") {
        const int threads = std::atoi(argv[3]);
        if (threads < 1 || threads > 512) {
            std::fprintf(stderr, "--stream needs a thread count in 1..512\n");
            return 1;
        }
        long long kib = 0;  // 0: 1 GiB from memory
        char* end = nullptr;
        if (argc == 6 && std::string(argv[4]) == "--kib") kib = std::strtoll(argv[5], &end, 10);
        if (argc != 4 && (!end || *end || kib < 1 || kib > (1ll << 20))) {
            std::fprintf(stderr, "usage: row_kernels COLS --stream T [--kib K] (K in 1..1048576)\n");
            return 1;
        }
        return stream_mode(cols, threads, (size_t)kib);
    }
    std::vector<moe::Isa> isas = {moe::Isa::scalar};
    for (moe::Isa isa : kernel_cases::kSimdIsas)
        if (moe::force_isa(isa) == moe::Status::ok) isas.push_back(isa);
    moe::force_isa(moe::detected_isa());
    std::printf("row_kernels: %lld columns, 1 thread, GB/s of weights (best of 7)\n| type |", (long long)cols);
    for (moe::Isa isa : isas) std::printf(" %s |", moe::isa_name(isa));
    std::printf("\n|---|");
    for (size_t i = 0; i < isas.size(); ++i) std::printf("---:|");
    std::printf("\n");
    std::mt19937 rng(7);
    for (moe::TensorType t : kernel_cases::kTypes) {
        if (kernel_cases::is_float_type(t)) continue;
        const QuantType* qt = quant_type((uint32_t)t);
        const int64_t row_bytes = cols / qt->block_elems * qt->block_bytes;
        const int64_t rows = (16 << 20) / row_bytes;
        const std::vector<uint8_t> w = kernel_cases::make_weights(t, rows * cols, kernel_cases::WeightKind::random_bytes, rng);
        const std::vector<float> x = kernel_cases::make_activations(cols, kernel_cases::ActKind::gaussian, rng);
        std::printf("| %s |", qt->name);
        for (moe::Isa isa : isas) {
            const RowKernel k = row_kernel(*qt, isa, cols);  // the activation format may differ per ISA
            std::vector<uint8_t> act(act_row_bytes(k.act, cols) + 64);
            quantize_act_with(k.act, moe::Isa::scalar, act.data(), x.data(), cols);
            double best = 1e30;
            volatile float sink = 0;
            for (int rep = 0; rep < 7; ++rep) {
                const auto t0 = std::chrono::steady_clock::now();
                float s = 0;
                for (int64_t r = 0; r < rows; ++r) s += k.vec_dot(w.data() + r * row_bytes, act.data(), cols);
                sink = sink + s;
                best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
            }
            std::printf(" %.2f |", (double)w.size() / best / 1e9);
        }
        std::printf("\n");
    }
    return 0;
}
