// Sampler and generation-loop tests: fixed seeds, each stage of the chain checked against a
// hand-computed expectation, and the distribution of draws against the exact probabilities.
#include "moe_infer.h"

// GCC 12 with -fsanitize=address reports -Wmaybe-uninitialized inside libstdc++'s <regex> (a known
// false positive in std::function moves); the grammar tests use std::regex as their oracle.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <regex>
#include <string>
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

// ---- The extended chain against an independent double-precision oracle ----
// The oracle follows SamplerOptions' documentation step by step with plain loops (DRY by brute
// force over every earlier position); Sampler::distribution() must give the same candidates, in
// the same order, with the same probabilities.

struct OracleCase {
    std::vector<float> logits;
    std::vector<int32_t> history;  // accepted tokens, oldest first
    std::vector<int32_t> breakers;  // DRY sequence-breaker token ids
};

// Brute-force DRY penalties: for each earlier position i, the length of the longest run ending at i
// that equals the end of the window (stopping at breakers); the token after i gets the largest.
std::vector<double> dry_oracle(const moe::SamplerOptions& o, const std::vector<int32_t>& hist, const std::vector<int32_t>& breakers, size_t n_vocab) {
    std::vector<double> pen(n_vocab, 0.0);
    if (o.dry_multiplier <= 0) return pen;
    const size_t n = std::min(hist.size(), (size_t)o.dry_last_n);
    std::vector<int32_t> h(hist.end() - (ptrdiff_t)n, hist.end());
    auto brk = [&](int32_t t) { return std::find(breakers.begin(), breakers.end(), t) != breakers.end(); };
    for (size_t i = 0; i + 1 < n; ++i) {
        size_t len = 0;
        while (len <= i && h[i - len] == h[n - 1 - len] && !brk(h[n - 1 - len])) ++len;
        if (len >= (size_t)o.dry_allowed_length) {
            const double p = o.dry_multiplier * std::pow((double)o.dry_base, (double)(len - (size_t)o.dry_allowed_length));
            pen[(size_t)h[i + 1]] = std::max(pen[(size_t)h[i + 1]], p);
        }
    }
    return pen;
}

std::vector<std::pair<int32_t, double>> chain_oracle(const moe::SamplerOptions& o, const OracleCase& c) {
    const size_t V = c.logits.size();
    std::vector<double> l(c.logits.begin(), c.logits.end());
    for (const auto& lb : o.logit_bias) l[(size_t)lb.first] += lb.second;
    const size_t last = std::min(c.history.size(), (size_t)o.repeat_last_n);
    std::map<int32_t, int> count;
    for (size_t k = c.history.size() - last; k < c.history.size(); ++k) ++count[c.history[k]];
    for (const auto& kv : count) {
        double& v = l[(size_t)kv.first];
        v = (float)v <= 0 ? (double)((float)v * o.repeat_penalty) : (double)((float)v / o.repeat_penalty);
        v -= kv.second * (double)o.frequency_penalty + o.presence_penalty;
    }
    const std::vector<double> pen = dry_oracle(o, c.history, c.breakers, V);
    for (size_t t = 0; t < V; ++t) l[t] -= pen[t];
    std::vector<int32_t> ids;
    for (size_t t = 0; t < V; ++t) ids.push_back((int32_t)t);
    if (o.top_n_sigma > 0) {
        double mx = -1e300, mean = 0, var = 0;
        for (double v : l) { mx = std::max(mx, v); mean += v / (double)V; }
        for (double v : l) var += (v - mean) * (v - mean) / (double)V;
        std::vector<int32_t> keep;
        for (int32_t t : ids)
            if (l[(size_t)t] >= mx - o.top_n_sigma * std::sqrt(var)) keep.push_back(t);
        ids = keep;
    }
    std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) { return l[(size_t)a] > l[(size_t)b]; });
    if (o.top_k > 0 && (size_t)o.top_k < ids.size()) ids.resize((size_t)o.top_k);
    auto probs = [&](const std::vector<int32_t>& set, double temp) {
        std::vector<double> p;
        double z = 0;
        for (int32_t t : set) { p.push_back(std::exp((l[(size_t)t] - l[(size_t)set[0]]) / temp)); z += p.back(); }
        for (double& v : p) v /= z;
        return p;
    };
    if (o.typical_p < 1) {
        std::vector<double> p = probs(ids, 1.0);
        double h = 0;
        for (double v : p) h -= v * std::log(v);
        std::vector<size_t> order(ids.size());
        for (size_t i = 0; i < order.size(); ++i) order[i] = i;
        std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) { return std::fabs(-std::log(p[a]) - h) < std::fabs(-std::log(p[b]) - h); });
        double cum = 0;
        std::vector<size_t> kept;
        for (size_t k : order) { kept.push_back(k); cum += p[k]; if (cum >= o.typical_p) break; }
        std::sort(kept.begin(), kept.end());
        std::vector<int32_t> next;
        for (size_t k : kept) next.push_back(ids[k]);
        ids = next;
    }
    if (o.top_p < 1) {
        std::vector<double> p = probs(ids, 1.0);
        double cum = 0;
        size_t keep = ids.size();
        for (size_t i = 0; i < p.size(); ++i) { cum += p[i]; if (cum >= o.top_p) { keep = i + 1; break; } }
        ids.resize(keep);
    }
    if (o.min_p > 0) {
        std::vector<double> p = probs(ids, 1.0);
        size_t keep = 1;
        while (keep < ids.size() && p[keep] >= o.min_p * p[0]) ++keep;
        ids.resize(keep);
    }
    std::vector<double> p = probs(ids, o.temperature);
    std::vector<std::pair<int32_t, double>> out;
    for (size_t i = 0; i < ids.size(); ++i) out.push_back({ids[i], p[i]});
    return out;
}

