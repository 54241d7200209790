// moe-bench: decode/prefill speed of moe_infer.h against the machine's own read bandwidth, and a
// writer of random-weight GGUFs with the shapes of real MoE models (which llama.cpp loads too).
//
//   moe-bench -m FILE [-t N] [-p 64] [-n 32] [-r 3] [--json] [--isa scalar|avx2|avx512|avx512_vnni]
//   moe-bench --synthetic SHAPE --quant TYPE -o FILE [--layers N] [--seed N] [--pure] [-t N]
//
// Benchmark: measures the read bandwidth with N threads (membw.h), loads the model (mmap), reads
// every weight once (so the timed runs do not include page-ins), runs one untimed warm-up, then r
// repetitions of: reset the KV cache, prefill p random token ids (fixed seed) as one eval, decode n
// tokens one eval at a time (greedy argmax of the logits). Prints the median prefill and decode
// tok/s, the active bytes per token (ModelInfo::active_bytes_per_token), the achieved bandwidth
// decode tok/s x active bytes, and that as % of the measured bandwidth. --json: one JSON object.
//
// Synthetic models: see kUsage and bench/README.md (shapes, quant mixtures, tokenizer).
// Only the public API of moe_infer.h is used.
#include "moe_infer.h"
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include "membw.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>
#endif

namespace {

const char* kUsage =
    "usage:\n"
    "  moe-bench -m FILE [options]                      benchmark a GGUF model\n"
    "  moe-bench --synthetic SHAPE --quant TYPE -o FILE  write a random-weight GGUF\n"
    "\n"
    "benchmark options:\n"
    "  -t N            threads (default: all cores, at most 16)\n"
    "  -p N            prompt tokens per prefill (default 64; 0 = no prefill timing)\n"
    "  -n N            tokens decoded one at a time (default 32)\n"
    "  -r N            repetitions; medians are reported (default 3)\n"
    "  --json          print one JSON object instead of the table\n"
    "  --isa ISA       force the kernels: scalar, avx2, avx512, avx512_vnni, neon, neon_dotprod\n"
    "  --amx           prefill panels on the AMX tile unit where the CPU has one (moe::set_amx; slower today)\n"
    "  --profile       also print where decode time goes, per forward-pass phase\n"
    "  --prefetch B    SessionOptions::prefetch_distance (bytes; -1 default, 0 off)\n"
    "  --gemm-min N    SessionOptions::gemm_min_tokens (0 default, -1 = row kernels only)\n"
    "  --bw GBS        skip the bandwidth measurement and use GBS (GB/s) instead\n"
    "  --bw-mib N      buffer of the bandwidth measurement (default max(1 GiB, 4 x LLC))\n"
    "  --no-prefault   do not read the weights once before the timed runs\n"
    "  --seed N        seed of the random prompt (default 1234)\n"
    "  --mem-budget SIZE  expert store with this memory budget (e.g. 8G; implies --no-prefault)\n"
    "  --predict N     predict experts N layers ahead (and prefetch them with --mem-budget)\n"
    "  --io-threads N  expert-store read threads (default 4)\n"
    "  --expert-reads M  direct (default: O_DIRECT where possible), buffered (page cache) or mapped\n"
    "                  (experts used in place in the file mapping, loaded with madvise)\n"
    "  --buffered-io   the same as --expert-reads buffered\n"
    "  --drop-cache    posix_fadvise(DONTNEED) on the model file before loading (cold page cache)\n"
    "  --huge-pages M  LoadOptions::huge_pages: automatic (default), map or off\n"
    "  --no-repack     LoadOptions::repack off: Q4_0/Q4_K/Q6_K matrices stay rows (no 16-row tiles)\n"
    "  --random-decode decode inputs are random ids (seeded, as llama_bench_peer) instead of the\n"
    "                  argmax: random-weight models repeat one token greedily, which hides routing\n"
    "  --batch LIST    also batched decode (Session::eval_batch) of B sequences for each B in LIST\n"
    "                  (e.g. 1,2,4,8,16): each its own random p-token prompt, then n steps of one token\n"
    "                  per sequence; aggregate and per-sequence tok/s, medians of -r repetitions\n"
    "\n"
    "synthetic model options:\n"
    "  --synthetic S   qwen3-30b-a3b | olmoe-1b-7b | mixtral-8x7b | gpt-oss-20b | glm-4.5-air |\n"
    "                  deepseek-v2-lite | lfm2-8b-a1b | qwen3.5-35b-a3b\n"
    "  --quant T       q4_0 | q8_0 | q4_k_m | q4_k | q6_k | f16 | q2_k | q3_k | iq4_xs | q3_k_m | iq3_xxs |\n"
    "                  mxfp4 | nvfp4 | tq3 | tq4 | affine3 | affine4 (g64)\n"
    "                  (q4_k_m, q3_k_m, iq3_xxs: llama-quantize's type mixes; iq3_xxs as random grid codes)\n"
    "                  (gpt-oss-20b mxfp4: MXFP4 experts, Q8_0 elsewhere, like the real file; rows that T's\n"
    "                  blocks do not tile (2880, 1408, 10944) fall back as llama-quantize's: Q4_K -> Q5_0, ...)\n"
    "  -o FILE         output path\n"
    "  --layers N      keep only the first N layers (quick tests; glm-4.5-air keeps its NextN block;\n"
    "                  lfm2-8b-a1b: layers 0, 1 short-conv, 2 attention, 3-5 short-conv, ...;\n"
    "                  qwen3.5-35b-a3b: layers 0-2 delta-net, 3 attention, 4-6 delta-net, ...)\n"
    "  --pure          every matrix in T (default: the output matrix is Q6_K for 4-bit T)\n"
    "  --seed N        seed of the weights (default 1234)\n"
    "  -t N            generator threads (default: all cores)\n";

int fail(const std::string& msg) {
    std::fprintf(stderr, "error: %s\n", msg.c_str());
    return 1;
}

bool parse_i64(const char* s, long long lo, long long hi, long long* out) {
    if (!s || !*s) return false;
    char* end = nullptr;
    errno = 0;
    long long v = std::strtoll(s, &end, 10);
    if (errno || *end || v < lo || v > hi) return false;
    *out = v;
    return true;
}

bool parse_f64(const char* s, double lo, double hi, double* out) {
    if (!s || !*s) return false;
    char* end = nullptr;
    errno = 0;
    double v = std::strtod(s, &end);
    if (errno || *end || !(v >= lo && v <= hi)) return false;
    *out = v;
    return true;
}

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// splitmix64: small, fast, good enough for random weights and prompts.
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return (double)(next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
    float uniform(float lo, float hi) { return lo + (hi - lo) * (float)uniform(); }
};

uint64_t mix_seed(uint64_t a, uint64_t b, uint64_t c) {
    Rng r(a * 0x100000001B3ull ^ (b + 0x632BE59BD9B4E019ull) * 0x9E3779B97F4A7C15ull ^ c * 0xD6E8FEB86659FD93ull);
    r.next();
    return r.next();
}

// f32 -> IEEE fp16, rounding to nearest even, for |x| < 65504. Below 2^-14 the result is a
// subnormal (zero below 2^-25): scale_blocks' 1/16 output projections take the scales of Q8_0,
// K-quant, IQ and TQ blocks there (Q8_0's d of 2e-4 becomes 1.25e-5).
uint16_t to_fp16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    int32_t e = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t m = x & 0x7fffffu;
    if (e <= 0) {  // subnormal: h units of 2^-24
        if (e < -10) return (uint16_t)sign;
        const uint32_t full = m | 0x800000u;
        const int shift = 14 - e;
        uint32_t h = full >> shift;
        const uint32_t rest = full & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (h & 1))) ++h;  // may carry into the smallest normal: still right
        return (uint16_t)(sign | h);
    }
    uint32_t h = (uint32_t)(e << 10) | (m >> 13);
    uint32_t rest = m & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1))) ++h;  // round to nearest even
    return (uint16_t)(sign | h);
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

