// lfm2moe (LiquidAI LFM2-8B-A1B): short-convolution blocks beside GQA attention layers. The float64
// oracle (tests/oracle.h) against llama.cpp itself, and the engine against the oracle; the same
// pattern as tests/test_families.cpp (kept in a file of its own so the two can grow independently;
// the peer helpers are in tests/peer_util.h).
//
// 1. HybridPeer: tiny random GGUFs of odd shapes (tests/random_model.h: head_dim 48/64, irregular
//    conv/attention layer patterns, 1-2 leading dense layers, 6-10 experts top-2/3, L_cache 3 and
//    4) go through the llama_peer (tests/peer/, llama.cpp 0.5.0): the prompt as one batch, then
//    greedy decoding one token per llama_decode (-n N), which carries the conv state from one call
//    to the next. Every row - prompt and decoded - is compared with the oracle run over prompt ++
//    generated tokens. F32: float32 rounding only (measured <= 1e-6 relative; bound 2e-5). Q8_0:
//    llama.cpp also rounds the activations to q8_0 (~1e-2), bound 5e-2.
// 2. HybridPeer.OracleFeaturesMatter: each feature switched off in the oracle alone (the conv's
//    history, its tap order, which gate multiplies before the conv, q/k norm, sigmoid scores, the
//    selection bias, the renormalisation, ...) moves it far from llama.cpp.
// 3. HybridEngine: the engine against the oracle (prefill, then one token at a time), and
//    Session::reset / truncate: after truncate(n) and evaluating the rest again the logits equal
//    the first run's (the conv state must be restored or recomputed).
//
// The peer is found through MOE_LLAMA_PEER (environment), else the compile definition; without it
// the peer tests skip.
#include "moe_infer.h"
#include "oracle.h"
#include "peer_util.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include <unistd.h>

