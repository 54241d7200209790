// grammar_cost: what a GBNF grammar adds to each sampling step on a large vocabulary, one thread.
// The worst case is measured: every step's first draw is refused, so the whole vocabulary is
// checked against the grammar (Sampler's masked redraw); random logits, a JSON-schema grammar.
//
//   g++ -O2 -std=c++17 -pthread -I. bench/grammar_cost.cpp -o build/grammar_cost
//   build/grammar_cost ../shared/vocab/ggml-vocab-qwen2.gguf      (151,936 tokens)
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <chrono>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

int main(int argc, char** argv) {
    if (argc < 2) { std::fprintf(stderr, "usage: grammar_cost VOCAB.gguf\n"); return 1; }
    moe::GgufFile file;
    moe::Tokenizer tok;
    if (moe::GgufFile::open(argv[1], true, &file) != moe::Status::ok || moe::Tokenizer::load(file, &tok) != moe::Status::ok) {
        std::fprintf(stderr, "error: %s\n", moe::last_error());
        return 1;
    }
    std::string gbnf;
    const char* schema = R"({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                             "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "age", "tags"]})";
    if (moe::json_schema_to_grammar(schema, &gbnf) != moe::Status::ok) { std::fprintf(stderr, "error: %s\n", moe::last_error()); return 1; }
    const int32_t V = tok.n_vocab();
    std::mt19937 rng(1);
    std::normal_distribution<float> gauss(0.f, 3.f);
    std::vector<float> logits((size_t)V);
    for (float& v : logits) v = gauss(rng);
    for (const char* what : {"no grammar", "grammar, every step masked"}) {
        moe::SamplerOptions o;
        o.temperature = 0.8f;
        o.seed = 7;
        const bool constrained = what[0] == 'g';
        if (constrained) o.grammar = gbnf;
        moe::Sampler s(o);
        s.set_vocabulary(tok);
        const int steps = constrained ? 40 : 200;
        double masked_total = 0;
        int n = 0;
        std::string text;
        for (int i = 0; i < steps; ++i) {
            const auto t0 = std::chrono::steady_clock::now();
            std::vector<std::pair<int32_t, float>> d;
            if (constrained) s.distribution(logits.data(), V, &d);  // the masked scan on its own
            const auto t1 = std::chrono::steady_clock::now();
            const int32_t t = s.sample(logits.data(), V);
            s.accept(t);
            if (constrained) text += tok.token_to_piece(t);
            masked_total += std::chrono::duration<double>(t1 - t0).count();
            (void)t1;
            ++n;
            if (constrained && s.grammar_complete()) break;
        }
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < 20; ++i) s.sample(logits.data(), V);
        const double sample_ms = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 20 * 1e3;
        if (constrained)
            std::printf("%s: full-vocabulary mask %.2f ms per step (%d steps), sample() %.2f ms; text so far: %.60s\n", what,
                        masked_total / n * 1e3, n, sample_ms, text.c_str());
        else
            std::printf("%s: sample() %.2f ms per step (V = %d)\n", what, sample_ms, V);
    }
    return 0;
}