double median(std::vector<double> v) {
    if (v.empty()) return 0;
    std::sort(v.begin(), v.end());
    size_t n = v.size();
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

std::string fmt_bytes(double b) {
    char buf[64];
    if (b >= 1e9) std::snprintf(buf, sizeof buf, "%.2f GB", b / 1e9);
    else if (b >= 1e6) std::snprintf(buf, sizeof buf, "%.1f MB", b / 1e6);
    else std::snprintf(buf, sizeof buf, "%.0f B", b);
    return buf;
}

int default_threads() {
    unsigned hc = std::thread::hardware_concurrency();
    return (int)std::min(16u, std::max(1u, hc));
}

//=================================================================================================
// Synthetic models
//=================================================================================================

enum class Tok { gpt2_qwen2, gpt2_olmo, gpt2_oss, gpt2_glm, gpt2_deepseek, gpt2_lfm2, gpt2_qwen35, spm };
enum class QkNorm { none, per_head, whole };

struct Shape {
    const char* name;
    const char* arch;
    const char* display;  // general.name
    int n_embd, n_layer, n_head, n_head_kv, head_dim;
    int n_expert, n_used, n_ff_exp;
    int n_ff_dense;        // feed_forward_length: qwen3moe's informational dense size, glm4moe's dense
                           // layers' width, gpt-oss's (unread) intermediate size; 0 = not written
    bool ff_in_expert_key; // the expert size is in expert_feed_forward_length (qwen3moe, gpt-oss, glm4moe,
                           // deepseek2, lfm2moe, qwen35moe)
    int n_vocab, n_ctx;
    float rope_base, eps;
    QkNorm qk;
    bool write_key_length;
    Tok tok;
    // gpt-oss and glm4moe (0 = none / key not written)
    int n_swa = 0;              // attention.sliding_window; no pattern key: llama.cpp's gpt-oss default,
                                // the even layers slide
    float yarn_factor = 0.f;    // rope.scaling.type yarn, .factor, .original_context_length
    int yarn_orig_ctx = 0;
    int n_rot = 0;              // rope.dimension_count < head_dim (partial rotary)
    int n_dense_lead = 0;       // leading_dense_block_count: FFN of width n_ff_dense, no experts
    int n_shared = 0;           // expert_shared_count: one ungated shared expert of width n_shared x n_ff_exp
    int n_nextn = 0;            // nextn_predict_layers: NextN blocks after the trunk (block_count counts them)
    float routed_scale = 0.f;   // expert_weights_scale (glm4moe also writes sigmoid gating and weight norm)
    bool mxfp4_experts = false; // the real file: MXFP4 expert stacks, Q8_0 for the other matrices
    // deepseek2 and lfm2moe
    int gating_func = 0;        // expert_gating_func (1 softmax, 2 sigmoid); 0 = not written
    int kv_lora = 0, qk_nope = 0, v_head = 0;  // deepseek2 MLA (no q LoRA): head_dim = qk_nope + n_rot
    float yarn_log_mul = 0.f;   // rope.scaling.yarn_log_multiplier (the converter's 0.1 x mscale_all_dim)
    const char* layer_kinds = nullptr;  // lfm2moe: per layer 'a' attention, 'c' short convolution
    int l_cache = 0;            // lfm2moe: shortconv.l_cache, the convolution width
    bool tied = false;          // no output.weight: the logits come from token_embd
    // qwen35moe: gated delta-net layers, every full_attn_interval-th layer full attention (il + 1
    // divisible by it), whose attn_q also holds a per-head output gate
    int full_attn_interval = 0;
    int ssm_conv = 0;           // ssm.conv_kernel: causal convolution width over q, k, v channels
    int ssm_state = 0;          // ssm.state_size: head dim of the delta-net q, k and v heads
    int ssm_k_heads = 0;        // ssm.group_count: q/k heads
    int ssm_v_heads = 0;        // ssm.time_step_rank: v heads (and gates)
    int rope_sections[4] = {0, 0, 0, 0};  // rope.dimension_sections (IMROPE), written when any is set
    // whether layer il is a gated delta-net layer (qwen35moe)
    bool recurrent(int il) const { return full_attn_interval > 0 && (il + 1) % full_attn_interval != 0; }
};

// Hyper-parameters from the models' config.json (Qwen/Qwen3-30B-A3B, allenai/OLMoE-1B-7B-0924,
// mistralai/Mixtral-8x7B-v0.1, openai/gpt-oss-20b, zai-org/GLM-4.5-Air) and /work/shared/formats.md 1.5;
// the keys as llama.cpp's converter writes them (tests/random_model.h has the full list per arch).
// gpt-oss-20b: attention q/k/v/o biases and per-head sinks, router bias, expert gate/up/down
// biases, post_attention_norm; rope base 150000 with YaRN x32 over 4096 original positions.
// GLM-4.5-Air: 46 layers + 1 NextN block, q/k/v biases, no q/k norm, half the head rotated, layer 0
// dense (10944), sigmoid routing with a selection bias (exp_probs_b), top-8 renormalised, scale 1.
// DeepSeek-V2-Lite (deepseek-ai/DeepSeek-V2-Lite): multi-head latent attention without q LoRA
// (attn_q {2048, 16 x 192}), kv_lora_rank 512, qk_nope 128 + qk_rope 64, v_head 128, written in
// today's converter's split form (attn_k_b {128, 512, 16}, attn_v_b {512, 128, 16}, the *_mla keys,
// head_count_kv 1); layer 0 dense (10944), then 64 routed experts top-6 (1408) + 2 shared
// (2816), softmax scores, no renormalisation, scale 1, no expert groups; YaRN x40 over 4096 with
// mscale_all_dim 0.707 (yarn_log_multiplier 0.0707); rope base 1e4, eps 1e-6, vocab 102400.
Shape deepseek_v2_lite() {
    Shape s{"deepseek-v2-lite", "deepseek2", "DeepSeek-V2-Lite (synthetic)", 2048, 27, 16, 1, 192, 64, 6, 1408, 10944, true, 102400, 163840,
            1e4f, 1e-6f, QkNorm::none, false, Tok::gpt2_deepseek};
    s.yarn_factor = 40.f;
    s.yarn_orig_ctx = 4096;
    s.n_rot = 64;
    s.n_dense_lead = 1;
    s.n_shared = 2;
    s.routed_scale = 1.f;
    s.gating_func = 1;
    s.kv_lora = 512;
    s.qk_nope = 128;
    s.v_head = 128;
    s.yarn_log_mul = 0.1f * 0.707f;
    return s;
}

// LFM2-8B-A1B (LiquidAI/LFM2-8B-A1B): 24 layers, attention (GQA 32/8 x 64, per-head q/k RMSNorm)
// at layer_types' "full_attention" layers 2, 6, 10, 14, 18, 21, gated short convolutions (width 3)
// elsewhere; layers 0-1 dense (7168), then 32 experts top-4 (1792) with sigmoid scores, a
// selection bias and renormalised weights; tied embeddings (the final norm is token_embd_norm);
// rope base 1e6, eps 1e-5, vocab 65536, ctx 128000.
Shape lfm2_8b_a1b() {
    Shape s{"lfm2-8b-a1b", "lfm2moe", "LFM2-8B-A1B (synthetic)", 2048, 24, 32, 8, 64, 32, 4, 1792, 7168, true, 65536, 128000,
            1e6f, 1e-5f, QkNorm::per_head, false, Tok::gpt2_lfm2};
    s.n_dense_lead = 2;
    s.gating_func = 2;
    s.layer_kinds = "ccacccacccacccacccaccacc";
    s.l_cache = 3;
    s.tied = true;
    return s;
}

// Qwen3.5-35B-A3B (Qwen/Qwen3.5-35B-A3B, text_config): 40 layers, gated delta-net (linear attention:
// 16 q/k heads, 32 v heads, head dim 128, conv kernel 4) except every 4th layer (3, 7, ..., 39),
// which is gated full attention (GQA 16/2 x 256, per-head q/k RMSNorm, attn_q {2048, 2 x 16 x 256}:
// each head's query rows then its sigmoid gate rows), partial rotary 0.25 (64 of 256 dims) with
// IMROPE sections [11, 11, 10, 0], rope base 1e7; every layer MoE: 256 experts top-8 (512), softmax,
// renormalised, plus one shared expert (512) gated by sigmoid(ffn_gate_inp_shexp . x); untied
// output, eps 1e-6, vocab 248320, ctx 262144. The real file also has an MTP block (block_count 41,
// nextn_predict_layers 1) and an attention.recurrent_layers array; both are left out here.
Shape qwen35_35b_a3b() {
    Shape s{"qwen3.5-35b-a3b", "qwen35moe", "Qwen3.5-35B-A3B (synthetic)", 2048, 40, 16, 2, 256, 256, 8, 512, 0, true, 248320, 262144,
            1e7f, 1e-6f, QkNorm::per_head, true, Tok::gpt2_qwen35};
    s.n_rot = 64;
    s.n_shared = 1;
    s.full_attn_interval = 4;
    s.ssm_conv = 4;
    s.ssm_state = 128;
    s.ssm_k_heads = 16;
    s.ssm_v_heads = 32;
    s.rope_sections[0] = 11;
    s.rope_sections[1] = 11;
    s.rope_sections[2] = 10;
    return s;
}

const Shape kShapes[] = {
    {"qwen3-30b-a3b", "qwen3moe", "Qwen3-30B-A3B (synthetic)", 2048, 48, 32, 4, 128, 128, 8, 768, 6144, true, 151936, 40960,
     1e6f, 1e-6f, QkNorm::per_head, true, Tok::gpt2_qwen2},
    {"olmoe-1b-7b", "olmoe", "OLMoE-1B-7B (synthetic)", 2048, 16, 16, 16, 128, 64, 8, 1024, 0, false, 50304, 4096, 1e4f, 1e-5f,
     QkNorm::whole, false, Tok::gpt2_olmo},
    {"mixtral-8x7b", "llama", "Mixtral-8x7B (synthetic)", 4096, 32, 32, 8, 128, 8, 2, 14336, 0, false, 32000, 32768, 1e6f, 1e-5f,
     QkNorm::none, false, Tok::spm},
    {"gpt-oss-20b", "gpt-oss", "gpt-oss-20b (synthetic)", 2880, 24, 64, 8, 64, 32, 4, 2880, 2880, true, 201088, 131072, 150000.f, 1e-5f,
     QkNorm::none, true, Tok::gpt2_oss, /*n_swa*/ 128, /*yarn*/ 32.f, 4096, /*n_rot*/ 0, 0, 0, 0, 0.f, /*mxfp4_experts*/ true},
    {"glm-4.5-air", "glm4moe", "GLM-4.5-Air (synthetic)", 4096, 46, 96, 8, 128, 128, 8, 1408, 10944, true, 151552, 131072, 1e6f, 1e-5f,
     QkNorm::none, true, Tok::gpt2_glm, /*n_swa*/ 0, /*yarn*/ 0.f, 0, /*n_rot*/ 64, /*dense*/ 1, /*shared*/ 1, /*nextn*/ 1, /*scale*/ 1.f},
    deepseek_v2_lite(),
    lfm2_8b_a1b(),
    qwen35_35b_a3b(),
};

const Shape* find_shape(const std::string& name) {
    for (const Shape& s : kShapes)
        if (name == s.name) return &s;
    return nullptr;
}

enum class Fill { weights, norm, router, bias, embedding, output_proj, conv, dt_bias, ssm_a };

struct TensorSpec {
    std::string name;
    moe::TensorType type;
    uint32_t n_dims;
    int64_t ne[3];
    Fill fill;
    uint64_t bytes;
    bool expert;
    bool unused;       // a NextN block's tensor: loaded, never run
    bool fell_back;    // ne[0] is not a multiple of the planned type's block (see fallback_type)
};

uint64_t tensor_bytes(moe::TensorType t, const int64_t* ne, uint32_t n_dims) {
    uint64_t n = 1;
    for (uint32_t d = 0; d < n_dims; ++d) n *= (uint64_t)ne[d];
    return n / (uint64_t)moe::tensor_type_block_elems(t) * (uint64_t)moe::tensor_type_block_bytes(t);
}

// llama-quantize's Q4_K_M spends 6 bits on attn_v and ffn_down in "more bits" layers: the first and
// last eighth of the layers and every third layer in between (our rendering of that rule).
bool more_bits_layer(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

// llama-quantize's mixtures as it applies them to an MoE model with GQA >= 4 and more than 8
// experts (llama-quant.cpp of llama.cpp 0.5.0, read, not copied): which tensors get other types.
// mxfp4_moe: llama-quantize's MXFP4_MOE (MXFP4 for 3-D expert stacks, Q8_0 for the other
// matrices), which is how the real gpt-oss files are laid out.
enum class Mix { none, q4_k_m, q3_k_m, iq3_xxs, mxfp4_moe };

struct QuantPlan {
    std::string label;     // what was asked
    moe::TensorType base;  // most matrices
    uint32_t file_type;    // general.file_type (llama_ftype)
    Mix mix;
};

bool make_plan(const std::string& q, QuantPlan* p) {
    using T = moe::TensorType;
    p->label = q;
    p->mix = Mix::none;
    if (q == "q4_0") { p->base = T::q4_0; p->file_type = 2; }
    else if (q == "q8_0") { p->base = T::q8_0; p->file_type = 7; }
    else if (q == "q4_k_m") { p->base = T::q4_k; p->file_type = 15; p->mix = Mix::q4_k_m; }
    else if (q == "q3_k_m") { p->base = T::q3_k; p->file_type = 12; p->mix = Mix::q3_k_m; }
    else if (q == "iq3_xxs") { p->base = T::iq3_xxs; p->file_type = 23; p->mix = Mix::iq3_xxs; }
    else if (q == "q4_k") { p->base = T::q4_k; p->file_type = 14; }
    else if (q == "q6_k") { p->base = T::q6_k; p->file_type = 18; }
    else if (q == "f16") { p->base = T::f16; p->file_type = 1; }
    else if (q == "q2_k") { p->base = T::q2_k; p->file_type = 10; }
    else if (q == "q3_k") { p->base = T::q3_k; p->file_type = 11; }
    else if (q == "iq4_xs") { p->base = T::iq4_xs; p->file_type = 30; }
    // The seed formats: every matrix in the type (general.file_type: MXFP4_MOE / NVFP4 as
    // llama.cpp numbers them; ours have no llama_ftype, ALL_F32 = 0 is written as a placeholder).
    else if (q == "mxfp4") { p->base = T::mxfp4; p->file_type = 38; }
    else if (q == "nvfp4") { p->base = T::nvfp4; p->file_type = 39; }
    else if (q == "tq3") { p->base = T::tq3; p->file_type = 0; }
    else if (q == "tq4") { p->base = T::tq4; p->file_type = 0; }
    else if (q == "affine3") { p->base = T::affine3_g64; p->file_type = 0; }
    else if (q == "affine4") { p->base = T::affine4_g64; p->file_type = 0; }
    else return false;
    return true;
}

// A row length (ne[0]) that is not a multiple of the type's block: llama-quantize's fallback
// (tensor_type_fallback of llama.cpp 0.5.0, read, not copied) for ggml's types: Q2_K/Q3_K -> Q4_0,
// Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, the 256-element IQ types -> IQ4_NL. moe_infer's own
// types (TQ3/TQ4 blocks of 128) follow moe-quantize: Q8_0. F16 when even that does not tile.
// The output matrix gets Q8_0 (llama-quantize's output rule). gpt-oss-20b (2880), GLM-4.5-Air
// (1408, 10944) and DeepSeek-V2-Lite (1408, 10944, attn_k_b's 128) have such rows; the others do not.
moe::TensorType fallback_type(moe::TensorType t, int64_t ne0, bool output) {
    using T = moe::TensorType;
    if (ne0 % moe::tensor_type_block_elems(t) == 0) return t;
    T f = T::q8_0;
    if (!output) {
        switch (t) {
            case T::q2_k: case T::q3_k: f = T::q4_0; break;
            case T::q4_k: f = T::q5_0; break;
            case T::q5_k: f = T::q5_1; break;
            case T::iq4_xs: case T::iq3_xxs: case T::iq3_s: f = T::iq4_nl; break;
            default: f = T::q8_0; break;
        }
    }
    return ne0 % moe::tensor_type_block_elems(f) == 0 ? f : T::f16;
}

// Tensors in file order: token_embd, the trunk blocks, the NextN blocks (glm4moe), output_norm
// (lfm2moe: token_embd_norm), output (none with tied embeddings). Names and shapes as llama.cpp
// reads them (ggml order: ne[0] is the input dimension).
std::vector<TensorSpec> plan_tensors(const Shape& s, int n_layer, const QuantPlan& q, bool pure) {
    using T = moe::TensorType;
    std::vector<TensorSpec> v;
    auto add = [&](const std::string& name, T type, std::initializer_list<int64_t> ne, Fill fill) {
        TensorSpec t;
        t.name = name;
        t.n_dims = (uint32_t)ne.size();
        int i = 0;
        for (int64_t x : ne) t.ne[i++] = x;
        for (; i < 3; ++i) t.ne[i] = 1;
        t.type = fallback_type(type, t.ne[0], name == "output.weight" || (s.tied && name == "token_embd.weight"));
        t.fell_back = t.type != type;
        t.fill = fill;
        t.bytes = tensor_bytes(t.type, t.ne, t.n_dims);
        t.expert = name.find("_exps.") != std::string::npos;
        unsigned block = 0;
        t.unused = std::sscanf(name.c_str(), "blk.%u.", &block) == 1 && (int)block >= n_layer;
        v.push_back(t);
    };
    const std::string arch = s.arch;
    const bool oss = arch == "gpt-oss", glm = arch == "glm4moe", ds2 = arch == "deepseek2", lfm = arch == "lfm2moe";
    const bool q35 = arch == "qwen35moe";
    const T base = q.mix == Mix::mxfp4_moe ? T::q8_0 : q.base;     // matrices outside the expert stacks
    const T exp_base = q.mix == Mix::mxfp4_moe ? T::mxfp4 : base;  // the expert stacks
    const bool four_bit = base == T::q4_0 || base == T::q4_k;
    const bool k_mix = q.mix == Mix::q4_k_m;
    const bool ggml_mix = q.mix == Mix::q4_k_m || q.mix == Mix::q3_k_m || q.mix == Mix::iq3_xxs;
    const T out_type = q.mix == Mix::iq3_xxs ? T::q5_k : ggml_mix ? T::q6_k : (four_bit && !pure ? T::q6_k : base);
    const int64_t E = s.n_embd, H = (int64_t)s.n_head * s.head_dim, KV = (int64_t)s.n_head_kv * s.head_dim, F = s.n_ff_exp;
    const int64_t V = s.n_vocab, X = s.n_expert, FD = s.n_ff_dense, FS = (int64_t)s.n_shared * s.n_ff_exp;

    // Tied embeddings: llama-quantize gives token_embd the output matrix's type.
    add("token_embd.weight", s.tied ? out_type : q.mix == Mix::iq3_xxs ? T::iq3_s : base, {E, V}, Fill::embedding);
    for (int il = 0; il < n_layer + s.n_nextn; ++il) {
        const std::string b = "blk." + std::to_string(il) + ".";
        const bool more = k_mix && more_bits_layer(il, n_layer);
        // Q3_K_M: attn_v Q5_K in the first two layers, else Q4_K; ffn_down Q5_K in the first
        // sixteenth, else Q4_K; attn_output Q4_K. IQ3_XXS: attn_v Q4_K, attn_output IQ3_S.
        const T v_type = more ? T::q6_k : q.mix == Mix::q3_k_m ? (il < 2 ? T::q5_k : T::q4_k) : q.mix == Mix::iq3_xxs ? T::q4_k : base;
        const T o_type = q.mix == Mix::q3_k_m ? T::q4_k : q.mix == Mix::iq3_xxs ? T::iq3_s : base;
        const T down_dense = more ? T::q6_k : q.mix == Mix::q3_k_m ? (il < n_layer / 16 ? T::q5_k : T::q4_k) : base;
        const T down_type = q.mix == Mix::mxfp4_moe ? exp_base : down_dense;
        add(b + "attn_norm.weight", T::f32, {E}, Fill::norm);
        if (lfm && s.layer_kinds[il] == 'c') {  // short convolution: in_proj -> b, c, x; out_proj(c * conv(b * x))
            add(b + "shortconv.conv.weight", T::f32, {s.l_cache, E}, Fill::conv);
            add(b + "shortconv.in_proj.weight", base, {E, 3 * E}, Fill::weights);
            add(b + "shortconv.out_proj.weight", base, {E, E}, Fill::output_proj);
        } else if (q35 && s.recurrent(il)) {
            // gated delta-net: attn_qkv -> q, k, v channels (causal conv over time); attn_gate -> z;
            // beta = sigmoid(ssm_beta x), decay exp(ssm_a softplus(ssm_alpha x + dt bias)); the
            // output is RMS-normed per v head (ssm_norm), times silu(z), then ssm_out. llama-quantize
            // counts attn_qkv as an attn_v-like tensor (one per layer, as attn_v in attention layers);
            // ssm_out, attn_gate, ssm_alpha, ssm_beta are plain matrices; 1-D tensors and ssm_conv1d stay F32.
            const int64_t DS = s.ssm_state, HK = s.ssm_k_heads, HV = s.ssm_v_heads, CH = 2 * HK * DS + HV * DS;
            add(b + "attn_qkv.weight", v_type, {E, CH}, Fill::weights);
            add(b + "attn_gate.weight", base, {E, HV * DS}, Fill::weights);
            add(b + "ssm_conv1d.weight", T::f32, {s.ssm_conv, CH}, Fill::conv);
            add(b + "ssm_dt.bias", T::f32, {HV}, Fill::dt_bias);
            add(b + "ssm_a", T::f32, {HV}, Fill::ssm_a);
            add(b + "ssm_beta.weight", base, {E, HV}, Fill::weights);
            add(b + "ssm_alpha.weight", base, {E, HV}, Fill::weights);
            add(b + "ssm_norm.weight", T::f32, {DS}, Fill::norm);
            add(b + "ssm_out.weight", base, {HV * DS, E}, Fill::output_proj);
        } else if (ds2) {  // MLA: q; latent + shared rope key; k_b / v_b per head (the split kv_b)
            const int64_t R = s.n_rot, KVL = s.kv_lora, NH = s.n_head;
            add(b + "attn_q.weight", base, {E, H}, Fill::weights);
            add(b + "attn_kv_a_mqa.weight", base, {E, KVL + R}, Fill::weights);
            add(b + "attn_kv_a_norm.weight", T::f32, {KVL}, Fill::norm);
            add(b + "attn_k_b.weight", base, {s.qk_nope, KVL, NH}, Fill::weights);
            add(b + "attn_v_b.weight", base, {KVL, s.v_head, NH}, Fill::weights);
            add(b + "attn_output.weight", o_type, {NH * s.v_head, E}, Fill::output_proj);
        } else {
            add(b + "attn_q.weight", base, {E, q35 ? 2 * H : H}, Fill::weights);  // qwen35moe: per head [query, gate]
            if (oss || glm) add(b + "attn_q.bias", T::f32, {H}, Fill::bias);
            add(b + "attn_k.weight", base, {E, KV}, Fill::weights);
            if (oss || glm) add(b + "attn_k.bias", T::f32, {KV}, Fill::bias);
            add(b + "attn_v.weight", v_type, {E, KV}, Fill::weights);
            if (oss || glm) add(b + "attn_v.bias", T::f32, {KV}, Fill::bias);
            add(b + "attn_output.weight", o_type, {H, E}, Fill::output_proj);
            if (oss) {
                add(b + "attn_output.bias", T::f32, {E}, Fill::bias);
                add(b + "attn_sinks.weight", T::f32, {s.n_head}, Fill::bias);
            }
            if (s.qk == QkNorm::per_head) {
                add(b + "attn_q_norm.weight", T::f32, {s.head_dim}, Fill::norm);
                add(b + "attn_k_norm.weight", T::f32, {s.head_dim}, Fill::norm);
            } else if (s.qk == QkNorm::whole) {
                add(b + "attn_q_norm.weight", T::f32, {H}, Fill::norm);
                add(b + "attn_k_norm.weight", T::f32, {KV}, Fill::norm);
            }
        }
        add(b + (oss || glm || q35 ? "post_attention_norm.weight" : "ffn_norm.weight"), T::f32, {E}, Fill::norm);
        if (il < s.n_dense_lead) {  // glm4moe's, deepseek2's, lfm2moe's leading dense layers (never a NextN block)
            add(b + "ffn_gate.weight", base, {E, FD}, Fill::weights);
            add(b + "ffn_up.weight", base, {E, FD}, Fill::weights);
            add(b + "ffn_down.weight", down_dense, {FD, E}, Fill::output_proj);
        } else {
            add(b + "ffn_gate_inp.weight", T::f32, {E, X}, Fill::router);
            if (oss) add(b + "ffn_gate_inp.bias", T::f32, {X}, Fill::bias);
            if (glm || lfm) add(b + "exp_probs_b.bias", T::f32, {X}, Fill::bias);  // sigmoid scores' selection bias
            add(b + "ffn_gate_exps.weight", exp_base, {E, F, X}, Fill::weights);
            if (oss) add(b + "ffn_gate_exps.bias", T::f32, {F, X}, Fill::bias);
            add(b + "ffn_up_exps.weight", exp_base, {E, F, X}, Fill::weights);
            if (oss) add(b + "ffn_up_exps.bias", T::f32, {F, X}, Fill::bias);
            add(b + "ffn_down_exps.weight", down_type, {F, E, X}, Fill::output_proj);
            if (oss) add(b + "ffn_down_exps.bias", T::f32, {E, X}, Fill::bias);
            if (q35) add(b + "ffn_gate_inp_shexp.weight", T::f32, {E}, Fill::router);  // the shared expert's sigmoid gate
            if (FS > 0) {
                add(b + "ffn_gate_shexp.weight", base, {E, FS}, Fill::weights);
                add(b + "ffn_up_shexp.weight", base, {E, FS}, Fill::weights);
                add(b + "ffn_down_shexp.weight", down_dense, {FS, E}, Fill::output_proj);
            }
        }
        if (il >= n_layer) {  // NextN/MTP block: what GLM-4.5's converted files hold besides a MoE block
            add(b + "nextn.eh_proj.weight", base, {2 * E, E}, Fill::weights);
            add(b + "nextn.enorm.weight", T::f32, {E}, Fill::norm);
            add(b + "nextn.hnorm.weight", T::f32, {E}, Fill::norm);
            add(b + "nextn.shared_head_norm.weight", T::f32, {E}, Fill::norm);
        }
    }
    add(lfm ? "token_embd_norm.weight" : "output_norm.weight", T::f32, {E}, Fill::norm);
    if (!s.tied) add("output.weight", out_type, {E, V}, Fill::weights);
    return v;
}

// ---- random block bytes: finite fp16 scales, values |w| <~ 0.12, no NaN/Inf ---------------------

// Nibble 0 (w = -8 d) becomes 8 (w = 0): values symmetric in [-7, 7] d with mean 0. With uniform
// nibbles the mean is -d/2, every matmul output gets a common offset, and routing collapses onto the
// same experts for every token.
void gen_q4_0(uint8_t* p, size_t nb, Rng& r) {  // 18 B: d, 16 B of nibbles; |w| <= 7 d
    for (size_t b = 0; b < nb; ++b, p += 18) {
        uint16_t d = to_fp16(r.uniform(0.002f, 0.012f));
        std::memcpy(p, &d, 2);
        uint64_t a = r.next(), c = r.next();
        std::memcpy(p + 2, &a, 8);
        std::memcpy(p + 10, &c, 8);
        for (int j = 2; j < 18; ++j) {
            if ((p[j] & 0x0f) == 0) p[j] |= 0x08;
            if ((p[j] & 0xf0) == 0) p[j] |= 0x80;
        }
    }
}

void gen_q8_0(uint8_t* p, size_t nb, Rng& r) {  // 34 B: d, 32 x int8 in [-127, 127]; |w| <= 127 d
    for (size_t b = 0; b < nb; ++b, p += 34) {
        uint16_t d = to_fp16(r.uniform(2e-4f, 8e-4f));
        std::memcpy(p, &d, 2);
        for (int k = 0; k < 4; ++k) {
            uint64_t a = r.next();
            std::memcpy(p + 2 + 8 * k, &a, 8);
        }
        for (int j = 0; j < 32; ++j)
            if (p[2 + j] == 0x80) p[2 + j] = 0x81;  // -128 -> -127
    }
}

// bb random bytes (a block's codes; its scales are set afterwards).
void random_bytes(uint8_t* p, int bb, Rng& r) {
    for (int k = 0; k + 8 <= bb; k += 8) {
        uint64_t a = r.next();
        std::memcpy(p + k, &a, 8);
    }
    for (int k = bb / 8 * 8; k < bb; ++k) p[k] = (uint8_t)r.next();
}

// Q5_0 (22 B: d, 4 B of fifth bits, 16 B of nibbles; w = d (q - 16)): q = 0 becomes 16 (w = 0), so
// values are symmetric in [-15, 15] d, as for Q4_0. Q5_1 (24 B: d, m, then the same; w = d q + m):
// m = -15.5 d centres each block on zero. Only written where Q4_K / Q5_K rows fall back (see
// fallback_type).
void gen_q5(uint8_t* p, size_t nb, Rng& r, bool one) {
    const size_t bb = one ? 24 : 22, q0 = one ? 4 : 2;
    for (size_t b = 0; b < nb; ++b, p += bb) {
        const float d = r.uniform(0.001f, 0.006f);
        const uint16_t hd = to_fp16(d);
        std::memcpy(p, &hd, 2);
        if (one) {
            const uint16_t hm = to_fp16(-15.5f * d);
            std::memcpy(p + 2, &hm, 2);
        }
        random_bytes(p + q0, 20, r);
        if (one) continue;
        uint8_t* qh = p + 2;
        const uint8_t* qs = p + 6;
        for (int j = 0; j < 32; ++j) {
            const int nib = j < 16 ? (qs[j] & 0x0f) : (qs[j - 16] >> 4);
            if (nib == 0 && !((qh[j / 8] >> (j % 8)) & 1)) qh[j / 8] |= (uint8_t)(1u << (j % 8));
        }
    }
}

// 144 B: d, dmin, 12 B of 6-bit (scale, min) pairs, 128 B of nibbles. w = d*sc*q - dmin*m with
// sc in [32, 63], m = sc/2 and dmin = 15 d: each sub-block is centred on zero, |w| <~ 0.12.
// Q5_K (176 B): the same with q in [0, 31] (random fifth bits in qh), dmin = 31 d, d halved.
void gen_q45_k(uint8_t* p, size_t nb, Rng& r, bool five) {
    const size_t bb = five ? 176 : 144;
    for (size_t b = 0; b < nb; ++b, p += bb) {
        float d = r.uniform(8e-5f, 2.5e-4f) * (five ? 0.5f : 1.f);
        uint16_t hd = to_fp16(d), hm = to_fp16((five ? 31.f : 15.f) * d);
        std::memcpy(p, &hd, 2);
        std::memcpy(p + 2, &hm, 2);
        uint8_t sc[8], mn[8];
        uint64_t bits = r.next();
        for (int j = 0; j < 8; ++j) {
            sc[j] = (uint8_t)(32 + ((bits >> (5 * j)) & 31));
            mn[j] = (uint8_t)(sc[j] / 2);
        }
        uint8_t* s = p + 4;
        for (int j = 0; j < 4; ++j) {
            s[j] = (uint8_t)((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
            s[j + 4] = (uint8_t)((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
            s[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4));
        }
        for (int k = 0; k < (five ? 20 : 16); ++k) {
            uint64_t a = r.next();
            std::memcpy(p + 16 + 8 * k, &a, 8);
        }
    }
}

// 210 B: ql[128], qh[64], int8 scales[16], d. w = d*scale*(q-32), |scale| in [8, 31]: |w| <= 992 d.
void gen_q6_k(uint8_t* p, size_t nb, Rng& r) {
    for (size_t b = 0; b < nb; ++b, p += 210) {
        for (int k = 0; k < 24; ++k) {
            uint64_t a = r.next();
            std::memcpy(p + 8 * k, &a, 8);
        }
        for (int j = 0; j < 16; j += 8) {
            uint64_t bits = r.next();
            for (int k = 0; k < 8; ++k) {
                unsigned byte = (unsigned)(bits >> (8 * k)) & 0xffu;
                int mag = 8 + (int)((byte & 0x7fu) % 24);  // 8..31
                int8_t v = (int8_t)((byte & 0x80u) ? -mag : mag);
                std::memcpy(p + 192 + j + k, &v, 1);
            }
        }
        uint16_t d = to_fp16(r.uniform(7e-5f, 1.2e-4f));
        std::memcpy(p + 208, &d, 2);
    }
}

// Q2_K (84 B), Q3_K (110 B), IQ4_XS (136 B), IQ3_XXS (98 B), IQ3_S (110 B), IQ4_NL (18 B): random
// codes, grid indices, signs and sub-block scales; the fp16 super-scales (d @80 and dmin @82, d @108,
// d @0) set so that |w| stays near the other types' range.
void gen_low_bit(moe::TensorType type, uint8_t* p, size_t nb, Rng& r) {
    using T = moe::TensorType;
    const int bb = moe::tensor_type_block_bytes(type);
    for (size_t b = 0; b < nb; ++b, p += bb) {
        random_bytes(p, bb, r);
        uint16_t d;
        if (type == T::q2_k) {
            d = to_fp16(r.uniform(1e-3f, 2e-3f));
            std::memcpy(p + 80, &d, 2);
            d = to_fp16(r.uniform(1e-3f, 2e-3f));
            std::memcpy(p + 82, &d, 2);
        } else if (type == T::q3_k) {
            d = to_fp16(r.uniform(2e-4f, 4e-4f));
            std::memcpy(p + 108, &d, 2);
        } else if (type == T::iq4_xs) {  // d * (ls - 32) * kvalue, |kvalue| <= 127
            d = to_fp16(r.uniform(2e-5f, 4e-5f));
            std::memcpy(p, &d, 2);
        } else if (type == T::iq4_nl) {  // d * kvalue: IQ4_XS's typical |ls - 32| of 16 folded into d
            d = to_fp16(r.uniform(3e-4f, 6e-4f));
            std::memcpy(p, &d, 2);
        } else {  // IQ3_XXS: d * ls / 4 * grid (<= 62); IQ3_S: d * ls * grid (<= 15); ls odd <= 31
            d = to_fp16(type == T::iq3_xxs ? r.uniform(1e-4f, 2e-4f) : r.uniform(2.5e-5f, 5e-5f));
            std::memcpy(p, &d, 2);
        }
    }
}

// The seed formats: random codes, scales set for |w| of about 0.01-0.02 like the other types.
// MXFP4: E8M0 2^(e-128) with e 118..120; NVFP4: UE4M3 subnormal codes 1..7 (m * 2^-10 halved);
// TQ3/TQ4: d ~ 3e-4 (|w| ~ d * 50); affine: scale ~ 1.5e-3 and bias -scale * nmax / 2.
void gen_seed_format(moe::TensorType type, uint8_t* p, size_t nb, Rng& r) {
    using T = moe::TensorType;
    const int bb = moe::tensor_type_block_bytes(type);
    for (size_t b = 0; b < nb; ++b, p += bb) {
        random_bytes(p, bb, r);
        if (type == T::mxfp4) {
            p[0] = (uint8_t)(118 + r.next() % 3);
        } else if (type == T::nvfp4) {
            for (int s = 0; s < 4; ++s) p[s] = (uint8_t)(1 + r.next() % 7);
        } else if (type == T::tq3 || type == T::tq4) {
            const uint16_t d = to_fp16(r.uniform(2e-4f, 4e-4f));
            std::memcpy(p, &d, 2);
        } else {  // affine
            const float sc = r.uniform(1e-3f, 2e-3f), nmax = type == T::affine4_g64 ? 15.f : 7.f;
            const uint16_t a = to_fp16(sc), c = to_fp16(-sc * nmax / 2);
            std::memcpy(p, &a, 2);
            std::memcpy(p + 2, &c, 2);
        }
    }
}

// fp16 values with |w| in [2^-9, 2^-3): exponent field 6..11, random mantissa and sign.
void gen_f16(uint8_t* p, size_t n, Rng& r) {
    for (size_t i = 0; i < n;) {
        uint64_t a = r.next();
        for (int k = 0; k < 4 && i < n; ++k, ++i) {
            uint16_t bits = (uint16_t)(a >> (16 * k));
            uint16_t e = (uint16_t)(6 + (bits >> 10) % 6);
            uint16_t h = (uint16_t)((bits & 0x8000u) | (e << 10) | (bits & 0x3ffu));
            std::memcpy(p + 2 * i, &h, 2);
        }
    }
}

void gen_f32(uint8_t* p, size_t n, Rng& r, Fill fill) {
    for (size_t i = 0; i < n; ++i) {
        // conv: lfm2moe's short-convolution taps and qwen35moe's ssm_conv1d, U[-1, 1], so that the
        // previous positions move a channel about as much as the current one.
        // dt_bias and ssm_a (qwen35moe, per v head): the delta-net's decay is
        // exp(ssm_a softplus(alpha + dt_bias)) with ssm_a = -exp(A_log), A_log in U[-1, 0] (|a| in
        // [0.37, 1]) and dt_bias in U[-2.5, -1.5]: for alpha near 0 a decay of about 0.9 per token,
        // a memory of ~10 tokens; the random alpha (std ~1.4 at q4_0/q8_0) spreads it over about 0.5-0.99.
        float v = fill == Fill::norm ? r.uniform(0.9f, 1.1f) : fill == Fill::bias ? r.uniform(-0.05f, 0.05f)
                  : fill == Fill::conv ? r.uniform(-1.f, 1.f) : fill == Fill::dt_bias ? r.uniform(-2.5f, -1.5f)
                  : fill == Fill::ssm_a ? -std::exp(r.uniform(-1.f, 0.f)) : r.uniform(-0.1f, 0.1f);
        std::memcpy(p + 4 * i, &v, 4);
    }
}

// Multiplies the fp16 scales of nb blocks by `factor`. Token embeddings get 64x the weights' scale
// and the projections back into the residual (attn_output, ffn_down) 1/16: with every matrix at
// the same scale, the residual stream after layer 0 is dominated by attention and expert outputs
// that hardly depend on the token, and every token routes to the same experts from layer 1 on
// (a 100% expert-cache hit rate on random input). Real models keep token identity in the
// residual; so does this. Speed is unaffected (same types, same bytes).
void scale_blocks(moe::TensorType type, uint8_t* p, size_t nb, float factor) {
    using T = moe::TensorType;
    auto scale16 = [&](uint8_t* at) {
        uint16_t h;
        std::memcpy(&h, at, 2);
        h = to_fp16(moe::detail::fp16_to_f32(h) * factor);
        std::memcpy(at, &h, 2);
    };
    const int bb = moe::tensor_type_block_bytes(type);
    for (size_t b = 0; b < nb; ++b) {
        uint8_t* blk = p + b * (size_t)bb;
        switch (type) {
            case T::q4_0: case T::q8_0: case T::q5_0: case T::iq4_nl: scale16(blk); break;
            case T::q5_1: scale16(blk); scale16(blk + 2); break;
            case T::q4_k: scale16(blk); scale16(blk + 2); break;
            case T::q6_k: scale16(blk + 208); break;
            case T::q2_k: scale16(blk + 80); scale16(blk + 82); break;
            case T::q3_k: scale16(blk + 108); break;
            case T::iq4_xs: case T::iq3_xxs: case T::iq3_s: scale16(blk); break;
            case T::q5_k: scale16(blk); scale16(blk + 2); break;
            case T::tq3: case T::tq4: scale16(blk); break;
            case T::affine3_g64: case T::affine4_g64: scale16(blk); scale16(blk + 2); break;
            case T::mxfp4: blk[0] = (uint8_t)std::max(1, std::min(254, (int)blk[0] + (int)std::lround(std::log2(factor)))); break;
            case T::f16: scale16(blk); break;
            case T::f32: { float v; std::memcpy(&v, blk, 4); v *= factor; std::memcpy(blk, &v, 4); break; }
            default: break;
        }
    }
}

// Fills [elem0, elem0 + n_elems) of a tensor (block-aligned) from its own seed.
void gen_range(const TensorSpec& t, uint8_t* dst, uint64_t elem0, uint64_t n_elems, uint64_t seed) {
    using T = moe::TensorType;
    Rng r(seed);
    const int be = moe::tensor_type_block_elems(t.type), bb = moe::tensor_type_block_bytes(t.type);
    uint8_t* p = dst + elem0 / (uint64_t)be * (uint64_t)bb;
    size_t nb = (size_t)(n_elems / (uint64_t)be);
    switch (t.type) {
        case T::q4_0: gen_q4_0(p, nb, r); break;
        case T::q8_0: gen_q8_0(p, nb, r); break;
        case T::q4_k: gen_q45_k(p, nb, r, false); break;
        case T::q5_k: gen_q45_k(p, nb, r, true); break;
        case T::q6_k: gen_q6_k(p, nb, r); break;
        case T::q5_0: gen_q5(p, nb, r, false); break;
        case T::q5_1: gen_q5(p, nb, r, true); break;
        case T::q2_k: case T::q3_k: case T::iq4_xs: case T::iq3_xxs: case T::iq3_s: case T::iq4_nl: gen_low_bit(t.type, p, nb, r); break;
        case T::f16: gen_f16(p, nb, r); break;
        case T::f32: gen_f32(p, nb, r, t.fill); break;
        case T::mxfp4: case T::nvfp4: case T::tq3: case T::tq4: case T::affine3_g64: case T::affine4_g64: gen_seed_format(t.type, p, nb, r); break;
        default: std::memset(p, 0, nb * (size_t)bb); break;
    }
    if (t.fill == Fill::embedding) scale_blocks(t.type, p, nb, 64.f);
    if (t.fill == Fill::output_proj) scale_blocks(t.type, p, nb, 1.f / 16);
}

// ---- tokenizer -------------------------------------------------------------------------------

void append_utf8(std::string& s, uint32_t cp) {
    if (cp < 0x80) s += (char)cp;
    else if (cp < 0x800) { s += (char)(0xC0 | (cp >> 6)); s += (char)(0x80 | (cp & 63)); }
    else { s += (char)(0xE0 | (cp >> 12)); s += (char)(0x80 | ((cp >> 6) & 63)); s += (char)(0x80 | (cp & 63)); }
}

// GPT-2 byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes are
// mapped in order to U+0100 and up.
std::vector<std::string> byte_level_alphabet() {
    std::vector<std::string> out(256);
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
        bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174 && b <= 255);
        append_utf8(out[b], printable ? b : 256 + extra++);
    }
    return out;
}

// Distinct lower-case words in order of length: "aa".."zz", "aaa".."zzz", ... (every word's prefix
// without its last letter comes earlier, so each word is one BPE merge away from earlier tokens).
std::string word_at(uint64_t i) {
    uint64_t len = 2, count = 26 * 26;
    while (i >= count) { i -= count; ++len; count *= 26; }
    std::string w(len, 'a');
    for (uint64_t k = 0; k < len; ++k) { w[len - 1 - k] = (char)('a' + i % 26); i /= 26; }
    return w;
}

struct Vocab {
    std::vector<std::string> tokens, merges;
    std::vector<int32_t> types;
    std::vector<float> scores;
    int bos = -1, eos = -1, pad = -1, unk = -1, eot = -1, eom = -1;
    bool add_bos = false;
};

Vocab make_vocab(const Shape& s) {
    Vocab v;
    const int n = s.n_vocab;
    v.tokens.reserve(n);
    v.types.reserve(n);
    if (s.tok == Tok::spm) {
        v.tokens = {"<unk>", "<s>", "</s>"};
        v.types = {2, 3, 3};  // unknown, control, control
        for (int b = 0; b < 256; ++b) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "<0x%02X>", b);
            v.tokens.push_back(buf);
            v.types.push_back(6);  // byte
        }
        const std::string sp = "\xE2\x96\x81";  // U+2581, SentencePiece's space
        v.tokens.push_back(sp);
        v.types.push_back(1);
        for (uint64_t i = 0; (int)v.tokens.size() < n; ++i) {
            v.tokens.push_back((i % 2 ? "" : sp) + word_at(i / 2));
            v.types.push_back(1);
        }
        v.scores.resize(n);
        for (int i = 0; i < n; ++i) v.scores[i] = i < 259 ? 0.f : -(float)(i - 259);
        v.unk = 0; v.bos = 1; v.eos = 2; v.add_bos = true;
        return v;
    }
    std::vector<std::string> specials;
    bool specials_first = false;  // lfm2: control tokens at ids 0.. (else after the words)
    int n_unused = 0;             // deepseek: "[PADi]" tokens (type unused) pad the vocabulary to n_vocab
    if (s.tok == Tok::gpt2_qwen2 || s.tok == Tok::gpt2_qwen35) specials = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};
    else if (s.tok == Tok::gpt2_olmo) specials = {"<|endoftext|>", "<|padding|>"};
    // gpt-oss's harmony tokens and GLM-4.5's, in their real order (at the end of the vocabulary here)
    else if (s.tok == Tok::gpt2_oss)
        specials = {"<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>", "<|channel|>", "<|start|>", "<|end|>", "<|message|>", "<|call|>"};
    else if (s.tok == Tok::gpt2_glm)
        specials = {"<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"};
    else if (s.tok == Tok::gpt2_deepseek) {
        // DeepSeek-V2's: 100000 BPE tokens, then begin/end of sentence (bos, eos) and the FIM tokens,
        // spelt with the fullwidth bar U+FF5C and U+2581 for spaces, then padding up to 102400
        auto ds = [](const char* ascii) {  // '|' -> U+FF5C, '_' -> U+2581
            std::string o;
            for (const char* c = ascii; *c; ++c) o += *c == '|' ? "\xEF\xBD\x9C" : *c == '_' ? "\xE2\x96\x81" : std::string(1, *c);
            return o;
        };
        specials = {ds("<|begin_of_sentence|>"), ds("<|end_of_sentence|>"), ds("<|fim_hole|>"), ds("<|fim_begin|>"), ds("<|fim_end|>")};
        n_unused = n - 100000 - (int)specials.size();
    } else {  // LFM2's first control tokens
        specials = {"<|pad|>", "<|startoftext|>", "<|endoftext|>", "<|fim_pre|>", "<|fim_mid|>", "<|fim_suf|>", "<|im_start|>", "<|im_end|>",
                    "<|tool_list_start|>", "<|tool_list_end|>", "<|tool_call_start|>", "<|tool_call_end|>", "<|tool_response_start|>",
                    "<|tool_response_end|>"};
        specials_first = true;
    }
    auto add_specials = [&]() {
        for (const std::string& sp : specials) { v.tokens.push_back(sp); v.types.push_back(3); }
    };
    if (specials_first) add_specials();
    std::vector<std::string> alpha = byte_level_alphabet();
    for (int b = 0; b < 256; ++b) { v.tokens.push_back(alpha[b]); v.types.push_back(1); }
    const int n_words = n - 256 - (int)specials.size() - n_unused;
    for (int i = 0; i < n_words; ++i) {
        std::string w = word_at((uint64_t)i);
        v.merges.push_back(w.substr(0, w.size() - 1) + " " + w.substr(w.size() - 1));
        v.tokens.push_back(std::move(w));
        v.types.push_back(1);
    }
    const int f = specials_first ? 0 : (int)v.tokens.size();  // the first control token
    if (!specials_first) add_specials();
    for (int i = (int)v.tokens.size(); i < n; ++i) {  // as llama.cpp's converter pads: "[PADi]", unused
        v.tokens.push_back("[PAD" + std::to_string(i) + "]");
        v.types.push_back(5);
    }
    if (s.tok == Tok::gpt2_qwen2 || s.tok == Tok::gpt2_qwen35) { v.bos = f; v.pad = f; v.eos = f + 2; }
    else if (s.tok == Tok::gpt2_olmo) { v.bos = f; v.eos = f; v.pad = f + 1; }
    else if (s.tok == Tok::gpt2_oss) { v.bos = f; v.pad = f + 1; v.eos = f + 2; }  // as openai/gpt-oss-20b's GGUF
    else if (s.tok == Tok::gpt2_glm) { v.bos = f + 2; v.eos = f; v.pad = f; v.unk = f; v.eot = f + 7; v.eom = f + 9; }  // GLM: llama.cpp's converter
    else if (s.tok == Tok::gpt2_deepseek) { v.bos = f; v.eos = f + 1; v.pad = f + 1; v.add_bos = true; }
    else { v.pad = f; v.bos = f + 1; v.eos = f + 7; v.add_bos = true; }  // LFM2: <|startoftext|>, eos <|im_end|>
    return v;
}

