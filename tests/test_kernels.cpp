// SIMD row kernels against the scalar _ref kernels, through the public test hook moe::vec_dot():
// every tensor type x every ISA this CPU has, many row lengths (one block, odd block counts, long
// rows), Gaussian weights from moe::quantize_row plus adversarial raw blocks (all-ones bits, all
// zeros, random bytes, extreme fp16 scales) and adversarial activations.
//
// Tolerances: tests/kernel_cases.h (rigorous round-off bounds, shared with the standalone ARM test).
#include "moe_infer.h"
#include "kernel_cases.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

namespace {

using namespace kernel_cases;

// An ISA is testable when it belongs to the same family as the detected one and is not above it.
bool isa_available(moe::Isa isa) {
    const moe::Isa best = moe::detected_isa();
    const bool arm = isa == moe::Isa::neon || isa == moe::Isa::neon_dotprod;
    const bool best_arm = best == moe::Isa::neon || best == moe::Isa::neon_dotprod;
    return best != moe::Isa::scalar && arm == best_arm && (int)isa <= (int)best;
}

struct KernelCase {
    moe::TensorType type;
    moe::Isa isa;
};

void PrintTo(const KernelCase& c, std::ostream* os) { *os << moe::tensor_type_name(c.type) << "/" << moe::isa_name(c.isa); }

std::string case_name(const testing::TestParamInfo<KernelCase>& info) {
    return std::string(moe::tensor_type_name(info.param.type)) + "_" + moe::isa_name(info.param.isa);
}

class KernelVsRef : public testing::TestWithParam<KernelCase> {};

TEST_P(KernelVsRef, MatchesScalarWithinRoundoff) {
    const moe::TensorType t = GetParam().type;
    const moe::Isa isa = GetParam().isa;
    if (!isa_available(isa))
        GTEST_SKIP() << moe::isa_name(isa) << " is not available on this CPU/build (detected: " << moe::isa_name(moe::detected_isa()) << ")";
    std::mt19937 rng(1234u + 17u * (unsigned)t + (unsigned)isa);
    // Weights are placed 2 bytes past a 64-byte boundary (4 for f32): tensor data in a GGUF is
    // only 32-byte aligned and block sizes are odd multiples of 2, so kernels must not rely on
    // alignment beyond the element type's own.
    const size_t misalign = t == moe::TensorType::f32 ? 4 : 2;
    int checked = 0;
    for (int64_t n : row_lengths(t)) {
        for (int wk = 0; wk < (int)WeightKind::count; ++wk) {
            const std::vector<uint8_t> w = make_weights(t, n, (WeightKind)wk, rng);
            ASSERT_FALSE(w.empty()) << "quantize_row failed: " << moe::last_error();
            std::vector<uint8_t> storage(w.size() + 64 + misalign);
            uint8_t* base = storage.data() + (64 - (uintptr_t)storage.data() % 64) % 64 + misalign;
            std::memcpy(base, w.data(), w.size());
            for (int ak = 0; ak < (int)ActKind::count; ++ak) {
                const std::vector<float> x = make_activations(n, (ActKind)ak, rng);
                float ref = 0, simd = 0, twin = 0;
                ASSERT_EQ(moe::vec_dot(t, moe::Isa::scalar, base, x.data(), n, &ref), moe::Status::ok);
                ASSERT_EQ(moe::vec_dot(t, isa, base, x.data(), n, &simd), moe::Status::ok);
                // The SIMD kernel's own _ref twin: where it reads another activation layout (Q4_0-like
                // types on VNNI), the twin forms the same block sums and float products as the type's
                // q8_0 _ref, so it must equal it bit for bit.
                ASSERT_EQ(moe::vec_dot_ref(t, isa, base, x.data(), n, &twin), moe::Status::ok);
                const Oracle o = oracle(t, base, x, n);
                ASSERT_TRUE(o.ok);
                const int64_t terms = float_terms(t, n);
                const double tol = (2.0 * (double)terms + kPerTermSlack) * kUnitRoundoff * o.magnitude;
                const std::string what = std::string(moe::tensor_type_name(t)) + " " + moe::isa_name(isa) + " n=" + std::to_string(n) +
                                         " weights=" + kWeightKindNames[wk] + " x=" + kActKindNames[ak];
                ASSERT_TRUE(std::isfinite(ref)) << what;
                EXPECT_LE(std::fabs((double)simd - (double)ref), tol) << what << ": scalar " << ref << " simd " << simd << " M " << o.magnitude;
                EXPECT_EQ(twin, ref) << what << ": the kernel's _ref twin differs from the type's _ref";
                EXPECT_LE(std::fabs((double)ref - o.exact), tol + o.exact_slack) << what << ": scalar " << ref << " exact " << o.exact;
                if (is_float_type(t)) {  // long float rows: SIMD partial sums add at most T/8 terms each
                    const double tol_exact = ((double)terms / 8 + kPerTermSlack) * kUnitRoundoff * o.magnitude;
                    EXPECT_LE(std::fabs((double)simd - o.exact), tol_exact) << what << ": exact " << o.exact << " simd " << simd;
                }
                ++checked;
            }
        }
    }
    EXPECT_GT(checked, 0);
}

std::vector<KernelCase> all_cases() {
    std::vector<KernelCase> out;
    for (moe::TensorType t : kTypes)
        for (moe::Isa isa : kSimdIsas) out.push_back({t, isa});
    return out;
}

INSTANTIATE_TEST_SUITE_P(AllTypesAllIsas, KernelVsRef, testing::ValuesIn(all_cases()), case_name);

// Exact cases every ISA must reproduce bit for bit: small integers whose products and sums are
// exactly representable, so any order of float additions gives the same result. Q8_0 and Q4_0
// get blocks whose scales come out as exactly 1 (a 127 or a leading -8 in every block; activations
// with a 127 in every block).
TEST(Kernels, ExactOnSmallIntegers) {
    const moe::TensorType types[] = {moe::TensorType::f32, moe::TensorType::f16, moe::TensorType::bf16, moe::TensorType::q8_0, moe::TensorType::q4_0};
    for (int64_t n : {32 * 9, 32 * 12}) {  // 12 blocks: whole groups of 4 (the q8_0_split kernels)
        for (moe::TensorType t : types) {
            std::vector<float> wf((size_t)n), x((size_t)n);
            for (int64_t i = 0; i < n; ++i) {
                const int j = (int)(i % 32);
                if (t == moe::TensorType::q4_0) wf[(size_t)i] = j == 0 ? -8.f : (float)((int)((i * 7) % 15) - 7);
                else wf[(size_t)i] = j == 0 ? 127.f : (float)((int)((i * 37) % 255) - 127);
                x[(size_t)i] = j == 0 ? 127.f : (float)((int)((i * 11) % 255) - 127);
            }
            std::vector<uint8_t> w((size_t)(n / moe::tensor_type_block_elems(t) * moe::tensor_type_block_bytes(t)));
            ASSERT_EQ(moe::quantize_row(t, wf.data(), w.data(), n), moe::Status::ok);
            double exact = 0;
            for (int64_t i = 0; i < n; ++i) exact += (double)wf[(size_t)i] * (double)x[(size_t)i];
            float ref = 0;
            ASSERT_EQ(moe::vec_dot(t, moe::Isa::scalar, w.data(), x.data(), n, &ref), moe::Status::ok);
            EXPECT_EQ((double)ref, exact) << moe::tensor_type_name(t) << " n=" << n;
            for (moe::Isa isa : kSimdIsas) {
                if (!isa_available(isa)) continue;
                float simd = 0;
                ASSERT_EQ(moe::vec_dot(t, isa, w.data(), x.data(), n, &simd), moe::Status::ok);
                EXPECT_EQ(simd, ref) << moe::tensor_type_name(t) << " " << moe::isa_name(isa) << " n=" << n;
            }
        }
    }
}

// One row against several activation rows (batched decode, a row that several tokens use) must give
// each row's own vec_dot bit for bit, or a sequence decoded in a batch would drift from the same
// sequence decoded alone. Every weight and activation kind; counts that take the kernels' 8-, 4-,
// 2- and 1-row forms alone and together (11 = 8 + 2 + 1, as RowKernel::dot_uses splits it); rows of 1 and 3 groups of 128 (an odd count ends on the first accumulator) and
// of 3 and 8 super-blocks of 256.
TEST(Kernels, DotUsesEqualRowKernelBitForBit) {
    std::mt19937 rng(99);
    int with_kernel = 0;
    for (moe::TensorType t : kTypes)
        for (moe::Isa isa : kSimdIsas) {
            if (!isa_available(isa)) continue;
            for (int64_t n : {128, 384, 768, 2048}) {
                if (n % moe::tensor_type_block_elems(t)) continue;
                for (int wk = 0; wk < (int)WeightKind::count; ++wk) {
                    const std::vector<uint8_t> w = make_weights(t, n, (WeightKind)wk, rng);
                    ASSERT_FALSE(w.empty());
                    for (int count : {1, 2, 4, 7, 8, 11}) {
                        std::vector<float> x;
                        for (int i = 0; i < count; ++i) {
                            const std::vector<float> row = make_activations(n, (ActKind)((i + wk) % (int)ActKind::count), rng);
                            x.insert(x.end(), row.begin(), row.end());
                        }
                        std::vector<float> out((size_t)count);
                        const moe::Status st = moe::vec_dot_uses(t, isa, w.data(), x.data(), count, n, out.data());
                        if (st == moe::Status::unsupported) break;
                        ASSERT_EQ(st, moe::Status::ok) << moe::last_error();
                        ++with_kernel;
                        for (int i = 0; i < count; ++i) {
                            float one = 0;
                            ASSERT_EQ(moe::vec_dot(t, isa, w.data(), x.data() + n * i, n, &one), moe::Status::ok);
                            EXPECT_EQ(out[(size_t)i], one) << moe::tensor_type_name(t) << " " << moe::isa_name(isa) << " n=" << n
                                                           << " weights=" << kWeightKindNames[wk] << " row " << i << " of " << count;
                        }
                    }
                }
            }
        }
    // These have the form wherever their ISA runs (the test must not pass vacuously): AVX2 for the
    // 32-element types and the K-quants, AVX-512 VNNI for the 4-bit split kernels and Q4_K/Q6_K.
    using T = moe::TensorType;
    const struct {
        moe::Isa isa;
        std::vector<T> types;
    } must_have[] = {{moe::Isa::avx2, {T::q4_0, T::q5_0, T::q8_0, T::iq4_nl, T::mxfp4, T::q4_k, T::q5_k, T::q6_k}},
                     {moe::Isa::avx512_vnni, {T::q4_0, T::iq4_nl, T::mxfp4, T::q4_k, T::q6_k}}};
    for (const auto& m : must_have) {
        if (!isa_available(m.isa)) continue;
        for (T t : m.types) {
            const std::vector<uint8_t> w = make_weights(t, 512, WeightKind::gaussian, rng);
            const std::vector<float> x(512 * 2, 0.5f);
            float out[2];
            EXPECT_EQ(moe::vec_dot_uses(t, m.isa, w.data(), x.data(), 2, 512, out), moe::Status::ok)
                << moe::tensor_type_name(t) << " " << moe::isa_name(m.isa) << ": " << moe::last_error();
        }
    }
    std::printf("[          ] %d (type, isa, row, count) cases with a several-row kernel\n", with_kernel);
}

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && !defined(MOE_NO_SIMD) && \
    !defined(MOE_NO_AVX2) && !defined(MOE_NO_AVX512)
// detected_isa() agrees with the compiler's own CPU (and OS-support) checks.
TEST(Kernels, DetectionMatchesCompilerCpuChecks) {
    __builtin_cpu_init();
    moe::Isa expect = moe::Isa::scalar;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) expect = moe::Isa::avx2;
    if (expect == moe::Isa::avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        expect = __builtin_cpu_supports("avx512vnni") ? moe::Isa::avx512_vnni : moe::Isa::avx512;
    EXPECT_EQ(moe::detected_isa(), expect) << "detected " << moe::isa_name(moe::detected_isa());
    std::printf("[          ] detected ISA: %s\n", moe::isa_name(moe::detected_isa()));
}
#endif

}  // namespace

