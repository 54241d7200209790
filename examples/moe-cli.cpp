// moe-cli: generate text with a GGUF MoE model from the command line.
// Shows the whole public API: Model::load, Session, Tokenizer, Detokenizer, Sampler, plus
// --logits-out (row i = logits after input/generated token i), --perplexity and --chat.
// Usage: moe-cli [-m FILE] [-p TEXT | -f FILE | --tokens 1,2,3] [-n N] [-t N] [sampling flags]
// Every check (options, files, sizes, memory) runs before the first byte goes to stdout: on an
// error stdout stays empty and stderr gets one "error: ..." line.
#include "moe_infer.h"
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

#ifndef MOE_DEFAULT_MODEL
#define MOE_DEFAULT_MODEL "models/demo-qwen3moe.gguf"
#endif

namespace {

const char* kUsage =
    "usage: moe-cli [options]\n"
    "  -m FILE             model (GGUF); default: the bundled demo model\n"
    "  -p TEXT             prompt text (-p, -f, --tokens: one of them at most)\n"
    "  -f FILE             read the prompt from FILE\n"
    "  --tokens 1,2,3      prompt as token ids (tokenizer bypassed)\n"
    "  -n N                tokens to generate (default 64; 0 = only evaluate the input);\n"
    "                      --chat: tokens per reply (0 = 256)\n"
    "  -t N                threads (default: all cores, at most 16)\n"
    "  -c N                context size in [1, 4194304] (default: min(training context, 4096);\n"
    "                      --perplexity: 256); past the training context: a warning and the KV-cache\n"
    "                      size; a KV cache larger than physical memory is refused\n"
    "  --kv-type T         KV-cache type: f32 (default) or q8_0 (3.8x smaller)\n"
    "  --temp X            temperature (default 0.8; 0 = greedy)\n"
    "  --top-k N           (default 40; 0 = off)\n"
    "  --top-p X           (default 0.95; 1 = off)\n"
    "  --min-p X           (default 0.05; 0 = off)\n"
    "  --repeat-penalty X  (default 1.0 = off)\n"
    "  --presence-penalty X   (default 0 = off) over the last --repeat-last-n tokens\n"
    "  --frequency-penalty X  (default 0 = off) times each token's count there\n"
    "  --repeat-last-n N   tokens the penalties look at (default 64)\n"
    "  --typical X         locally typical sampling (default 1 = off)\n"
    "  --top-nsigma X      keep logits >= max - X standard deviations (default 0 = off)\n"
    "  --xtc-probability X XTC: how often the top choices are excluded (default 0 = off)\n"
    "  --xtc-threshold X   XTC: probability that makes a top choice (default 0.1)\n"
    "  --dry-multiplier X  DRY repetition penalty (default 0 = off)\n"
    "  --dry-base X        DRY: penalty growth per repeated token (default 1.75)\n"
    "  --dry-allowed-length N  DRY: repeats up to N tokens are free (default 2)\n"
    "  --dry-penalty-last-n N  DRY: tokens searched for repeats (default 1024)\n"
    "  --mirostat N        2 = mirostat v2 instead of top-k/p etc. (default 0 = off)\n"
    "  --mirostat-ent X    mirostat target surprise tau in bits (default 5)\n"
    "  --mirostat-lr X     mirostat learning rate eta (default 0.1)\n"
    "  --logit-bias ID+X   add X to token ID's logit (ID-X subtracts; X may be inf); repeatable\n"
    "  --grammar GBNF      constrain the output to a GBNF grammar (llama.cpp's format, rule root)\n"
    "  --grammar-file FILE the same, read from FILE\n"
    "  --seed N            RNG seed (default 0)\n"
    "  --chat              interactive chat with the model's template; when the context is full,\n"
    "                      the oldest turns are dropped (the system prompt stays)\n"
    "  --system TEXT       system prompt for --chat\n"
    "  --chat-template FILE  a Jinja chat template instead of the model's (--chat, --render-chat)\n"
    "  --render-chat FILE  print the prompt the chat template renders for FILE: a JSON array of\n"
    "                      messages, or {\"messages\": [...], \"tools\": [...], \"add_generation_prompt\": true,\n"
    "                      \"enable_thinking\": false}\n"
    "  --logits-out FILE   write float32 logits, one row of n_vocab per evaluated position\n"
    "  --print-tokens      print generated token ids (comma-separated) instead of text\n"
    "  --perplexity FILE   perplexity of FILE in windows of -c tokens (first token of each unscored)\n"
    "  --expert-stats FILE write per-layer expert counts and routing-weight sums of the run\n"
    "                      (JSON when FILE ends in .json, else CSV)\n"
    "  --predict N         predict each layer's experts 1..N layers ahead (N in [1, 4]) and print\n"
    "                      the recall and precision of the predictions\n"
    "  --predict-extra M   predict M experts more than the model routes to (over-fetch)\n"
    "  --mem-budget SIZE   memory budget for the weights (e.g. 8G, 512M): experts are read into a\n"
    "                      bounded cache (with --predict, predicted experts are loaded ahead)\n"
    "  --io-threads N      expert reads in parallel with --mem-budget (default 4)\n"
    "  --expert-reads M    with --mem-budget, how experts are read: direct (default: O_DIRECT where the\n"
    "                      file system allows it), buffered (through the page cache) or mapped (used in\n"
    "                      place in the file mapping, loaded with madvise)\n"
    "  --buffered-io       the same as --expert-reads buffered\n"
    "  --huge-pages M      automatic (default: 2 MiB pages for the mapped weights, dropping the file's\n"
    "                      small cached pages once if most are small), map (advise only) or off\n";

constexpr long long kMaxContext = moe::kMaxContextLength;

#if defined(__MINGW32__)
__attribute__((format(gnu_printf, 1, 2)))  // MinGW's libstdc++ uses its C99 printf (%zu works)
#elif defined(__GNUC__)
__attribute__((format(printf, 1, 2)))
#endif
int die(const char* fmt, ...) {
    std::va_list ap;
    va_start(ap, fmt);
    std::fprintf(stderr, "error: ");
    std::vfprintf(stderr, fmt, ap);
    std::fprintf(stderr, "\n");
    va_end(ap);
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

// Reads a whole file; on failure *why says why. fopen() succeeds on a directory on POSIX, so that
// case is checked first.
bool read_file(const std::string& path, std::string* out, std::string* why) {
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR) { *why = "is a directory"; return false; }
    errno = 0;
    std::FILE* f = std::fopen(path.c_str(), "rb");
    if (!f) { *why = errno ? std::strerror(errno) : "cannot open"; return false; }
    char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out->append(buf, n);
    const bool bad = std::ferror(f) != 0;
    const int err = errno;
    std::fclose(f);
    if (bad) { *why = err ? std::strerror(err) : "read error"; return false; }
    return true;
}

// "1,2, 3": ids separated by commas (spaces around an id are allowed). Every item must be a number.
bool parse_token_list(const std::string& list, std::vector<long long>* out, std::string* why) {
    auto blank = [](char c) { return c == ' ' || c == '\t'; };
    if (std::all_of(list.begin(), list.end(), blank)) { *why = "--tokens needs a comma-separated list of token ids, got '" + list + "'"; return false; }
    size_t start = 0;
    for (int item = 1;; ++item) {
        size_t comma = list.find(',', start), end = comma == std::string::npos ? list.size() : comma;
        size_t b = start, e = end;
        while (b < e && blank(list[b])) ++b;
        while (e > b && blank(list[e - 1])) --e;
        const std::string s = list.substr(b, e - b);
        const std::string where = "item " + std::to_string(item) + " of '" + list + "'";
        if (s.empty()) { *why = "--tokens: " + where + " is empty"; return false; }
        long long v;
        if (!std::all_of(s.begin(), s.end(), [](char c) { return c >= '0' && c <= '9'; }) || !parse_int(s.c_str(), 0, 1LL << 40, &v)) {
            *why = "--tokens: '" + s + "' (" + where + ") is not a token id";
            return false;
        }
        out->push_back(v);
        if (comma == std::string::npos) return true;
        start = comma + 1;
    }
}

// "8G", "512M", "64K" (binary units) or plain bytes; > 0.
bool parse_size(const char* s, unsigned long long* out) {
    if (!s || !*s) return false;
    char* end = nullptr;
    errno = 0;
    const double v = std::strtod(s, &end);
    if (errno || end == s || !(v > 0)) return false;
    double scale = 1;
    if (*end == 'K' || *end == 'k') scale = 1024.0, ++end;
    else if (*end == 'M' || *end == 'm') scale = 1024.0 * 1024, ++end;
    else if (*end == 'G' || *end == 'g') scale = 1024.0 * 1024 * 1024, ++end;
    else if (*end == 'T' || *end == 't') scale = 1024.0 * 1024 * 1024 * 1024, ++end;
    if (*end == 'B' || *end == 'b') ++end;
    if (*end || v * scale > 1.8e19) return false;
    *out = (unsigned long long)(v * scale);
    return *out > 0;
}

std::string format_bytes(uint64_t n) {
    char buf[64];
    if (n >= (1ull << 30)) std::snprintf(buf, sizeof buf, "%.1f GiB", (double)n / (1ull << 30));
    else std::snprintf(buf, sizeof buf, "%.1f MiB", (double)n / (1ull << 20));
    return buf;
}

// Physical memory in bytes, 0 where unknown (then the KV-cache check is skipped).
uint64_t physical_memory() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
    long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    if (pages > 0 && page > 0) return (uint64_t)pages * (uint64_t)page;
#endif
    return 0;
}

