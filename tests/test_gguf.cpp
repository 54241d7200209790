// GGUF reader and writer: round trips through every metadata value type and every supported
// tensor type, byte-exact writer output against a layout built from the spec (formats.md §1.1),
// and hostile files built byte by byte: every prefix of a valid file, absurd counts and lengths,
// overflowing sizes, bad tensor infos. Every rejection must give the right Status and a message
// that names the problem; nothing may crash (the suite is meant to run under ASan + UBSan).
#include "moe_infer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

namespace {

using moe::GgufFile;
using moe::GgufValueType;
using moe::GgufWriter;
using moe::Status;
using moe::TensorType;

// ---------------------------------------------------------------------------------------------
// A tiny little-endian byte builder (independent of the library's writer).

struct Bytes {
    std::vector<uint8_t> b;

    Bytes& raw(const void* p, size_t n) {
        const uint8_t* s = static_cast<const uint8_t*>(p);
        b.insert(b.end(), s, s + n);
        return *this;
    }
    Bytes& le(uint64_t v, int n) {
        for (int i = 0; i < n; ++i) b.push_back((uint8_t)(v >> (8 * i)));
        return *this;
    }
    Bytes& u8(uint8_t v) { return le(v, 1); }
    Bytes& i8(int8_t v) { return le((uint8_t)v, 1); }
    Bytes& u16(uint16_t v) { return le(v, 2); }
    Bytes& i16(int16_t v) { return le((uint16_t)v, 2); }
    Bytes& u32(uint32_t v) { return le(v, 4); }
    Bytes& i32(int32_t v) { return le((uint32_t)v, 4); }
    Bytes& u64(uint64_t v) { return le(v, 8); }
    Bytes& i64(int64_t v) { return le((uint64_t)v, 8); }
    Bytes& f32(float v) {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        return u32(u);
    }
    Bytes& f64(double v) {
        uint64_t u;
        std::memcpy(&u, &v, 8);
        return u64(u);
    }
    // GGUF string: u64 length + bytes.
    Bytes& str(const std::string& s) { return u64(s.size()).raw(s.data(), s.size()); }
    // A string whose length field lies.
    Bytes& str_len(uint64_t len, const std::string& s) { return u64(len).raw(s.data(), s.size()); }
    Bytes& zeros(size_t n) {
        b.insert(b.end(), n, 0);
        return *this;
    }
    Bytes& pad(size_t align) {
        while (b.size() % align) b.push_back(0);
        return *this;
    }
    Bytes& append(const Bytes& o) { return raw(o.b.data(), o.b.size()); }
    size_t size() const { return b.size(); }
};

// gguf_type ids (formats.md §1.2), written as numbers on purpose.
constexpr uint32_t T_U8 = 0, T_I8 = 1, T_U16 = 2, T_I16 = 3, T_U32 = 4, T_I32 = 5, T_F32 = 6, T_BOOL = 7, T_STRING = 8,
                   T_ARRAY = 9, T_U64 = 10, T_I64 = 11, T_F64 = 12;
// ggml type ids (formats.md §1.3).
constexpr uint32_t G_F32 = 0, G_F16 = 1, G_Q4_0 = 2, G_Q8_0 = 8, G_Q4_K = 12, G_Q5_K = 13, G_Q6_K = 14,
                   G_Q8_K = 15, G_MXFP4 = 39;

// Header: magic, version, n_tensors, n_kv.
Bytes header(uint64_t n_tensors, uint64_t n_kv, uint32_t version = 3) {
    Bytes h;
    h.raw("GGUF", 4).u32(version).u64(n_tensors).u64(n_kv);
    return h;
}

Bytes kv_u32(const std::string& key, uint32_t v) { Bytes k; k.str(key).u32(T_U32).u32(v); return k; }
Bytes kv_str(const std::string& key, const std::string& v) { Bytes k; k.str(key).u32(T_STRING).str(v); return k; }

struct TInfo {
    std::string name;
    std::vector<int64_t> ne;
    uint32_t type;
    uint64_t offset;
};

Bytes tensor_info(const TInfo& t) {
    Bytes b;
    b.str(t.name).u32((uint32_t)t.ne.size());
    for (int64_t d : t.ne) b.i64(d);
    b.u32(t.type).u64(t.offset);
    return b;
}

// Whole file: header + KV bytes + tensor infos + padding + `data_bytes` bytes of a pattern.
std::vector<uint8_t> make_gguf(uint64_t n_kv, const Bytes& kvs, const std::vector<TInfo>& tensors, uint64_t data_bytes,
                               uint32_t align = 32) {
    Bytes f = header(tensors.size(), n_kv);
    f.append(kvs);
    for (const TInfo& t : tensors) f.append(tensor_info(t));
    if (!tensors.empty()) f.pad(align);
    for (uint64_t i = 0; i < data_bytes; ++i) f.u8((uint8_t)(i * 7 + 1));
    return f.b;
}

// ---------------------------------------------------------------------------------------------
// Helpers

// The reader sees a heap block of exactly the file's size, so ASan flags any read past the end.
struct ExactBuffer {
    std::unique_ptr<uint8_t[]> p;
    size_t n;
    explicit ExactBuffer(const std::vector<uint8_t>& v) : p(new uint8_t[v.empty() ? 1 : v.size()]), n(v.size()) {
        if (n) std::memcpy(p.get(), v.data(), n);
    }
    ExactBuffer(const uint8_t* d, size_t size) : p(new uint8_t[size ? size : 1]), n(size) {
        if (n) std::memcpy(p.get(), d, n);
    }
};

std::string lower(std::string s) {
    for (char& c : s) c = (char)std::tolower((unsigned char)c);
    return s;
}

bool contains_ci(const std::string& hay, const std::string& needle) { return lower(hay).find(lower(needle)) != std::string::npos; }

std::string tmp_dir() {
    const char* env = std::getenv("MOE_TEST_TMP");
    std::string d = env && *env ? env : ::testing::TempDir();
    if (!d.empty() && d.back() != '/') d += '/';
    return d;
}

// A file name unique to this test and process.
std::string tmp_path(const std::string& tag) {
    const ::testing::TestInfo* ti = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name = std::string("moe_gguf_") + (ti ? ti->test_suite_name() : "x") + "_" + (ti ? ti->name() : "y") + "_" +
                       std::to_string((long)getpid()) + "_" + tag + ".gguf";
    for (char& c : name)
        if (c == '/') c = '_';
    return tmp_dir() + name;
}

bool write_file(const std::string& path, const std::vector<uint8_t>& bytes) {
    std::FILE* f = std::fopen(path.c_str(), "wb");
    if (!f) return false;
    bool ok = bytes.empty() || std::fwrite(bytes.data(), 1, bytes.size(), f) == bytes.size();
    return std::fclose(f) == 0 && ok;
}

// Expects `bytes` to be rejected with `want`, and the message to mention every needle
// (case-insensitive). Checks open_memory and open() with and without mmap.
void expect_reject(const std::vector<uint8_t>& bytes, Status want, const std::vector<std::string>& needles) {
    {
        ExactBuffer buf(bytes);
        GgufFile f;
        Status s = GgufFile::open_memory(buf.p.get(), buf.n, &f);
        EXPECT_EQ(s, want) << "open_memory: got " << moe::status_string(s) << " (" << moe::last_error() << ")";
        std::string msg = moe::last_error();
        EXPECT_FALSE(msg.empty());
        for (const std::string& n : needles) EXPECT_TRUE(contains_ci(msg, n)) << "message '" << msg << "' does not mention '" << n << "'";
        EXPECT_EQ(f.n_tensors(), 0u);
        EXPECT_EQ(f.n_keys(), 0u);
    }
    std::string path = tmp_path("reject");
    ASSERT_TRUE(write_file(path, bytes));
    for (bool mmap : {true, false}) {
        GgufFile f;
        Status s = GgufFile::open(path.c_str(), mmap, &f);
        EXPECT_EQ(s, want) << "open(mmap=" << mmap << "): " << moe::last_error();
        std::string msg = moe::last_error();
        for (const std::string& n : needles) EXPECT_TRUE(contains_ci(msg, n)) << "message '" << msg << "' does not mention '" << n << "'";
    }
    std::remove(path.c_str());
}

Status open_bytes(const std::vector<uint8_t>& bytes, GgufFile* f) { return GgufFile::open_memory(bytes.data(), bytes.size(), f); }

size_t type_bytes(TensorType t, int64_t n) { return (size_t)(n / moe::tensor_type_block_elems(t) * moe::tensor_type_block_bytes(t)); }

const TensorType kAllTypes[] = {TensorType::f32,    TensorType::f16,    TensorType::bf16, TensorType::q8_0, TensorType::q4_0,
                                TensorType::q4_1,   TensorType::q5_0,   TensorType::q5_1, TensorType::iq4_nl, TensorType::iq4_xs,
                                TensorType::tq1_0,  TensorType::tq2_0,
                                TensorType::q2_k,   TensorType::q3_k,   TensorType::q4_k, TensorType::q5_k, TensorType::q6_k,
                                TensorType::q1_0,   TensorType::q2_0,   TensorType::iq3_s, TensorType::iq3_xxs, TensorType::iq2_s,
                                TensorType::iq2_xs, TensorType::iq2_xxs, TensorType::iq1_m, TensorType::iq1_s,
                                TensorType::mxfp4,  TensorType::nvfp4,   TensorType::tq3,   TensorType::tq4,
                                TensorType::affine3_g64, TensorType::affine4_g32};

std::vector<float> pseudo_random(size_t n, uint64_t seed) {
    std::mt19937_64 g(seed);
    std::vector<float> v(n);
    for (float& x : v) x = (float)((double)(g() >> 11) / 9007199254740992.0 * 4.0 - 2.0);
    return v;
}

// Structural invariants every accepted file must satisfy (used by the mutation loop too).
void check_invariants(const GgufFile& f, const uint8_t* base, size_t size) {
    uint32_t a = f.alignment();
    ASSERT_TRUE(a != 0 && (a & (a - 1)) == 0);
    ASSERT_EQ(f.file_size(), size);
    int64_t data_start = -1;
    std::vector<std::pair<uint64_t, uint64_t>> spans;
    for (size_t i = 0; i < f.n_tensors(); ++i) {
        const moe::GgufTensorInfo& t = f.tensor_at(i);
        if (t.name.find('\0') == std::string::npos) {
            ASSERT_EQ(f.find_tensor(t.name.c_str()), &t);
        }
        ASSERT_TRUE(t.n_dims >= 1 && t.n_dims <= 4);
        ASSERT_TRUE(moe::tensor_type_supported(t.type));
        TensorType tt = (TensorType)t.type;
        for (int d = 0; d < 4; ++d) ASSERT_GE(t.ne[d], 1);
        ASSERT_EQ(t.ne[0] % moe::tensor_type_block_elems(tt), 0);
        uint64_t want = (uint64_t)(t.ne[0] / moe::tensor_type_block_elems(tt)) * (uint64_t)moe::tensor_type_block_bytes(tt) *
                        (uint64_t)t.ne[1] * (uint64_t)t.ne[2] * (uint64_t)t.ne[3];
        ASSERT_EQ(t.n_bytes, want);
        ASSERT_EQ(t.offset % a, 0u);
        ASSERT_GE(t.data, base);
        uint64_t at = (uint64_t)(t.data - base);
        ASSERT_LE(at, size);
        ASSERT_LE(t.n_bytes, size - at);
        int64_t ds = (int64_t)(at - t.offset);
        if (data_start < 0) data_start = ds;
        ASSERT_EQ(ds, data_start) << "tensors disagree on the data section start";
        ASSERT_EQ((uint64_t)ds % a, 0u);
        spans.emplace_back(t.offset, t.offset + t.n_bytes);
    }
    std::sort(spans.begin(), spans.end());
    for (size_t i = 1; i < spans.size(); ++i) ASSERT_LE(spans[i - 1].second, spans[i].first) << "overlapping tensors accepted";
    // (A name with an embedded NUL cannot be looked up through a const char*; see NulInNames.)
    for (size_t i = 0; i < f.n_keys(); ++i)
        if (f.key_at(i).key.find('\0') == std::string::npos) {
            ASSERT_EQ(f.find(f.key_at(i).key.c_str()), &f.key_at(i)) << f.key_at(i).key;
        }
}

// Calls every accessor on every key and tensor; touches every tensor byte.
uint64_t walk(const GgufFile& f) {
    uint64_t h = 0;
    for (size_t i = 0; i < f.n_keys(); ++i) {
        const moe::GgufKeyValue& kv = f.key_at(i);
        const char* k = kv.key.c_str();
        uint32_t u;
        float fl;
        bool bo;
        std::string s;
        std::vector<std::string> sa;
        std::vector<float> fa;
        std::vector<int32_t> ia;
        if (f.get_u32(k, &u) == Status::ok) h += u;
        if (f.get_f32(k, &fl) == Status::ok) h += (uint64_t)std::isnan(fl);
        if (f.get_bool(k, &bo) == Status::ok) h += bo;
        if (f.get_string(k, &s) == Status::ok) h += s.size();
        if (f.get_string_array(k, &sa) == Status::ok)
            for (const std::string& x : sa) h += x.size();
        if (f.get_f32_array(k, &fa) == Status::ok) h += fa.size();
        if (f.get_i32_array(k, &ia) == Status::ok)
            for (int32_t x : ia) h += (uint32_t)x;
        if (kv.type == GgufValueType::string) h += kv.scalar_str.str().size();
    }
    std::vector<float> row;
    for (size_t i = 0; i < f.n_tensors(); ++i) {
        const moe::GgufTensorInfo& t = f.tensor_at(i);
        for (uint64_t j = 0; j < t.n_bytes; ++j) h += t.data[j];
        if (t.ne[0] <= (1 << 20)) {
            row.resize((size_t)t.ne[0]);
            if (moe::dequantize_row((TensorType)t.type, t.data, row.data(), t.ne[0]) == Status::ok) h += row.size();
        }
    }
    return h;
}

// A small valid file made by the library's writer: several key types and three tensors.
std::vector<uint8_t> small_valid_file() {
    GgufWriter w;
    w.set_string("general.architecture", "qwen3moe");
    w.set_u32("qwen3moe.block_count", 2);
    w.set_f32("qwen3moe.rope.freq_base", 1e6f);
    w.set_bool("flag", true);
    w.set_string_array("tokenizer.ggml.tokens", {"a", "bc", ""});
    w.set_i32_array("ints", {-1, 2, 3});
    w.set_f32_array("floats", {0.5f});
    std::vector<float> v = pseudo_random(512, 1);
    int64_t ne_a[2] = {32, 2}, ne_b[1] = {256}, ne_c[1] = {8};
    EXPECT_EQ(w.add_tensor_f32("a", TensorType::q8_0, 2, ne_a, v.data()), Status::ok);
    EXPECT_EQ(w.add_tensor_f32("b", TensorType::q4_k, 1, ne_b, v.data()), Status::ok);
    EXPECT_EQ(w.add_tensor_f32("c", TensorType::f32, 1, ne_c, v.data()), Status::ok);
    return w.to_bytes();
}

// ---------------------------------------------------------------------------------------------
// Round trips

TEST(GgufWriter, MetadataRoundTrip) {
    GgufWriter w;
    w.set_u32("u32", 4000000000u);
    w.set_i32("i32", -123456);
    w.set_f32("f32", -2.5f);
    w.set_bool("yes", true);
    w.set_bool("no", false);
    w.set_string("str", std::string("h\xc3\xa9llo\0x", 8));  // UTF-8 and an embedded NUL
    w.set_string("empty", "");
    w.set_string_array("sa", {"one", "", "three", std::string(300, 'z')});
    w.set_string_array("sa_empty", {});
    w.set_f32_array("fa", {1.f, -0.f, 3.25f, INFINITY});
    w.set_i32_array("ia", {INT32_MIN, -1, 0, INT32_MAX});
    w.set_u32("overwritten", 1);
    w.set_u32("overwritten", 2);  // setting a key again replaces it
    std::vector<uint8_t> bytes = w.to_bytes();

    GgufFile f;
    ASSERT_EQ(open_bytes(bytes, &f), Status::ok) << moe::last_error();
    EXPECT_EQ(f.version(), 3u);
    EXPECT_EQ(f.alignment(), 32u);
    EXPECT_EQ(f.n_tensors(), 0u);
    ASSERT_EQ(f.n_keys(), 12u);
    EXPECT_EQ(f.key_at(0).key, "u32");  // insertion order is kept
    EXPECT_EQ(f.key_at(11).key, "overwritten");

    uint32_t u = 0;
    EXPECT_EQ(f.get_u32("u32", &u), Status::ok);
    EXPECT_EQ(u, 4000000000u);
    EXPECT_EQ(f.find("u32")->type, GgufValueType::u32);
    EXPECT_EQ(f.get_u32("overwritten", &u), Status::ok);
    EXPECT_EQ(u, 2u);
    const moe::GgufKeyValue* i = f.find("i32");
    ASSERT_NE(i, nullptr);
    EXPECT_EQ(i->type, GgufValueType::i32);
    EXPECT_EQ((int64_t)i->scalar_u64, -123456);
    EXPECT_EQ(i->scalar_f64, -123456.0);
    EXPECT_EQ(f.get_u32("i32", &u), Status::invalid_file);  // negative: out of range for u32
    float fl = 0;
    EXPECT_EQ(f.get_f32("f32", &fl), Status::ok);
    EXPECT_EQ(fl, -2.5f);
    EXPECT_EQ(f.get_f32("i32", &fl), Status::ok);  // any numeric
    EXPECT_EQ(fl, -123456.f);
    bool b = false;
    EXPECT_EQ(f.get_bool("yes", &b), Status::ok);
    EXPECT_TRUE(b);
    EXPECT_EQ(f.get_bool("no", &b), Status::ok);
    EXPECT_FALSE(b);
    EXPECT_EQ(f.find("yes")->type, GgufValueType::boolean);
    std::string s;
    EXPECT_EQ(f.get_string("str", &s), Status::ok);
    EXPECT_EQ(s, std::string("h\xc3\xa9llo\0x", 8));
    EXPECT_EQ(f.find("str")->scalar_str.size, 8u);
    EXPECT_EQ(f.get_string("empty", &s), Status::ok);
    EXPECT_EQ(s, "");
    std::vector<std::string> sa;
    EXPECT_EQ(f.get_string_array("sa", &sa), Status::ok);
    EXPECT_EQ(sa, (std::vector<std::string>{"one", "", "three", std::string(300, 'z')}));
    EXPECT_EQ(f.find("sa")->array_type, GgufValueType::string);
    EXPECT_EQ(f.find("sa")->array_count, 4u);
    EXPECT_EQ(f.get_string_array("sa_empty", &sa), Status::ok);
    EXPECT_TRUE(sa.empty());
    std::vector<float> fa;
    EXPECT_EQ(f.get_f32_array("fa", &fa), Status::ok);
    ASSERT_EQ(fa.size(), 4u);
    EXPECT_EQ(fa[0], 1.f);
    EXPECT_TRUE(std::signbit(fa[1]));
    EXPECT_EQ(fa[2], 3.25f);
    EXPECT_TRUE(std::isinf(fa[3]));
    std::vector<int32_t> ia;
    EXPECT_EQ(f.get_i32_array("ia", &ia), Status::ok);
    EXPECT_EQ(ia, (std::vector<int32_t>{INT32_MIN, -1, 0, INT32_MAX}));
    EXPECT_EQ(f.get_f32_array("ia", &fa), Status::ok);  // integer arrays read as floats too
    EXPECT_EQ(fa[0], -2147483648.f);

    // Wrong types and missing keys.
    EXPECT_EQ(f.get_string("u32", &s), Status::invalid_file);
    EXPECT_TRUE(contains_ci(moe::last_error(), "u32"));
    EXPECT_EQ(f.get_u32("str", &u), Status::invalid_file);
    EXPECT_EQ(f.get_u32("f32", &u), Status::invalid_file);
    EXPECT_EQ(f.get_f32("str", &fl), Status::invalid_file);
    EXPECT_EQ(f.get_f32("sa", &fl), Status::invalid_file);
    EXPECT_EQ(f.get_bool("str", &b), Status::invalid_file);
    EXPECT_EQ(f.get_string_array("ia", &sa), Status::invalid_file);
    EXPECT_EQ(f.get_string_array("str", &sa), Status::invalid_file);
    EXPECT_EQ(f.get_i32_array("fa", &ia), Status::invalid_file);
    EXPECT_EQ(f.get_i32_array("sa", &ia), Status::invalid_file);
    EXPECT_EQ(f.get_f32_array("sa", &fa), Status::invalid_file);
    EXPECT_EQ(f.get_f32_array("u32", &fa), Status::invalid_file);
    EXPECT_EQ(f.get_u32("nope.key", &u), Status::missing_key);
    EXPECT_TRUE(contains_ci(moe::last_error(), "nope.key"));
    EXPECT_EQ(f.get_string_array("nope.key2", &sa), Status::missing_key);
    EXPECT_TRUE(contains_ci(moe::last_error(), "nope.key2"));
    EXPECT_EQ(f.find("nope"), nullptr);
    EXPECT_EQ(f.find(nullptr), nullptr);
    EXPECT_EQ(f.find_tensor("nope"), nullptr);
}

// Every gguf_type as a scalar and as an array element, written by hand (the writer lacks most).
Bytes all_types_kvs(uint64_t* n_kv) {
    Bytes k;
    k.str("u8").u32(T_U8).u8(200);
    k.str("i8").u32(T_I8).i8(-100);
    k.str("u16").u32(T_U16).u16(60000);
    k.str("i16").u32(T_I16).i16(-30000);
    k.str("u32").u32(T_U32).u32(4000000000u);
    k.str("i32").u32(T_I32).i32(-2000000000);
    k.str("f32").u32(T_F32).f32(0.125f);
    k.str("bool1").u32(T_BOOL).u8(1);
    k.str("bool0").u32(T_BOOL).u8(0);
    k.str("str").u32(T_STRING).str("value");
    k.str("u64").u32(T_U64).u64(0xfedcba9876543210ull);
    k.str("u64small").u32(T_U64).u64(77);
    k.str("i64").u32(T_I64).i64(-5000000000ll);
    k.str("f64").u32(T_F64).f64(-1e300);
    k.str("a_u8").u32(T_ARRAY).u32(T_U8).u64(3).u8(0).u8(128).u8(255);
    k.str("a_i8").u32(T_ARRAY).u32(T_I8).u64(3).i8(-128).i8(0).i8(127);
    k.str("a_u16").u32(T_ARRAY).u32(T_U16).u64(2).u16(0).u16(65535);
    k.str("a_i16").u32(T_ARRAY).u32(T_I16).u64(2).i16(-32768).i16(32767);
    k.str("a_u32").u32(T_ARRAY).u32(T_U32).u64(2).u32(1).u32(7);
    k.str("a_i32").u32(T_ARRAY).u32(T_I32).u64(2).i32(-7).i32(9);
    k.str("a_f32").u32(T_ARRAY).u32(T_F32).u64(2).f32(1.5f).f32(-0.25f);
    k.str("a_bool").u32(T_ARRAY).u32(T_BOOL).u64(3).u8(1).u8(0).u8(1);
    k.str("a_str").u32(T_ARRAY).u32(T_STRING).u64(3).str("x").str("").str("yz");
    k.str("a_u64").u32(T_ARRAY).u32(T_U64).u64(2).u64(5).u64(6);
    k.str("a_i64").u32(T_ARRAY).u32(T_I64).u64(2).i64(-5).i64(6);
    k.str("a_f64").u32(T_ARRAY).u32(T_F64).u64(2).f64(0.5).f64(-3.0);
    k.str("a_empty").u32(T_ARRAY).u32(T_I32).u64(0);
    *n_kv = 27;
    return k;
}

TEST(GgufReader, AllValueTypesHandCrafted) {
    uint64_t n_kv;
    Bytes kvs = all_types_kvs(&n_kv);
    std::vector<uint8_t> bytes = make_gguf(n_kv, kvs, {}, 0);
    ExactBuffer buf(bytes);
    GgufFile f;
    ASSERT_EQ(GgufFile::open_memory(buf.p.get(), buf.n, &f), Status::ok) << moe::last_error();
    ASSERT_EQ(f.n_keys(), n_kv);

    struct Scalar { const char* key; GgufValueType type; uint64_t u; double d; };
    const Scalar scalars[] = {
        {"u8", GgufValueType::u8, 200, 200},
        {"i8", GgufValueType::i8, (uint64_t)(int64_t)-100, -100},
        {"u16", GgufValueType::u16, 60000, 60000},
        {"i16", GgufValueType::i16, (uint64_t)(int64_t)-30000, -30000},
        {"u32", GgufValueType::u32, 4000000000u, 4000000000.0},
        {"i32", GgufValueType::i32, (uint64_t)(int64_t)-2000000000, -2000000000.0},
        {"bool1", GgufValueType::boolean, 1, 1},
        {"bool0", GgufValueType::boolean, 0, 0},
        {"u64", GgufValueType::u64, 0xfedcba9876543210ull, (double)0xfedcba9876543210ull},
        {"i64", GgufValueType::i64, (uint64_t)(int64_t)-5000000000ll, -5000000000.0},
    };
    for (const Scalar& s : scalars) {
        const moe::GgufKeyValue* e = f.find(s.key);
        ASSERT_NE(e, nullptr) << s.key;
        EXPECT_EQ(e->type, s.type) << s.key;
        EXPECT_EQ(e->scalar_u64, s.u) << s.key;
        EXPECT_EQ(e->scalar_f64, s.d) << s.key;
    }
    EXPECT_EQ(f.find("f32")->type, GgufValueType::f32);
    EXPECT_EQ(f.find("f32")->scalar_f64, 0.125);
    EXPECT_EQ(f.find("f64")->type, GgufValueType::f64);
    EXPECT_EQ(f.find("f64")->scalar_f64, -1e300);

    uint32_t u;
    EXPECT_EQ(f.get_u32("u8", &u), Status::ok);
    EXPECT_EQ(u, 200u);
    EXPECT_EQ(f.get_u32("u16", &u), Status::ok);
    EXPECT_EQ(u, 60000u);
    EXPECT_EQ(f.get_u32("u64small", &u), Status::ok);
    EXPECT_EQ(u, 77u);
    EXPECT_EQ(f.get_u32("u64", &u), Status::invalid_file);  // does not fit
    EXPECT_EQ(f.get_u32("i8", &u), Status::invalid_file);   // negative
    EXPECT_EQ(f.get_u32("i64", &u), Status::invalid_file);
    EXPECT_EQ(f.get_u32("f64", &u), Status::invalid_file);  // not an integer
    float fl;
    EXPECT_EQ(f.get_f32("f64", &fl), Status::ok);
    EXPECT_TRUE(std::isinf(fl) && fl < 0);  // -1e300 does not fit a float
    EXPECT_EQ(f.get_f32("i16", &fl), Status::ok);
    EXPECT_EQ(fl, -30000.f);
    EXPECT_EQ(f.get_f32("u8", &fl), Status::ok);
    EXPECT_EQ(fl, 200.f);
    bool b;
    EXPECT_EQ(f.get_bool("bool1", &b), Status::ok);
    EXPECT_TRUE(b);
    EXPECT_EQ(f.get_bool("bool0", &b), Status::ok);
    EXPECT_FALSE(b);
    std::string s;
    EXPECT_EQ(f.get_string("str", &s), Status::ok);
    EXPECT_EQ(s, "value");

    struct Arr { const char* key; GgufValueType et; uint64_t count; size_t elem; };
    const Arr arrays[] = {
        {"a_u8", GgufValueType::u8, 3, 1},   {"a_i8", GgufValueType::i8, 3, 1},     {"a_u16", GgufValueType::u16, 2, 2},
        {"a_i16", GgufValueType::i16, 2, 2}, {"a_u32", GgufValueType::u32, 2, 4},   {"a_i32", GgufValueType::i32, 2, 4},
        {"a_f32", GgufValueType::f32, 2, 4}, {"a_bool", GgufValueType::boolean, 3, 1}, {"a_u64", GgufValueType::u64, 2, 8},
        {"a_i64", GgufValueType::i64, 2, 8}, {"a_f64", GgufValueType::f64, 2, 8},   {"a_str", GgufValueType::string, 3, 0},
        {"a_empty", GgufValueType::i32, 0, 4},
    };
    for (const Arr& a : arrays) {
        const moe::GgufKeyValue* e = f.find(a.key);
        ASSERT_NE(e, nullptr) << a.key;
        EXPECT_EQ(e->type, GgufValueType::array) << a.key;
        EXPECT_EQ(e->array_type, a.et) << a.key;
        EXPECT_EQ(e->array_count, a.count) << a.key;
        if (a.count) {
            ASSERT_NE(e->array_data, nullptr);
            EXPECT_GE(e->array_data, buf.p.get());
            EXPECT_LE(e->array_data + a.count * a.elem, buf.p.get() + buf.n);
        }
    }
    // The raw array bytes point into the buffer: first element of a_u16 is 0, second 65535.
    EXPECT_EQ(f.find("a_u16")->array_data[2], 0xff);
    EXPECT_EQ(f.find("a_u16")->array_data[3], 0xff);

    std::vector<int32_t> ia;
    EXPECT_EQ(f.get_i32_array("a_u8", &ia), Status::ok);
    EXPECT_EQ(ia, (std::vector<int32_t>{0, 128, 255}));
    EXPECT_EQ(f.get_i32_array("a_i8", &ia), Status::ok);
    EXPECT_EQ(ia, (std::vector<int32_t>{-128, 0, 127}));
    EXPECT_EQ(f.get_i32_array("a_u16", &ia), Status::ok);
    EXPECT_EQ(ia, (std::vector<int32_t>{0, 65535}));
    EXPECT_EQ(f.get_i32_array("a_i16", &ia), Status::ok);
    EXPECT_EQ(ia, (std::vector<int32_t>{-32768, 32767}));
    EXPECT_EQ(f.get_i32_array("a_u32", &ia), Status::ok);
    EXPECT_EQ(ia, (std::vector<int32_t>{1, 7}));
    EXPECT_EQ(f.get_i32_array("a_i32", &ia), Status::ok);
    EXPECT_EQ(ia, (std::vector<int32_t>{-7, 9}));
    EXPECT_EQ(f.get_i32_array("a_u64", &ia), Status::ok);
    EXPECT_EQ(ia, (std::vector<int32_t>{5, 6}));
    EXPECT_EQ(f.get_i32_array("a_i64", &ia), Status::ok);
    EXPECT_EQ(ia, (std::vector<int32_t>{-5, 6}));
    EXPECT_EQ(f.get_i32_array("a_empty", &ia), Status::ok);
    EXPECT_TRUE(ia.empty());
    std::vector<float> fa;
    EXPECT_EQ(f.get_f32_array("a_f32", &fa), Status::ok);
    EXPECT_EQ(fa, (std::vector<float>{1.5f, -0.25f}));
    EXPECT_EQ(f.get_f32_array("a_f64", &fa), Status::ok);
    EXPECT_EQ(fa, (std::vector<float>{0.5f, -3.f}));
    EXPECT_EQ(f.get_f32_array("a_i16", &fa), Status::ok);
    EXPECT_EQ(fa, (std::vector<float>{-32768.f, 32767.f}));
    std::vector<std::string> sa;
    EXPECT_EQ(f.get_string_array("a_str", &sa), Status::ok);
    EXPECT_EQ(sa, (std::vector<std::string>{"x", "", "yz"}));
    EXPECT_EQ(f.get_i32_array("a_f64", &ia), Status::invalid_file);
    EXPECT_EQ(f.get_string_array("a_u8", &sa), Status::invalid_file);
    walk(f);
}

TEST(GgufReader, Version2IsReadLikeVersion3) {
    Bytes kvs = kv_u32("k", 5);
    std::vector<uint8_t> bytes = make_gguf(1, kvs, {{"t", {32}, G_F32, 0}}, 128);
    bytes[4] = 2;
    GgufFile f;
    ASSERT_EQ(open_bytes(bytes, &f), Status::ok) << moe::last_error();
    EXPECT_EQ(f.version(), 2u);
    EXPECT_EQ(f.n_tensors(), 1u);
}

// The writer's bytes must equal a layout built independently from formats.md §1.1.
// Our own type ids are named in the file (moe_infer.custom_types, written by GgufWriter), and a
// file that names an id differently, or not at all, is refused with a message naming the tensor.
TEST(GgufWriter, CustomTypesAreNamedAndChecked) {
    std::vector<float> v(256, 0.5f);
    const int64_t ne[2] = {128, 2};
    auto make = [&](const std::vector<std::string>* override_names) {
        GgufWriter w;
        w.set_string("general.name", "custom");
        EXPECT_EQ(w.add_tensor_f32("a", TensorType::tq3, 2, ne, v.data()), Status::ok);
        EXPECT_EQ(w.add_tensor_f32("b", TensorType::q8_0, 2, ne, v.data()), Status::ok);
        EXPECT_EQ(w.add_tensor_f32("c", TensorType::affine4_g64, 2, ne, v.data()), Status::ok);
        EXPECT_EQ(w.add_tensor_f32("d", TensorType::tq3, 2, ne, v.data()), Status::ok);
        if (override_names) w.set_string_array("moe_infer.custom_types", *override_names);
        return w.to_bytes();
    };
    {
        const std::vector<uint8_t> bytes = make(nullptr);
        GgufFile f;
        ASSERT_EQ(open_bytes(bytes, &f), Status::ok) << moe::last_error();
        const moe::GgufKeyValue* kv = f.find("moe_infer.custom_types");
        ASSERT_NE(kv, nullptr);
        EXPECT_EQ(kv->array_count, 2u);  // TQ3 once, AFFINE4_G64
        std::vector<std::string> names;
        ASSERT_EQ(f.get_string_array("moe_infer.custom_types", &names), Status::ok);
        EXPECT_EQ(names, (std::vector<std::string>{std::to_string(0x4D4F0001) + ":TQ3", std::to_string(0x4D4F0022) + ":AFFINE4_G64"}));
        EXPECT_EQ(f.find_tensor("a")->type, (uint32_t)TensorType::tq3);
    }
    {
        const std::vector<std::string> wrong = {std::to_string(0x4D4F0001) + ":TQ9", std::to_string(0x4D4F0022) + ":AFFINE4_G64"};
        const std::vector<uint8_t> bytes = make(&wrong);
        GgufFile f;
        EXPECT_EQ(open_bytes(bytes, &f), Status::unsupported);
        EXPECT_NE(std::string(moe::last_error()).find("TQ9"), std::string::npos) << moe::last_error();
    }
    {
        const std::vector<std::string> missing = {std::to_string(0x4D4F0022) + ":AFFINE4_G64"};
        const std::vector<uint8_t> bytes = make(&missing);
        GgufFile f;
        EXPECT_EQ(open_bytes(bytes, &f), Status::invalid_file);
        EXPECT_NE(std::string(moe::last_error()).find("'a'"), std::string::npos) << moe::last_error();
    }
}

// copy_key reproduces every kind of entry (the way moe-quantize copies a model's metadata).
TEST(GgufWriter, CopyKeyRoundTrip) {
    GgufWriter w;
    w.set_u32("u32", 4000000000u);
    w.set_i32("i32", -7);
    w.set_f32("f32", -2.5f);
    w.set_bool("b", true);
    w.set_string("s", "h\xc3\xa9");
    w.set_string_array("sa", {"x", "", "yz"});
    w.set_f32_array("fa", {1.f, -3.25f});
    w.set_i32_array("ia", {INT32_MIN, 5});
    const std::vector<uint8_t> first = w.to_bytes();
    GgufFile f;
    ASSERT_EQ(open_bytes(first, &f), Status::ok);
    GgufWriter copy;
    for (size_t i = 0; i < f.n_keys(); ++i) copy.copy_key(f.key_at(i));
    EXPECT_EQ(copy.to_bytes(), first);
}

TEST(GgufWriter, BytesMatchTheSpecLayout) {
    std::vector<float> a = {1.f, 2.f, 3.f, 4.f, 5.f};  // 20 bytes: padded to 32
    std::vector<uint16_t> b(64);                       // f16, 128 bytes: no padding
    for (size_t i = 0; i < b.size(); ++i) b[i] = (uint16_t)(0x3c00 + i);
    GgufWriter w;
    w.set_string("general.architecture", "llama");
    w.set_u32("n", 7);
    w.set_f32_array("fa", {0.5f, 1.5f});
    w.set_i32("i", -3);
    w.set_bool("bo", true);
    w.set_string_array("sa", {"p", "qr"});
    w.set_i32_array("ia", {9});
    int64_t ne_a[1] = {5}, ne_b[2] = {16, 4};
    ASSERT_EQ(w.add_tensor("ta", TensorType::f32, 1, ne_a, a.data()), Status::ok);
    ASSERT_EQ(w.add_tensor("tb", TensorType::f16, 2, ne_b, b.data()), Status::ok);

    Bytes e = header(2, 7);
    e.str("general.architecture").u32(T_STRING).str("llama");
    e.str("n").u32(T_U32).u32(7);
    e.str("fa").u32(T_ARRAY).u32(T_F32).u64(2).f32(0.5f).f32(1.5f);
    e.str("i").u32(T_I32).i32(-3);
    e.str("bo").u32(T_BOOL).u8(1);
    e.str("sa").u32(T_ARRAY).u32(T_STRING).u64(2).str("p").str("qr");
    e.str("ia").u32(T_ARRAY).u32(T_I32).u64(1).i32(9);
    e.append(tensor_info({"ta", {5}, G_F32, 0}));
    e.append(tensor_info({"tb", {16, 4}, G_F16, 32}));
    e.pad(32);
    size_t data_offset = e.size();
    for (float x : a) e.f32(x);
    e.pad(32);
    for (uint16_t x : b) e.u16(x);
    e.pad(32);

    std::vector<uint8_t> got = w.to_bytes();
    ASSERT_EQ(got.size(), e.size());
    for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i], e.b[i]) << "first difference at byte " << i;

    GgufFile f;
    ASSERT_EQ(open_bytes(got, &f), Status::ok) << moe::last_error();
    ASSERT_EQ(f.n_tensors(), 2u);
    EXPECT_EQ(f.tensor_at(0).data, got.data() + data_offset);
    EXPECT_EQ(f.tensor_at(1).data, got.data() + data_offset + 32);
    EXPECT_EQ(f.tensor_at(0).n_bytes, 20u);
    EXPECT_EQ(f.tensor_at(1).n_bytes, 128u);
    EXPECT_EQ(f.tensor_at(1).n_elements(), 64);
}

