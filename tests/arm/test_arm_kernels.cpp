// Self-contained kernel test for AArch64 builds, where GoogleTest is not at hand (the cross
// toolchain has none): plain C++17 + moe_infer.h, run under qemu-aarch64 by tests/arm/run_qemu.sh.
// It also builds and runs on x86-64, where it checks scalar, avx2, avx512 and avx512_vnni as far
// as the CPU has them: the way to test the AVX-512 kernels on a machine without GoogleTest.
//
//   test_arm_kernels REPO_ROOT [--expect-isa scalar|neon|neon_dotprod] [--threads N]
//
// For every ISA of this CPU's family that it and the build have (scalar, neon, neon_dotprod; or
// scalar, avx2, avx512, avx512_vnni):
//   1. vec_dot of every tensor type against the scalar _ref kernel, on many row lengths (tails and
//      odd lengths for the float types), several seeds, Gaussian and adversarial weights and
//      activations; and against a double-precision dot of the same quantized inputs. Tolerances are
//      the rigorous round-off bounds of tests/test_kernels.cpp (see the comment there):
//      |simd - ref| <= (2T + 16)·u·M with T the scalar kernel's float terms and M = Σ|w|·|x|.
//   2. Both activation quantizers (Q8_0, Q8_K) bit-exact against the scalar ones.
//   3. The bundled demo model, kernels forced to that ISA, against transformers' logits of prompt 0
//      (tests/data/ref_logits_p0.f32) with test_demo_model.cpp's tolerances for quantized
//      activations: greedy decisions identical wherever the reference top-1/top-2 margin is at
//      least 0.25 (the whole reference sequence is fed, so rows do not depend on earlier choices)
//      and median top-20 logit error < 0.1; and float_activations mode within 2e-4 once.
// --expect-isa makes detected_isa() itself a checked result (qemu -cpu max vs cortex-a57).
// Prints what failed; the last line is "N passed, N failed"; exit status 1 on any failure.
#define MOE_INFER_IMPLEMENTATION
#include "../../moe_infer.h"

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace {

constexpr double kUnitRoundoff = 1.0 / (1 << 24);
constexpr int kPerTermSlack = 16;
constexpr double kNearTie = 0.25;         // test_demo_model.cpp
constexpr double kMedianTop20Tol = 0.1;   // test_demo_model.cpp
constexpr double kFloatLogitTol = 2e-4;   // test_demo_model.cpp
constexpr int kVocab = 4096;

int g_passed = 0, g_failed = 0;

void check(bool ok, const std::string& what) {
    if (ok) {
        ++g_passed;
    } else {
        ++g_failed;
        std::printf("FAIL: %s\n", what.c_str());
    }
}

std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string fmt(const char* f, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, f);
    std::vsnprintf(buf, sizeof buf, f, ap);
    va_end(ap);
    return buf;
}

const moe::TensorType kTypes[] = {moe::TensorType::f32, moe::TensorType::f16, moe::TensorType::bf16, moe::TensorType::q8_0,
                                  moe::TensorType::q4_0, moe::TensorType::q4_1, moe::TensorType::q5_0, moe::TensorType::q5_1,
                                  moe::TensorType::iq4_nl, moe::TensorType::iq4_xs, moe::TensorType::tq1_0, moe::TensorType::tq2_0, moe::TensorType::q2_k, moe::TensorType::q3_k, moe::TensorType::q4_k,
                                  moe::TensorType::q5_k, moe::TensorType::q6_k};

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
int act_block(moe::TensorType t) { return is_float_type(t) ? 1 : is_k_quant(t) ? 256 : 32; }

int g_threads = 2;  // --threads: session threads of the demo-model runs

bool is_arm(moe::Isa isa) { return isa == moe::Isa::neon || isa == moe::Isa::neon_dotprod; }

