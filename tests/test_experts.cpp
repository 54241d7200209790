// Expert statistics (Session::expert_stats) and expert prediction (SessionOptions::predict_depth),
// checked against the demo model's routing trace (tests/data/routing_heldout.bin, made with
// transformers and re-checked with a float64 numpy forward; see tests/data/README.md).
#include "moe_infer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

namespace {

std::string data_path(const char* name) { return std::string(MOE_SOURCE_DIR) + "/tests/data/" + name; }
std::string model_path() { return std::string(MOE_SOURCE_DIR) + "/models/demo-qwen3moe.gguf"; }

struct Trace {
    uint32_t n_windows = 0, window = 0, L = 0, E = 0, K = 0;
    std::vector<int32_t> tokens, experts;
    std::vector<float> weights, probs;
    bool load() {
        std::ifstream f(data_path("routing_heldout.bin"), std::ios::binary);
        char magic[8];
        uint32_t hdr[6];
        if (!f.read(magic, 8) || !f.read(reinterpret_cast<char*>(hdr), sizeof hdr) || std::memcmp(magic, "MOERTRC1", 8) != 0) return false;
        n_windows = hdr[0]; window = hdr[1]; L = hdr[2]; E = hdr[3]; K = hdr[4];
        const size_t T = (size_t)n_windows * window;
        tokens.resize(T); experts.resize(T * L * K); weights.resize(T * L * K); probs.resize(T * L * E);
        f.read(reinterpret_cast<char*>(tokens.data()), (std::streamsize)(tokens.size() * 4));
        f.read(reinterpret_cast<char*>(experts.data()), (std::streamsize)(experts.size() * 4));
        f.read(reinterpret_cast<char*>(weights.data()), (std::streamsize)(weights.size() * 4));
        return (bool)f.read(reinterpret_cast<char*>(probs.data()), (std::streamsize)(probs.size() * 4));
    }
    const int32_t* experts_of(size_t t, uint32_t l) const { return experts.data() + (t * L + l) * K; }
    // The k-th and (k+1)-th probabilities are closer than 1e-4: either choice is a correct routing.
    bool near_tie(size_t t, uint32_t l) const {
        std::vector<float> p(probs.begin() + (long)((t * L + l) * E), probs.begin() + (long)((t * L + l + 1) * E));
        std::sort(p.begin(), p.end(), std::greater<float>());
        return p[K - 1] - p[K] < 1e-4f;
    }
};

class Experts : public ::testing::Test {
protected:
    static void SetUpTestSuite() {
        model_ = new moe::Model;
        ASSERT_EQ(moe::Model::load(model_path().c_str(), moe::LoadOptions{}, model_), moe::Status::ok) << moe::last_error();
        trace_ = new Trace;
        ASSERT_TRUE(trace_->load());
        ASSERT_EQ((int)trace_->L, model_->info().n_layer);
        ASSERT_EQ((int)trace_->E, model_->info().n_expert);
        ASSERT_EQ((int)trace_->K, model_->info().n_expert_used);
    }
    static void TearDownTestSuite() {
        delete model_;
        delete trace_;
    }
    static moe::Session session(moe::SessionOptions o = moe::SessionOptions{}) {
        o.n_threads = 2;
        if (!o.n_ctx) o.n_ctx = 256;
        moe::Session s;
        EXPECT_EQ(moe::Session::create(*model_, o, &s), moe::Status::ok) << moe::last_error();
        return s;
    }
    static moe::Model* model_;
    static Trace* trace_;
};
moe::Model* Experts::model_ = nullptr;
Trace* Experts::trace_ = nullptr;

// Counts and weight sums over the trace's 4 windows (each evaluated as one 256-token chunk, as in
// the perplexity run) against the counts and weights in the trace.
TEST_F(Experts, StatsMatchTheReferenceTrace) {
    const Trace& tr = *trace_;
    moe::SessionOptions o;
    o.float_activations = true;  // the trace is a float forward
    moe::Session s = session(o);
    for (uint32_t w = 0; w < tr.n_windows; ++w) {
        s.reset();  // empties the KV cache, not the statistics
        ASSERT_EQ(s.eval(tr.tokens.data() + (size_t)w * tr.window, tr.window), moe::Status::ok) << moe::last_error();
    }
    const moe::ExpertStats& st = s.expert_stats();
    const size_t T = (size_t)tr.n_windows * tr.window;
    ASSERT_EQ(st.n_layer, (int)tr.L);
    ASSERT_EQ(st.n_expert, (int)tr.E);
    EXPECT_EQ(st.tokens, T);
    std::vector<double> ref_count(tr.L * tr.E, 0), ref_weight(tr.L * tr.E, 0);
    std::vector<int> ties(tr.L, 0);
    for (size_t t = 0; t < T; ++t)
        for (uint32_t l = 0; l < tr.L; ++l) {
            ties[l] += tr.near_tie(t, l);
            for (uint32_t j = 0; j < tr.K; ++j) {
                ref_count[l * tr.E + (uint32_t)tr.experts_of(t, l)[j]] += 1;
                ref_weight[l * tr.E + (uint32_t)tr.experts_of(t, l)[j]] += tr.weights[(t * tr.L + l) * tr.K + j];
            }
        }
    for (uint32_t l = 0; l < tr.L; ++l) {
        uint64_t layer_count = 0;
        double layer_weight = 0;
        for (uint32_t e = 0; e < tr.E; ++e) {
            const size_t i = l * tr.E + e;
            layer_count += st.count[i];
            layer_weight += st.weight[i];
            // A near tie may send one token to the other expert of the pair.
            EXPECT_LE(std::fabs((double)st.count[i] - ref_count[i]), ties[l]) << "layer " << l << " expert " << e;
            EXPECT_LE(std::fabs(st.weight[i] - ref_weight[i]), 1e-3 * ref_count[i] + 0.5 * ties[l]) << "layer " << l << " expert " << e;
        }
        EXPECT_EQ(layer_count, T * tr.K);
        EXPECT_NEAR(layer_weight, (double)T, 1e-3 * (double)T);  // qwen3moe renormalises the top-k weights
    }

    // reset_expert_stats() clears; the shape stays.
    s.reset_expert_stats();
    EXPECT_EQ(s.expert_stats().tokens, 0u);
    EXPECT_EQ(s.expert_stats().count.size(), (size_t)tr.L * tr.E);
    for (uint64_t c : s.expert_stats().count) EXPECT_EQ(c, 0u);
}

// One session over two chunks = two sessions over one chunk each, merged; CSV and JSON carry it.
TEST_F(Experts, MergeAndExport) {
    const Trace& tr = *trace_;
    moe::Session both = session(), first = session(), second = session();
    ASSERT_EQ(both.eval(tr.tokens.data(), 40), moe::Status::ok);
    ASSERT_EQ(both.eval(tr.tokens.data() + 40, 24), moe::Status::ok);
    ASSERT_EQ(first.eval(tr.tokens.data(), 40), moe::Status::ok);
    ASSERT_EQ(second.eval(tr.tokens.data(), 40), moe::Status::ok);  // same KV context for tokens 40..63
    second.reset_expert_stats();
    ASSERT_EQ(second.eval(tr.tokens.data() + 40, 24), moe::Status::ok);
    moe::ExpertStats run;
    ASSERT_EQ(run.merge(first.expert_stats()), moe::Status::ok);
    ASSERT_EQ(run.merge(second.expert_stats()), moe::Status::ok);
    EXPECT_EQ(run.tokens, 64u);
    EXPECT_EQ(run.count, both.expert_stats().count);
    for (size_t i = 0; i < run.weight.size(); ++i) EXPECT_NEAR(run.weight[i], both.expert_stats().weight[i], 1e-5);

    moe::ExpertStats other;
    other.n_layer = 2; other.n_expert = 3; other.count.assign(6, 1); other.weight.assign(6, 1.0);
    EXPECT_EQ(run.merge(other), moe::Status::invalid_argument);
    EXPECT_EQ(run.tokens, 64u);  // unchanged

    // CSV: a header and one line per (layer, expert) whose numbers are the stats.
    const moe::ExpertStats& st = both.expert_stats();
    std::istringstream csv(st.to_csv());
    std::string line;
    ASSERT_TRUE((bool)std::getline(csv, line));
    EXPECT_EQ(line, "layer,expert,count,weight,share");
    size_t rows = 0;
    while (std::getline(csv, line)) {
        int l = -1, e = -1;
        unsigned long long c = 0;
        double w = -1, share = -1;
        ASSERT_EQ(std::sscanf(line.c_str(), "%d,%d,%llu,%lf,%lf", &l, &e, &c, &w, &share), 5) << line;
        const size_t i = (size_t)l * (size_t)st.n_expert + (size_t)e;
        EXPECT_EQ(i, rows);
        EXPECT_EQ(c, st.count[i]);
        EXPECT_NEAR(w, st.weight[i], 1e-6 * (1 + st.weight[i]));
        EXPECT_NEAR(share, (double)st.count[i] / 64.0, 1e-6);
        ++rows;
    }
    EXPECT_EQ(rows, st.count.size());
    // JSON: the counts of layer 0, in order.
    const std::string json = st.to_json();
    EXPECT_EQ(json.rfind("{\"n_layer\":6,\"n_expert\":16,\"tokens\":64,\"count\":[[", 0), 0u) << json.substr(0, 80);
    std::string layer0 = "\"count\":[[";
    for (int e = 0; e < st.n_expert; ++e) layer0 += (e ? "," : "") + std::to_string(st.count[(size_t)e]);
    EXPECT_NE(json.find(layer0 + "]"), std::string::npos);
    // write(): JSON by extension, CSV otherwise; an unwritable path is an io_error.
    const std::string dir = std::getenv("MOE_TEST_TMP") ? std::getenv("MOE_TEST_TMP") : "/tmp";
    for (const char* ext : {".json", ".csv"}) {
        const std::string path = dir + "/expert_stats" + ext;
        ASSERT_EQ(st.write(path.c_str()), moe::Status::ok) << moe::last_error();
        std::ifstream f(path, std::ios::binary);
        std::stringstream ss;
        ss << f.rdbuf();
        EXPECT_EQ(ss.str(), std::string(ext) == ".json" ? st.to_json() : st.to_csv());
    }
    EXPECT_EQ(st.write((dir + "/no/such/dir/x.csv").c_str()), moe::Status::io_error);
}

// Replays the trace's routing as predictions: what each scored cell must contain is known exactly.
class TracePredictor : public moe::ExpertPredictor {
public:
    TracePredictor(const Trace& tr, size_t* t) : tr_(tr), t_(t) {}
    int predict(int, int target, const float*, int32_t* experts, int max) override {
        const int k = std::min(max, (int)tr_.K);
        for (int j = 0; j < k; ++j) experts[j] = tr_.experts_of(*t_, (uint32_t)target)[j];
        return k;
    }
private:
    const Trace& tr_;
    size_t* t_;
};
class SilentPredictor : public moe::ExpertPredictor {
public:
    int predict(int, int, const float*, int32_t*, int) override { return 0; }
};

// Scoring: a predictor that knows the answer scores recall 1 (but for near ties), one that says
// nothing scores 0; every (layer, depth) cell counts k routed experts per token.
TEST_F(Experts, PredictionScoring) {
    const Trace& tr = *trace_;
    const uint32_t n_tok = 64;
    size_t cursor = 0;
    moe::SessionOptions o;
    o.float_activations = true;
    o.predict_depth = 2;
    o.predictor = std::make_shared<TracePredictor>(tr, &cursor);
    moe::Session oracle = session(o);
    o.predictor = std::make_shared<SilentPredictor>();
    moe::Session silent = session(o);
    int ties = 0;
    for (cursor = 0; cursor < n_tok; ++cursor) {
        ASSERT_EQ(oracle.eval(&tr.tokens[cursor], 1), moe::Status::ok);
        ASSERT_EQ(silent.eval(&tr.tokens[cursor], 1), moe::Status::ok);
        for (uint32_t l = 0; l < tr.L; ++l) ties += tr.near_tie(cursor, l);
    }
    const moe::PredictionStats& ps = oracle.prediction_stats();
    ASSERT_EQ(ps.max_depth, 2);
    for (int d = 1; d <= 2; ++d) {
        for (int l = 0; l < (int)tr.L; ++l) {
            const size_t i = (size_t)l * 2 + (size_t)(d - 1);
            EXPECT_EQ(ps.routed[i], l >= d ? (uint64_t)n_tok * tr.K : 0u) << "layer " << l << " depth " << d;
            EXPECT_EQ(ps.predicted[i], ps.routed[i]);
        }
        const double expected_floor = 1.0 - (double)ties / (double)(n_tok * (tr.L - d));
        EXPECT_GE(ps.recall(d), expected_floor) << "depth " << d;
        EXPECT_DOUBLE_EQ(ps.precision(d), ps.recall(d));
        EXPECT_EQ(silent.prediction_stats().recall(d), 0.0);
        EXPECT_EQ(silent.prediction_stats().precision(d), 0.0);
    }
    oracle.reset_prediction_stats();
    EXPECT_EQ(oracle.prediction_stats().recall(1), 0.0);
    EXPECT_EQ(oracle.prediction_stats().routed[2], 0u);
}

// The gate look-ahead on the held-out text, token by token: it beats chance (k / n_expert) by a
// wide margin, over-fetching raises recall, and prediction never changes the logits. Prints the
// per-layer table that bench/RESULTS.md quotes.
TEST_F(Experts, GateLookaheadOnHeldOutText) {
    const Trace& tr = *trace_;
    const uint32_t n_tok = tr.window;
    moe::SessionOptions plain, pred, wide;
    pred.predict_depth = wide.predict_depth = 2;
    wide.predict_extra = 4;
    moe::Session s0 = session(plain), s1 = session(pred), s2 = session(wide);
    for (uint32_t t = 0; t < n_tok; ++t) {
        ASSERT_EQ(s0.eval(&tr.tokens[t], 1), moe::Status::ok);
        ASSERT_EQ(s1.eval(&tr.tokens[t], 1), moe::Status::ok);
        ASSERT_EQ(s2.eval(&tr.tokens[t], 1), moe::Status::ok);
        ASSERT_EQ(std::memcmp(s0.logits(), s1.logits(), (size_t)model_->info().n_vocab * 4), 0) << "token " << t;
    }
    const moe::PredictionStats &p = s1.prediction_stats(), &w = s2.prediction_stats();
    const double chance = (double)tr.K / tr.E;
    std::printf("gate look-ahead, demo model, %u held-out tokens decoded one at a time (chance %.2f)\n", n_tok, chance);
    std::printf("layer  recall@4 d=1  recall@4 d=2  recall@8 d=1  precision@8 d=1\n");
    for (int l = 1; l < (int)tr.L; ++l)
        std::printf("%5d  %12.3f  %12s  %12.3f  %15.3f\n", l, p.recall(l, 1), l >= 2 ? std::to_string(p.recall(l, 2)).substr(0, 5).c_str() : "-",
                    w.recall(l, 1), w.precision(l, 1));
    std::printf("  all  %12.3f  %12.3f  %12.3f  %15.3f\n", p.recall(1), p.recall(2), w.recall(1), w.precision(1));
    EXPECT_GT(p.recall(1), 2 * chance);
    EXPECT_GT(p.recall(2), chance);
    EXPECT_GE(w.recall(1), p.recall(1));
    EXPECT_DOUBLE_EQ(p.precision(1), p.recall(1));  // k predicted for k routed
}

TEST(ExpertsApi, BadOptionsAndEmptyHandles) {
    moe::Model model;
    ASSERT_EQ(moe::Model::load(model_path().c_str(), moe::LoadOptions{}, &model), moe::Status::ok);
    moe::SessionOptions o;
    o.predict_depth = 5;
    moe::Session s;
    EXPECT_EQ(moe::Session::create(model, o, &s), moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("predict_depth"), std::string::npos);
    o.predict_depth = 1;
    o.predict_extra = -1;
    EXPECT_EQ(moe::Session::create(model, o, &s), moe::Status::invalid_argument);
    moe::Session empty;
    EXPECT_EQ(empty.expert_stats().count.size(), 0u);
    EXPECT_EQ(empty.prediction_stats().max_depth, 0);
    empty.reset_expert_stats();
    empty.reset_prediction_stats();
}

}  // namespace
