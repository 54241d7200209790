// q4_0_layout: would a repacked Q4_0 row stream faster? The same bytes re-laid per row as the
// blocks' 16-byte code runs back to back, then their fp16 scales (one 64-byte load per 4 blocks,
// the scales of 16 blocks in one conversion), against the library's AVX-512 VNNI kernel on the
// GGUF layout; both read the same q8_0_split activations. A measurement, not a library path
// (bench/RESULTS.md, fourteenth session). The third column is the library's Q4_0 tiles
// (LoadOptions::repack: 16 rows interleaved, q4_0_tile_dot_avx512vnni), same bytes again
// (twentieth session).
//
//   g++ -O3 -std=c++17 -pthread -I. bench/q4_0_layout.cpp -o build/q4_0_layout
//   build/q4_0_layout COLS THREADS MIB   (e.g. 768 2 1024: from memory; 768 1 1: from L2)
//
// Needs a CPU with AVX-512 VNNI. Output: GB/s of weight bytes, best of the repetitions, three
// rounds; exit status 1 if the two layouts' dots differ.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"
#include "../tests/kernel_cases.h"
#include "row_stream.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#if defined(__x86_64__)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's AVX-512 intrinsics (as in moe_infer.h)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
namespace {
using namespace moe::detail;

// Row of nb blocks: codes[16 * nb] (block k's qs at 16k), then nb fp16 scales.
void repack_row(const BlockQ4_0* b, uint8_t* out, int64_t nb) {
    for (int64_t k = 0; k < nb; ++k) std::memcpy(out + 16 * k, b[k].qs, 16);
    for (int64_t k = 0; k < nb; ++k) std::memcpy(out + 16 * nb + 2 * k, &b[k].d, 2);
}

__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"))) float dot_repacked(const void* wv, const void* xv, int64_t n) {
    const uint8_t* codes = static_cast<const uint8_t*>(wv);
    const int64_t nb = n / 32, ng = n / 128;
    const uint16_t* scales = reinterpret_cast<const uint16_t*>(codes + 16 * nb);
    const BlockQ8Split* x = static_cast<const BlockQ8Split*>(xv);
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps(), d16 = _mm512_setzero_ps();
    for (int64_t g = 0; g < ng; ++g) {
        if ((g & 3) == 0) {  // the next 16 blocks' scales (fewer at the row's end)
            const int64_t left = nb - 4 * g;
            const __mmask16 m = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
            d16 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, scales + 4 * g));
        }
        const int j = (int)(g & 3);
        const __m512i idx = _mm512_add_epi32(_mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0), _mm512_set1_epi32(4 * j));
        const __m512 dw = _mm512_permutexvar_ps(idx, d16);
        const __m512i q = _mm512_loadu_si512(codes + 64 * g);
        const __m512i lo = _mm512_and_si512(q, m4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m4);
        __m512i s = _mm512_slli_epi32(_mm512_loadu_si512(x[g].neg_sum), 3);
        s = _mm512_dpbusd_epi32(s, lo, _mm512_loadu_si512(x[g].lo));
        s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(x[g].hi));
        const __m512 part = _mm512_mul_ps(dw, _mm512_loadu_ps(x[g].d));
        if (g & 1) acc1 = _mm512_fmadd_ps(part, _mm512_cvtepi32_ps(s), acc1);
        else acc0 = _mm512_fmadd_ps(part, _mm512_cvtepi32_ps(s), acc0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// A tile of 16 rows as one "row" for stream_rows_gbs: the library's tile kernel, its 16 sums added.
__attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512vnni"))) float dot_tile(const void* wv, const void* xv, int64_t n) {
    alignas(64) float out[16];
    q4_0_tile_dot_avx512vnni(static_cast<const uint8_t*>(wv), static_cast<const BlockQ8Split*>(xv), n, out, 0);
    float s = 0;
    for (float v : out) s += v;
    return s;
}

}  // namespace

