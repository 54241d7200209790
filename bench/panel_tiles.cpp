// panel_tiles: one thread's time per 32-column block of the prefill panel tile (GEMM PANELS: 16
// weight rows x NT tokens), AVX-512 VNNI against the same tile on the AMX unit (moe::set_amx),
// for Q4_0 panels of K columns. Both kernels must give the _ref tile's bits; the program checks.
//
//   g++ -O2 -std=c++17 -pthread -I. bench/panel_tiles.cpp -o build/panel_tiles && build/panel_tiles
//
// The panel and activations stay in L1/L2 (one tile, called repeatedly): kernel cost only.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

int main() {
    using namespace moe::detail;
    if (moe::detected_isa() != moe::Isa::avx512_vnni || !gemm_tile_kernel(moe::Isa::avx512_vnni)) {
        std::printf("no AVX-512 VNNI panels on this CPU or build: nothing to compare\n");
        return 0;
    }
    const bool amx = moe::amx_available();
    std::printf("AMX-INT8 usable: %s\n| K | tokens | VNNI ns/block | AMX ns/block |\n|---:|---:|---:|---:|\n", amx ? "yes" : "no");
    int bad = 0;
    for (int64_t K : {768, 2048, 6144}) {
        const int64_t nb = K / kQK;
        AlignedBuffer<uint8_t> buf;
        if (!buf.allocate(GemmScratch::bytes(K))) return 1;
        GemmScratch scratch;
        scratch.carve(buf.data, K);
        std::mt19937 rng(1);
        std::vector<BlockQ4_0> w((size_t)(kGemmRows * nb));
        for (BlockQ4_0& b : w) {
            b.d = f32_to_fp16(0.01f * (float)(1 + rng() % 7));
            for (uint8_t& q : b.qs) q = (uint8_t)rng();
        }
        gemm_pack(gemm_type(moe::TensorType::q4_0), reinterpret_cast<const uint8_t*>(w.data()), (size_t)nb * sizeof(BlockQ4_0), kGemmRows, K, &scratch);
        std::vector<BlockQ8G> xs((size_t)(kGemmTokens * nb));
        for (BlockQ8G& b : xs) {
            b.d = 0.01f;
            b.s = 0.3f;
            for (uint8_t& q : b.qs) q = (uint8_t)rng();
        }
        const BlockQ8G* x[kGemmTokens];
        for (int t = 0; t < kGemmTokens; ++t) x[t] = xs.data() + t * nb;
        for (int nt : {kGemmTokens, kGemmTokens / 2}) {
            float ref[kGemmTokens * kGemmRows], out[kGemmTokens * kGemmRows];
            gemm_tile_ref(scratch.panel, x, nt, ref);
            double ns[2] = {0, 0};
            for (int k = 0; k < (amx ? 2 : 1); ++k) {
                moe::set_amx(k == 1);
                const GemmTileFn tile = gemm_tile_kernel(moe::Isa::avx512_vnni);
                const int iters = (int)(20000000 / K);
                double best = 1e30;
                for (int rep = 0; rep < 5; ++rep) {
                    const auto t0 = std::chrono::steady_clock::now();
                    for (int i = 0; i < iters; ++i) {
                        tile(scratch.panel, x, nt, out);
                        __asm__ volatile("" ::: "memory");
                    }
                    best = std::min(best, std::chrono::duration<double, std::nano>(std::chrono::steady_clock::now() - t0).count() / iters);
                }
                ns[k] = best / (double)nb;
                if (std::memcmp(out, ref, sizeof(float) * (size_t)(nt * kGemmRows)) != 0) {
                    std::printf("MISMATCH: %s tile differs from the _ref tile (K=%lld, %d tokens)\n", k ? "AMX" : "VNNI", (long long)K, nt);
                    ++bad;
                }
            }
            moe::set_amx(false);
            if (amx) std::printf("| %lld | %d | %.2f | %.2f |\n", (long long)K, nt, ns[0], ns[1]);
            else std::printf("| %lld | %d | %.2f | - |\n", (long long)K, nt, ns[0]);
        }
    }
    return bad ? 1 : 0;
}
