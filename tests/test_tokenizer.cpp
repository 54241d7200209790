// Tokenizer tests: llama.cpp's vocabulary conformance vectors (ggml-vocab-*.gguf with .inp/.out,
// from MOE_SHARED_DIR/vocab), round trips on those inputs and on random text, streaming
// detokenization of multi-byte characters, special tokens, and hostile tokenizer metadata built in
// memory with GgufWriter (must give a Status with a message naming the key, never a crash).
#include "moe_infer.h"
#include "peer_util.h"

#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

const char* const kVocabs[] = {"qwen2", "qwen35", "llama-bpe", "gpt-2", "deepseek-llm", "llama-spm", "phi-3"};

std::string vocab_dir() { return std::string(MOE_SHARED_DIR) + "/vocab/"; }
std::string vocab_path(const std::string& name) { return vocab_dir() + "ggml-vocab-" + name + ".gguf"; }

bool read_file(const std::string& path, std::string* out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    std::stringstream ss;
    ss << f.rdbuf();
    *out = ss.str();
    return true;
}

// Independent UTF-8 validator (the library's own is what is being tested).
bool valid_utf8(const std::string& s) {
    size_t i = 0;
    while (i < s.size()) {
        unsigned char b = (unsigned char)s[i];
        size_t n;
        uint32_t cp;
        if (b < 0x80) { ++i; continue; }
        if ((b & 0xe0) == 0xc0) { n = 2; cp = b & 0x1f; }
        else if ((b & 0xf0) == 0xe0) { n = 3; cp = b & 0x0f; }
        else if ((b & 0xf8) == 0xf0) { n = 4; cp = b & 0x07; }
        else return false;
        if (i + n > s.size()) return false;
        for (size_t k = 1; k < n; ++k) {
            unsigned char c = (unsigned char)s[i + k];
            if ((c & 0xc0) != 0x80) return false;
            cp = (cp << 6) | (c & 0x3f);
        }
        if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000)) return false;  // overlong
        if (cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return false;
        i += n;
    }
    return true;
}

void append_utf8(std::string* s, uint32_t cp) {
    if (cp < 0x80) {
        s->push_back((char)cp);
    } else if (cp < 0x800) {
        s->push_back((char)(0xc0 | (cp >> 6)));
        s->push_back((char)(0x80 | (cp & 0x3f)));
    } else if (cp < 0x10000) {
        s->push_back((char)(0xe0 | (cp >> 12)));
        s->push_back((char)(0x80 | ((cp >> 6) & 0x3f)));
        s->push_back((char)(0x80 | (cp & 0x3f)));
    } else {
        s->push_back((char)(0xf0 | (cp >> 18)));
        s->push_back((char)(0x80 | ((cp >> 12) & 0x3f)));
        s->push_back((char)(0x80 | ((cp >> 6) & 0x3f)));
        s->push_back((char)(0x80 | (cp & 0x3f)));
    }
}

// Random valid UTF-8 drawn from the scripts and classes the pre-tokenizers treat differently:
// ASCII letters, digits, punctuation and whitespace, apostrophes (contractions), Latin-1, Greek,
// Cyrillic, combining marks, Khmer, CJK, Hangul, fullwidth forms, U+3000, emoji and ZWJ.
std::string random_text(std::mt19937& rng, size_t max_cpts, bool allow_u2581) {
    static const uint32_t kRanges[][2] = {
        {'a', 'z'}, {'A', 'Z'}, {'0', '9'}, {' ', ' '}, {' ', ' '}, {'!', '/'}, {':', '@'}, {'\'', '\''},
        {'\t', '\r'}, {0xa0, 0xff}, {0x391, 0x3c9}, {0x400, 0x44f}, {0x300, 0x36f}, {0x1780, 0x17dd},
        {0x4e00, 0x9fa5}, {0xac00, 0xd7a3}, {0xff01, 0xff5e}, {0x3000, 0x3002}, {0x1f600, 0x1f64f},
        {0x1f680, 0x1f6ff}, {0x200d, 0x200d}, {0x2000, 0x200a}, {0x2580, 0x2582}, {0x10400, 0x1044f},
    };
    std::uniform_int_distribution<size_t> len_dist(0, max_cpts);
    std::uniform_int_distribution<size_t> range_dist(0, sizeof(kRanges) / sizeof(kRanges[0]) - 1);
    size_t n = len_dist(rng);
    std::string s;
    for (size_t i = 0; i < n; ++i) {
        const uint32_t* r = kRanges[range_dist(rng)];
        uint32_t cp = std::uniform_int_distribution<uint32_t>(r[0], r[1])(rng);
        if (cp == 0x2581 && !allow_u2581) cp = 0x2582;
        append_utf8(&s, cp);
    }
    return s;
}

struct VocabCase {
    std::string text;
    std::vector<int32_t> expected;
};

// llama.cpp's test format (tests/test-tokenizer-0): every case in .inp is followed by
// "\n__ggml_vocab_test__\n"; .out has one line of space-separated ids per case. The ids are those
// of tokenize(text, add_special=false, parse_special=false).
bool read_cases(const std::string& name, std::vector<VocabCase>* cases) {
    std::string inp, out;
    if (!read_file(vocab_path(name) + ".inp", &inp) || !read_file(vocab_path(name) + ".out", &out)) return false;
    const std::string sep = "\n__ggml_vocab_test__\n";
    std::vector<std::string> texts;
    for (size_t p = 0;;) {
        size_t q = inp.find(sep, p);
        if (q == std::string::npos) break;
        texts.push_back(inp.substr(p, q - p));
        p = q + sep.size();
    }
    std::istringstream lines(out);
    std::string line;
    size_t i = 0;
    while (std::getline(lines, line) && i < texts.size()) {
        VocabCase c;
        c.text = texts[i++];
        std::istringstream ids(line);
        long v;
        while (ids >> v) c.expected.push_back((int32_t)v);
        cases->push_back(std::move(c));
    }
    return cases->size() == texts.size() && !texts.empty();
}

// Loaded vocabularies, shared by the tests (a GgufFile must outlive nothing here: the tokenizer
// copies what it needs).
const moe::Tokenizer* vocab(const std::string& name) {
    static std::map<std::string, std::unique_ptr<moe::Tokenizer>> cache;
    auto it = cache.find(name);
    if (it != cache.end()) return it->second.get();
    std::unique_ptr<moe::Tokenizer> tok;
    moe::GgufFile file;
    if (moe::GgufFile::open(vocab_path(name).c_str(), true, &file) == moe::Status::ok) {
        tok.reset(new moe::Tokenizer());
        moe::Status s = moe::Tokenizer::load(file, tok.get());
        EXPECT_EQ(s, moe::Status::ok) << name << ": " << moe::last_error();
        if (s != moe::Status::ok) tok.reset();
    }
    return (cache[name] = std::move(tok)).get();
}

std::string ids_to_string(const std::vector<int32_t>& ids) {
    std::string s;
    for (int32_t id : ids) s += (s.empty() ? "" : " ") + std::to_string(id);
    return s;
}

