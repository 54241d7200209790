// moe-quantize: converts the weight matrices of a GGUF model to another tensor type.
// Shows the writing side of the API: GgufFile (the source, memory-mapped), GgufWriter with deferred
// tensors and write_streaming() (one tensor in memory at a time), quantize_row_weighted with an
// importance matrix gathered through SessionOptions::observe_inputs (--calib), dequantize_row.
// Usage: moe-quantize IN OUT TYPE [--recipe R] [--calib FILE] [--calib-tokens N] [-t N] [--ctx N]
// Matrices (n_dims >= 2, name ending in ".weight") get TYPE, except the routers (ffn_gate_inp, kept
// F32); vectors (norms, biases) are written as F32. The file goes to OUT.tmp and is renamed to OUT
// when complete, so an error never leaves a partial OUT. Exit status: 0 done, 1 error, 2 usage.
#include "moe_infer.h"
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <sys/stat.h>
#include <unistd.h>
#elif defined(_WIN32)
#include <io.h>
#endif

namespace {

const char* kUsage =
    "usage: moe-quantize IN OUT TYPE [options]\n"
    "  IN                  source model (GGUF; F32, F16, BF16 or Q8_0 weights expected)\n"
    "  OUT                 the new model (written to OUT.tmp, renamed when complete)\n"
    "  TYPE                tensor type of the weight matrices (case-insensitive):\n"
    "                        tq3 tq4 nvfp4 mxfp4 affine3 affine4 (= the _g64 ones, MLX's default)\n"
    "                        affine3_g32 affine3_g64 affine3_g128 affine4_g32 affine4_g64 affine4_g128\n"
    "                        q2_k q3_k q4_k q5_k q6_k q4_0 q4_1 q5_0 q5_1 q8_0 iq4_nl iq4_xs\n"
    "                        tq1_0 tq2_0 f16 bf16 f32\n"
    "  --recipe R          uniform (default): every matrix gets TYPE;\n"
    "                      mixed[:N] (N default 2): the first and last N layers, attention, token_embd\n"
    "                      and output get a larger type (3-bit -> 4-bit, 4-bit -> q6_k, 5/6-bit -> q8_0)\n"
    "                      hotcold[:P] (P default 25, needs --calib): in each layer the P% of the routed\n"
    "                      experts that took the most routing weight on the calibration text are hot and\n"
    "                      get the larger type, the others TYPE; matrices outside the experts get the\n"
    "                      larger type (they are read for every token). The hot experts go to their\n"
    "                      own stacks (ffn_*_hot_exps), listed in moe_infer.hot_experts\n"
    "  --calib FILE        text for an importance matrix (per-column activation energy of every matmul\n"
    "                      input), given to the quantizers that can weigh their error\n"
    "  --calib-tokens N    calibration tokens (default 8192)\n"
    "  --ctx N             calibration window in tokens (default 512)\n"
    "  -t N                threads (default: all cores, at most 16)\n"
    "A row length that is not a multiple of TYPE's block falls back to q8_0, else f16.\n"
    "Exit status: 0 done, 1 error (nothing left at OUT), 2 bad usage.\n";

// The TYPE names, in the order the usage lists them.
struct TypeName { const char* name; moe::TensorType type; };
constexpr TypeName kTypeNames[] = {
    {"tq3", moe::TensorType::tq3},
    {"tq4", moe::TensorType::tq4},
    {"nvfp4", moe::TensorType::nvfp4},
    {"mxfp4", moe::TensorType::mxfp4},
    {"affine3", moe::TensorType::affine3_g64},
    {"affine4", moe::TensorType::affine4_g64},
    {"affine3_g32", moe::TensorType::affine3_g32},
    {"affine3_g64", moe::TensorType::affine3_g64},
    {"affine3_g128", moe::TensorType::affine3_g128},
    {"affine4_g32", moe::TensorType::affine4_g32},
    {"affine4_g64", moe::TensorType::affine4_g64},
    {"affine4_g128", moe::TensorType::affine4_g128},
    {"q2_k", moe::TensorType::q2_k},
    {"q3_k", moe::TensorType::q3_k},
    {"q4_k", moe::TensorType::q4_k},
    {"q5_k", moe::TensorType::q5_k},
    {"q6_k", moe::TensorType::q6_k},
    {"q4_0", moe::TensorType::q4_0},
    {"q4_1", moe::TensorType::q4_1},
    {"q5_0", moe::TensorType::q5_0},
    {"q5_1", moe::TensorType::q5_1},
    {"q8_0", moe::TensorType::q8_0},
    {"iq4_nl", moe::TensorType::iq4_nl},
    {"iq4_xs", moe::TensorType::iq4_xs},
    {"tq1_0", moe::TensorType::tq1_0},
    {"tq2_0", moe::TensorType::tq2_0},
    {"f16", moe::TensorType::f16},
    {"bf16", moe::TensorType::bf16},
    {"f32", moe::TensorType::f32},
};

#if defined(__MINGW32__)
#define MOE_QUANTIZE_PRINTF __attribute__((format(gnu_printf, 1, 2)))  // MinGW's C99 printf (%zu works)
#elif defined(__GNUC__)
#define MOE_QUANTIZE_PRINTF __attribute__((format(printf, 1, 2)))
#else
#define MOE_QUANTIZE_PRINTF
#endif

// "error: ..." on stderr; returns the exit status 1 (a failure) or 2 (bad usage).
MOE_QUANTIZE_PRINTF int die(const char* fmt, ...) {
    std::va_list ap;
    va_start(ap, fmt);
    std::fprintf(stderr, "error: ");
    std::vfprintf(stderr, fmt, ap);
    std::fprintf(stderr, "\n");
    va_end(ap);
    return 1;
}
MOE_QUANTIZE_PRINTF int usage_error(const char* fmt, ...) {
    std::va_list ap;
    va_start(ap, fmt);
    std::fprintf(stderr, "error: ");
    std::vfprintf(stderr, fmt, ap);
    std::fprintf(stderr, " (see --help)\n");
    va_end(ap);
    return 2;
}

std::string lower(std::string s) {
    for (char& c : s) c = (char)std::tolower((unsigned char)c);
    return s;
}
bool ends_with(const std::string& s, const char* suffix) {
    const size_t n = std::strlen(suffix);
    return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

bool parse_int(const char* s, long long lo, long long hi, long long* out) {
    if (!s || !*s) return false;
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

bool parse_type(const std::string& s, moe::TensorType* out) {
    const std::string k = lower(s);
    for (const TypeName& t : kTypeNames)
        if (k == t.name) { *out = t.type; return true; }
    return false;
}
// Canonical lower-case name of a type ("affine3_g64", "q4_k").
std::string type_label(moe::TensorType t) { return lower(moe::tensor_type_name(t)); }

std::string format_size(uint64_t n) {
    char buf[32];
    if (n >= (1ull << 30)) std::snprintf(buf, sizeof buf, "%.2f GiB", (double)n / (1ull << 30));
    else if (n >= (1ull << 20)) std::snprintf(buf, sizeof buf, "%.1f MiB", (double)n / (1ull << 20));
    else std::snprintf(buf, sizeof buf, "%.1f KiB", (double)n / (1ull << 10));
    return buf;
}
std::string format_seconds(double s) {
    char buf[32];
    if (s < 60) std::snprintf(buf, sizeof buf, "%.1f s", s);
    else std::snprintf(buf, sizeof buf, "%d:%02d", (int)(s / 60), (int)s % 60);
    return buf;
}

double now_seconds() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

bool stderr_is_terminal() {
#if defined(__unix__) || defined(__APPLE__)
    return isatty(fileno(stderr)) != 0;
#elif defined(_WIN32)
    return _isatty(_fileno(stderr)) != 0;
#else
    return false;
#endif
}

// Reads a whole file; on failure *why says why (fopen() opens a directory on POSIX: checked first).
bool read_file(const std::string& path, std::string* out, std::string* why) {
#if defined(__unix__) || defined(__APPLE__)
    struct stat st;
    if (stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode)) { *why = "is a directory"; return false; }
#endif
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

//-----------------------------------------------------------------------------
// Progress on stderr: a bar with an ETA redrawn at most 10 times a second on a terminal, else one
// line per 10%. add() may be called from several threads.
//-----------------------------------------------------------------------------

class Progress {
public:
    Progress(const char* what, uint64_t total, bool bytes) : what_(what), total_(total), bytes_(bytes), tty_(stderr_is_terminal()), t0_(now_seconds()) {}

    void add(uint64_t n) {
        const uint64_t done = done_.fetch_add(n) + n;
        std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
        if (lock.owns_lock()) print(done, false);
    }
    // The final state and the newline (once).
    void finish() {
        std::lock_guard<std::mutex> lock(mutex_);
        if (finished_) return;
        finished_ = true;
        print(done_.load(), true);
    }

private:
    std::string amount(uint64_t v) const { return bytes_ ? format_size(v) : std::to_string(v); }

    void print(uint64_t done, bool last) {
        const double t = now_seconds(), elapsed = t - t0_;
        const double frac = total_ ? std::min(1.0, (double)done / (double)total_) : 1.0;
        const std::string eta = done > 0 && frac < 1 ? ", ETA " + format_seconds(elapsed * (1 - frac) / frac) : "";
        const char* unit = bytes_ ? "" : " tokens";
        if (tty_) {
            if (!last && t - last_print_ < 0.1) return;
            last_print_ = t;
            constexpr int kWidth = 30;
            const int fill = (int)(frac * kWidth);
            std::string bar(kWidth, ' ');
            for (int i = 0; i < fill; ++i) bar[(size_t)i] = '=';
            if (fill < kWidth) bar[(size_t)fill] = '>';
            std::fprintf(stderr, "\r%s [%s] %3d%% %s/%s%s, %s%s\x1b[K%s", what_, bar.c_str(), (int)(frac * 100), amount(done).c_str(),
                         amount(total_).c_str(), unit, format_seconds(elapsed).c_str(), eta.c_str(), last ? "\n" : "");
        } else {
            const int decile = (int)(frac * 10);
            if (!last && decile <= last_decile_) return;
            if (last && last_decile_ >= 10) return;
            last_decile_ = last ? 10 : decile;
            std::fprintf(stderr, "%s: %3d%% (%s/%s%s), %s%s\n", what_, (int)(frac * 100), amount(done).c_str(), amount(total_).c_str(), unit,
                         format_seconds(elapsed).c_str(), eta.c_str());
        }
        std::fflush(stderr);
    }

    const char* what_;
    uint64_t total_;
    bool bytes_, tty_;
    double t0_, last_print_ = -1;
    int last_decile_ = 0;
    bool finished_ = false;
    std::atomic<uint64_t> done_{0};
    std::mutex mutex_;
};

//-----------------------------------------------------------------------------
// Recipes: which type each matrix gets
//-----------------------------------------------------------------------------

// mixed: the type for the sensitive tensors (edges, attention, embeddings).
moe::TensorType larger_type(moe::TensorType t) {
    using T = moe::TensorType;
    switch (t) {
        case T::tq3: return T::tq4;
        case T::affine3_g32: return T::affine4_g32;
        case T::affine3_g64: return T::affine4_g64;
        case T::affine3_g128: return T::affine4_g128;
        case T::q3_k: return T::q4_k;
        case T::q2_k: return T::q3_k;
        case T::tq1_0: case T::tq2_0: return T::q4_k;
        case T::tq4: case T::affine4_g32: case T::affine4_g64: case T::affine4_g128: case T::nvfp4: case T::mxfp4:
        case T::q4_0: case T::q4_1: case T::q4_k: case T::iq4_nl: case T::iq4_xs:
            return T::q6_k;
        case T::q5_0: case T::q5_1: case T::q5_k: case T::q6_k: return T::q8_0;
        default: return t;  // 8-bit and float types stay
    }
}

// llama.cpp's general.file_type (llama_ftype) for a file made with TYPE; 1024 (GUESSED) where it
// has none. Informational: no reader needs it.
uint32_t llama_file_type(moe::TensorType t, bool mixed) {
    using T = moe::TensorType;
    switch (t) {
        case T::f32: return 0;
        case T::f16: return 1;
        case T::q4_0: return 2;
        case T::q4_1: return 3;
        case T::q8_0: return 7;
        case T::q5_0: return 8;
        case T::q5_1: return 9;
        case T::q2_k: return 10;
        case T::q3_k: return mixed ? 12 : 11;  // Q3_K_M / Q3_K_S
        case T::q4_k: return mixed ? 15 : 14;
        case T::q5_k: return mixed ? 17 : 16;
        case T::q6_k: return 18;
        case T::iq4_nl: return 25;
        case T::iq4_xs: return 30;
        case T::bf16: return 32;
        case T::tq1_0: return 36;
        case T::tq2_0: return 37;
        case T::mxfp4: return 38;  // MXFP4_MOE
        case T::nvfp4: return 39;
        default: return 1024;
    }
}

// Layer index of a "blk.<i>." tensor, -1 otherwise.
int layer_of(const std::string& name) {
    if (name.compare(0, 4, "blk.") != 0) return -1;
    size_t i = 4;
    long v = 0;
    while (i < name.size() && std::isdigit((unsigned char)name[i]) && v < 1000000) v = v * 10 + (name[i++] - '0');
    return i > 4 && i < name.size() && name[i] == '.' ? (int)v : -1;
}
// "attn_q" of "blk.3.attn_q.weight" ("" when not a blk tensor).
std::string role_of(const std::string& name) {
    if (layer_of(name) < 0) return "";
    const size_t a = name.find('.', 4) + 1, b = name.rfind('.');
    return b > a ? name.substr(a, b - a) : "";
}

bool is_expert_stack(const std::string& role) { return role == "ffn_gate_exps" || role == "ffn_up_exps" || role == "ffn_down_exps"; }

bool is_attention(const std::string& role) {
    return role == "attn_q" || role == "attn_k" || role == "attn_v" || role == "attn_output" || role == "attn_qkv";
}

//-----------------------------------------------------------------------------
// Importance matrix (--calib): per (layer, MatInput, expert) the sum over rows of x[i]^2 and the
// row count, from SessionOptions::observe_inputs.
//-----------------------------------------------------------------------------

constexpr int kMatInputs = (int)moe::MatInput::dense_hidden + 1;  // the MatInput values (dense_hidden is the last)

struct InputStats {
    std::vector<double> sum_sq;  // per column
    uint64_t rows = 0;
};

struct Calibration {
    int32_t n_layer = 0, n_expert = 0;
    std::vector<InputStats> stats;  // [(layer * kMatInputs + what) * (n_expert + 1) + expert + 1]
    uint64_t tokens = 0;
    moe::ExpertStats stats_of_run;  // the router's choices on the calibration text

    void init(int32_t layers, int32_t experts) {
        n_layer = layers;
        n_expert = experts;
        stats.assign((size_t)layers * kMatInputs * (size_t)(experts + 1), InputStats{});
    }
    InputStats* at(int32_t layer, moe::MatInput what, int32_t expert) {
        if (layer < 0 || layer >= n_layer || expert < -1 || expert >= n_expert) return nullptr;
        return &stats[((size_t)layer * kMatInputs + (size_t)what) * (size_t)(n_expert + 1) + (size_t)(expert + 1)];
    }
    const InputStats* at(int32_t layer, moe::MatInput what, int32_t expert) const { return const_cast<Calibration*>(this)->at(layer, what, expert); }

    // The observer: called from one thread at a time.
    static void observe(void* user, int32_t layer, moe::MatInput what, int32_t expert, const float* row, int64_t n) {
        InputStats* s = static_cast<Calibration*>(user)->at(layer, what, expert);
        if (!s || n <= 0) return;
        if (s->sum_sq.empty()) s->sum_sq.assign((size_t)n, 0.0);
        if ((int64_t)s->sum_sq.size() != n) return;  // never happens: one input has one width
        for (int64_t i = 0; i < n; ++i) s->sum_sq[(size_t)i] += (double)row[i] * row[i];
        ++s->rows;
    }
};

// Mean of x^2 per column, plus 1e-8 of its mean over the columns so that no column weighs 0.
// Empty when the input saw no rows (or only zeros) or has another width.
std::vector<float> importance_of(const InputStats* s, int64_t n) {
    if (!s || !s->rows || (int64_t)s->sum_sq.size() != n) return {};
    std::vector<float> v((size_t)n);
    double mean = 0;
    for (int64_t i = 0; i < n; ++i) mean += s->sum_sq[(size_t)i] / (double)s->rows;
    mean /= (double)n;
    if (!(mean > 0) || !std::isfinite(mean)) return {};
    for (int64_t i = 0; i < n; ++i) v[(size_t)i] = (float)(s->sum_sq[(size_t)i] / (double)s->rows + 1e-8 * mean);
    return v;
}

// The importance vectors of a matrix tensor: one shared by every matrix (size 1) or one per expert
// (ne[2]); empty when the tensor gets none.
std::vector<std::vector<float>> tensor_importance(const Calibration& c, const moe::GgufTensorInfo& t) {
    using M = moe::MatInput;
    const int layer = layer_of(t.name);
    const std::string role = role_of(t.name);
    const int64_t n = t.ne[0];
    if (layer < 0 || !ends_with(t.name, ".weight")) return {};
    auto one = [](std::vector<float> v) { return v.empty() ? std::vector<std::vector<float>>{} : std::vector<std::vector<float>>{std::move(v)}; };
    if (role == "attn_q" || role == "attn_k" || role == "attn_v" || role == "attn_qkv" || role == "attn_gate" || role == "ssm_alpha" || role == "ssm_beta" ||
        role == "ssm_ba")
        return one(importance_of(c.at(layer, M::attn_in, -1), n));
    if (role == "attn_output" || role == "ssm_out") return one(importance_of(c.at(layer, M::attn_out, -1), n));
    if (role == "ffn_gate" || role == "ffn_up" || role == "ffn_gate_shexp" || role == "ffn_up_shexp") return one(importance_of(c.at(layer, M::ffn_in, -1), n));
    if (role == "ffn_down_shexp") return one(importance_of(c.at(layer, M::shared_hidden, -1), n));
    if (role == "ffn_down") return one(importance_of(c.at(layer, M::dense_hidden, -1), n));
    const bool in = role == "ffn_gate_exps" || role == "ffn_up_exps";
    if (!in && role != "ffn_down_exps") return {};
    // Routed experts: expert e's own rows; an expert that saw none falls back to the layer's FFN
    // input (gate/up) or to the average of the other experts' vectors (down).
    const int64_t n_mats = t.ne[2];
    std::vector<std::vector<float>> out((size_t)n_mats);
    std::vector<double> avg;
    int n_avg = 0;
    for (int64_t e = 0; e < n_mats; ++e) {
        out[(size_t)e] = importance_of(c.at(layer, in ? M::expert_in : M::expert_hidden, (int32_t)e), n);
        if (out[(size_t)e].empty()) continue;
        avg.resize((size_t)n, 0.0);
        for (int64_t i = 0; i < n; ++i) avg[(size_t)i] += out[(size_t)e][(size_t)i];
        ++n_avg;
    }
    std::vector<float> fallback;
    if (in) {
        fallback = importance_of(c.at(layer, M::ffn_in, -1), n);
    } else if (n_avg) {
        fallback.resize((size_t)n);
        for (int64_t i = 0; i < n; ++i) fallback[(size_t)i] = (float)(avg[(size_t)i] / n_avg);
    }
    for (auto& v : out)
        if (v.empty()) {
            if (fallback.empty()) return {};
            v = fallback;
        }
    return out;
}

//-----------------------------------------------------------------------------
// The conversion plan: one entry per output tensor, in the source's order
//-----------------------------------------------------------------------------

enum class Kind {
    convert,  // dequantize, then quantize to `out` (matrices, and vectors as F32)
    copy,     // bytes copied unchanged (other tensors)
    scale,    // the `<name>.scale` of the NVFP4 tensor at plan index `of`
};

struct TensorPlan {
    Kind kind = Kind::convert;
    std::string name;
    const moe::GgufTensorInfo* src = nullptr;
    moe::TensorType out = moe::TensorType::f32;
    int64_t ne[4] = {1, 1, 1, 1};
    uint32_t n_dims = 1;
    bool quantized = false;  // a weight matrix (counted in the bits per weight)
    std::vector<int64_t> mats;  // hotcold: the source matrix of each output matrix (empty: the same)
    bool fallback = false;   // TYPE's block does not divide ne[0]
    std::vector<float> src_scale;                  // the source's `<name>.scale`, folded into the values
    std::vector<std::vector<float>> importance;    // see tensor_importance
    std::vector<float> out_scale;                  // NVFP4: per matrix, filled while converting
    size_t of = 0;                                 // Kind::scale: the weight's plan index
    uint64_t out_bytes = 0;
};

// Rows per unit of work: about 64K values.
int64_t chunk_rows(int64_t cols) { return std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, cols)); }

// The fill callback's state: converts one tensor at a time on n_threads threads.
struct Converter {
    std::vector<TensorPlan>* plans = nullptr;
    int n_threads = 1;
    Progress* progress = nullptr;
    std::atomic<bool> failed{false};
    std::mutex error_mutex;
    std::string error;