// Tensors of every supported type and rank, through memory and through files (mmap and read).
TEST(GgufWriter, TensorsOfEveryTypeRoundTrip) {
    GgufWriter w;
    w.set_string("general.name", "all types");
    struct Want { std::string name; TensorType type; uint32_t n_dims; int64_t ne[4]; std::vector<uint8_t> bytes; };
    std::vector<Want> wants;
    uint64_t seed = 10;
    for (TensorType t : kAllTypes) {
        int64_t blk = moe::tensor_type_block_elems(t);
        const int64_t shapes[4][4] = {{blk, 1, 1, 1}, {2 * blk, 3, 1, 1}, {blk, 2, 3, 1}, {blk, 1, 2, 2}};
        for (uint32_t nd = 1; nd <= 4; ++nd) {
            Want want;
            want.name = std::string(moe::tensor_type_name(t)) + "." + std::to_string(nd);
            want.type = t;
            want.n_dims = nd;
            int64_t n = 1;
            for (int d = 0; d < 4; ++d) {
                want.ne[d] = d < (int)nd ? shapes[nd - 1][d] : 1;
                n *= want.ne[d];
            }
            std::vector<float> v = pseudo_random((size_t)n, seed++);
            want.bytes.resize(type_bytes(t, n));
            // The IQ grid types have no quantizer: raw bytes, written as they are.
            const bool quantizable = moe::quantize_row(t, v.data(), want.bytes.data(), n) == Status::ok;
            for (size_t i = 0; !quantizable && i < want.bytes.size(); ++i) want.bytes[i] = (uint8_t)(i * 131 + seed);
            if (nd % 2 && quantizable)
                ASSERT_EQ(w.add_tensor_f32(want.name, t, nd, want.ne, v.data()), Status::ok) << moe::last_error();
            else
                ASSERT_EQ(w.add_tensor(want.name, t, nd, want.ne, want.bytes.data()), Status::ok) << moe::last_error();
            wants.push_back(want);
        }
    }
    std::vector<uint8_t> bytes = w.to_bytes();
    std::string path = tmp_path("types");
    ASSERT_EQ(w.write(path.c_str()), Status::ok);

    auto check = [&](const GgufFile& f, const uint8_t* base) {
        ASSERT_EQ(f.n_tensors(), wants.size());
        uint64_t expect_offset = 0;
        for (size_t i = 0; i < wants.size(); ++i) {
            const Want& want = wants[i];
            const moe::GgufTensorInfo& t = f.tensor_at(i);
            EXPECT_EQ(t.name, want.name);
            EXPECT_EQ(f.find_tensor(want.name.c_str()), &t);
            EXPECT_EQ(t.type, (uint32_t)want.type);
            EXPECT_EQ(t.n_dims, want.n_dims);
            for (int d = 0; d < 4; ++d) EXPECT_EQ(t.ne[d], want.ne[d]) << want.name;
            EXPECT_EQ(t.n_bytes, want.bytes.size()) << want.name;
            EXPECT_EQ(t.offset, expect_offset) << want.name;  // llama.cpp's layout rule
            expect_offset += (want.bytes.size() + 31) / 32 * 32;
            EXPECT_EQ((size_t)(t.data - base) % 32, 0u);
            EXPECT_EQ(std::memcmp(t.data, want.bytes.data(), want.bytes.size()), 0) << want.name;
            // The data decodes as the same values the quantizer produced.
            std::vector<float> a((size_t)t.n_elements()), b((size_t)t.n_elements());
            ASSERT_EQ(moe::dequantize_row(want.type, t.data, a.data(), t.n_elements()), Status::ok);
            ASSERT_EQ(moe::dequantize_row(want.type, want.bytes.data(), b.data(), t.n_elements()), Status::ok);
            EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * 4), 0);
        }
        std::string s;
        EXPECT_EQ(f.get_string("general.name", &s), Status::ok);
        EXPECT_EQ(s, "all types");
    };
    {
        ExactBuffer buf(bytes);
        GgufFile f;
        ASSERT_EQ(GgufFile::open_memory(buf.p.get(), buf.n, &f), Status::ok) << moe::last_error();
        check(f, buf.p.get());
        check_invariants(f, buf.p.get(), buf.n);
    }
    size_t data_offset;
    {
        GgufFile g;
        ASSERT_EQ(open_bytes(bytes, &g), Status::ok);
        data_offset = (size_t)(g.tensor_at(0).data - bytes.data());
    }
    for (bool mmap : {true, false}) {
        GgufFile f;
        ASSERT_EQ(GgufFile::open(path.c_str(), mmap, &f), Status::ok) << moe::last_error();
        EXPECT_EQ(f.file_size(), bytes.size());
        const uint8_t* base = f.tensor_at(0).data - data_offset;
        check(f, base);
        // Moving the file keeps the tensor pointers valid (the mapping moves with it).
        const uint8_t* before = f.tensor_at(3).data;
        GgufFile moved(std::move(f));
        EXPECT_EQ(moved.tensor_at(3).data, before);
        EXPECT_EQ(std::memcmp(moved.tensor_at(3).data, wants[3].bytes.data(), wants[3].bytes.size()), 0);
        GgufFile assigned;
        assigned = std::move(moved);
        EXPECT_EQ(assigned.n_tensors(), wants.size());
        walk(assigned);
    }
    std::remove(path.c_str());
}