#define SKIP_WITHOUT_VOCAB(name)                                                                         \
    do {                                                                                                 \
        std::ifstream probe(vocab_path(name));                                                           \
        if (!probe) GTEST_SKIP() << "no " << vocab_path(name) << " (set MOE_SHARED_DIR to the shared dir)"; \
    } while (0)

bool is_spm(const std::string& name) { return name == "llama-spm" || name == "phi-3"; }

class VocabTest : public ::testing::TestWithParam<const char*> {};

}  // namespace

TEST_P(VocabTest, Conformance) {
    const std::string name = GetParam();
    SKIP_WITHOUT_VOCAB(name);
    std::vector<VocabCase> cases;
    ASSERT_TRUE(read_cases(name, &cases)) << "cannot read the .inp/.out pair of " << name;
    const moe::Tokenizer* tok = vocab(name);
    ASSERT_NE(tok, nullptr);
    int passed = 0;
    for (size_t i = 0; i < cases.size(); ++i) {
        std::vector<int32_t> ids;
        ASSERT_EQ(tok->encode(cases[i].text, false, false, &ids), moe::Status::ok);
        EXPECT_EQ(ids_to_string(ids), ids_to_string(cases[i].expected)) << name << " case " << i << ": '" << cases[i].text << "'";
        passed += ids == cases[i].expected;
    }
    RecordProperty("cases", (int)cases.size());
    RecordProperty("passed", passed);
    std::printf("[ vocab    ] %s: %d/%zu cases\n", name.c_str(), passed, cases.size());
}

TEST_P(VocabTest, RoundTripOnTestInputs) {
    const std::string name = GetParam();
    SKIP_WITHOUT_VOCAB(name);
    std::vector<VocabCase> cases;
    ASSERT_TRUE(read_cases(name, &cases));
    const moe::Tokenizer* tok = vocab(name);
    ASSERT_NE(tok, nullptr);
    for (const VocabCase& c : cases) {
        for (bool add_special : {false, true}) {
            std::vector<int32_t> ids;
            ASSERT_EQ(tok->encode(c.text, add_special, false, &ids), moe::Status::ok);
            // SentencePiece prefixes a space when encoding; decode() drops it again.
            EXPECT_EQ(tok->decode(ids.data(), ids.size()), c.text) << name << " add_special=" << add_special;
        }
    }
}

TEST_P(VocabTest, RoundTripRandomText) {
    const std::string name = GetParam();
    SKIP_WITHOUT_VOCAB(name);
    const moe::Tokenizer* tok = vocab(name);
    ASSERT_NE(tok, nullptr);
    std::mt19937 rng(1234);
    for (int i = 0; i < 300; ++i) {
        // SentencePiece cannot tell U+2581 from an escaped space: it decodes as ' '.
        std::string text = random_text(rng, 48, !is_spm(name));
        std::vector<int32_t> ids;
        ASSERT_EQ(tok->encode(text, false, false, &ids), moe::Status::ok);
        ASSERT_EQ(tok->decode(ids.data(), ids.size()), text) << name << " tokens " << ids_to_string(ids);
        for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok->n_vocab());
    }
}

TEST_P(VocabTest, InvalidUtf8RoundTripsBytes) {
    const std::string name = GetParam();
    SKIP_WITHOUT_VOCAB(name);
    const moe::Tokenizer* tok = vocab(name);
    ASSERT_NE(tok, nullptr);
    // Bytes that a token gives back alone. All 256 for these vocabularies except deepseek-llm, whose
    // byte-level alphabet lacks the 13 bytes that never occur in UTF-8 (C0 C1 F5..FF): their
    // stand-ins (À Á õ ö ÷ ø ù ú û ü ý þ ÿ) were added as user-defined tokens, which are text.
    bool representable[256];
    int n_missing = 0;
    for (int b = 0; b < 256; ++b) {
        std::string one(1, (char)b);
        std::vector<int32_t> ids;
        ASSERT_EQ(tok->encode(one, false, false, &ids), moe::Status::ok);
        representable[b] = tok->decode(ids.data(), ids.size()) == one;
        if (!representable[b]) {
            ++n_missing;
            EXPECT_TRUE(name == "deepseek-llm" && (b == 0xc0 || b == 0xc1 || b >= 0xf5)) << name << ": byte " << b;
        }
    }
    if (name == "deepseek-llm") {
        EXPECT_EQ(n_missing, 13);
    }
    std::mt19937 rng(99);
    std::vector<std::string> texts = {"\xff", "\xc3", "a\xe2\x82", "\xed\xa0\x80 surrogate", "\xf4\x90\x80\x80", "\xc0\xaf overlong",
                                      "mix \xe4\xb8 \xe4\xb8\xad \x80\x80\x80 end\xf0\x9f\x98"};
    for (int i = 0; i < 300; ++i) {
        std::string t(std::uniform_int_distribution<size_t>(0, 40)(rng), '\0');
        for (char& ch : t) ch = (char)std::uniform_int_distribution<int>(0, 255)(rng);
        texts.push_back(t);
    }
    int checked = 0;
    for (const std::string& text : texts) {
        std::vector<int32_t> ids;
        ASSERT_EQ(tok->encode(text, false, false, &ids), moe::Status::ok);
        for (int32_t id : ids) ASSERT_TRUE(id >= 0 && id < tok->n_vocab());
        if (is_spm(name) && text.find("\xe2\x96\x81") != std::string::npos) continue;
        if (std::any_of(text.begin(), text.end(), [&](char c) { return !representable[(unsigned char)c]; })) continue;
        // Byte-level BPE keeps every byte; SentencePiece falls back to <0xXX> pieces.
        EXPECT_EQ(tok->decode(ids.data(), ids.size()), text) << name;
        ++checked;
    }
    EXPECT_GT(checked, 50);
}

TEST_P(VocabTest, DetokenizerStreamsWholeCharacters) {
    const std::string name = GetParam();
    SKIP_WITHOUT_VOCAB(name);
    const moe::Tokenizer* tok = vocab(name);
    ASSERT_NE(tok, nullptr);
    std::vector<std::string> texts = {
        "Hello 🦙 world 😶‍🌫️ — 我想在apple工作 ～ нещо на Български កាន់តែពិសេស 🚀✅",
        " leading space, then 𐐀𐐁 and e\xcc\x81 (e + combining acute)",
        "🦙🦙🦙",
    };
    std::mt19937 rng(7);
    for (int i = 0; i < 50; ++i) texts.push_back(random_text(rng, 32, !is_spm(name)));
    for (const std::string& text : texts) {
        std::vector<int32_t> ids;
        ASSERT_EQ(tok->encode(text, true, false, &ids), moe::Status::ok);
        moe::Detokenizer detok(*tok);
        std::string all;
        for (int32_t id : ids) {
            std::string chunk;
            detok.push(id, &chunk);
            EXPECT_TRUE(valid_utf8(chunk)) << name << ": chunk of token " << id << " is not valid UTF-8";
            all += chunk;
        }
        std::string rest;
        detok.flush(&rest);
        EXPECT_TRUE(rest.empty()) << name;
        all += rest;
        EXPECT_EQ(all, text) << name;
        // reset() starts a new text, leading-space rule included.
        detok.reset();
        std::string again;
        for (int32_t id : ids) detok.push(id, &again);
        detok.flush(&again);
        EXPECT_EQ(again, text) << name;
    }
}