void expect_same_distribution(const std::vector<std::pair<int32_t, float>>& got, const std::vector<std::pair<int32_t, double>>& want, const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t i = 0; i < got.size(); ++i) {
        EXPECT_EQ(got[i].first, want[i].first) << what << " rank " << i;
        EXPECT_NEAR(got[i].second, want[i].second, 1e-5 + 1e-5 * want[i].second) << what << " rank " << i;
    }
}

// Random logits and histories over a small alphabet (so repeats happen), each option alone and all together.
TEST(Sampler, ExtendedChainMatchesOracle) {
    std::mt19937 rng(11);
    std::normal_distribution<float> gauss(0.f, 2.f);
    for (int trial = 0; trial < 60; ++trial) {
        OracleCase c;
        const size_t V = 40 + (size_t)(trial % 7) * 13;
        for (size_t t = 0; t < V; ++t) c.logits.push_back(gauss(rng));
        const int alphabet = 3 + trial % 5;
        const size_t len = (size_t)(trial * 7 % 90);
        for (size_t k = 0; k < len; ++k) c.history.push_back((int32_t)(rng() % (unsigned)alphabet));
        moe::SamplerOptions o;
        o.temperature = 0.5f + 0.25f * (float)(trial % 4);
        o.top_k = 0; o.top_p = 1; o.min_p = 0;
        switch (trial % 8) {
            case 0: o.frequency_penalty = 0.7f; o.presence_penalty = 0.3f; o.repeat_penalty = 1.3f; o.repeat_last_n = 16; break;
            case 1: o.dry_multiplier = 0.8f; o.dry_base = 1.75f; o.dry_allowed_length = 2; o.dry_last_n = 64; break;
            case 2: o.top_n_sigma = 1.0f; break;
            case 3: o.typical_p = 0.7f; break;
            case 4: o.logit_bias = {{1, 5.f}, {2, -100.f}, {(int32_t)V - 1, 2.5f}}; break;
            case 5: o.top_k = 12; o.top_p = 0.9f; o.min_p = 0.02f; break;
            case 6: o.dry_multiplier = 1.5f; o.dry_allowed_length = 1 + trial % 3; o.dry_last_n = 30; o.top_n_sigma = 1.5f; break;
            default:  // everything at once
                o.frequency_penalty = 0.2f; o.presence_penalty = 0.1f; o.repeat_penalty = 1.1f;
                o.dry_multiplier = 0.5f; o.dry_last_n = 50; o.top_n_sigma = 2.0f; o.top_k = 30; o.typical_p = 0.9f;
                o.top_p = 0.95f; o.min_p = 0.01f; o.logit_bias = {{0, 1.f}};
        }
        ASSERT_EQ(moe::check_sampler_options(o, (int32_t)V), moe::Status::ok) << moe::last_error();
        moe::Sampler s(o);
        for (int32_t t : c.history) s.accept(t);
        std::vector<std::pair<int32_t, float>> got;
        s.distribution(c.logits.data(), (int32_t)V, &got);
        expect_same_distribution(got, chain_oracle(o, c), "trial " + std::to_string(trial));
    }
}

