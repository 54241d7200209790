// llama_peer: runs a GGUF through the prebuilt llama.cpp (node-llama-cpp@3.22.1 binaries) the way
// our parity tests need it: CPU only, F32 K/V cache, flash attention off, the whole prompt as one
// batch with logits for every position, then plain argmax decoding, one token at a time.
//
//   llama_peer -m MODEL.gguf (--tokens 1,2,3 | --prompt TEXT | --prompt-file FILE) [-n 64]
//              [-t THREADS] [--logits-out FILE] [--add-special] [--n-ctx N] [--no-repack]
//              [--backend-dir DIR] [--cpu-variant V] [--no-parse-special] [-v]
//   llama_peer -m MODEL.gguf (--prompt TEXT | --prompt-file FILE) --tokenize-only [--add-special]
//   llama_peer -m MODEL.gguf --tokenize-cases FILE.inp [--add-special] [--no-parse-special]
//   llama_peer --version
//   llama_peer --quantize IN.gguf OUT.gguf FTYPE [--imatrix] [--threads N]
//
// --quantize: llama.cpp's own llama_model_quantize (what llama-quantize runs) with llama_ftype
//   FTYPE (its number, e.g. 12 = Q3_K_M), one thread unless --threads. --imatrix passes an importance matrix: for
//   every 2-D/3-D tensor a fixed positive weight per column (and expert), which the IQ2/IQ1 ftypes
//   require; its values only steer the quantizer's search.
// stdout: the generated (or, with --tokenize-only, the prompt's) token ids, comma-separated, one line;
//   --tokenize-cases: one such line per case of a llama.cpp vocab test file (cases separated by
//   "\n__ggml_vocab_test__\n"), for tokenizer cross-checks in one process.
// --logits-out: little-endian float32 rows of n_vocab, row i = logits after token i of
//   prompt ++ generated (n_prompt + n rows; the last row is for the last generated token, whose
//   argmax is not printed). Errors: one line "error: ..." on stderr, exit status 1.
//
// Our own small program against llama.h's public API; no llama.cpp code is copied here.

#include "llama.h"
#include "ggml.h"
#include "ggml-backend.h"
#include "gguf.h"

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#ifndef MOE_PEER_LIB_DIR
#define MOE_PEER_LIB_DIR ""
#endif
#ifndef MOE_PEER_EXPECT_LLAMA_VERSION
#define MOE_PEER_EXPECT_LLAMA_VERSION ""
#endif
#ifndef MOE_PEER_EXPECT_GGML_VERSION
#define MOE_PEER_EXPECT_GGML_VERSION ""
#endif