struct Args {
    std::string model = MOE_DEFAULT_MODEL, prompt, prompt_file, tokens, logits_out, perplexity_file, system, expert_stats;
    std::string chat_template_file, render_chat_file, grammar_file;
    std::string prompt_flag;  // which of -p, -f, --tokens gave the prompt ("" = none: the default prompt)
    bool chat = false, print_tokens = false, have_system = false;
    long long n_predict = 64, n_threads = 0, n_ctx = 0, predict_depth = 0, predict_extra = 0, io_threads = 4;
    unsigned long long mem_budget = 0;
    std::string expert_reads;
    moe::HugePages huge_pages = moe::HugePages::automatic;
    moe::SamplerOptions sampler;
    moe::TensorType kv_type = moe::TensorType::f32;
};

// Options that take a value; recognised before the value is asked for.
bool takes_value(const std::string& k) {
    static const char* const kFlags[] = {"-m", "-p", "-f", "--tokens", "-n", "-t", "-c", "--temp", "--top-k", "--top-p",
                                         "--min-p", "--repeat-penalty", "--seed", "--system", "--logits-out", "--perplexity",
                                         "--expert-stats", "--predict", "--predict-extra", "--mem-budget", "--io-threads", "--expert-reads", "--huge-pages",
                                         "--presence-penalty", "--frequency-penalty", "--repeat-last-n", "--typical", "--top-nsigma",
                                         "--xtc-probability", "--xtc-threshold", "--dry-multiplier", "--dry-base", "--dry-allowed-length",
                                         "--dry-penalty-last-n", "--mirostat", "--mirostat-ent", "--mirostat-lr", "--logit-bias", "--kv-type",
                                         "--chat-template", "--render-chat", "--grammar", "--grammar-file"};
    for (const char* f : kFlags)
        if (k == f) return true;
    return false;
}

