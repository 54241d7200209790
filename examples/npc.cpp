// npc: a game-style loop in which several characters talk at once without stalling the frame.
//
// The frame thread never touches the model: each frame it grants the inference thread a budget of
// tokens, collects the text that has arrived (a short lock around a string swap) and "draws" the
// speech bubbles. The inference thread owns every character's Session and Sampler and decodes the
// characters that are talking together with Session::eval_batch (one pass reads each expert once
// for all of them), never spending more tokens than it was granted. Prompt tokens count too.
//
//   npc [-m FILE] [--frames N] [--fps F] [--budget T] [-t THREADS] [--seed S] [--until-lines L] [--quiet]
//
// Build: part of the CMake build (target npc), or `g++ -O2 -std=c++17 -pthread -I. examples/npc.cpp`.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#ifndef MOE_DEFAULT_MODEL
#define MOE_DEFAULT_MODEL "models/demo-qwen3moe.gguf"
#endif

namespace {

struct Character {
    const char* name;
    const char* opening;  // what the character starts from, each time it is spoken to
    int start_frame;      // first time the player speaks to it
};

const Character kCast[] = {
    {"Guard", "And the keeper of the gate said unto them,", 0},
    {"Merchant", "Then the merchant opened his treasures, and said,", 10},
    {"Bard", "And the singer lifted up his voice and sang,", 25},
};
constexpr int kCastSize = (int)(sizeof kCast / sizeof kCast[0]);
constexpr int kMaxLineTokens = 40;  // a speech bubble ends at a newline or after this many tokens
constexpr int kPauseFrames = 30;    // frames a character stays quiet before it is spoken to again

// What the inference thread keeps per character.
struct Voice {
    moe::Session session;
    moe::Sampler sampler;
    moe::Detokenizer detok;
    std::vector<int32_t> pending_prompt;  // tokens still to evaluate before sampling
    int32_t next = -1;                    // sampled, not yet evaluated
    int line_tokens = 0;
    Voice(const moe::Tokenizer& tok, const moe::SamplerOptions& so) : sampler(so), detok(tok) {}
};

// Shared between the two threads (all under `mu`, held only for swaps and counters).
struct Shared {
    std::mutex mu;
    std::condition_variable wake;
    int budget = 0;                       // tokens the inference thread may still spend
    bool quit = false;
    std::string inbox[kCastSize];         // text produced since the frame thread last looked
    bool line_done[kCastSize] = {};       // the character finished its line
    bool speak[kCastSize] = {};           // the frame thread asks the character to start a line
    long long tokens_spent = 0;
};

bool parse_int(const char* s, long long lo, long long hi, long long* out) {
    if (!s || !*s) return false;
    char* end = nullptr;
    const long long v = std::strtoll(s, &end, 10);
    if (*end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

// The inference thread: waits for budget, starts the lines that were asked for, then decodes one
// token for up to `budget` talking characters per pass.
void inference_loop(const moe::Model& model, std::vector<Voice>& voices, Shared& sh) {
    const moe::Tokenizer& tok = model.tokenizer();
    const int32_t n_vocab = model.info().n_vocab;
    std::vector<moe::Session*> batch;
    std::vector<int32_t> batch_tokens;
    std::vector<int> batch_who;
    int rr = 0;  // round-robin start, so a small budget is shared fairly
    for (;;) {
        int budget;
        {
            std::unique_lock<std::mutex> lock(sh.mu);
            sh.wake.wait(lock, [&] {
                if (sh.quit) return true;
                if (sh.budget <= 0) return false;
                for (int i = 0; i < kCastSize; ++i)
                    if (sh.speak[i] || voices[(size_t)i].next >= 0 || !voices[(size_t)i].pending_prompt.empty()) return true;
                return false;
            });
            if (sh.quit) return;
            budget = sh.budget;
            for (int i = 0; i < kCastSize; ++i)
                if (sh.speak[i]) {
                    sh.speak[i] = false;
                    Voice& v = voices[(size_t)i];
                    tok.encode(kCast[i].opening, v.session.position() == 0, false, &v.pending_prompt);
                    v.line_tokens = 0;
                }
        }
        int spent = 0;
        // Prompts first (a chunk of at most the budget), then one decode pass.
        for (int i = 0; i < kCastSize && spent < budget; ++i) {
            Voice& v = voices[(size_t)i];
            if (v.pending_prompt.empty()) continue;
            const size_t n = std::min(v.pending_prompt.size(), (size_t)(budget - spent));
            if (v.session.position() + (int32_t)n + kMaxLineTokens + 1 > v.session.n_ctx()) v.session.reset();  // a long game: forget old lines
            if (v.session.eval(v.pending_prompt.data(), n) != moe::Status::ok) { std::fprintf(stderr, "error: %s\n", moe::last_error()); return; }
            for (size_t k = 0; k < n; ++k) v.sampler.accept(v.pending_prompt[k]);
            v.pending_prompt.erase(v.pending_prompt.begin(), v.pending_prompt.begin() + (std::ptrdiff_t)n);
            spent += (int)n;
            if (v.pending_prompt.empty()) {  // ready to talk: the first token of the line
                v.next = v.sampler.sample(v.session.logits(), n_vocab);
                v.sampler.accept(v.next);
            }
        }
        batch.clear(); batch_tokens.clear(); batch_who.clear();
        for (int k = 0; k < kCastSize && spent + (int)batch.size() < budget; ++k) {
            const int i = (rr + k) % kCastSize;
            Voice& v = voices[(size_t)i];
            if (v.next < 0) continue;
            batch.push_back(&v.session);
            batch_tokens.push_back(v.next);
            batch_who.push_back(i);
        }
        rr = (rr + 1) % kCastSize;
        std::string text[kCastSize];
        bool done[kCastSize] = {};
        if (!batch.empty()) {
            for (size_t b = 0; b < batch.size(); ++b) {  // show the token, then decode them all at once
                Voice& v = voices[(size_t)batch_who[b]];
                v.detok.push(batch_tokens[b], &text[batch_who[b]]);
                ++v.line_tokens;
            }
            if (moe::Session::eval_batch(batch.data(), batch_tokens.data(), batch.size()) != moe::Status::ok) {
                std::fprintf(stderr, "error: %s\n", moe::last_error());
                return;
            }
            spent += (int)batch.size();
            for (size_t b = 0; b < batch.size(); ++b) {
                const int i = batch_who[b];
                Voice& v = voices[(size_t)i];
                const bool newline = text[i].find('\n') != std::string::npos;
                if (newline || v.line_tokens >= kMaxLineTokens || tok.is_end_of_generation(batch_tokens[b])) {
                    v.detok.flush(&text[i]);
                    v.next = -1;
                    done[i] = true;
                } else {
                    v.next = v.sampler.sample(v.session.logits(), n_vocab);
                    v.sampler.accept(v.next);
                }
            }
        }
        std::lock_guard<std::mutex> lock(sh.mu);
        sh.budget -= spent;
        sh.tokens_spent += spent;
        for (int i = 0; i < kCastSize; ++i) {
            sh.inbox[i] += text[i];
            sh.line_done[i] = sh.line_done[i] || done[i];
        }
    }
}

}  // namespace

int main(int argc, char** argv) {
    std::string path = MOE_DEFAULT_MODEL;
    long long frames = 240, fps = 60, budget = 2, threads = 0, seed = 1, until_lines = 0;
    bool quiet = false;
    for (int i = 1; i < argc; ++i) {
        const std::string k = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : nullptr;
        if (k == "--quiet") { quiet = true; continue; }
        if (k == "-h" || k == "--help") {
            std::puts("usage: npc [-m FILE] [--frames N] [--fps F] [--budget T] [-t THREADS] [--seed S] [--until-lines L] [--quiet]\n"
                      "  a frame loop at F frames/s (default 60) for N frames (default 240) in which three characters\n"
                      "  talk; the model may decode at most T tokens per frame (default 2), on its own thread;\n"
                      "  --until-lines L: stop early once every character has said L lines");
            return 0;
        }
        if (!v) { std::fprintf(stderr, "error: %s needs a value (see --help)\n", k.c_str()); return 1; }
        bool ok = true;
        if (k == "-m") path = v;
        else if (k == "--frames") ok = parse_int(v, 1, 1000000, &frames);
        else if (k == "--fps") ok = parse_int(v, 1, 10000, &fps);
        else if (k == "--budget") ok = parse_int(v, 1, 4096, &budget);
        else if (k == "-t") ok = parse_int(v, 1, 512, &threads);
        else if (k == "--seed") ok = parse_int(v, 0, (long long)1e18, &seed);
        else if (k == "--until-lines") ok = parse_int(v, 1, 1000000, &until_lines);
        else { std::fprintf(stderr, "error: unknown option %s (see --help)\n", k.c_str()); return 1; }
        if (!ok) { std::fprintf(stderr, "error: bad value '%s' for %s\n", v, k.c_str()); return 1; }
        ++i;
    }
    moe::Model model;
    if (moe::Model::load(path.c_str(), moe::LoadOptions{}, &model) != moe::Status::ok) {
        std::fprintf(stderr, "error: %s\n", moe::last_error());
        return 1;
    }
    moe::SessionOptions so;
    so.n_ctx = 512;
    so.n_threads = (int32_t)threads;
    so.n_batch = (int32_t)std::max<long long>(budget, 1);
    std::vector<Voice> voices;
    voices.reserve(kCastSize);
    for (int i = 0; i < kCastSize; ++i) {
        moe::SamplerOptions sampler;
        sampler.seed = (uint64_t)seed + (uint64_t)i;
        sampler.temperature = 0.8f;
        voices.emplace_back(model.tokenizer(), sampler);
        // eval_batch runs on the first session's threads; the others only evaluate their short
        // openings, on the calling thread: idle pools spinning beside a busy one would slow it.
        moe::SessionOptions mine = so;
        if (i > 0) mine.n_threads = 1;
        if (moe::Session::create(model, mine, &voices.back().session) != moe::Status::ok) {
            std::fprintf(stderr, "error: %s\n", moe::last_error());
            return 1;
        }
    }

    Shared sh;
    std::thread worker(inference_loop, std::cref(model), std::ref(voices), std::ref(sh));
    std::string bubble[kCastSize];
    int quiet_until[kCastSize], lines[kCastSize] = {};
    for (int i = 0; i < kCastSize; ++i) quiet_until[i] = kCast[i].start_frame;
    bool talking[kCastSize] = {};
    double worst_frame_work = 0;
    const auto frame_period = std::chrono::microseconds(1000000 / fps);
    auto next_frame = std::chrono::steady_clock::now();
    long long f = 0;
    for (; f < frames; ++f) {
        if (until_lines > 0 && *std::min_element(lines, lines + kCastSize) >= until_lines) break;
        const auto t0 = std::chrono::steady_clock::now();
        std::string arrived[kCastSize];
        bool finished[kCastSize] = {};
        {
            // The frame's only contact with the model thread: swap strings, set flags.
            std::lock_guard<std::mutex> lock(sh.mu);
            sh.budget = (int)std::min<long long>(sh.budget + budget, 4 * budget);  // unused budget does not pile up
            for (int i = 0; i < kCastSize; ++i) {
                arrived[i].swap(sh.inbox[i]);
                finished[i] = sh.line_done[i];
                sh.line_done[i] = false;
                if (!talking[i] && f >= quiet_until[i]) { sh.speak[i] = true; talking[i] = true; }
            }
        }
        sh.wake.notify_one();
        for (int i = 0; i < kCastSize; ++i) {  // "draw" the speech bubbles
            bubble[i] += arrived[i];
            if (finished[i]) {
                std::string line = bubble[i];
                while (!line.empty() && (line.back() == '\n' || line.back() == ' ')) line.pop_back();
                if (!quiet) std::printf("[frame %4lld] %-8s: %s\n", f, kCast[i].name, line.c_str());
                bubble[i].clear();
                ++lines[i];
                talking[i] = false;
                quiet_until[i] = (int)f + kPauseFrames;
            }
        }
        worst_frame_work = std::max(worst_frame_work, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
        next_frame += frame_period;
        std::this_thread::sleep_until(next_frame);
    }
    long long spent;
    {
        std::lock_guard<std::mutex> lock(sh.mu);
        sh.quit = true;
        spent = sh.tokens_spent;
    }
    sh.wake.notify_one();
    worker.join();
    std::printf("frames %lld, tokens %lld (budget %lld per frame: at most %lld), lines", f, spent, budget, f * budget);
    for (int i = 0; i < kCastSize; ++i) std::printf(" %s %d", kCast[i].name, lines[i]);
    std::printf(", slowest frame's own work %.3f ms\n", worst_frame_work * 1e3);
    return 0;
}
