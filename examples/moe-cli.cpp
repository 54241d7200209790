// moe-cli: generate text with a GGUF MoE model from the command line.
// Shows the whole public API: Model::load, Session, Tokenizer, Detokenizer, Sampler, plus
// --logits-out (row i = logits after input/generated token i), --perplexity and --chat.
// Usage: moe-cli [-m FILE] [-p TEXT | -f FILE | --tokens 1,2,3] [-n N] [-t N] [sampling flags]
#include "moe_infer.h"
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#ifndef MOE_DEFAULT_MODEL
#define MOE_DEFAULT_MODEL "models/demo-qwen3moe.gguf"
#endif

namespace {

const char* kUsage =
    "usage: moe-cli [options]\n"
    "  -m FILE             model (GGUF); default: the bundled demo model\n"
    "  -p TEXT             prompt text\n"
    "  -f FILE             read the prompt from FILE\n"
    "  --tokens 1,2,3      prompt as token ids (tokenizer bypassed)\n"
    "  -n N                tokens to generate (default 64; 0 = only evaluate the input)\n"
    "  -t N                threads (default: all cores, at most 16)\n"
    "  -c N                context size (default: min(training context, 4096); --perplexity: 256)\n"
    "  --temp X            temperature (default 0.8; 0 = greedy)\n"
    "  --top-k N           (default 40; 0 = off)\n"
    "  --top-p X           (default 0.95; 1 = off)\n"
    "  --min-p X           (default 0.05; 0 = off)\n"
    "  --repeat-penalty X  (default 1.0 = off)\n"
    "  --seed N            RNG seed (default 0)\n"
    "  --chat              interactive chat with the model's template\n"
    "  --logits-out FILE   write float32 logits, one row of n_vocab per evaluated position\n"
    "  --print-tokens      print generated token ids (comma-separated) instead of text\n"
    "  --perplexity FILE   perplexity of FILE in windows of -c tokens (first token of each unscored)\n";

int die(const char* fmt, const char* arg = "") {
    std::fprintf(stderr, "error: ");
    std::fprintf(stderr, fmt, arg);
    std::fprintf(stderr, "\n");
    return 1;
}

bool parse_int(const char* s, long long lo, long long hi, long long* out) {
    if (!s || !*s) return false;
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

bool parse_float(const char* s, float* out) {
    if (!s || !*s) return false;
    char* end = nullptr;
    float v = std::strtof(s, &end);
    if (*end || !std::isfinite(v)) return false;
    *out = v;
    return true;
}

bool read_file(const char* path, std::string* out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    std::ostringstream ss;
    ss << f.rdbuf();
    *out = ss.str();
    return true;
}

struct Args {
    std::string model = MOE_DEFAULT_MODEL, prompt, prompt_file, tokens, logits_out, perplexity_file;
    bool have_prompt = false, chat = false, print_tokens = false;
    long long n_predict = 64, n_threads = 0, n_ctx = 0;
    moe::SamplerOptions sampler;
};

// Renders one user turn with the chat template family the model's template belongs to.
bool render_turn(const std::string& tmpl, const std::string& user, bool first, std::string* out) {
    if (tmpl.find("<|im_start|>") != std::string::npos || tmpl.empty()) {
        *out = (first ? std::string() : std::string("\n")) + "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n";
        return true;
    }
    if (tmpl.find("[INST]") != std::string::npos) {
        *out = "[INST] " + user + " [/INST]";
        return true;
    }
    return false;
}

void print_speed(const char* what, int n, double seconds) {
    if (n > 0 && seconds > 0) std::fprintf(stderr, "%s: %d tokens in %.3f s = %.2f tok/s\n", what, n, seconds, n / seconds);
}

}  // namespace

int main(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        std::string k = argv[i];
        auto value = [&](const char** v) -> bool {
            if (i + 1 >= argc) return false;
            *v = argv[++i];
            return true;
        };
        const char* v = nullptr;
        long long iv;
        if (k == "-h" || k == "--help") { std::fputs(kUsage, stdout); return 0; }
        else if (k == "--chat") a.chat = true;
        else if (k == "--print-tokens") a.print_tokens = true;
        else if (!value(&v)) return die("missing value for %s (see --help)", k.c_str());
        else if (k == "-m") a.model = v;
        else if (k == "-p") { a.prompt = v; a.have_prompt = true; }
        else if (k == "-f") a.prompt_file = v;
        else if (k == "--tokens") a.tokens = v;
        else if (k == "--logits-out") a.logits_out = v;
        else if (k == "--perplexity") a.perplexity_file = v;
        else if (k == "-n") { if (!parse_int(v, 0, 1 << 24, &a.n_predict)) return die("-n needs an integer >= 0, got '%s'", v); }
        else if (k == "-t") { if (!parse_int(v, 1, 512, &a.n_threads)) return die("-t needs an integer in 1..512, got '%s'", v); }
        else if (k == "-c") { if (!parse_int(v, 1, 1 << 22, &a.n_ctx)) return die("-c needs a positive integer, got '%s'", v); }
        else if (k == "--temp") { if (!parse_float(v, &a.sampler.temperature)) return die("--temp needs a number, got '%s'", v); }
        else if (k == "--top-k") { if (!parse_int(v, 0, 1 << 30, &iv)) return die("--top-k needs an integer >= 0, got '%s'", v); a.sampler.top_k = (int)iv; }
        else if (k == "--top-p") { if (!parse_float(v, &a.sampler.top_p) || a.sampler.top_p <= 0 || a.sampler.top_p > 1) return die("--top-p needs a number in (0, 1], got '%s'", v); }
        else if (k == "--min-p") { if (!parse_float(v, &a.sampler.min_p) || a.sampler.min_p < 0 || a.sampler.min_p > 1) return die("--min-p needs a number in [0, 1], got '%s'", v); }
        else if (k == "--repeat-penalty") { if (!parse_float(v, &a.sampler.repeat_penalty) || a.sampler.repeat_penalty <= 0) return die("--repeat-penalty needs a positive number, got '%s'", v); }
        else if (k == "--seed") { if (!parse_int(v, 0, (long long)9e18, &iv)) return die("--seed needs an integer >= 0, got '%s'", v); a.sampler.seed = (uint64_t)iv; }
        else return die("unknown option %s (see --help)", k.c_str());
    }