// How --chat renders turns: a model's template (or --chat-template) through the Jinja renderer, the
// whole conversation each turn; a model without one gets ChatML turn by turn.
enum class ChatFormat { jinja, chatml };

// A JSON array of {"role", "content"} objects.
std::string messages_json(const std::vector<std::pair<std::string, std::string>>& messages) {
    std::string out = "[";
    for (size_t i = 0; i < messages.size(); ++i) {
        out += i ? ", {\"role\": " : "{\"role\": ";
        moe::detail::json_escape_string(messages[i].first, false, &out);
        out += ", \"content\": ";
        moe::detail::json_escape_string(messages[i].second, false, &out);
        out += "}";
    }
    return out + "]";
}

std::string render_system(const std::string& system) { return "<|im_start|>system\n" + system + "<|im_end|>\n"; }
std::string render_user(const std::string& user) { return "<|im_start|>user\n" + user + "<|im_end|>\n<|im_start|>assistant\n"; }

void print_speed(const char* what, int n, double seconds) {
    if (n > 0 && seconds > 0) std::fprintf(stderr, "%s: %d tokens in %.3f s = %.2f tok/s\n", what, n, seconds, n / seconds);
}

}  // namespace

int main(int argc, char** argv) {
    Args a;
    for (int i = 1; i < argc; ++i) {
        const std::string k = argv[i];
        long long iv;
        if (k == "-h" || k == "--help") { std::fputs(kUsage, stdout); return 0; }
        if (k == "--chat") { a.chat = true; continue; }
        if (k == "--print-tokens") { a.print_tokens = true; continue; }
        if (k == "--buffered-io") { a.expert_reads = "buffered"; continue; }
        // The name first: "--bogus" last on the line is an unknown option, not a missing value.
        if (!takes_value(k))
            return die(k.size() > 1 && k[0] == '-' ? "unknown option %s (see --help)" : "unexpected argument '%s' (see --help)", k.c_str());
        if (i + 1 >= argc) return die("missing value for %s (see --help)", k.c_str());
        const char* v = argv[++i];
        if (k == "-m") a.model = v;
        else if (k == "-p" || k == "-f" || k == "--tokens") {
            if (!a.prompt_flag.empty() && a.prompt_flag != k) return die("%s and %s cannot be used together (one prompt source)", a.prompt_flag.c_str(), k.c_str());
            a.prompt_flag = k;
            (k == "-p" ? a.prompt : k == "-f" ? a.prompt_file : a.tokens) = v;
        }
        else if (k == "--system") { a.system = v; a.have_system = true; }
        else if (k == "--logits-out") a.logits_out = v;
        else if (k == "--perplexity") a.perplexity_file = v;
        else if (k == "--expert-stats") a.expert_stats = v;
        else if (k == "--mem-budget") { if (!parse_size(v, &a.mem_budget)) return die("--mem-budget needs a size like 8G, 512M or 100000000, got '%s'", v); }
        else if (k == "--expert-reads") a.expert_reads = v;
        else if (k == "--huge-pages") {
            if (std::strcmp(v, "automatic") == 0) a.huge_pages = moe::HugePages::automatic;
            else if (std::strcmp(v, "map") == 0) a.huge_pages = moe::HugePages::map;
            else if (std::strcmp(v, "off") == 0) a.huge_pages = moe::HugePages::off;
            else return die("--huge-pages needs automatic, map or off, got '%s'", v);
        }
        else if (k == "--chat-template") a.chat_template_file = v;
        else if (k == "--grammar") a.sampler.grammar = v;
        else if (k == "--grammar-file") a.grammar_file = v;
        else if (k == "--render-chat") a.render_chat_file = v;
        else if (k == "--kv-type") {
            if (std::strcmp(v, "f32") == 0) a.kv_type = moe::TensorType::f32;
            else if (std::strcmp(v, "q8_0") == 0) a.kv_type = moe::TensorType::q8_0;
            else return die("--kv-type needs f32 or q8_0, got '%s'", v);
        }
        else if (k == "--io-threads") { if (!parse_int(v, 0, 64, &a.io_threads)) return die("--io-threads needs an integer in [0, 64], got '%s'", v); }
        else if (k == "--predict") { if (!parse_int(v, 1, 4, &a.predict_depth)) return die("--predict needs an integer in [1, 4], got '%s'", v); }
        else if (k == "--predict-extra") { if (!parse_int(v, 0, 1024, &a.predict_extra)) return die("--predict-extra needs an integer in [0, 1024], got '%s'", v); }
        else if (k == "-n") { if (!parse_int(v, 0, 1 << 24, &a.n_predict)) return die("-n needs an integer in [0, %d], got '%s'", 1 << 24, v); }
        else if (k == "-t") { if (!parse_int(v, 1, 512, &a.n_threads)) return die("-t needs an integer in [1, 512], got '%s'", v); }
        else if (k == "-c") { if (!parse_int(v, 1, kMaxContext, &a.n_ctx)) return die("-c needs an integer in [1, %lld], got '%s'", kMaxContext, v); }
        else if (k == "--temp") { if (!parse_float(v, &a.sampler.temperature)) return die("--temp needs a number, got '%s'", v); }
        else if (k == "--top-k") { if (!parse_int(v, 0, 1 << 30, &iv)) return die("--top-k needs an integer >= 0, got '%s'", v); a.sampler.top_k = (int)iv; }
        else if (k == "--top-p") { if (!parse_float(v, &a.sampler.top_p) || a.sampler.top_p <= 0 || a.sampler.top_p > 1) return die("--top-p needs a number in (0, 1], got '%s'", v); }
        else if (k == "--min-p") { if (!parse_float(v, &a.sampler.min_p) || a.sampler.min_p < 0 || a.sampler.min_p > 1) return die("--min-p needs a number in [0, 1], got '%s'", v); }
        else if (k == "--repeat-penalty") { if (!parse_float(v, &a.sampler.repeat_penalty) || a.sampler.repeat_penalty <= 0) return die("--repeat-penalty needs a positive number, got '%s'", v); }
        else if (k == "--seed") { if (!parse_int(v, 0, (long long)9e18, &iv)) return die("--seed needs an integer >= 0, got '%s'", v); a.sampler.seed = (uint64_t)iv; }
        else if (k == "--presence-penalty") { if (!parse_float(v, &a.sampler.presence_penalty)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--frequency-penalty") { if (!parse_float(v, &a.sampler.frequency_penalty)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--typical") { if (!parse_float(v, &a.sampler.typical_p)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--top-nsigma") { if (!parse_float(v, &a.sampler.top_n_sigma)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--xtc-probability") { if (!parse_float(v, &a.sampler.xtc_probability)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--xtc-threshold") { if (!parse_float(v, &a.sampler.xtc_threshold)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--dry-multiplier") { if (!parse_float(v, &a.sampler.dry_multiplier)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--dry-base") { if (!parse_float(v, &a.sampler.dry_base)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--mirostat-ent") { if (!parse_float(v, &a.sampler.mirostat_tau)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--mirostat-lr") { if (!parse_float(v, &a.sampler.mirostat_eta)) return die("%s needs a number, got '%s'", k.c_str(), v); }
        else if (k == "--repeat-last-n") { if (!parse_int(v, 0, 1 << 20, &iv)) return die("%s needs an integer in [0, %d], got '%s'", k.c_str(), 1 << 20, v); a.sampler.repeat_last_n = (int)iv; }
        else if (k == "--dry-allowed-length") { if (!parse_int(v, 1, 1 << 20, &iv)) return die("%s needs an integer in [1, %d], got '%s'", k.c_str(), 1 << 20, v); a.sampler.dry_allowed_length = (int)iv; }
        else if (k == "--dry-penalty-last-n") { if (!parse_int(v, 0, 1 << 20, &iv)) return die("%s needs an integer in [0, %d], got '%s'", k.c_str(), 1 << 20, v); a.sampler.dry_last_n = (int)iv; }
        else if (k == "--mirostat") { if (!parse_int(v, 0, 2, &iv) || iv == 1) return die("--mirostat needs 0 (off) or 2 (v2), got '%s'", v); a.sampler.mirostat = (int)iv; }
        else if (k == "--logit-bias") {
            const std::string sv = v;
            const size_t sign = sv.find_first_of("+-", 1);
            float bias = 0;
            const std::string amount = sign == std::string::npos ? "" : sv.substr(sign + 1);
            if (sign == std::string::npos || !parse_int(sv.substr(0, sign).c_str(), 0, INT32_MAX, &iv) ||
                !(amount == "inf" || parse_float(amount.c_str(), &bias)))
                return die("--logit-bias needs TOKEN_ID+BIAS or TOKEN_ID-BIAS (e.g. 15043+1.5, 2-inf), got '%s'", v);
            if (amount == "inf") bias = INFINITY;
            a.sampler.logit_bias.push_back({(int32_t)iv, sv[sign] == '-' ? -bias : bias});
        }
    }
    if (!a.grammar_file.empty()) {
        std::string why;
        if (!a.sampler.grammar.empty()) return die("--grammar and --grammar-file cannot be used together");
        if (!read_file(a.grammar_file, &a.sampler.grammar, &why)) return die("cannot read '%s': %s", a.grammar_file.c_str(), why.c_str());
    }
    if (moe::check_sampler_options(a.sampler) != moe::Status::ok) return die("%s", moe::last_error());  // before the model loads
    // Modes ignore the options of the others: say so rather than silently dropping them.
    const char* mode = a.chat ? "--chat" : !a.perplexity_file.empty() ? "--perplexity" : !a.render_chat_file.empty() ? "--render-chat" : nullptr;
    if (a.chat && !a.perplexity_file.empty()) return die("--chat and --perplexity cannot be used together");
    if (!a.render_chat_file.empty() && (a.chat || !a.perplexity_file.empty())) return die("--render-chat and %s cannot be used together", a.chat ? "--chat" : "--perplexity");
    if (!a.chat_template_file.empty() && !a.chat && a.render_chat_file.empty()) return die("--chat-template needs --chat or --render-chat");
    if (mode && !a.prompt_flag.empty()) return die("%s and %s cannot be used together", a.prompt_flag.c_str(), mode);
    if (mode && !a.logits_out.empty()) return die("--logits-out and %s cannot be used together", mode);
    if (mode && a.print_tokens) return die("--print-tokens and %s cannot be used together", mode);
    if (a.have_system && !a.chat) return die("--system needs --chat");
    if (a.predict_extra && !a.predict_depth) return die("--predict-extra needs --predict");
    moe::ExpertReads expert_reads = moe::ExpertReads::direct;
    if (!a.expert_reads.empty()) {
        if (!a.mem_budget) return die("--expert-reads and --buffered-io need --mem-budget");
        if (a.expert_reads == "buffered") expert_reads = moe::ExpertReads::buffered;
        else if (a.expert_reads == "mapped") expert_reads = moe::ExpertReads::mapped;
        else if (a.expert_reads != "direct") return die("--expert-reads: '%s' is not direct, buffered or mapped", a.expert_reads.c_str());
    }

    // Input files are read before the model is loaded: a typo fails at once.
    std::string text, why;
    if (!a.perplexity_file.empty() && !read_file(a.perplexity_file, &text, &why)) return die("cannot read '%s': %s", a.perplexity_file.c_str(), why.c_str());
    if (!a.prompt_file.empty() && !read_file(a.prompt_file, &text, &why)) return die("cannot read '%s': %s", a.prompt_file.c_str(), why.c_str());
    if (!a.prompt_file.empty() && text.empty()) return die("empty prompt: '%s' is empty", a.prompt_file.c_str());
    std::string chat_template, render_request;
    if (!a.chat_template_file.empty() && !read_file(a.chat_template_file, &chat_template, &why))
        return die("cannot read '%s': %s", a.chat_template_file.c_str(), why.c_str());
    if (!a.render_chat_file.empty() && !read_file(a.render_chat_file, &render_request, &why))
        return die("cannot read '%s': %s", a.render_chat_file.c_str(), why.c_str());
    if (a.prompt_flag == "-p") text = a.prompt;
    if (a.prompt_flag.empty() && !mode) text = "In the beginning";
    std::vector<long long> token_list;
    if (a.prompt_flag == "--tokens" && !parse_token_list(a.tokens, &token_list, &why)) return die("%s", why.c_str());

    moe::Model model;
    moe::LoadOptions lo;
    lo.mem_budget = a.mem_budget;
    lo.io_threads = (int32_t)a.io_threads;
    lo.expert_reads = expert_reads;
    lo.huge_pages = a.huge_pages;
#if defined(__unix__) || defined(__APPLE__)
    if (isatty(2))  // on a terminal: how far loading (reading the weights in once) has come
        lo.progress = [](void*, uint64_t done, uint64_t total) {
            if (total >= (256u << 20)) std::fprintf(stderr, "\rloading: %3d%%%s", (int)(100 * done / total), done == total ? "\n" : "");
            return true;
        };
#endif
    if (moe::Model::load(a.model.c_str(), lo, &model) != moe::Status::ok) return die("%s", moe::last_error());
    const moe::ModelInfo& info = model.info();
    const moe::Tokenizer& tok = model.tokenizer();
    if (!tok.valid() && a.prompt_flag != "--tokens") return die(mode ? "the model has no tokenizer" : "the model has no tokenizer; use --tokens");
    if (chat_template.empty()) chat_template = tok.chat_template();
    moe::ChatTemplateOptions chat_options;
    if (tok.bos() >= 0) chat_options.bos_token = tok.token_text(tok.bos());
    if (tok.eos() >= 0) chat_options.eos_token = tok.token_text(tok.eos());

    // ---- --render-chat: the rendered prompt on stdout ----
    if (!a.render_chat_file.empty()) {
        if (chat_template.empty()) return die("the model has no chat template (tokenizer.chat_template); give one with --chat-template");
        moe::detail::TplValue request;
        std::string error, messages = render_request;
        if (!moe::detail::parse_json(render_request, &request, &error)) return die("%s: invalid JSON: %s", a.render_chat_file.c_str(), error.c_str());
        if (request.kind == moe::detail::TplKind::dict) {  // {"messages": [...], "tools": [...], flags}
            const moe::detail::TplDict& d = *request.dict;
            const moe::detail::TplValue* m = d.find("messages");
            if (!m || m->kind != moe::detail::TplKind::list) return die("%s: the object needs a \"messages\" array", a.render_chat_file.c_str());
            messages.clear();
            moe::detail::json_dump(*m, moe::detail::JsonStyle{}, 0, &messages, &error);
            if (const moe::detail::TplValue* t = d.find("tools")) moe::detail::json_dump(*t, moe::detail::JsonStyle{}, 0, &chat_options.tools_json, &error);
            if (const moe::detail::TplValue* g = d.find("add_generation_prompt")) chat_options.add_generation_prompt = g->kind == moe::detail::TplKind::boolean && g->boolean;
            if (const moe::detail::TplValue* e = d.find("enable_thinking")) chat_options.enable_thinking = e->kind == moe::detail::TplKind::boolean && e->boolean ? 1 : 0;
        } else if (request.kind != moe::detail::TplKind::list) {
            return die("%s: expected a JSON array of messages or an object with \"messages\"", a.render_chat_file.c_str());
        }
        std::string rendered;
        if (moe::render_chat_template(chat_template, messages, chat_options, &rendered) != moe::Status::ok) return die("%s", moe::last_error());
        std::fwrite(rendered.data(), 1, rendered.size(), stdout);
        return 0;
    }

    // ---- context size and KV cache: checked before anything is allocated ----
    const long long n_ctx = a.n_ctx ? a.n_ctx : !a.perplexity_file.empty() ? 256 : std::min(info.n_ctx_train, 4096);
    if (n_ctx <= 0) return die("the model gives no training context length; use -c");
    const uint64_t kv_bytes = moe::kv_cache_bytes(info, (int32_t)n_ctx, a.kv_type);
    const uint64_t phys = physical_memory();
    if (phys && kv_bytes > phys)
        return die("the KV cache for a context of %lld needs %s, more than this machine's physical memory (%s); use a smaller -c", n_ctx,
                   format_bytes(kv_bytes).c_str(), format_bytes(phys).c_str());

    // ---- prompt, perplexity text or chat prefix: tokenized and size-checked before anything is printed ----
    std::vector<int32_t> input;
    // --chat: the template, the prefix (BOS, system prompt) and the tokens closing a reply.
    ChatFormat fmt = ChatFormat::chatml;
    std::vector<int32_t> prefix, close_cut, close_eog;
    const long long n_reply = a.n_predict ? a.n_predict : 256;
    long long n_close = 0;
    auto encode_chat = [&](const std::string& s, std::vector<int32_t>* out) { return tok.encode(s, false, true, out) == moe::Status::ok; };
    if (!a.perplexity_file.empty()) {
        if (tok.encode(text, false, false, &input) != moe::Status::ok) return die("%s", moe::last_error());
        if ((long long)input.size() < n_ctx) return die("the text has fewer tokens (%zu) than one window (-c %lld)", input.size(), n_ctx);
        const uint64_t logits_bytes = 4ull * (uint64_t)n_ctx * (uint64_t)info.n_vocab;  // one window's logits
        if (phys && logits_bytes > phys)
            return die("--perplexity with -c %lld needs %s for the logits of a window, more than this machine's physical memory (%s)", n_ctx,
                       format_bytes(logits_bytes).c_str(), format_bytes(phys).c_str());
    } else if (a.chat && !chat_template.empty()) {  // the model's template (or --chat-template), rendered by the library
        fmt = ChatFormat::jinja;  // checked when the first message is rendered
    } else if (a.chat) {
        fmt = ChatFormat::chatml;
        std::vector<int32_t> bos, empty_turn;
        if (tok.encode("", true, true, &bos) != moe::Status::ok) return die("%s", moe::last_error());
        if (!bos.empty() && bos[0] == tok.bos()) prefix.push_back(bos[0]);  // only BOS: an EOS would end the dialogue
        if (a.have_system && !encode_chat(render_system(a.system), &prefix)) return die("%s", moe::last_error());
        if (!encode_chat(render_user(""), &empty_turn)) return die("%s", moe::last_error());
        // What follows a reply: cut by -n, it is closed as the model would have; after the model's own
        // end-of-turn token, only the separator.
        if (!encode_chat("<|im_end|>\n", &close_cut) || !encode_chat("\n", &close_eog)) return die("%s", moe::last_error());
        n_close = (long long)std::max(close_cut.size(), close_eog.size());
        if ((long long)(prefix.size() + empty_turn.size()) + n_reply + n_close > n_ctx)
            return die("no room for a message: %s%zu tokens of template + -n %lld exceed the context size %lld (use -c or a smaller -n)",
                       a.have_system ? "the system prompt + " : "", prefix.size() + empty_turn.size(), n_reply, n_ctx);
    } else {
        if (a.prompt_flag == "--tokens") {
            for (long long id : token_list) {
                if (id >= info.n_vocab) return die("--tokens: %lld is not a token id of this model (n_vocab %d)", id, info.n_vocab);
                input.push_back((int32_t)id);
            }
        } else if (tok.encode(text, true, false, &input) != moe::Status::ok) {
            return die("%s", moe::last_error());
        }
        if (input.empty()) return die("empty prompt");
        if ((long long)input.size() + a.n_predict > n_ctx)
            return die("the prompt (%zu tokens) + -n %lld exceed the context size %lld (use -c)", input.size(), a.n_predict, n_ctx);
    }

    // Warnings once every check has passed (an error stays the only line).
    const bool past_training = info.n_ctx_train > 0 && n_ctx > info.n_ctx_train;
    if (past_training)
        std::fprintf(stderr, "warning: %s %lld exceeds the model's training context (%d); quality degrades past it\n", a.n_ctx ? "-c" : "context",
                     n_ctx, info.n_ctx_train);
    if (past_training || kv_bytes > (1ull << 30))
        std::fprintf(stderr, "KV cache: %s (n_ctx %lld, float32 K and V)\n", format_bytes(kv_bytes).c_str(), n_ctx);

    if (!a.expert_stats.empty()) {
        if (info.n_expert <= 0) return die("--expert-stats: the model has no experts");
        std::FILE* f = std::fopen(a.expert_stats.c_str(), "ab");  // can it be written? (not truncated yet)
        if (!f) return die("cannot create '%s': %s", a.expert_stats.c_str(), std::strerror(errno));
        std::fclose(f);
    }
    if (a.predict_depth && info.n_expert <= 0) return die("--predict: the model has no experts");

    moe::SessionOptions so;
    so.n_threads = (int32_t)a.n_threads;
    so.n_ctx = (int32_t)n_ctx;
    so.kv_type = a.kv_type;
    so.predict_depth = (int32_t)a.predict_depth;
    so.predict_extra = (int32_t)a.predict_extra;
    moe::Session session;
    if (moe::Session::create(model, so, &session) != moe::Status::ok) return die("%s", moe::last_error());
    // After a successful run: the expert statistics file and the prediction report.
    auto finish = [&]() -> int {
        if (!a.expert_stats.empty() && session.expert_stats().write(a.expert_stats.c_str()) != moe::Status::ok)
            return die("%s", moe::last_error());
        if (a.mem_budget) {
            const moe::ExpertStoreStats es = model.expert_store_stats();
            std::fprintf(stderr,
                         "expert store: budget %s (resident %s, cache %s = %d experts, %s reads): %llu lookups, hit rate %.3f, %llu misses, "
                         "%llu late; %llu prefetched (%llu used, %llu wasted); %s read; waited %.3f s\n",
                         format_bytes(es.mem_budget_bytes).c_str(), format_bytes(es.resident_bytes).c_str(), format_bytes(es.cache_bytes).c_str(),
                         es.slots, moe::expert_reads_name(es.reads), (unsigned long long)es.lookups, es.hit_rate(), (unsigned long long)es.misses, (unsigned long long)es.late,
                         (unsigned long long)es.prefetches, (unsigned long long)es.prefetch_hits, (unsigned long long)es.prefetch_wasted,
                         format_bytes(es.bytes_read).c_str(), es.wait_seconds);
        }
        const moe::PredictionStats& ps = session.prediction_stats();
        for (int d = 1; d <= ps.max_depth; ++d)
            std::fprintf(stderr, "expert prediction %d layer%s ahead: recall %.3f, precision %.3f (%d predicted per layer, %d routed)\n", d,
                         d > 1 ? "s" : "", ps.recall(d), ps.precision(d), info.n_expert_used + (int)a.predict_extra, info.n_expert_used);
        return 0;
    };

    // ---- perplexity ----
    if (!a.perplexity_file.empty()) {
        const std::vector<int32_t>& ids = input;
        const int32_t window = session.n_ctx();
        const size_t n_windows = ids.size() / (size_t)window;
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
        return finish();
    }

    if (moe::check_sampler_options(a.sampler, info.n_vocab) != moe::Status::ok) return die("%s", moe::last_error());
    moe::Sampler sampler(a.sampler);
    if (a.sampler.dry_multiplier > 0 || !a.sampler.grammar.empty()) sampler.set_vocabulary(model.tokenizer());

    // ---- interactive chat ----
    // The cache holds the prefix (BOS, system prompt) and then whole turns: user turn + reply + its
    // closing. Their token ids are kept so that, when the next turn would not fit, the oldest turns
    // are dropped and the rest evaluated again after the prefix.
    // With a Jinja template the whole conversation is rendered each turn; Session::eval_prompt keeps
    // the cached prefix it shares with the previous turn's, and the oldest exchanges are dropped
    // (the system prompt kept) when the prompt and -n would not fit.
    if (a.chat && fmt == ChatFormat::jinja) {
        std::vector<std::pair<std::string, std::string>> messages;
        if (a.have_system) messages.push_back({"system", a.system});
        const size_t first = messages.size();
        std::string line;
        std::fprintf(stderr, "chat with %s; an empty line or EOF ends.\n", info.name.empty() ? info.architecture.c_str() : info.name.c_str());
        while (std::fprintf(stderr, "> "), std::getline(std::cin, line) && !line.empty()) {
            messages.push_back({"user", line});
            std::vector<int32_t> ids;
            size_t dropped = 0;
            for (;;) {
                std::string rendered;
                if (moe::render_chat_template(chat_template, messages_json(messages), chat_options, &rendered) != moe::Status::ok)
                    return die("%s", moe::last_error());
                ids.clear();
                if (!encode_chat(rendered, &ids)) return die("%s", moe::last_error());
                if ((long long)ids.size() + n_reply <= n_ctx || messages.size() - first <= 1) break;
                messages.erase(messages.begin() + (std::ptrdiff_t)first, messages.begin() + (std::ptrdiff_t)std::min(first + 2, messages.size() - 1));
                ++dropped;
            }
            if ((long long)ids.size() + n_reply > n_ctx) {
                std::fprintf(stderr, "[this message is too long for the context (%zu tokens, context %lld, %lld kept for the reply)]\n", ids.size(), n_ctx, n_reply);
                messages.pop_back();
                continue;
            }
            if (dropped) std::fprintf(stderr, "[context full: dropped %zu oldest exchange%s]\n", dropped, dropped == 1 ? "" : "s");
            if (session.eval_prompt(ids.data(), ids.size()) != moe::Status::ok) return die("%s", moe::last_error());
            moe::GenerateOptions g;
            g.max_tokens = (int32_t)std::min(n_reply, n_ctx - session.position());
            g.sampler = a.sampler;
            g.sampler.seed = sampler.options().seed + (uint64_t)messages.size();
            moe::GenerateResult r;
            moe::Status s = moe::generate(session, {}, g, [](void*, int32_t, const char* t, size_t n) {
                std::fwrite(t, 1, n, stdout);
                std::fflush(stdout);
                return true;
            }, nullptr, &r);
            std::printf("\n");
            std::fflush(stdout);
            if (s != moe::Status::ok) return die("%s", moe::last_error());
            messages.push_back({"assistant", r.text});
        }
        return finish();
    }
    if (a.chat) {
        if (!prefix.empty() && session.eval(prefix.data(), prefix.size()) != moe::Status::ok) return die("%s", moe::last_error());
        std::vector<std::vector<int32_t>> turns;

        std::string line;
        std::fprintf(stderr, "chat with %s; an empty line or EOF ends.\n", info.name.empty() ? info.architecture.c_str() : info.name.c_str());
        while (std::fprintf(stderr, "> "), std::getline(std::cin, line) && !line.empty()) {
            std::vector<int32_t> turn;
            if (!encode_chat(render_user(line), &turn)) return die("%s", moe::last_error());
            const long long need = (long long)turn.size() + n_reply + n_close;
            if ((long long)prefix.size() + need > n_ctx) {
                std::fprintf(stderr, "[this message is too long for the context (%zu tokens, context %lld, %lld kept for the reply)]\n", turn.size(),
                             n_ctx, n_reply);
                continue;
            }
            if (session.position() + need > n_ctx) {
                long long used = session.position();
                size_t drop = 0;
                while (used + need > n_ctx) used -= (long long)turns[drop++].size();
                turns.erase(turns.begin(), turns.begin() + (std::ptrdiff_t)drop);
                std::vector<int32_t> kept;
                for (const auto& t : turns) kept.insert(kept.end(), t.begin(), t.end());
                if (session.truncate((int32_t)prefix.size()) != moe::Status::ok) return die("%s", moe::last_error());
                if (!kept.empty() && session.eval(kept.data(), kept.size()) != moe::Status::ok) return die("%s", moe::last_error());
                std::fprintf(stderr, "[context full: dropped %zu oldest turn%s]\n", drop, drop == 1 ? "" : "s");
            }
            const int32_t start = session.position();
            moe::GenerateOptions g;
            // The reply stops where the context would end (never the case after the check above).
            g.max_tokens = (int32_t)std::min(n_reply, n_ctx - start - (long long)turn.size() - n_close);
            g.sampler = a.sampler;
            g.sampler.seed = sampler.options().seed + (uint64_t)start;
            moe::GenerateResult r;
            moe::Status s = moe::generate(session, turn, g, [](void*, int32_t, const char* t, size_t n) {
                std::fwrite(t, 1, n, stdout);
                std::fflush(stdout);
                return true;
            }, nullptr, &r);
            std::printf("\n");
            std::fflush(stdout);
            if (s != moe::Status::ok) return die("%s", moe::last_error());
            // generate() leaves the end-of-turn token (or, at -n, the last token) unevaluated: put it
            // and the closing into the cache so that the next turn continues the dialogue.
            turn.insert(turn.end(), r.tokens.begin(), r.tokens.end());
            const std::vector<int32_t>& close = r.stopped_by_eog ? close_eog : close_cut;
            turn.insert(turn.end(), close.begin(), close.end());
            const size_t done = (size_t)(session.position() - start);
            if (done < turn.size() && session.eval(turn.data() + done, turn.size() - done) != moe::Status::ok) return die("%s", moe::last_error());
            turns.push_back(std::move(turn));
        }
        return finish();
    }

    std::FILE* logits_file = nullptr;
    if (!a.logits_out.empty() && !(logits_file = std::fopen(a.logits_out.c_str(), "wb")))
        return die("cannot create '%s': %s", a.logits_out.c_str(), std::strerror(errno));
    std::vector<float> rows(logits_file ? input.size() * (size_t)info.n_vocab : 0);
    if (a.prompt_flag != "--tokens" && !a.print_tokens) std::fwrite(text.data(), 1, text.size(), stdout);

    double t0 = moe::detail::now_seconds();
    if (session.eval(input.data(), input.size(), logits_file ? rows.data() : nullptr) != moe::Status::ok) return die("%s", moe::last_error());
    double t1 = moe::detail::now_seconds();
    if (logits_file) std::fwrite(rows.data(), sizeof(float), rows.size(), logits_file);
    for (int32_t t : input) sampler.accept(t);

    moe::Detokenizer detok(tok);
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
        bool eog = tok.valid() && tok.is_end_of_generation(next) && a.prompt_flag != "--tokens";
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
    return finish();
}