    void fail(const std::string& why) {
        std::lock_guard<std::mutex> lock(error_mutex);
        if (error.empty()) error = why;
        failed = true;
    }

    // Calls fn(scratch, begin, end) over [0, n_rows) in chunks on up to n_threads threads (one
    // for small tensors); scratch holds chunk * cols floats per thread.
    template <typename Fn>
    void parallel_rows(int64_t n_rows, int64_t cols, Fn fn) {
        const int64_t chunk = chunk_rows(cols);
        const int64_t n_chunks = (n_rows + chunk - 1) / chunk;
        const int nt = (int)std::min<int64_t>(n_threads, n_chunks);
        std::atomic<int64_t> next{0};
        auto worker = [&]() {
            std::vector<float> scratch((size_t)(chunk * cols));
            for (int64_t c; !failed && (c = next.fetch_add(1)) < n_chunks;) fn(scratch.data(), c * chunk, std::min(n_rows, (c + 1) * chunk));
        };
        if (nt <= 1) { worker(); return; }
        std::vector<std::thread> threads;
        for (int i = 1; i < nt; ++i) threads.emplace_back(worker);
        worker();
        for (std::thread& t : threads) t.join();
    }

    // Output rows [begin, end) of `p` as floats (the source's own `.scale` applied) in `rows`.
    bool read_rows(const TensorPlan& p, int64_t begin, int64_t end, float* rows) {
        const moe::GgufTensorInfo& t = *p.src;
        const int64_t cols = t.ne[0];
        const size_t src_row = t.n_bytes / (size_t)(t.n_elements() / cols);
        for (int64_t out_r = begin; out_r < end; ++out_r) {
            const int64_t r = p.mats.empty() ? out_r : p.mats[(size_t)(out_r / t.ne[1])] * t.ne[1] + out_r % t.ne[1];  // source row
            float* x = rows + (out_r - begin) * cols;
            if (moe::dequantize_row((moe::TensorType)t.type, t.data + (size_t)r * src_row, x, cols) != moe::Status::ok) {
                fail("cannot read tensor '" + t.name + "': " + moe::last_error());
                return false;
            }
            if (!p.src_scale.empty()) {
                const float s = p.src_scale.size() == 1 ? p.src_scale[0] : p.src_scale[(size_t)((r / t.ne[1]) % t.ne[2])];
                for (int64_t i = 0; i < cols; ++i) x[i] *= s;
            }
            for (int64_t i = 0; i < cols; ++i)
                if (!std::isfinite(x[i])) {
                    fail("tensor '" + t.name + "' holds a non-finite value (row " + std::to_string(r) + ", column " + std::to_string(i) + ")");
                    return false;
                }
        }
        return true;
    }