// The SIMD activation quantizers must be bit-exact with the scalar ones (the dot-product
// tolerances above assume identical integer inputs).
TEST(ActivationQuantizers, BitExactWithScalar) {
    std::mt19937 rng(42);
    std::normal_distribution<float> nd(0.f, 1.f);
    const moe::TensorType kinds[] = {moe::TensorType::q8_0, moe::TensorType::q4_0, moe::TensorType::q4_k, moe::TensorType::q6_k};
    for (moe::Isa isa : kSimdIsas) {
        if (!isa_available(isa)) continue;  // x86 and ARM (NEON) quantizers alike
        for (moe::TensorType t : kinds)
            for (int64_t n : {256, 512, 2304}) {
                for (int pattern = 0; pattern < 4; ++pattern) {
                    std::vector<float> x((size_t)n);
                    for (size_t i = 0; i < x.size(); ++i) {
                        float v = nd(rng) * (pattern == 2 ? 1e4f : 1.f);
                        if (pattern == 1) v = std::round(v * 4) / 4 + 0.5f / 127;  // many exact ties
                        if (pattern == 3 && i % 7) v = 0;                          // sparse rows and zero blocks
                        x[i] = v;
                    }
                    std::vector<uint8_t> a((size_t)n * 2 + 64), b((size_t)n * 2 + 64);
                    ASSERT_EQ(moe::quantize_activations(t, moe::Isa::scalar, x.data(), n, a.data(), a.size()), moe::Status::ok);
                    ASSERT_EQ(moe::quantize_activations(t, isa, x.data(), n, b.data(), b.size()), moe::Status::ok);
                    EXPECT_EQ(a, b) << moe::isa_name(isa) << " " << moe::tensor_type_name(t) << " n=" << n << " pattern " << pattern;
                }
            }
    }
}

