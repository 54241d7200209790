// llama_bench_peer: the moe-bench measurement, run through llama.cpp (the prebuilt CPU libraries of
// node-llama-cpp@3.22.1, fetched by tests/peer/fetch_llama.sh), so both engines are timed the same
// way on the same GGUF with the same threads.
//
//   llama_bench_peer -m FILE [-t N] [-p 64] [-n 32] [-r 3] [--json] [--bw GBS] [--no-repack]
//                    [--fa auto|on|off] [--cpu-variant V] [--backend-dir DIR] [-v]
//
// Per repetition: clear the KV cache, prefill p random token ids (same seed and generator as
// moe-bench) as one llama_decode, then decode n tokens one llama_decode each, greedy (argmax of
// the logits). One untimed warm-up repetition first (llama-bench does the same). Median tok/s;
// active bytes per token computed from the GGUF's tensor table with the formula of
// moe_infer.h's ModelInfo::active_bytes_per_token (all tensors but the expert stacks, k/E of the
// expert stacks, one embedding row instead of the embedding matrix; tied output counted once).
// llama.cpp runs with its defaults otherwise: mmap, CPU weight repacking on, flash attention auto,
// F16 K/V cache, n_batch = n_ubatch = p.
//
// Our own program against the public llama.h / gguf.h API; no llama.cpp code is copied here.
// Build: see bench/run_side_by_side.sh (g++ against DEST/include, rpath to the lib dir).

#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"

#include "membw.h"

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifndef LLAMA_BENCH_PEER_LIB_DIR
#define LLAMA_BENCH_PEER_LIB_DIR ""
#endif

namespace {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

bool g_verbose = false;
std::string g_first_error;
bool g_in_error = false;
std::string g_cpu_backend;  // file name of the libggml-cpu-*.so that ggml loaded (from its log)

void log_cb(enum ggml_log_level level, const char* text, void*) {
    if (g_verbose) std::fputs(text, stderr);
    if (const char* p = std::strstr(text, "libggml-cpu-")) {
        g_cpu_backend = p;
        while (!g_cpu_backend.empty() && (g_cpu_backend.back() == '\n' || g_cpu_backend.back() == ' ')) g_cpu_backend.pop_back();
    }
    if (level == GGML_LOG_LEVEL_ERROR) {
        g_in_error = g_first_error.empty();
        if (g_in_error) g_first_error = text;
    } else if (level == GGML_LOG_LEVEL_CONT && g_in_error) {
        g_first_error += text;
    } else {
        g_in_error = false;
    }
}

std::string llama_error() {
    std::string e = g_first_error;
    for (char& c : e)
        if (c == '\n' || c == '\r') c = ' ';
    while (!e.empty() && e.back() == ' ') e.pop_back();
    return e.empty() ? " (run with -v for llama.cpp's log)" : ": " + e;
}

struct Options {
    std::string model;
    int threads = 0, n_prompt = 64, n_gen = 32, reps = 3;
    bool json = false, no_repack = false, random_decode = false;
    double bw = 0;
    size_t bw_bytes = 0;
    uint64_t seed = 1234;
    std::string fa = "auto";
    std::string backend_dir = LLAMA_BENCH_PEER_LIB_DIR;
    std::string cpu_variant;
    std::vector<int> batch;  // --batch
};

const char* kUsage =
    "usage: llama_bench_peer -m FILE [options]\n"
    "  -t N             threads (default: all cores, at most 16)\n"
    "  -p N             prompt tokens per prefill (default 64; 0 = no prefill timing)\n"
    "  -n N             tokens decoded one at a time (default 32)\n"
    "  -r N             repetitions; medians are reported (default 3)\n"
    "  --json           print one JSON object\n"
    "  --bw GBS         skip the bandwidth measurement and use GBS (GB/s)\n"
    "  --bw-mib N       buffer of the bandwidth measurement (default max(1 GiB, 4 x LLC))\n"
    "  --seed N         seed of the random prompt (default 1234, as moe-bench)\n"
    "  --no-repack      use_extra_bufts = false (no CPU weight repacking)\n"
    "  --random-decode  decode inputs are random ids (seeded, as moe-bench --random-decode)\n"
    "  --fa auto|on|off flash attention (default auto, llama.cpp's default)\n"
    "  --backend-dir D  where libggml-cpu-*.so live (default: the lib dir it was built against)\n"
    "  --cpu-variant V  load libggml-cpu-V.so (haswell, skylakex, icelake, sapphirerapids, zen4, ...)\n"
    "  --batch LIST     also parallel decode of B sequences for each B in LIST (as moe-bench --batch:\n"
    "                   one context with n_seq_max = B, each sequence its own random prompt, then n\n"
    "                   steps of one llama_decode holding one token per sequence)\n"
    "  -v               show llama.cpp's log\n";

long long parse_int(const char* s, const char* what, long long lo, long long hi) {
    if (!s || !*s) throw Error(std::string("missing value for ") + what);
    errno = 0;
    char* end = nullptr;
    long long v = std::strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) throw Error(std::string("bad value for ") + what + ": '" + s + "'");
    return v;
}

