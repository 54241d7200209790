// Sampler and generation-loop tests: fixed seeds, each stage of the chain checked against a
// hand-computed expectation, and the distribution of draws against the exact probabilities.
#include "moe_infer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <vector>

namespace {

moe::SamplerOptions greedy() {
    moe::SamplerOptions o;
    o.temperature = 0;
    return o;
}

TEST(Sampler, GreedyPicksArgmaxAndLowestIdOnTies) {
    moe::Sampler s(greedy());
    std::vector<float> logits = {0.1f, 3.f, -2.f, 3.f, 1.f};
    EXPECT_EQ(s.sample(logits.data(), 5), 1);
    std::vector<float> neg = {-5.f, -4.f, -4.5f};
    EXPECT_EQ(s.sample(neg.data(), 3), 1);
}

TEST(Sampler, SameSeedSameTokensDifferentSeedDifferent) {
    moe::SamplerOptions o;
    o.temperature = 1.0f; o.top_k = 0; o.top_p = 1; o.min_p = 0; o.seed = 1234;
    std::vector<float> logits(100);
    for (int i = 0; i < 100; ++i) logits[(size_t)i] = std::sin((float)i);
    moe::Sampler a(o), b(o);
    std::vector<int32_t> ta, tb, tc;
    for (int i = 0; i < 200; ++i) { ta.push_back(a.sample(logits.data(), 100)); tb.push_back(b.sample(logits.data(), 100)); }
    EXPECT_EQ(ta, tb);
    o.seed = 99;
    moe::Sampler c(o);
    for (int i = 0; i < 200; ++i) tc.push_back(c.sample(logits.data(), 100));
    EXPECT_NE(ta, tc);
    a.reset();  // re-seeding reproduces the stream
    std::vector<int32_t> again;
    for (int i = 0; i < 200; ++i) again.push_back(a.sample(logits.data(), 100));
    EXPECT_EQ(ta, again);
}

TEST(Sampler, DrawsFollowTheSoftmaxAtTemperature) {
    moe::SamplerOptions o;
    o.temperature = 0.7f; o.top_k = 0; o.top_p = 1; o.min_p = 0; o.seed = 7;
    std::vector<float> logits = {1.0f, 0.0f, 2.0f, -1.0f};
    double z = 0;
    std::vector<double> p(4);
    for (int i = 0; i < 4; ++i) z += p[(size_t)i] = std::exp(logits[(size_t)i] / 0.7);
    moe::Sampler s(o);
    const int n = 200000;
    std::vector<int> count(4, 0);
    for (int i = 0; i < n; ++i) ++count[(size_t)s.sample(logits.data(), 4)];
    for (int i = 0; i < 4; ++i) {
        double expected = p[(size_t)i] / z, got = (double)count[(size_t)i] / n;
        double sigma = std::sqrt(expected * (1 - expected) / n);
        EXPECT_NEAR(got, expected, 5 * sigma) << "token " << i;
    }
}

TEST(Sampler, TopKTopPMinPRestrictTheCandidates) {
    std::vector<float> logits = {5.f, 4.f, 3.f, 0.f, -1.f, 4.5f};  // order: 0, 5, 1, 2, 3, 4
    auto support = [&](moe::SamplerOptions o) {
        o.temperature = 1.f;
        moe::Sampler s(o);
        std::map<int32_t, int> seen;
        for (int i = 0; i < 5000; ++i) ++seen[s.sample(logits.data(), 6)];
        std::vector<int32_t> ids;
        for (auto& kv : seen) ids.push_back(kv.first);
        return ids;
    };
    moe::SamplerOptions o;
    o.top_p = 1; o.min_p = 0;
    o.top_k = 2;
    EXPECT_EQ(support(o), (std::vector<int32_t>{0, 5}));
    // top-p: p(0)=.474, p(5)=.288, p(1)=.175 -> cumulative .762 < .8 <= .937: keep three.
    o.top_k = 0; o.top_p = 0.8f;
    EXPECT_EQ(support(o), (std::vector<int32_t>{0, 1, 5}));
    // min-p 0.3 keeps tokens with p >= 0.3 * p(0): exp(-0.5)=.61 and exp(-1)=.37 pass, exp(-2)=.14 does not.
    o.top_p = 1; o.min_p = 0.3f;
    EXPECT_EQ(support(o), (std::vector<int32_t>{0, 1, 5}));
}

TEST(Sampler, RepetitionPenaltyDividesPositiveAndMultipliesNegative) {
    moe::SamplerOptions o = greedy();
    o.repeat_penalty = 2.0f;
    o.repeat_last_n = 4;
    moe::Sampler s(o);
    std::vector<float> logits = {3.0f, 2.0f, -1.0f};
    s.accept(0);  // 3 -> 1.5, so token 1 (2.0) wins
    EXPECT_EQ(s.sample(logits.data(), 3), 1);
    s.accept(1);  // 2 -> 1.0: token 0 (1.5) wins again
    EXPECT_EQ(s.sample(logits.data(), 3), 0);
    // Only the last repeat_last_n tokens count: push 0 and 1 out of the window.
    for (int i = 0; i < 4; ++i) s.accept(2);
    EXPECT_EQ(s.sample(logits.data(), 3), 0);
    std::vector<float> neg = {-1.0f, -1.5f};
    moe::Sampler t(o);
    t.accept(0);  // -1 -> -2: token 1 wins
    EXPECT_EQ(t.sample(neg.data(), 2), 1);
}

TEST(Status, StringsAndLastError) {
    EXPECT_STREQ(moe::status_string(moe::Status::ok), "ok");
    EXPECT_STRNE(moe::status_string(moe::Status::invalid_file), "ok");
    moe::GgufFile f;
    EXPECT_EQ(moe::GgufFile::open("/nonexistent/dir/x.gguf", true, &f), moe::Status::io_error);
    EXPECT_NE(std::string(moe::last_error()).find("x.gguf"), std::string::npos);
    moe::Model m;
    EXPECT_EQ(moe::Model::load("/nonexistent/dir/y.gguf", moe::LoadOptions{}, &m), moe::Status::io_error);
    EXPECT_FALSE(m.valid());
}

}  // namespace