// DRY by hand: "1 2 3 4 1 2 3" - emitting 4 again would repeat a run of 3 (allowed 2: base^1);
// a sequence breaker inside the window's end stops the match.
TEST(Sampler, DryPenalisesTheTokenThatExtendsARepeat) {
    moe::SamplerOptions o;
    o.temperature = 1; o.top_k = 0; o.top_p = 1; o.min_p = 0;
    o.dry_multiplier = 1.0f; o.dry_base = 2.0f; o.dry_allowed_length = 2;
    std::vector<float> logits(6, 0.f);
    moe::Sampler s(o);
    for (int32_t t : {1, 2, 3, 4, 1, 2, 3}) s.accept(t);
    std::vector<std::pair<int32_t, float>> d;
    s.distribution(logits.data(), 6, &d);
    ASSERT_EQ(d.size(), 6u);
    // token 4 at logit -2 (1 x 2^(3-2)), the other five at 0.
    const double z = 5 + std::exp(-2.0);
    EXPECT_EQ(d.back().first, 4);
    EXPECT_NEAR(d.back().second, std::exp(-2.0) / z, 1e-6);
    EXPECT_NEAR(d.front().second, 1 / z, 1e-6);
}

TEST(Sampler, DrySequenceBreakersComeFromTheVocabulary) {
    moe::Model model;
    ASSERT_EQ(moe::Model::load((std::string(MOE_SOURCE_DIR) + "/models/demo-qwen3moe.gguf").c_str(), moe::LoadOptions{}, &model), moe::Status::ok);
    const moe::Tokenizer& tok = model.tokenizer();
    std::vector<int32_t> nl, word;
    ASSERT_EQ(tok.encode("\n", false, false, &nl), moe::Status::ok);
    ASSERT_EQ(tok.encode(" the", false, false, &word), moe::Status::ok);
    ASSERT_EQ(nl.size(), 1u);
    ASSERT_EQ(word.size(), 1u);
    const int32_t V = model.info().n_vocab, a = word[0], b = (a + 1) % V, c = (a + 2) % V;
    moe::SamplerOptions o;
    o.temperature = 1; o.top_k = 0; o.top_p = 1; o.min_p = 0;
    o.dry_multiplier = 1.0f; o.dry_allowed_length = 2;
    std::vector<float> logits((size_t)V, 0.f);
    auto penalised = [&](const std::vector<int32_t>& hist, bool vocab) {
        moe::Sampler s(o);
        if (vocab) s.set_vocabulary(tok);
        for (int32_t t : hist) s.accept(t);
        std::vector<std::pair<int32_t, float>> d;
        s.distribution(logits.data(), V, &d);
        return d.back().second < d.front().second ? d.back().first : -1;  // the penalised token, if any
    };
    // a nl b c a nl b -> c would repeat "a nl b" (3 tokens); with "\n" a breaker the run is 1 token.
    EXPECT_EQ(penalised({a, nl[0], b, c, a, nl[0], b}, false), c);
    EXPECT_EQ(penalised({a, nl[0], b, c, a, nl[0], b}, true), -1);
    EXPECT_EQ(penalised({nl[0], a, b, c, a, b}, true), c);  // a breaker outside the repeat does not matter
}