    bool convert(TensorPlan& p, uint8_t* dst) {
        const moe::GgufTensorInfo& t = *p.src;
        const int64_t cols = t.ne[0], n_rows = p.ne[1] * p.ne[2] * p.ne[3], rows_per_mat = p.ne[1], n_mats = p.ne[2];
        const size_t src_row = t.n_bytes / (size_t)(t.n_elements() / cols);
        const size_t out_row = (size_t)(cols / moe::tensor_type_block_elems(p.out) * moe::tensor_type_block_bytes(p.out));
        const bool nvfp4 = p.out == moe::TensorType::nvfp4;
        if (nvfp4) {
            // Two-level scaling (as NVIDIA's): each matrix is divided by a tensor scale s, undone by
            // `<name>.scale`, so that its largest block scale lands near E4M3's largest (448) and small
            // weights do not get E4M3's few coarse subnormal block scales. s is the power of two at or
            // above amax / (6 * 448): a power of two only shifts the E4M3 exponents (s = amax / (6 * 448)
            // itself gave 4% more RMSE on the demo model, whose block scales all fit E4M3 anyway).
            std::vector<float> amax((size_t)n_mats, 0.f);
            std::mutex m;
            parallel_rows(n_rows, cols, [&](float* x, int64_t begin, int64_t end) {
                if (!read_rows(p, begin, end, x)) return;
                std::vector<float> local((size_t)n_mats, 0.f);
                for (int64_t r = begin; r < end; ++r) {
                    float& a = local[(size_t)((r / rows_per_mat) % n_mats)];
                    for (int64_t i = 0; i < cols; ++i) a = std::max(a, std::fabs(x[(r - begin) * cols + i]));
                }
                std::lock_guard<std::mutex> lock(m);
                for (size_t e = 0; e < amax.size(); ++e) amax[e] = std::max(amax[e], local[e]);
            });
            p.out_scale.resize((size_t)n_mats);
            for (size_t e = 0; e < amax.size(); ++e) {
                int exp = 0;
                if (amax[e] > 0) std::frexp(amax[e] / (6.f * 448.f), &exp);  // = m * 2^exp, m in [0.5, 1)
                p.out_scale[e] = amax[e] > 0 ? std::ldexp(1.f, exp) : 1.f;
            }
        }
        parallel_rows(n_rows, cols, [&](float* x, int64_t begin, int64_t end) {
            if (!read_rows(p, begin, end, x)) return;
            for (int64_t r = begin; r < end; ++r) {
                float* row = x + (r - begin) * cols;
                const size_t mat = (size_t)((r / rows_per_mat) % n_mats);
                if (nvfp4)
                    for (int64_t i = 0; i < cols; ++i) row[i] /= p.out_scale[mat];
                const size_t src_mat = p.mats.empty() ? mat : (size_t)p.mats[mat];
                const float* imp = p.importance.empty() ? nullptr : p.importance[p.importance.size() == 1 ? 0 : src_mat].data();
                if (moe::quantize_row_weighted(p.out, row, dst + (size_t)r * out_row, cols, imp) != moe::Status::ok) {
                    fail("cannot quantize tensor '" + t.name + "' to " + type_label(p.out) + ": " + moe::last_error());
                    return;
                }
            }
            progress->add((uint64_t)(end - begin) * src_row);
        });
        return !failed;
    }

