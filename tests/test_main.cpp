// The one translation unit that holds the implementation; the other test files include only the
// declarations, so linking them together proves the header works in several TUs.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <gtest/gtest.h>

int main(int argc, char** argv) {
    ::testing::InitGoogleTest(&argc, argv);
    return RUN_ALL_TESTS();
}

// ---- thread pool internals (moe::detail is visible only in this translation unit) ----

#include <atomic>
#include <vector>

namespace {

// Guided chunks hand out every item of [0, total) exactly once per phase, whatever the thread
// count, chunk floor and total; the barrier resets the counter between phases.
TEST(ThreadPool, GuidedChunksCoverEveryItemOnce) {
    const int64_t totals[] = {1, 2, 7, 64, 1000, 12345};
    for (int threads : {1, 3, 8}) {
        moe::detail::ThreadPool pool(threads);
        std::vector<std::atomic<int>> seen(12345 * 6);
        for (auto& s : seen) s.store(0);
        pool.parallel_for([&](int ith, int nth) {
            for (int phase = 0; phase < 6; ++phase) {
                const int64_t total = totals[phase];
                int64_t begin, end;
                while (pool.grab_guided(total, 1 + phase % 3, nth, &begin, &end))
                    for (int64_t i = begin; i < end; ++i) seen[(size_t)(phase * 12345 + i)].fetch_add(1);
                pool.barrier(ith, nth);
            }
        });
        for (int phase = 0; phase < 6; ++phase)
            for (int64_t i = 0; i < 12345; ++i)
                ASSERT_EQ(seen[(size_t)(phase * 12345 + i)].load(), i < totals[phase] ? 1 : 0)
                    << threads << " threads, phase " << phase << ", item " << i;
    }
}

// No thread leaves a barrier before every thread has arrived: each writes its phase number, and
// after the barrier every slot must show that phase. Exactly one DoneCounter caller sees the total.
TEST(ThreadPool, BarrierSeparatesPhasesAndOneThreadFinishes) {
    for (int threads : {2, 5, 9}) {
        moe::detail::ThreadPool pool(threads);
        std::vector<std::atomic<int>> slot((size_t)threads);
        std::atomic<int> errors{0}, finishers{0};
        moe::detail::DoneCounter done;
        const int kPhases = 200;
        for (int call = 0; call < 3; ++call) {  // several runs: workers spin or sleep in between
            pool.parallel_for([&](int ith, int nth) {
                for (int phase = 0; phase < kPhases; ++phase) {
                    slot[(size_t)ith].store(phase, std::memory_order_relaxed);
                    if (done.finish(ith + 1, (int64_t)nth * (nth + 1) / 2)) finishers.fetch_add(1);
                    pool.barrier(ith, nth);
                    for (int j = 0; j < nth; ++j)
                        if (slot[(size_t)j].load(std::memory_order_relaxed) != phase) errors.fetch_add(1);
                    pool.barrier(ith, nth);
                }
            });
        }
        EXPECT_EQ(errors.load(), 0) << threads << " threads";
        EXPECT_EQ(finishers.load(), 3 * kPhases) << threads << " threads";
    }
}

}  // namespace

// ---- Q4_0 tiles (moe::detail) ----

#include "kernel_cases.h"

#include <cmath>
#include <cstring>
#include <random>