TEST(Sampler, XtcRemovesAllButTheLeastLikelyTopChoice) {
    // probabilities ~ .49, .30, .18, .02, .01: three at >= 0.1, so the first two go.
    std::vector<float> logits = {std::log(0.49f), std::log(0.30f), std::log(0.18f), std::log(0.02f), std::log(0.01f)};
    moe::SamplerOptions o;
    o.temperature = 1; o.top_k = 0; o.top_p = 1; o.min_p = 0; o.seed = 3;
    o.xtc_probability = 1.0f; o.xtc_threshold = 0.1f;
    moe::Sampler s(o);
    std::map<int32_t, int> seen;
    for (int i = 0; i < 3000; ++i) ++seen[s.sample(logits.data(), 5)];
    EXPECT_EQ(seen.count(0), 0u);
    EXPECT_EQ(seen.count(1), 0u);
    EXPECT_GT(seen[2], 2500);  // .18 / .21
    o.xtc_probability = 0.5f;  // half the steps: the top token appears about .49 / 2 of the time
    moe::Sampler h(o);
    int top = 0;
    for (int i = 0; i < 20000; ++i) top += h.sample(logits.data(), 5) == 0;
    EXPECT_NEAR(top / 20000.0, 0.245, 0.02);
    o.xtc_threshold = 0.4f;  // only one token above: nothing removed
    moe::Sampler one(o);
    std::map<int32_t, int> all;
    for (int i = 0; i < 3000; ++i) ++all[one.sample(logits.data(), 5)];
    EXPECT_GT(all[0], 1200);
}

// Mirostat v2: the first step truncates at mu = 2 tau bits; over many draws the average surprise
// of the drawn tokens (under the distribution each was drawn from) settles near tau.
TEST(Sampler, MirostatV2KeepsTheSurpriseNearTau) {
    std::mt19937 rng(5);
    std::normal_distribution<float> gauss(0.f, 3.f);
    std::vector<float> logits(2000);
    for (float& v : logits) v = gauss(rng);
    moe::SamplerOptions o;
    o.temperature = 1; o.mirostat = 2; o.mirostat_tau = 3.0f; o.mirostat_eta = 0.1f; o.seed = 9;
    moe::Sampler s(o);
    std::vector<std::pair<int32_t, float>> d;
    s.distribution(logits.data(), 2000, &d);
    double z = 0, mx = *std::max_element(logits.begin(), logits.end());
    for (float v : logits) z += std::exp((double)v - mx);
    size_t expect = 0;
    for (float v : logits) expect += -std::log2(std::exp((double)v - mx) / z) <= 6.0;
    EXPECT_EQ(d.size(), expect);
    // The surprise mirostat steers is the drawn token's under the truncated, renormalised
    // distribution it drew from (distribution() shows it without touching the state).
    double total = 0;
    const int steps = 4000;
    for (int i = 0; i < steps; ++i) {
        s.distribution(logits.data(), 2000, &d);
        const int32_t t = s.sample(logits.data(), 2000);
        double p = 0;
        for (const auto& c : d)
            if (c.first == t) p = c.second;
        ASSERT_GT(p, 0) << "drew a token outside the truncated set";
        if (i >= 500) total += -std::log2(p);
    }
    EXPECT_NEAR(total / (steps - 500), 3.0, 0.3);
}

TEST(Sampler, OptionsOutOfRangeAreRefused) {
    auto refused = [](void (*edit)(moe::SamplerOptions&)) {
        moe::SamplerOptions o;
        edit(o);
        return moe::check_sampler_options(o, 100) == moe::Status::invalid_argument && std::string(moe::last_error()).find("sampler") != std::string::npos;
    };
    EXPECT_EQ(moe::check_sampler_options(moe::SamplerOptions{}, 100), moe::Status::ok);
    EXPECT_TRUE(refused([](moe::SamplerOptions& o) { o.top_p = 0; }));
    EXPECT_TRUE(refused([](moe::SamplerOptions& o) { o.typical_p = 1.5f; }));
    EXPECT_TRUE(refused([](moe::SamplerOptions& o) { o.mirostat = 1; }));
    EXPECT_TRUE(refused([](moe::SamplerOptions& o) { o.dry_base = 0.5f; }));
    EXPECT_TRUE(refused([](moe::SamplerOptions& o) { o.xtc_probability = -0.1f; }));
    EXPECT_TRUE(refused([](moe::SamplerOptions& o) { o.temperature = NAN; }));
    EXPECT_TRUE(refused([](moe::SamplerOptions& o) { o.repeat_last_n = -1; }));
    moe::SamplerOptions o;
    o.logit_bias = {{100, 1.f}};
    EXPECT_EQ(moe::check_sampler_options(o, 100), moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("100"), std::string::npos);
}

// ---- GBNF grammars: generation on the demo model, checked with std::regex (an independent
// recognizer of the same regular languages) ----