INSTANTIATE_TEST_SUITE_P(Vocabs, VocabTest, ::testing::ValuesIn(kVocabs),
                         [](const ::testing::TestParamInfo<const char*>& info) {
                             std::string n = info.param;
                             for (char& c : n)
                                 if (c == '-') c = '_';
                             return n;
                         });

TEST(Tokenizer, SpecialTokensQwen2) {
    SKIP_WITHOUT_VOCAB("qwen2");
    const moe::Tokenizer* tok = vocab("qwen2");
    ASSERT_NE(tok, nullptr);
    const int32_t im_start = 151644, im_end = 151645, endoftext = 151643;
    EXPECT_EQ(tok->n_vocab(), 151936);
    EXPECT_EQ(tok->token_text(im_end), "<|im_end|>");
    EXPECT_TRUE(tok->is_control(im_start));
    EXPECT_TRUE(tok->is_end_of_generation(im_end));
    EXPECT_TRUE(tok->is_end_of_generation(endoftext));
    EXPECT_FALSE(tok->is_end_of_generation(im_start));
    EXPECT_FALSE(tok->is_end_of_generation(9707));
    EXPECT_EQ(tok->eos(), endoftext);

    const std::string chat = "<|im_start|>user\nHello<|im_end|>\n";
    std::vector<int32_t> ids;
    ASSERT_EQ(tok->encode(chat, true, true, &ids), moe::Status::ok);  // qwen2 adds no BOS
    ASSERT_GE(ids.size(), 4u);
    EXPECT_EQ(ids.front(), im_start);
    EXPECT_NE(std::find(ids.begin(), ids.end(), im_end), ids.end());
    EXPECT_EQ(tok->decode(ids.data(), ids.size(), true), chat);
    EXPECT_EQ(tok->decode(ids.data(), ids.size(), false), "user\nHello\n");
    EXPECT_EQ(tok->token_to_piece(im_end), "");
    EXPECT_EQ(tok->token_to_piece(im_end, true), "<|im_end|>");

    // Without parse_special the markup is plain text...
    std::vector<int32_t> plain;
    ASSERT_EQ(tok->encode(chat, false, false, &plain), moe::Status::ok);
    EXPECT_EQ(std::find(plain.begin(), plain.end(), im_start), plain.end());
    EXPECT_EQ(tok->decode(plain.data(), plain.size()), chat);
    // ...but user-defined tokens are always matched (llama.cpp and Hugging Face agree).
    std::vector<int32_t> pad;
    ASSERT_EQ(tok->encode("a[PAD151650]b", false, false, &pad), moe::Status::ok);
    EXPECT_NE(std::find(pad.begin(), pad.end(), 151650), pad.end());
    EXPECT_EQ(tok->decode(pad.data(), pad.size()), "a[PAD151650]b");
}

TEST(Tokenizer, BosEosPerFamily) {
    struct Expect { const char* name; int32_t bos; bool adds_bos; };
    const Expect expects[] = {
        {"llama-bpe", 128000, true}, {"qwen2", 151643, false}, {"deepseek-llm", 100000, true}, {"llama-spm", 1, true}, {"gpt-2", 50256, false},
    };
    for (const Expect& e : expects) {
        std::ifstream probe(vocab_path(e.name));
        if (!probe) continue;
        const moe::Tokenizer* tok = vocab(e.name);
        ASSERT_NE(tok, nullptr);
        EXPECT_EQ(tok->bos(), e.bos) << e.name;
        std::vector<int32_t> with, without;
        ASSERT_EQ(tok->encode("Hello world", true, false, &with), moe::Status::ok);
        ASSERT_EQ(tok->encode("Hello world", false, false, &without), moe::Status::ok);
        if (e.adds_bos) {
            ASSERT_EQ(with.size(), without.size() + 1) << e.name;
            EXPECT_EQ(with.front(), e.bos) << e.name;
        } else {
            EXPECT_EQ(with, without) << e.name;
        }
    }
}

TEST(Tokenizer, SentencePieceSpacesAndSpecials) {
    SKIP_WITHOUT_VOCAB("llama-spm");
    const moe::Tokenizer* tok = vocab("llama-spm");
    ASSERT_NE(tok, nullptr);
    std::vector<int32_t> ids;
    // "<s>" is parsed as BOS; the text after a special token gets its own leading space.
    ASSERT_EQ(tok->encode("<s>Hello", false, true, &ids), moe::Status::ok);
    std::vector<int32_t> hello;
    ASSERT_EQ(tok->encode("Hello", false, false, &hello), moe::Status::ok);
    ASSERT_EQ(ids.size(), hello.size() + 1);
    EXPECT_EQ(ids[0], 1);
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + 1, ids.end()), hello);
    EXPECT_EQ(tok->decode(ids.data(), ids.size(), true), "<s> Hello");  // as llama.cpp renders it
    EXPECT_TRUE(tok->is_end_of_generation(2));                         // </s>
    // Byte fallback: a character outside the vocabulary becomes <0xXX> pieces.
    ids.clear();
    ASSERT_EQ(tok->encode("\xf0\x9f\xa6\x99", false, false, &ids), moe::Status::ok);  // 🦙
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(tok->token_text(ids.back()), "<0x99>");
}

TEST(Tokenizer, DetokenizerReplacesInvalidBytes) {
    SKIP_WITHOUT_VOCAB("qwen2");
    const moe::Tokenizer* tok = vocab("qwen2");
    ASSERT_NE(tok, nullptr);
    auto byte_token = [&](unsigned char b) {
        std::vector<int32_t> ids;
        EXPECT_EQ(tok->encode(std::string(1, (char)b), false, false, &ids), moe::Status::ok);
        EXPECT_EQ(ids.size(), 1u);
        return ids.empty() ? -1 : ids[0];
    };
    moe::Detokenizer detok(*tok);
    std::string out;
    detok.push(byte_token(0xe4), &out);  // the first of 3 bytes of 中: held back
    EXPECT_EQ(out, "");
    detok.push(byte_token(0xb8), &out);
    EXPECT_EQ(out, "");
    detok.push(byte_token(0xad), &out);
    EXPECT_EQ(out, "中");
    out.clear();
    detok.push(byte_token(0xff), &out);  // never valid: replaced at once
    EXPECT_EQ(out, "\xef\xbf\xbd");
    out.clear();
    detok.push(byte_token(0xe4), &out);  // an unfinished sequence cut by a plain letter
    detok.push(byte_token('a'), &out);
    EXPECT_EQ(out, "\xef\xbf\xbd" "a");
    out.clear();
    detok.push(byte_token(0xf0), &out);
    detok.push(byte_token(0x9f), &out);
    EXPECT_EQ(out, "");
    detok.flush(&out);  // held bytes of an unfinished sequence become one U+FFFD
    EXPECT_EQ(out, "\xef\xbf\xbd");
}