// set_amx(true) takes effect only where AMX is usable, and is off by default.
TEST(PanelGemm, AmxSwitch) {
    EXPECT_FALSE(moe::amx_enabled());
    moe::set_amx(true);
    EXPECT_EQ(moe::amx_enabled(), moe::amx_available());
    moe::set_amx(false);
    EXPECT_FALSE(moe::amx_enabled());
}

// Prefill panels (GEMM PANELS in moe_infer.h) through moe::gemm_tile: each ISA's panel kernel
// bit-identical to the scalar _ref tile (the same float steps, lane-wise), and the _ref tile equal
// to the scalar row kernel of every (row, token) up to the order of the float additions (both
// quantize the activations to the same codes and scales and form the same integer block sums).
TEST(PanelGemm, MatchesRowKernelsAndRef) {
    using moe::TensorType;
    const TensorType panel_types[] = {TensorType::q4_0, TensorType::q4_1, TensorType::q5_0, TensorType::q5_1, TensorType::q8_0,
                                      TensorType::iq4_nl, TensorType::mxfp4, TensorType::q4_k, TensorType::q5_k,
                                      TensorType::q3_k, TensorType::q6_k, TensorType::affine3_g64, TensorType::affine4_g128};
    std::mt19937 rng(42);
    std::normal_distribution<float> gauss;
    for (TensorType type : panel_types) {
        const int blk = moe::tensor_type_block_elems(type);
        for (int64_t n : {160, 256, 768}) {  // 160: an odd number of 32-column blocks
            if (n % blk) continue;
            const size_t row_bytes = (size_t)(n / blk) * (size_t)moe::tensor_type_block_bytes(type);
            for (int rows : {1, 5, 16})
                for (int tokens : {1, 3, 5, 8})
                for (bool extreme : {false, true}) {
                    if (extreme && (rows != 16 || tokens != 5)) continue;
                    SCOPED_TRACE(std::string(moe::tensor_type_name(type)) + " n=" + std::to_string(n) + " rows=" + std::to_string(rows) +
                                 " tokens=" + std::to_string(tokens) + (extreme ? " extreme" : ""));
                    std::vector<float> wf((size_t)(rows * n)), x((size_t)(tokens * n)), deq((size_t)n);
                    for (float& v : wf) v = gauss(rng);
                    for (int t = 0; t < tokens; ++t)
                        for (int64_t j = 0; j < n; ++j) x[(size_t)(t * n + j)] = t == 1 ? 0.f : gauss(rng) * (t == 2 ? 1e-3f : 1.f);
                    if (extreme) {  // constant rows and tokens: every code at an end of its range, so the integer sums are largest
                        for (int r = 0; r < rows; ++r)
                            for (int64_t j = 0; j < n; ++j) wf[(size_t)(r * n + j)] = r % 4 == 0 ? -1.f : r % 4 == 1 ? 1.f : r % 4 == 2 ? (j % 2 ? 1.f : -1.f) : (j < n / 2 ? -3.f : 2.f);
                        for (int t = 0; t < tokens; ++t)
                            for (int64_t j = 0; j < n; ++j) x[(size_t)(t * n + j)] = t % 2 || j % 32 == 0 ? -1.f : 1.f;  // q8_k: codes +127 need a first -1
                    }
                    std::vector<uint8_t> w(row_bytes * (size_t)rows);
                    for (int r = 0; r < rows; ++r)
                        ASSERT_EQ(moe::quantize_row(type, wf.data() + r * n, w.data() + row_bytes * (size_t)r, n), moe::Status::ok);
                    for (int r = 0; extreme && r < rows; r += 4) {  // and raw rows of all-0xFF / all-0x00 code bytes
                        const std::vector<uint8_t> raw = make_weights(type, n, r % 8 ? WeightKind::all_zero_bits : WeightKind::all_ones_bits, rng);
                        ASSERT_EQ(raw.size(), row_bytes);
                        std::memcpy(w.data() + row_bytes * (size_t)r, raw.data(), row_bytes);
                    }
                    std::vector<float> ref((size_t)(rows * tokens));
                    ASSERT_EQ(moe::gemm_tile(type, moe::Isa::scalar, w.data(), row_bytes, rows, x.data(), tokens, n, ref.data()),
                              moe::Status::ok) << moe::last_error();
                    for (int r = 0; r < rows; ++r) {
                        ASSERT_EQ(moe::dequantize_row(type, w.data() + row_bytes * (size_t)r, deq.data(), n), moe::Status::ok);
                        for (int t = 0; t < tokens; ++t) {
                            float row_dot = 0;
                            ASSERT_EQ(moe::vec_dot(type, moe::Isa::scalar, w.data() + row_bytes * (size_t)r, x.data() + t * n, n, &row_dot),
                                      moe::Status::ok);
                            double magnitude = 0;  // sum |w_j x_j|: the scale of the float round-off
                            for (int64_t j = 0; j < n; ++j) magnitude += std::fabs((double)deq[(size_t)j] * x[(size_t)(t * n + j)]);
                            EXPECT_NEAR(ref[(size_t)(t * rows + r)], row_dot, 1e-5 * magnitude + 1e-6) << "row " << r << " token " << t;
                        }
                    }
                    for (moe::Isa isa : {moe::Isa::avx2, moe::Isa::avx512, moe::Isa::avx512_vnni, moe::Isa::neon, moe::Isa::neon_dotprod}) {
                        if (!isa_available(isa)) continue;
                        // AVX-512 VNNI panels, and the same on the AMX tile unit where the CPU has one (set_amx).
                        for (bool amx : {false, true}) {
                            if (amx && (isa != moe::Isa::avx512_vnni || !moe::amx_available())) continue;
                            moe::set_amx(amx);
                            std::vector<float> got((size_t)(rows * tokens));
                            const moe::Status st = moe::gemm_tile(type, isa, w.data(), row_bytes, rows, x.data(), tokens, n, got.data());
                            moe::set_amx(false);
                            if (st == moe::Status::unsupported) continue;  // this ISA has no panel kernel: row kernels serve
                            ASSERT_EQ(st, moe::Status::ok) << moe::last_error();
                            EXPECT_EQ(0, std::memcmp(got.data(), ref.data(), got.size() * sizeof(float))) << moe::isa_name(isa) << (amx ? " AMX" : "");
                        }
                    }
                }
        }
    }
    // Types without a panel form, and bad arguments.
    std::vector<uint8_t> w(4096);
    std::vector<float> x(256, 1.f), out(16);
    // AVX2 has panels for the types whose codes stay within +-64 (its int16 pair sums), not for Q8_0
    // and IQ4_NL; AVX-512 VNNI for all of them. (So the loop above did not pass vacuously.)
    if (isa_available(moe::Isa::avx2)) {
        for (TensorType type : {TensorType::q4_0, TensorType::q4_1, TensorType::q5_0, TensorType::q5_1, TensorType::mxfp4, TensorType::q4_k,
                                TensorType::q5_k, TensorType::q3_k, TensorType::q6_k, TensorType::affine3_g64, TensorType::affine4_g128})
            EXPECT_EQ(moe::gemm_tile(type, moe::Isa::avx2, w.data(), 1, 1, x.data(), 1, 256, out.data()), moe::Status::ok)
                << moe::tensor_type_name(type) << ": " << moe::last_error();
        for (TensorType type : {TensorType::q8_0, TensorType::iq4_nl})
            EXPECT_EQ(moe::gemm_tile(type, moe::Isa::avx2, w.data(), 1, 1, x.data(), 1, 256, out.data()), moe::Status::unsupported)
                << moe::tensor_type_name(type);
    }
    if (isa_available(moe::Isa::avx512_vnni)) {
        for (TensorType type : panel_types) {
            EXPECT_EQ(moe::gemm_tile(type, moe::Isa::avx512_vnni, w.data(), 1, 1, x.data(), 1, 256, out.data()), moe::Status::ok)
                << moe::tensor_type_name(type) << ": " << moe::last_error();
        }
    }
    for (TensorType type : {TensorType::q2_k, TensorType::tq3, TensorType::nvfp4, TensorType::f32})
        EXPECT_EQ(moe::gemm_tile(type, moe::Isa::scalar, w.data(), 256, 1, x.data(), 1, 256, out.data()), moe::Status::unsupported)
            << moe::tensor_type_name(type);
    EXPECT_EQ(moe::gemm_tile(TensorType::q4_0, moe::Isa::scalar, w.data(), 144, 17, x.data(), 1, 256, out.data()), moe::Status::invalid_argument);
    EXPECT_EQ(moe::gemm_tile(TensorType::q4_0, moe::Isa::scalar, w.data(), 144, 1, x.data(), 9, 256, out.data()), moe::Status::invalid_argument);
    EXPECT_EQ(moe::gemm_tile(TensorType::q4_0, moe::Isa::scalar, w.data(), 144, 1, x.data(), 1, 250, out.data()), moe::Status::invalid_argument);
}