namespace {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

bool g_verbose = false;
std::string g_first_error;  // llama.cpp's first error-level log message, for our one-line errors
bool g_in_error = false;

void log_cb(enum ggml_log_level level, const char * text, void *) {
    if (g_verbose) fputs(text, stderr);
    if (level == GGML_LOG_LEVEL_ERROR) {
        g_in_error = g_first_error.empty();
        if (g_in_error) g_first_error = text;
    } else if (level == GGML_LOG_LEVEL_CONT && g_in_error) {
        g_first_error += text;
    } else {
        g_in_error = false;
    }
}

std::string llama_error_suffix() {
    std::string e = g_first_error;
    for (char & c : e) if (c == '\n' || c == '\r') c = ' ';
    while (!e.empty() && e.back() == ' ') e.pop_back();
    return e.empty() ? " (run with -v for llama.cpp's log)" : ": " + e;
}

struct Options {
    std::string model;
    std::string tokens_arg;
    bool have_tokens = false;
    std::string prompt;
    bool have_prompt = false;
    int n_gen = 64;
    int n_threads = 0;
    int n_ctx = 0;
    std::string logits_out;
    bool tokenize_only = false;
    std::string cases_file;
    bool parse_special = true;
    bool add_special = false;
    bool no_repack = false;
    bool version = false;
    std::string backend_dir = MOE_PEER_LIB_DIR;
    std::string cpu_variant;
};

void usage(FILE * f) {
    fputs(
        "usage: llama_peer -m MODEL.gguf (--tokens 1,2,3 | --prompt TEXT | --prompt-file FILE) [options]\n"
        "  -n N              tokens to generate greedily (default 64; never stops at EOS)\n"
        "  -t N              threads (default: all cores)\n"
        "  --logits-out F    write float32 rows of n_vocab: one per evaluated position\n"
        "  --tokenize-only   print the token ids of --prompt/--prompt-file and exit (vocab only)\n"
        "  --tokenize-cases F  tokenize each case of a llama.cpp vocab test file (.inp), one line each\n"
        "  --add-special     let the tokenizer add BOS/EOS as the model asks (default: off)\n"
        "  --no-parse-special  treat special-token text as plain text (default: parsed)\n"
        "  --n-ctx N         context size (default: prompt + n, at least 16)\n"
        "  --no-repack       disable llama.cpp's CPU weight repacking (use_extra_bufts=false)\n"
        "  --backend-dir D   where libggml-cpu-*.so live (default: the lib dir it was built against)\n"
        "  --cpu-variant V   load libggml-cpu-V.so (x64, sse42, haswell, skylakex, icelake, zen4,\n"
        "                    sapphirerapids, ...) instead of the best one for this CPU\n"
        "  -v                show llama.cpp's log on stderr\n"
        "  --version         print llama.cpp/ggml versions and check them against the headers' ones\n",
        f);
}

long parse_int(const std::string & s, const char * what, long lo, long hi) {
    if (s.empty()) throw Error(std::string("empty value for ") + what);
    errno = 0;
    char * end = nullptr;
    long v = std::strtol(s.c_str(), &end, 10);
    if (errno != 0 || *end != '\0' || v < lo || v > hi) {
        throw Error(std::string("bad value for ") + what + ": '" + s + "'");
    }
    return v;
}

std::string read_file(const std::string & path) {
    FILE * f = std::fopen(path.c_str(), "rb");
    if (!f) throw Error("cannot open " + path + ": " + std::strerror(errno));
    std::string out;
    char buf[65536];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
    bool bad = std::ferror(f) != 0;
    std::fclose(f);
    if (bad) throw Error("cannot read " + path);
    return out;
}

Options parse_args(int argc, char ** argv) {
    Options o;
    auto value = [&](int & i) -> std::string {
        if (i + 1 >= argc) throw Error(std::string("missing value after ") + argv[i]);
        return argv[++i];
    };
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        if (a == "-m" || a == "--model") o.model = value(i);
        else if (a == "--tokens") { o.tokens_arg = value(i); o.have_tokens = true; }
        else if (a == "--prompt") {
            if (o.have_prompt) throw Error("--prompt/--prompt-file given twice");
            o.prompt = value(i); o.have_prompt = true;
        }
        else if (a == "--prompt-file") {
            if (o.have_prompt) throw Error("--prompt/--prompt-file given twice");
            o.prompt = read_file(value(i)); o.have_prompt = true;
        }
        else if (a == "-n" || a == "--n-predict") o.n_gen = (int) parse_int(value(i), "-n", 0, 1 << 20);
        else if (a == "-t" || a == "--threads") o.n_threads = (int) parse_int(value(i), "-t", 1, 4096);
        else if (a == "--n-ctx" || a == "-c") o.n_ctx = (int) parse_int(value(i), "--n-ctx", 1, INT_MAX);
        else if (a == "--logits-out") o.logits_out = value(i);
        else if (a == "--tokenize-only") o.tokenize_only = true;
        else if (a == "--tokenize-cases") o.cases_file = value(i);
        else if (a == "--add-special") o.add_special = true;
        else if (a == "--no-parse-special") o.parse_special = false;
        else if (a == "--no-repack") o.no_repack = true;
        else if (a == "--backend-dir") o.backend_dir = value(i);
        else if (a == "--cpu-variant") o.cpu_variant = value(i);
        else if (a == "-v" || a == "--verbose") g_verbose = true;
        else if (a == "--version") o.version = true;
        else if (a == "-h" || a == "--help") { usage(stdout); std::exit(0); }
        else throw Error("unknown argument '" + a + "' (see --help)");
    }
    if (o.version) return o;
    if (o.model.empty()) throw Error("no model given (-m MODEL.gguf)");
    if (!o.cases_file.empty()) {
        if (o.have_prompt || o.have_tokens || o.tokenize_only) {
            throw Error("--tokenize-cases takes no --prompt/--prompt-file/--tokens/--tokenize-only");
        }
        o.tokenize_only = true;
    } else if (o.tokenize_only) {
        if (!o.have_prompt) throw Error("--tokenize-only needs --prompt or --prompt-file");
        if (o.have_tokens) throw Error("--tokenize-only does not take --tokens");
    } else {
        if (o.have_tokens == o.have_prompt) throw Error("give exactly one of --tokens, --prompt, --prompt-file");
    }
    return o;
}