TEST(Tokenizer, ConcurrentEncodeMatchesSerial) {
    // A loaded Tokenizer is read-only: several threads may encode and decode at once.
    SKIP_WITHOUT_VOCAB("qwen2");
    const moe::Tokenizer* tok = vocab("qwen2");
    ASSERT_NE(tok, nullptr);
    std::vector<VocabCase> cases;
    ASSERT_TRUE(read_cases("qwen2", &cases));
    std::vector<std::vector<int32_t>> serial(cases.size());
    for (size_t i = 0; i < cases.size(); ++i) ASSERT_EQ(tok->encode(cases[i].text, true, true, &serial[i]), moe::Status::ok);
    const int kThreads = 4;
    std::vector<int> mismatches(kThreads, 0);
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
        threads.emplace_back([&, t] {
            for (int rep = 0; rep < 20; ++rep)
                for (size_t i = 0; i < cases.size(); ++i) {
                    std::vector<int32_t> ids;
                    tok->encode(cases[i].text, true, true, &ids);
                    if (ids != serial[i] || tok->decode(ids.data(), ids.size()) != cases[i].text) ++mismatches[(size_t)t];
                }
        });
    }
    for (std::thread& th : threads) th.join();
    for (int m : mismatches) EXPECT_EQ(m, 0);
}

TEST(Tokenizer, EncodeSpeed) {
    SKIP_WITHOUT_VOCAB("qwen2");
    std::string text;
    if (!read_file(std::string(MOE_SHARED_DIR) + "/data/kjv.txt", &text)) GTEST_SKIP() << "no data/kjv.txt";
    text.resize(std::min<size_t>(text.size(), 1 << 20));
    const moe::Tokenizer* tok = vocab("qwen2");
    ASSERT_NE(tok, nullptr);
    std::vector<int32_t> ids;
    auto t0 = std::chrono::steady_clock::now();
    ASSERT_EQ(tok->encode(text, false, false, &ids), moe::Status::ok);
    double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    double mb_per_s = text.size() / 1e6 / seconds;
    std::printf("[ speed    ] qwen2 encode: %.2f MB/s (%zu bytes -> %zu tokens)\n", mb_per_s, text.size(), ids.size());
    RecordProperty("encode_mb_per_s", std::to_string(mb_per_s));
    EXPECT_EQ(tok->decode(ids.data(), ids.size()), text);
#if defined(__OPTIMIZE__) && !defined(__SANITIZE_ADDRESS__)
    EXPECT_GE(mb_per_s, 1.0);
#endif
}

//--- Hostile metadata ---------------------------------------------------------------------------

namespace {

// A small, consistent byte-level BPE vocabulary: the 256 byte stand-ins, a few merges, specials.
struct TinyBpe {
    std::vector<std::string> tokens;
    std::vector<int32_t> types;
    std::vector<std::string> merges;
    TinyBpe() {
        // GPT-2's byte -> stand-in code point table, built independently of the library.
        int extra = 0;
        for (int b = 0; b < 256; ++b) {
            bool printable = (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae);
            std::string s;
            append_utf8(&s, printable ? (uint32_t)b : (uint32_t)(256 + extra++));
            tokens.push_back(s);
        }
        for (const char* t : {"he", "ll", "hell", "hello", "\xc4\xa0w"}) tokens.push_back(t);
        merges = {"h e", "l l", "he ll", "hell o", "\xc4\xa0 w"};
        tokens.push_back("<|endoftext|>");
        tokens.push_back("<|im_end|>");
        types.assign(tokens.size(), 1);
        types[types.size() - 1] = 3;
        types[types.size() - 2] = 3;
    }
    moe::GgufWriter writer() const {
        moe::GgufWriter w;
        w.set_string("general.architecture", "qwen2");
        w.set_string("tokenizer.ggml.model", "gpt2");
        w.set_string("tokenizer.ggml.pre", "qwen2");
        w.set_string_array("tokenizer.ggml.tokens", tokens);
        w.set_i32_array("tokenizer.ggml.token_type", types);
        w.set_string_array("tokenizer.ggml.merges", merges);
        w.set_u32("tokenizer.ggml.eos_token_id", (uint32_t)tokens.size() - 2);
        return w;
    }
};

// Loads the GGUF of `w`; returns the status and the message.
moe::Status load_from(const moe::GgufWriter& w, moe::Tokenizer* tok, std::string* message) {
    static std::vector<std::vector<uint8_t>> keep_alive;  // open_memory needs the bytes to outlive the file
    keep_alive.push_back(w.to_bytes());
    moe::GgufFile file;
    moe::Status s = moe::GgufFile::open_memory(keep_alive.back().data(), keep_alive.back().size(), &file);
    if (s != moe::Status::ok) {
        *message = moe::last_error();
        return s;
    }
    s = moe::Tokenizer::load(file, tok);
    *message = s == moe::Status::ok ? "" : moe::last_error();
    return s;
}

}  // namespace

TEST(TokenizerHostile, TinyVocabularyWorks) {
    TinyBpe v;
    moe::Tokenizer tok;
    std::string msg;
    ASSERT_EQ(load_from(v.writer(), &tok, &msg), moe::Status::ok) << msg;
    EXPECT_TRUE(tok.valid());
    std::vector<int32_t> ids;
    ASSERT_EQ(tok.encode("hello world<|im_end|>", false, true, &ids), moe::Status::ok);
    ASSERT_GE(ids.size(), 3u);
    EXPECT_EQ(tok.token_text(ids[0]), "hello");
    EXPECT_EQ(tok.token_text(ids[1]), "\xc4\xa0w");
    EXPECT_EQ(ids.back(), tok.n_vocab() - 1);
    EXPECT_TRUE(tok.is_end_of_generation(ids.back()));
    EXPECT_EQ(tok.decode(ids.data(), ids.size()), "hello world");
}

TEST(TokenizerHostile, UnknownPreTokenizerFallsBack) {
    TinyBpe v;
    moe::GgufWriter w = v.writer();
    w.set_string("tokenizer.ggml.pre", "some-future-model");
    moe::Tokenizer tok;
    std::string msg;
    ASSERT_EQ(load_from(w, &tok, &msg), moe::Status::ok) << msg;
    std::vector<int32_t> ids;
    ASSERT_EQ(tok.encode("hello  hello", false, false, &ids), moe::Status::ok);
    EXPECT_EQ(tok.decode(ids.data(), ids.size()), "hello  hello");
}

