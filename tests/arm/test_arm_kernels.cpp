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
#include "../kernel_cases.h"

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

using namespace kernel_cases;

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
                    if (w.empty()) {
                        check(false, fmt("quantize_row %s failed: %s", moe::tensor_type_name(t), moe::last_error()));
                        continue;
                    }
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
                        if (!o.ok) check(false, "dequantize_row or quantize_activations failed");
                        const int64_t terms = float_terms(t, n);
                        const double tol = (2.0 * (double)terms + kPerTermSlack) * kUnitRoundoff * o.magnitude;
                        const bool ok = std::isfinite(ref) && std::fabs((double)got - (double)ref) <= tol &&
                                        std::fabs((double)got - o.exact) <= tol + o.exact_slack && std::fabs((double)ref - o.exact) <= tol + o.exact_slack;
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