// The ISAs to test: scalar always, then those of this CPU's family up to the detected level (so the
// same program also checks the x86 kernels where gtest is not installed, e.g. the device host).
std::vector<moe::Isa> isas_to_test() {
    std::vector<moe::Isa> out = {moe::Isa::scalar};
    const moe::Isa best = moe::detected_isa();
    for (moe::Isa isa : {moe::Isa::avx2, moe::Isa::avx512, moe::Isa::avx512_vnni, moe::Isa::neon, moe::Isa::neon_dotprod})
        if (best != moe::Isa::scalar && is_arm(isa) == is_arm(best) && (int)isa <= (int)best) out.push_back(isa);
    return out;
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

//---- inputs ----

enum class WeightKind { gaussian, all_ones_bits, all_zero_bits, random_bytes, extreme_scales, count };
const char* kWeightKindNames[] = {"gaussian", "all-0xFF", "all-0x00", "random-bytes", "extreme-scales"};

// One weight row of n elements as stored bytes. Raw kinds write block bytes directly (any bit
// pattern is a valid block once its fp16 scales are finite) and then set the scales.
std::vector<uint8_t> make_weights(moe::TensorType t, int64_t n, WeightKind kind, std::mt19937& rng) {
    const int be = moe::tensor_type_block_elems(t), bb = moe::tensor_type_block_bytes(t);
    const int64_t nblocks = n / be;
    std::vector<uint8_t> w((size_t)(nblocks * bb));
    std::normal_distribution<float> gauss(0.f, 1.f);
    std::uniform_int_distribution<int> byte(0, 255);
    std::vector<float> f((size_t)n);
    if (is_float_type(t) || kind == WeightKind::gaussian) {
        for (int64_t i = 0; i < n; ++i) {
            float v = gauss(rng);
            if (is_float_type(t)) {
                switch (kind) {
                    case WeightKind::all_ones_bits: v = (i % 2 ? -1.f : 1.f) * 60000.f; break;
                    case WeightKind::all_zero_bits: v = 0.f; break;
                    case WeightKind::random_bytes: v *= 1e-5f; break;  // f16 subnormals
                    case WeightKind::extreme_scales: v *= i % 3 ? 1e-3f : 1e3f; break;
                    default: break;
                }
            }
            f[(size_t)i] = v;
        }
        if (moe::quantize_row(t, f.data(), w.data(), n) != moe::Status::ok) check(false, "quantize_row failed");
        return w;
    }
    // fp16 d (and dmin) offsets: Q6_K 208, Q3_K 108, Q2_K 80 (dmin 82), TQ2_0 64, TQ1_0 52, the others 0 (dmin 2).
    const int d_off = t == moe::TensorType::q6_k ? 208 : t == moe::TensorType::q3_k ? 108 : t == moe::TensorType::q2_k ? 80
                    : t == moe::TensorType::tq2_0 ? 64 : t == moe::TensorType::tq1_0 ? 52 : 0;
    const int dmin_off = !has_mins(t) || t == moe::TensorType::tq1_0 || t == moe::TensorType::tq2_0 ? -1 : t == moe::TensorType::q2_k ? 82 : 2;
    for (int64_t b = 0; b < nblocks; ++b) {
        uint8_t* blk = w.data() + b * bb;
        uint16_t d = float_to_half(1.f), dmin = float_to_half(0.5f);
        switch (kind) {
            case WeightKind::all_ones_bits: std::memset(blk, 0xFF, (size_t)bb); break;
            case WeightKind::all_zero_bits:
                std::memset(blk, 0x00, (size_t)bb);
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
                    for (int i = 2; i < bb; ++i) blk[i] = 0x80;  // q = -128, the one value with |q| = 128
                d = b % 2 ? float_to_half(65504.f) : (uint16_t)0x0001;
                dmin = b % 2 ? (uint16_t)0x0001 : float_to_half(65504.f);
                break;
            default: break;
        }
        std::memcpy(blk + d_off, &d, 2);
        if (dmin_off >= 0) std::memcpy(blk + dmin_off, &dmin, 2);
    }
    return w;
}

enum class ActKind { gaussian, zeros, spikes, saturating, huge, ties, sign_tie, count };
const char* kActKindNames[] = {"gaussian", "zeros", "spikes", "saturating", "huge", "ties", "sign-tie"};

std::vector<float> make_activations(int64_t n, ActKind kind, std::mt19937& rng) {
    std::vector<float> x((size_t)n);
    std::normal_distribution<float> gauss(0.f, 1.f);
    for (int64_t i = 0; i < n; ++i) {
        float v = gauss(rng);
        switch (kind) {
            case ActKind::gaussian: break;
            case ActKind::zeros: v = 0.f; break;
            case ActKind::spikes: v = i % 37 == 3 ? (i % 2 ? -1e4f : 1e4f) : v * 1e-3f; break;
            case ActKind::saturating: v = i % 3 ? 2.5f : -2.5f; break;
            case ActKind::huge: v *= 1e6f; break;
            // Every block holds 127 and values k + 0.5: with scale 127/amax = 1 each is an exact tie.
            case ActKind::ties: v = i % 32 == 5 ? 127.f : (float)((int)(v * 20) % 120) + 0.5f; break;
            // Largest |x| appears as -A first, then as +A (next element, and further on): Q8_K
            // must take the first one's sign.
            case ActKind::sign_tie: v = i % 64 == 9 ? -3.f : i % 64 == 10 || i % 64 == 40 ? 3.f : v * 0.25f; break;
            default: break;
        }
        x[(size_t)i] = v;
    }
    return x;
}

//---- oracles ----

bool has_offset(moe::TensorType t) { return t == moe::TensorType::q4_1 || t == moe::TensorType::q5_1; }

// Dequantizes what vec_dot multiplies the weights by: the activation row as the scalar quantizer
// makes it (layouts: Q8_0 = fp16 d + 32 int8; Q8_1 (Q4_1/Q5_1) = f32 s, fp16 d, 32 int8, 2 pad;
// Q8_K = f32 d + 256 int8 + 16 int16 bsums). `sums`: Q8_1's stored s per block.
std::vector<double> dequantized_activations(moe::TensorType t, const std::vector<float>& x, int64_t n,
                                            std::vector<double>* sums = nullptr) {
    std::vector<double> out((size_t)n);
    if (is_float_type(t)) {
        for (int64_t i = 0; i < n; ++i) out[(size_t)i] = x[(size_t)i];
        return out;
    }
    std::vector<uint8_t> q((size_t)n * 2 + 64);
    if (moe::quantize_activations(t, moe::Isa::scalar, x.data(), n, q.data(), q.size()) != moe::Status::ok) {
        check(false, "quantize_activations(scalar) failed");
        return out;
    }
    const int ab = act_block(t), bytes = ab == 32 ? (has_offset(t) ? 40 : 34) : 292;
    for (int64_t b = 0; b < n / ab; ++b) {
        const uint8_t* blk = q.data() + b * bytes;
        double d;
        if (ab == 32) {
            uint16_t h;
            std::memcpy(&h, blk + (has_offset(t) ? 4 : 0), 2);
            d = half_to_float(h);
            if (sums && has_offset(t)) {
                float f;
                std::memcpy(&f, blk, 4);
                sums->push_back(f);
            }
        } else {
            float f;
            std::memcpy(&f, blk, 4);
            d = f;
        }
        const int8_t* qs = reinterpret_cast<const int8_t*>(blk + (ab != 32 ? 4 : has_offset(t) ? 6 : 2));
        for (int i = 0; i < ab; ++i) out[(size_t)(b * ab + i)] = d * qs[i];
    }
    return out;
}

// The offset term of each element of one block: Q4_1/Q5_1's m (fp16 @2, 32 elements), or dmin * m
// for the 256 elements of a Q2_K/Q4_K/Q5_K block (mins packed as in QUANT FORMATS).
void k_quant_mins(moe::TensorType t, const uint8_t* blk, double* out) {
    uint16_t h;
    const bool ternary = t == moe::TensorType::tq1_0 || t == moe::TensorType::tq2_0;
    std::memcpy(&h, blk + (t == moe::TensorType::q2_k ? 82 : t == moe::TensorType::tq1_0 ? 52 : t == moe::TensorType::tq2_0 ? 64 : 2), 2);
    const double dmin = half_to_float(h);
    if (ternary) {  // d per element
        for (int i = 0; i < 256; ++i) out[i] = dmin;
        return;
    }
    if (t == moe::TensorType::q4_1 || t == moe::TensorType::q5_1) {
        for (int i = 0; i < 32; ++i) out[i] = dmin;
        return;
    }
    for (int i = 0; i < 256; ++i) {  // Q2_K: a 4-bit min per 16 (scales[i] >> 4); Q4_K/Q5_K: 6-bit per 32
        const uint8_t* s = blk + 4;
        const int j = i / 32;
        const int m = t == moe::TensorType::q2_k ? blk[i / 16] >> 4 : j < 4 ? (s[j + 4] & 63) : ((s[j + 4] >> 4) | ((s[j] >> 6) << 4));
        out[i] = dmin * m;
    }
}

struct Oracle {
    double exact = 0;      // Σ w·x in double over the dequantized weights and activations
    double magnitude = 0;  // M = Σ (|w| + |dmin·m|)·|x|
};

Oracle oracle(moe::TensorType t, const uint8_t* w, const std::vector<float>& x, int64_t n) {
    Oracle o;
    std::vector<float> wf((size_t)n);
    if (moe::dequantize_row(t, w, wf.data(), n) != moe::Status::ok) check(false, "dequantize_row failed");
    std::vector<double> sums;
    const std::vector<double> xd = dequantized_activations(t, x, n, &sums);
    for (int64_t i = 0; i < n; ++i) {
        double wabs = std::fabs((double)wf[(size_t)i]);
        if (has_mins(t)) {
            const int be = moe::tensor_type_block_elems(t);
            double mins[256];
            k_quant_mins(t, w + (i / be) * moe::tensor_type_block_bytes(t), mins);
            wabs += std::fabs(mins[i % be]);
        }
        o.exact += (double)wf[(size_t)i] * xd[(size_t)i];
        o.magnitude += wabs * std::fabs(xd[(size_t)i]);
    }
    if (has_offset(t)) {  // the kernels take m * s (s as stored) for m * Σ x: swap the terms
        const int bb = moe::tensor_type_block_bytes(t);
        for (int64_t b = 0; b < n / 32; ++b) {
            double m[256], sx = 0;
            k_quant_mins(t, w + b * bb, m);
            for (int i = 0; i < 32; ++i) sx += xd[(size_t)(b * 32 + i)];
            o.exact += m[0] * (sums[(size_t)b] - sx);
        }
    }
    return o;
}

int64_t float_terms(moe::TensorType t, int64_t n) {
    if (is_float_type(t)) return n;
    return is_k_quant(t) ? 2 * (n / 256) : has_mins(t) ? 2 * (n / 32) : n / 32;
}

std::vector<int64_t> row_lengths(moe::TensorType t) {
    if (is_float_type(t)) return {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 19, 31, 32, 33, 63, 64, 65, 100, 255, 256, 1000, 4096};
    std::vector<int64_t> out;
    for (int64_t blocks : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64}) out.push_back(blocks * act_block(t));
    if (!is_k_quant(t)) out.push_back(128 * act_block(t));
    return out;
}