TEST(TokenizerHostile, InconsistentMetadataIsAnError) {
    struct Case {
        const char* what;
        const char* key;  // must appear in the message
        std::function<void(moe::GgufWriter&, const TinyBpe&)> edit;
        moe::Status expect;
    };
    const std::vector<Case> cases = {
        {"token_type shorter than tokens", "tokenizer.ggml.token_type",
         [](moe::GgufWriter& w, const TinyBpe& v) { w.set_i32_array("tokenizer.ggml.token_type", std::vector<int32_t>(v.tokens.size() - 1, 1)); },
         moe::Status::tokenizer_error},
        {"token_type out of range", "tokenizer.ggml.token_type",
         [](moe::GgufWriter& w, const TinyBpe& v) {
             std::vector<int32_t> t = v.types;
             t[5] = 42;
             w.set_i32_array("tokenizer.ggml.token_type", t);
         },
         moe::Status::tokenizer_error},
        {"merge naming an unknown token", "tokenizer.ggml.merges",
         [](moe::GgufWriter& w, const TinyBpe& v) {
             std::vector<std::string> m = v.merges;
             m.push_back("zz qq");
             w.set_string_array("tokenizer.ggml.merges", m);
         },
         moe::Status::tokenizer_error},
        {"merge without a space", "tokenizer.ggml.merges",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_string_array("tokenizer.ggml.merges", {"hello"}); },
         moe::Status::tokenizer_error},
        {"merge whose result is unknown", "tokenizer.ggml.merges",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_string_array("tokenizer.ggml.merges", {"o w"}); },
         moe::Status::tokenizer_error},
        {"bos id out of range", "tokenizer.ggml.bos_token_id",
         [](moe::GgufWriter& w, const TinyBpe& v) { w.set_u32("tokenizer.ggml.bos_token_id", (uint32_t)v.tokens.size()); },
         moe::Status::tokenizer_error},
        {"eos id far out of range", "tokenizer.ggml.eos_token_id",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_u32("tokenizer.ggml.eos_token_id", 0xffffffffu); },
         moe::Status::tokenizer_error},
        {"bos id of the wrong type", "tokenizer.ggml.bos_token_id",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_string("tokenizer.ggml.bos_token_id", "1"); },
         moe::Status::tokenizer_error},
        {"unknown model", "tokenizer.ggml.model",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_string("tokenizer.ggml.model", "bert-ish"); },
         moe::Status::tokenizer_error},
        {"model of the wrong type", "tokenizer.ggml.model",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_u32("tokenizer.ggml.model", 2); },
         moe::Status::tokenizer_error},
        {"tokens of the wrong type", "tokenizer.ggml.tokens",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_i32_array("tokenizer.ggml.tokens", {1, 2, 3}); },
         moe::Status::tokenizer_error},
        {"empty vocabulary", "tokenizer.ggml.tokens",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_string_array("tokenizer.ggml.tokens", {}); },
         moe::Status::tokenizer_error},
        {"scores of the wrong length", "tokenizer.ggml.scores",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_f32_array("tokenizer.ggml.scores", {0.f, 1.f}); },
         moe::Status::tokenizer_error},
        {"merges of the wrong type", "tokenizer.ggml.merges",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_i32_array("tokenizer.ggml.merges", {1}); },
         moe::Status::tokenizer_error},
        {"pre of the wrong type", "tokenizer.ggml.pre",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_u32("tokenizer.ggml.pre", 1); },
         moe::Status::tokenizer_error},
        {"add_bos_token of the wrong type", "tokenizer.ggml.add_bos_token",
         [](moe::GgufWriter& w, const TinyBpe&) { w.set_string("tokenizer.ggml.add_bos_token", "yes"); },
         moe::Status::tokenizer_error},
    };
    for (const Case& c : cases) {
        TinyBpe v;
        moe::GgufWriter w = v.writer();
        c.edit(w, v);
        moe::Tokenizer tok;
        std::string msg;
        moe::Status s = load_from(w, &tok, &msg);
        EXPECT_EQ(s, c.expect) << c.what << ": " << msg;
        EXPECT_NE(msg.find(c.key), std::string::npos) << c.what << ": message '" << msg << "' does not name " << c.key;
        EXPECT_FALSE(tok.valid()) << c.what;
    }
}

TEST(TokenizerHostile, MissingKeys) {
    moe::GgufWriter w;
    w.set_string("general.architecture", "llama");
    moe::Tokenizer tok;
    std::string msg;
    EXPECT_EQ(load_from(w, &tok, &msg), moe::Status::missing_key);
    EXPECT_NE(msg.find("tokenizer.ggml.model"), std::string::npos) << msg;

    w.set_string("tokenizer.ggml.model", "gpt2");
    EXPECT_EQ(load_from(w, &tok, &msg), moe::Status::missing_key);
    EXPECT_NE(msg.find("tokenizer.ggml.tokens"), std::string::npos) << msg;

    TinyBpe v;
    w.set_string_array("tokenizer.ggml.tokens", v.tokens);  // gpt2 without merges
    EXPECT_EQ(load_from(w, &tok, &msg), moe::Status::missing_key);
    EXPECT_NE(msg.find("tokenizer.ggml.merges"), std::string::npos) << msg;
}

TEST(TokenizerHostile, SentencePieceVocabularies) {
    // A tiny SentencePiece vocabulary: <unk>, <s>, </s>, byte pieces, a few normal pieces.
    std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
    std::vector<int32_t> types = {2, 3, 3};
    std::vector<float> scores = {0, 0, 0};
    for (int b = 0; b < 256; ++b) {
        char buf[8];
        std::snprintf(buf, sizeof buf, "<0x%02X>", b);
        tokens.push_back(buf);
        types.push_back(6);
        scores.push_back(0);
    }
    for (const char* t : {"\xe2\x96\x81", "h", "e", "l", "o", "\xe2\x96\x81h", "he", "ll", "\xe2\x96\x81he", "\xe2\x96\x81hell", "\xe2\x96\x81hello"}) {
        tokens.push_back(t);
        types.push_back(1);
        scores.push_back(-(float)tokens.size());
    }
    auto writer = [&](const std::vector<std::string>& tk, const std::vector<int32_t>& ty, const std::vector<float>& sc) {
        moe::GgufWriter w;
        w.set_string("tokenizer.ggml.model", "llama");
        w.set_string_array("tokenizer.ggml.tokens", tk);
        w.set_i32_array("tokenizer.ggml.token_type", ty);
        w.set_f32_array("tokenizer.ggml.scores", sc);
        return w;
    };
    moe::Tokenizer tok;
    std::string msg;
    ASSERT_EQ(load_from(writer(tokens, types, scores), &tok, &msg), moe::Status::ok) << msg;
    EXPECT_EQ(tok.bos(), 1);  // SentencePiece defaults
    EXPECT_EQ(tok.eos(), 2);
    for (const std::string text : {"hello", "hello hello", " hell\xc3\xb8", "\xff\xfe", ""}) {
        std::vector<int32_t> ids;
        ASSERT_EQ(tok.encode(text, true, false, &ids), moe::Status::ok);
        EXPECT_EQ(ids.empty() ? -1 : ids[0], 1);
        EXPECT_EQ(tok.decode(ids.data(), ids.size()), text);
    }
    std::vector<int32_t> ids;
    ASSERT_EQ(tok.encode("hello", false, false, &ids), moe::Status::ok);
    ASSERT_EQ(ids.size(), 1u);
    EXPECT_EQ(tok.token_text(ids[0]), "\xe2\x96\x81hello");

    // A byte-typed token that is not <0xXX>.
    std::vector<std::string> bad_tokens = tokens;
    bad_tokens[10] = "0x07";
    EXPECT_EQ(load_from(writer(bad_tokens, types, scores), &tok, &msg), moe::Status::tokenizer_error);
    EXPECT_NE(msg.find("tokenizer.ggml.tokens"), std::string::npos) << msg;
    // NaN scores.
    std::vector<float> nan_scores = scores;
    nan_scores[262] = std::nanf("");
    EXPECT_EQ(load_from(writer(tokens, types, nan_scores), &tok, &msg), moe::Status::tokenizer_error);
    EXPECT_NE(msg.find("tokenizer.ggml.scores"), std::string::npos) << msg;
    // An unknown-token id out of range.
    moe::GgufWriter w = writer(tokens, types, scores);
    w.set_u32("tokenizer.ggml.unknown_token_id", 100000);
    EXPECT_EQ(load_from(w, &tok, &msg), moe::Status::tokenizer_error);
    EXPECT_NE(msg.find("tokenizer.ggml.unknown_token_id"), std::string::npos) << msg;
}