// ---- writer ----------------------------------------------------------------------------------

struct SynthJob {
    std::vector<TensorSpec> specs;
    uint64_t seed = 0;
    int threads = 1;
    uint64_t total_bytes = 0, done_bytes = 0;
    double t0 = 0, last_report = 0;
    int last_pct = -1;
    bool tty = false;
};

constexpr uint64_t kChunkBytes = 4u << 20;  // unit of work and of seeding: same bytes for any -t

bool synth_fill(void* user, size_t index, uint8_t* dst, size_t n_bytes) {
    SynthJob& job = *static_cast<SynthJob*>(user);
    const TensorSpec& t = job.specs[index];
    if (n_bytes != t.bytes) return false;
    const uint64_t be = (uint64_t)moe::tensor_type_block_elems(t.type), bb = (uint64_t)moe::tensor_type_block_bytes(t.type);
    const uint64_t n_blocks = t.bytes / bb;
    const uint64_t blocks_per_chunk = std::max<uint64_t>(1, kChunkBytes / bb);
    const uint64_t n_chunks = (n_blocks + blocks_per_chunk - 1) / blocks_per_chunk;
    std::atomic<uint64_t> next{0};
    auto worker = [&]() {
        for (uint64_t c; (c = next.fetch_add(1)) < n_chunks;) {
            uint64_t b0 = c * blocks_per_chunk, nb = std::min(blocks_per_chunk, n_blocks - b0);
            gen_range(t, dst, b0 * be, nb * be, mix_seed(job.seed, index, c));
        }
    };
    int nt = (int)std::min<uint64_t>((uint64_t)job.threads, n_chunks);
    std::vector<std::thread> pool;
    for (int i = 1; i < nt; ++i) pool.emplace_back(worker);
    worker();
    for (std::thread& th : pool) th.join();

    job.done_bytes += t.bytes;
    double now = now_s();
    int pct = (int)(100.0 * (double)job.done_bytes / (double)std::max<uint64_t>(1, job.total_bytes));
    if (pct != job.last_pct && (now - job.last_report > 1.0 || pct == 100)) {
        double rate = (double)job.done_bytes / std::max(1e-9, now - job.t0) / 1e6;
        std::fprintf(stderr, job.tty ? "\r[moe-bench] writing: %3d%% (%s of %s, %.0f MB/s)   " : "[moe-bench] writing: %3d%% (%s of %s, %.0f MB/s)\n",
                     pct, fmt_bytes((double)job.done_bytes).c_str(), fmt_bytes((double)job.total_bytes).c_str(), rate);
        job.last_pct = pct;
        job.last_report = now;
    }
    return true;
}