// Attention kernels (a float KV cache's scores, softmax exp and value sums; att_*_ref in moe_infer.h).
// The exp: SIMD bit-identical to its _ref, and the _ref within 2 ulp of std::exp over the softmax's
// range (x <= 0) and beyond.
TEST(AttentionKernels, ExpMatchesRefAndStdExp) {
    std::vector<float> x;
    for (float v = -87.f; v <= 88.f; v += 0.0137f) x.push_back(v);
    for (float v : {0.f, -0.f, -1e-30f, 1e-30f, -0.5f * 0.6931472f, 0.5f * 0.6931472f, -87.3f, 88.f}) x.push_back(v);
    std::vector<float> ref = x;
    ASSERT_EQ(moe::attention_exp(moe::Isa::scalar, ref.data(), (int)ref.size()), moe::Status::ok);
    for (size_t i = 0; i < x.size(); ++i) {
        const double want = std::exp((double)x[i]);
        EXPECT_LE(std::fabs(ref[i] - want), 2 * std::ldexp(1.0, std::ilogb(want) - 23)) << "exp(" << x[i] << ")";
    }
    for (moe::Isa isa : kSimdIsas) {
        if (!isa_available(isa)) continue;
        for (int n : {1, 15, 16, 17, (int)x.size()}) {
            std::vector<float> got(x.begin(), x.begin() + n);
            const moe::Status st = moe::attention_exp(isa, got.data(), n);
            if (st == moe::Status::unsupported) break;
            ASSERT_EQ(st, moe::Status::ok);
            EXPECT_EQ(0, std::memcmp(got.data(), ref.data(), (size_t)n * sizeof(float))) << moe::isa_name(isa) << " n=" << n;
        }
    }
}