//---- 1. vec_dot ----

void test_vec_dot(moe::Isa isa) {
    int cases = 0, failures = 0;
    for (moe::TensorType t : kTypes) {
        for (unsigned seed : {1u, 2u, 3u}) {
            std::mt19937 rng(seed * 7919u + 131u * (unsigned)t);
            // Weights 2 bytes past a 64-byte boundary (4 for f32): GGUF data is only 32-byte aligned
            // and block sizes are odd multiples of 2.
            const size_t misalign = t == moe::TensorType::f32 ? 4 : 2;
            for (int64_t n : row_lengths(t)) {
                for (int wk = 0; wk < (int)WeightKind::count; ++wk) {
                    const std::vector<uint8_t> w = make_weights(t, n, (WeightKind)wk, rng);
                    std::vector<uint8_t> storage(w.size() + 64 + misalign);
                    uint8_t* base = storage.data() + (64 - (uintptr_t)storage.data() % 64) % 64 + misalign;
                    std::memcpy(base, w.data(), w.size());
                    for (int ak = 0; ak < (int)ActKind::count; ++ak) {
                        const std::vector<float> x = make_activations(n, (ActKind)ak, rng);
                        float ref = 0, got = 0;
                        if (moe::vec_dot(t, moe::Isa::scalar, base, x.data(), n, &ref) != moe::Status::ok ||
                            moe::vec_dot(t, isa, base, x.data(), n, &got) != moe::Status::ok) {
                            check(false, fmt("vec_dot %s/%s n=%lld returned an error: %s", moe::tensor_type_name(t), moe::isa_name(isa), (long long)n, moe::last_error()));
                            continue;
                        }
                        const Oracle o = oracle(t, base, x, n);
                        const int64_t terms = float_terms(t, n);
                        const double tol = (2.0 * (double)terms + kPerTermSlack) * kUnitRoundoff * o.magnitude;
                        const bool ok = std::isfinite(ref) && std::fabs((double)got - (double)ref) <= tol &&
                                        std::fabs((double)got - o.exact) <= tol && std::fabs((double)ref - o.exact) <= tol;
                        ++cases;
                        if (!ok && ++failures <= 10)
                            std::printf("  %s/%s seed %u n=%lld weights=%s x=%s: ref %.9g got %.9g exact %.9g tol %.3g\n", moe::tensor_type_name(t),
                                        moe::isa_name(isa), seed, (long long)n, kWeightKindNames[wk], kActKindNames[ak], ref, got, o.exact, tol);
                    }
                }
            }
        }
    }
    check(failures == 0 && cases > 0, fmt("vec_dot %s: %d of %d cases outside the round-off bound", moe::isa_name(isa), failures, cases));
    std::printf("vec_dot         %-13s %d cases, %d failed\n", moe::isa_name(isa), cases, failures);
}

