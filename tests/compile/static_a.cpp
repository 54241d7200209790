// Two translation units that each hold the implementation under MOE_INFER_STATIC (static_a.cpp,
// static_b.cpp), linked into one program: the promise of MOE_INFER_STATIC is that this links,
// and that each copy works. Both decode the demo model greedily; the tokens must agree.
#define MOE_INFER_STATIC
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <vector>

std::vector<int32_t> greedy_tokens_a(const char* model_path, int n) {
    moe::Model model;
    if (moe::Model::load(model_path, moe::LoadOptions{}, &model) != moe::Status::ok) return {};
    moe::Session session;
    moe::SessionOptions options;
    options.n_threads = 2;
    if (moe::Session::create(model, options, &session) != moe::Status::ok) return {};
    std::vector<int32_t> prompt;
    if (model.tokenizer().encode("In the beginning", true, false, &prompt) != moe::Status::ok) return {};
    moe::GenerateOptions g;
    g.max_tokens = n;
    g.sampler.temperature = 0;
    g.stop_at_end_of_generation = false;
    moe::GenerateResult result;
    if (moe::generate(session, prompt, g, nullptr, nullptr, &result) != moe::Status::ok) return {};
    return result.tokens;
}