TEST(GgufWriter, Alignment64) {
    for (uint32_t align : {64u, 128u, 8u}) {
        GgufWriter w;
        w.set_u32("general.alignment", align);
        std::vector<float> v = pseudo_random(512, 3);
        int64_t ne1[1] = {3}, ne2[1] = {64}, ne3[2] = {32, 3};
        ASSERT_EQ(w.add_tensor_f32("x", TensorType::f32, 1, ne1, v.data()), Status::ok);  // 12 bytes
        ASSERT_EQ(w.add_tensor_f32("y", TensorType::q4_0, 1, ne2, v.data()), Status::ok);  // 36 bytes
        ASSERT_EQ(w.add_tensor_f32("z", TensorType::q8_0, 2, ne3, v.data()), Status::ok);  // 102 bytes
        std::vector<uint8_t> bytes = w.to_bytes();
        ExactBuffer buf(bytes);
        GgufFile f;
        ASSERT_EQ(GgufFile::open_memory(buf.p.get(), buf.n, &f), Status::ok) << moe::last_error();
        EXPECT_EQ(f.alignment(), align);
        uint64_t off = 0;
        for (size_t i = 0; i < f.n_tensors(); ++i) {
            const moe::GgufTensorInfo& t = f.tensor_at(i);
            EXPECT_EQ(t.offset, off) << align << " " << t.name;
            off += (t.n_bytes + align - 1) / align * align;
            EXPECT_EQ((size_t)(t.data - buf.p.get()) % align, 0u) << align << " " << t.name;
        }
        check_invariants(f, buf.p.get(), buf.n);
        std::vector<float> got(3);
        ASSERT_EQ(moe::dequantize_row(TensorType::f32, f.find_tensor("x")->data, got.data(), 3), Status::ok);
        EXPECT_EQ(got, std::vector<float>(v.begin(), v.begin() + 3));
    }
}