int run_synthetic(const std::string& shape_name, const std::string& quant, const std::string& out, int layers, uint64_t seed, bool pure,
                  int threads) {
    const Shape* sp = find_shape(shape_name);
    if (!sp) {
        std::string names;
        for (const Shape& s : kShapes) names += std::string(names.empty() ? "" : ", ") + s.name;
        return fail("unknown shape '" + shape_name + "' (known: " + names + ")");
    }
    const Shape& s = *sp;
    QuantPlan plan;
    if (!make_plan(quant, &plan)) return fail("unknown quant type '" + quant + "' (known: q4_0, q8_0, q4_k_m, q4_k, q6_k, f16, q2_k, q3_k, iq4_xs, q3_k_m, iq3_xxs, mxfp4, nvfp4, tq3, tq4, affine3, affine4)");
    if (out.empty()) return fail("--synthetic needs -o FILE");
    const int n_layer = layers > 0 ? layers : s.n_layer;
    if (n_layer > s.n_layer) return fail("--layers " + std::to_string(layers) + " exceeds the shape's " + std::to_string(s.n_layer) + " layers");
    if (n_layer <= s.n_dense_lead)
        return fail("--layers " + std::to_string(layers) + " leaves no MoE layer (" + s.name + "'s first " + std::to_string(s.n_dense_lead) +
                    " layer(s) are dense)");
    if (plan.base == moe::TensorType::mxfp4 && s.mxfp4_experts && !pure) plan.mix = Mix::mxfp4_moe;

    SynthJob job;
    job.specs = plan_tensors(s, n_layer, plan, pure);
    job.seed = seed;
    job.threads = std::max(1, threads);
    // Active bytes as ModelInfo::active_bytes_per_token counts them: NextN blocks are never read.
    uint64_t experts = 0, embd = 0, embd_row = 0, unused = 0;
    int n_fell_back = 0;
    std::string fell_back;
    for (const TensorSpec& t : job.specs) {
        job.total_bytes += t.bytes;
        if (t.unused) unused += t.bytes;
        else if (t.expert) experts += t.bytes;
        if (t.name == "token_embd.weight") { embd = t.bytes; embd_row = t.bytes / (uint64_t)t.ne[1]; }
        if (t.fell_back) {
            const std::string role = t.name.compare(0, 4, "blk.") ? t.name : t.name.substr(t.name.find('.', 4) + 1);  // without "blk.N."
            const std::string item = role + " -> " + moe::tensor_type_name(t.type);
            if (fell_back.find(item) == std::string::npos) fell_back += (fell_back.empty() ? "" : ", ") + item;
            ++n_fell_back;
        }
    }
    // Tied embeddings: the output reads all of token_embd.
    const uint64_t active =
        job.total_bytes - unused - experts - embd + embd_row + experts / (uint64_t)s.n_expert * (uint64_t)s.n_used + (s.tied ? embd : 0);

    moe::GgufWriter w;
    const std::string a = s.arch;
    w.set_string("general.architecture", a);
    w.set_string("general.name", std::string(s.display) + (layers > 0 ? ", " + std::to_string(n_layer) + " layers" : ""));
    w.set_u32("general.file_type", plan.file_type);
    w.set_u32("general.quantization_version", 2);
    w.set_u32(a + ".context_length", (uint32_t)s.n_ctx);
    w.set_u32(a + ".embedding_length", (uint32_t)s.n_embd);
    w.set_u32(a + ".block_count", (uint32_t)(n_layer + s.n_nextn));
    if (s.ff_in_expert_key) {
        if (s.n_ff_dense > 0) w.set_u32(a + ".feed_forward_length", (uint32_t)s.n_ff_dense);  // qwen35moe: none
        w.set_u32(a + ".expert_feed_forward_length", (uint32_t)s.n_ff_exp);
    } else {
        w.set_u32(a + ".feed_forward_length", (uint32_t)s.n_ff_exp);
    }
    w.set_u32(a + ".attention.head_count", (uint32_t)s.n_head);
    if (s.layer_kinds) {  // lfm2moe: per layer, 0 for a short-convolution layer (LFM2MoeModel of the converter)
        std::vector<int32_t> kv((size_t)n_layer);
        for (int il = 0; il < n_layer; ++il) kv[(size_t)il] = s.layer_kinds[il] == 'a' ? s.n_head_kv : 0;
        w.set_i32_array(a + ".attention.head_count_kv", kv);
    } else {
        w.set_u32(a + ".attention.head_count_kv", (uint32_t)s.n_head_kv);  // deepseek2: 1, MQA over the latent
    }
    if (s.write_key_length) {
        w.set_u32(a + ".attention.key_length", (uint32_t)s.head_dim);
        w.set_u32(a + ".attention.value_length", (uint32_t)s.head_dim);
    }
    if (s.tok == Tok::spm) {
        w.set_u32(a + ".rope.dimension_count", (uint32_t)s.head_dim);
        w.set_u32(a + ".vocab_size", (uint32_t)s.n_vocab);
    }
    if (s.n_rot > 0) w.set_u32(a + ".rope.dimension_count", (uint32_t)s.n_rot);
    w.set_f32(a + ".rope.freq_base", s.rope_base);
    if (s.yarn_factor > 0) {
        w.set_string(a + ".rope.scaling.type", "yarn");
        w.set_f32(a + ".rope.scaling.factor", s.yarn_factor);
        w.set_u32(a + ".rope.scaling.original_context_length", (uint32_t)s.yarn_orig_ctx);
        if (s.yarn_log_mul != 0.f) w.set_f32(a + ".rope.scaling.yarn_log_multiplier", s.yarn_log_mul);
    }
    if (s.n_swa > 0) w.set_u32(a + ".attention.sliding_window", (uint32_t)s.n_swa);
    w.set_f32(a + ".attention.layer_norm_rms_epsilon", s.eps);
    w.set_u32(a + ".expert_count", (uint32_t)s.n_expert);
    w.set_u32(a + ".expert_used_count", (uint32_t)s.n_used);
    if (a == "glm4moe") {  // Glm4MoeModel.set_gguf_parameters of llama.cpp's converter writes all of these
        w.set_u32(a + ".leading_dense_block_count", (uint32_t)s.n_dense_lead);
        w.set_u32(a + ".expert_shared_count", (uint32_t)s.n_shared);
        w.set_u32(a + ".expert_gating_func", 2);  // sigmoid
        w.set_f32(a + ".expert_weights_scale", s.routed_scale);
        w.set_bool(a + ".expert_weights_norm", true);
        w.set_u32(a + ".nextn_predict_layers", (uint32_t)s.n_nextn);
    } else if (a == "deepseek2") {  // DeepseekV2Model.set_gguf_parameters
        w.set_u32(a + ".vocab_size", (uint32_t)s.n_vocab);
        // q_lora_rank is null (plain attn_q): written as 0, since llama.cpp 0.5.0 requires the key
        // unless block_count is 26, 27 or 47 (its V2-Lite test), i.e. for every --layers N file
        w.set_u32(a + ".attention.q_lora_rank", 0);
        w.set_u32(a + ".leading_dense_block_count", (uint32_t)s.n_dense_lead);
        w.set_u32(a + ".attention.kv_lora_rank", (uint32_t)s.kv_lora);
        w.set_u32(a + ".attention.key_length", (uint32_t)(s.kv_lora + s.n_rot));  // the cached latent + rope key
        w.set_u32(a + ".attention.value_length", (uint32_t)s.kv_lora);
        w.set_u32(a + ".attention.key_length_mla", (uint32_t)s.head_dim);        // a head's own: nope + rope
        w.set_u32(a + ".attention.value_length_mla", (uint32_t)s.v_head);
        w.set_u32(a + ".expert_shared_count", (uint32_t)s.n_shared);
        w.set_f32(a + ".expert_weights_scale", s.routed_scale);
        w.set_bool(a + ".expert_weights_norm", false);  // norm_topk_prob
        w.set_u32(a + ".expert_gating_func", (uint32_t)s.gating_func);
        w.set_u32(a + ".expert_group_count", 1);  // n_group / topk_group 1: no grouped top-k
        w.set_u32(a + ".expert_group_used_count", 1);
    } else if (a == "lfm2moe") {  // LFM2MoeModel.set_gguf_parameters
        w.set_u32(a + ".vocab_size", (uint32_t)s.n_vocab);
        w.set_u32(a + ".leading_dense_block_count", (uint32_t)s.n_dense_lead);
        w.set_u32(a + ".expert_gating_func", (uint32_t)s.gating_func);
        w.set_u32(a + ".shortconv.l_cache", (uint32_t)s.l_cache);
    } else if (a == "qwen35moe") {  // Qwen3_5MoeTextModel.set_gguf_parameters (Qwen2MoeModel's, Qwen3NextModel's)
        w.set_u32(a + ".expert_shared_feed_forward_length", (uint32_t)(s.n_shared * s.n_ff_exp));
        w.set_i32_array(a + ".rope.dimension_sections", std::vector<int32_t>(s.rope_sections, s.rope_sections + 4));
        w.set_u32(a + ".ssm.conv_kernel", (uint32_t)s.ssm_conv);
        w.set_u32(a + ".ssm.state_size", (uint32_t)s.ssm_state);
        w.set_u32(a + ".ssm.group_count", (uint32_t)s.ssm_k_heads);
        w.set_u32(a + ".ssm.time_step_rank", (uint32_t)s.ssm_v_heads);
        w.set_u32(a + ".ssm.inner_size", (uint32_t)(s.ssm_state * s.ssm_v_heads));
        w.set_u32(a + ".full_attention_interval", (uint32_t)s.full_attn_interval);
    }

    Vocab v = make_vocab(s);
    if ((int)v.tokens.size() != s.n_vocab) return fail("internal: vocabulary size mismatch");
    w.set_string("tokenizer.ggml.model", s.tok == Tok::spm ? "llama" : "gpt2");
    if (s.tok == Tok::gpt2_qwen2) w.set_string("tokenizer.ggml.pre", "qwen2");
    else if (s.tok == Tok::gpt2_olmo) w.set_string("tokenizer.ggml.pre", "olmo");
    else if (s.tok == Tok::gpt2_oss) w.set_string("tokenizer.ggml.pre", "gpt-4o");
    else if (s.tok == Tok::gpt2_glm) w.set_string("tokenizer.ggml.pre", "glm4");
    else if (s.tok == Tok::gpt2_deepseek) w.set_string("tokenizer.ggml.pre", "deepseek-llm");
    else if (s.tok == Tok::gpt2_lfm2) w.set_string("tokenizer.ggml.pre", "lfm2");
    else if (s.tok == Tok::gpt2_qwen35) w.set_string("tokenizer.ggml.pre", "qwen35");
    w.set_string_array("tokenizer.ggml.tokens", v.tokens);
    w.set_i32_array("tokenizer.ggml.token_type", v.types);
    if (!v.scores.empty()) w.set_f32_array("tokenizer.ggml.scores", v.scores);
    if (s.tok != Tok::spm) w.set_string_array("tokenizer.ggml.merges", v.merges);
    if (v.bos >= 0) w.set_u32("tokenizer.ggml.bos_token_id", (uint32_t)v.bos);
    if (v.eos >= 0) w.set_u32("tokenizer.ggml.eos_token_id", (uint32_t)v.eos);
    if (v.pad >= 0) w.set_u32("tokenizer.ggml.padding_token_id", (uint32_t)v.pad);
    if (v.unk >= 0) w.set_u32("tokenizer.ggml.unknown_token_id", (uint32_t)v.unk);
    if (v.eot >= 0) w.set_u32("tokenizer.ggml.eot_token_id", (uint32_t)v.eot);
    if (v.eom >= 0) w.set_u32("tokenizer.ggml.eom_token_id", (uint32_t)v.eom);
    w.set_bool("tokenizer.ggml.add_bos_token", v.add_bos);
    w.set_bool("tokenizer.ggml.add_eos_token", false);
    v = Vocab();

    for (const TensorSpec& t : job.specs) {
        moe::Status st = w.add_tensor_deferred(t.name, t.type, t.n_dims, t.ne);
        if (st != moe::Status::ok) return fail(std::string("cannot add tensor ") + t.name + ": " + moe::last_error());
    }

#if defined(__unix__) || defined(__APPLE__)
    {
        std::string dir = out.find('/') == std::string::npos ? "." : out.substr(0, out.rfind('/') + 1);
        struct statvfs fs;
        struct stat st;
        bool special = stat(out.c_str(), &st) == 0 && !S_ISREG(st.st_mode);  // e.g. /dev/null
        if (!special && statvfs(dir.c_str(), &fs) == 0) {
            double avail = (double)fs.f_bavail * (double)fs.f_frsize;
            if (avail < (double)job.total_bytes + 64e6)
                return fail("not enough disk space for " + out + ": needs " + fmt_bytes((double)job.total_bytes) + ", " + fmt_bytes(avail) +
                            " free (try --layers N)");
        }
    }
    job.tty = isatty(2) != 0;
#endif
    std::fprintf(stderr, "[moe-bench] %s %s%s: %d layers, %zu tensors, %s; about %s active per token -> %s\n", s.name, quant.c_str(),
                 pure ? " (pure)" : "", n_layer, job.specs.size(), fmt_bytes((double)job.total_bytes).c_str(), fmt_bytes((double)active).c_str(),
                 out.c_str());
    if (s.layer_kinds) {
        std::string kinds;
        for (int il = 0; il < n_layer; ++il) kinds += s.layer_kinds[il] == 'a' ? 'A' : 'c';
        std::fprintf(stderr, "[moe-bench] layer kinds (A attention, c short convolution; the first %d dense): %s\n", s.n_dense_lead, kinds.c_str());
    }
    if (s.full_attn_interval > 0) {
        std::string kinds;
        for (int il = 0; il < n_layer; ++il) kinds += s.recurrent(il) ? 'D' : 'A';
        std::fprintf(stderr, "[moe-bench] layer kinds (A full attention, D gated delta-net): %s\n", kinds.c_str());
    }
    if (n_fell_back)
        std::fprintf(stderr, "[moe-bench] %d tensors have rows that their type's blocks do not tile; they fall back (see fallback_type): %s\n",
                     n_fell_back, fell_back.c_str());
    job.t0 = job.last_report = now_s();
    moe::Status st = w.write_streaming(out.c_str(), synth_fill, &job);
    if (job.tty) std::fputc('\n', stderr);
    if (st != moe::Status::ok) return fail(std::string("cannot write ") + out + ": " + moe::last_error());
    std::fprintf(stderr, "[moe-bench] wrote %s in %.1f s\n", out.c_str(), now_s() - job.t0);
    return 0;
}