    static bool fill(void* user, size_t index, uint8_t* dst, size_t n_bytes) {
        Converter& c = *static_cast<Converter*>(user);
        TensorPlan& p = (*c.plans)[index];
        if (n_bytes != p.out_bytes) {
            c.fail("internal error: tensor '" + p.name + "' has " + std::to_string(n_bytes) + " bytes, expected " + std::to_string(p.out_bytes));
            return false;
        }
        switch (p.kind) {
            case Kind::scale: {
                const std::vector<float>& s = (*c.plans)[p.of].out_scale;
                if (s.size() * sizeof(float) != n_bytes) { c.fail("internal error: the scales of '" + p.name + "' are missing"); return false; }
                std::memcpy(dst, s.data(), n_bytes);
                return true;
            }
            case Kind::copy:
                std::memcpy(dst, p.src->data, n_bytes);
                c.progress->add(p.src->n_bytes);
                return true;
            case Kind::convert:
                return c.convert(p, dst);
        }
        return false;
    }
};

// OUT.tmp, removed unless kept (every error path, and Ctrl-C on POSIX).
char g_temp_path[4096];
void remove_temp_on_signal(int sig) {
#if defined(__unix__) || defined(__APPLE__)
    if (g_temp_path[0]) unlink(g_temp_path);
#endif
    std::signal(sig, SIG_DFL);
    std::raise(sig);
}
struct TempFile {
    std::string path;
    bool keep = false;
    ~TempFile() {
        if (!keep && !path.empty()) std::remove(path.c_str());
        g_temp_path[0] = 0;
    }
};

struct Args {
    std::string in, out, type_arg, recipe = "uniform", calib;
    long long calib_tokens = 8192, n_threads = 0, n_ctx = 512;
};

}  // namespace