std::vector<llama_token> parse_tokens(const std::string & s) {
    std::vector<llama_token> out;
    size_t i = 0;
    while (i <= s.size()) {
        size_t j = s.find(',', i);
        if (j == std::string::npos) j = s.size();
        std::string item = s.substr(i, j - i);
        // allow surrounding spaces: "1, 2, 3"
        size_t b = item.find_first_not_of(" \t"), e = item.find_last_not_of(" \t");
        item = b == std::string::npos ? "" : item.substr(b, e - b + 1);
        out.push_back((llama_token) parse_int(item, "--tokens", 0, INT32_MAX));
        i = j + 1;
    }
    return out;
}

void print_ids(const std::vector<llama_token> & ids) {
    std::string line;
    for (size_t i = 0; i < ids.size(); ++i) {
        if (i) line += ',';
        line += std::to_string(ids[i]);
    }
    line += '\n';
    std::fwrite(line.data(), 1, line.size(), stdout);
    std::fflush(stdout);
}

void load_backends(const Options & o) {
    if (ggml_backend_reg_count() > 0) return;
    if (!o.cpu_variant.empty()) {
        const std::string path = (o.backend_dir.empty() ? std::string(".") : o.backend_dir) + "/libggml-cpu-" +
                                 o.cpu_variant + ".so";
        g_first_error.clear();
        if (!ggml_backend_load(path.c_str())) {
            throw Error("cannot load CPU backend " + path + " (missing, or this CPU lacks its instructions)" +
                        llama_error_suffix());
        }
        return;
    }
    // The prebuilt ggml is built with dynamically loaded backends: pick the best
    // libggml-cpu-<variant>.so for this CPU from the lib dir (not from cwd / the exe's dir).
    if (!o.backend_dir.empty()) ggml_backend_load_all_from_path(o.backend_dir.c_str());
    if (ggml_backend_reg_count() == 0) ggml_backend_load_all();
    if (ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU) == nullptr) {
        throw Error("no ggml CPU backend could be loaded (looked in '" + o.backend_dir +
                    "'; use --backend-dir DIR with the libggml-cpu-*.so files)");
    }
}

int run_version() {
    const char * lv = llama_version();
    const char * gv = ggml_version();
    const char * gc = ggml_commit();
    std::printf("llama_version=%s\nggml_version=%s\nggml_commit=%s\n", lv, gv, gc);
    std::string el = MOE_PEER_EXPECT_LLAMA_VERSION, eg = MOE_PEER_EXPECT_GGML_VERSION;
    // llama_version() may carry a "-dev" suffix (LLAMA_BUILD_IS_DEV); compare the numeric part.
    std::string lvs = lv ? lv : "";
    if (!el.empty() && lvs.compare(0, el.size(), el) != 0) {
        throw Error("libllama version " + lvs + " does not match the headers' " + el);
    }
    if (!eg.empty() && eg != (gv ? gv : "")) {
        throw Error(std::string("libggml version ") + (gv ? gv : "?") + " does not match the headers' " + eg);
    }
    return 0;
}

std::vector<llama_token> tokenize(const llama_vocab * vocab, const std::string & text, bool add_special,
                                  bool parse_special) {
    if (text.size() > (size_t) INT32_MAX) throw Error("prompt too long");
    std::vector<llama_token> out(text.size() + 8);
    int32_t n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(),
                               add_special, parse_special);
    if (n == INT32_MIN) throw Error("tokenization overflow");
    if (n < 0) {
        out.resize((size_t) -n);
        n = llama_tokenize(vocab, text.data(), (int32_t) text.size(), out.data(), (int32_t) out.size(),
                           add_special, parse_special);
        if (n < 0) throw Error("tokenization failed");
    }
    out.resize((size_t) n);
    return out;
}

struct Run {
    llama_model * model = nullptr;
    llama_context * ctx = nullptr;
    FILE * logits_f = nullptr;
    ~Run() {
        if (logits_f) std::fclose(logits_f);
        if (ctx) llama_free(ctx);
        if (model) llama_model_free(model);
    }
};

llama_token argmax_row(const float * row, int32_t n_vocab, int64_t pos) {
    int32_t best = -1;
    float best_v = 0.0f;
    for (int32_t j = 0; j < n_vocab; ++j) {
        const float v = row[j];
        if (std::isnan(v)) throw Error("NaN logit at position " + std::to_string(pos) + ", token " + std::to_string(j));
        if (best < 0 || v > best_v) { best = j; best_v = v; }  // ties: lowest id wins
    }
    return best;
}