// Hand-crafted alignment-64 file: tensor infos end at a non-multiple of 64.
TEST(GgufReader, Alignment64HandCrafted) {
    Bytes kvs = kv_u32("general.alignment", 64);
    std::vector<uint8_t> bytes = make_gguf(1, kvs, {{"w", {16}, G_F32, 0}, {"v", {8}, G_F32, 64}}, 128, 64);
    size_t infos_end = 24 + kvs.size() + tensor_info({"w", {16}, G_F32, 0}).size() + tensor_info({"v", {8}, G_F32, 64}).size();
    size_t data_offset = (infos_end + 63) / 64 * 64;
    ASSERT_NE(infos_end % 64, 0u);
    ExactBuffer buf(bytes);
    GgufFile f;
    ASSERT_EQ(GgufFile::open_memory(buf.p.get(), buf.n, &f), Status::ok) << moe::last_error();
    EXPECT_EQ(f.alignment(), 64u);
    EXPECT_EQ(f.find_tensor("w")->data, buf.p.get() + data_offset);
    EXPECT_EQ(f.find_tensor("v")->data, buf.p.get() + data_offset + 64);
    EXPECT_EQ(f.find_tensor("v")->n_bytes, 32u);
    // A 32-aligned (but not 64-aligned) offset is misaligned here.
    expect_reject(make_gguf(1, kvs, {{"w", {8}, G_F32, 0}, {"misplaced", {8}, G_F32, 32}}, 128, 64), Status::invalid_file,
                  {"misplaced"});
    // Alignment 1 and 16 are legal powers of two.
    for (uint32_t a : {1u, 16u}) {
        Bytes k = kv_u32("general.alignment", a);
        std::vector<uint8_t> b2 = make_gguf(1, k, {{"w", {3}, G_F32, 0}, {"v", {2}, G_F32, a == 1 ? 12u : 16u}}, 64, a);
        GgufFile g;
        ASSERT_EQ(open_bytes(b2, &g), Status::ok) << a << ": " << moe::last_error();
        EXPECT_EQ(g.alignment(), a);
    }
}