//=================================================================================================
// Benchmark
//=================================================================================================

struct BenchOptions {
    std::string model;
    int threads = 0, n_prompt = 64, n_gen = 32, reps = 3;
    bool json = false, prefault = true, profile = false, amx = false;
    int gemm_min = 0;
    int prefetch = -1;
    std::string isa;
    double bw = 0;  // given GB/s; 0 = measure
    size_t bw_bytes = 0;
    uint64_t seed = 1234;
    uint64_t mem_budget = 0;
    int predict = 0, io_threads = 4;
    moe::ExpertReads expert_reads = moe::ExpertReads::direct;
    moe::HugePages huge_pages = moe::HugePages::automatic;
    bool drop_cache = false, random_decode = false, repack = true;
    std::vector<int> batch;  // --batch
};

// "8G", "512M", "64K" or bytes.
bool parse_size(const char* s, uint64_t* out) {
    if (!s || !*s) return false;
    char* end = nullptr;
    const double v = std::strtod(s, &end);
    if (end == s || !(v > 0)) return false;
    double scale = 1;
    if (*end == 'K' || *end == 'k') scale = 1024.0, ++end;
    else if (*end == 'M' || *end == 'm') scale = 1048576.0, ++end;
    else if (*end == 'G' || *end == 'g') scale = 1073741824.0, ++end;
    if (*end) return false;
    *out = (uint64_t)(v * scale);
    return *out > 0;
}

