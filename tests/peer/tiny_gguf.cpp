// tiny_gguf: writes a tiny random-weight Qwen3-MoE GGUF with ggml's own gguf API (libggml-base of
// the peer), so the llama.cpp peer can be exercised - and moe_infer.h compared against it - on a
// model that was not written by moe_infer.h itself. Tokenizer: the tokenizer.* keys of any
// llama.cpp vocab GGUF (e.g. ggml-vocab-llama-spm.gguf from the bundle's models/).
//
//   tiny_gguf --ggml-blocks TYPE N OUT.bin   (ggml's quantizer and dequantizer on N values; see below)
//   tiny_gguf --ggml-dequant TYPE IN.bin OUT.f32   (ggml's dequantizer on raw blocks)
//   tiny_gguf OUT.gguf --vocab VOCAB.gguf [--type f32|f16|q8_0] [--seed N]
//             [--layers 2] [--embd 64] [--heads 4] [--kv-heads 2] [--head-dim 16]
//             [--experts 8] [--experts-used 2] [--ff 32]
//
// Weights: deterministic (splitmix64 + Box-Muller, independent of the C++ library), matrices
// N(0, 1/fan_in), embeddings N(0, 1), norm weights 1 + N(0, 0.1^2). --type applies to every 2-D/3-D
// weight (token_embd and output included); norms stay F32.
// Our own small program against gguf.h / ggml.h's public API; no llama.cpp code is copied here.

#include "ggml.h"
#include "gguf.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Rng {
    uint64_t s;
    uint64_t next() {  // splitmix64
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return ((next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }  // (0,1)
    double normal() {
        const double u1 = uniform(), u2 = uniform();
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
    }
};

struct Cfg {
    std::string out, vocab;
    ggml_type type = GGML_TYPE_F32;
    uint64_t seed = 1;
    int layers = 2, embd = 64, heads = 4, kv_heads = 2, head_dim = 16;
    int experts = 8, experts_used = 2, ff = 32;
};

int to_int(const char * s, const char * what) {
    char * end = nullptr;
    long v = std::strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v <= 0 || v > (1 << 20)) throw Error(std::string("bad value for ") + what);
    return (int) v;
}

Cfg parse(int argc, char ** argv) {
    Cfg c;
    for (int i = 1; i < argc; ++i) {
        std::string a = argv[i];
        auto val = [&]() -> const char * {
            if (i + 1 >= argc) throw Error("missing value after " + a);
            return argv[++i];
        };
        if (a == "--vocab") c.vocab = val();
        else if (a == "--type") {
            std::string t = val();
            if (t == "f32") c.type = GGML_TYPE_F32;
            else if (t == "f16") c.type = GGML_TYPE_F16;
            else if (t == "q8_0") c.type = GGML_TYPE_Q8_0;
            else throw Error("--type must be f32, f16 or q8_0");
        }
        else if (a == "--seed") c.seed = std::strtoull(val(), nullptr, 10);
        else if (a == "--layers") c.layers = to_int(val(), "--layers");
        else if (a == "--embd") c.embd = to_int(val(), "--embd");
        else if (a == "--heads") c.heads = to_int(val(), "--heads");
        else if (a == "--kv-heads") c.kv_heads = to_int(val(), "--kv-heads");
        else if (a == "--head-dim") c.head_dim = to_int(val(), "--head-dim");
        else if (a == "--experts") c.experts = to_int(val(), "--experts");
        else if (a == "--experts-used") c.experts_used = to_int(val(), "--experts-used");
        else if (a == "--ff") c.ff = to_int(val(), "--ff");
        else if (!a.empty() && a[0] != '-' && c.out.empty()) c.out = a;
        else throw Error("unknown argument '" + a + "'");
    }
    if (c.out.empty() || c.vocab.empty()) throw Error("usage: tiny_gguf OUT.gguf --vocab VOCAB.gguf [options]");
    if (c.heads % c.kv_heads != 0) throw Error("--heads must be a multiple of --kv-heads");
    if (c.experts_used > c.experts) throw Error("--experts-used > --experts");
    return c;
}