// A key or tensor name with an embedded NUL must not be mistaken for its prefix: the file is either
// rejected, or the prefix is simply absent.
TEST(GgufReader, NulInNames) {
    Bytes kvs;
    kvs.str(std::string("general.architecture\0evil", 25)).u32(T_STRING).str("llama");
    std::vector<uint8_t> bytes = make_gguf(1, kvs, {{std::string("token_embd.weight\0x", 19), {8}, G_F32, 0}}, 32);
    GgufFile f;
    Status s = open_bytes(bytes, &f);
    if (s == Status::ok) {
        EXPECT_EQ(f.find("general.architecture"), nullptr);
        EXPECT_EQ(f.find_tensor("token_embd.weight"), nullptr);
        std::string v;
        EXPECT_EQ(f.get_string("general.architecture", &v), Status::missing_key);
    } else {
        EXPECT_EQ(s, Status::invalid_file);
    }
}

TEST(GgufReader, ZeroTensorsAndTrailingBytes) {
    std::vector<uint8_t> bytes = make_gguf(0, Bytes(), {}, 0);
    ASSERT_EQ(bytes.size(), 24u);
    GgufFile f;
    ASSERT_EQ(open_bytes(bytes, &f), Status::ok) << moe::last_error();
    EXPECT_EQ(f.n_keys(), 0u);
    EXPECT_EQ(f.n_tensors(), 0u);
    // Bytes after the last tensor (or after the metadata) are ignored.
    bytes = make_gguf(1, kv_u32("k", 1), {}, 0);
    bytes.insert(bytes.end(), 100, 0xab);
    EXPECT_EQ(open_bytes(bytes, &f), Status::ok) << moe::last_error();
    bytes = make_gguf(0, Bytes(), {{"t", {8}, G_F32, 0}}, 32 + 100);
    EXPECT_EQ(open_bytes(bytes, &f), Status::ok) << moe::last_error();
    EXPECT_EQ(f.n_tensors(), 1u);
}