//---- 2. activation quantizers ----

void test_quantizers(moe::Isa isa) {
    int cases = 0, failures = 0;
    // Q4_0's activations are Q8_0, Q4_K's are Q8_K.
    for (moe::TensorType t : {moe::TensorType::q8_0, moe::TensorType::q4_k}) {
        for (unsigned seed : {11u, 12u, 13u}) {
            std::mt19937 rng(seed);
            for (int64_t blocks : {1, 2, 3, 5, 8, 9, 16}) {
                const int64_t n = blocks * act_block(t);
                for (int ak = 0; ak < (int)ActKind::count; ++ak) {
                    std::vector<float> x = make_activations(n, (ActKind)ak, rng);
                    if (ak == (int)ActKind::zeros)  // zero blocks next to non-zero ones
                        for (int64_t i = act_block(t); i < n; i += 3) x[(size_t)i] = (float)i * 0.25f;
                    std::vector<uint8_t> a((size_t)n * 2 + 64, 0xAB), b((size_t)n * 2 + 64, 0xCD);
                    const size_t used = (size_t)(n / act_block(t)) * (act_block(t) == 32 ? 34 : 292);
                    const bool ok = moe::quantize_activations(t, moe::Isa::scalar, x.data(), n, a.data(), a.size()) == moe::Status::ok &&
                                    moe::quantize_activations(t, isa, x.data(), n, b.data(), b.size()) == moe::Status::ok &&
                                    std::memcmp(a.data(), b.data(), used) == 0;
                    ++cases;
                    if (!ok && ++failures <= 10)
                        std::printf("  quantizer for %s/%s n=%lld x=%s differs from the scalar one\n", moe::tensor_type_name(t), moe::isa_name(isa), (long long)n,
                                    kActKindNames[ak]);
                }
            }
        }
    }
    check(failures == 0, fmt("activation quantizers %s: %d of %d rows not bit-exact", moe::isa_name(isa), failures, cases));
    std::printf("quantize_act    %-13s %d rows, %d not bit-exact\n", moe::isa_name(isa), cases, failures);
}