struct Writer {
    gguf_context * g = nullptr;
    ggml_context * meta = nullptr;
    std::vector<std::unique_ptr<std::vector<uint8_t>>> bufs;  // tensor data, alive until written
    Rng rng;
    ggml_type type;

    // ne0 = row length (fan-in), ne1 = rows, ne2 = experts
    void add(const std::string & name, int64_t ne0, int64_t ne1, int64_t ne2, double stddev, double mean,
             bool quantizable) {
        const int n_dims = ne2 > 1 ? 3 : ne1 > 1 ? 2 : 1;
        const ggml_type t = quantizable && n_dims >= 2 ? type : GGML_TYPE_F32;
        if (ggml_blck_size(t) > 1 && ne0 % ggml_blck_size(t) != 0) {
            throw Error(name + ": row length " + std::to_string(ne0) + " is not a multiple of the block size");
        }
        std::vector<float> f((size_t) (ne0 * ne1 * ne2));
        for (float & x : f) x = (float) (mean + stddev * rng.normal());
        const size_t row_bytes = ggml_row_size(t, ne0);
        auto buf = std::make_unique<std::vector<uint8_t>>(row_bytes * (size_t) (ne1 * ne2));
        if (t == GGML_TYPE_F32) {
            std::memcpy(buf->data(), f.data(), buf->size());
        } else {
            ggml_quantize_chunk(t, f.data(), buf->data(), 0, ne1 * ne2, ne0, nullptr);  // f16 too
        }
        ggml_tensor * tt = n_dims == 1 ? ggml_new_tensor_1d(meta, t, ne0)
                         : n_dims == 2 ? ggml_new_tensor_2d(meta, t, ne0, ne1)
                                       : ggml_new_tensor_3d(meta, t, ne0, ne1, ne2);
        ggml_set_name(tt, name.c_str());
        gguf_add_tensor(g, tt);
        gguf_set_tensor_data(g, name.c_str(), buf->data());
        bufs.push_back(std::move(buf));
    }
};

