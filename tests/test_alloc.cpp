// The decode loop must not allocate: one Session::eval of one token and Sampler::sample run with
// a counting global operator new/malloc hook armed, after a warm-up. Replacing the global
// operator new affects the whole test binary; it only counts while `g_counting` is set.
#include "moe_infer.h"
#include "random_model.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <new>

namespace {
std::atomic<bool> g_counting{false};
std::atomic<long> g_allocations{0};
}  // namespace

// GCC flags free() on memory from a replaced operator new, although both sides use malloc/free.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

void* operator new(std::size_t n) {
    if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
    if (void* p = std::malloc(n ? n : 1)) return p;
    throw std::bad_alloc();
}
void* operator new[](std::size_t n) { return operator new(n); }
void* operator new(std::size_t n, const std::nothrow_t&) noexcept {
    if (g_counting.load(std::memory_order_relaxed)) g_allocations.fetch_add(1);
    return std::malloc(n ? n : 1);
}
void* operator new[](std::size_t n, const std::nothrow_t& tag) noexcept { return operator new(n, tag); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

namespace {

// extended: a Q8_0 KV cache and every sampler step that keeps state or scratch (penalties, DRY,
// typical-p, top-n-sigma, XTC, logit bias) - or mirostat v2.
void check_no_allocation(const moe_test::ModelSpec& spec, int n_threads, int extended = 0) {
    moe_test::RandomModel rm = moe_test::make_random_model(spec);
    ASSERT_TRUE(rm.ok()) << rm.error;
    std::vector<uint8_t> bytes = rm.bytes();
    moe::Model model;
    ASSERT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &model), moe::Status::ok) << moe::last_error();
    moe::SessionOptions so;
    so.n_ctx = 64;
    so.n_threads = n_threads;
    if (extended) so.kv_type = moe::TensorType::q8_0;
    moe::Session session;
    ASSERT_EQ(moe::Session::create(model, so, &session), moe::Status::ok) << moe::last_error();
    moe::SamplerOptions sopt;
    sopt.temperature = 0.8f;
    sopt.repeat_penalty = 1.1f;
    if (extended == 1) {
        sopt.presence_penalty = 0.2f; sopt.frequency_penalty = 0.1f; sopt.dry_multiplier = 0.8f; sopt.typical_p = 0.9f;
        sopt.top_n_sigma = 2.f; sopt.xtc_probability = 0.5f; sopt.logit_bias = {{1, 0.5f}};
    } else if (extended == 2) {
        sopt.mirostat = 2;
    }
    moe::Sampler sampler(sopt);
    std::vector<int32_t> prompt = moe_test::random_tokens(8, spec.n_vocab, 3);
    ASSERT_EQ(session.eval(prompt.data(), prompt.size()), moe::Status::ok);
    int32_t token = sampler.sample(session.logits(), model.info().n_vocab);  // warm-up sizes the sampler
    g_allocations = 0;
    g_counting = true;
    for (int i = 0; i < 16; ++i) {
        if (session.eval(&token, 1) != moe::Status::ok) break;
        token = sampler.sample(session.logits(), model.info().n_vocab);
        sampler.accept(token);
    }
    g_counting = false;
    EXPECT_EQ(session.position(), 8 + 16);
    EXPECT_EQ(g_allocations.load(), 0) << "allocations in the decode loop (" << moe_test::describe(spec) << ", " << n_threads << " threads)";
}

TEST(DecodeLoop, DoesNotAllocate) {
    moe_test::ModelSpec qwen;
    qwen.arch = "qwen3moe";
    check_no_allocation(qwen, 1);
    check_no_allocation(qwen, 3);
    moe_test::ModelSpec shared;
    shared.arch = "qwen2moe";
    shared.wtype = moe::TensorType::q8_0;
    check_no_allocation(shared, 2);
    moe_test::ModelSpec dense;
    dense.arch = "llama";
    dense.dense = true;
    check_no_allocation(dense, 2);
    moe_test::ModelSpec wide;  // head_dim 32: a Q8_0 KV cache
    wide.n_embd = 128;
    check_no_allocation(wide, 2, 1);
    check_no_allocation(wide, 1, 2);
}

}  // namespace