Options parse_args(int argc, char** argv) {
    Options o;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto value = [&]() -> const char* { return i + 1 < argc ? argv[++i] : nullptr; };
        if (a == "-h" || a == "--help") { std::fputs(kUsage, stdout); std::exit(0); }
        else if (a == "-m" || a == "--model") { const char* v = value(); if (!v) throw Error("missing value after -m"); o.model = v; }
        else if (a == "-t" || a == "--threads") o.threads = (int)parse_int(value(), "-t", 1, 512);
        else if (a == "-p") o.n_prompt = (int)parse_int(value(), "-p", 0, 1 << 20);
        else if (a == "-n") o.n_gen = (int)parse_int(value(), "-n", 0, 1 << 20);
        else if (a == "-r") o.reps = (int)parse_int(value(), "-r", 1, 1000);
        else if (a == "--json") o.json = true;
        else if (a == "--bw") {
            const char* v = value();
            char* end = nullptr;
            o.bw = v ? std::strtod(v, &end) : 0;
            if (!v || *end || !(o.bw > 0)) throw Error("bad or missing value for --bw (GB/s)");
        }
        else if (a == "--bw-mib") o.bw_bytes = (size_t)parse_int(value(), "--bw-mib", 1, 1 << 24) << 20;
        else if (a == "--seed") o.seed = (uint64_t)parse_int(value(), "--seed", 0, INT64_MAX);
        else if (a == "--no-repack") o.no_repack = true;
        else if (a == "--random-decode") o.random_decode = true;
        else if (a == "--batch") {
            const char* v = value();
            if (!v || !*v) throw Error("missing value after --batch");
            for (const char* q = v; *q;) {
                char* end = nullptr;
                const long b = std::strtol(q, &end, 10);
                if (end == q || b < 1 || b > 256 || (*end && *end != ',')) throw Error(std::string("bad --batch list '") + v + "'");
                o.batch.push_back((int)b);
                q = *end ? end + 1 : end;
            }
        }
        else if (a == "--fa") {
            const char* v = value();
            if (!v || (std::strcmp(v, "auto") && std::strcmp(v, "on") && std::strcmp(v, "off"))) throw Error("--fa takes auto, on or off");
            o.fa = v;
        }
        else if (a == "--backend-dir") { const char* v = value(); if (!v) throw Error("missing value after --backend-dir"); o.backend_dir = v; }
        else if (a == "--cpu-variant") { const char* v = value(); if (!v) throw Error("missing value after --cpu-variant"); o.cpu_variant = v; }
        else if (a == "-v" || a == "--verbose") g_verbose = true;
        else throw Error("unknown argument '" + a + "' (see --help)");
    }
    if (o.model.empty()) throw Error("no model given (-m FILE)");
    if (o.n_prompt == 0 && o.n_gen == 0) throw Error("-p 0 and -n 0: nothing to measure");
    return o;
}

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// Same generator and seeding as moe-bench, so both engines see the same prompt ids.
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
};

double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string json_escape(const std::string& s) {
    std::string o;
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') { o += '\\'; o += (char)c; }
        else if (c < 0x20) { char b[8]; std::snprintf(b, sizeof b, "\\u%04x", c); o += b; }
        else o += (char)c;
    }
    return o;
}

std::string fmt_bytes(double b) {
    char buf[64];
    if (b >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
    else std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
    return buf;
}

struct FileFacts {
    std::string arch, weights;
    uint64_t weight_bytes = 0, active_bytes = 0;
    uint32_t n_expert = 0, n_used = 0, n_layer = 0;
};

uint32_t gguf_u32(gguf_context* g, const std::string& key) {
    int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return 0;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT32: return gguf_get_val_u32(g, id);
        case GGUF_TYPE_INT32: return (uint32_t)std::max(0, gguf_get_val_i32(g, id));
        case GGUF_TYPE_UINT64: return (uint32_t)gguf_get_val_u64(g, id);
        default: return 0;
    }
}