//---- 3. demo model ----

struct Reference {
    std::vector<int32_t> tokens;  // prompt 0's ids ++ its greedy continuation
    size_t n_prompt = 0;
    std::vector<float> logits;    // tokens.size() rows of kVocab
};

bool load_reference(const std::string& root, Reference* ref) {
    std::ifstream f(root + "/tests/data/ref_prompts.txt");
    std::string line;
    std::vector<int32_t> prompt, gen;
    while (std::getline(f, line)) {
        std::istringstream ss(line);
        std::string key;
        ss >> key;
        std::vector<int32_t>* dst = key == "prompt_ids" ? &prompt : key == "gen_ids" ? &gen : nullptr;
        if (key == "end") break;  // prompt 0 only
        int32_t id;
        if (dst)
            while (ss >> id) dst->push_back(id);
    }
    ref->n_prompt = prompt.size();
    ref->tokens = prompt;
    ref->tokens.insert(ref->tokens.end(), gen.begin(), gen.end());
    ref->logits.resize(ref->tokens.size() * kVocab);
    std::ifstream lf(root + "/tests/data/ref_logits_p0.f32", std::ios::binary);
    return !prompt.empty() && !gen.empty() && lf.read(reinterpret_cast<char*>(ref->logits.data()), (std::streamsize)(ref->logits.size() * 4));
}