    moe::Model model;
    if (moe::Model::load(a.model.c_str(), moe::LoadOptions{}, &model) != moe::Status::ok) return die("%s", moe::last_error());
    const moe::ModelInfo& info = model.info();
    const moe::Tokenizer& tok = model.tokenizer();

    moe::SessionOptions so;
    so.n_threads = (int32_t)a.n_threads;
    so.n_ctx = (int32_t)(a.n_ctx ? a.n_ctx : (a.perplexity_file.empty() ? 0 : 256));
    moe::Session session;
    if (moe::Session::create(model, so, &session) != moe::Status::ok) return die("%s", moe::last_error());

    // ---- perplexity ----
    if (!a.perplexity_file.empty()) {
        std::string text;
        if (!read_file(a.perplexity_file.c_str(), &text)) return die("cannot read '%s'", a.perplexity_file.c_str());
        if (!tok.valid()) return die("the model has no tokenizer");
        std::vector<int32_t> ids;
        if (tok.encode(text, false, false, &ids) != moe::Status::ok) return die("%s", moe::last_error());
        const int32_t window = session.n_ctx();
        const size_t n_windows = ids.size() / (size_t)window;
        if (n_windows == 0) return die("the text has fewer tokens than one window (-c)");
        std::vector<float> logits((size_t)window * (size_t)info.n_vocab);
        double nll = 0;
        long long count = 0;
        double t0 = moe::detail::now_seconds();
        for (size_t w = 0; w < n_windows; ++w) {
            session.reset();
            const int32_t* chunk = ids.data() + w * (size_t)window;
            if (session.eval(chunk, (size_t)window, logits.data()) != moe::Status::ok) return die("%s", moe::last_error());
            for (int32_t i = 0; i + 1 < window; ++i) {
                const float* row = logits.data() + (size_t)i * (size_t)info.n_vocab;
                double mx = row[0], sum = 0;
                for (int32_t j = 1; j < info.n_vocab; ++j) mx = std::max(mx, (double)row[j]);
                for (int32_t j = 0; j < info.n_vocab; ++j) sum += std::exp((double)row[j] - mx);
                nll += std::log(sum) + mx - row[chunk[i + 1]];
                ++count;
            }
            std::fprintf(stderr, "\rwindow %zu/%zu: ppl so far %.4f", w + 1, n_windows, std::exp(nll / (double)count));
        }
        std::fprintf(stderr, "\n");
        std::printf("perplexity: %.6g over %lld tokens (%zu windows of %d)\n", std::exp(nll / (double)count), count, n_windows, window);
        print_speed("prompt eval", (int)(n_windows * (size_t)window), moe::detail::now_seconds() - t0);
        return 0;
    }

    moe::Sampler sampler(a.sampler);

