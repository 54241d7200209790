// SIMD row kernels against the scalar _ref kernels, through the public test hook moe::vec_dot():
// every tensor type x every ISA this CPU has, many row lengths (one block, odd block counts, long
// rows), Gaussian weights from moe::quantize_row plus adversarial raw blocks (all-ones bits, all
// zeros, random bytes, extreme fp16 scales) and adversarial activations.
//
// Tolerance. Every kernel computes the integer block sums exactly, so SIMD and scalar differ only
// in the order of their float operations. With u = 2^-24 (float's unit roundoff) and
// M = Σ |w_i|·|x_i| (plus the K-quant min terms, which are summed separately), a float sum of T
// terms carries at most about T·u·M of rounding, so
//     |simd - scalar| <= (2·T + 16)·u·M,
// where T is the number of float terms the scalar kernel adds (one per element for F32/F16/BF16,
// one per block for Q8_0/Q4_0, two per super-block for K-quants) and 16 covers the per-term
// roundings (scale products, int->float conversion, horizontal sums). That bound is rigorous, not
// tuned; a dropped or doubled block moves the result by about M/T, far outside it for the lengths
// used here (T <= 128 for quantized rows). For long float rows (T up to 4096) the bound is loose,
// so those also check the SIMD result against a double-precision sum: SIMD kernels keep at least 8
// independent lanes, so each of their partial sums adds at most T/8 terms.
#include "moe_infer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