int run(const Options & o) {
    llama_log_set(log_cb, nullptr);
    load_backends(o);
    llama_backend_init();
    if (g_verbose) std::fprintf(stderr, "llama_peer: %s\n", llama_print_system_info());

    Run r;
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    mp.vocab_only = o.tokenize_only;
    if (o.no_repack) mp.use_extra_bufts = false;
    ggml_backend_dev_t cpu_only[2] = { ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU), nullptr };
    mp.devices = cpu_only;   // never offload, even if some other backend got registered

    g_first_error.clear();
    r.model = llama_model_load_from_file(o.model.c_str(), mp);
    if (!r.model) throw Error("cannot load model " + o.model + llama_error_suffix());
    const llama_vocab * vocab = llama_model_get_vocab(r.model);
    const int32_t n_vocab = llama_vocab_n_tokens(vocab);
    if (n_vocab <= 0) throw Error("model has an empty vocabulary");

    if (!o.cases_file.empty()) {
        const std::string raw = read_file(o.cases_file);
        const std::string sep = "\n__ggml_vocab_test__\n";
        size_t pos = 0;
        while (pos < raw.size()) {   // same splitting as llama.cpp's tests/test-tokenizer-0.cpp
            size_t next = raw.find(sep, pos);
            if (next == std::string::npos) next = raw.size();
            print_ids(tokenize(vocab, raw.substr(pos, next - pos), o.add_special, o.parse_special));
            pos = next == raw.size() ? next : next + sep.size();
        }
        return 0;
    }
    if (o.tokenize_only) {
        print_ids(tokenize(vocab, o.prompt, o.add_special, o.parse_special));
        return 0;
    }

    std::vector<llama_token> prompt = o.have_tokens ? parse_tokens(o.tokens_arg)
                                                   : tokenize(vocab, o.prompt, o.add_special, o.parse_special);
    if (prompt.empty()) throw Error("empty prompt");
    for (llama_token t : prompt) {
        if (t < 0 || t >= n_vocab) throw Error("token id " + std::to_string(t) + " out of range [0, " + std::to_string(n_vocab) + ")");
    }
    const int64_t n_prompt = (int64_t) prompt.size();
    const int64_t n_total = n_prompt + o.n_gen;
    if (n_total > INT32_MAX / 2) throw Error("prompt + n too large");
    const uint32_t n_ctx = o.n_ctx > 0 ? (uint32_t) o.n_ctx : (uint32_t) std::max<int64_t>(n_total, 16);
    if ((int64_t) n_ctx < n_total) {
        throw Error("--n-ctx " + std::to_string(n_ctx) + " < prompt + n = " + std::to_string(n_total));
    }

    llama_context_params cp = llama_context_default_params();
    const int n_threads = o.n_threads > 0 ? o.n_threads : (int) std::max(1u, std::thread::hardware_concurrency());
    cp.n_ctx = n_ctx;
    cp.n_batch = (uint32_t) n_prompt;     // whole prompt in one llama_decode ...
    cp.n_ubatch = (uint32_t) n_prompt;    // ... and in one graph evaluation
    cp.n_seq_max = 1;
    cp.n_outputs_max = 0;                 // 0 = n_batch: logits for every prompt position
    cp.n_outputs_max_per_seq = 0;         // default is 1 in this API version
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = GGML_TYPE_F32;
    cp.type_v = GGML_TYPE_F32;
    cp.offload_kqv = false;
    cp.op_offload = false;
    cp.embeddings = false;
    cp.no_perf = true;

    g_first_error.clear();
    r.ctx = llama_init_from_model(r.model, cp);
    if (!r.ctx) throw Error("cannot create a llama.cpp context" + llama_error_suffix());

    if (!o.logits_out.empty()) {
        r.logits_f = std::fopen(o.logits_out.c_str(), "wb");
        if (!r.logits_f) throw Error("cannot open " + o.logits_out + ": " + std::strerror(errno));
    }
    const uint32_t one = 1;
    if (*(const uint8_t *) &one != 1) throw Error("--logits-out needs a little-endian host");

    auto write_row = [&](const float * row) {
        if (r.logits_f && std::fwrite(row, sizeof(float), (size_t) n_vocab, r.logits_f) != (size_t) n_vocab) {
            throw Error("cannot write " + o.logits_out);
        }
    };
    auto decode = [&](llama_batch & b, const char * what) {
        g_first_error.clear();
        const int32_t rc = llama_decode(r.ctx, b);
        if (rc != 0) {
            throw Error(std::string("llama_decode failed on the ") + what + " (rc=" + std::to_string(rc) + ")" +
                        llama_error_suffix());
        }
    };

    // prompt: one batch, seq 0, explicit positions, logits requested for every token
    llama_batch batch = llama_batch_init((int32_t) n_prompt, 0, 1);
    struct BatchGuard { llama_batch & b; ~BatchGuard() { llama_batch_free(b); } } guard{batch};
    batch.n_tokens = (int32_t) n_prompt;
    for (int64_t i = 0; i < n_prompt; ++i) {
        batch.token[i] = prompt[(size_t) i];
        batch.pos[i] = (llama_pos) i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    decode(batch, "prompt");

    std::vector<llama_token> generated;
    generated.reserve((size_t) o.n_gen);
    llama_token next = -1;
    for (int64_t i = 0; i < n_prompt; ++i) {
        const float * row = llama_get_logits_ith(r.ctx, (int32_t) i);
        if (!row) throw Error("no logits for prompt position " + std::to_string(i));
        write_row(row);
        if (i == n_prompt - 1) next = argmax_row(row, n_vocab, i);
    }

    // greedy decode, one token per llama_decode; the last generated token is evaluated too so the
    // logits file has a row for every position of prompt ++ generated
    for (int k = 0; k < o.n_gen; ++k) {
        generated.push_back(next);
        batch.n_tokens = 1;
        batch.token[0] = next;
        batch.pos[0] = (llama_pos) (n_prompt + k);
        batch.n_seq_id[0] = 1;
        batch.seq_id[0][0] = 0;
        batch.logits[0] = 1;
        decode(batch, "generated token");
        const float * row = llama_get_logits_ith(r.ctx, 0);
        if (!row) throw Error("no logits for position " + std::to_string(n_prompt + k));
        write_row(row);
        next = argmax_row(row, n_vocab, n_prompt + k);
    }

    if (r.logits_f) {
        FILE * f = r.logits_f;
        r.logits_f = nullptr;
        if (std::fclose(f) != 0) throw Error("cannot write " + o.logits_out);
    }
    print_ids(generated);
    return 0;
}