int run(const Cfg & c) {
    gguf_init_params vp = { /*no_alloc=*/true, /*ctx=*/nullptr };
    gguf_context * voc = gguf_init_from_file(c.vocab.c_str(), vp);
    if (!voc) throw Error("cannot read vocab GGUF " + c.vocab);
    const int64_t tok_id = gguf_find_key(voc, "tokenizer.ggml.tokens");
    if (tok_id < 0) { gguf_free(voc); throw Error(c.vocab + " has no tokenizer.ggml.tokens"); }
    const int64_t n_vocab = (int64_t) gguf_get_arr_n(voc, tok_id);

    Writer w;
    w.rng.s = c.seed;
    w.type = c.type;
    w.g = gguf_init_empty();
    gguf_set_kv(w.g, voc);  // then keep only the tokenizer.* keys
    gguf_free(voc);
    for (int64_t i = gguf_get_n_kv(w.g) - 1; i >= 0; --i) {
        const std::string k = gguf_get_key(w.g, i);
        if (k.rfind("tokenizer.", 0) != 0) gguf_remove_key(w.g, k.c_str());
    }
    const std::string A = "qwen3moe";
    gguf_set_val_str(w.g, "general.architecture", A.c_str());
    gguf_set_val_str(w.g, "general.name", "moe_infer tiny random qwen3moe");
    gguf_set_val_u32(w.g, "general.file_type", c.type == GGML_TYPE_F32 ? 0 : c.type == GGML_TYPE_F16 ? 1 : 7);
    gguf_set_val_u32(w.g, (A + ".context_length").c_str(), 4096);
    gguf_set_val_u32(w.g, (A + ".embedding_length").c_str(), (uint32_t) c.embd);
    gguf_set_val_u32(w.g, (A + ".block_count").c_str(), (uint32_t) c.layers);
    gguf_set_val_u32(w.g, (A + ".feed_forward_length").c_str(), (uint32_t) (c.ff * c.experts_used));
    gguf_set_val_u32(w.g, (A + ".expert_feed_forward_length").c_str(), (uint32_t) c.ff);
    gguf_set_val_u32(w.g, (A + ".attention.head_count").c_str(), (uint32_t) c.heads);
    gguf_set_val_u32(w.g, (A + ".attention.head_count_kv").c_str(), (uint32_t) c.kv_heads);
    gguf_set_val_u32(w.g, (A + ".attention.key_length").c_str(), (uint32_t) c.head_dim);
    gguf_set_val_u32(w.g, (A + ".attention.value_length").c_str(), (uint32_t) c.head_dim);
    gguf_set_val_f32(w.g, (A + ".attention.layer_norm_rms_epsilon").c_str(), 1e-6f);
    gguf_set_val_f32(w.g, (A + ".rope.freq_base").c_str(), 1000000.0f);
    gguf_set_val_u32(w.g, (A + ".expert_count").c_str(), (uint32_t) c.experts);
    gguf_set_val_u32(w.g, (A + ".expert_used_count").c_str(), (uint32_t) c.experts_used);

    const int n_tensors = 3 + c.layers * 12;
    ggml_init_params ip = { (size_t) n_tensors * ggml_tensor_overhead() + 1024, nullptr, /*no_alloc=*/true };
    w.meta = ggml_init(ip);
    if (!w.meta) throw Error("ggml_init failed");

    const int64_t E = c.embd, Q = (int64_t) c.heads * c.head_dim, KV = (int64_t) c.kv_heads * c.head_dim;
    const double s_e = 1.0 / std::sqrt((double) E), s_q = 1.0 / std::sqrt((double) Q), s_f = 1.0 / std::sqrt((double) c.ff);
    w.add("token_embd.weight", E, n_vocab, 1, 1.0, 0.0, true);
    for (int l = 0; l < c.layers; ++l) {
        const std::string b = "blk." + std::to_string(l) + ".";
        w.add(b + "attn_norm.weight", E, 1, 1, 0.1, 1.0, false);
        w.add(b + "attn_q.weight", E, Q, 1, s_e, 0.0, true);
        w.add(b + "attn_k.weight", E, KV, 1, s_e, 0.0, true);
        w.add(b + "attn_v.weight", E, KV, 1, s_e, 0.0, true);
        w.add(b + "attn_output.weight", Q, E, 1, s_q, 0.0, true);
        w.add(b + "attn_q_norm.weight", c.head_dim, 1, 1, 0.1, 1.0, false);
        w.add(b + "attn_k_norm.weight", c.head_dim, 1, 1, 0.1, 1.0, false);
        w.add(b + "ffn_norm.weight", E, 1, 1, 0.1, 1.0, false);
        w.add(b + "ffn_gate_inp.weight", E, c.experts, 1, s_e, 0.0, false);  // router kept F32, as converters do
        w.add(b + "ffn_gate_exps.weight", E, c.ff, c.experts, s_e, 0.0, true);
        w.add(b + "ffn_up_exps.weight", E, c.ff, c.experts, s_e, 0.0, true);
        w.add(b + "ffn_down_exps.weight", c.ff, E, c.experts, s_f, 0.0, true);
    }
    w.add("output_norm.weight", E, 1, 1, 0.1, 1.0, false);
    w.add("output.weight", E, n_vocab, 1, s_e * 4.0, 0.0, true);  // x4: peaky logits, few near-ties

    const bool ok = gguf_write_to_file(w.g, c.out.c_str(), false);
    gguf_free(w.g);
    ggml_free(w.meta);
    if (!ok) throw Error("cannot write " + c.out);
    return 0;
}

}  // namespace

