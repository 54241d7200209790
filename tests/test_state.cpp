// Session state (issue 14, item 3): save/load round trips continue identically, hostile or foreign
// state files are refused without touching the session, and prefix reuse (Session::eval_prompt)
// gives what a fresh evaluation gives.
#include "moe_infer.h"
#include "random_model.h"

#include <gtest/gtest.h>

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
    std::memcpy(bad.data() + 8 + 4 + 8 + 4 + 8 + 4, &huge, 4);  // position
    EXPECT_EQ(b.load_state(bad.data(), bad.size()), moe::Status::context_full);
    bad = good;
    const int32_t bad_token = -5;
    std::memcpy(bad.data() + 8 + 4 + 8 + 4 + 8 + 4 + 4, &bad_token, 4);  // first token
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

}  // namespace