// ---------------------------------------------------------------------------------------------
// Hostile files

TEST(GgufHostile, EveryPrefixOfAValidFileIsRejected) {
    std::vector<uint8_t> full = small_valid_file();
    uint64_t required_end = 0;
    {
        GgufFile f;
        ASSERT_EQ(open_bytes(full, &f), Status::ok) << moe::last_error();
        for (size_t i = 0; i < f.n_tensors(); ++i) {
            const moe::GgufTensorInfo& t = f.tensor_at(i);
            required_end = std::max<uint64_t>(required_end, (uint64_t)(t.data - full.data()) + t.n_bytes);
        }
    }
    ASSERT_GT(required_end, 100u);
    std::string path = tmp_path("prefix");
    for (size_t len = 0; len < full.size(); ++len) {
        std::vector<uint8_t> prefix(full.begin(), full.begin() + (ptrdiff_t)len);
        ExactBuffer buf(prefix);
        GgufFile f;
        Status s = GgufFile::open_memory(buf.p.get(), buf.n, &f);
        if (len < required_end) {
            EXPECT_EQ(s, Status::invalid_file) << "prefix of " << len << " bytes";
            EXPECT_STRNE(moe::last_error(), "") << len;
        } else if (s == Status::ok) {  // only the last tensor's padding is missing
            check_invariants(f, buf.p.get(), buf.n);
        }
        // Through the file paths too (every 7th length and all short ones, to keep it quick).
        if (len < 64 || len % 7 == 0) {
            ASSERT_TRUE(write_file(path, prefix));
            for (bool mmap : {true, false}) {
                GgufFile g;
                Status sf = GgufFile::open(path.c_str(), mmap, &g);
                if (len < required_end) {
                    EXPECT_EQ(sf, Status::invalid_file) << len << " mmap=" << mmap << ": " << moe::last_error();
                }
                EXPECT_STRNE(moe::last_error(), "");
            }
        }
    }
    std::remove(path.c_str());

    // The same for a metadata-only file holding every value type: each cut lands inside a value.
    uint64_t n_kv;
    Bytes kvs = all_types_kvs(&n_kv);
    std::vector<uint8_t> meta = make_gguf(n_kv, kvs, {}, 0);
    for (size_t len = 0; len < meta.size(); ++len) {
        ExactBuffer buf(meta.data(), len);
        GgufFile f;
        EXPECT_EQ(GgufFile::open_memory(buf.p.get(), buf.n, &f), Status::invalid_file) << len;
    }
}

TEST(GgufHostile, HeaderErrors) {
    std::vector<uint8_t> good = make_gguf(1, kv_u32("k", 1), {}, 0);
    {
        std::vector<uint8_t> b = good;
        b[0] = 'g';
        expect_reject(b, Status::invalid_file, {"magic"});
        std::vector<uint8_t> ggml = {'G', 'G', 'M', 'L', 3, 0, 0, 0};
        expect_reject(ggml, Status::invalid_file, {});
        std::vector<uint8_t> reversed = good;  // magic as a big-endian writer would put it
        std::reverse(reversed.begin(), reversed.begin() + 4);
        expect_reject(reversed, Status::invalid_file, {"magic"});
    }
    for (uint32_t v : {0u, 1u, 4u, 0xffffffffu}) {
        std::vector<uint8_t> b = good;
        b[4] = (uint8_t)v; b[5] = (uint8_t)(v >> 8); b[6] = (uint8_t)(v >> 16); b[7] = (uint8_t)(v >> 24);
        expect_reject(b, Status::invalid_file, {"version"});
    }
    {
        // Version 3 written big-endian: 00 00 00 03.
        std::vector<uint8_t> b = good;
        b[4] = 0; b[5] = 0; b[6] = 0; b[7] = 3;
        expect_reject(b, Status::invalid_file, {"endian"});
    }
    expect_reject({'G', 'G', 'U', 'F'}, Status::invalid_file, {});
    expect_reject({'G', 'G', 'U', 'F', 3, 0, 0, 0}, Status::invalid_file, {});
    expect_reject({'G'}, Status::invalid_file, {});
}

TEST(GgufHostile, AbsurdCounts) {
    const uint64_t huge[] = {1ull << 62, 1ull << 63, ~0ull, 1ull << 32, 1000000};
    for (uint64_t n : huge) {
        Bytes t = header(n, 0);
        expect_reject(t.b, Status::invalid_file, {"tensor"});
        Bytes k = header(0, n);
        k.append(kv_u32("k", 1));
        expect_reject(k.b, Status::invalid_file, {});
        Bytes both = header(n, n);
        expect_reject(both.b, Status::invalid_file, {});
    }
    // n_kv one larger than present.
    Bytes k = header(0, 2);
    k.append(kv_u32("only.one", 1));
    expect_reject(k.b, Status::invalid_file, {});
    // n_tensors one larger than present.
    Bytes t = header(2, 0);
    t.append(tensor_info({"only", {32}, G_F32, 0})).pad(32).zeros(128);
    expect_reject(t.b, Status::invalid_file, {});
}

TEST(GgufHostile, HugeStringLengths) {
    for (uint64_t len : {1ull << 63, ~0ull, 1ull << 40, 100ull}) {
        Bytes key = header(0, 1);  // key length
        key.str_len(len, "abc").u32(T_U32).u32(1);
        expect_reject(key.b, Status::invalid_file, {});

        Bytes val = header(0, 1);  // string value length
        val.str("the.key").u32(T_STRING).str_len(len, "abcdef");
        expect_reject(val.b, Status::invalid_file, {"the.key"});

        Bytes arr = header(0, 1);  // second element of a string array
        arr.str("the.array").u32(T_ARRAY).u32(T_STRING).u64(2).str("ok").str_len(len, "xyz");
        expect_reject(arr.b, Status::invalid_file, {"the.array"});

        Bytes tn = header(1, 0);  // tensor name length
        tn.str_len(len, "tname").u32(1).i64(32).u32(G_F32).u64(0).pad(32).zeros(128);
        expect_reject(tn.b, Status::invalid_file, {});
    }
}

TEST(GgufHostile, ArrayCounts) {
    struct Case { uint32_t et; uint64_t count; };
    const Case cases[] = {
        {T_U32, 1ull << 62},      // count * 4 overflows u64 exactly to 0
        {T_U32, (1ull << 62) + 1},  // overflows to 4
        {T_U16, 1ull << 63},      // * 2 overflows to 0
        {T_U64, 1ull << 61},      // * 8 overflows to 0
        {T_F64, (1ull << 61) + 2},
        {T_I8, ~0ull},            // no overflow, far beyond the file
        {T_BOOL, 1ull << 40},
        {T_STRING, 1ull << 62},
        {T_STRING, ~0ull},
        {T_STRING, 1000},
        {T_I32, 3},               // one element short
    };
    for (const Case& c : cases) {
        Bytes b = header(0, 1);
        b.str("arr.key").u32(T_ARRAY).u32(c.et).u64(c.count);
        b.u32(0).u32(0);  // 8 bytes of elements
        expect_reject(b.b, Status::invalid_file, {"arr.key"});
    }
}