int run_quantize(int argc, char ** argv) {
    const char * const usage_text = "usage: llama_peer --quantize IN.gguf OUT.gguf FTYPE [--imatrix] [--threads N]";
    if (argc < 5) throw Error(usage_text);
    const std::string in = argv[2], out = argv[3];
    bool with_imatrix = false;
    int threads = 1;
    for (int i = 5; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--imatrix") with_imatrix = true;
        else if (a == "--threads" && i + 1 < argc) threads = (int) parse_int(argv[++i], "--threads", 1, 1024);
        else throw Error(usage_text);
    }
    llama_log_set(log_cb, nullptr);
    llama_backend_init();
    llama_model_quantize_params params = llama_model_quantize_default_params();
    params.nthread = threads;
    params.ftype = (llama_ftype) parse_int(argv[4], "FTYPE", 0, 1000);
    std::vector<std::string> names;
    std::vector<std::vector<float>> values;
    std::vector<llama_model_imatrix_data> imatrix;
    if (with_imatrix) {
        ggml_context * meta = nullptr;
        gguf_init_params gp = {true, &meta};
        gguf_context * g = gguf_init_from_file(in.c_str(), gp);
        if (!g) throw Error("cannot read " + in);
        for (int64_t i = 0; i < gguf_get_n_tensors(g); ++i) {
            const ggml_tensor * t = ggml_get_tensor(meta, gguf_get_tensor_name(g, i));
            if (!t || ggml_n_dims(t) < 2) continue;
            const int64_t n = t->ne[0] * t->ne[2];  // one row of weights per expert
            std::vector<float> v((size_t) n);
            for (int64_t j = 0; j < n; ++j) v[(size_t) j] = 0.5f + (float) ((j * 37) % 101) / 101.f;
            names.emplace_back(t->name);
            values.push_back(std::move(v));
        }
        gguf_free(g);
        ggml_free(meta);
        for (size_t i = 0; i < names.size(); ++i) imatrix.push_back({names[i].c_str(), values[i].data(), values[i].size()});
        imatrix.push_back({nullptr, nullptr, 0});
        params.imatrix = imatrix.data();
    }
    const uint32_t rc = llama_model_quantize(in.c_str(), out.c_str(), &params);
    llama_backend_free();
    if (rc != 0) throw Error("llama_model_quantize failed (" + std::to_string(rc) + ")");
    return 0;
}

}  // namespace

int main(int argc, char ** argv) {
    try {
        if (argc >= 2 && std::string(argv[1]) == "--quantize") return run_quantize(argc, argv);
        Options o = parse_args(argc, argv);
        if (o.version) {
            llama_log_set(log_cb, nullptr);
            return run_version();
        }
        return run(o);
    } catch (const std::exception & e) {
        std::fflush(stdout);
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