moe::Model& demo_model() {
    static moe::Model model;
    if (!model.valid()) {
        EXPECT_EQ(moe::Model::load((std::string(MOE_SOURCE_DIR) + "/models/demo-qwen3moe.gguf").c_str(), moe::LoadOptions{}, &model), moe::Status::ok);
    }
    return model;
}

TEST(Grammar, BadGrammarsAreRefusedWithTheReason) {
    auto refused = [](const char* gbnf, const char* why) {
        moe::SamplerOptions o;
        o.grammar = gbnf;
        const bool bad = moe::check_sampler_options(o) == moe::Status::invalid_argument;
        const std::string msg = moe::last_error();
        EXPECT_TRUE(bad) << gbnf;
        EXPECT_NE(msg.find(why), std::string::npos) << gbnf << ": " << msg;
    };
    refused("root ::= foo", "rule 'foo' is used but not defined");
    refused("start ::= \"a\"", "no 'root' rule");
    refused("root ::= root \"a\"", "left-recursive");
    refused("root ::= x\nx ::= y \"b\"\ny ::= \"\"? x", "left-recursive");
    refused("root ::= \"abc", "line 1: unterminated string");
    refused("root ::= \"a\"\n\nx ::= [a-", "line 3: ");
    refused("root ::= \"\\q\"", "bad character or escape");
    refused("root ::= (\"a\" | \"b\"", "expected ')'");
    refused("root ::= \"a\"{3,1}", "bad repetition bounds");
    refused("root ::= \"a\"\nroot ::= \"b\"", "defined twice");
    refused("root ::= \"a\" x ::= \"b\"", "missing newline");
    moe::SamplerOptions ok;
    ok.grammar = "# comment\nroot ::= item+ # trailing\nitem ::= [a-z] | \"\\u00e9\" | (\n  \"x\" \"y\"\n)\n";
    EXPECT_EQ(moe::check_sampler_options(ok), moe::Status::ok) << moe::last_error();
}

struct GrammarCase {
    const char* gbnf;
    const char* regex;  // the same language
};

// Bounded languages: the model must reach a whole sentence, after which only end-of-generation is
// allowed, so every run ends by EOG with text the regex matches in full.
TEST(Grammar, GenerationStaysInTheLanguage) {
    moe::Model& model = demo_model();
    ASSERT_TRUE(model.valid());
    const GrammarCase cases[] = {
        {"root ::= (\"yes\" | \"no\") \".\"", "(yes|no)\\."},
        {"root ::= [0-9]{1,3} \",\" [a-z]{2,4} \".\"", "[0-9]{1,3},[a-z]{2,4}\\."},
        {"root ::= \"{\\\"n\\\": \" [1-9] [0-9]? \", \\\"ok\\\": \" (\"true\" | \"false\") \"}\"", "\\{\"n\": [1-9][0-9]?, \"ok\": (true|false)\\}"},
        {"root ::= \" \" name (\", \" name){0,2} \".\"\nname ::= [A-Z] [a-z]{1,6}", " [A-Z][a-z]{1,6}(, [A-Z][a-z]{1,6}){0,2}\\."},
    };
    moe::SessionOptions so;
    so.n_threads = 2;
    so.n_ctx = 256;
    moe::Session session;
    ASSERT_EQ(moe::Session::create(model, so, &session), moe::Status::ok);
    std::vector<int32_t> prompt;
    ASSERT_EQ(model.tokenizer().encode("And the LORD said", true, false, &prompt), moe::Status::ok);
    int runs = 0;
    for (const GrammarCase& gc : cases)
        for (uint64_t seed = 0; seed < 8; ++seed) {
            session.reset();
            moe::GenerateOptions g;
            g.max_tokens = 64;
            g.sampler.seed = seed;
            g.sampler.temperature = 1.0f;
            g.sampler.grammar = gc.gbnf;
            moe::GenerateResult r;
            ASSERT_EQ(moe::generate(session, prompt, g, nullptr, nullptr, &r), moe::Status::ok) << moe::last_error();
            EXPECT_TRUE(r.stopped_by_eog) << gc.gbnf << " seed " << seed << ": '" << r.text << "'";
            EXPECT_TRUE(std::regex_match(r.text, std::regex(gc.regex))) << gc.gbnf << " seed " << seed << ": '" << r.text << "'";
            ++runs;
        }
    EXPECT_EQ(runs, 32);
}