TEST(GgufHostile, BadValueTypes) {
    for (uint32_t t : {13u, 100u, 0x80000000u, 0xffffffffu}) {
        Bytes b = header(0, 1);
        b.str("bad.type").u32(t).u64(0);
        expect_reject(b.b, Status::invalid_file, {"bad.type"});
        Bytes a = header(0, 1);
        a.str("bad.elem").u32(T_ARRAY).u32(t).u64(1).u64(0);
        expect_reject(a.b, Status::invalid_file, {"bad.elem"});
    }
    // Arrays of arrays are rejected, empty or not.
    for (uint64_t n : {0ull, 1ull}) {
        Bytes b = header(0, 1);
        b.str("nested").u32(T_ARRAY).u32(T_ARRAY).u64(n);
        if (n) b.u32(T_U8).u64(1).u8(7);
        expect_reject(b.b, Status::invalid_file, {"nested"});
    }
}

TEST(GgufHostile, DuplicateKeysAndTensors) {
    Bytes kvs;
    kvs.append(kv_u32("dup.key", 1)).append(kv_str("other", "x")).append(kv_u32("dup.key", 2));
    expect_reject(make_gguf(3, kvs, {}, 0), Status::invalid_file, {"dup.key"});
    Bytes kvs2;  // same key, different types
    kvs2.append(kv_str("dup.key2", "a")).append(kv_u32("dup.key2", 2));
    expect_reject(make_gguf(2, kvs2, {}, 0), Status::invalid_file, {"dup.key2"});
    expect_reject(make_gguf(0, Bytes(), {{"dup.t", {8}, G_F32, 0}, {"dup.t", {8}, G_F32, 32}}, 64), Status::invalid_file,
                  {"dup.t"});
}

TEST(GgufHostile, BadAlignmentKey) {
    for (uint32_t a : {0u, 3u, 48u, 96u, 0x80000001u}) {
        Bytes k = kv_u32("general.alignment", a);
        expect_reject(make_gguf(1, k, {{"t", {8}, G_F32, 0}}, 64), Status::invalid_file, {"general.alignment"});
        expect_reject(make_gguf(1, k, {}, 0), Status::invalid_file, {"general.alignment"});
    }
    Bytes wrong[4];
    wrong[0].str("general.alignment").u32(T_I32).i32(32);
    wrong[1].str("general.alignment").u32(T_U64).u64(32);
    wrong[2].str("general.alignment").u32(T_STRING).str("32");
    wrong[3].str("general.alignment").u32(T_ARRAY).u32(T_U32).u64(1).u32(32);
    for (const Bytes& k : wrong) expect_reject(make_gguf(1, k, {{"t", {8}, G_F32, 0}}, 64), Status::invalid_file, {"general.alignment"});
}

TEST(GgufHostile, TensorShapes) {
    // n_dims 0 and 5 (the 5-dim case carries five dims so only the count is wrong).
    {
        Bytes b = header(1, 0);
        b.str("dims0").u32(0).u32(G_F32).u64(0).pad(32).zeros(64);
        expect_reject(b.b, Status::invalid_file, {"dims0"});
        Bytes c = header(1, 0);
        c.str("dims5").u32(5).i64(8).i64(1).i64(1).i64(1).i64(1).u32(G_F32).u64(0).pad(32).zeros(64);
        expect_reject(c.b, Status::invalid_file, {"dims5"});
        Bytes d = header(1, 0);
        d.str("dimsbig").u32(0xffffffffu).i64(8).u32(G_F32).u64(0).pad(32).zeros(64);
        expect_reject(d.b, Status::invalid_file, {"dimsbig"});
    }
    // Zero and negative dims, in every position.
    for (int64_t bad : {(int64_t)0, (int64_t)-1, INT64_MIN, (int64_t)-32}) {
        for (int pos = 0; pos < 4; ++pos) {
            std::vector<int64_t> ne = {32, 2, 2, 2};
            ne[pos] = bad;
            expect_reject(make_gguf(0, Bytes(), {{"badshape", ne, G_F32, 0}}, 2048), Status::invalid_file, {"badshape"});
        }
    }
    // Products that overflow 64 bits (or any real size).
    const std::vector<std::vector<int64_t>> overflow = {
        {1ll << 32, 1ll << 32},
        {1ll << 16, 1ll << 16, 1ll << 16, 1ll << 16},
        {INT64_MAX},
        {1ll << 62},
        {32, INT64_MAX},
        {1ll << 40, 1ll << 40, 1ll << 40},
        {(1ll << 61) + 32},  // nbytes = ne0 * 4 overflows, the element count does not
    };
    for (const auto& ne : overflow) {
        for (uint32_t type : {G_F32, G_Q8_0}) {
            std::vector<int64_t> n = ne;
            if (type == G_Q8_0) n[0] = n[0] / 32 * 32;
            expect_reject(make_gguf(0, Bytes(), {{"huge", n, type, 0}}, 64), Status::invalid_file, {"huge"});
        }
    }
    // Row length not a multiple of the block size.
    const std::pair<uint32_t, int64_t> rows[] = {{G_Q8_0, 48}, {G_Q8_0, 1}, {G_Q4_0, 16}, {G_Q4_K, 32}, {G_Q5_K, 128},
                                                 {G_Q6_K, 257}};
    for (const auto& r : rows) expect_reject(make_gguf(0, Bytes(), {{"ragged", {r.second, 2}, r.first, 0}}, 4096), Status::invalid_file, {"ragged"});
    // Tensor name too long (the spec allows 63 bytes): a 63-byte name is fine, a kilobyte is not.
    {
        GgufFile f;
        std::string n63(63, 'n');
        ASSERT_EQ(open_bytes(make_gguf(0, Bytes(), {{n63, {8}, G_F32, 0}}, 32), &f), Status::ok) << moe::last_error();
        EXPECT_NE(f.find_tensor(n63.c_str()), nullptr);
        expect_reject(make_gguf(0, Bytes(), {{std::string(1000, 'n'), {8}, G_F32, 0}}, 32), Status::invalid_file, {});
    }
}

TEST(GgufHostile, UnknownTensorTypes) {
    // Retired 4 and 5, Q8_K (activation only), I8, F64, past ggml's count, ik_llama ids, an
    // unassigned id of ours, garbage.
    for (uint32_t t : {4u, 5u, G_Q8_K, 24u, 28u, 43u, 100u, 0x4D4F0003u, 0xffffffffu}) {
        expect_reject(make_gguf(0, Bytes(), {{"strange.weight", {256}, t, 0}}, 4096), Status::unsupported,
                      {"strange.weight"});
    }
}

TEST(GgufHostile, TensorOffsets) {
    // Past EOF: exactly one byte short, far away, and data section absent.
    expect_reject(make_gguf(0, Bytes(), {{"short", {32}, G_F32, 0}}, 127), Status::invalid_file, {"short"});
    expect_reject(make_gguf(0, Bytes(), {{"far", {8}, G_F32, 1ull << 20}}, 64), Status::invalid_file, {"far"});
    expect_reject(make_gguf(0, Bytes(), {{"second", {8}, G_F32, 0}, {"past", {8}, G_F32, 64}}, 64), Status::invalid_file, {"past"});
    {
        Bytes b = header(1, 0);  // infos end, no padding and no data
        b.append(tensor_info({"nodata", {8}, G_F32, 0}));
        expect_reject(b.b, Status::invalid_file, {});
    }
    // Misaligned offsets.
    for (uint64_t off : {1ull, 4ull, 16ull, 31ull, 33ull})
        expect_reject(make_gguf(0, Bytes(), {{"misaligned", {8}, G_F32, off}}, 256), Status::invalid_file, {"misaligned"});
    // offset + size (and data_offset + offset) overflow.
    for (uint64_t off : {~0ull - 31, ~0ull & ~31ull, (~0ull & ~31ull) - 64, 1ull << 63})
        expect_reject(make_gguf(0, Bytes(), {{"wrap", {32}, G_F32, off}}, 256), Status::invalid_file, {"wrap"});
    // Overlaps: identical, partial, and one inside another; in either info order.
    expect_reject(make_gguf(0, Bytes(), {{"ov.a", {16}, G_F32, 0}, {"ov.b", {16}, G_F32, 0}}, 256), Status::invalid_file,
                  {"ov.a", "ov.b"});
    expect_reject(make_gguf(0, Bytes(), {{"ov.a", {16}, G_F32, 0}, {"ov.b", {16}, G_F32, 32}}, 256), Status::invalid_file,
                  {"ov.a", "ov.b"});
    expect_reject(make_gguf(0, Bytes(), {{"ov.b", {16}, G_F32, 32}, {"ov.a", {64}, G_F32, 0}}, 256), Status::invalid_file,
                  {"ov.a", "ov.b"});
    expect_reject(make_gguf(0, Bytes(), {{"ov.c", {8}, G_F32, 64}, {"ov.a", {8}, G_F32, 0}, {"ov.b", {16}, G_F32, 32}}, 256),
                  Status::invalid_file, {"ov.b", "ov.c"});
    // Adjacent is fine, and out-of-order offsets are fine for this reader.
    GgufFile f;
    EXPECT_EQ(open_bytes(make_gguf(0, Bytes(), {{"b", {8}, G_F32, 32}, {"a", {8}, G_F32, 0}}, 64), &f), Status::ok)
        << moe::last_error();
}