int main(int argc, char** argv) {
    // ---- options: a usage error exits 2 before anything is read ----
    Args a;
    std::vector<std::string> positional;
    for (int i = 1; i < argc; ++i) {
        const std::string k = argv[i];
        if (k == "-h" || k == "--help") { std::fputs(kUsage, stdout); return 0; }
        const bool has_value = k == "--recipe" || k == "--calib" || k == "--calib-tokens" || k == "-t" || k == "--ctx";
        if (!has_value) {
            if (k.size() > 1 && k[0] == '-') return usage_error("unknown option %s", k.c_str());
            positional.push_back(k);
            continue;
        }
        if (i + 1 >= argc) return usage_error("missing value for %s", k.c_str());
        const char* v = argv[++i];
        if (k == "--recipe") a.recipe = lower(v);
        else if (k == "--calib") a.calib = v;
        else if (k == "--calib-tokens") { if (!parse_int(v, 1, 1LL << 30, &a.calib_tokens)) return usage_error("--calib-tokens needs an integer in [1, %lld], got '%s'", 1LL << 30, v); }
        else if (k == "-t") { if (!parse_int(v, 1, 512, &a.n_threads)) return usage_error("-t needs an integer in [1, 512], got '%s'", v); }
        else if (k == "--ctx") { if (!parse_int(v, 1, moe::kMaxContextLength, &a.n_ctx)) return usage_error("--ctx needs an integer in [1, %d], got '%s'", moe::kMaxContextLength, v); }
    }
    if (positional.size() != 3) {
        std::fputs(kUsage, stderr);
        return usage_error("expected IN OUT TYPE, got %zu argument%s", positional.size(), positional.size() == 1 ? "" : "s");
    }
    a.in = positional[0];
    a.out = positional[1];
    a.type_arg = positional[2];
    moe::TensorType type;
    if (!parse_type(a.type_arg, &type)) {
        std::string list;
        for (const TypeName& t : kTypeNames) list += std::string(" ") + t.name;
        std::fprintf(stderr, "error: unknown type '%s'; the types are:%s\n", a.type_arg.c_str(), list.c_str());
        return 2;
    }
    bool mixed = false, hotcold = false;
    long long mixed_layers = 2, hot_percent = 25;
    if (a.recipe == "hotcold" || a.recipe.compare(0, 8, "hotcold:") == 0) {
        hotcold = true;
        if (a.recipe.size() > 7 && !parse_int(a.recipe.c_str() + 8, 1, 99, &hot_percent))
            return usage_error("--recipe hotcold:P needs a percentage P in [1, 99], got '%s'", a.recipe.c_str());
        if (a.calib.empty()) return usage_error("--recipe hotcold needs --calib FILE: the hot experts are those the calibration text routes to most");
        if (larger_type(type) == type) return usage_error("--recipe hotcold: %s has no larger type for the hot experts", type_label(type).c_str());
        a.recipe = "hotcold:" + std::to_string(hot_percent);
        mixed_layers = 0;
    } else if (a.recipe == "mixed" || a.recipe.compare(0, 6, "mixed:") == 0) {
        mixed = true;
        if (a.recipe.size() > 5 && !parse_int(a.recipe.c_str() + 6, 0, 1 << 20, &mixed_layers))
            return usage_error("--recipe mixed:N needs an integer N >= 0, got '%s'", a.recipe.c_str());
        a.recipe = "mixed:" + std::to_string(mixed_layers);
    } else if (a.recipe != "uniform") {
        return usage_error("unknown recipe '%s' (uniform, mixed, mixed:N, hotcold, hotcold:P)", a.recipe.c_str());
    }
    const int n_threads = (int)(a.n_threads ? a.n_threads : std::max(1u, std::min(16u, std::thread::hardware_concurrency())));
    const double t_start = now_seconds();

    // ---- inputs: the model (mapped) and the calibration text ----
    moe::GgufFile src;
    if (moe::GgufFile::open(a.in.c_str(), true, &src) != moe::Status::ok) return die("cannot read the model '%s': %s", a.in.c_str(), moe::last_error());
    std::string calib_text, why;
    if (!a.calib.empty()) {
        if (!read_file(a.calib, &calib_text, &why)) return die("cannot read the calibration text '%s': %s", a.calib.c_str(), why.c_str());
        if (calib_text.empty()) return die("the calibration text '%s' is empty", a.calib.c_str());
    }
    std::string arch;
    src.get_string("general.architecture", &arch);
    if (hotcold && src.find("moe_infer.hot_experts"))
        return die("'%s' already has hot and cold experts (moe_infer.hot_experts): make the hot/cold file from the original model", a.in.c_str());
    uint32_t n_layer = 0;
    if (mixed && src.get_u32((arch + ".block_count").c_str(), &n_layer) != moe::Status::ok)
        return die("--recipe mixed needs the layer count '%s.block_count' of '%s': %s", arch.c_str(), a.in.c_str(), moe::last_error());

    // ---- the plan: every output tensor's type ----
    std::vector<TensorPlan> plans;
    std::vector<std::string> requantized;  // quantized source types other than Q8_0
    int n_fallback = 0;
    uint64_t total_src = 0;
    for (size_t i = 0; i < src.n_tensors(); ++i) {
        const moe::GgufTensorInfo& t = src.tensor_at(i);
        const bool matrix = t.n_dims >= 2 && ends_with(t.name, ".weight");
        // A source `<name>.scale` of a matrix is folded into its values (and not copied).
        if (ends_with(t.name, ".scale")) {
            const moe::GgufTensorInfo* w = src.find_tensor((t.name.substr(0, t.name.size() - 6) + ".weight").c_str());
            if (w && w->n_dims >= 2) continue;
        }
        TensorPlan p;
        p.name = t.name;
        p.src = &t;
        p.n_dims = t.n_dims;
        for (int d = 0; d < 4; ++d) p.ne[d] = t.ne[d];
        const std::string role = role_of(t.name);
        const bool router = t.name.find("ffn_gate_inp") != std::string::npos;
        if (matrix) {
            const moe::GgufTensorInfo* sc = src.find_tensor((t.name.substr(0, t.name.size() - 7) + ".scale").c_str());
            if (sc) {
                const int64_t k = sc->n_elements();
                if ((k != 1 && k != t.ne[2]) || sc->ne[0] != k)
                    return die("tensor '%s' has %lld elements, expected 1 or %lld", sc->name.c_str(), (long long)k, (long long)t.ne[2]);
                p.src_scale.resize((size_t)k);
                if (moe::dequantize_row((moe::TensorType)sc->type, sc->data, p.src_scale.data(), k) != moe::Status::ok)
                    return die("cannot read tensor '%s': %s", sc->name.c_str(), moe::last_error());
            }
        }
        if (matrix && !router) {
            const int layer = layer_of(t.name);
            const bool sensitive = is_attention(role) || t.name == "output.weight" || t.name == "token_embd.weight" ||
                                   (layer >= 0 && (layer < mixed_layers || layer >= (long long)n_layer - mixed_layers));
            p.out = mixed && sensitive ? larger_type(type) : type;
            if (hotcold) p.out = is_expert_stack(role) && t.n_dims == 3 ? type : larger_type(type);
            p.quantized = true;
            if (t.ne[0] % moe::tensor_type_block_elems(p.out)) {
                p.out = t.ne[0] % moe::tensor_type_block_elems(moe::TensorType::q8_0) == 0 ? moe::TensorType::q8_0 : moe::TensorType::f16;
                p.fallback = true;
                ++n_fallback;
            }
            const moe::TensorType st = (moe::TensorType)t.type;
            if (st != moe::TensorType::f32 && st != moe::TensorType::f16 && st != moe::TensorType::bf16 && st != moe::TensorType::q8_0 &&
                std::find(requantized.begin(), requantized.end(), moe::tensor_type_name(st)) == requantized.end())
                requantized.push_back(moe::tensor_type_name(st));
        } else if (t.n_dims >= 2 && !router) {
            p.kind = Kind::copy;
            p.out = (moe::TensorType)t.type;
        }  // else: a vector or a router, as F32
        p.out_bytes = (uint64_t)(t.n_elements() / moe::tensor_type_block_elems(p.out)) * (uint64_t)moe::tensor_type_block_bytes(p.out);
        total_src += t.n_bytes;
        plans.push_back(std::move(p));
    }
    if (!requantized.empty()) {
        std::string list;
        for (const std::string& s : requantized) list += (list.empty() ? "" : ", ") + s;
        std::fprintf(stderr, "warning: '%s' holds already-quantized weights (%s): quantizing them again adds to their error\n", a.in.c_str(), list.c_str());
    }

    // ---- OUT.tmp must be creatable before the slow part ----
    TempFile temp;
    temp.path = a.out + ".tmp";
    {
        std::FILE* f = std::fopen(temp.path.c_str(), "wb");
        if (!f) {
            const int err = errno;
            temp.path.clear();  // not ours to remove
            return die("cannot create '%s.tmp': %s", a.out.c_str(), std::strerror(err));
        }
        std::fclose(f);
        std::snprintf(g_temp_path, sizeof g_temp_path, "%s", temp.path.c_str());
        std::signal(SIGINT, remove_temp_on_signal);
        std::signal(SIGTERM, remove_temp_on_signal);
    }

    // ---- calibration: the importance matrix ----
    Calibration calib;
    double calib_seconds = 0;
    std::string calib_label = "none";
    if (!a.calib.empty()) {
        const double t0 = now_seconds();
        moe::Model model;
        if (moe::Model::load(a.in.c_str(), moe::LoadOptions{}, &model) != moe::Status::ok)
            return die("cannot load '%s' for calibration: %s", a.in.c_str(), moe::last_error());
        const moe::Tokenizer& tok = model.tokenizer();
        if (!tok.valid()) return die("cannot calibrate: '%s' has no tokenizer", a.in.c_str());
        // Tokenize a prefix of the text long enough for --calib-tokens (the whole text may be large),
        // cut at a line end, doubling it until it is.
        std::vector<int32_t> ids;
        for (size_t len = std::min(calib_text.size(), (size_t)a.calib_tokens * 8);; len = std::min(calib_text.size(), len * 2)) {
            size_t cut = len;
            if (len < calib_text.size()) {
                const size_t nl = calib_text.rfind('\n', len);
                if (nl != std::string::npos && nl > 0) cut = nl + 1;
            }
            ids.clear();
            if (tok.encode(calib_text.substr(0, cut), true, false, &ids) != moe::Status::ok)
                return die("cannot tokenize '%s': %s", a.calib.c_str(), moe::last_error());
            if ((long long)ids.size() >= a.calib_tokens || len == calib_text.size()) break;
        }
        if ((long long)ids.size() > a.calib_tokens) ids.resize((size_t)a.calib_tokens);
        if (ids.empty()) return die("the calibration text '%s' gives no tokens", a.calib.c_str());
        if ((long long)ids.size() < a.calib_tokens)
            std::fprintf(stderr, "note: '%s' has %zu tokens, fewer than --calib-tokens %lld: calibrating on all of them\n", a.calib.c_str(), ids.size(),
                         a.calib_tokens);
        const moe::ModelInfo& info = model.info();
        calib.init(info.n_layer, info.n_expert);
        moe::SessionOptions so;
        so.n_ctx = (int32_t)a.n_ctx;
        so.n_threads = n_threads;
        so.observe_inputs = Calibration::observe;
        so.observe_user = &calib;
        moe::Session session;
        if (moe::Session::create(model, so, &session) != moe::Status::ok) return die("cannot create a calibration session: %s", moe::last_error());
        Progress progress("calibrating", ids.size(), false);
        for (size_t begin = 0; begin < ids.size(); begin += (size_t)a.n_ctx) {
            const size_t n = std::min(ids.size() - begin, (size_t)a.n_ctx);
            session.reset();
            if (session.eval(ids.data() + begin, n) != moe::Status::ok) return die("calibration failed: %s", moe::last_error());
            calib.tokens += n;
            progress.add(n);
        }
        progress.finish();
        calib.stats_of_run = session.expert_stats();
        const char* base = std::strrchr(a.calib.c_str(), '/');
        calib_label = std::string(base ? base + 1 : a.calib.c_str()) + " (" + std::to_string(calib.tokens) + " tokens)";
        calib_seconds = now_seconds() - t0;
    }
    // ---- hotcold: each layer's hot experts, and its expert stacks split in two ----
    std::vector<int32_t> hot_list;  // moe_infer.hot_experts: the layers' hot ids, one layer after another
    int n_hot_total = 0, n_expert_total = 0;
    if (hotcold) {
        std::map<int, std::vector<int64_t>> hot_of_layer;  // ascending ids
        std::vector<TensorPlan> split;
        for (TensorPlan& p : plans) {
            const int layer = layer_of(p.name);
            if (!p.quantized || !is_expert_stack(role_of(p.name)) || p.n_dims != 3 || layer < 0 || layer >= calib.n_layer || p.ne[2] != calib.n_expert) {
                split.push_back(std::move(p));
                continue;
            }
            std::vector<int64_t>& hot = hot_of_layer[layer];
            const int64_t n_expert = p.ne[2];
            if (hot.empty()) {  // by routing weight, then by count, then by id
                const moe::ExpertStats& st = calib.stats_of_run;
                std::vector<int64_t> order((size_t)n_expert);
                for (int64_t e = 0; e < n_expert; ++e) order[(size_t)e] = e;
                auto at = [&](int64_t e) { return (size_t)layer * (size_t)n_expert + (size_t)e; };
                std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) {
                    if (st.weight[at(x)] != st.weight[at(y)]) return st.weight[at(x)] > st.weight[at(y)];
                    return st.count[at(x)] > st.count[at(y)];
                });
                const int64_t n_hot = std::max<int64_t>(1, std::min<int64_t>(n_expert - 1, (n_expert * hot_percent + 50) / 100));
                hot.assign(order.begin(), order.begin() + n_hot);
                std::sort(hot.begin(), hot.end());
                n_hot_total += (int)n_hot;
                n_expert_total += (int)n_expert;
            }
            TensorPlan cold = p, hot_plan = p;
            for (int64_t e = 0, h = 0; e < n_expert; ++e) {
                if (h < (int64_t)hot.size() && hot[(size_t)h] == e) { hot_plan.mats.push_back(e); ++h; }
                else cold.mats.push_back(e);
            }
            const std::string stack = role_of(p.name);  // ffn_gate_exps -> ffn_gate_hot_exps
            hot_plan.name = "blk." + std::to_string(layer) + "." + stack.substr(0, stack.size() - 4) + "hot_exps.weight";
            hot_plan.out = larger_type(type);
            if (p.fallback || p.ne[0] % moe::tensor_type_block_elems(hot_plan.out)) hot_plan.out = p.out;  // the cold one's fallback
            cold.ne[2] = (int64_t)cold.mats.size();
            hot_plan.ne[2] = (int64_t)hot_plan.mats.size();
            for (TensorPlan* q : {&cold, &hot_plan})
                q->out_bytes = (uint64_t)(q->ne[0] * q->ne[1] * q->ne[2] / moe::tensor_type_block_elems(q->out)) * (uint64_t)moe::tensor_type_block_bytes(q->out);
            split.push_back(std::move(cold));
            split.push_back(std::move(hot_plan));
        }
        plans = std::move(split);
        if (hot_of_layer.empty()) return die("--recipe hotcold: '%s' has no routed expert stacks to split", a.in.c_str());
        for (const auto& l : hot_of_layer)
            for (int64_t e : l.second) hot_list.push_back((int32_t)e);
    }
    // NVFP4 matrices get their `<name>.scale` right after them.
    for (size_t i = 0; i < plans.size(); ++i)
        if (plans[i].quantized && plans[i].out == moe::TensorType::nvfp4) {
            TensorPlan sc;
            sc.kind = Kind::scale;
            sc.name = plans[i].name.substr(0, plans[i].name.size() - 7) + ".scale";
            sc.ne[0] = plans[i].ne[2];
            sc.of = i;
            sc.out_bytes = (uint64_t)plans[i].ne[2] * sizeof(float);
            plans.insert(plans.begin() + (std::ptrdiff_t)i + 1, std::move(sc));
            ++i;
        }

    int n_importance = 0;  // tensors quantized with an importance vector
    if (calib.tokens)
        for (TensorPlan& p : plans)
            if (p.quantized && moe::quantize_uses_importance(p.out)) {
                p.importance = tensor_importance(calib, *p.src);
                n_importance += !p.importance.empty();
            }

    // ---- the output: metadata, then every tensor streamed ----
    moe::GgufWriter w;
    for (size_t i = 0; i < src.n_keys(); ++i) {
        const moe::GgufKeyValue& kv = src.key_at(i);
        if (kv.key != "moe_infer.custom_types") w.copy_key(kv);  // the writer names its own
    }
    if (src.find("general.file_type")) w.set_u32("general.file_type", llama_file_type(type, mixed));
    w.set_string("moe_infer.quantize.type", type_label(type));
    w.set_string("moe_infer.quantize.recipe", a.recipe);
    w.set_string("moe_infer.quantize.calib", calib_label);
    if (!hot_list.empty()) w.set_i32_array("moe_infer.hot_experts", hot_list);
    for (const TensorPlan& p : plans)
        if (w.add_tensor_deferred(p.name, p.out, p.n_dims, p.ne) != moe::Status::ok)
            return die("cannot add tensor '%s' (%s): %s", p.name.c_str(), type_label(p.out).c_str(), moe::last_error());

    const double t_write = now_seconds();
    Progress progress("quantizing", total_src, true);
    Converter conv;
    conv.plans = &plans;
    conv.n_threads = n_threads;
    conv.progress = &progress;
    const moe::Status ws = w.write_streaming(temp.path.c_str(), Converter::fill, &conv);
    if (ws != moe::Status::ok) {
        progress.finish();
        return die("%s", conv.error.empty() ? moe::last_error() : conv.error.c_str());
    }
    progress.finish();