TEST(TokenizerHostile, DegenerateVocabulariesDoNotCrash) {
    // Vocabularies that load but lack pieces: missing byte stand-ins, empty texts, duplicates.
    std::vector<std::string> tokens = {"", "a", "a", "<|x|>", "", "b"};
    std::vector<int32_t> types = {1, 1, 1, 3, 4, 4};
    moe::GgufWriter w;
    w.set_string("tokenizer.ggml.model", "gpt2");
    w.set_string_array("tokenizer.ggml.tokens", tokens);
    w.set_i32_array("tokenizer.ggml.token_type", types);
    w.set_string_array("tokenizer.ggml.merges", {});
    moe::Tokenizer tok;
    std::string msg;
    ASSERT_EQ(load_from(w, &tok, &msg), moe::Status::ok) << msg;
    std::mt19937 rng(5);
    for (int i = 0; i < 100; ++i) {
        std::string text = random_text(rng, 20, true) + "<|x|>b\xff";
        std::vector<int32_t> ids;
        ASSERT_EQ(tok.encode(text, true, true, &ids), moe::Status::ok);
        for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < tok.n_vocab());
        (void)tok.decode(ids.data(), ids.size(), true);
    }
    for (int32_t id : {-5, -1, 6, 1 << 30}) {
        EXPECT_EQ(tok.token_to_piece(id, true), "");
        EXPECT_EQ(tok.token_text(id), "");
        EXPECT_FALSE(tok.is_control(id));
        EXPECT_FALSE(tok.is_end_of_generation(id));
    }

    w.set_string("tokenizer.ggml.model", "llama");  // the same as SentencePiece, no byte pieces
    ASSERT_EQ(load_from(w, &tok, &msg), moe::Status::ok) << msg;
    for (int i = 0; i < 100; ++i) {
        std::string text = random_text(rng, 20, true);
        std::vector<int32_t> ids;
        ASSERT_EQ(tok.encode(text, true, true, &ids), moe::Status::ok);
        for (int32_t id : ids) EXPECT_TRUE(id >= 0 && id < tok.n_vocab());
    }
}

TEST(TokenizerHostile, UnloadedTokenizer) {
    moe::Tokenizer tok;
    EXPECT_FALSE(tok.valid());
    std::vector<int32_t> ids;
    EXPECT_NE(tok.encode("x", true, true, &ids), moe::Status::ok);
    EXPECT_NE(tok.encode("x", true, true, nullptr), moe::Status::ok);
    EXPECT_EQ(tok.n_vocab(), 0);
    EXPECT_EQ(tok.bos(), -1);
    EXPECT_EQ(tok.decode(nullptr, 0), "");
    EXPECT_EQ(tok.chat_template(), "");
    moe::Detokenizer detok(tok);
    std::string out;
    detok.push(3, &out);
    detok.flush(&out);
    EXPECT_EQ(out, "");
    moe::Tokenizer moved(std::move(tok));
    EXPECT_FALSE(moved.valid());
}

//-----------------------------------------------------------------------------
// Pre-tokenizers cross-checked against llama.cpp (llama_peer --tokenize-cases). There are no
// ggml-vocab files for most pre-tokenizer names, so each test writes vocabularies under the name
// and compares our ids with llama.cpp's on every .inp case of the vocab files plus cases aimed at
// what the regexes treat differently (CJK and kana, digit runs, contractions in any case, letter
// case runs, marks, emoji, mixed scripts, whitespace and newline runs, punctuation followed by '/'
// or newlines, controls) and random text. Two vocabularies: the qwen2 one (a real vocabulary), and
// one built from the cases in which every piece of up to kRevealBytes bytes is a single token, so
// that the ids show exactly where the pre-tokenizer cut (a real vocabulary's merges often hide a
// different cut). Skips without the peer.
//-----------------------------------------------------------------------------