int main(int argc, char** argv) {
    using namespace moe::detail;
    if (argc < 4) {
        std::fprintf(stderr, "usage: q4_0_layout COLS THREADS MIB\n");
        return 2;
    }
    const int64_t cols = std::atoll(argv[1]);
    const int threads = std::atoi(argv[2]);
    const size_t mib = (size_t)std::atoll(argv[3]);
    if (cols <= 0 || cols % 128 || threads < 1 || threads > 512 || mib < 1 || mib > 65536) {
        std::fprintf(stderr, "COLS a positive multiple of 128, THREADS 1..512, MIB 1..65536\n");
        return 2;
    }
    if (moe::detected_isa() != moe::Isa::avx512_vnni) {
        std::fprintf(stderr, "needs AVX-512 VNNI (this CPU: %s)\n", moe::isa_name(moe::detected_isa()));
        return 2;
    }
    const size_t huge = (size_t)2 << 20, bytes = mib << 20, alloc = (bytes + huge - 1) / huge * huge;
    const int64_t nb = cols / 32, row_bytes = nb * (int64_t)sizeof(BlockQ4_0), rows = (int64_t)(bytes / (size_t)row_bytes);
    uint8_t* gguf = static_cast<uint8_t*>(std::aligned_alloc(huge, alloc));
    uint8_t* repacked = static_cast<uint8_t*>(std::aligned_alloc(huge, alloc));
    uint8_t* tiles = static_cast<uint8_t*>(std::aligned_alloc(huge, alloc));
    if (!gguf || !repacked || !tiles || rows < 1) return 1;
#if defined(MADV_HUGEPAGE)
    madvise(gguf, alloc, MADV_HUGEPAGE);
    madvise(repacked, alloc, MADV_HUGEPAGE);
    madvise(tiles, alloc, MADV_HUGEPAGE);
#endif
    std::mt19937 rng(7);
    const std::vector<uint8_t> one = kernel_cases::make_weights(moe::TensorType::q4_0, 64 * cols, kernel_cases::WeightKind::random_bytes, rng);
    for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(gguf + r * row_bytes, one.data() + (r % 64) * row_bytes, (size_t)row_bytes);
        repack_row(reinterpret_cast<const BlockQ4_0*>(gguf + r * row_bytes), repacked + r * row_bytes, nb);
    }
    const int64_t n_tiles = rows / 16;  // whole tiles only (the rows past them are not timed there)
    for (int64_t t = 0; t < n_tiles; ++t) q4_0_tile_repack(gguf + t * 16 * row_bytes, (size_t)row_bytes, 16, cols, tiles + t * 16 * row_bytes);
    const std::vector<float> x = kernel_cases::make_activations(cols, kernel_cases::ActKind::gaussian, rng);
    const RowKernel k = row_kernel(*quant_type((uint32_t)moe::TensorType::q4_0), moe::Isa::avx512_vnni, cols);
    if (k.act != ActFormat::q8_0_split) return 1;
    std::vector<uint8_t> act(act_row_bytes(k.act, cols) + 64);
    quantize_act_with(k.act, moe::Isa::scalar, act.data(), x.data(), cols);
    for (int64_t r = 0; r < std::min<int64_t>(rows, 64); ++r) {  // same sums in the same order: equal
        const float a = k.vec_dot(gguf + r * row_bytes, act.data(), cols), b = dot_repacked(repacked + r * row_bytes, act.data(), cols);
        if (a != b) {
            std::fprintf(stderr, "row %lld: GGUF layout %g, repacked %g\n", (long long)r, a, b);
            return 1;
        }
    }
    for (int64_t t = 0; t < std::min<int64_t>(n_tiles, 4); ++t) {  // other float order than the rows: close, not equal
        alignas(64) float out[16];
        q4_0_tile_dot_avx512vnni(tiles + t * 16 * row_bytes, reinterpret_cast<const BlockQ8Split*>(act.data()), cols, out, 0);
        for (int r = 0; r < 16; ++r) {
            const float a = k.vec_dot(gguf + (t * 16 + r) * row_bytes, act.data(), cols);
            if (std::fabs(a - out[r]) > 1e-4f * (std::fabs(a) + 1.f)) {
                std::fprintf(stderr, "tile %lld row %d: GGUF layout %g, tile %g\n", (long long)t, r, a, out[r]);
                return 1;
            }
        }
    }
    const int reps = bytes > (64u << 20) ? 7 : 30;
    std::printf("q4_0_layout: %lld columns, %d threads, %zu MiB of rows, GB/s of weights (best of %d)\n", (long long)cols, threads, mib, reps);
    const int passes = (int)std::max<int64_t>(1, (256ll << 20) / (rows * row_bytes));  // small sets: ~256 MiB per repetition
    for (int round = 0; round < 3; ++round)
        std::printf("GGUF layout %.2f | repacked %.2f | tiles %.2f\n", stream_rows_gbs(k.vec_dot, gguf, rows, row_bytes, act.data(), cols, threads, reps, passes),
                    stream_rows_gbs(dot_repacked, repacked, rows, row_bytes, act.data(), cols, threads, reps, passes),
                    n_tiles >= threads ? stream_rows_gbs(dot_tile, tiles, n_tiles, 16 * row_bytes, act.data(), cols, threads, reps, passes) : 0.0);
    std::free(gguf);
    std::free(repacked);
    std::free(tiles);
    return 0;
}
#else
int main() {
    std::fprintf(stderr, "q4_0_layout needs x86-64 with AVX-512 VNNI\n");
    return 2;
}
#endif