// Scores and value sums: each ISA's kernels against the _ref ones up to the order of the float
// additions, on odd head sizes, query counts around the 4-row blocks and key counts around the
// 64-position blocks; a query row's results do not depend on the rows computed with it.
TEST(AttentionKernels, StepMatchesRef) {
    std::mt19937 rng(7);
    std::normal_distribution<float> gauss;
    const int dims[][2] = {{128, 128}, {64, 64}, {48, 40}, {20, 36}, {256, 256}, {192, 128}};
    int checked = 0;
    for (moe::Isa isa : kSimdIsas) {
        if (!isa_available(isa)) continue;
        for (const auto& hd : dims)
            for (int nq : {1, 3, 4, 9})
                for (int n : {1, 5, 64, 70}) {
                    const int hk = hd[0], hv = hd[1];
                    const int64_t rf = std::max(hk, hv) + 3;
                    std::vector<float> q((size_t)(nq * hk)), kv((size_t)(n * rf)), vv((size_t)(n * rf)), acc0((size_t)(nq * hv));
                    for (float& v : q) v = gauss(rng);
                    for (float& v : kv) v = gauss(rng);
                    for (float& v : vv) v = gauss(rng);
                    for (float& v : acc0) v = gauss(rng);
                    const float scale = 1.f / std::sqrt((float)hk);
                    std::vector<float> sr((size_t)(nq * n)), ar = acc0, sg((size_t)(nq * n)), ag = acc0;
                    ASSERT_EQ(moe::attention_step(moe::Isa::scalar, q.data(), nq, kv.data(), vv.data(), n, hk, hv, rf, scale, sr.data(), ar.data()),
                              moe::Status::ok);
                    const moe::Status st = moe::attention_step(isa, q.data(), nq, kv.data(), vv.data(), n, hk, hv, rf, scale, sg.data(), ag.data());
                    if (st == moe::Status::unsupported) continue;
                    ASSERT_EQ(st, moe::Status::ok);
                    SCOPED_TRACE(std::string(moe::isa_name(isa)) + " hk=" + std::to_string(hk) + " hv=" + std::to_string(hv) + " nq=" + std::to_string(nq) +
                                 " n=" + std::to_string(n));
                    for (int i = 0; i < nq; ++i) {
                        for (int j = 0; j < n; ++j) {  // e = exp(score - max) in (0, 1]: score errors ~1e-6 of |q||k|
                            double mag = 0;
                            for (int d = 0; d < hk; ++d) mag += std::fabs((double)q[(size_t)(i * hk + d)] * kv[(size_t)(j * rf + d)]);
                            EXPECT_NEAR(sg[(size_t)(i * n + j)], sr[(size_t)(i * n + j)], 4e-6 * mag * scale + 1e-6) << "e[" << i << "][" << j << "]";
                        }
                        for (int d = 0; d < hv; ++d) {
                            double mag = std::fabs(acc0[(size_t)(i * hv + d)]);
                            for (int j = 0; j < n; ++j) mag += std::fabs((double)sr[(size_t)(i * n + j)] * vv[(size_t)(j * rf + d)]);
                            EXPECT_NEAR(ag[(size_t)(i * hv + d)], ar[(size_t)(i * hv + d)], 2e-5 * mag + 1e-6) << "acc[" << i << "][" << d << "]";
                        }
                    }
                    // row 0 alone: the same bits as row 0 computed with the others
                    std::vector<float> s1((size_t)n), a1(acc0.begin(), acc0.begin() + hv);
                    ASSERT_EQ(moe::attention_step(isa, q.data(), 1, kv.data(), vv.data(), n, hk, hv, rf, scale, s1.data(), a1.data()), moe::Status::ok);
                    EXPECT_EQ(0, std::memcmp(s1.data(), sg.data(), (size_t)n * sizeof(float))) << "scores of row 0 depend on nq";
                    EXPECT_EQ(0, std::memcmp(a1.data(), ag.data(), (size_t)hv * sizeof(float))) << "values of row 0 depend on nq";
                    ++checked;
                }
    }
    if (checked == 0) GTEST_SKIP() << "no ISA with attention kernels on this CPU";
    std::vector<float> b(64, 1.f);
    EXPECT_EQ(moe::attention_step(moe::Isa::scalar, b.data(), 1, b.data(), b.data(), 1, 8, 8, 4, 1.f, b.data(), b.data()), moe::Status::invalid_argument);
}