namespace {

std::string quote_for_shell(const std::string& s) {
    std::string o = "'";
    for (char c : s) o += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return o + "'";
}

std::string escape_for_message(const std::string& s) {
    std::string o;
    for (unsigned char c : s) {
        if (c == '\n') o += "\\n";
        else if (c == '\r') o += "\\r";
        else if (c == '\t') o += "\\t";
        else if (c < 0x20 || c == 0x7f) { char b[8]; std::snprintf(b, sizeof b, "\\x%02x", c); o += b; }
        else o += (char)c;
    }
    return o;
}

// The cases: every .inp case of the vocab files, then our own, then random text (valid UTF-8 only:
// llama.cpp turns each invalid byte into U+FFFD where we keep the byte, by design).
std::vector<std::string> pretokenizer_cases() {
    std::vector<std::string> cases;
    for (const char* name : {"qwen2", "llama-bpe", "gpt-2", "deepseek-llm", "llama-spm", "phi-3", "qwen35"}) {
        std::string inp;
        if (!read_file(vocab_path(name) + ".inp", &inp)) continue;
        const std::string sep = "\n__ggml_vocab_test__\n";
        for (size_t p = 0;;) {
            size_t q = inp.find(sep, p);
            if (q == std::string::npos) break;
            cases.push_back(inp.substr(p, q - p));
            p = q + sep.size();
        }
    }
    const char* const own[] = {
        // CJK, kana, Hangul, Han outside the common block
        "我想在apple工作", "中文English混合123数字", "日本語のテキスト、カタカナ　ひらがな。", "한국어 텍스트입니다",
        "〇々〆 ⺀ 𠀀𠀁 豈 丽", "漢字かな交じり文ｶﾀｶﾅ", "中文，标点！“引号”（括号）", "abc中def", "中abc", " 中", "a 中", "中 a",
        "中1二22三333四4444", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ㄅㄆㄇ ㄱㄴㄷ", "龥龦 鿿 㐀", "カタカナーひらがなゝ",
        // digits
        "1", "12", "123", "1234", "12345678901234567890", "3.14159", "1,000,000", "٣٤٥ ١٢٣", "①②③ Ⅻ ½ ²³", "x2y33z444",
        "２０２４年", "12abc34", " 123 ", "a1b2c3", "-42", "0x1F600", "v1.2.3-rc4",
        // contractions, in any case
        "I'm you're he's we've they'll I'd don't", "I'M YOU'RE HE'S WE'VE THEY'LL I'D DON'T", "You'Re It'S We'Ve",
        "'s 'S 'll 'LL 'Re 'd", "rock'n'roll", "O'Neil's", "l'été", "''", "'", "'re", "x'", "don’t", "ABC's abc'S",
        "Ünïcödé's ÀB's", "中's 1's", "'sabc", " 's", "\n's",
        // letter case runs (o200k splits them)
        "HelloWorld", "HELLOworld", "helloWORLD", "ABCdef", "ÀB", "ÀBc", "aÀB", "ÉCOLE école", "ПРИВЕТ мир Привет", "ΑΒΓ αβγ",
        "camelCaseString", "XMLHttpRequest", "iPhone", "McDonald's", "ǄǅǆǇ", "ABCÉ", "ÉABC", "abcÉDEF", "DŽungla",
        // combining marks and scripts that use them
        "e\xcc\x81", "naïve café", "nai\xcc\x88ve cafe\xcc\x81", "नमस्ते दुनिया", "สวัสดีครับ", "مرحبا بالعالم", "שָׁלוֹם",
        "កាន់តែពិសេស", "\xcc\x81" "abc", " \xcc\x81", "a \xcc\x81\xcc\x82 b", "!\xcc\x81", "1\xcc\x81",
        // emoji
        "🦙🦙", "Hello 👋🏽 world", "👨‍👩‍👧‍👦 family", "🇺🇸🇯🇵", "✅❌", "😶‍🌫️", " 🚀x", "a🚀b",
        // whitespace and newlines
        "   ", "\t\t", "a  b   c    d", "  leading", "trailing   ", "\n", "\n\n\n", " \n \n ", "a\n\nb", "\r\n", "a\r\nb",
        "\xe3\x80\x80全角スペース\xe3\x80\x80", "a\xc2\xa0" "b", "x \xe2\x80\x83 y", "tabs\tand\x0bvt\x0c" "ff", "\xc2\x85nel",
        "line1\nline2\n", "   \n   x", " \t \n\t x", "a \n", "end with space ", "\n\n  \n\n",
        // punctuation (o200k: [\r\n/]* after a punctuation run)
        "!!!", "...", "a...b", "?!", "foo/bar/baz", "a/\n/b", "http://example.com/path?q=1&r=2", "C:\\path\\file",
        "<tag attr=\"x\">", "{\"json\": [1, 2]}", "-->", " .hidden", "x,y;z", "#include <stdio.h>", "$100 + 5% = ~€",
        "email@domain.org", ".NET", "'quoted'", "\"dq\"", "«guillemets»", "—dash–", "…", "·", "a\n/b", "!/\n/", "!\n/\n/x",
        "//\n//\n", " /**/ ", "(a)[b]{c}", "-_-", "a.b", "._a", ".a", "@Test", "\\n", "`code`",
        // controls and format characters
        "\x01\x02" "abc", "a\x7f" "b", "\x1c\x1d\x1e\x1f", "zero\xe2\x80\x8bwidth", "soft\xc2\xadhyphen", "\x1b[31mred\x1b[0m",
        // code and mixed scripts
        "def f(x):\n    return x**2\n", "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}", "Hello мир 世界 🌍 مرحبا",
        "αβγ123δεζ", "Ⅷ µ ª º", "ß SS ẞ", "İstanbul ıi", "ﬁ ﬂ", "Ω Å K",
    };
    for (const char* c : own) cases.push_back(c);
    std::mt19937 rng(4242);
    for (int i = 0; i < 200; ++i) {
        std::string t = random_text(rng, 24, true);
        if (t.find("\xf0\x9f\x9b\x9c") != std::string::npos) continue;  // U+1F6DC: Unicode 15 (our tables are 14.0)
        if (t.find("\n__ggml_vocab_test__\n") == std::string::npos) cases.push_back(t);
    }
    return cases;
}

// Runs llama.cpp on the cases; one id list per case.
::testing::AssertionResult peer_tokenize(const std::string& peer, const std::string& gguf, const std::vector<std::string>& cases,
                                         bool add_special, std::vector<std::vector<int32_t>>* out) {
    const std::string inp = gguf + ".inp";
    {
        std::ofstream f(inp, std::ios::binary);
        for (const std::string& c : cases) f << c << "\n__ggml_vocab_test__\n";
    }
    const std::string cmd = quote_for_shell(peer) + " -m " + quote_for_shell(gguf) + " --tokenize-cases " + quote_for_shell(inp) +
                            " --no-parse-special" + (add_special ? " --add-special" : "") + " 2>" + quote_for_shell(gguf + ".log");
    FILE* p = popen(cmd.c_str(), "r");
    if (!p) return ::testing::AssertionFailure() << "popen failed: " << cmd;
    std::string text;
    char buf[65536];
    size_t got;
    while ((got = std::fread(buf, 1, sizeof buf, p)) > 0) text.append(buf, got);
    const int rc = pclose(p);
    std::string log;
    read_file(gguf + ".log", &log);
    std::remove(inp.c_str());
    std::remove((gguf + ".log").c_str());
    if (rc != 0) return ::testing::AssertionFailure() << "llama_peer failed (status " << rc << "): " << cmd << "\n" << log;
    out->clear();
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line)) {
        std::vector<int32_t> ids;
        std::istringstream items(line);
        std::string item;
        while (std::getline(items, item, ','))
            if (!item.empty()) ids.push_back((int32_t)std::strtol(item.c_str(), nullptr, 10));
        out->push_back(std::move(ids));
    }
    if (out->size() != cases.size())
        return ::testing::AssertionFailure() << "llama_peer printed " << out->size() << " lines for " << cases.size() << " cases";
    return ::testing::AssertionSuccess();
}

// GPT-2's byte-level alphabet (written here independently of the library's).
std::string byte_stand_in(unsigned char b) {
    static std::string table[256];
    if (table['!'].empty()) {
        int next = 256;
        for (int c = 0; c < 256; ++c) {
            bool printable = (c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) || (c >= 0xae);
            append_utf8(&table[c], printable ? (uint32_t)c : (uint32_t)next++);
        }
    }
    return table[b];
}

// The split-revealing vocabulary: the 256 byte tokens, every substring of 2..kRevealBytes bytes of
// the cases, each with a merge for every way to cut it in two (so BPE joins any piece of up to
// kRevealBytes bytes into one token, whatever the merge order), and a control token <s> as BOS.
constexpr size_t kRevealBytes = 8;
void write_split_revealing_vocab(moe::GgufWriter* w, const std::vector<std::string>& cases) {
    std::vector<std::string> pieces;
    for (const std::string& c : cases)
        for (size_t i = 0; i < c.size(); ++i)
            for (size_t len = 2; len <= kRevealBytes && i + len <= c.size(); ++len) pieces.push_back(c.substr(i, len));
    std::sort(pieces.begin(), pieces.end(), [](const std::string& a, const std::string& b) {
        return a.size() != b.size() ? a.size() < b.size() : a < b;
    });
    pieces.erase(std::unique(pieces.begin(), pieces.end()), pieces.end());
    auto encode = [](const std::string& bytes) {
        std::string o;
        for (unsigned char b : bytes) o += byte_stand_in(b);
        return o;
    };
    std::vector<std::string> tokens, merges;
    for (int b = 0; b < 256; ++b) tokens.push_back(byte_stand_in((unsigned char)b));
    for (const std::string& piece : pieces) {
        tokens.push_back(encode(piece));
        for (size_t cut = 1; cut < piece.size(); ++cut) merges.push_back(encode(piece.substr(0, cut)) + " " + encode(piece.substr(cut)));
    }
    tokens.push_back("<s>");
    std::vector<int32_t> types(tokens.size(), 1);
    types.back() = 3;
    w->set_string("general.architecture", "qwen2");
    w->set_string("tokenizer.ggml.model", "gpt2");
    w->set_string_array("tokenizer.ggml.tokens", tokens);
    w->set_i32_array("tokenizer.ggml.token_type", types);
    w->set_string_array("tokenizer.ggml.merges", merges);
    w->set_u32("tokenizer.ggml.bos_token_id", (uint32_t)tokens.size() - 1);
    w->set_u32("tokenizer.ggml.eos_token_id", (uint32_t)tokens.size() - 1);
}