bool run_model(const std::string& root, const Reference& ref, bool float_activations, std::vector<float>* logits) {
    moe::Model model;
    if (moe::Model::load((root + "/models/demo-qwen3moe.gguf").c_str(), moe::LoadOptions{}, &model) != moe::Status::ok) {
        check(false, fmt("loading the demo model: %s", moe::last_error()));
        return false;
    }
    moe::SessionOptions so;
    so.n_ctx = 128;
    so.n_threads = g_threads;
    so.float_activations = float_activations;
    moe::Session s;
    logits->assign(ref.tokens.size() * kVocab, 0.f);
    if (moe::Session::create(model, so, &s) != moe::Status::ok || s.eval(ref.tokens.data(), ref.tokens.size(), logits->data()) != moe::Status::ok) {
        check(false, fmt("running the demo model: %s", moe::last_error()));
        return false;
    }
    return true;
}

// Kernels are chosen when a Model is loaded, so the ISA is forced before loading.
void test_demo_model(const std::string& root, const Reference& ref, moe::Isa isa, bool also_float) {
    if (moe::force_isa(isa) != moe::Status::ok || moe::current_isa() != isa) {
        check(false, fmt("force_isa(%s)", moe::isa_name(isa)));
        return;
    }
    std::vector<float> ours;
    if (run_model(root, ref, false, &ours)) {
        // Greedy decisions (rows n_prompt-1 ..). The whole reference sequence is fed (teacher
        // forcing), so each row stands alone: every row whose reference top-1/top-2 margin is at
        // least kNearTie must pick the reference token; near-ties may legitimately go either way.
        int decisions = 0, near_ties = 0, differing = 0;
        for (size_t r = ref.n_prompt - 1; r + 1 < ref.tokens.size(); ++r) {
            const float* rr = ref.logits.data() + r * kVocab;
            std::vector<float> sorted(rr, rr + kVocab);
            std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
            if (sorted[0] - sorted[1] < kNearTie) { ++near_ties; continue; }
            const float* row = ours.data() + r * kVocab;
            const int32_t argmax = (int32_t)(std::max_element(row, row + kVocab) - row);
            if (argmax != ref.tokens[r + 1] && ++differing <= 5)
                std::printf("  %s: row %zu picks %d, transformers %d (margin %.3f)\n", moe::isa_name(isa), r, argmax, ref.tokens[r + 1], sorted[0] - sorted[1]);
            ++decisions;
        }
        check(differing == 0, fmt("demo model %s: %d of %d greedy decisions differ from transformers'", moe::isa_name(isa), differing, decisions));
        // Median |error| over the reference top-20 of every row.
        std::vector<double> errors;
        double worst = 0;
        for (size_t r = 0; r < ref.tokens.size(); ++r) {
            const float* rr = ref.logits.data() + r * kVocab;
            std::vector<int> ids(kVocab);
            for (int i = 0; i < kVocab; ++i) ids[(size_t)i] = i;
            std::partial_sort(ids.begin(), ids.begin() + 20, ids.end(), [&](int a, int b) { return rr[a] > rr[b]; });
            for (int k = 0; k < 20; ++k) {
                const double e = std::fabs((double)ours[r * kVocab + (size_t)ids[(size_t)k]] - rr[ids[(size_t)k]]);
                errors.push_back(e);
                worst = std::max(worst, e);
            }
        }
        std::sort(errors.begin(), errors.end());
        const double median = errors[errors.size() / 2];
        check(median < kMedianTop20Tol, fmt("demo model %s: median top-20 logit error %.4f >= %.2f", moe::isa_name(isa), median, kMedianTop20Tol));
        std::printf("demo model      %-13s %d/%d greedy decisions match (%d near-ties skipped), top-20 logit error median %.4f, max %.4f\n",
                    moe::isa_name(isa), decisions - differing, decisions, near_ties, median, worst);
    }
    if (also_float && run_model(root, ref, true, &ours)) {
        double worst = 0;
        for (size_t i = 0; i < ref.logits.size(); ++i) worst = std::max(worst, (double)std::fabs(ours[i] - ref.logits[i]));
        check(worst < kFloatLogitTol, fmt("demo model float_activations: max logit error %.3g >= %.0e", worst, kFloatLogitTol));
        std::printf("demo model      float_act     max logit error %.3g (all %zu rows)\n", worst, ref.tokens.size());
    }
}

