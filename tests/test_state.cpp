// Session state (issue 14, item 3): save/load round trips continue identically, hostile or foreign
// state files are refused without touching the session, and prefix reuse (Session::eval_prompt)
// gives what a fresh evaluation gives.
#include "moe_infer.h"
#include "random_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

namespace {

std::string demo_model_path() { return std::string(MOE_SOURCE_DIR) + "/models/demo-qwen3moe.gguf"; }
std::string temp_path(const char* name) { return std::string(MOE_BINARY_DIR) + "/" + name; }

moe::Model load_demo() {
    moe::Model model;
    EXPECT_EQ(moe::Model::load(demo_model_path().c_str(), moe::LoadOptions{}, &model), moe::Status::ok) << moe::last_error();
    return model;
}

moe::Session make_session(const moe::Model& model, int32_t n_ctx = 256, int32_t gemm_min_tokens = 0) {
    moe::SessionOptions so;
    so.n_threads = 2;
    so.n_ctx = n_ctx;
    so.n_batch = 16;  // several chunks per prompt
    so.gemm_min_tokens = gemm_min_tokens;
    moe::Session s;
    EXPECT_EQ(moe::Session::create(model, so, &s), moe::Status::ok) << moe::last_error();
    return s;
}

std::vector<int32_t> prompt_tokens(const moe::Model& model, const char* text) {
    std::vector<int32_t> ids;
    EXPECT_EQ(model.tokenizer().encode(text, true, false, &ids), moe::Status::ok);
    return ids;
}

// Samples n tokens (temperature 0.9, so the sampler's RNG and history matter), recording each
// step's logits.
std::vector<int32_t> continue_sampling(moe::Session& s, moe::Sampler& sampler, int n, std::vector<float>* logits_seen) {
    const int32_t V = s.model().info().n_vocab;
    std::vector<int32_t> out;
    for (int i = 0; i < n; ++i) {
        logits_seen->insert(logits_seen->end(), s.logits(), s.logits() + V);
        const int32_t t = sampler.sample(s.logits(), V);
        sampler.accept(t);
        out.push_back(t);
        EXPECT_EQ(s.eval(&t, 1), moe::Status::ok) << moe::last_error();
    }
    return out;
}

moe::SamplerOptions sampling_options() {
    moe::SamplerOptions o;
    o.temperature = 0.9f;
    o.seed = 77;
    o.repeat_penalty = 1.2f;
    o.dry_multiplier = 0.5f;
    return o;
}

TEST(SessionState, SaveLoadContinuesIdentically) {
    const moe::Model model = load_demo();
    moe::Session a = make_session(model);
    const std::vector<int32_t> prompt = prompt_tokens(model, "In the beginning God created the heaven and the earth. And the earth was");
    ASSERT_EQ(a.eval(prompt.data(), prompt.size()), moe::Status::ok);
    moe::Sampler sa(sampling_options());
    for (int32_t t : prompt) sa.accept(t);
    std::vector<float> warm;
    continue_sampling(a, sa, 5, &warm);  // the sampler has drawn and advanced its RNG
    const std::string path = temp_path("state_roundtrip.bin");
    ASSERT_EQ(a.save_state(path.c_str(), &sa), moe::Status::ok) << moe::last_error();
    const int32_t saved_pos = a.position();
    std::vector<float> logits_a, logits_b;
    const std::vector<int32_t> tokens_a = continue_sampling(a, sa, 24, &logits_a);

    moe::Session b = make_session(model);
    const std::vector<int32_t> other = {5, 6, 7};
    ASSERT_EQ(b.eval(other.data(), other.size()), moe::Status::ok);  // loading replaces whatever was there
    moe::Sampler sb(sampling_options());
    ASSERT_EQ(b.load_state(path.c_str(), &sb), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(b.position(), saved_pos);
    ASSERT_NE(b.tokens(), nullptr);
    EXPECT_EQ(std::vector<int32_t>(b.tokens(), b.tokens() + prompt.size()), prompt);
    const std::vector<int32_t> tokens_b = continue_sampling(b, sb, 24, &logits_b);
    EXPECT_EQ(tokens_a, tokens_b);
    ASSERT_EQ(logits_a.size(), logits_b.size());
    EXPECT_EQ(std::memcmp(logits_a.data(), logits_b.data(), logits_a.size() * 4), 0) << "logits after the reload differ";

    // In memory, without a sampler: the same bytes minus the sampler part.
    std::vector<uint8_t> bytes;
    ASSERT_EQ(b.save_state(&bytes), moe::Status::ok);
    moe::Session c = make_session(model);
    ASSERT_EQ(c.load_state(bytes.data(), bytes.size()), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(c.position(), b.position());
    EXPECT_EQ(std::memcmp(c.logits(), b.logits(), (size_t)model.info().n_vocab * 4), 0);
    moe::Sampler sc(sampling_options());
    EXPECT_EQ(c.load_state(bytes.data(), bytes.size(), &sc), moe::Status::invalid_argument);  // no sampler state saved
    std::remove(path.c_str());
}

// Every truncation and a set of corruptions are refused with a status (never a crash: ASan/UBSan
// in CI), and a refused load leaves the session as it was.
TEST(SessionState, BadStatesAreRefusedAndChangeNothing) {
    const moe::Model model = load_demo();
    moe::Session a = make_session(model);
    const std::vector<int32_t> prompt = prompt_tokens(model, "And God said, Let there be light");
    ASSERT_EQ(a.eval(prompt.data(), prompt.size()), moe::Status::ok);
    moe::Sampler sa(sampling_options());
    std::vector<uint8_t> good;
    ASSERT_EQ(a.save_state(&good, &sa), moe::Status::ok);

    moe::Session b = make_session(model);
    const std::vector<int32_t> mine = {9, 8, 7, 6};
    ASSERT_EQ(b.eval(mine.data(), mine.size()), moe::Status::ok);
    const std::vector<float> logits_before(b.logits(), b.logits() + model.info().n_vocab);
    auto unchanged = [&]() {
        return b.position() == 4 && std::equal(mine.begin(), mine.end(), b.tokens()) &&
               std::memcmp(b.logits(), logits_before.data(), logits_before.size() * 4) == 0;
    };
    for (size_t cut = 0; cut < good.size(); cut += (cut < 64 ? 1 : 997)) {
        moe::Sampler sb(sampling_options());
        const moe::Status st = b.load_state(good.data(), cut, &sb);
        EXPECT_TRUE(st == moe::Status::invalid_file || st == moe::Status::invalid_argument) << "cut at " << cut;
        ASSERT_TRUE(unchanged()) << "a refused load (cut at " << cut << ") changed the session";
    }
    std::vector<uint8_t> bad = good;
    bad[0] ^= 1;  // magic
    EXPECT_EQ(b.load_state(bad.data(), bad.size()), moe::Status::invalid_file);
    bad = good;
    bad[12] ^= 1;  // fingerprint
    EXPECT_EQ(b.load_state(bad.data(), bad.size()), moe::Status::invalid_file);
    EXPECT_NE(std::string(moe::last_error()).find("another model"), std::string::npos) << moe::last_error();
    bad = good;
    const int32_t huge = 1 << 30;
    std::memcpy(bad.data() + 8 + 4 + 8 + 4 + 8 + 4 + 4, &huge, 4);  // position
    EXPECT_EQ(b.load_state(bad.data(), bad.size()), moe::Status::context_full);
    bad = good;
    const int32_t bad_token = -5;
    std::memcpy(bad.data() + 8 + 4 + 8 + 4 + 8 + 4 + 4 + 4, &bad_token, 4);  // first token
    EXPECT_EQ(b.load_state(bad.data(), bad.size()), moe::Status::invalid_file);
    bad = good;
    bad.push_back(0);  // trailing byte
    EXPECT_EQ(b.load_state(bad.data(), bad.size()), moe::Status::invalid_file);
    moe::SamplerOptions longer = sampling_options();
    longer.repeat_last_n = 2048;  // keeps another history length than the saved sampler
    moe::Sampler mismatched(longer);
    EXPECT_EQ(b.load_state(good.data(), good.size(), &mismatched), moe::Status::invalid_argument);
    EXPECT_TRUE(unchanged());
    EXPECT_EQ(b.load_state("/nonexistent/dir/state.bin"), moe::Status::io_error);
    EXPECT_EQ(b.save_state("/nonexistent/dir/state.bin"), moe::Status::io_error);
    EXPECT_TRUE(unchanged());

    // A session too small for the saved position, and a session of another model.
    moe::Session tiny = make_session(model, 4);
    EXPECT_EQ(tiny.load_state(good.data(), good.size()), moe::Status::context_full);
    moe_test::ModelSpec spec;
    moe_test::RandomModel rm = moe_test::make_random_model(spec);
    ASSERT_TRUE(rm.ok()) << rm.error;
    const std::string other_path = temp_path("state_other_model.gguf");
    ASSERT_EQ(rm.write(other_path), moe::Status::ok);
    moe::Model other;
    ASSERT_EQ(moe::Model::load(other_path.c_str(), moe::LoadOptions{}, &other), moe::Status::ok) << moe::last_error();
    moe::Session foreign = make_session(other);
    EXPECT_EQ(foreign.load_state(good.data(), good.size()), moe::Status::invalid_file);
    EXPECT_NE(std::string(moe::last_error()).find("another model"), std::string::npos) << moe::last_error();
    std::remove(other_path.c_str());
}

// Prefix reuse: the kept positions are the shared prefix (at most n - 1), and the logits equal a
// fresh evaluation's bit for bit with row kernels only (panels sum in chunk-dependent order).
TEST(SessionState, EvalPromptReusesTheSharedPrefix) {
    const moe::Model model = load_demo();
    const int32_t V = model.info().n_vocab;
    const std::vector<int32_t> p1 = prompt_tokens(model, "In the beginning God created the heaven and the earth. And the earth was without form");
    std::vector<int32_t> p2(p1.begin(), p1.begin() + 12);
    for (int32_t t : prompt_tokens(model, " and void; and darkness was upon the face of the deep.")) p2.push_back(t);
    const std::vector<int32_t> p3(p1.begin(), p1.begin() + 7);  // a prefix of what is cached
    auto fresh = [&](const std::vector<int32_t>& p) {
        moe::Session s = make_session(model, 256, -1);
        EXPECT_EQ(s.eval(p.data(), p.size()), moe::Status::ok);
        return std::vector<float>(s.logits(), s.logits() + V);
    };
    moe::Session s = make_session(model, 256, -1);
    size_t reused = 99;
    ASSERT_EQ(s.eval_prompt(p1.data(), p1.size(), &reused), moe::Status::ok);
    EXPECT_EQ(reused, 0u);
    ASSERT_EQ(s.eval_prompt(p2.data(), p2.size(), &reused), moe::Status::ok);
    EXPECT_EQ(reused, 12u);
    EXPECT_EQ(s.position(), (int32_t)p2.size());
    EXPECT_EQ(std::vector<float>(s.logits(), s.logits() + V), fresh(p2));
    ASSERT_EQ(s.eval_prompt(p2.data(), p2.size(), &reused), moe::Status::ok);  // the same prompt again
    EXPECT_EQ(reused, p2.size() - 1);
    EXPECT_EQ(std::vector<float>(s.logits(), s.logits() + V), fresh(p2));
    ASSERT_EQ(s.eval_prompt(p3.data(), p3.size(), &reused), moe::Status::ok);
    EXPECT_EQ(reused, p3.size() - 1);
    EXPECT_EQ(s.position(), (int32_t)p3.size());
    EXPECT_EQ(std::vector<float>(s.logits(), s.logits() + V), fresh(p3));
    EXPECT_EQ(std::vector<int32_t>(s.tokens(), s.tokens() + p3.size()), p3);
    std::vector<int32_t> too_long(300, 1);
    EXPECT_EQ(s.eval_prompt(too_long.data(), too_long.size(), &reused), moe::Status::context_full);
    EXPECT_EQ(s.eval_prompt(nullptr, 0, &reused), moe::Status::invalid_argument);
}

// Q8_0 KV cache: the same forward pass within the round-off of 8-bit keys, values and queries
// (relative L2 of every position's logits vs the F32 cache), 34/128 of the bytes, its own state
// files, and clear refusals (head_dim not a multiple of 32; mixed cache types in one batch).
TEST(KvCacheQ8, CloseToF32AndSmaller) {
    const moe::Model model = load_demo();
    const int32_t V = model.info().n_vocab;
    const std::vector<int32_t> prompt = prompt_tokens(model, "Jas1:1 James, a servant of God and of the Lord Jesus Christ, to the twelve tribes which are scattered abroad, greeting. Jas1:2 My brethren, count it all joy");
    moe::SessionOptions so;
    so.n_threads = 2;
    so.n_ctx = 256;
    moe::Session f32, q8;
    ASSERT_EQ(moe::Session::create(model, so, &f32), moe::Status::ok);
    so.kv_type = moe::TensorType::q8_0;
    ASSERT_EQ(moe::Session::create(model, so, &q8), moe::Status::ok) << moe::last_error();
    std::vector<float> la(prompt.size() * (size_t)V), lb(la.size());
    ASSERT_EQ(f32.eval(prompt.data(), prompt.size(), la.data()), moe::Status::ok);
    ASSERT_EQ(q8.eval(prompt.data(), prompt.size(), lb.data()), moe::Status::ok);
    std::vector<double> rel;
    double differ = 0;
    for (size_t t = 0; t < prompt.size(); ++t) {
        double num = 0, den = 0;
        for (int32_t i = 0; i < V; ++i) {
            const double d = (double)la[t * V + i] - lb[t * V + i];
            num += d * d;
            den += (double)la[t * V + i] * la[t * V + i];
            differ += d != 0;
        }
        rel.push_back(std::sqrt(num / den));
    }
    std::sort(rel.begin(), rel.end());
    // Typically 0.5%; a near-tie in an expert choice moves a few positions by a few percent.
    EXPECT_LT(rel[rel.size() / 2], 0.01) << "Q8_0 cache logits too far from the F32 cache's (median)";
    EXPECT_LT(rel.back(), 0.1) << "Q8_0 cache logits too far from the F32 cache's (worst position)";
    EXPECT_GT(differ, 0) << "the Q8_0 cache changed nothing: is it used?";
    // Layer 0's keys and values have the same inputs in both sessions: the Q8_0 rows must be
    // moe::quantize_row(Q8_0) of the F32 rows, byte for byte (read from the two state files).
    std::vector<uint8_t> sf, sq;
    ASSERT_EQ(f32.save_state(&sf), moe::Status::ok);
    ASSERT_EQ(q8.save_state(&sq), moe::Status::ok);
    const size_t header = 8 + 4 + 8 + 4 + 8 + 4 + 4 + 4 + prompt.size() * 4, P = prompt.size();
    const int64_t kv_dim = (int64_t)model.info().n_head_kv * model.info().head_dim;
    const size_t row_f = (size_t)kv_dim * 4, row_q = (size_t)kv_dim / 32 * 34;
    std::vector<uint8_t> want(row_q);
    for (int part = 0; part < 2; ++part)  // K rows, then V rows of layer 0
        for (size_t p = 0; p < P; ++p) {
            const float* f = reinterpret_cast<const float*>(sf.data() + header + (part * P + p) * row_f);
            ASSERT_EQ(moe::quantize_row(moe::TensorType::q8_0, f, want.data(), kv_dim), moe::Status::ok);
            ASSERT_EQ(std::memcmp(sq.data() + header + (part * P + p) * row_q, want.data(), row_q), 0) << (part ? "V" : "K") << " row " << p;
        }
    EXPECT_EQ(moe::kv_cache_bytes(model.info(), 256, moe::TensorType::q8_0) * 128, moe::kv_cache_bytes(model.info(), 256) * 34);

    // Its state round trip continues identically; an F32 session refuses a Q8_0 state.
    std::vector<uint8_t> bytes;
    ASSERT_EQ(q8.save_state(&bytes), moe::Status::ok);
    moe::Session q8b;
    ASSERT_EQ(moe::Session::create(model, so, &q8b), moe::Status::ok);
    ASSERT_EQ(q8b.load_state(bytes.data(), bytes.size()), moe::Status::ok) << moe::last_error();
    const int32_t next = 42;
    ASSERT_EQ(q8.eval(&next, 1), moe::Status::ok);
    ASSERT_EQ(q8b.eval(&next, 1), moe::Status::ok);
    EXPECT_EQ(std::memcmp(q8.logits(), q8b.logits(), (size_t)V * 4), 0);
    EXPECT_EQ(f32.load_state(bytes.data(), bytes.size()), moe::Status::invalid_argument);

    moe::Session* mixed[2] = {&f32, &q8};
    const int32_t toks[2] = {3, 4};
    EXPECT_EQ(moe::Session::eval_batch(mixed, toks, 2), moe::Status::invalid_argument);
    so.kv_type = moe::TensorType::q4_0;
    moe::Session bad;
    EXPECT_EQ(moe::Session::create(model, so, &bad), moe::Status::invalid_argument);

    moe_test::ModelSpec spec;
    spec.head_dim = 16;  // not a multiple of 32
    moe_test::RandomModel rm = moe_test::make_random_model(spec);
    ASSERT_TRUE(rm.ok()) << rm.error;
    const std::string path = temp_path("kv_q8_hd16.gguf");
    ASSERT_EQ(rm.write(path), moe::Status::ok);
    moe::Model small;
    ASSERT_EQ(moe::Model::load(path.c_str(), moe::LoadOptions{}, &small), moe::Status::ok);
    so.kv_type = moe::TensorType::q8_0;
    EXPECT_EQ(moe::Session::create(small, so, &bad), moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("head_dim"), std::string::npos) << moe::last_error();
    std::remove(path.c_str());
}

}  // namespace

namespace {

// LoadOptions::progress: (done, total) never goes back, ends at (file size, file size), and a false
// return stops the load with Status::cancelled (mapped or read into memory).
TEST(LoadProgress, ReportsAndCanStop) {
    struct Seen {
        std::vector<std::pair<uint64_t, uint64_t>> calls;
        bool stop = false;
    };
    auto cb = [](void* user, uint64_t done, uint64_t total) {
        Seen* s = static_cast<Seen*>(user);
        s->calls.push_back({done, total});
        return !s->stop;
    };
    std::FILE* f = std::fopen(demo_model_path().c_str(), "rb");
    ASSERT_NE(f, nullptr);
    std::fseek(f, 0, SEEK_END);
    const uint64_t size = (uint64_t)std::ftell(f);
    std::fclose(f);
    for (bool mmap : {true, false}) {
        Seen seen;
        moe::LoadOptions lo;
        lo.use_mmap = mmap;
        lo.progress = cb;
        lo.progress_user = &seen;
        moe::Model model;
        ASSERT_EQ(moe::Model::load(demo_model_path().c_str(), lo, &model), moe::Status::ok) << moe::last_error();
        ASSERT_FALSE(seen.calls.empty());
        for (size_t i = 1; i < seen.calls.size(); ++i) EXPECT_GE(seen.calls[i].first, seen.calls[i - 1].first);
        EXPECT_EQ(seen.calls.back(), std::make_pair(size, size)) << (mmap ? "mapped" : "read");
        Seen stop;
        stop.stop = true;
        lo.progress_user = &stop;
        moe::Model stopped;
        EXPECT_EQ(moe::Model::load(demo_model_path().c_str(), lo, &stopped), moe::Status::cancelled);
        EXPECT_FALSE(stopped.valid());
        EXPECT_EQ(stop.calls.size(), 1u);
    }
}

}  // namespace