// Bytes read per decoded token, from the tensor table (see the comment at the top).
FileFacts file_facts(const std::string& path) {
    gguf_init_params gp = {true, nullptr};
    gguf_context* g = gguf_init_from_file(path.c_str(), gp);
    if (!g) throw Error("cannot read the GGUF header of " + path);
    FileFacts f;
    int64_t ak = gguf_find_key(g, "general.architecture");
    if (ak >= 0 && gguf_get_kv_type(g, ak) == GGUF_TYPE_STRING) f.arch = gguf_get_val_str(g, ak);
    f.n_expert = gguf_u32(g, f.arch + ".expert_count");
    f.n_used = gguf_u32(g, f.arch + ".expert_used_count");
    f.n_layer = gguf_u32(g, f.arch + ".block_count");
    uint64_t experts = 0, embd = 0, embd_row = 0;
    bool has_output = false;
    std::vector<std::pair<uint64_t, int>> by_type;
    uint64_t matrices = 0;
    for (int64_t i = 0; i < gguf_get_n_tensors(g); ++i) {
        const std::string name = gguf_get_tensor_name(g, i);
        const uint64_t n = gguf_get_tensor_size(g, i);
        const int64_t* ne = gguf_get_tensor_ne(g, i);
        f.weight_bytes += n;
        if (name.find("_exps.") != std::string::npos) experts += n;
        if (name == "token_embd.weight") { embd = n; embd_row = ne[1] > 0 ? n / (uint64_t)ne[1] : 0; }
        if (name == "output.weight") has_output = true;
        if (ne[1] > 1) {
            matrices += n;
            int t = (int)gguf_get_tensor_type(g, i);
            auto it = std::find_if(by_type.begin(), by_type.end(), [&](const std::pair<uint64_t, int>& e) { return e.second == t; });
            if (it == by_type.end()) by_type.push_back({n, t});
            else it->first += n;
        }
    }
    gguf_free(g);
    f.active_bytes = f.weight_bytes - experts - embd + embd_row + (f.n_expert ? experts / f.n_expert * f.n_used : 0) + (has_output ? 0 : embd);
    std::sort(by_type.rbegin(), by_type.rend());
    for (size_t i = 0; i < by_type.size(); ++i) {
        if (i > 0 && (double)by_type[i].first < 0.2 * (double)matrices) break;
        if (!f.weights.empty()) f.weights += "+";
        std::string tn = ggml_type_name((ggml_type)by_type[i].second);
        for (char& c : tn) c = (char)std::toupper((unsigned char)c);
        f.weights += tn;
    }
    return f;
}

void load_backends(const Options& o) {
    if (ggml_backend_reg_count() > 0) return;
    if (!o.cpu_variant.empty()) {
        std::string path = (o.backend_dir.empty() ? std::string(".") : o.backend_dir) + "/libggml-cpu-" + o.cpu_variant + ".so";
        if (!ggml_backend_load(path.c_str())) throw Error("cannot load CPU backend " + path + llama_error());
        return;
    }
    if (!o.backend_dir.empty()) ggml_backend_load_all_from_path(o.backend_dir.c_str());
    if (ggml_backend_reg_count() == 0) ggml_backend_load_all();
    if (!ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU))
        throw Error("no ggml CPU backend could be loaded from '" + o.backend_dir + "' (use --backend-dir DIR)");
}

int32_t argmax(const float* x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; ++i)
        if (x[i] > x[best]) best = i;
    return best;
}

struct Run {
    llama_model* model = nullptr;
    llama_context* ctx = nullptr;
    ~Run() {
        if (ctx) llama_free(ctx);
        if (model) llama_model_free(model);
    }
};