namespace {

// Whether this CPU and build run the x86 kernels of `isa` (the tile tests try each).
bool isa_usable(moe::Isa isa) {
    const moe::Isa best = moe::detected_isa();
    return (int)isa <= (int)best && best <= moe::Isa::avx512_vnni && isa >= moe::Isa::avx2;
}

// Q4_0 tiles (LoadOptions::repack): 16 rows re-laid for decode. The tile kernel's _ref against a
// float64 oracle of the dequantized rows and codes, and against the row kernel's _ref (the same
// integer sums per block, other float order); the SIMD twin bit for bit; padding rows give 0; a
// tile packed as a panel equals the panel gemm_pack makes of the rows.
TEST(Q4_0Tiles, DotAndPanelMatchRowsAndOracle) {
    namespace d = moe::detail;
    std::mt19937 rng(5);
    std::normal_distribution<float> gauss;
    const bool vnni = moe::detected_isa() == moe::Isa::avx512_vnni;
    for (int64_t n : {128, 384, 2048})
        for (int rows : {16, 7, 1})
            for (kernel_cases::WeightKind kind : {kernel_cases::WeightKind::random_bytes, kernel_cases::WeightKind::all_ones_bits, kernel_cases::WeightKind::all_zero_bits}) {
                SCOPED_TRACE("n=" + std::to_string(n) + " rows=" + std::to_string(rows) + " kind=" + std::to_string((int)kind));
                const size_t row_bytes = (size_t)(n / 32) * sizeof(d::BlockQ4_0);
                std::vector<uint8_t> w;
                for (int r = 0; r < rows; ++r) {
                    const std::vector<uint8_t> row = kernel_cases::make_weights(moe::TensorType::q4_0, n, kind, rng);
                    w.insert(w.end(), row.begin(), row.end());
                }
                std::vector<uint8_t> tile(d::q4_0_tile_bytes(n));
                d::q4_0_tile_repack(w.data(), row_bytes, rows, n, tile.data());
                std::vector<float> x((size_t)n);
                for (float& v : x) v = gauss(rng);
                if (kind == kernel_cases::WeightKind::all_ones_bits) std::fill(x.begin(), x.end(), -1.f);
                std::vector<d::BlockQ8Split> xq((size_t)(n / 128));
                d::quantize_act_q8_split_ref(xq.data(), x.data(), n);
                std::vector<d::BlockQ8_0> x8((size_t)(n / 32));
                d::quantize_act_q8_0_ref(x8.data(), x.data(), n);
                alignas(64) float out[16];
                d::q4_0_tile_dot_ref(tile.data(), xq.data(), n, out);
                for (int r = 0; r < 16; ++r) {
                    if (r >= rows) {
                        EXPECT_EQ(out[r], 0.f) << "padding row " << r;
                        continue;
                    }
                    const d::BlockQ4_0* blk = reinterpret_cast<const d::BlockQ4_0*>(w.data() + row_bytes * (size_t)r);
                    double oracle = 0, magnitude = 0;
                    for (int64_t j = 0; j < n; ++j) {
                        const double wv = (double)d::fp16_to_f32(blk[j / 32].d) * (d::q4_nibble(blk[j / 32].qs, (int)(j % 32)) - 8);
                        const double xv = (double)d::fp16_to_f32(x8[(size_t)(j / 32)].d) * x8[(size_t)(j / 32)].qs[j % 32];
                        oracle += wv * xv;
                        magnitude += std::fabs(wv * xv);
                    }
                    EXPECT_NEAR(out[r], oracle, 1e-5 * magnitude + 1e-6) << "row " << r << " vs float64";
                    EXPECT_NEAR(out[r], d::vec_dot_q4_0_q8_split_ref(blk, xq.data(), n), 1e-5 * magnitude + 1e-6) << "row " << r << " vs the row kernel";
                }
                d::GemmScratch s, rows_panel;
                std::vector<uint8_t> buf(2 * d::GemmScratch::bytes(n) + 128);
                s.carve(buf.data(), n);
                rows_panel.carve(buf.data() + (d::GemmScratch::bytes(n) + 63) / 64 * 64, n);
                d::q4_0_tile_pack_ref(tile.data(), n, &s.panel);
                d::gemm_pack(d::gemm_type(moe::TensorType::q4_0), w.data(), row_bytes, rows, n, &rows_panel);
                const int64_t nb = n / 32;
                EXPECT_EQ(0, std::memcmp(s.panel.q, rows_panel.panel.q, (size_t)(nb * 32 * 16)));
                EXPECT_EQ(0, std::memcmp(s.panel.bias, rows_panel.panel.bias, (size_t)(nb * 16) * 4));
                EXPECT_EQ(0, std::memcmp(s.panel.scale, rows_panel.panel.scale, (size_t)(nb * 16) * 4));
                EXPECT_EQ(0, std::memcmp(s.panel.min, rows_panel.panel.min, (size_t)(nb * 16) * 4));
                // Below AVX-512 VNNI the tiles read q8_0 activations: q4_0_tile_dot_q8_0_ref.
                alignas(64) float out8[16];
                d::q4_0_tile_dot_q8_0_ref(tile.data(), x8.data(), n, out8);
                for (int r = 0; r < 16; ++r) {
                    if (r >= rows) {
                        EXPECT_EQ(out8[r], 0.f) << "padding row " << r;
                        continue;
                    }
                    const d::BlockQ4_0* blk = reinterpret_cast<const d::BlockQ4_0*>(w.data() + row_bytes * (size_t)r);
                    double magnitude = 0;
                    for (int64_t j = 0; j < n; ++j)
                        magnitude += std::fabs((double)d::fp16_to_f32(blk[j / 32].d) * (d::q4_nibble(blk[j / 32].qs, (int)(j % 32)) - 8) *
                                               d::fp16_to_f32(x8[(size_t)(j / 32)].d) * x8[(size_t)(j / 32)].qs[j % 32]);
                    EXPECT_NEAR(out8[r], d::vec_dot_q4_0_q8_0_ref(blk, x8.data(), n), 1e-5 * magnitude + 1e-6) << "row " << r << " q8_0 vs the row kernel";
                    EXPECT_NEAR(out8[r], out[r], 1e-5 * magnitude + 1e-6) << "row " << r << " q8_0 vs q8_0_split";
                }
                for (moe::Isa isa : {moe::Isa::avx2, moe::Isa::avx512}) {
                    if (!isa_usable(isa)) continue;
                    const d::RowKernel k = d::row_kernel(*d::quant_type((uint32_t)moe::TensorType::q4_0), isa, n);
                    ASSERT_TRUE(k.tile) << moe::isa_name(isa);
                    alignas(64) float simd[16];
                    k.tile.dot(tile.data(), x8.data(), n, simd, 2048);
                    EXPECT_EQ(0, std::memcmp(out8, simd, sizeof out8)) << moe::isa_name(isa) << " vs _ref";
                    k.tile.pack(tile.data(), n, &rows_panel.panel);
                    EXPECT_EQ(0, std::memcmp(s.panel.q, rows_panel.panel.q, (size_t)(nb * 32 * 16)));
                    EXPECT_EQ(0, std::memcmp(s.panel.bias, rows_panel.panel.bias, (size_t)(nb * 16) * 4));
                    EXPECT_EQ(0, std::memcmp(s.panel.scale, rows_panel.panel.scale, (size_t)(nb * 16) * 4));
                    EXPECT_EQ(0, std::memcmp(s.panel.min, rows_panel.panel.min, (size_t)(nb * 16) * 4));
                }
                // The SIMD twins the library picks (RowKernel::tile) where this CPU has them.
                const d::RowKernel k = d::row_kernel(*d::quant_type((uint32_t)moe::TensorType::q4_0), moe::Isa::avx512_vnni, n);
                if (vnni && k.tile) {
                    alignas(64) float simd[16];
                    k.tile.dot(tile.data(), xq.data(), n, simd, 2048);
                    EXPECT_EQ(0, std::memcmp(out, simd, sizeof out)) << "AVX-512 VNNI vs _ref";
                    k.tile.pack(tile.data(), n, &rows_panel.panel);
                    EXPECT_EQ(0, std::memcmp(s.panel.q, rows_panel.panel.q, (size_t)(nb * 32 * 16)));
                    EXPECT_EQ(0, std::memcmp(s.panel.bias, rows_panel.panel.bias, (size_t)(nb * 16) * 4));
                    EXPECT_EQ(0, std::memcmp(s.panel.scale, rows_panel.panel.scale, (size_t)(nb * 16) * 4));
                    EXPECT_EQ(0, std::memcmp(s.panel.min, rows_panel.panel.min, (size_t)(nb * 16) * 4));
                }
            }
}


// The K-quant tiles (q8_k activations; 256-column super-blocks): the tile's _ref against a float64
// oracle of the file's rows (`oracle(row, x)`) and against the row kernel's _ref; padding rows give
// 0; the tile's panel equals gemm_pack's of the rows (min compared by value: Q4_K's padding rows
// have -0 there, +0 in gemm_pack); the SIMD twins the library picks bit for bit.
struct KTileType {
    moe::TensorType type;
    size_t block_bytes;
    size_t (*tile_bytes)(int64_t);
    void (*repack)(const uint8_t*, size_t, int, int64_t, uint8_t*);
    void (*dot_ref)(const uint8_t*, const void*, int64_t, float*, size_t);
    void (*pack_ref)(const uint8_t*, int64_t, moe::detail::GemmPanel*);
    float (*row_ref)(const void*, const moe::detail::BlockQ8K*, int64_t);
    // Σ w x over the row in float64, and Σ |w x| (the tolerance's scale).
    void (*oracle)(const void* row, const moe::detail::BlockQ8K* x, int64_t n, double* dot, double* magnitude);
};
void check_k_tiles(const KTileType& tt, unsigned seed) {
    namespace d = moe::detail;
    std::mt19937 rng(seed);
    std::normal_distribution<float> gauss;
    for (int64_t n : {256, 768, 2048})
        for (int rows : {16, 9, 5, 1})
            for (kernel_cases::WeightKind kind : {kernel_cases::WeightKind::gaussian, kernel_cases::WeightKind::random_bytes,
                                                  kernel_cases::WeightKind::all_ones_bits, kernel_cases::WeightKind::all_zero_bits}) {
                SCOPED_TRACE("n=" + std::to_string(n) + " rows=" + std::to_string(rows) + " kind=" + std::to_string((int)kind));
                const size_t row_bytes = (size_t)(n / 256) * tt.block_bytes;
                std::vector<uint8_t> w;
                for (int r = 0; r < rows; ++r) {
                    const std::vector<uint8_t> row = kernel_cases::make_weights(tt.type, n, kind, rng);
                    ASSERT_EQ(row.size(), row_bytes);
                    w.insert(w.end(), row.begin(), row.end());
                }
                std::vector<uint8_t> tile(tt.tile_bytes(n), 0xA5);  // the repack must write every byte
                tt.repack(w.data(), row_bytes, rows, n, tile.data());
                std::vector<float> x((size_t)n);
                for (float& v : x) v = gauss(rng);
                if (kind == kernel_cases::WeightKind::all_ones_bits) std::fill(x.begin(), x.end(), -1.f);
                std::vector<d::BlockQ8K> xq((size_t)(n / 256));
                d::quantize_row_q8k_ref(xq.data(), x.data(), n);
                alignas(64) float out[16];
                tt.dot_ref(tile.data(), xq.data(), n, out, 0);
                for (int r = 0; r < 16; ++r) {
                    if (r >= rows) {
                        EXPECT_EQ(out[r], 0.f) << "padding row " << r;
                        continue;
                    }
                    const uint8_t* row = w.data() + row_bytes * (size_t)r;
                    double oracle = 0, magnitude = 0;
                    tt.oracle(row, xq.data(), n, &oracle, &magnitude);
                    EXPECT_NEAR(out[r], oracle, 1e-5 * magnitude + 1e-6) << "row " << r << " vs float64";
                    EXPECT_NEAR(out[r], tt.row_ref(row, xq.data(), n), 1e-5 * magnitude + 1e-6) << "row " << r << " vs the row kernel";
                }
                d::GemmScratch s, rows_panel;
                std::vector<uint8_t> buf(2 * d::GemmScratch::bytes(n) + 128);
                s.carve(buf.data(), n);
                rows_panel.carve(buf.data() + (d::GemmScratch::bytes(n) + 63) / 64 * 64, n);
                const int64_t nb = n / 32;
                auto same_panel = [&](const d::GemmPanel& a, const d::GemmPanel& b, const char* what) {
                    EXPECT_EQ(a.has_min, b.has_min) << what;
                    EXPECT_EQ(a.sub_scales, b.sub_scales) << what;
                    EXPECT_EQ(0, std::memcmp(a.q, b.q, (size_t)(nb * 32 * 16))) << what;
                    EXPECT_EQ(0, std::memcmp(a.bias, b.bias, (size_t)(nb * 16) * 4)) << what;
                    EXPECT_EQ(0, std::memcmp(a.scale, b.scale, (size_t)(nb * 16) * 4)) << what;
                    int min_diffs = 0;
                    for (int64_t i = 0; i < nb * 16; ++i) min_diffs += a.min[i] != b.min[i];
                    EXPECT_EQ(min_diffs, 0) << what;
                    if (a.sub_scales) {
                        EXPECT_EQ(0, std::memcmp(a.sub_scale, b.sub_scale, (size_t)(nb * 32) * 4)) << what;
                    }
                };
                tt.pack_ref(tile.data(), n, &s.panel);
                d::gemm_pack(d::gemm_type(tt.type), w.data(), row_bytes, rows, n, &rows_panel);
                same_panel(s.panel, rows_panel.panel, "tile _ref panel vs the rows' panel");
                for (moe::Isa isa : {moe::Isa::avx2, moe::Isa::avx512, moe::Isa::avx512_vnni}) {
                    if (!isa_usable(isa)) continue;
                    SCOPED_TRACE(moe::isa_name(isa));
                    const d::RowKernel k = d::row_kernel(*d::quant_type((uint32_t)tt.type), isa, n);
                    ASSERT_TRUE(k.tile);
                    EXPECT_EQ(k.tile.bytes(n), tile.size());
                    alignas(64) float simd[16];
                    k.tile.dot(tile.data(), xq.data(), n, simd, 2048);
                    EXPECT_EQ(0, std::memcmp(out, simd, sizeof out)) << "SIMD vs _ref";
                    k.tile.pack(tile.data(), n, &rows_panel.panel);
                    EXPECT_EQ(0, std::memcmp(s.panel.min, rows_panel.panel.min, (size_t)(nb * 16) * 4)) << "SIMD pack: min bits";
                    same_panel(s.panel, rows_panel.panel, "SIMD tile panel vs _ref");
                }
            }
}

// Q4_K: the oracle dequantizes with the file's packed 6-bit scales and mins (q4k_get_scale_min);
// the tile holds them unpacked.
TEST(Q4_KTiles, DotAndPanelMatchRowsAndOracle) {
    namespace d = moe::detail;
    const KTileType tt{moe::TensorType::q4_k, sizeof(d::BlockQ4K), d::q4_k_tile_bytes, d::q4_k_tile_repack, d::q4_k_tile_dot_ref, d::q4_k_tile_pack_ref,
                       [](const void* w, const d::BlockQ8K* x, int64_t n) { return d::vec_dot_q45k_q8k_ref<d::BlockQ4K>(static_cast<const d::BlockQ4K*>(w), x, n); },
                       [](const void* w, const d::BlockQ8K* x, int64_t n, double* dot, double* magnitude) {
                           const d::BlockQ4K* blk = static_cast<const d::BlockQ4K*>(w);
                           for (int64_t j = 0; j < n; ++j) {
                               const d::BlockQ4K& b = blk[j / 256];
                               const int e = (int)(j % 256);
                               uint8_t sc, m;
                               d::q4k_get_scale_min(e / 32, b.scales, &sc, &m);
                               const uint8_t byte = b.qs[32 * (e / 64) + e % 32];
                               const int code = e % 64 < 32 ? byte & 15 : byte >> 4;
                               const double scaled = (double)d::fp16_to_f32(b.d) * sc * code, offset = (double)d::fp16_to_f32(b.dmin) * m;
                               const double xv = (double)x[j / 256].d * x[j / 256].qs[e];
                               *dot += (scaled - offset) * xv;
                               *magnitude += std::fabs(scaled * xv) + std::fabs(offset * xv);
                           }
                       }};
    check_k_tiles(tt, 11);
}

// Q6_K: the oracle dequantizes the file's rows with q6k_unpack; padding rows hold code 32 (value 0),
// so their panel rows equal gemm_pack's too.
TEST(Q6_KTiles, DotAndPanelMatchRowsAndOracle) {
    namespace d = moe::detail;
    const KTileType tt{moe::TensorType::q6_k, sizeof(d::BlockQ6K), d::q6_k_tile_bytes, d::q6_k_tile_repack, d::q6_k_tile_dot_ref, d::q6_k_tile_pack_ref,
                       [](const void* w, const d::BlockQ8K* x, int64_t n) { return d::vec_dot_q6k_q8k_ref(static_cast<const d::BlockQ6K*>(w), x, n); },
                       [](const void* w, const d::BlockQ8K* x, int64_t n, double* dot, double* magnitude) {
                           const d::BlockQ6K* blk = static_cast<const d::BlockQ6K*>(w);
                           for (int64_t sb = 0; sb < n / 256; ++sb) {
                               int8_t q[256];
                               d::q6k_unpack(blk[sb], q);
                               for (int e = 0; e < 256; ++e) {
                                   const double wv = (double)d::fp16_to_f32(blk[sb].d) * blk[sb].scales[e / 16] * q[e];
                                   const double xv = (double)x[sb].d * x[sb].qs[e];
                                   *dot += wv * xv;
                                   *magnitude += std::fabs(wv * xv);
                               }
                           }
                       }};
    check_k_tiles(tt, 13);
}

}  // namespace