// Drops the file's pages from the page cache (no root needed); false where unsupported.
bool drop_page_cache(const std::string& path) {
#if defined(__linux__)
    const int fd = ::open(path.c_str(), O_RDONLY);
    if (fd < 0) return false;
    const int rc = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
    return rc == 0;
#else
    (void)path;
    return false;
#endif
}

bool parse_isa(const std::string& s, moe::Isa* out) {
    static const struct { const char* name; moe::Isa isa; } table[] = {
        {"scalar", moe::Isa::scalar}, {"avx2", moe::Isa::avx2}, {"avx512", moe::Isa::avx512},
        {"avx512_vnni", moe::Isa::avx512_vnni}, {"neon", moe::Isa::neon}, {"neon_dotprod", moe::Isa::neon_dotprod},
    };
    for (const auto& e : table)
        if (s == e.name) { *out = e.isa; return true; }
    return false;
}

// Most bytes by tensor type among the matrices: "Q4_0", or "Q4_K+Q6_K" when a second type holds >= 20%.
std::string weight_mix(const moe::GgufFile& f) {
    std::vector<std::pair<uint64_t, uint32_t>> by;
    uint64_t total = 0;
    for (size_t i = 0; i < f.n_tensors(); ++i) {
        const moe::GgufTensorInfo& t = f.tensor_at(i);
        if (t.n_dims < 2) continue;
        total += t.n_bytes;
        auto it = std::find_if(by.begin(), by.end(), [&](const std::pair<uint64_t, uint32_t>& e) { return e.second == t.type; });
        if (it == by.end()) by.push_back({t.n_bytes, t.type});
        else it->first += t.n_bytes;
    }
    std::sort(by.rbegin(), by.rend());
    std::string s;
    for (size_t i = 0; i < by.size(); ++i) {
        if (i > 0 && (double)by[i].first < 0.2 * (double)total) break;
        if (!s.empty()) s += "+";
        s += moe::tensor_type_name((moe::TensorType)by[i].second);
    }
    return s.empty() ? "?" : s;
}