int run(const Options& o) {
    llama_log_set(log_cb, nullptr);
    const int threads = o.threads > 0 ? o.threads : (int)std::min(16u, std::max(1u, std::thread::hardware_concurrency()));
    FileFacts facts = file_facts(o.model);

    membw::Result bw;
    if (o.bw > 0) {
        bw.gbs = bw.median_gbs = o.bw;
        bw.threads = threads;
    } else {
        if (!o.json) std::fprintf(stderr, "[llama_bench_peer] measuring read bandwidth with %d threads...\n", threads);
        bw = membw::measure_read_bandwidth(threads, o.bw_bytes);
        if (bw.gbs <= 0) throw Error("cannot allocate the bandwidth buffer");
    }

    load_backends(o);
    llama_backend_init();

    Run r;
    double t_load = now_s();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    if (o.no_repack) mp.use_extra_bufts = false;
    ggml_backend_dev_t cpu_only[2] = {ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU), nullptr};
    mp.devices = cpu_only;
    g_first_error.clear();
    r.model = llama_model_load_from_file(o.model.c_str(), mp);
    if (!r.model) throw Error("cannot load " + o.model + llama_error());
    t_load = now_s() - t_load;
    const int32_t n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(r.model));

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = (uint32_t)std::max(256, o.n_prompt + o.n_gen + 1);
    cp.n_batch = cp.n_ubatch = (uint32_t)std::max(1, o.n_prompt);
    cp.n_seq_max = 1;
    cp.n_threads = cp.n_threads_batch = threads;
    cp.flash_attn_type = o.fa == "on" ? LLAMA_FLASH_ATTN_TYPE_ENABLED : o.fa == "off" ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_AUTO;
    cp.offload_kqv = false;
    cp.op_offload = false;
    cp.no_perf = true;
    g_first_error.clear();
    r.ctx = llama_init_from_model(r.model, cp);
    if (!r.ctx) throw Error("cannot create a llama.cpp context" + llama_error());

    std::vector<llama_token> prompt((size_t)std::max(1, o.n_prompt));
    Rng rng(o.seed);
    for (llama_token& t : prompt) t = (llama_token)(rng.next() % (uint64_t)n_vocab);
    std::vector<llama_token> decode_ids((size_t)std::max(1, o.n_gen));
    for (llama_token& t : decode_ids) t = (llama_token)(rng.next() % (uint64_t)n_vocab);
    llama_batch batch = llama_batch_init((int32_t)prompt.size(), 0, 1);
    struct BatchGuard { llama_batch& b; ~BatchGuard() { llama_batch_free(b); } } guard{batch};

    auto decode = [&](const llama_token* toks, int32_t n, int32_t pos0) {
        batch.n_tokens = n;
        for (int32_t i = 0; i < n; ++i) {
            batch.token[i] = toks[i];
            batch.pos[i] = pos0 + i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = i == n - 1;
        }
        g_first_error.clear();
        int32_t rc = llama_decode(r.ctx, batch);
        if (rc != 0) throw Error("llama_decode failed (rc=" + std::to_string(rc) + ")" + llama_error());
        const float* row = llama_get_logits_ith(r.ctx, -1);
        if (!row) throw Error("no logits");
        return argmax(row, n_vocab);
    };
    auto rep = [&](int n_gen, double* t_prefill, double* t_decode) {
        llama_memory_clear(llama_get_memory(r.ctx), true);
        const int32_t np = (int32_t)prompt.size();
        double t0 = now_s();
        llama_token tok = decode(prompt.data(), np, 0);
        double t1 = now_s();
        for (int i = 0; i < n_gen; ++i) {
            if (o.random_decode) tok = decode_ids[(size_t)i];
            tok = decode(&tok, 1, np + i);
        }
        double t2 = now_s();
        *t_prefill = o.n_prompt > 0 ? t1 - t0 : 0;
        *t_decode = t2 - t1;
    };

    double tp, td;
    rep(std::min(o.n_gen, 2), &tp, &td);  // warm-up (also pages the mmapped weights in)
    std::vector<double> pre_tps, dec_tps;
    for (int i = 0; i < o.reps; ++i) {
        rep(o.n_gen, &tp, &td);
        if (o.n_prompt > 0) pre_tps.push_back(o.n_prompt / tp);
        if (o.n_gen > 0) dec_tps.push_back(o.n_gen / td);
        if (!o.json)
            std::fprintf(stderr, "[llama_bench_peer] rep %d/%d: prefill %.2f tok/s, decode %.2f tok/s\n", i + 1, o.reps,
                         o.n_prompt > 0 ? o.n_prompt / tp : 0.0, o.n_gen > 0 ? o.n_gen / td : 0.0);
    }
    // --batch: llama.cpp's parallel-sequence decode (what llama-batched-bench measures), per B.
    struct BatchResult { int b; double aggregate; std::vector<double> all; };
    std::vector<BatchResult> batch_results;
    for (int B : o.batch) {
        const int32_t np = (int32_t)prompt.size();
        llama_context_params bp = cp;
        bp.n_seq_max = (uint32_t)B;
        bp.n_ctx = (uint32_t)(B * std::max(256, np + o.n_gen + 16));
        bp.n_batch = bp.n_ubatch = (uint32_t)std::max(np, B);
        g_first_error.clear();
        llama_context* bctx = llama_init_from_model(r.model, bp);
        if (!bctx) throw Error("cannot create a llama.cpp context for " + std::to_string(B) + " sequences" + llama_error());
        struct CtxGuard { llama_context* c; ~CtxGuard() { llama_free(c); } } ctx_guard{bctx};
        llama_batch bb = llama_batch_init(std::max(np, B), 0, 1);
        struct Guard { llama_batch& b; ~Guard() { llama_batch_free(b); } } bguard{bb};
        std::vector<std::vector<llama_token>> prompts((size_t)B, std::vector<llama_token>((size_t)np));
        for (auto& p : prompts)
            for (llama_token& t : p) t = (llama_token)(rng.next() % (uint64_t)n_vocab);
        std::vector<llama_token> toks((size_t)B);
        auto run_decode = [&](int n_tok) {
            bb.n_tokens = n_tok;
            g_first_error.clear();
            const int32_t rc = llama_decode(bctx, bb);
            if (rc != 0) throw Error("llama_decode failed (rc=" + std::to_string(rc) + ")" + llama_error());
        };
        auto batch_rep = [&](int n_gen) {
            llama_memory_clear(llama_get_memory(bctx), true);
            for (int s = 0; s < B; ++s) {  // prompts, one sequence per llama_decode (not timed)
                for (int32_t i = 0; i < np; ++i) {
                    bb.token[i] = prompts[(size_t)s][(size_t)i];
                    bb.pos[i] = i;
                    bb.n_seq_id[i] = 1;
                    bb.seq_id[i][0] = s;
                    bb.logits[i] = i == np - 1;
                }
                run_decode(np);
                toks[(size_t)s] = argmax(llama_get_logits_ith(bctx, np - 1), n_vocab);
            }
            const double t0 = now_s();
            for (int k = 0; k < n_gen; ++k) {
                for (int s = 0; s < B; ++s) {
                    bb.token[s] = o.random_decode ? decode_ids[(size_t)((k + s) % (int)decode_ids.size())] : toks[(size_t)s];
                    bb.pos[s] = np + k;
                    bb.n_seq_id[s] = 1;
                    bb.seq_id[s][0] = s;
                    bb.logits[s] = true;
                }
                run_decode(B);
                for (int s = 0; s < B; ++s) toks[(size_t)s] = argmax(llama_get_logits_ith(bctx, s), n_vocab);
            }
            return now_s() - t0;
        };
        batch_rep(std::min(o.n_gen, 2));  // warm-up
        BatchResult br{B, 0, {}};
        for (int i = 0; i < o.reps && o.n_gen > 0; ++i) {
            br.all.push_back((double)B * o.n_gen / batch_rep(o.n_gen));
            if (!o.json) std::fprintf(stderr, "[llama_bench_peer] batch %d rep %d/%d: %.2f tok/s in all\n", B, i + 1, o.reps, br.all.back());
        }
        br.aggregate = median(br.all);
        batch_results.push_back(br);
    }

    const double pre = median(pre_tps), dec = median(dec_tps);
    const double pre_best = pre_tps.empty() ? 0 : *std::max_element(pre_tps.begin(), pre_tps.end());
    const double dec_best = dec_tps.empty() ? 0 : *std::max_element(dec_tps.begin(), dec_tps.end());
    const double active = (double)facts.active_bytes;
    const double achieved = dec * active / 1e9;
    const double pct = bw.gbs > 0 ? 100.0 * achieved / bw.gbs : 0;
    const double roofline = active > 0 ? bw.gbs * 1e9 / active : 0;
    std::string sysinfo = llama_print_system_info();
    while (!sysinfo.empty() && (sysinfo.back() == ' ' || sysinfo.back() == '|')) sysinfo.pop_back();

    if (o.json) {
        auto arr = [](const std::vector<double>& v) {
            std::string s = "[";
            for (size_t i = 0; i < v.size(); ++i) { char b[32]; std::snprintf(b, sizeof b, "%s%.4f", i ? ", " : "", v[i]); s += b; }
            return s + "]";
        };
        std::string batch_json = "[";
        for (const BatchResult& b : batch_results) {
            char buf[160];
            std::snprintf(buf, sizeof buf, "%s{\"b\": %d, \"aggregate_tps\": %.4f, \"per_seq_tps\": %.4f, \"aggregate_tps_all\": ", batch_json.size() > 1 ? ", " : "",
                          b.b, b.aggregate, b.aggregate / b.b);
            batch_json += buf + arr(b.all) + "}";
        }
        batch_json += "]";
        std::printf(
            "{\"program\": \"llama_bench_peer\", \"model\": \"%s\", \"arch\": \"%s\", \"weights\": \"%s\", \"n_layer\": %u, \"n_expert\": %u, "
            "\"n_expert_used\": %u, \"threads\": %d, \"llama_version\": \"%s\", \"repack\": %s, \"flash_attn\": \"%s\", \"n_prompt\": %d, "
            "\"n_gen\": %d, \"reps\": %d, \"bandwidth_gbs\": %.3f, \"bandwidth_median_gbs\": %.3f, \"bandwidth_buffer_bytes\": %zu, "
            "\"bandwidth_given\": %s, \"weight_bytes\": %llu, \"active_bytes_per_token\": %llu, \"prefill_tps\": %.4f, \"decode_tps\": %.4f, \"prefill_tps_best\": %.4f, \"decode_tps_best\": %.4f, "
            "\"achieved_gbs\": %.3f, \"pct_bandwidth\": %.2f, \"roofline_tps\": %.3f, \"load_s\": %.3f, \"prefill_tps_all\": %s, "
            "\"decode_tps_all\": %s, \"cpu_backend\": \"%s\", \"system_info\": \"%s\", \"batch\": %s}\n",
            json_escape(o.model).c_str(), json_escape(facts.arch).c_str(), facts.weights.c_str(), facts.n_layer, facts.n_expert, facts.n_used,
            threads, json_escape(llama_version()).c_str(), o.no_repack ? "false" : "true", o.fa.c_str(), o.n_prompt, o.n_gen, o.reps, bw.gbs,
            bw.median_gbs, bw.bytes, o.bw > 0 ? "true" : "false", (unsigned long long)facts.weight_bytes,
            (unsigned long long)facts.active_bytes, pre, dec, pre_best, dec_best, achieved, pct, roofline, t_load, arr(pre_tps).c_str(), arr(dec_tps).c_str(),
            json_escape(g_cpu_backend).c_str(), json_escape(sysinfo).c_str(), batch_json.c_str());
        return 0;
    }
    std::printf("llama_bench_peer: %s\n", o.model.c_str());
    std::printf("  model      %s, %u layers, %u experts (top-%u), %s, %s in all, %s active per token\n", facts.arch.c_str(), facts.n_layer,
                facts.n_expert, facts.n_used, facts.weights.c_str(), fmt_bytes((double)facts.weight_bytes).c_str(), fmt_bytes(active).c_str());
    std::printf("  llama.cpp  %s, %d threads, repack %s, flash attention %s (load %.2f s)\n  cpu        %s (%s)\n", llama_version(), threads,
                o.no_repack ? "off" : "on", o.fa.c_str(), t_load, g_cpu_backend.c_str(), sysinfo.c_str());
    if (o.bw > 0) std::printf("  bandwidth  %.2f GB/s (given with --bw)\n", bw.gbs);
    else
        std::printf("  bandwidth  %.2f GB/s read, %d threads, %.0f MiB buffer, best of %d (median %.2f)\n", bw.gbs, bw.threads,
                    (double)bw.bytes / 1048576.0, bw.reps, bw.median_gbs);
    std::printf("\n  | test         | tok/s, median of %-3d| best     |\n  |--------------|---------------------|----------|\n", o.reps);
    if (o.n_prompt > 0) std::printf("  | prefill %-5d| %19.2f | %8.2f |\n", o.n_prompt, pre, pre_best);
    if (o.n_gen > 0) std::printf("  | decode %-6d| %19.2f | %8.2f |\n", o.n_gen, dec, dec_best);
    if (o.n_gen > 0)
        std::printf("\n  decode: %.2f tok/s x %s/token = %.2f GB/s = %.1f%% of %.2f GB/s (roofline %.1f tok/s)\n", dec, fmt_bytes(active).c_str(),
                    achieved, pct, bw.gbs, roofline);
    if (!batch_results.empty()) {
        std::printf("\n  parallel decode (n_seq_max = B), %d steps, median of %d:\n  | B  | tok/s in all | per sequence |\n  |----|--------------|--------------|\n",
                    o.n_gen, o.reps);
        for (const BatchResult& b : batch_results) std::printf("  | %-2d | %12.2f | %12.2f |\n", b.b, b.aggregate, b.aggregate / b.b);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(parse_args(argc, argv));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