// distribution() shows only allowed tokens; a copied sampler carries the grammar's state.
TEST(Grammar, DistributionAndCopiesFollowTheGrammar) {
    moe::Model& model = demo_model();
    ASSERT_TRUE(model.valid());
    const moe::Tokenizer& tok = model.tokenizer();
    const int32_t V = model.info().n_vocab;
    moe::SamplerOptions o;
    o.temperature = 1; o.top_k = 0; o.top_p = 1; o.min_p = 0; o.seed = 4;
    o.grammar = "root ::= \"yes\" | \"no\"";
    moe::Sampler s(o);
    s.set_vocabulary(tok);
    std::vector<float> logits((size_t)V, 0.f);
    std::vector<std::pair<int32_t, float>> d;
    s.distribution(logits.data(), V, &d);
    ASSERT_FALSE(d.empty());
    for (const auto& c : d) {
        const std::string piece = tok.token_to_piece(c.first);
        EXPECT_TRUE(std::string("yes").compare(0, piece.size(), piece) == 0 || std::string("no").compare(0, piece.size(), piece) == 0) << "'" << piece << "'";
    }
    EXPECT_FALSE(s.grammar_complete());
    // Drive both a sampler and its copy through the same logits: the same tokens, to the end.
    const int32_t first = s.sample(logits.data(), V);
    s.accept(first);
    moe::Sampler copy(s);
    std::string text_a = tok.token_to_piece(first), text_b = text_a;
    for (int i = 0; i < 8 && !s.grammar_complete(); ++i) {
        const int32_t a = s.sample(logits.data(), V), b = copy.sample(logits.data(), V);
        ASSERT_EQ(a, b);
        s.accept(a);
        copy.accept(b);
        text_a += tok.token_to_piece(a);
    }
    EXPECT_TRUE(s.grammar_complete());
    EXPECT_TRUE(text_a == "yes" || text_a == "no") << text_a;
}