int32_t argmax(const float* x, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; ++i)
        if (x[i] > x[best]) best = i;
    return best;
}

// Reads every tensor's bytes once (all threads) so that page-ins are not timed; returns seconds.
// Not the repacked tensors (Model::tensor_repacked): their rows left the process at load (the
// tiles are in memory), and reading them would only map them again.
double prefault(const moe::Model& model, int threads) {
    const moe::GgufFile& f = model.file();
    std::vector<std::pair<const uint8_t*, size_t>> ranges;
    for (size_t i = 0; i < f.n_tensors(); ++i)
        if (!model.tensor_repacked(f.tensor_at(i).name.c_str())) ranges.push_back({f.tensor_at(i).data, (size_t)f.tensor_at(i).n_bytes});
    std::atomic<size_t> next{0};
    std::atomic<uint64_t> sink{0};
    double t0 = now_s();
    auto worker = [&]() {
        uint64_t acc = 0;
        for (size_t i; (i = next.fetch_add(1)) < ranges.size();) {
            const uint8_t* p = ranges[i].first;
            for (size_t o = 0; o < ranges[i].second; o += 4096) acc += p[o];
            if (ranges[i].second) acc += p[ranges[i].second - 1];
        }
        sink.fetch_add(acc);
    };
    std::vector<std::thread> pool;
    for (int i = 1; i < threads; ++i) pool.emplace_back(worker);
    worker();
    for (std::thread& th : pool) th.join();
    if (sink.load() == 1) std::fputs("", stderr);
    return now_s() - t0;
}

