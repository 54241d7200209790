// libFuzzer target: the GGUF reader, then (if the bytes parse) the tokenizer and the model loader
// on the same bytes. Any crash, sanitizer report, leak or timeout is a bug in moe_infer.h.
//
// Build (from the repository root; clang from Debian: apt-get install clang):
//   clang++ -std=c++17 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
//       -I. tests/fuzz/fuzz_gguf.cpp -o fuzz_gguf
// Only the GGUF reader (no tokenizer, no model loading): add -DFUZZ_GGUF_ONLY.
// Run:
//   mkdir -p /tmp/fuzz_corpus && ./fuzz_gguf -max_total_time=120 -max_len=65536 -rss_limit_mb=2048 \
//       -timeout=10 /tmp/fuzz_corpus tests/fuzz/corpus
// (new inputs go to the first directory; tests/fuzz/corpus holds the seeds, see make_corpus.cpp).
// Reproduce a crash: ./fuzz_gguf crash-<sha1>
#define MOE_INFER_IMPLEMENTATION
#include "moe_infer.h"

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

namespace {

// Calls every accessor on every key and tensor and reads every tensor byte, so a pointer or size
// the reader got wrong shows up under ASan.
uint64_t walk(const moe::GgufFile& f, const uint8_t* base, size_t size) {
    uint64_t h = 0;
    for (size_t i = 0; i < f.n_keys(); ++i) {
        const moe::GgufKeyValue& kv = f.key_at(i);
        const char* k = kv.key.c_str();
        if (f.find(k) == nullptr && kv.key.find('\0') == std::string::npos) __builtin_trap();  // indexed key not found
        uint32_t u;
        float fl;
        bool b;
        std::string s;
        std::vector<std::string> sa;
        std::vector<float> fa;
        std::vector<int32_t> ia;
        if (f.get_u32(k, &u) == moe::Status::ok) h += u;
        if (f.get_f32(k, &fl) == moe::Status::ok) h += fl != fl;
        if (f.get_bool(k, &b) == moe::Status::ok) h += b;
        if (f.get_string(k, &s) == moe::Status::ok) h += s.size();
        if (f.get_string_array(k, &sa) == moe::Status::ok)
            for (const std::string& x : sa) h += x.size();
        if (f.get_f32_array(k, &fa) == moe::Status::ok) h += fa.size();
        if (f.get_i32_array(k, &ia) == moe::Status::ok)
            for (int32_t x : ia) h += (uint32_t)x;
        if (kv.type == moe::GgufValueType::string)
            for (size_t j = 0; j < kv.scalar_str.size; ++j) h += (uint8_t)kv.scalar_str.data[j];
    }
    std::vector<float> row;
    for (size_t i = 0; i < f.n_tensors(); ++i) {
        const moe::GgufTensorInfo& t = f.tensor_at(i);
        if (t.data < base || t.n_bytes > size || (size_t)(t.data - base) > size - t.n_bytes) __builtin_trap();  // outside the file
        for (uint64_t j = 0; j < t.n_bytes; ++j) h += t.data[j];
        if (t.ne[0] > 0 && t.ne[0] <= (1 << 20)) {
            row.resize((size_t)t.ne[0]);
            moe::dequantize_row((moe::TensorType)t.type, t.data, row.data(), t.ne[0]);
        }
        h += f.find_tensor(t.name.c_str()) != nullptr;
    }
    return h;
}

volatile uint64_t g_sink;

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    moe::GgufFile file;
    if (moe::GgufFile::open_memory(data, size, &file) != moe::Status::ok) return 0;
    g_sink = walk(file, data, size);

#ifndef FUZZ_GGUF_ONLY
    // Tokenizer from the same metadata; encode/decode a little text taken from the input's tail.
    moe::Tokenizer tok;
    if (moe::Tokenizer::load(file, &tok) == moe::Status::ok) {
        size_t n = size < 48 ? size : 48;
        std::string text(reinterpret_cast<const char*>(data + size - n), n);
        std::vector<int32_t> ids;
        for (bool special : {false, true}) {
            ids.clear();
            if (tok.encode(text, special, special, &ids) == moe::Status::ok) {
                std::string back = tok.decode(ids.data(), ids.size(), special);
                g_sink = g_sink + back.size();
            }
        }
        int32_t nv = tok.n_vocab();
        for (int32_t i = 0; i < nv && i < 512; ++i) g_sink = g_sink + tok.token_to_piece(i, (i & 1) != 0).size();
        std::vector<int32_t> any;
        for (size_t i = 0; i + 1 < n; i += 2) any.push_back((int32_t)((data[i] | (data[i + 1] << 8)) % (nv > 0 ? nv : 1)));
        moe::Detokenizer detok(tok, true);
        std::string out;
        for (int32_t id : any) detok.push(id, &out);
        detok.flush(&out);
        g_sink = g_sink + out.size() + (uint64_t)tok.bos() + (uint64_t)tok.eos() + tok.chat_template().size();
    }

    // The full model loader (hyper-parameters, tensor shapes, tokenizer consistency).
    moe::Model model;
    moe::LoadOptions options;
    if (moe::Model::load_memory(data, size, options, &model) == moe::Status::ok) {
        const moe::ModelInfo& info = model.info();
        g_sink = g_sink + (uint64_t)info.n_vocab + info.weight_bytes + info.active_bytes_per_token;
    }
#endif
    return 0;
}