    // ---- interactive chat ----
    if (a.chat) {
        if (!tok.valid()) return die("the model has no tokenizer");
        std::string line;
        bool first = true;
        std::fprintf(stderr, "chat with %s; an empty line or EOF ends.\n", info.name.empty() ? info.architecture.c_str() : info.name.c_str());
        while (std::fprintf(stderr, "> "), std::getline(std::cin, line) && !line.empty()) {
            std::string turn;
            if (!render_turn(tok.chat_template(), line, first, &turn)) return die("unsupported chat template");
            std::vector<int32_t> ids;
            if (tok.encode(turn, first, true, &ids) != moe::Status::ok) return die("%s", moe::last_error());
            first = false;
            moe::GenerateOptions g;
            g.max_tokens = (int32_t)(a.n_predict ? a.n_predict : 256);
            g.sampler = a.sampler;
            g.sampler.seed = sampler.options().seed + (uint64_t)session.position();
            moe::GenerateResult r;
            moe::Status s = moe::generate(session, ids, g, [](void*, int32_t, const char* t, size_t n) {
                std::fwrite(t, 1, n, stdout);
                std::fflush(stdout);
                return true;
            }, nullptr, &r);
            std::printf("\n");
            if (s != moe::Status::ok) return die("%s", moe::last_error());
            // Put the end-of-turn token into the cache so the next turn continues the dialogue.
            if (r.stopped_by_eog && session.eval(&r.tokens.back(), 1) != moe::Status::ok) return die("%s", moe::last_error());
        }
        return 0;
    }

    // ---- prompt ----
    std::vector<int32_t> input;
    if (!a.tokens.empty()) {
        std::stringstream ss(a.tokens);
        std::string item;
        while (std::getline(ss, item, ',')) {
            long long id;
            if (!parse_int(item.c_str(), 0, info.n_vocab - 1, &id)) return die("--tokens: '%s' is not a token id of this model", item.c_str());
            input.push_back((int32_t)id);
        }
    } else {
        std::string text = a.prompt;
        if (!a.prompt_file.empty() && !read_file(a.prompt_file.c_str(), &text)) return die("cannot read '%s'", a.prompt_file.c_str());
        if (!a.have_prompt && a.prompt_file.empty()) text = "In the beginning";
        if (!tok.valid()) return die("the model has no tokenizer; use --tokens");
        if (tok.encode(text, true, false, &input) != moe::Status::ok) return die("%s", moe::last_error());
        if (!a.print_tokens) std::fwrite(text.data(), 1, text.size(), stdout);
    }
    if (input.empty()) return die("empty prompt");
    if ((long long)input.size() + a.n_predict > session.n_ctx()) return die("prompt + -n exceed the context size (use -c)");

    std::FILE* logits_file = nullptr;
    if (!a.logits_out.empty() && !(logits_file = std::fopen(a.logits_out.c_str(), "wb"))) return die("cannot create '%s'", a.logits_out.c_str());
    std::vector<float> rows(logits_file ? input.size() * (size_t)info.n_vocab : 0);

    double t0 = moe::detail::now_seconds();
    if (session.eval(input.data(), input.size(), logits_file ? rows.data() : nullptr) != moe::Status::ok) return die("%s", moe::last_error());
    double t1 = moe::detail::now_seconds();
    if (logits_file) std::fwrite(rows.data(), sizeof(float), rows.size(), logits_file);
    for (int32_t t : input) sampler.accept(t);

    moe::Detokenizer detok(tok);
    std::string text;
    std::vector<int32_t> generated;
    for (long long i = 0; i < a.n_predict; ++i) {
        int32_t next = sampler.sample(session.logits(), info.n_vocab);
        sampler.accept(next);
        generated.push_back(next);
        if (a.print_tokens) {
            std::printf(i ? ",%d" : "%d", next);
        } else if (tok.valid()) {
            text.clear();
            detok.push(next, &text);
            std::fwrite(text.data(), 1, text.size(), stdout);
            std::fflush(stdout);
        }
        bool last = i + 1 == a.n_predict;
        bool eog = tok.valid() && tok.is_end_of_generation(next) && a.tokens.empty();
        if ((last || eog) && !logits_file) break;  // its logits are not needed
        if (session.eval(&next, 1) != moe::Status::ok) return die("%s", moe::last_error());
        if (logits_file) std::fwrite(session.logits(), sizeof(float), (size_t)info.n_vocab, logits_file);
        if (eog) break;
    }
    double t2 = moe::detail::now_seconds();
    if (!a.print_tokens && tok.valid()) {
        text.clear();
        detok.flush(&text);
        std::fwrite(text.data(), 1, text.size(), stdout);
    }
    std::printf("\n");
    std::fflush(stdout);
    if (logits_file && std::fclose(logits_file) != 0) return die("write error on '%s'", a.logits_out.c_str());
    print_speed("prompt eval", (int)input.size(), t1 - t0);
    print_speed("decode", (int)generated.size(), t2 - t1);
    return 0;
}