TEST(GgufHostile, OpenPaths) {
    for (bool mmap : {true, false}) {
        GgufFile f;
        std::string missing = tmp_dir() + "definitely/not/here.gguf";
        EXPECT_EQ(GgufFile::open(missing.c_str(), mmap, &f), Status::io_error);
        EXPECT_TRUE(contains_ci(moe::last_error(), "here.gguf")) << moe::last_error();

        std::string dir = tmp_path("dir");
        ASSERT_EQ(mkdir(dir.c_str(), 0700), 0);
        EXPECT_EQ(GgufFile::open(dir.c_str(), mmap, &f), Status::io_error) << "mmap=" << mmap << ": " << moe::last_error();
        EXPECT_STRNE(moe::last_error(), "");
        rmdir(dir.c_str());

        std::string empty = tmp_path("empty");
        ASSERT_TRUE(write_file(empty, {}));
        EXPECT_EQ(GgufFile::open(empty.c_str(), mmap, &f), Status::invalid_file) << moe::last_error();
        EXPECT_STRNE(moe::last_error(), "");
        std::remove(empty.c_str());

        EXPECT_EQ(GgufFile::open(nullptr, mmap, &f), Status::invalid_argument);
        std::string good = tmp_path("good");
        ASSERT_TRUE(write_file(good, small_valid_file()));
        EXPECT_EQ(GgufFile::open(good.c_str(), mmap, nullptr), Status::invalid_argument);
        ASSERT_EQ(GgufFile::open(good.c_str(), mmap, &f), Status::ok) << moe::last_error();
        EXPECT_EQ(f.n_tensors(), 3u);
        std::remove(good.c_str());
        // The mapping stays valid after the file is deleted.
        EXPECT_GT(walk(f), 0u);
    }
    GgufFile f;
    EXPECT_EQ(GgufFile::open_memory(nullptr, 0, &f), Status::invalid_file);
    EXPECT_EQ(GgufFile::open_memory(nullptr, 10, &f), Status::invalid_argument);
    std::vector<uint8_t> good = small_valid_file();
    EXPECT_EQ(GgufFile::open_memory(good.data(), good.size(), nullptr), Status::invalid_argument);
    // An empty GgufFile answers queries safely.
    GgufFile none;
    EXPECT_EQ(none.n_keys(), 0u);
    EXPECT_EQ(none.n_tensors(), 0u);
    EXPECT_EQ(none.find("x"), nullptr);
    EXPECT_EQ(none.find_tensor("x"), nullptr);
    uint32_t u;
    EXPECT_EQ(none.get_u32("x", &u), Status::missing_key);
}

TEST(GgufWriter, RejectsBadTensors) {
    GgufWriter w;
    std::vector<float> v(1024, 1.f);
    int64_t ok[2] = {32, 2};
    int64_t ragged[1] = {48}, zero[2] = {32, 0}, neg[1] = {-32};
    EXPECT_EQ(w.add_tensor_f32("r", TensorType::q8_0, 1, ragged, v.data()), Status::invalid_argument);
    EXPECT_EQ(w.add_tensor("r", TensorType::q8_0, 1, ragged, v.data()), Status::invalid_argument);
    EXPECT_EQ(w.add_tensor("z", TensorType::f32, 2, zero, v.data()), Status::invalid_argument);
    EXPECT_EQ(w.add_tensor("n", TensorType::f32, 1, neg, v.data()), Status::invalid_argument);
    EXPECT_EQ(w.add_tensor("d0", TensorType::f32, 0, ok, v.data()), Status::invalid_argument);
    EXPECT_EQ(w.add_tensor("d5", TensorType::f32, 5, ok, v.data()), Status::invalid_argument);
    EXPECT_NE(w.add_tensor("u", (TensorType)4, 1, ok, v.data()), Status::ok);
    EXPECT_NE(w.add_tensor_f32("u", (TensorType)4, 1, ok, v.data()), Status::ok);
    EXPECT_EQ(w.add_tensor("a", TensorType::f32, 2, ok, v.data()), Status::ok);
    EXPECT_EQ(w.add_tensor("a", TensorType::f32, 2, ok, v.data()), Status::invalid_argument);
    EXPECT_TRUE(contains_ci(moe::last_error(), "a"));
    EXPECT_EQ(w.write((tmp_dir() + "no/such/dir/x.gguf").c_str()), Status::io_error);
    // Only the good tensor made it in.
    std::vector<uint8_t> bytes = w.to_bytes();
    GgufFile f;
    ASSERT_EQ(open_bytes(bytes, &f), Status::ok) << moe::last_error();
    EXPECT_EQ(f.n_tensors(), 1u);
}

// ---------------------------------------------------------------------------------------------
// Random mutations: flips, interesting values, truncation, splices. Fixed seeds; every accepted
// file must satisfy the structural invariants, and nothing may crash or read out of bounds.

std::vector<uint8_t> mutate(std::mt19937_64& g, const std::vector<std::vector<uint8_t>>& seeds) {
    std::vector<uint8_t> b = seeds[g() % seeds.size()];
    int rounds = 1 + (int)(g() % 4);
    static const uint64_t interesting[] = {0, 1, 0x7f, 0xff, 0x7fff, 0xffff, 0x7fffffff, 0xffffffff, 1ull << 32, 1ull << 62,
                                           1ull << 63, ~0ull, 12, 13, 32, 64, 256};
    for (int r = 0; r < rounds && !b.empty(); ++r) {
        switch (g() % 7) {
            case 0: {  // flip a few bytes
                int n = 1 + (int)(g() % 8);
                for (int i = 0; i < n; ++i) b[g() % b.size()] = (uint8_t)g();
                break;
            }
            case 1: {  // flip one bit
                b[g() % b.size()] ^= (uint8_t)(1u << (g() % 8));
                break;
            }
            case 2: {  // an interesting value at a random (often 4-aligned) position
                uint64_t v = interesting[g() % (sizeof interesting / sizeof interesting[0])];
                if (g() % 2) v = ~v + 1 + (g() % 3);  // near the negative of it
                size_t w = (g() % 2) ? 8 : 4;
                if (b.size() < w) break;
                size_t pos = g() % (b.size() - w + 1);
                if (g() % 2) pos &= ~(size_t)3;
                for (size_t i = 0; i < w; ++i) b[pos + i] = (uint8_t)(v >> (8 * i));
                break;
            }
            case 3: {  // truncate
                b.resize(g() % (b.size() + 1));
                break;
            }
            case 4: {  // splice: prefix of this, suffix of another seed
                const std::vector<uint8_t>& o = seeds[g() % seeds.size()];
                size_t cut = g() % (b.size() + 1), from = g() % (o.size() + 1);
                b.resize(cut);
                b.insert(b.end(), o.begin() + (ptrdiff_t)from, o.end());
                break;
            }
            case 5: {  // duplicate or delete a chunk
                size_t a = g() % b.size(), n = 1 + g() % 32;
                n = std::min(n, b.size() - a);
                if (g() % 2) {
                    std::vector<uint8_t> chunk(b.begin() + (ptrdiff_t)a, b.begin() + (ptrdiff_t)(a + n));
                    b.insert(b.begin() + (ptrdiff_t)(g() % (b.size() + 1)), chunk.begin(), chunk.end());
                } else {
                    b.erase(b.begin() + (ptrdiff_t)a, b.begin() + (ptrdiff_t)(a + n));
                }
                break;
            }
            case 6: {  // insert random bytes
                size_t pos = g() % (b.size() + 1), n = 1 + g() % 16;
                std::vector<uint8_t> ins(n);
                for (uint8_t& x : ins) x = (uint8_t)g();
                b.insert(b.begin() + (ptrdiff_t)pos, ins.begin(), ins.end());
                break;
            }
        }
    }
    return b;
}

TEST(GgufHostile, RandomMutations) {
    uint64_t n_kv;
    Bytes kvs = all_types_kvs(&n_kv);
    std::vector<std::vector<uint8_t>> seeds = {
        small_valid_file(), make_gguf(n_kv, kvs, {{"t0", {32, 2}, G_Q8_0, 0}, {"t1", {8}, G_F32, 96}}, 128)};
    {
        GgufFile f;
        ASSERT_EQ(open_bytes(seeds[1], &f), Status::ok) << moe::last_error();
    }
    int accepted = 0, rejected = 0;
    for (uint64_t seed : {1ull, 2ull, 3ull, 4ull}) {
        std::mt19937_64 g(seed);
        for (int it = 0; it < 500; ++it) {
            std::vector<uint8_t> m = mutate(g, seeds);
            ExactBuffer buf(m);
            GgufFile f;
            Status s = GgufFile::open_memory(buf.p.get(), buf.n, &f);
            if (s == Status::ok) {
                ++accepted;
                check_invariants(f, buf.p.get(), buf.n);
                walk(f);
                if (::testing::Test::HasFatalFailure()) {
                    ADD_FAILURE() << "seed " << seed << " iteration " << it;
                    return;
                }
            } else {
                ++rejected;
                EXPECT_TRUE(s == Status::invalid_file || s == Status::unsupported) << moe::status_string(s);
                EXPECT_STRNE(moe::last_error(), "") << "seed " << seed << " iteration " << it;
            }
        }
    }
    EXPECT_GT(accepted, 20);  // the mutations are mild enough that some files still parse
    EXPECT_GT(rejected, 200);
}

}  // namespace