// --ggml-blocks TYPE N OUT: N Gaussian values (seeded as the weights above, sigma 1, every 7th
// block scaled by 1e-3 and every 11th by 1e3) quantized by ggml_quantize_chunk (an importance
// matrix for the IQ types only), then dequantized by ggml's to_float. OUT: int32 type id, int32 N, uint64 byte count,
// the blocks, then N floats: what moe_infer.h's dequantizer must reproduce, then the N input floats
// (for quantizers that claim ggml's exact blocks).
int ggml_blocks(const std::string & type_name, int n, const std::string & out) {
    ggml_type type = GGML_TYPE_COUNT;
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * name = ggml_type_name((ggml_type) t);
        if (name && type_name == name) type = (ggml_type) t;
    }
    if (type == GGML_TYPE_COUNT) throw Error("unknown ggml type '" + type_name + "'");
    const int64_t be = ggml_blck_size(type);
    if (n % be) throw Error("N must be a multiple of the block size");
    Rng rng{42};
    std::vector<float> x((size_t) n), y((size_t) n);
    for (int i = 0; i < n; ++i) {
        const int64_t blk = i / 256;
        x[(size_t) i] = (float) rng.normal() * (blk % 7 == 3 ? 1e-3f : blk % 11 == 5 ? 1e3f : 1.f);
    }
    std::vector<uint8_t> q(ggml_row_size(type, n));
    // The IQ types are quantized under an importance matrix, as llama-quantize does (three of them
    // require one): a fixed positive weight per column.
    std::vector<float> imatrix((size_t) n);
    for (int i = 0; i < n; ++i) imatrix[(size_t) i] = 0.5f + (float) ((i * 37) % 101) / 101.f;
    const bool iq = type_name.compare(0, 2, "iq") == 0;
    ggml_quantize_init(type);
    ggml_quantize_chunk(type, x.data(), q.data(), 0, 1, n, iq ? imatrix.data() : nullptr);
    ggml_get_type_traits(type)->to_float(q.data(), y.data(), n);
    std::FILE * f = std::fopen(out.c_str(), "wb");
    if (!f) throw Error("cannot write " + out);
    const int32_t head[2] = {(int32_t) type, n};
    const uint64_t bytes = q.size();
    bool ok = std::fwrite(head, sizeof head, 1, f) == 1 && std::fwrite(&bytes, sizeof bytes, 1, f) == 1 &&
              std::fwrite(q.data(), 1, q.size(), f) == q.size() && std::fwrite(y.data(), sizeof(float), y.size(), f) == y.size() &&
              std::fwrite(x.data(), sizeof(float), x.size(), f) == x.size();
    ok = std::fclose(f) == 0 && ok;
    if (!ok) throw Error("write error on " + out);
    return 0;
}

// --ggml-dequant TYPE IN OUT: ggml's to_float on the raw blocks of IN (any bytes), floats to OUT.
int ggml_dequant(const std::string & type_name, const std::string & in, const std::string & out) {
    ggml_type type = GGML_TYPE_COUNT;
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const char * name = ggml_type_name((ggml_type) t);
        if (name && type_name == name) type = (ggml_type) t;
    }
    if (type == GGML_TYPE_COUNT || !ggml_get_type_traits(type)->to_float) throw Error("unknown ggml type '" + type_name + "'");
    std::FILE * f = std::fopen(in.c_str(), "rb");
    if (!f) throw Error("cannot read " + in);
    std::vector<uint8_t> q;
    uint8_t buf[4096];
    for (size_t got; (got = std::fread(buf, 1, sizeof buf, f)) > 0;) q.insert(q.end(), buf, buf + got);
    std::fclose(f);
    const size_t bs = ggml_type_size(type);
    if (q.empty() || q.size() % bs) throw Error("input is not a whole number of blocks");
    const int64_t n = (int64_t) (q.size() / bs) * ggml_blck_size(type);
    std::vector<float> y((size_t) n);
    ggml_get_type_traits(type)->to_float(q.data(), y.data(), n);
    f = std::fopen(out.c_str(), "wb");
    if (!f) throw Error("cannot write " + out);
    bool ok = std::fwrite(y.data(), sizeof(float), y.size(), f) == y.size();
    ok = std::fclose(f) == 0 && ok;
    if (!ok) throw Error("write error on " + out);
    return 0;
}

int main(int argc, char ** argv) {
    try {
        if (argc == 5 && std::string(argv[1]) == "--ggml-blocks") return ggml_blocks(argv[2], to_int(argv[3], "N"), argv[4]);
        if (argc == 5 && std::string(argv[1]) == "--ggml-dequant") return ggml_dequant(argv[2], argv[3], argv[4]);
        return run(parse(argc, argv));
    } catch (const std::exception & e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