#if defined(_WIN32)
    std::remove(a.out.c_str());  // rename() does not replace there
#endif
    if (std::rename(temp.path.c_str(), a.out.c_str()) != 0)
        return die("cannot rename '%s' to '%s': %s", temp.path.c_str(), a.out.c_str(), std::strerror(errno));
    temp.keep = true;
    const double t_end = now_seconds();

    // ---- summary ----
    std::map<std::string, std::pair<int, uint64_t>> by_type;  // name -> tensors, bytes
    uint64_t out_bytes = 0, q_bits = 0, q_weights = 0;
    std::string fallbacks;
    int listed = 0;
    for (const TensorPlan& p : plans) {
        auto& e = by_type[moe::tensor_type_name(p.out)];
        ++e.first;
        e.second += p.out_bytes;
        out_bytes += p.out_bytes;
        if (p.quantized) { q_bits += p.out_bytes * 8; q_weights += (uint64_t)(p.ne[0] * p.ne[1] * p.ne[2] * p.ne[3]); }
        if (p.fallback && listed++ < 8) fallbacks += (fallbacks.empty() ? "" : ", ") + p.name + " -> " + type_label(p.out);
    }
    if (listed > 8) fallbacks += " and " + std::to_string(listed - 8) + " more";
    std::error_code ec;
    const uintmax_t out_file = std::filesystem::file_size(a.out, ec);
    std::string types;
    for (const auto& e : by_type) types += (types.empty() ? "" : ", ") + e.first + " " + std::to_string(e.second.first) + " (" + format_size(e.second.second) + ")";
    std::fprintf(stderr, "wrote '%s': %s, recipe %s, calibration %s\n", a.out.c_str(), type_label(type).c_str(), a.recipe.c_str(), calib_label.c_str());
    std::fprintf(stderr, "  tensors by type: %s\n", types.c_str());
    std::fprintf(stderr, "  tensor data %s -> %s, file %s -> %s; quantized matrices: %llu weights at %.3f bits per weight\n",
                 format_size(total_src).c_str(), format_size(out_bytes).c_str(), format_size(src.file_size()).c_str(),
                 ec ? "?" : format_size((uint64_t)out_file).c_str(), (unsigned long long)q_weights, q_weights ? (double)q_bits / (double)q_weights : 0.0);
    std::fprintf(stderr, "  block-size fallbacks: %d%s%s\n", n_fallback, n_fallback ? ": " : "", fallbacks.c_str());
    if (calib.tokens) std::fprintf(stderr, "  importance matrix used by %d tensors\n", n_importance);
    if (hotcold)
        std::fprintf(stderr, "  hot experts: %d of %d (%s), cold: %s\n", n_hot_total, n_expert_total, type_label(larger_type(type)).c_str(), type_label(type).c_str());
    std::fprintf(stderr, "  time: %s (calibration %s, writing %s)\n", format_seconds(t_end - t_start).c_str(), format_seconds(calib_seconds).c_str(),
                 format_seconds(t_end - t_write).c_str());
    return 0;
}