//---- detection ----

void test_detection(const char* expect) {
    const moe::Isa best = moe::detected_isa();
    std::printf("detected ISA: %s\n", moe::isa_name(best));
    if (expect) check(std::strcmp(expect, moe::isa_name(best)) == 0, fmt("detected ISA %s, expected %s", moe::isa_name(best), expect));
    // force_isa refuses what the CPU/build lacks, and the other family.
    if (best == moe::Isa::neon) check(moe::force_isa(moe::Isa::neon_dotprod) == moe::Status::unsupported, "force_isa(neon_dotprod) accepted on a CPU without dotprod");
    if (is_arm(best)) check(moe::force_isa(moe::Isa::avx2) == moe::Status::unsupported, "force_isa(avx2) accepted on ARM");
    if (best == moe::Isa::scalar) check(moe::force_isa(moe::Isa::neon) == moe::Status::unsupported, "force_isa(neon) accepted without NEON");
    check(moe::force_isa(moe::Isa::scalar) == moe::Status::ok, "force_isa(scalar)");
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s REPO_ROOT [--expect-isa scalar|neon|neon_dotprod]\n", argv[0]);
        return 2;
    }
    const std::string root = argv[1];
    const char* expect = nullptr;
    for (int i = 2; i + 1 < argc; ++i)
        if (std::strcmp(argv[i], "--expect-isa") == 0) expect = argv[i + 1];
        else if (std::strcmp(argv[i], "--threads") == 0) g_threads = std::max(1, std::atoi(argv[i + 1]));

    test_detection(expect);
    const std::vector<moe::Isa> isas = isas_to_test();
    for (moe::Isa isa : isas) {
        test_vec_dot(isa);
        test_quantizers(isa);
    }
    Reference ref;
    if (!load_reference(root, &ref)) {
        check(false, "reading tests/data/ref_prompts.txt and ref_logits_p0.f32 under " + root);
    } else {
        // The SIMD ISAs; with none (MOE_NO_NEON, or not AArch64) the scalar kernels.
        bool first = true;
        for (moe::Isa isa : isas) {
            if (isa == moe::Isa::scalar && isas.size() > 1) continue;
            test_demo_model(root, ref, isa, first);
            first = false;
        }
    }
    moe::force_isa(moe::Isa::scalar);
    std::printf("%d passed, %d failed\n", g_passed, g_failed);
    return g_failed ? 1 : 0;
}