// JSON Schema -> GBNF: generated documents match a regular expression written from the schema by
// hand (std::regex, independent of the converter), across seeds; unsupported keywords are named.
TEST(Grammar, JsonSchemaConstrainsGeneration) {
    moe::Model& model = demo_model();
    ASSERT_TRUE(model.valid());
    const std::string str = "\"(?:[^\"\\\\]|\\\\[\"\\\\/bfnrt]|\\\\u[0-9a-fA-F]{4})";
    const std::string integer = "-?(?:0|[1-9][0-9]{0,15})", ws = "[ \\t\\n]{0,20}";
    struct Case { const char* schema; std::string regex; } cases[] = {
        {R"({"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"},
             "ok": {"type": "boolean"}}, "required": ["name", "n"]})",
         "\\{" + ws + "\"name\"" + ws + ":" + ws + str + "{0,8}\"" + ws + "," + ws + "\"n\"" + ws + ":" + ws + integer + ws + "(?:," + ws +
             "\"ok\"" + ws + ":" + ws + "(?:true|false)" + ws + ")?\\}"},
        {R"({"type": "array", "items": {"enum": ["red", "green", 3, null]}, "minItems": 1, "maxItems": 3})",
         "\\[" + ws + "(?:\"red\"|\"green\"|3|null)" + ws + "(?:," + ws + "(?:\"red\"|\"green\"|3|null)" + ws + "){0,2}\\]"},
        {R"({"$defs": {"p": {"type": "object", "properties": {"x": {"const": 7}}, "required": ["x"]}},
             "anyOf": [{"$ref": "#/$defs/p"}, {"type": "null"}]})",
         "(?:\\{" + ws + "\"x\"" + ws + ":" + ws + "7" + ws + "\\}|null)"},
    };
    moe::SessionOptions so;
    so.n_threads = 2;
    so.n_ctx = 512;
    moe::Session session;
    ASSERT_EQ(moe::Session::create(model, so, &session), moe::Status::ok);
    std::vector<int32_t> prompt;
    ASSERT_EQ(model.tokenizer().encode("And he said", true, false, &prompt), moe::Status::ok);
    for (const Case& c : cases) {
        std::string gbnf;
        ASSERT_EQ(moe::json_schema_to_grammar(c.schema, &gbnf), moe::Status::ok) << moe::last_error();
        for (uint64_t seed = 0; seed < 6; ++seed) {
            session.reset();
            moe::GenerateOptions g;
            g.max_tokens = 400;
            g.sampler.seed = seed;
            g.sampler.temperature = 1.0f;
            g.sampler.grammar = gbnf;
            moe::GenerateResult r;
            ASSERT_EQ(moe::generate(session, prompt, g, nullptr, nullptr, &r), moe::Status::ok) << moe::last_error();
            EXPECT_TRUE(r.stopped_by_eog) << c.schema << " seed " << seed << ": '" << r.text << "'";
            EXPECT_TRUE(std::regex_match(r.text, std::regex(c.regex))) << c.schema << " seed " << seed << ": '" << r.text << "'";
        }
    }
    std::string gbnf;
    EXPECT_EQ(moe::json_schema_to_grammar(R"({"type": "string", "pattern": "a+"})", &gbnf), moe::Status::unsupported);
    EXPECT_NE(std::string(moe::last_error()).find("'pattern'"), std::string::npos);
    EXPECT_EQ(moe::json_schema_to_grammar(R"({"$ref": "#/$defs/missing"})", &gbnf), moe::Status::unsupported);
    EXPECT_EQ(moe::json_schema_to_grammar(R"({"type": "array", "minItems": 3, "maxItems": 1})", &gbnf), moe::Status::unsupported);
    EXPECT_EQ(moe::json_schema_to_grammar(R"({"type": )", &gbnf), moe::Status::invalid_argument);
    EXPECT_NE(moe::json_schema_to_grammar(R"({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})", &gbnf), moe::Status::ok);
    // A recursive schema (a list of nodes with children) is one rule referring to itself.
    EXPECT_EQ(moe::json_schema_to_grammar(R"({"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array",
        "items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"})", &gbnf), moe::Status::ok) << moe::last_error();
    // References that fan out (each level twice to the next) stay linear: each target is one rule.
    std::string defs;
    for (int i = 0; i < 20; ++i)  // 2^20 expansions without the one-rule-per-target memo
        defs += (i ? ", " : "") + std::string("\"a") + std::to_string(i) + "\": {\"anyOf\": [{\"$ref\": \"#/$defs/a" + std::to_string(i + 1) +
                "\"}, {\"type\": \"array\", \"items\": {\"$ref\": \"#/$defs/a" + std::to_string(i + 1) + "\"}}]}";
    defs += ", \"a20\": {\"type\": \"integer\"}";
    ASSERT_EQ(moe::json_schema_to_grammar("{\"$defs\": {" + defs + "}, \"$ref\": \"#/$defs/a0\"}", &gbnf), moe::Status::ok) << moe::last_error();
    EXPECT_LT(gbnf.size(), 20000u);
    // Hostile grammars are refused, not explored: a 10^5-rule chain, and readings that double per character.
    moe::SamplerOptions hostile;
    hostile.grammar = "root ::= r0\n";
    for (int i = 0; i < 100000; ++i) hostile.grammar += "r" + std::to_string(i) + " ::= r" + std::to_string(i + 1) + "\n";
    hostile.grammar += "r100000 ::= \"x\"\n";
    EXPECT_NE(moe::check_sampler_options(hostile), moe::Status::ok);
    hostile.grammar = "root ::= s\ns ::= \"x\" w1 \"y\" | \"x\" w1 \"z\" | \"\"\n";
    for (int i = 1; i < 250; ++i) hostile.grammar += "w" + std::to_string(i) + " ::= w" + std::to_string(i + 1) + " \"y\"\n";
    hostile.grammar += "w250 ::= s \"y\"\n";
    if (moe::check_sampler_options(hostile) == moe::Status::ok) {  // may start fine; then each step stays bounded
        moe::Sampler sampler(hostile);
        sampler.set_vocabulary(model.tokenizer());
        std::vector<float> flat((size_t)model.info().n_vocab, 0.f);
        for (int i = 0; i < 20; ++i) {
            const int32_t t = sampler.sample(flat.data(), model.info().n_vocab);
            if (t < 0) break;
            sampler.accept(t);
        }
    }
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