namespace {

constexpr double kUnitRoundoff = 1.0 / (1 << 24);  // float: 2^-24
constexpr int kPerTermSlack = 16;                  // scale products, conversions, final reductions

const moe::TensorType kTypes[] = {moe::TensorType::f32, moe::TensorType::f16, moe::TensorType::bf16, moe::TensorType::q8_0,
                                  moe::TensorType::q4_0, moe::TensorType::q4_1, moe::TensorType::q5_0, moe::TensorType::q5_1,
                                  moe::TensorType::iq4_nl, moe::TensorType::iq4_xs, moe::TensorType::tq1_0, moe::TensorType::tq2_0, moe::TensorType::q2_k, moe::TensorType::q3_k, moe::TensorType::q4_k,
                                  moe::TensorType::q5_k, moe::TensorType::q6_k};
const moe::Isa kSimdIsas[] = {moe::Isa::avx2, moe::Isa::avx512, moe::Isa::avx512_vnni, moe::Isa::neon, moe::Isa::neon_dotprod};

bool is_float_type(moe::TensorType t) { return t == moe::TensorType::f32 || t == moe::TensorType::f16 || t == moe::TensorType::bf16; }
// Types with 256-element blocks and Q8_K activations (K-quants and IQ4_XS).
bool is_k_quant(moe::TensorType t) {
    return t == moe::TensorType::iq4_xs || t == moe::TensorType::tq1_0 || t == moe::TensorType::tq2_0 || t == moe::TensorType::q2_k || t == moe::TensorType::q3_k || t == moe::TensorType::q4_k || t == moe::TensorType::q5_k ||
           t == moe::TensorType::q6_k;
}
// Types whose kernels add an offset term per element (Q4_1/Q5_1's m, the K-quants' mins, the
// ternary types' -1 taken out as d * Σ y): it enters the round-off magnitude.
bool has_mins(moe::TensorType t) {
    return t == moe::TensorType::tq1_0 || t == moe::TensorType::tq2_0 || t == moe::TensorType::q4_1 || t == moe::TensorType::q5_1 || t == moe::TensorType::q2_k || t == moe::TensorType::q4_k ||
           t == moe::TensorType::q5_k;
}

// Elements per activation block: the kernels' row length must be a multiple of it.
int act_block(moe::TensorType t) { return is_float_type(t) ? 1 : is_k_quant(t) ? 256 : 32; }

// An ISA is testable when it belongs to the same family as the detected one and is not above it.
bool isa_available(moe::Isa isa) {
    const moe::Isa best = moe::detected_isa();
    const bool arm = isa == moe::Isa::neon || isa == moe::Isa::neon_dotprod;
    const bool best_arm = best == moe::Isa::neon || best == moe::Isa::neon_dotprod;
    return best != moe::Isa::scalar && arm == best_arm && (int)isa <= (int)best;
}

float half_to_float(uint16_t h) {
    float f = 0;
    moe::dequantize_row(moe::TensorType::f16, &h, &f, 1);
    return f;
}
uint16_t float_to_half(float f) {
    uint16_t h = 0;
    moe::quantize_row(moe::TensorType::f16, &f, &h, 1);
    return h;
}

// Byte offsets of the fp16 scale fields in one block (formats.md 2.2-2.3, ggml-common.h): {d, dmin or -1}.
void scale_offsets(moe::TensorType t, int* d, int* dmin) {
    *dmin = -1;
    *d = t == moe::TensorType::q6_k ? 208 : t == moe::TensorType::q3_k ? 108 : t == moe::TensorType::q2_k ? 80
       : t == moe::TensorType::tq2_0 ? 64 : t == moe::TensorType::tq1_0 ? 52 : 0;
    if (has_mins(t) && t != moe::TensorType::tq1_0 && t != moe::TensorType::tq2_0) *dmin = t == moe::TensorType::q2_k ? 82 : 2;
}

// The offset term of each element of one block (of tensor_type_block_elems(t) elements): Q4_1/Q5_1
// add the fp16 m @2 to every element; K-quants subtract dmin * m, Q4_K/Q5_K with 6-bit mins of
// 32-element sub-blocks packed as in formats.md 2.3, Q2_K a 4-bit min per 16 in scales[i] >> 4.
void k_quant_mins(moe::TensorType t, const uint8_t* blk, float* out) {
    uint16_t h;
    const bool ternary = t == moe::TensorType::tq1_0 || t == moe::TensorType::tq2_0;
    std::memcpy(&h, blk + (t == moe::TensorType::q2_k ? 82 : t == moe::TensorType::tq1_0 ? 52 : t == moe::TensorType::tq2_0 ? 64 : 2), 2);
    const float dmin = half_to_float(h);
    if (ternary) {  // d per element
        for (int i = 0; i < 256; ++i) out[i] = dmin;
        return;
    }
    if (t == moe::TensorType::q4_1 || t == moe::TensorType::q5_1) {
        for (int i = 0; i < 32; ++i) out[i] = dmin;
        return;
    }
    for (int i = 0; i < 256; ++i) {
        int m;
        if (t == moe::TensorType::q2_k) {
            m = blk[i / 16] >> 4;
        } else {
            const uint8_t* s = blk + 4;
            const int j = i / 32;
            m = j < 4 ? (s[j + 4] & 63) : ((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
        }
        out[i] = dmin * (float)m;
    }
}

enum class WeightKind { gaussian, all_ones_bits, all_zero_bits, random_bytes, extreme_scales };
const WeightKind kWeightKinds[] = {WeightKind::gaussian, WeightKind::all_ones_bits, WeightKind::all_zero_bits, WeightKind::random_bytes,
                                   WeightKind::extreme_scales};
const char* weight_kind_name(WeightKind k) {
    switch (k) {
        case WeightKind::gaussian: return "gaussian";
        case WeightKind::all_ones_bits: return "all-0xFF";
        case WeightKind::all_zero_bits: return "all-0x00";
        case WeightKind::random_bytes: return "random-bytes";
        case WeightKind::extreme_scales: return "extreme-scales";
    }
    return "?";
}

// One weight row of n elements, as stored bytes.
std::vector<uint8_t> make_weights(moe::TensorType t, int64_t n, WeightKind kind, std::mt19937& rng) {
    const int be = moe::tensor_type_block_elems(t), bb = moe::tensor_type_block_bytes(t);
    const int64_t nblocks = n / be;
    std::vector<uint8_t> w((size_t)(nblocks * bb));
    std::normal_distribution<float> gauss(0.f, 1.f);
    std::uniform_int_distribution<int> byte(0, 255);
    std::vector<float> f((size_t)n);
    if (is_float_type(t)) {
        // Float rows: Gaussian at several magnitudes (f16 range: ~6e-8 .. 65504), zeros, alternating extremes.
        for (int64_t i = 0; i < n; ++i) {
            switch (kind) {
                case WeightKind::gaussian: f[(size_t)i] = gauss(rng); break;
                case WeightKind::all_ones_bits: f[(size_t)i] = (i % 2 ? -1.f : 1.f) * 60000.f; break;
                case WeightKind::all_zero_bits: f[(size_t)i] = 0.f; break;
                case WeightKind::random_bytes: f[(size_t)i] = gauss(rng) * 1e-5f; break;  // f16 subnormals
                case WeightKind::extreme_scales: f[(size_t)i] = gauss(rng) * (i % 3 ? 1e-3f : 1e3f); break;
            }
        }
        EXPECT_EQ(moe::quantize_row(t, f.data(), w.data(), n), moe::Status::ok);
        return w;
    }
    if (kind == WeightKind::gaussian) {
        for (auto& v : f) v = gauss(rng);
        EXPECT_EQ(moe::quantize_row(t, f.data(), w.data(), n), moe::Status::ok);
        return w;
    }
    // Raw blocks: any bit pattern is a valid block once its fp16 scales are finite.
    int d_off, dmin_off;
    scale_offsets(t, &d_off, &dmin_off);
    for (int64_t b = 0; b < nblocks; ++b) {
        uint8_t* blk = w.data() + b * bb;
        uint16_t d = float_to_half(1.f), dmin = float_to_half(0.5f);
        switch (kind) {
            case WeightKind::all_ones_bits: std::memset(blk, 0xFF, (size_t)bb); break;  // max nibbles, 6-bit scales 63, Q8_0 q = -1
            case WeightKind::all_zero_bits:
                std::memset(blk, 0x00, (size_t)bb);  // Q4_0 q - 8 = -8, Q6_K q - 32 = -32
                if (t == moe::TensorType::q6_k) std::memset(blk + 192, 0x80, 16);  // scales -128
                if (has_mins(t)) std::memset(blk + 4, 0xFF, 12);                  // scales and mins 63
                break;
            case WeightKind::random_bytes:
                for (int i = 0; i < bb; ++i) blk[i] = (uint8_t)byte(rng);
                d = float_to_half((byte(rng) & 1 ? -1.f : 1.f) * std::ldexp(1.f, byte(rng) % 20 - 14));
                dmin = float_to_half(std::ldexp(1.f, byte(rng) % 20 - 14));
                break;
            case WeightKind::extreme_scales:
                for (int i = 0; i < bb; ++i) blk[i] = (uint8_t)byte(rng);
                if (t == moe::TensorType::q8_0)
                    for (int i = 2; i < bb; ++i) blk[i] = 0x80;  // q = -128: the one value |q| = 128
                d = b % 2 ? float_to_half(65504.f) : (uint16_t)0x0001;  // largest normal, smallest subnormal
                dmin = b % 2 ? (uint16_t)0x0001 : float_to_half(65504.f);
                break;
            case WeightKind::gaussian: break;
        }
        std::memcpy(blk + d_off, &d, 2);
        if (dmin_off >= 0) std::memcpy(blk + dmin_off, &dmin, 2);
    }
    return w;
}

enum class ActKind { gaussian, zeros, spikes, saturating, huge };
const ActKind kActKinds[] = {ActKind::gaussian, ActKind::zeros, ActKind::spikes, ActKind::saturating, ActKind::huge};
const char* act_kind_name(ActKind k) {
    switch (k) {
        case ActKind::gaussian: return "gaussian";
        case ActKind::zeros: return "zeros";
        case ActKind::spikes: return "spikes";
        case ActKind::saturating: return "saturating";
        case ActKind::huge: return "huge";
    }
    return "?";
}

std::vector<float> make_activations(int64_t n, ActKind kind, std::mt19937& rng) {
    std::vector<float> x((size_t)n);
    std::normal_distribution<float> gauss(0.f, 1.f);
    for (int64_t i = 0; i < n; ++i) {
        switch (kind) {
            case ActKind::gaussian: x[(size_t)i] = gauss(rng); break;
            case ActKind::zeros: x[(size_t)i] = 0.f; break;
            case ActKind::spikes: x[(size_t)i] = i % 37 == 3 ? (i % 2 ? -1e4f : 1e4f) : gauss(rng) * 1e-3f; break;
            case ActKind::saturating: x[(size_t)i] = (i % 3 ? 2.5f : -2.5f); break;  // every quant is +-127
            case ActKind::huge: x[(size_t)i] = gauss(rng) * 1e6f; break;
        }
    }
    return x;
}

// M = Σ |w_i|·|x_i| over what the kernel multiplies: dequantized weights (plus |dmin·m| for
// K-quants with mins) and the activations as quantized (|x| plus one quantization step per block).
double magnitude(moe::TensorType t, const uint8_t* w, const std::vector<float>& x, int64_t n) {
    std::vector<float> wf((size_t)n);
    EXPECT_EQ(moe::dequantize_row(t, w, wf.data(), n), moe::Status::ok);
    std::vector<double> wabs((size_t)n);
    for (int64_t i = 0; i < n; ++i) wabs[(size_t)i] = std::fabs((double)wf[(size_t)i]);
    if (has_mins(t)) {
        const int bb = moe::tensor_type_block_bytes(t), be = moe::tensor_type_block_elems(t);
        for (int64_t b = 0; b < n / be; ++b) {
            float mins[256];
            k_quant_mins(t, w + b * bb, mins);
            for (int i = 0; i < be; ++i) wabs[(size_t)(b * be + i)] += std::fabs((double)mins[i]);
        }
    }
    const int ab = act_block(t);
    double m = 0;
    for (int64_t b = 0; b < n / ab; ++b) {
        double amax = 0;
        for (int i = 0; i < ab; ++i) amax = std::max(amax, std::fabs((double)x[(size_t)(b * ab + i)]));
        const double step = ab == 1 ? 0.0 : amax / 127.0 * 1.01;  // 1.01: the fp16-rounded Q8_0 scale
        for (int i = 0; i < ab; ++i) m += wabs[(size_t)(b * ab + i)] * (std::fabs((double)x[(size_t)(b * ab + i)]) + step);
    }
    return m;
}

// Float terms the scalar kernel adds for a row of n elements (see the top comment).
int64_t float_terms(moe::TensorType t, int64_t n) {
    if (is_float_type(t)) return n;
    return is_k_quant(t) ? 2 * (n / 256) : has_mins(t) ? 2 * (n / 32) : n / 32;
}

// Row lengths: for quantized types in units of the activation block (1 block, odd counts, long
// rows); for float types in elements, covering every tail of 8- and 32-wide loops.
std::vector<int64_t> row_lengths(moe::TensorType t) {
    if (is_float_type(t)) return {1, 3, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 100, 255, 256, 1000, 4096};
    std::vector<int64_t> out;
    const int64_t unit = act_block(t);
    for (int64_t blocks : {1, 2, 3, 4, 5, 7, 8, 9, 17, 64}) out.push_back(blocks * unit);
    if (!is_k_quant(t)) out.push_back(128 * unit);  // a 4096-wide Q8_0/Q4_0 row
    return out;
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
        for (WeightKind wk : kWeightKinds) {
            const std::vector<uint8_t> w = make_weights(t, n, wk, rng);
            std::vector<uint8_t> storage(w.size() + 64 + misalign);
            uint8_t* base = storage.data() + (64 - (uintptr_t)storage.data() % 64) % 64 + misalign;
            std::memcpy(base, w.data(), w.size());
            for (ActKind ak : kActKinds) {
                const std::vector<float> x = make_activations(n, ak, rng);
                float ref = 0, simd = 0;
                ASSERT_EQ(moe::vec_dot(t, moe::Isa::scalar, base, x.data(), n, &ref), moe::Status::ok);
                ASSERT_EQ(moe::vec_dot(t, isa, base, x.data(), n, &simd), moe::Status::ok);
                const double m = magnitude(t, base, x, n);
                const int64_t terms = float_terms(t, n);
                const double tol = (2.0 * (double)terms + kPerTermSlack) * kUnitRoundoff * m;
                ASSERT_TRUE(std::isfinite(ref)) << "n=" << n << " weights=" << weight_kind_name(wk) << " x=" << act_kind_name(ak);
                EXPECT_LE(std::fabs((double)simd - (double)ref), tol)
                    << moe::tensor_type_name(t) << " " << moe::isa_name(isa) << " n=" << n << " weights=" << weight_kind_name(wk)
                    << " x=" << act_kind_name(ak) << ": scalar " << ref << " simd " << simd << " M " << m;
                if (is_float_type(t)) {  // long float rows: also against an exact (double) sum
                    std::vector<float> wf((size_t)n);
                    ASSERT_EQ(moe::dequantize_row(t, base, wf.data(), n), moe::Status::ok);
                    double exact = 0;
                    for (int64_t i = 0; i < n; ++i) exact += (double)wf[(size_t)i] * (double)x[(size_t)i];
                    const double tol_exact = ((double)terms / 8 + kPerTermSlack) * kUnitRoundoff * m;
                    EXPECT_LE(std::fabs((double)simd - exact), tol_exact)
                        << moe::tensor_type_name(t) << " " << moe::isa_name(isa) << " n=" << n << " weights=" << weight_kind_name(wk)
                        << " x=" << act_kind_name(ak) << ": exact " << exact << " simd " << simd;
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
    const int64_t n = 32 * 9;
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
        EXPECT_EQ((double)ref, exact) << moe::tensor_type_name(t);
        for (moe::Isa isa : kSimdIsas) {
            if (!isa_available(isa)) continue;
            float simd = 0;
            ASSERT_EQ(moe::vec_dot(t, isa, w.data(), x.data(), n, &simd), moe::Status::ok);
            EXPECT_EQ(simd, ref) << moe::tensor_type_name(t) << " " << moe::isa_name(isa);
        }
    }
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
