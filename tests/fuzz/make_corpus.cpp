// Writes the seed corpus of fuzz_gguf.cpp: a few tiny, valid GGUF files that reach the reader's
// every branch (all value types, all tensor types, a non-default alignment), both tokenizer kinds,
// and a tiny qwen3moe model that loads completely.
//
// Build and run (from the repository root):
//   g++ -std=c++17 -O1 -I. tests/fuzz/make_corpus.cpp -o /tmp/make_corpus && /tmp/make_corpus tests/fuzz/corpus
// Each file is opened again (GgufFile, Tokenizer, Model) and the results are printed.
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace {

// Little-endian bytes, for the value types GgufWriter has no setter for.
struct Bytes {
    std::vector<uint8_t> b;
    Bytes& le(uint64_t v, int n) {
        for (int i = 0; i < n; ++i) b.push_back((uint8_t)(v >> (8 * i)));
        return *this;
    }
    Bytes& str(const std::string& s) {
        le(s.size(), 8);
        b.insert(b.end(), s.begin(), s.end());
        return *this;
    }
    Bytes& f64(double d) {
        uint64_t u;
        std::memcpy(&u, &d, 8);
        return le(u, 8);
    }
};

// Every gguf_type as a scalar and as an array, and one F32 tensor.
std::vector<uint8_t> all_value_types() {
    Bytes k;
    int n = 0;
    auto key = [&](const char* name, uint32_t type) { k.str(name).le(type, 4); ++n; };
    key("u8", 0); k.le(200, 1);
    key("i8", 1); k.le((uint8_t)-5, 1);
    key("u16", 2); k.le(60000, 2);
    key("i16", 3); k.le((uint16_t)-300, 2);
    key("u32", 4); k.le(7, 4);
    key("i32", 5); k.le((uint32_t)-7, 4);
    key("f32", 6); k.le(0x3f800000, 4);
    key("bool", 7); k.le(1, 1);
    key("str", 8); k.str("hello");
    key("u64", 10); k.le(1ull << 40, 8);
    key("i64", 11); k.le((uint64_t)-2, 8);
    key("f64", 12); k.f64(0.5);
    const uint32_t sizes[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    for (uint32_t t = 0; t <= 12; ++t) {
        if (t == 9) continue;
        std::string name = "arr." + std::to_string(t);
        key(name.c_str(), 9);
        k.le(t, 4).le(2, 8);
        for (int e = 0; e < 2; ++e) {
            if (t == 8) k.str(e ? "yz" : "x");
            else k.le((uint64_t)(e + 1), (int)sizes[t]);
        }
    }
    Bytes f;
    f.b = {'G', 'G', 'U', 'F'};
    f.le(3, 4).le(1, 8).le((uint64_t)n, 8);
    f.b.insert(f.b.end(), k.b.begin(), k.b.end());
    f.str("t").le(1, 4).le(8, 8).le(0, 4).le(0, 8);  // F32 {8} at offset 0
    while (f.b.size() % 32) f.b.push_back(0);
    for (int i = 0; i < 8; ++i) f.le(0x3f800000u + (uint32_t)i, 4);
    return f.b;
}

std::vector<float> values(size_t n, uint64_t seed) {
    std::vector<float> v(n);
    uint64_t s = seed;
    for (float& x : v) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        x = (float)((double)(s >> 40) / (double)(1ull << 24) * 2.0 - 1.0);
    }
    return v;
}

std::vector<uint8_t> all_tensor_types() {
    moe::GgufWriter w;
    w.set_string("general.architecture", "none");
    const moe::TensorType types[] = {moe::TensorType::f32,  moe::TensorType::f16,  moe::TensorType::bf16, moe::TensorType::q8_0,
                                     moe::TensorType::q4_0, moe::TensorType::q4_k, moe::TensorType::q5_k, moe::TensorType::q6_k};
    uint64_t seed = 1;
    for (moe::TensorType t : types) {
        int64_t ne[2] = {moe::tensor_type_block_elems(t) == 1 ? 8 : moe::tensor_type_block_elems(t), 1};
        std::vector<float> v = values((size_t)ne[0], seed++);
        w.add_tensor_f32(std::string("t.") + moe::tensor_type_name(t), t, 2, ne, v.data());
    }
    return w.to_bytes();
}

std::vector<uint8_t> aligned64() {
    moe::GgufWriter w;
    w.set_u32("general.alignment", 64);
    w.set_f32_array("fa", {1.f, 2.f});
    int64_t a[1] = {3}, b[2] = {32, 2};
    std::vector<float> v = values(64, 9);
    w.add_tensor_f32("a", moe::TensorType::f32, 1, a, v.data());
    w.add_tensor_f32("b", moe::TensorType::q8_0, 2, b, v.data());
    return w.to_bytes();
}

// GPT-2 byte-level alphabet: printable bytes map to themselves, the rest to U+0100 upwards.
std::string utf8(uint32_t cp) {
    std::string s;
    if (cp < 0x80) s += (char)cp;
    else if (cp < 0x800) { s += (char)(0xc0 | (cp >> 6)); s += (char)(0x80 | (cp & 63)); }
    else { s += (char)(0xe0 | (cp >> 12)); s += (char)(0x80 | ((cp >> 6) & 63)); s += (char)(0x80 | (cp & 63)); }
    return s;
}
std::vector<std::string> byte_level_tokens() {
    std::vector<std::string> t(256);
    uint32_t next = 256;
    for (uint32_t b = 0; b < 256; ++b) {
        bool printable = (b >= 33 && b <= 126) || (b >= 161 && b <= 172) || (b >= 174);
        t[b] = utf8(printable ? b : next++);
    }
    return t;
}

void add_gpt2_tokenizer(moe::GgufWriter& w) {
    std::vector<std::string> tokens = byte_level_tokens();
    std::string G = utf8(0x120);  // 'Ġ' = space
    for (const std::string& s : {G + "t", std::string("he"), G + "the", std::string("in"), G + "a"}) tokens.push_back(s);
    tokens.push_back("<|endoftext|>");
    std::vector<int32_t> types(tokens.size(), 1);
    types.back() = 3;
    w.set_string("tokenizer.ggml.model", "gpt2");
    w.set_string("tokenizer.ggml.pre", "qwen2");
    w.set_string_array("tokenizer.ggml.tokens", tokens);
    w.set_i32_array("tokenizer.ggml.token_type", types);
    w.set_string_array("tokenizer.ggml.merges", {G + " t", "h e", G + "t he", "i n", G + " a"});
    w.set_u32("tokenizer.ggml.eos_token_id", (uint32_t)tokens.size() - 1);
    w.set_u32("tokenizer.ggml.padding_token_id", (uint32_t)tokens.size() - 1);
    w.set_bool("tokenizer.ggml.add_bos_token", false);
    w.set_string("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}");
}

std::vector<uint8_t> gpt2_tokenizer() {
    moe::GgufWriter w;
    add_gpt2_tokenizer(w);
    return w.to_bytes();
}

std::vector<uint8_t> spm_tokenizer() {
    moe::GgufWriter w;
    std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
    std::vector<int32_t> types = {2, 3, 3};
    std::vector<float> scores = {0, 0, 0};
    char buf[8];
    for (int b = 0; b < 256; ++b) {
        std::snprintf(buf, sizeof buf, "<0x%02X>", b);
        tokens.push_back(buf);
        types.push_back(6);
        scores.push_back(0);
    }
    const std::string U = "\xe2\x96\x81";  // '▁'
    const char* pieces[] = {"a", "b", "h", "e", "t", "th", "he", "the", "in"};
    float score = -1;
    for (const std::string& p : {U, U + "the", U + "a"}) { tokens.push_back(p); types.push_back(1); scores.push_back(score -= 1); }
    for (const char* p : pieces) { tokens.push_back(p); types.push_back(1); scores.push_back(score -= 1); }
    w.set_string("tokenizer.ggml.model", "llama");
    w.set_string_array("tokenizer.ggml.tokens", tokens);
    w.set_i32_array("tokenizer.ggml.token_type", types);
    w.set_f32_array("tokenizer.ggml.scores", scores);
    w.set_u32("tokenizer.ggml.bos_token_id", 1);
    w.set_u32("tokenizer.ggml.eos_token_id", 2);
    w.set_u32("tokenizer.ggml.unknown_token_id", 0);
    w.set_bool("tokenizer.ggml.add_space_prefix", true);
    return w.to_bytes();
}

// A complete qwen3moe: 1 layer, n_embd 32, 2 heads of 16 (1 KV head), 4 experts (2 used) of 32.
std::vector<uint8_t> tiny_qwen3moe() {
    moe::GgufWriter w;
    const int64_t E = 32, HD = 16, NH = 2, NKV = 1, NE = 4, F = 32;
    w.set_string("general.architecture", "qwen3moe");
    w.set_string("general.name", "fuzz seed");
    w.set_u32("qwen3moe.context_length", 64);
    w.set_u32("qwen3moe.embedding_length", (uint32_t)E);
    w.set_u32("qwen3moe.block_count", 1);
    w.set_u32("qwen3moe.attention.head_count", (uint32_t)NH);
    w.set_u32("qwen3moe.attention.head_count_kv", (uint32_t)NKV);
    w.set_u32("qwen3moe.attention.key_length", (uint32_t)HD);
    w.set_u32("qwen3moe.attention.value_length", (uint32_t)HD);
    w.set_u32("qwen3moe.expert_count", (uint32_t)NE);
    w.set_u32("qwen3moe.expert_used_count", 2);
    w.set_u32("qwen3moe.expert_feed_forward_length", (uint32_t)F);
    w.set_f32("qwen3moe.attention.layer_norm_rms_epsilon", 1e-6f);
    w.set_f32("qwen3moe.rope.freq_base", 1e6f);
    add_gpt2_tokenizer(w);
    const int64_t V = 256 + 6;
    uint64_t seed = 100;
    auto add = [&](const std::string& name, moe::TensorType t, std::vector<int64_t> ne) {
        size_t n = 1;
        for (int64_t d : ne) n *= (size_t)d;
        std::vector<float> v = values(n, seed++);
        if (w.add_tensor_f32(name, t, (uint32_t)ne.size(), ne.data(), v.data()) != moe::Status::ok)
            std::fprintf(stderr, "add %s: %s\n", name.c_str(), moe::last_error());
    };
    add("token_embd.weight", moe::TensorType::q8_0, {E, V});
    add("output_norm.weight", moe::TensorType::f32, {E});
    add("blk.0.attn_norm.weight", moe::TensorType::f32, {E});
    add("blk.0.attn_q.weight", moe::TensorType::f16, {E, NH * HD});
    add("blk.0.attn_k.weight", moe::TensorType::f16, {E, NKV * HD});
    add("blk.0.attn_v.weight", moe::TensorType::bf16, {E, NKV * HD});
    add("blk.0.attn_output.weight", moe::TensorType::q8_0, {NH * HD, E});
    add("blk.0.attn_q_norm.weight", moe::TensorType::f32, {HD});
    add("blk.0.attn_k_norm.weight", moe::TensorType::f32, {HD});
    add("blk.0.ffn_norm.weight", moe::TensorType::f32, {E});
    add("blk.0.ffn_gate_inp.weight", moe::TensorType::f32, {E, NE});
    add("blk.0.ffn_gate_exps.weight", moe::TensorType::q4_0, {E, F, NE});
    add("blk.0.ffn_up_exps.weight", moe::TensorType::q8_0, {E, F, NE});
    add("blk.0.ffn_down_exps.weight", moe::TensorType::q8_0, {F, E, NE});
    return w.to_bytes();
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 2) {
        std::fprintf(stderr, "usage: make_corpus DIR\n");
        return 1;
    }
    struct Seed { const char* name; std::vector<uint8_t> bytes; };
    const Seed seeds[] = {
        {"all_value_types.gguf", all_value_types()}, {"all_tensor_types.gguf", all_tensor_types()},
        {"aligned64.gguf", aligned64()},             {"tokenizer_gpt2.gguf", gpt2_tokenizer()},
        {"tokenizer_spm.gguf", spm_tokenizer()},     {"tiny_qwen3moe.gguf", tiny_qwen3moe()},
    };
    int rc = 0;
    for (const Seed& s : seeds) {
        std::string path = std::string(argv[1]) + "/" + s.name;
        std::FILE* f = std::fopen(path.c_str(), "wb");
        if (!f || std::fwrite(s.bytes.data(), 1, s.bytes.size(), f) != s.bytes.size() || std::fclose(f) != 0) {
            std::fprintf(stderr, "cannot write %s\n", path.c_str());
            return 1;
        }
        moe::GgufFile g;
        moe::Status gs = moe::GgufFile::open(path.c_str(), true, &g);
        moe::Tokenizer tok;
        moe::Status ts = gs == moe::Status::ok ? moe::Tokenizer::load(g, &tok) : gs;
        std::string terr = moe::last_error();
        moe::Model m;
        moe::Status ms = moe::Model::load(path.c_str(), moe::LoadOptions{}, &m);
        std::printf("%-24s %6zu bytes  gguf: %s  tokenizer: %s%s%s  model: %s%s%s\n", s.name, s.bytes.size(), moe::status_string(gs),
                    moe::status_string(ts), ts == moe::Status::ok ? "" : " - ", ts == moe::Status::ok ? "" : terr.c_str(),
                    moe::status_string(ms), ms == moe::Status::ok ? "" : " - ", ms == moe::Status::ok ? "" : moe::last_error());
        if (gs != moe::Status::ok) rc = 1;
    }
    return rc;
}
