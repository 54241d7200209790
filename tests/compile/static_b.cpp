// See static_a.cpp. This one decodes with Session::eval and its own greedy argmax.
#define MOE_INFER_STATIC
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <cstdio>
#include <vector>

std::vector<int32_t> greedy_tokens_a(const char* model_path, int n);

static std::vector<int32_t> greedy_tokens_b(const char* model_path, int n) {
    moe::Model model;
    if (moe::Model::load(model_path, moe::LoadOptions{}, &model) != moe::Status::ok) return {};
    moe::Session session;
    moe::SessionOptions options;
    options.n_threads = 2;
    if (moe::Session::create(model, options, &session) != moe::Status::ok) return {};
    std::vector<int32_t> tokens, out;
    if (model.tokenizer().encode("In the beginning", true, false, &tokens) != moe::Status::ok) return {};
    if (session.eval(tokens.data(), tokens.size()) != moe::Status::ok) return {};
    const int32_t n_vocab = model.info().n_vocab;
    for (int i = 0; i < n; ++i) {
        const float* logits = session.logits();
        int32_t best = 0;
        for (int32_t t = 1; t < n_vocab; ++t)
            if (logits[t] > logits[best]) best = t;
        out.push_back(best);
        if (i + 1 < n && session.eval(&best, 1) != moe::Status::ok) return {};
    }
    return out;
}

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s MODEL.gguf\n", argv[0]);
        return 2;
    }
    const int n = 24;
    std::vector<int32_t> a = greedy_tokens_a(argv[1], n), b = greedy_tokens_b(argv[1], n);
    if ((int)a.size() != n || a != b) {
        std::fprintf(stderr, "FAIL: the two translation units disagree (%zu and %zu tokens): %s\n", a.size(), b.size(),
                     moe::last_error());
        return 1;
    }
    std::printf("ok: both translation units decode the same %d tokens\n", n);
    return 0;
}