int run_bench(const BenchOptions& o) {
    const int threads = o.threads > 0 ? o.threads : default_threads();
    if (!o.isa.empty()) {
        moe::Isa isa;
        if (!parse_isa(o.isa, &isa)) return fail("unknown --isa '" + o.isa + "' (scalar, avx2, avx512, avx512_vnni, neon, neon_dotprod)");
        if (moe::force_isa(isa) != moe::Status::ok)
            return fail("--isa " + o.isa + " is not available on this CPU/build (detected: " + moe::isa_name(moe::detected_isa()) + ")");
    }
    if (o.amx && !moe::amx_available()) return fail("--amx: this CPU, OS or build has no usable AMX-INT8");
    moe::set_amx(o.amx);

    // 1. bandwidth
    membw::Result bw;
    if (o.bw > 0) {
        bw.gbs = bw.median_gbs = o.bw;
        bw.threads = threads;
    } else {
        if (!o.json) std::fprintf(stderr, "[moe-bench] measuring read bandwidth with %d threads...\n", threads);
        bw = membw::measure_read_bandwidth(threads, o.bw_bytes);
        if (bw.gbs <= 0) return fail("cannot allocate the bandwidth buffer");
    }

    // 2. model
    double t_load = now_s();
    moe::Model model;
    moe::LoadOptions lo;
    lo.mem_budget = o.mem_budget;
    lo.io_threads = o.io_threads;
    lo.expert_reads = o.expert_reads;
    lo.huge_pages = o.huge_pages;
    lo.repack = o.repack;
    if (o.drop_cache && !drop_page_cache(o.model)) return fail("--drop-cache: posix_fadvise failed on " + o.model);
    if (moe::Model::load(o.model.c_str(), lo, &model) != moe::Status::ok) return fail("cannot load " + o.model + ": " + moe::last_error());
    t_load = now_s() - t_load;
    const moe::ModelInfo& info = model.info();
    double t_prefault = o.prefault && !o.mem_budget ? prefault(model, threads) : 0;

    moe::SessionOptions so;
    so.n_threads = threads;
    so.n_ctx = std::max(16, o.n_prompt + o.n_gen + 1);
    so.n_batch = std::max(1, std::min(o.n_prompt, 512));
    for (int b : o.batch) so.n_batch = std::max(so.n_batch, b);  // one pass per batched step
    so.profile = o.profile;
    so.prefetch_distance = o.prefetch;
    so.gemm_min_tokens = o.gemm_min;
    so.predict_depth = o.predict;
    std::vector<moe::PhaseTime> phases(32), phases_before(32);
    std::vector<double> decode_phase_s(32, 0.0);
    int n_phases = 0;
    bool profile_timed = false;  // accumulate only in timed repetitions
    moe::Session session;
    if (moe::Session::create(model, so, &session) != moe::Status::ok) return fail(std::string("cannot create a session: ") + moe::last_error());

    std::vector<int32_t> prompt((size_t)std::max(1, o.n_prompt));
    Rng rng(o.seed);
    for (int32_t& t : prompt) t = (int32_t)(rng.next() % (uint64_t)info.n_vocab);
    std::vector<int32_t> decode_ids((size_t)std::max(1, o.n_gen));
    for (int32_t& t : decode_ids) t = (int32_t)(rng.next() % (uint64_t)info.n_vocab);

    std::string err;
    // One repetition; returns false on error. Times in seconds (prefill 0 when p == 0).
    auto rep = [&](int n_gen, double* t_prefill, double* t_decode) -> bool {
        session.reset();
        double t0 = now_s();
        const size_t np = o.n_prompt > 0 ? (size_t)o.n_prompt : 1;  // p == 0: one untimed start token
        if (session.eval(prompt.data(), np) != moe::Status::ok) { err = std::string("prefill failed: ") + moe::last_error(); return false; }
        double t1 = now_s();
        if (o.profile) session.profile(phases_before.data(), (int)phases_before.size());
        int32_t tok = argmax(session.logits(), info.n_vocab);
        for (int i = 0; i < n_gen; ++i) {
            if (o.random_decode) tok = decode_ids[(size_t)i];
            if (session.eval(&tok, 1) != moe::Status::ok) { err = std::string("decode failed: ") + moe::last_error(); return false; }
            tok = argmax(session.logits(), info.n_vocab);
        }
        double t2 = now_s();
        if (o.profile && profile_timed) {
            n_phases = std::min(session.profile(phases.data(), (int)phases.size()), (int)phases.size());
            for (int i = 0; i < n_phases; ++i) decode_phase_s[(size_t)i] += phases[(size_t)i].seconds - phases_before[(size_t)i].seconds;
        }
        *t_prefill = o.n_prompt > 0 ? t1 - t0 : 0;
        *t_decode = t2 - t1;
        return true;
    };

    double tp, td;
    if (!rep(std::min(o.n_gen, 2), &tp, &td)) return fail(err);  // warm-up
    model.reset_expert_store_stats();  // the store's counters cover the timed repetitions
    session.reset_prediction_stats();
    std::vector<double> pre_tps, dec_tps;
    profile_timed = true;
    for (int r = 0; r < o.reps; ++r) {
        if (!rep(o.n_gen, &tp, &td)) return fail(err);
        if (o.n_prompt > 0) pre_tps.push_back(o.n_prompt / tp);
        if (o.n_gen > 0) dec_tps.push_back(o.n_gen / td);
        if (!o.json) std::fprintf(stderr, "[moe-bench] rep %d/%d: prefill %.2f tok/s, decode %.2f tok/s\n", r + 1, o.reps,
                                  o.n_prompt > 0 ? o.n_prompt / tp : 0.0, o.n_gen > 0 ? o.n_gen / td : 0.0);
    }
    // --batch: B sessions, each prefilled with its own prompt once; per repetition n steps of
    // eval_batch (greedy, or the seeded random ids), then every session truncated back to its prompt.
    struct BatchResult { int b; double aggregate, per_seq; std::vector<double> all; };
    std::vector<BatchResult> batch_results;
    for (int B : o.batch) {
        std::vector<moe::Session> seqs((size_t)B);
        std::vector<moe::Session*> ptrs;
        std::vector<std::vector<float>> first_logits((size_t)B);
        const size_t np = o.n_prompt > 0 ? (size_t)o.n_prompt : 1;
        for (int i = 0; i < B; ++i) {
            if (moe::Session::create(model, so, &seqs[(size_t)i]) != moe::Status::ok) return fail(std::string("cannot create a session: ") + moe::last_error());
            std::vector<int32_t> p(np);
            for (int32_t& t : p) t = (int32_t)(rng.next() % (uint64_t)info.n_vocab);
            if (seqs[(size_t)i].eval(p.data(), p.size()) != moe::Status::ok) return fail(std::string("prefill failed: ") + moe::last_error());
            first_logits[(size_t)i].assign(seqs[(size_t)i].logits(), seqs[(size_t)i].logits() + info.n_vocab);
            ptrs.push_back(&seqs[(size_t)i]);
        }
        std::vector<int32_t> toks((size_t)B);
        auto batch_rep = [&](int n_gen, double* t) -> bool {
            for (int i = 0; i < B; ++i) {
                seqs[(size_t)i].truncate((int32_t)np);
                toks[(size_t)i] = argmax(first_logits[(size_t)i].data(), info.n_vocab);
            }
            const double t0 = now_s();
            for (int k = 0; k < n_gen; ++k) {
                if (o.random_decode)
                    for (int i = 0; i < B; ++i) toks[(size_t)i] = decode_ids[(size_t)((k + i) % (int)decode_ids.size())];
                if (moe::Session::eval_batch(ptrs.data(), toks.data(), (size_t)B) != moe::Status::ok) {
                    err = std::string("batched decode failed: ") + moe::last_error();
                    return false;
                }
                for (int i = 0; i < B; ++i) toks[(size_t)i] = argmax(seqs[(size_t)i].logits(), info.n_vocab);
            }
            *t = now_s() - t0;
            return true;
        };
        double t;
        if (!batch_rep(std::min(o.n_gen, 2), &t)) return fail(err);  // warm-up
        BatchResult br{B, 0, 0, {}};
        for (int r = 0; r < o.reps && o.n_gen > 0; ++r) {
            if (!batch_rep(o.n_gen, &t)) return fail(err);
            br.all.push_back((double)B * o.n_gen / t);
            if (!o.json) std::fprintf(stderr, "[moe-bench] batch %d rep %d/%d: %.2f tok/s in all\n", B, r + 1, o.reps, br.all.back());
        }
        br.aggregate = median(br.all);
        br.per_seq = br.aggregate / B;
        batch_results.push_back(br);
    }

    const double pre = median(pre_tps), dec = median(dec_tps);
    const double pre_best = pre_tps.empty() ? 0 : *std::max_element(pre_tps.begin(), pre_tps.end());
    const double dec_best = dec_tps.empty() ? 0 : *std::max_element(dec_tps.begin(), dec_tps.end());
    const double active = (double)info.active_bytes_per_token;
    const double achieved = dec * active / 1e9;
    const double pct = bw.gbs > 0 ? 100.0 * achieved / bw.gbs : 0;
    const double roofline = active > 0 ? bw.gbs * 1e9 / active : 0;
    const std::string mix = weight_mix(model.file());
    // The panels' kernels: "+amx" where they run on the AMX tile unit.
    const std::string isa_label = std::string(moe::isa_name(moe::current_isa())) + (moe::current_isa() == moe::Isa::avx512_vnni && moe::amx_enabled() ? "+amx" : "");
    const char* isa = isa_label.c_str();
    const moe::ExpertStoreStats es = model.expert_store_stats();
    const moe::PredictionStats& ps = session.prediction_stats();
    double timed_s = 0;
    for (double v : pre_tps) timed_s += o.n_prompt / v;
    for (double v : dec_tps) timed_s += o.n_gen / v;
    const double read_gbs = timed_s > 0 ? (double)es.bytes_read / timed_s / 1e9 : 0;
    const moe::HugePageStats hps = model.huge_page_stats();
    char store_json[768];
    std::snprintf(store_json, sizeof store_json,
                  "\"huge_pages\": \"%s\", \"huge_pages_advised\": %s, \"huge_page_bytes\": %llu, \"cached_at_load_bytes\": %llu, "
                  "\"cached_huge_bytes\": %llu, \"huge_pages_dropped\": %s, "
                  "\"mem_budget_bytes\": %llu, \"expert_reads\": \"%s\", \"expert_cache_bytes\": %llu, \"expert_slots\": %d, \"expert_hit_rate\": %.4f, "
                  "\"expert_misses\": %llu, \"expert_late\": %llu, \"prefetches\": %llu, \"prefetch_hits\": %llu, \"prefetch_recall\": %.4f, "
                  "\"prefetch_wasted_bytes\": %llu, \"expert_read_bytes\": %llu, \"expert_read_gbs\": %.3f, \"expert_wait_s\": %.3f, ",
                  moe::huge_pages_name(o.huge_pages), hps.advised ? "true" : "false", (unsigned long long)hps.page_bytes,
                  (unsigned long long)hps.cached_bytes, (unsigned long long)hps.huge_bytes, hps.dropped ? "true" : "false",
                  (unsigned long long)es.mem_budget_bytes, moe::expert_reads_name(es.reads), (unsigned long long)es.cache_bytes, es.slots, es.hit_rate(),
                  (unsigned long long)es.misses, (unsigned long long)es.late, (unsigned long long)es.prefetches,
                  (unsigned long long)es.prefetch_hits, ps.max_depth ? ps.recall(1) : 0.0, (unsigned long long)es.prefetch_wasted_bytes,
                  (unsigned long long)es.bytes_read, read_gbs, es.wait_seconds);

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
                          b.b, b.aggregate, b.per_seq);
            batch_json += buf + arr(b.all) + "}";
        }
        batch_json += "]";
        std::printf(
            "{\"program\": \"moe-bench\", %s\"model\": \"%s\", \"arch\": \"%s\", \"weights\": \"%s\", \"n_layer\": %d, \"n_expert\": %d, "
            "\"n_expert_used\": %d, \"threads\": %d, \"isa\": \"%s\", \"n_prompt\": %d, \"n_gen\": %d, \"reps\": %d, "
            "\"bandwidth_gbs\": %.3f, \"bandwidth_median_gbs\": %.3f, \"bandwidth_buffer_bytes\": %zu, \"bandwidth_given\": %s, "
            "\"weight_bytes\": %llu, \"active_bytes_per_token\": %llu, \"prefill_tps\": %.4f, \"decode_tps\": %.4f, \"prefill_tps_best\": %.4f, \"decode_tps_best\": %.4f, "
            "\"achieved_gbs\": %.3f, \"pct_bandwidth\": %.2f, \"roofline_tps\": %.3f, \"load_s\": %.3f, \"prefault_s\": %.3f, "
            "\"prefill_tps_all\": %s, \"decode_tps_all\": %s, \"batch\": %s}\n",
            store_json, json_escape(o.model).c_str(), json_escape(info.architecture).c_str(), mix.c_str(), info.n_layer, info.n_expert, info.n_expert_used,
            threads, isa, o.n_prompt, o.n_gen, o.reps, bw.gbs, bw.median_gbs, bw.bytes, o.bw > 0 ? "true" : "false",
            (unsigned long long)info.weight_bytes, (unsigned long long)info.active_bytes_per_token, pre, dec, pre_best, dec_best, achieved, pct, roofline, t_load,
            t_prefault, arr(pre_tps).c_str(), arr(dec_tps).c_str(), batch_json.c_str());
        return 0;
    }
    std::printf("moe-bench: %s\n", o.model.c_str());
    std::printf("  model      %s, %d layers, %d experts (top-%d), %s, %s in all, %s active per token\n", info.architecture.c_str(), info.n_layer,
                info.n_expert, info.n_expert_used, mix.c_str(), fmt_bytes((double)info.weight_bytes).c_str(), fmt_bytes(active).c_str());
    std::printf("  kernels    %s, %d threads (load %.2f s, prefault %.2f s)\n", isa, threads, t_load, t_prefault);
    if (model.repacked_bytes()) std::printf("  repack     %.0f MiB of matrices in 16-row tiles\n", (double)model.repacked_bytes() / 1048576.0);
    if (hps.advised)
        std::printf("  pages      huge pages %s: %.0f MiB cached at load, %.0f MiB of it in %.0f MiB pages%s\n", moe::huge_pages_name(o.huge_pages),
                    (double)hps.cached_bytes / 1048576.0, (double)hps.huge_bytes / 1048576.0, (double)hps.page_bytes / 1048576.0,
                    hps.dropped ? " (dropped, read again as huge pages)" : "");
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
        std::printf("\n  batched decode (Session::eval_batch), %d steps, median of %d:\n  | B  | tok/s in all | per sequence | vs B=1 |\n  |----|--------------|--------------|--------|\n",
                    o.n_gen, o.reps);
        double one = 0;
        for (const BatchResult& b : batch_results)
            if (b.b == 1) one = b.aggregate;
        for (const BatchResult& b : batch_results) {
            char ratio[16] = "-";
            if (one > 0) std::snprintf(ratio, sizeof ratio, "%.2fx", b.aggregate / one);
            std::printf("  | %-2d | %12.2f | %12.2f | %6s |\n", b.b, b.aggregate, b.per_seq, ratio);
        }
    }
    if (o.mem_budget)
        std::printf("\n  expert store: budget %s (resident %s, cache %s = %d experts); hit rate %.3f, %llu misses, %llu late, "
                    "%llu prefetched (%llu used, %s wasted), prediction recall %.3f; read %s = %.2f GB/s; waited %.2f s\n",
                    fmt_bytes((double)es.mem_budget_bytes).c_str(), fmt_bytes((double)es.resident_bytes).c_str(),
                    fmt_bytes((double)es.cache_bytes).c_str(), es.slots, es.hit_rate(), (unsigned long long)es.misses,
                    (unsigned long long)es.late, (unsigned long long)es.prefetches, (unsigned long long)es.prefetch_hits,
                    fmt_bytes((double)es.prefetch_wasted_bytes).c_str(), ps.max_depth ? ps.recall(1) : 0.0,
                    fmt_bytes((double)es.bytes_read).c_str(), read_gbs, es.wait_seconds);
    if (o.profile && n_phases > 0 && o.n_gen > 0) {
        double total = 0;
        for (int i = 0; i < n_phases; ++i) total += decode_phase_s[(size_t)i];
        const double tokens = (double)o.n_gen * o.reps;
        std::printf("\n  decode time per phase (thread 0's view, waiting included), per token:\n");
        for (int i = 0; i < n_phases; ++i)
            std::printf("  %-14s %8.3f ms  %5.1f%%\n", phases[(size_t)i].phase, 1e3 * decode_phase_s[(size_t)i] / tokens,
                        total > 0 ? 100.0 * decode_phase_s[(size_t)i] / total : 0.0);
    }
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    BenchOptions o;
    std::string synthetic, quant, out;
    long long layers = 0;
    bool pure = false;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto value = [&]() -> const char* {
            if (i + 1 >= argc) return nullptr;
            return argv[++i];
        };
        long long v = 0;
        double d = 0;
        const char* s = nullptr;
        if (a == "-h" || a == "--help") { std::fputs(kUsage, stdout); return 0; }
        else if (a == "-m" || a == "--model") { if (!(s = value())) return fail("missing value after " + a); o.model = s; }
        else if (a == "-t" || a == "--threads") { if (!parse_i64(value(), 1, 512, &v)) return fail("bad or missing value for " + a); o.threads = (int)v; }
        else if (a == "-p") { if (!parse_i64(value(), 0, 1 << 20, &v)) return fail("bad or missing value for -p"); o.n_prompt = (int)v; }
        else if (a == "-n") { if (!parse_i64(value(), 0, 1 << 20, &v)) return fail("bad or missing value for -n"); o.n_gen = (int)v; }
        else if (a == "-r") { if (!parse_i64(value(), 1, 1000, &v)) return fail("bad or missing value for -r"); o.reps = (int)v; }
        else if (a == "--json") o.json = true;
        else if (a == "--profile") o.profile = true;
        else if (a == "--gemm-min") { if (!parse_i64(value(), -1, 1 << 20, &v)) return fail("bad or missing value for --gemm-min"); o.gemm_min = (int)v; }
        else if (a == "--prefetch") { if (!parse_i64(value(), -1, 1 << 20, &v)) return fail("bad or missing value for --prefetch"); o.prefetch = (int)v; }
        else if (a == "--amx") o.amx = true;
        else if (a == "--isa") { if (!(s = value())) return fail("missing value after --isa"); o.isa = s; }
        else if (a == "--bw") { if (!parse_f64(value(), 1e-3, 1e6, &d)) return fail("bad or missing value for --bw (GB/s)"); o.bw = d; }
        else if (a == "--bw-mib") { if (!parse_i64(value(), 1, 1 << 24, &v)) return fail("bad or missing value for --bw-mib"); o.bw_bytes = (size_t)v << 20; }
        else if (a == "--no-prefault") o.prefault = false;
        else if (a == "--mem-budget") { if (!parse_size(value(), &o.mem_budget)) return fail("bad or missing value for --mem-budget (e.g. 8G)"); }
        else if (a == "--predict") { if (!parse_i64(value(), 0, 4, &v)) return fail("bad or missing value for --predict (0..4)"); o.predict = (int)v; }
        else if (a == "--io-threads") { if (!parse_i64(value(), 0, 64, &v)) return fail("bad or missing value for --io-threads"); o.io_threads = (int)v; }
        else if (a == "--buffered-io") o.expert_reads = moe::ExpertReads::buffered;
        else if (a == "--expert-reads") {
            const std::string m = (s = value()) ? s : "";
            if (m == "direct") o.expert_reads = moe::ExpertReads::direct;
            else if (m == "buffered") o.expert_reads = moe::ExpertReads::buffered;
            else if (m == "mapped") o.expert_reads = moe::ExpertReads::mapped;
            else return fail("bad or missing value for --expert-reads (direct, buffered or mapped)");
        }
        else if (a == "--drop-cache") o.drop_cache = true;
        else if (a == "--no-repack") o.repack = false;
        else if (a == "--huge-pages") {
            const std::string m = (s = value()) ? s : "";
            if (m == "automatic") o.huge_pages = moe::HugePages::automatic;
            else if (m == "map") o.huge_pages = moe::HugePages::map;
            else if (m == "off") o.huge_pages = moe::HugePages::off;
            else return fail("bad or missing value for --huge-pages (automatic, map or off)");
        }
        else if (a == "--random-decode") o.random_decode = true;
        else if (a == "--batch") {
            const char* list = value();
            if (!list || !*list) return fail("missing value after --batch");
            for (const char* q = list; *q;) {
                char* end = nullptr;
                const long b = std::strtol(q, &end, 10);
                if (end == q || b < 1 || b > 256 || (*end && *end != ',')) return fail(std::string("bad --batch list '") + list + "' (sizes 1..256, comma-separated)");
                o.batch.push_back((int)b);
                q = *end ? end + 1 : end;
            }
        }
        else if (a == "--seed") { if (!parse_i64(value(), 0, INT64_MAX, &v)) return fail("bad or missing value for --seed"); o.seed = (uint64_t)v; }
        else if (a == "--synthetic") { if (!(s = value())) return fail("missing value after --synthetic"); synthetic = s; }
        else if (a == "--quant") { if (!(s = value())) return fail("missing value after --quant"); quant = s; }
        else if (a == "-o") { if (!(s = value())) return fail("missing value after -o"); out = s; }
        else if (a == "--layers") { if (!parse_i64(value(), 1, 4096, &v)) return fail("bad or missing value for --layers"); layers = v; }
        else if (a == "--pure") pure = true;
        else return fail("unknown argument '" + a + "' (see --help)");
    }
    if (!synthetic.empty()) {
        if (!o.model.empty()) return fail("-m and --synthetic do not go together");
        if (quant.empty()) return fail("--synthetic needs --quant TYPE");
        unsigned hc = std::max(1u, std::thread::hardware_concurrency());
        return run_synthetic(synthetic, quant, out, (int)layers, o.seed, pure, o.threads > 0 ? o.threads : (int)hc);
    }
    if (!quant.empty() || !out.empty() || layers || pure) return fail("--quant, -o, --layers and --pure need --synthetic");
    if (o.model.empty()) return fail("no model given (-m FILE, or --synthetic SHAPE --quant TYPE -o FILE; see --help)");
    if (o.n_prompt == 0 && o.n_gen == 0) return fail("-p 0 and -n 0: nothing to measure");
    return run_bench(o);
}