namespace {

using moe_test::ModelSpec;
using moe_test::OracleCase;
using moe_test::RowDiff;
using TT = moe::TensorType;

using moe_test::diff_msg;
using moe_test::diff_rows;
using moe_test::engine_rel;
using moe_test::peer_path;
using moe_test::run_peer;
using moe_test::TempFile;

//---------------------------------------------------------------------------------------------------
// The cases
//---------------------------------------------------------------------------------------------------

struct HybridCase {
    const char* name;
    ModelSpec spec;
    int n_prompt;      // evaluated as one batch (longer than L_cache, so the conv window slides)
    int n_gen;         // then this many greedy tokens, one per call (the peer), or one per eval (the engine)
    double margin;     // minimum selection-score margin of every top-k decision of the prompt
    double peer_tol;   // llama.cpp vs oracle, max|d|/max|ref|
    double engine_tol; // engine vs oracle
};
void PrintTo(const HybridCase& c, std::ostream* os) {
    *os << c.name << ": " << moe_test::describe(c.spec) << ", " << c.n_prompt << "+" << c.n_gen << " tokens";
}

ModelSpec lfm_spec(int n_embd, int n_head, int n_head_kv, int n_expert, int n_used, int n_ff, std::vector<int> conv_layers, uint64_t seed) {
    ModelSpec s;
    s.arch = "lfm2moe";
    s.n_vocab = 300;
    s.n_embd = n_embd;
    s.n_head = n_head;
    s.n_head_kv = n_head_kv;
    s.head_dim = n_embd / n_head;  // lfm2moe: n_head * head_dim == n_embd
    s.n_expert = n_expert;
    s.n_expert_used = n_used;
    s.n_ff = n_ff;
    s.n_layer = (int)conv_layers.size();
    s.conv_layers = conv_layers;
    s.rope_base = 1000000.f;  // LFM2's
    s.rms_eps = 1e-5f;
    s.seed = seed;
    return s;
}

std::vector<HybridCase> hybrid_cases() {
    std::vector<HybridCase> c;
    const double kF32Margin = 1e-4, kF32Tol = 2e-5;
    {   // LFM2-8B-A1B's layout in small: conv conv attn conv attn, head_dim 48, 1 dense layer (ff 72),
        // 8 experts top-2, L_cache 3
        ModelSpec s = lfm_spec(192, 4, 2, 8, 2, 40, {1, 1, 0, 1, 0}, 101);
        s.n_dense_lead = 1;
        s.n_ff_dense = 72;
        c.push_back({"lfm_hd48_CCACA_dense1", s, 24, 8, kF32Margin, kF32Tol, kF32Tol});
    }
    {   // attention first, MQA head_dim 64, 2 dense layers (one conv, one attention), 10 experts top-3,
        // tied embeddings, an expert_weights_scale key that llama.cpp does not read for lfm2moe
        ModelSpec s = lfm_spec(192, 3, 1, 10, 3, 24, {0, 1, 1, 0, 1, 1}, 111);
        s.n_dense_lead = 2;
        s.n_ff_dense = 56;
        s.tied = true;
        s.expert_weights_scale = 2.5f;
        c.push_back({"lfm_hd64_ACCACC_dense2_x10_tied", s, 30, 6, kF32Margin, kF32Tol, kF32Tol});
    }
    {   // head_dim 48, 4 layers with two attention layers in a row, 6 experts top-3, MHA, L_cache 3
        ModelSpec s = lfm_spec(144, 3, 3, 6, 3, 32, {1, 0, 0, 1}, 121);
        s.n_dense_lead = 1;
        s.n_ff_dense = 48;
        c.push_back({"lfm_hd48_CAAC_x6", s, 19, 7, kF32Margin, kF32Tol, kF32Tol});
    }
    {   // L_cache 4 (llama.cpp takes any width >= 2), softmax scores (expert_gating_func = 1, which
        // llama.cpp honours), head_dim 64 GQA 4/2, the attention layer last
        ModelSpec s = lfm_spec(256, 4, 2, 6, 2, 48, {1, 1, 1, 1, 0}, 131);
        s.l_cache = 4;
        s.gating_func = 1;
        s.n_dense_lead = 1;
        s.n_ff_dense = 80;
        c.push_back({"lfm_hd64_CCCCA_lcache4_softmax", s, 22, 6, kF32Margin, kF32Tol, kF32Tol});
    }
    // Q8_0: in_proj, out_proj, q/k/v/o, experts, dense FFN, token_embd and output are Q8_0 (n_embd
    // 256); the conv kernel, norms and routers stay F32. Margins >= 0.01 in sigmoid-score units.
    {
        ModelSpec s = lfm_spec(256, 4, 2, 8, 2, 64, {1, 0, 1, 1, 0}, 141);
        s.wtype = TT::q8_0;
        s.n_dense_lead = 1;
        s.n_ff_dense = 96;
        c.push_back({"lfm_Q8_0", s, 16, 6, 0.01, 5e-2, 5e-2});
    }
    return c;
}

OracleCase make_case(const HybridCase& tc) { return moe_test::make_oracle_case(tc.spec, tc.n_prompt, tc.margin, 200); }

// Oracle positions [n_prompt, end) whose routing margins all reach `margin`: past the first one that
// does not, a quantized run may legitimately route differently and everything after differs.
int trusted_end(const moe_test::OracleResult& r, int n_prompt, double margin) {
    for (int p = n_prompt; p < r.n_tokens; ++p)
        if (r.route_margin[(size_t)p] < margin) return p;
    return r.n_tokens;
}

//---------------------------------------------------------------------------------------------------
// 1. oracle vs llama.cpp
//---------------------------------------------------------------------------------------------------

class HybridPeer : public ::testing::TestWithParam<HybridCase> {};

// The oracle's logits for llama.cpp's run of `c`: prompt ++ the peer's greedy tokens.
struct PeerRun {
    std::vector<float> logits;
    std::vector<int32_t> all_tokens;
    moe_test::OracleResult ref;
};

::testing::AssertionResult peer_run(const std::string& peer, const HybridCase& tc, const OracleCase& c, const std::string& tag, PeerRun* out) {
    TempFile f(tag + tc.name);
    if (c.model.write(f.path) != moe::Status::ok) return ::testing::AssertionFailure() << moe::last_error();
    std::vector<int32_t> gen;
    ::testing::AssertionResult ok = run_peer(peer, f.path, c.tokens, tc.n_gen, tc.spec.n_vocab, &out->logits, &gen);
    if (!ok) return ok;
    const int V = tc.spec.n_vocab;
    for (int k = 0; k < tc.n_gen; ++k) {  // the printed ids are the argmax of the rows before them
        const int want = moe_test::argmax_row(out->logits.data() + (size_t)(tc.n_prompt - 1 + k) * (size_t)V, V);
        if (gen[(size_t)k] != want) return ::testing::AssertionFailure() << "generated token " << k << " is " << gen[(size_t)k] << ", argmax " << want;
    }
    out->all_tokens = c.tokens;
    out->all_tokens.insert(out->all_tokens.end(), gen.begin(), gen.end());
    out->ref = moe_test::Oracle(c.model).run(out->all_tokens);
    return ::testing::AssertionSuccess();
}

TEST_P(HybridPeer, OracleMatchesLlamaCpp) {
    const HybridCase& tc = GetParam();
    const std::string peer = peer_path();
    if (peer.empty()) {
        GTEST_SKIP() << "llama_peer not built (configure with MOE_PEER_DIR, or set MOE_LLAMA_PEER)";
    }
    OracleCase c = make_case(tc);
    ASSERT_TRUE(c.ok) << c.error;
    SCOPED_TRACE(moe_test::describe(c.model.spec));
    ASSERT_GT(tc.n_prompt, 2 * c.model.spec.l_cache) << "the conv window must slide";
    PeerRun pr;
    ASSERT_TRUE(peer_run(peer, tc, c, "", &pr));
    const int T = tc.n_prompt + tc.n_gen;
    const int dec_end = trusted_end(pr.ref, tc.n_prompt, tc.margin);
    const RowDiff pre = diff_rows(pr.ref, pr.logits, 0, tc.n_prompt), dec = diff_rows(pr.ref, pr.logits, tc.n_prompt, dec_end);
    EXPECT_LT(pre.rel(), tc.peer_tol) << "prompt batch: " << diff_msg(pre);
    EXPECT_LT(dec.rel(), tc.peer_tol) << "decode: " << diff_msg(dec);
    if (tc.spec.wtype == TT::f32) {
        EXPECT_EQ(dec_end, T) << "a decoded token's routing is a near-tie at F32";
        EXPECT_EQ(pre.argmax_agree, pre.argmax_checked) << diff_msg(pre);
        EXPECT_EQ(dec.argmax_agree, dec.argmax_checked) << diff_msg(dec);
    }
    if (std::getenv("MOE_FAMILIES_VERBOSE")) {
        for (int p = 0; p < T; ++p) {
            const RowDiff r = diff_rows(pr.ref, pr.logits, p, p + 1);
            std::printf("  position %2d%s: max|d| %.3e (max|ref| %.3f), route margin %.4f\n", p, p < tc.n_prompt ? "" : " (decoded)", r.max_abs,
                        r.max_ref, pr.ref.route_margin[(size_t)p]);
        }
    }
    std::printf("[ hybrid   ] %-32s llama.cpp vs oracle: prompt max rel %.2e (rms %.2e), decode max rel %.2e (rms %.2e, %d of %d rows)\n",
                tc.name, pre.rel(), pre.rel_rms(), dec.rel(), dec.rel_rms(), dec_end - tc.n_prompt, tc.n_gen);
}

// Each feature switched off in the oracle alone must move it far from llama.cpp (>= 100x the F32
// bound): the cases exercise the conv's history and tap order, the gates' places, q/k norm, RoPE
// pairing, the gating function, the selection bias, the renormalisation, and that the
// expert_weights_scale key is ignored.
TEST(HybridPeer, OracleFeaturesMatter) {
    const std::string peer = peer_path();
    if (peer.empty()) {
        GTEST_SKIP() << "llama_peer not built (configure with MOE_PEER_DIR, or set MOE_LLAMA_PEER)";
    }
    using moe_test::RandomModel;
    struct Ablation {
        const char* what;
        void (*apply)(RandomModel*);
        bool gate_after_conv;  // Oracle::lfm_gate_after_conv
    };
    const std::vector<Ablation> ablations = {
        {"conv without history (last tap only)", [](RandomModel* m) {
             const int LC = m->spec.l_cache;
             for (auto& L : m->layers)
                 for (size_t i = 0; i < L.shortconv_conv.size(); ++i)
                     if ((int)(i % (size_t)LC) != LC - 1) L.shortconv_conv[i] = 0.f;
         }, false},
        {"conv taps reversed", [](RandomModel* m) {
             const size_t LC = (size_t)m->spec.l_cache;
             for (auto& L : m->layers)
                 for (size_t c = 0; c + LC <= L.shortconv_conv.size(); c += LC)
                     std::reverse(L.shortconv_conv.begin() + (ptrdiff_t)c, L.shortconv_conv.begin() + (ptrdiff_t)(c + LC));
         }, false},
        {"B and C chunks swapped", [](RandomModel* m) {
             const size_t E = (size_t)m->spec.n_embd;
             for (auto& L : m->layers)
                 if (!L.shortconv_in_proj.empty())
                     std::swap_ranges(L.shortconv_in_proj.begin(), L.shortconv_in_proj.begin() + (ptrdiff_t)(E * E),
                                      L.shortconv_in_proj.begin() + (ptrdiff_t)(E * E));
         }, false},
        {"B after the conv (state of raw X)", [](RandomModel*) {}, true},
        {"no q/k norm", [](RandomModel* m) { for (auto& L : m->layers) { L.q_norm.clear(); L.k_norm.clear(); } }, false},
        {"RoPE NORM pairs", [](RandomModel* m) { m->rope_neox = false; }, false},
        {"gating flipped (sigmoid <-> softmax)", [](RandomModel* m) {
             m->gating = m->gating == RandomModel::Gating::sigmoid ? RandomModel::Gating::softmax : RandomModel::Gating::sigmoid;
         }, false},
        {"no selection bias", [](RandomModel* m) { for (auto& L : m->layers) L.exp_probs_b.clear(); }, false},
        {"weights not renormalised", [](RandomModel* m) { m->norm_topk = false; }, false},
        {"expert_weights_scale honoured", [](RandomModel* m) { m->expert_scale = (double)m->spec.expert_weights_scale; }, false},
    };
    const std::vector<HybridCase> cases = hybrid_cases();
    for (const char* name : {"lfm_hd48_CCACA_dense1", "lfm_hd64_ACCACC_dense2_x10_tied", "lfm_hd64_CCCCA_lcache4_softmax"}) {
        const HybridCase* tc = nullptr;
        for (const HybridCase& x : cases)
            if (std::string(x.name) == name) tc = &x;
        ASSERT_NE(tc, nullptr);
        SCOPED_TRACE(name);
        OracleCase c = make_case(*tc);
        ASSERT_TRUE(c.ok) << c.error;
        PeerRun pr;
        ASSERT_TRUE(peer_run(peer, *tc, c, "abl_", &pr));
        const int T = tc->n_prompt + tc->n_gen;
        ASSERT_LT(diff_rows(pr.ref, pr.logits, 0, T).rel(), tc->peer_tol);
        for (const Ablation& a : ablations) {
            if (std::string(a.what) == "expert_weights_scale honoured" && c.model.spec.expert_weights_scale == 0.f) continue;
            RandomModel alt = c.model;
            a.apply(&alt);
            moe_test::Oracle o(alt);
            o.lfm_gate_after_conv = a.gate_after_conv;
            const double rel = diff_rows(o.run(pr.all_tokens), pr.logits, 0, T).rel();
            EXPECT_GT(rel, 100 * tc->peer_tol) << a.what << ": the oracle without it is as close to llama.cpp";
            std::printf("[ hybrid   ] %-32s ablation %-38s: oracle vs llama.cpp %.4e\n", name, a.what, rel);
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Cases, HybridPeer, ::testing::ValuesIn(hybrid_cases()),
                         [](const ::testing::TestParamInfo<HybridCase>& i) { return std::string(i.param.name); });

//---------------------------------------------------------------------------------------------------
// 3. engine vs oracle
//---------------------------------------------------------------------------------------------------

class HybridEngine : public ::testing::TestWithParam<HybridCase> {
protected:
    // Loads the case's file (the model with the first seed whose routing margins are clear).
    ::testing::AssertionResult load(const HybridCase& tc, OracleCase* c, TempFile* f, moe::Model* model) {
        {   // the spec's first seed, before the (slower) search for one with clear routing margins
            const moe_test::RandomModel first = moe_test::make_random_model(tc.spec);
            if (!first.ok()) return ::testing::AssertionFailure() << first.error;
            if (first.write(f->path) != moe::Status::ok) return ::testing::AssertionFailure() << moe::last_error();
            const moe::Status st = moe::Model::load(f->path.c_str(), moe::LoadOptions{}, model);
            if (st != moe::Status::ok) return ::testing::AssertionFailure() << moe::status_string(st) << ": " << moe::last_error();
        }
        *c = make_case(tc);
        if (!c->ok) return ::testing::AssertionFailure() << c->error;
        if (c->model.write(f->path) != moe::Status::ok) return ::testing::AssertionFailure() << moe::last_error();
        const moe::Status st = moe::Model::load(f->path.c_str(), moe::LoadOptions{}, model);
        if (st != moe::Status::ok) return ::testing::AssertionFailure() << moe::status_string(st) << ": " << moe::last_error();
        return ::testing::AssertionSuccess();
    }
};

TEST_P(HybridEngine, MatchesOracle) {
    const HybridCase& tc = GetParam();
    OracleCase c;
    TempFile f(std::string("eng_") + tc.name);
    moe::Model model;
    ASSERT_TRUE(load(tc, &c, &f, &model));
    SCOPED_TRACE(moe_test::describe(c.model.spec));
    const moe_test::RandomModel& rm = c.model;
    const ModelSpec& s = rm.spec;

    // What llama.cpp reports for these files; n_head_kv is the attention layers' value (the conv
    // layers' 0 marks them as such), n_ff the expert width, no weight scale.
    const moe::ModelInfo& in = model.info();
    EXPECT_EQ(in.architecture, s.arch);
    EXPECT_EQ(in.n_vocab, s.n_vocab);
    EXPECT_EQ(in.n_embd, s.n_embd);
    EXPECT_EQ(in.n_layer, s.n_layer);
    EXPECT_EQ(in.n_head, s.n_head);
    EXPECT_EQ(in.n_head_kv, s.n_head_kv);
    EXPECT_EQ(in.head_dim, rm.head_dim);
    EXPECT_EQ(in.n_rot, rm.n_rot);
    EXPECT_EQ(in.n_expert, s.n_expert);
    EXPECT_EQ(in.n_expert_used, s.n_expert_used);
    EXPECT_EQ(in.n_ff, s.n_ff);
    EXPECT_EQ(in.n_layer_dense_lead, s.n_dense_lead);
    EXPECT_EQ(in.n_ff_dense, rm.n_ff_dense);
    EXPECT_EQ((int)in.expert_gating, s.gating_func);
    EXPECT_TRUE(in.expert_weights_norm);
    EXPECT_EQ(in.expert_weights_scale, 1.f) << "llama.cpp does not read expert_weights_scale for lfm2moe";

    // The engine runs prompt ++ tokens the oracle chose greedily from its own logits (so the rows
    // after the prompt are the decode the peer test checks too).
    std::vector<int32_t> tokens = c.tokens;
    for (int k = 0; k < tc.n_gen; ++k) {
        const moe_test::OracleResult r = moe_test::Oracle(rm).run(tokens);
        tokens.push_back(moe_test::argmax_row(r.row((int)tokens.size() - 1), s.n_vocab));
    }
    const moe_test::OracleResult full = moe_test::Oracle(rm).run(tokens);
    const int T = (int)tokens.size(), V = s.n_vocab, L = s.n_layer, K = s.n_expert_used, n_first = tc.n_prompt;
    const int t_end = trusted_end(full, n_first, tc.margin);
    moe::SessionOptions opt;
    opt.n_ctx = T + 8;
    opt.n_threads = 2;
    moe::Session sess;
    ASSERT_EQ(moe::Session::create(model, opt, &sess), moe::Status::ok) << moe::last_error();
    std::vector<float> logits((size_t)T * (size_t)V);
    std::vector<int32_t> experts((size_t)T * (size_t)L * (size_t)K, -1);  // observed for the decoded positions
    ASSERT_EQ(sess.eval(tokens.data(), (size_t)n_first, logits.data()), moe::Status::ok) << moe::last_error();
    for (int p = n_first; p < T; ++p) {
        ASSERT_EQ(sess.eval(&tokens[(size_t)p], 1), moe::Status::ok) << "position " << p << ": " << moe::last_error();
        std::copy(sess.logits(), sess.logits() + V, logits.begin() + (ptrdiff_t)p * V);
        if (const int32_t* ids = sess.last_expert_ids())
            std::copy(ids, ids + (size_t)L * (size_t)K, experts.begin() + (ptrdiff_t)p * L * K);
    }

    // Routing: the engine's experts must be the oracle's top-k (as sets) on every MoE layer, except
    // near-ties in selection score (quantized weights only), which are then forced on the oracle.
    const double near_tie = tc.spec.wtype == TT::f32 ? 0.0 : 0.0625;
    int flips = 0;
    std::vector<int32_t> forced((size_t)T * (size_t)L * (size_t)K, 0);
    for (int p = 0; p < T; ++p) {
        for (int il = 0; il < L; ++il) {
            const size_t base = ((size_t)p * (size_t)L + (size_t)il) * (size_t)K;
            std::copy(full.experts.begin() + (ptrdiff_t)base, full.experts.begin() + (ptrdiff_t)(base + (size_t)K), forced.begin() + (ptrdiff_t)base);
            if (full.experts[base] < 0 || experts[base] < 0) continue;  // dense layer, or not observed
            const std::set<int> want(full.experts.begin() + (ptrdiff_t)base, full.experts.begin() + (ptrdiff_t)(base + (size_t)K));
            const std::set<int> got(experts.begin() + (ptrdiff_t)base, experts.begin() + (ptrdiff_t)(base + (size_t)K));
            if (got == want) continue;
            ASSERT_EQ((int)got.size(), K) << "position " << p << " layer " << il << ": repeated expert ids";
            const double* sc = &full.route_scores[((size_t)p * (size_t)L + (size_t)il) * (size_t)s.n_expert];
            double kth = 1e300;
            for (int e : want) kth = std::min(kth, sc[e]);
            for (int e : got) {
                ASSERT_TRUE(e >= 0 && e < s.n_expert) << "position " << p << " layer " << il << ": expert id " << e;
                if (!want.count(e)) {
                    ASSERT_LE(kth - sc[e], near_tie) << "position " << p << " layer " << il << ": engine chose expert " << e << " (score "
                                                     << sc[e] << ") but the k-th best score is " << kth;
                }
            }
            std::copy(got.begin(), got.end(), forced.begin() + (ptrdiff_t)base);
            ++flips;
        }
    }
    const moe_test::OracleResult ref = flips ? moe_test::Oracle(rm).run(tokens, &forced) : full;
    const RowDiff pre = diff_rows(ref, logits, 0, n_first), dec = diff_rows(ref, logits, n_first, flips ? T : t_end);
    EXPECT_LT(pre.rel(), tc.engine_tol) << "prefill: " << diff_msg(pre);
    EXPECT_LT(dec.rel(), tc.engine_tol) << "decode: " << diff_msg(dec) << "; near-tie routing flips " << flips;
    std::printf("[ hybrid   ] %-32s engine vs oracle: prefill %.2e, decode %.2e, routing flips %d\n", tc.name, pre.rel(), dec.rel(), flips);
}

// reset() and truncate(n) must leave the conv state as an uninterrupted run would have it: after
// truncate(n), evaluating tokens n .. T-1 again gives the first run's rows (row kernels only, so
// chunking does not change a token's result), and a different continuation matches the oracle.
TEST_P(HybridEngine, ResetAndTruncateRestoreConvState) {
    const HybridCase& tc = GetParam();
    OracleCase c;
    TempFile f(std::string("trunc_") + tc.name);
    moe::Model model;
    ASSERT_TRUE(load(tc, &c, &f, &model));
    SCOPED_TRACE(moe_test::describe(c.model.spec));
    const ModelSpec& s = c.model.spec;
    const int T = tc.n_prompt, V = s.n_vocab;
    const size_t row = (size_t)V;
    moe::SessionOptions opt;
    opt.n_ctx = T + 16;
    opt.n_threads = 2;
    opt.gemm_min_tokens = -1;
    moe::Session sess;
    ASSERT_EQ(moe::Session::create(model, opt, &sess), moe::Status::ok) << moe::last_error();
    std::vector<float> first((size_t)T * row), again((size_t)T * row);
    ASSERT_EQ(sess.eval(c.tokens.data(), (size_t)T, first.data()), moe::Status::ok) << moe::last_error();

    sess.reset();
    EXPECT_EQ(sess.position(), 0);
    ASSERT_EQ(sess.eval(c.tokens.data(), (size_t)T, again.data()), moe::Status::ok) << moe::last_error();
    bool same = false;
    EXPECT_LE(engine_rel(first.data(), again.data(), first.size(), &same), 1e-6) << "reset + re-eval differs (stale conv state?)";

    // n = T - 1 (regenerate the last token), mid-sequence, inside the first L_cache - 1 positions, 0
    for (int n : {T - 1, T / 2 + 1, T / 2, 2, 1, 0}) {
        SCOPED_TRACE("truncate(" + std::to_string(n) + ")");
        const moe::Status st = sess.truncate(n);
        ASSERT_EQ(st, moe::Status::ok) << moe::last_error();
        ASSERT_EQ(sess.position(), n);
        ASSERT_EQ(sess.eval(c.tokens.data() + n, (size_t)(T - n), again.data()), moe::Status::ok) << moe::last_error();
        const double rel = engine_rel(first.data() + (size_t)n * row, again.data(), (size_t)(T - n) * row, &same);
        EXPECT_LE(rel, 1e-6) << "rows " << n << ".." << T - 1 << " after truncate differ from the first run";
        std::printf("[ hybrid   ] %-32s truncate(%2d) + re-eval vs first run: max rel %.2e%s\n", tc.name, n, rel, same ? " (bit-identical)" : "");
    }

    // a different continuation after truncate(n) must equal the oracle on prefix ++ continuation
    const int n = T / 2 + 1;
    ASSERT_EQ(sess.truncate(n), moe::Status::ok) << moe::last_error();
    std::vector<int32_t> alt(c.tokens.begin(), c.tokens.begin() + n);
    const std::vector<int32_t> tail = moe_test::random_tokens(6, V, 4242);
    alt.insert(alt.end(), tail.begin(), tail.end());
    std::vector<float> cont(tail.size() * row);
    ASSERT_EQ(sess.eval(tail.data(), tail.size(), cont.data()), moe::Status::ok) << moe::last_error();
    const moe_test::OracleResult ref = moe_test::Oracle(c.model).run(alt);
    double margin = std::numeric_limits<double>::infinity();
    for (int p = n; p < (int)alt.size(); ++p) margin = std::min(margin, ref.route_margin[(size_t)p]);
    if (margin >= tc.margin) {  // else a quantized run may legitimately route the new tokens differently
        RowDiff d;
        for (size_t i = 0; i < tail.size(); ++i) d.add((int)(n + (int)i), ref.row(n + (int)i), cont.data() + i * row, V);
        EXPECT_LT(d.rel(), tc.engine_tol) << "after truncate(" << n << ") and new tokens: " << diff_msg(d);
    }
}

// Rewinds past the convolution ring (n_batch + 64 positions) re-evaluate the kept prefix, and a
// session state file carries the convolution window: both must reproduce an uninterrupted run
// bit for bit (row kernels, one thread count).
class HybridEngineLong : public HybridEngine {};  // the fixture's load(), without parameters
TEST_F(HybridEngineLong, RewindPastTheRingAndStateFiles) {
    const HybridCase tc = hybrid_cases()[0];
    OracleCase c;
    TempFile f("long_rewind");
    moe::Model model;
    ASSERT_TRUE(load(tc, &c, &f, &model));
    const int T = 120, V = c.model.spec.n_vocab;
    const std::vector<int32_t> tokens = moe_test::random_tokens(T, V, 777);
    moe::SessionOptions opt;
    opt.n_ctx = 160;
    opt.n_threads = 2;
    opt.n_batch = 4;  // a ring of 68 positions
    opt.gemm_min_tokens = -1;
    moe::Session sess;
    ASSERT_EQ(moe::Session::create(model, opt, &sess), moe::Status::ok) << moe::last_error();
    std::vector<float> first((size_t)T * V), again((size_t)T * V);
    ASSERT_EQ(sess.eval(tokens.data(), (size_t)T, first.data()), moe::Status::ok) << moe::last_error();
    bool same = false;
    for (int n : {100, 40, 7}) {  // within the ring, then past it twice
        SCOPED_TRACE("truncate(" + std::to_string(n) + ")");
        ASSERT_EQ(sess.truncate(n), moe::Status::ok) << moe::last_error();
        ASSERT_EQ(sess.position(), n);
        ASSERT_EQ(sess.eval(tokens.data() + n, (size_t)(T - n), again.data()), moe::Status::ok) << moe::last_error();
        EXPECT_EQ(engine_rel(first.data() + (size_t)n * V, again.data(), (size_t)(T - n) * V, &same), 0.0);
    }
    // eval_prompt with a prefix that shares 30 tokens: the session rewinds to 30 (past the ring)
    std::vector<int32_t> other(tokens.begin(), tokens.begin() + 30);
    const std::vector<int32_t> tail = moe_test::random_tokens(5, V, 99);
    other.insert(other.end(), tail.begin(), tail.end());
    size_t reused = 0;
    ASSERT_EQ(sess.eval_prompt(other.data(), other.size(), &reused), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(reused, 30u);
    std::vector<float> fresh_last((size_t)V);
    {
        moe::Session fresh;
        ASSERT_EQ(moe::Session::create(model, opt, &fresh), moe::Status::ok);
        ASSERT_EQ(fresh.eval(other.data(), other.size()), moe::Status::ok);
        EXPECT_EQ(engine_rel(fresh.logits(), sess.logits(), (size_t)V, &same), 0.0) << "eval_prompt after a long rewind";
    }
    // State files: saved at position 90, continued in a new session.
    ASSERT_EQ(sess.truncate(0), moe::Status::ok);
    ASSERT_EQ(sess.eval(tokens.data(), 90), moe::Status::ok);
    std::vector<uint8_t> state;
    ASSERT_EQ(sess.save_state(&state, nullptr), moe::Status::ok) << moe::last_error();
    moe::Session restored;
    ASSERT_EQ(moe::Session::create(model, opt, &restored), moe::Status::ok);
    ASSERT_EQ(restored.load_state(state.data(), state.size(), nullptr), moe::Status::ok) << moe::last_error();
    ASSERT_EQ(restored.position(), 90);
    ASSERT_EQ(restored.eval(tokens.data() + 90, (size_t)(T - 90), again.data()), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(engine_rel(first.data() + (size_t)90 * V, again.data(), (size_t)(T - 90) * V, &same), 0.0) << "continuation after load_state";
    // Rewinds right after a load (only the window before 90 was restored) and two rewinds in a row
    // (the second one's window was overwritten by the abandoned branch): re-evaluated, exact.
    ASSERT_EQ(restored.truncate(60), moe::Status::ok) << moe::last_error();
    ASSERT_EQ(restored.eval(tokens.data() + 60, 1, again.data()), moe::Status::ok);
    ASSERT_EQ(restored.truncate(12), moe::Status::ok) << moe::last_error();
    ASSERT_EQ(restored.eval(tokens.data() + 12, (size_t)(T - 12), again.data()), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(engine_rel(first.data() + (size_t)12 * V, again.data(), (size_t)(T - 12) * V, &same), 0.0) << "after two rewinds in a row";
    {   // the prompt-cache flow: load a state, then eval_prompt with the same prompt (rewinds by one)
        moe::Session again_loaded;
        ASSERT_EQ(moe::Session::create(model, opt, &again_loaded), moe::Status::ok);
        ASSERT_EQ(again_loaded.load_state(state.data(), state.size(), nullptr), moe::Status::ok) << moe::last_error();
        ASSERT_EQ(again_loaded.eval_prompt(tokens.data(), 90, &reused), moe::Status::ok) << moe::last_error();
        EXPECT_EQ(reused, 89u);
        EXPECT_EQ(engine_rel(first.data() + (size_t)89 * V, again_loaded.logits(), (size_t)V, &same), 0.0) << "eval_prompt after load_state";
        ASSERT_EQ(again_loaded.eval(tokens.data() + 90, (size_t)(T - 90), again.data()), moe::Status::ok);
        EXPECT_EQ(engine_rel(first.data() + (size_t)90 * V, again.data(), (size_t)(T - 90) * V, &same), 0.0);
    }
    state.resize(state.size() - 9);  // truncated: refused, the session untouched
    EXPECT_NE(restored.load_state(state.data(), state.size(), nullptr), moe::Status::ok);
    EXPECT_EQ(restored.position(), T);
}

INSTANTIATE_TEST_SUITE_P(Cases, HybridEngine, ::testing::ValuesIn(hybrid_cases()),
                         [](const ::testing::TestParamInfo<HybridCase>& i) { return std::string(i.param.name); });

}  // namespace