struct PreCheck {
    const char* pre;      // tokenizer.ggml.pre written into the vocabulary (nullptr: no such key)
    bool drop_merges;     // also leave tokenizer.ggml.merges out
};
void PrintTo(const PreCheck& c, std::ostream* os) { *os << (c.pre ? c.pre : "(no pre key)") << (c.drop_merges ? ", no merges" : ""); }

class PreTokenizerPeerTest : public ::testing::TestWithParam<PreCheck> {};

// Writes `w` with tokenizer.ggml.pre = pre, loads it both ways and compares the ids on `cases`
// (and BOS/EOS defaults on the last few with add_special). Returns the cases that match.
int compare_with_peer(const std::string& peer, moe::GgufWriter w, const char* pre_or_null, const char* vocab_name,
                      const std::vector<std::string>& cases) {
    if (pre_or_null) w.set_string("tokenizer.ggml.pre", pre_or_null);
    const char* pre = pre_or_null ? pre_or_null : "(no pre)";
    const std::string path = moe_test::tmp_dir() + "/moe-pretok-" + std::to_string((long)getpid()) + "-" + vocab_name + ".gguf";
    EXPECT_EQ(w.write(path.c_str()), moe::Status::ok) << moe::last_error();
    moe::GgufFile file;
    EXPECT_EQ(moe::GgufFile::open(path.c_str(), true, &file), moe::Status::ok) << moe::last_error();
    moe::Tokenizer tok;
    moe::Status s = moe::Tokenizer::load(file, &tok);
    EXPECT_EQ(s, moe::Status::ok) << moe::last_error();
    std::vector<std::vector<int32_t>> theirs, theirs_special;
    const std::vector<std::string> few(cases.end() - 8, cases.end());
    bool peer_ok = peer_tokenize(peer, path, cases, false, &theirs) && peer_tokenize(peer, path, few, true, &theirs_special);
    std::remove(path.c_str());
    EXPECT_TRUE(peer_ok) << "llama_peer failed on " << path;
    if (s != moe::Status::ok || !peer_ok) return 0;
    int matched = 0, reported = 0;
    for (size_t i = 0; i < cases.size(); ++i) {
        std::vector<int32_t> ours;
        EXPECT_EQ(tok.encode(cases[i], false, false, &ours), moe::Status::ok);
        if (ours == theirs[i]) {
            ++matched;
        } else if (++reported <= 12) {
            ADD_FAILURE() << pre << " (" << vocab_name << ") case " << i << " '" << escape_for_message(cases[i])
                          << "'\n  ours:      " << ids_to_string(ours) << "\n  llama.cpp: " << ids_to_string(theirs[i]);
        }
    }
    for (size_t i = 0; i < few.size(); ++i) {
        std::vector<int32_t> ours;
        EXPECT_EQ(tok.encode(few[i], true, false, &ours), moe::Status::ok);
        EXPECT_EQ(ids_to_string(ours), ids_to_string(theirs_special[i]))
            << pre << " (" << vocab_name << ") add_special case '" << escape_for_message(few[i]) << "'";
    }
    EXPECT_EQ(matched, (int)cases.size()) << pre << " (" << vocab_name << ")";
    return matched;
}

}  // namespace

TEST_P(PreTokenizerPeerTest, MatchesLlamaCpp) {
    const PreCheck pc = GetParam();
    const std::string peer = moe_test::peer_path();
    if (peer.empty() || !std::ifstream(peer))
        GTEST_SKIP() << "llama_peer not available (set MOE_LLAMA_PEER or configure with -DMOE_PEER_DIR=...)";
    SKIP_WITHOUT_VOCAB("qwen2");
    static const std::vector<std::string> cases = pretokenizer_cases();
    // The qwen2 vocabulary under another pre-tokenizer name.
    moe::GgufFile base;
    ASSERT_EQ(moe::GgufFile::open(vocab_path("qwen2").c_str(), true, &base), moe::Status::ok) << moe::last_error();
    moe::GgufWriter real;
    for (size_t i = 0; i < base.n_keys(); ++i) {
        const std::string& key = base.key_at(i).key;
        if (key == "tokenizer.ggml.pre" || (pc.drop_merges && key == "tokenizer.ggml.merges")) continue;
        real.copy_key(base.key_at(i));
    }
    const int real_matched = compare_with_peer(peer, real, pc.pre, "qwen2", cases);
    int reveal_matched = -1;
    if (!pc.drop_merges) {
        moe::GgufWriter reveal;
        write_split_revealing_vocab(&reveal, cases);
        reveal_matched = compare_with_peer(peer, reveal, pc.pre, "split-revealing", cases);
    }
    std::printf("[ pretok   ] %-14s %s%d/%zu cases match llama.cpp with the qwen2 vocabulary", pc.pre ? pc.pre : "(no pre)", pc.drop_merges ? "(no merges) " : "",
                real_matched, cases.size());
    if (reveal_matched >= 0) std::printf(", %d/%zu with the split-revealing one", reveal_matched, cases.size());
    std::printf("\n");
}

INSTANTIATE_TEST_SUITE_P(
    Pre, PreTokenizerPeerTest,
    ::testing::Values(PreCheck{"qwen35", false}, PreCheck{"deepseek-v3", false}, PreCheck{"gpt-4o", false}, PreCheck{"glm4", false},
                      PreCheck{"lfm2", false}, PreCheck{"kimi-k2", false}, PreCheck{"kimi-k2", true}, PreCheck{"llama-bpe", false},
                      PreCheck{"dbrx", false}, PreCheck{"qwen2", false}, PreCheck{"deepseek-llm", false}, PreCheck{"gpt-2", false},
                      PreCheck{"llama4", false}, PreCheck{"hunyuan-dense", false}, PreCheck{"stablelm2", false},
                      PreCheck{"default", false}, PreCheck{nullptr, false}),
    [](const ::testing::TestParamInfo<PreCheck>& info) {
        std::string n = std::string(info.param.pre ? info.param.pre : "absent") + (info.param.drop_merges ? "_no_merges" : "");
        for (char& c : n)
            if (!std::isalnum((unsigned char)c)) c = '_';
        return n;
    });
