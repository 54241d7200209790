// qwen35moe (Qwen3.5-35B-A3B): gated delta-net (linear attention) layers beside gated full-attention
// layers, a softmax MoE and a sigmoid-gated shared expert. The float64 oracle (tests/oracle.h)
// against llama.cpp itself, and the engine against the oracle; the same pattern as
// tests/test_families_hybrid.cpp (the peer helpers are in tests/peer_util.h).
// qwen3next (Qwen3-Next-80B-A3B), its sibling, runs through the same tests (the q3n_* cases): the
// same block with plain partial NEOX RoPE (no IMROPE sections), v heads grouped over the q/k heads
// (h / (HV/HK)) instead of tiled, and beta/alpha from one fused ssm_ba tensor laid out per q/k head
// (see tests/random_model.h); Qwen35Peer.Qwen3NextConventionsMatter shows each of the three matters.
//
// 1. Qwen35Peer: tiny random GGUFs of odd shapes (tests/random_model.h: 4-6 layers with full
//    attention every 3rd or 4th layer or a per-layer array, head_dim 32-64 with partial rotary and
//    IMROPE sections that leave some pairs unrotated (qwen3next: head_dim 40-64, plain partial NEOX),
//    1-3 v heads per q/k head, state sizes 8-32, conv kernels 3 and 4, 6-10 experts top-2/3, shared
//    expert) go through the llama_peer (tests/peer/):
//    the prompt as one batch, then greedy decoding one token per llama_decode (-n N), which carries
//    the conv and recurrent states from one call to the next. Every row - prompt and decoded - is
//    compared with the oracle run over prompt ++ generated tokens. F32: float32 rounding only
//    (measured <= 4.3e-6 relative for qwen35moe, <= 4.6e-6 for qwen3next, the prompt batch through
//    ggml's chunked delta-net; bound 2e-5).
//    Q8_0: llama.cpp also rounds the activations to q8_0, which the delta net amplifies (2-5%),
//    bound 6e-2 (see the cases).
// 2. Qwen35Peer.OracleFeaturesMatter: each feature switched off in the oracle alone (conv history,
//    tap order, silu after the conv, l2 norm, head mapping, decay, beta, the z gate, the attention
//    gate and its place in the q projection, IMROPE sections, q/k norm, the shared-expert gate, the
//    renormalisation, ...) moves it far from llama.cpp. Qwen35Peer.Qwen3NextConventionsMatter: the
//    same for qwen3next's own conventions (grouped v heads, the fused ssm_ba row layout, partial NEOX).
// 3. Qwen35Engine (the qwen35moe and the qwen3next cases): the engine against the oracle (prefill,
//    then one token at a time), and Session::reset / truncate: after truncate(n) and evaluating the
//    rest again the logits equal the first run's (the conv and delta-net states must be restored or
//    recomputed); long rewinds, eval_prompt, a chunk cancelled midway and state files (also one
//    saved while the states were stale) continue bit for bit. Qwen35Load: hostile delta-net metadata,
//    and qwen3next's fused ssm_ba missing or misshapen, are refused with a clear error.
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

struct Q35Case {
    const char* name;
    ModelSpec spec;
    int n_prompt;      // evaluated as one batch (longer than the conv kernel, so the window slides)
    int n_gen;         // then this many greedy tokens, one per call (the peer), or one per eval (the engine)
    double margin;     // minimum router-logit margin of every top-k decision of the prompt
    double peer_tol;   // llama.cpp vs oracle, max|d|/max|ref|
    double engine_tol; // engine vs oracle
};
void PrintTo(const Q35Case& c, std::ostream* os) {
    *os << c.name << ": " << moe_test::describe(c.spec) << ", " << c.n_prompt << "+" << c.n_gen << " tokens";
}

ModelSpec q35_spec(int n_embd, int n_head, int n_head_kv, int head_dim, int n_rot, int n_layer, int n_expert, int n_used, int n_ff,
                   int n_ff_shared, uint64_t seed, const char* arch = "qwen35moe") {
    ModelSpec s;
    s.arch = arch;
    s.n_vocab = 300;
    s.n_embd = n_embd;
    s.n_head = n_head;
    s.n_head_kv = n_head_kv;
    s.head_dim = head_dim;
    s.n_rot = n_rot;
    s.n_layer = n_layer;
    s.n_expert = n_expert;
    s.n_expert_used = n_used;
    s.n_ff = n_ff;
    s.n_ff_shared = n_ff_shared;
    s.rope_base = 10000000.f;  // Qwen3.5's
    s.rms_eps = 1e-6f;
    s.seed = seed;
    return s;
}

std::vector<Q35Case> q35_cases() {
    std::vector<Q35Case> c;
    const double kF32Margin = 1e-4, kF32Tol = 2e-5;
    {   // Qwen3.5-35B-A3B's layout in small: full attention every 4th layer, head_dim 64 with a quarter
        // rotary (16 dims, sections 3/3/2/0 = every pair rotates), 2 q/k heads, 4 v heads of 16
        ModelSpec s = q35_spec(160, 4, 2, 64, 16, 4, 8, 2, 40, 56, 201);
        s.ssm_group = 2;
        s.ssm_dt_rank = 4;
        s.ssm_state = 16;
        c.push_back({"q35_DDDA_hd64_rot16_v2per", s, 32, 8, kF32Margin, kF32Tol, kF32Tol});
    }
    {   // interval 3 over 6 layers, MQA head_dim 48, rot 20 with sections 3/1/1/0 (pairs 4 and 9 keep
        // their values), as many v heads as q/k heads, state 24, 10 experts top-3, tied embeddings
        ModelSpec s = q35_spec(144, 3, 1, 48, 20, 6, 10, 3, 24, 40, 211);
        s.full_attn_interval = 3;
        s.rope_sections = {3, 1, 1, 0};
        s.ssm_group = 2;
        s.ssm_dt_rank = 2;
        s.ssm_state = 24;
        s.tied = true;
        c.push_back({"q35_DDADDA_hd48_sect3110_x10_tied", s, 30, 10, kF32Margin, kF32Tol, kF32Tol});
    }
    {   // the per-layer array (attention first and twice), full rotary head_dim 32 with sections
        // 2/2/1/1 (a 4th section: every 6th pair keeps its values), 3 v heads per q/k head, state 8,
        // conv kernel 3, 6 experts top-3
        ModelSpec s = q35_spec(96, 4, 4, 32, 32, 5, 6, 3, 32, 24, 221);
        s.recr_layers = {0, 1, 1, 0, 1};
        s.rope_sections = {2, 2, 1, 1};
        s.ssm_group = 2;
        s.ssm_dt_rank = 6;
        s.ssm_state = 8;
        s.ssm_conv = 3;
        c.push_back({"q35_array_ADDAD_hd32_sect2211_v3per", s, 34, 6, kF32Margin, kF32Tol, kF32Tol});
    }
    {   // one q/k head for 4 v heads of 32, GQA 4/2 head_dim 32 rot 8 (sections auto 2/1/1/0), full
        // attention every 4th layer over 5 layers (one attention layer), 6 experts top-2
        ModelSpec s = q35_spec(128, 4, 2, 32, 8, 5, 6, 2, 48, 64, 231);
        s.ssm_group = 1;
        s.ssm_dt_rank = 4;
        s.ssm_state = 32;
        c.push_back({"q35_DDDAD_state32_v4per", s, 28, 12, kF32Margin, kF32Tol, kF32Tol});
    }
    // Q8_0: attn_qkv, attn_gate, ssm_alpha/beta, ssm_out, q/k/v/o, experts, shared expert, token_embd
    // and output are Q8_0 (every ne0 a multiple of 32); the conv kernel, norms, ssm_a/ssm_dt, routers
    // and the shared-expert gate stay F32. llama.cpp rounds the activations of every Q8_0 matmul to
    // q8_0, and the delta net amplifies that more than attention does (per-head l2 norms of 32 values,
    // q.k of unit vectors, the per-head RMSNorm of the output): measured 2-4% relative, 1.5% with the
    // delta-net projections kept F32 and 4.1% with only them Q8_0; bound 6e-2. Router logits ~ N(0,
    // 6^2) so that a seed with all top-k margins >= 0.1 (q8_0 noise on the logits is ~0.03) exists.
    {
        ModelSpec s = q35_spec(256, 4, 2, 64, 16, 4, 8, 2, 64, 96, 241);
        s.wtype = TT::q8_0;
        s.router_scale = 6.0;
        s.ssm_group = 2;
        s.ssm_dt_rank = 4;
        s.ssm_state = 32;
        c.push_back({"q35_Q8_0", s, 24, 8, 0.1, 6e-2, 6e-2});
    }
    // qwen3next: no rope sections; grouped v heads; ssm_ba fused per q/k head
    {   // Qwen3-Next-80B-A3B's layout in small (16 q/k heads, 32 v heads, head_dim 256 rot 64 there):
        // full attention every 4th layer, head_dim 64 with a quarter rotary, 2 q/k heads with 2 v heads
        // each (grouped: v 0,1 read q/k 0; tiled would read 0,1)
        ModelSpec s = q35_spec(128, 4, 2, 64, 16, 4, 8, 2, 40, 48, 301, "qwen3next");
        s.ssm_group = 2;
        s.ssm_dt_rank = 4;
        s.ssm_state = 16;
        c.push_back({"q3n_DDDA_hd64_rot16_v2per", s, 32, 8, kF32Margin, kF32Tol, kF32Tol});
    }
    {   // interval 3 over 6 layers, MQA head_dim 48 with rot 12 (6 of 24 pairs rotate), 3 v heads per
        // q/k head (ssm_ba rows b b b a a a | b b b a a a), state 24, conv kernel 3, 10 experts top-3, tied
        ModelSpec s = q35_spec(144, 3, 1, 48, 12, 6, 10, 3, 24, 40, 311, "qwen3next");
        s.full_attn_interval = 3;
        s.ssm_group = 2;
        s.ssm_dt_rank = 6;
        s.ssm_state = 24;
        s.ssm_conv = 3;
        s.tied = true;
        c.push_back({"q3n_DDADDA_hd48_rot12_v3per_tied", s, 30, 10, kF32Margin, kF32Tol, kF32Tol});
    }
    {   // the per-layer array, head_dim 40 rot 20, one v head per q/k head (3 of each: the mapping is the
        // identity, ssm_ba rows b a | b a | b a), state 8, 6 experts top-3
        ModelSpec s = q35_spec(96, 4, 2, 40, 20, 5, 6, 3, 32, 24, 321, "qwen3next");
        s.recr_layers = {1, 0, 1, 1, 0};
        s.ssm_group = 3;
        s.ssm_dt_rank = 3;
        s.ssm_state = 8;
        c.push_back({"q3n_array_DADDA_hd40_rot20_v1per", s, 34, 6, kF32Margin, kF32Tol, kF32Tol});
    }
    {   // Q8_0 (ssm_ba too, ne0 = 256), as q35_Q8_0: 4 q/k heads of 32 with 2 v heads each; measured
        // 4.9e-2 relative on the prompt, 4.2e-2 on the decoded rows whose routing is clear
        ModelSpec s = q35_spec(256, 4, 2, 64, 16, 4, 8, 2, 64, 96, 341, "qwen3next");
        s.wtype = TT::q8_0;
        s.router_scale = 6.0;
        s.ssm_group = 4;
        s.ssm_dt_rank = 8;
        s.ssm_state = 32;
        c.push_back({"q3n_Q8_0_v2per", s, 24, 8, 0.1, 6e-2, 6e-2});
    }
    return c;
}

OracleCase make_case(const Q35Case& tc) { return moe_test::make_oracle_case(tc.spec, tc.n_prompt, tc.margin, 200); }

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

class Qwen35Peer : public ::testing::TestWithParam<Q35Case> {};

// The oracle's logits for llama.cpp's run of `c`: prompt ++ the peer's greedy tokens.
struct PeerRun {
    std::vector<float> logits;
    std::vector<int32_t> all_tokens;
    moe_test::OracleResult ref;
};

::testing::AssertionResult peer_run(const std::string& peer, const Q35Case& tc, const OracleCase& c, const std::string& tag, PeerRun* out) {
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

// The case called `name`, built, with llama.cpp's run of it, whose logits the oracle must match
// (the baseline of the ablation tests below).
::testing::AssertionResult named_case_with_peer(const std::string& peer, const char* name, const std::string& tag, Q35Case* tc, OracleCase* c,
                                                PeerRun* pr) {
    bool found = false;
    for (const Q35Case& x : q35_cases())
        if (std::string(x.name) == name) { *tc = x; found = true; }
    if (!found) return ::testing::AssertionFailure() << "no case " << name;
    *c = make_case(*tc);
    if (!c->ok) return ::testing::AssertionFailure() << c->error;
    ::testing::AssertionResult ok = peer_run(peer, *tc, *c, tag, pr);
    if (!ok) return ok;
    const double rel = diff_rows(pr->ref, pr->logits, 0, tc->n_prompt + tc->n_gen).rel();
    if (!(rel < tc->peer_tol)) return ::testing::AssertionFailure() << "oracle vs llama.cpp " << rel << " before any ablation";
    return ::testing::AssertionSuccess();
}

TEST_P(Qwen35Peer, OracleMatchesLlamaCpp) {
    const Q35Case& tc = GetParam();
    const std::string peer = peer_path();
    if (peer.empty()) {
        GTEST_SKIP() << "llama_peer not built (configure with MOE_PEER_DIR, or set MOE_LLAMA_PEER)";
    }
    OracleCase c = make_case(tc);
    ASSERT_TRUE(c.ok) << c.error;
    SCOPED_TRACE(moe_test::describe(c.model.spec));
    ASSERT_GT(tc.n_prompt, 2 * c.model.spec.ssm_conv) << "the conv window must slide";
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
    std::printf("[ %-9s] %-36s llama.cpp vs oracle: prompt max rel %.2e (rms %.2e), decode max rel %.2e (rms %.2e, %d of %d rows)\n",
                tc.spec.arch.c_str(), tc.name, pre.rel(), pre.rel_rms(), dec.rel(), dec.rel_rms(), dec_end - tc.n_prompt, tc.n_gen);
}

// Each feature switched off in the oracle alone must move it far from llama.cpp (>= 100x the F32
// bound). Not listed: the delta net's 1/sqrt(state size) on the output, which the gated RMSNorm
// right after cancels (up to eps), so no test can see it.
TEST(Qwen35Peer, OracleFeaturesMatter) {
    const std::string peer = peer_path();
    if (peer.empty()) {
        GTEST_SKIP() << "llama_peer not built (configure with MOE_PEER_DIR, or set MOE_LLAMA_PEER)";
    }
    using moe_test::RandomModel;
    using Abl = moe_test::Oracle::Qwen35Ablation;
    struct Ablation {
        const char* what;
        void (*apply)(RandomModel*);
        void (*flag)(Abl*);
    };
    auto none_m = [](RandomModel*) {};
    auto none_f = [](Abl*) {};
    const std::vector<Ablation> ablations = {
        {"conv without history (last tap only)", [](RandomModel* m) {
             const int KC = m->spec.ssm_conv;
             for (auto& L : m->layers)
                 for (size_t i = 0; i < L.ssm_conv1d.size(); ++i)
                     if ((int)(i % (size_t)KC) != KC - 1) L.ssm_conv1d[i] = 0.f;
         }, none_f},
        {"conv taps reversed", [](RandomModel* m) {
             const size_t KC = (size_t)m->spec.ssm_conv;
             for (auto& L : m->layers)
                 for (size_t c = 0; c + KC <= L.ssm_conv1d.size(); c += KC)
                     std::reverse(L.ssm_conv1d.begin() + (ptrdiff_t)c, L.ssm_conv1d.begin() + (ptrdiff_t)(c + KC));
         }, none_f},
        {"no silu after the conv", none_m, [](Abl* a) { a->no_conv_silu = true; }},
        {"q/k not l2-normalised", none_m, [](Abl* a) { a->no_l2norm = true; }},
        {"v heads grouped (h / ratio), not tiled", none_m, [](Abl* a) { a->heads_grouped = true; }},
        {"no decay (ssm_a = 0)", [](RandomModel* m) { for (auto& L : m->layers) std::fill(L.ssm_a.begin(), L.ssm_a.end(), 0.f); }, none_f},
        {"decay after the update", none_m, [](Abl* a) { a->decay_after_update = true; }},
        {"no dt bias", [](RandomModel* m) { for (auto& L : m->layers) L.ssm_dt.clear(); }, none_f},
        {"beta = 1", none_m, [](Abl* a) { a->beta_one = true; }},
        {"no silu(z) gate", none_m, [](Abl* a) { a->no_z_gate = true; }},
        {"ssm_norm weights ignored", [](RandomModel* m) { for (auto& L : m->layers) std::fill(L.ssm_norm.begin(), L.ssm_norm.end(), 1.f); }, none_f},
        {"no attention output gate", none_m, [](Abl* a) { a->no_attn_gate = true; }},
        {"attn_q per head [gate, q]", none_m, [](Abl* a) { a->gate_before_q = true; }},
        {"no q/k norm", [](RandomModel* m) { for (auto& L : m->layers) { L.q_norm.clear(); L.k_norm.clear(); } }, none_f},
        {"RoPE: every pair rotates (no sections)", none_m, [](Abl* a) { a->rope_all_pairs = true; }},
        {"RoPE NORM pairs", none_m, [](Abl* a) { a->rope_norm_pairs = true; }},
        {"shared expert ungated", [](RandomModel* m) { for (auto& L : m->layers) L.gate_inp_shexp.clear(); }, none_f},
        {"no shared expert", [](RandomModel* m) { for (auto& L : m->layers) L.gate_shexp.clear(); }, none_f},
        {"weights not renormalised", [](RandomModel* m) { m->norm_topk = false; }, none_f},
    };
    for (const char* name : {"q35_DDADDA_hd48_sect3110_x10_tied", "q35_array_ADDAD_hd32_sect2211_v3per"}) {
        SCOPED_TRACE(name);
        Q35Case case_storage;
        const Q35Case* tc = &case_storage;
        OracleCase c;
        PeerRun pr;
        ASSERT_TRUE(named_case_with_peer(peer, name, "abl_", &case_storage, &c, &pr));
        const int T = tc->n_prompt + tc->n_gen;
        for (const Ablation& a : ablations) {
            // the head mapping only shows with more v heads than q/k heads
            if (std::string(a.what).find("grouped") != std::string::npos && c.model.spec.ssm_dt_rank == c.model.spec.ssm_group) continue;
            RandomModel alt = c.model;
            a.apply(&alt);
            moe_test::Oracle o(alt);
            a.flag(&o.q35);
            const double rel = diff_rows(o.run(pr.all_tokens), pr.logits, 0, T).rel();
            EXPECT_GT(rel, 100 * tc->peer_tol) << a.what << ": the oracle without it is as close to llama.cpp";
            std::printf("[ qwen35moe] %-36s ablation %-40s: oracle vs llama.cpp %.4e\n", name, a.what, rel);
        }
    }
}

// qwen3next's own conventions, each replaced in the oracle alone by a plausible alternative, must move
// it far from llama.cpp (>= 100x the F32 bound): the grouped head mapping (tiled instead, as
// qwen35moe), the layout of the fused ssm_ba rows (three other readings of the same tensor), and the
// partial NEOX RoPE. An alternative that coincides with the real convention for a case's shape (tiled
// == grouped when HV == HK; halves == per-q/k-head blocks when HK == 1; per-v-head pairs == blocks
// when HV == HK) is skipped for that case.
TEST(Qwen35Peer, Qwen3NextConventionsMatter) {
    const std::string peer = peer_path();
    if (peer.empty()) {
        GTEST_SKIP() << "llama_peer not built (configure with MOE_PEER_DIR, or set MOE_LLAMA_PEER)";
    }
    using moe_test::RandomModel;
    using Abl = moe_test::Oracle::Qwen35Ablation;
    // Reads beta / alpha of v head h from ssm_ba row row(h, is_alpha, HV, r) instead.
    using RowOf = int (*)(int h, bool is_alpha, int HV, int r);
    auto reread_ba = [](RandomModel* m, RowOf row) {
        const int E = m->spec.n_embd, HV = m->spec.ssm_dt_rank, r = HV / m->spec.ssm_group;
        for (auto& L : m->layers) {
            if (L.ssm_ba.empty()) continue;
            for (int h = 0; h < HV; ++h)
                for (int e = 0; e < E; ++e) {
                    L.ssm_beta[(size_t)h * (size_t)E + (size_t)e] = L.ssm_ba[(size_t)row(h, false, HV, r) * (size_t)E + (size_t)e];
                    L.ssm_alpha[(size_t)h * (size_t)E + (size_t)e] = L.ssm_ba[(size_t)row(h, true, HV, r) * (size_t)E + (size_t)e];
                }
        }
    };
    struct Ablation {
        const char* what;
        RowOf ba_row;                          // nullptr: the model's own unpacking
        void (*apply)(RandomModel*);
        void (*flag)(Abl*);
        bool (*applies)(const ModelSpec&);     // false: the alternative equals the real convention here
    };
    auto none_m = [](RandomModel*) {};
    auto none_f = [](Abl*) {};
    auto always = [](const ModelSpec&) { return true; };
    const std::vector<Ablation> ablations = {
        {"v heads tiled (h % HK), not grouped", nullptr, none_m, [](Abl* a) { a->heads_tiled = true; },
         [](const ModelSpec& s) { return s.ssm_dt_rank != s.ssm_group; }},
        {"ssm_ba halves: beta rows [0,HV), alpha [HV,2HV)", [](int h, bool al, int HV, int) { return al ? HV + h : h; }, none_m, none_f,
         [](const ModelSpec& s) { return s.ssm_group > 1; }},
        {"ssm_ba pairs per v head: beta 2h, alpha 2h+1", [](int h, bool al, int, int) { return 2 * h + (al ? 1 : 0); }, none_m, none_f,
         [](const ModelSpec& s) { return s.ssm_dt_rank != s.ssm_group; }},
        {"ssm_ba blocks [alpha, beta] (swapped)", [](int h, bool al, int, int r) { return 2 * r * (h / r) + (al ? 0 : r) + h % r; }, none_m,
         none_f, always},
        {"RoPE over the whole head", nullptr, [](RandomModel* m) { m->n_rot = m->head_dim; }, none_f, always},
        {"RoPE NORM pairs (2i, 2i+1)", nullptr, [](RandomModel* m) { m->rope_neox = false; }, none_f, always},
        {"no RoPE", nullptr, [](RandomModel* m) { m->n_rot = 0; }, none_f, always},
    };
    for (const char* name : {"q3n_DDDA_hd64_rot16_v2per", "q3n_DDADDA_hd48_rot12_v3per_tied", "q3n_array_DADDA_hd40_rot20_v1per"}) {
        SCOPED_TRACE(name);
        Q35Case case_storage;
        const Q35Case* tc = &case_storage;
        OracleCase c;
        PeerRun pr;
        ASSERT_TRUE(named_case_with_peer(peer, name, "abl3n_", &case_storage, &c, &pr));
        const int T = tc->n_prompt + tc->n_gen;
        for (const Ablation& a : ablations) {
            if (!a.applies(c.model.spec)) continue;
            RandomModel alt = c.model;
            if (a.ba_row) reread_ba(&alt, a.ba_row);
            a.apply(&alt);
            moe_test::Oracle o(alt);
            a.flag(&o.q35);
            const double rel = diff_rows(o.run(pr.all_tokens), pr.logits, 0, T).rel();
            EXPECT_GT(rel, 100 * tc->peer_tol) << a.what << ": the oracle without it is as close to llama.cpp";
            std::printf("[ qwen3next] %-36s ablation %-48s: oracle vs llama.cpp %.4e\n", name, a.what, rel);
        }
    }
}

INSTANTIATE_TEST_SUITE_P(Cases, Qwen35Peer, ::testing::ValuesIn(q35_cases()),
                         [](const ::testing::TestParamInfo<Q35Case>& i) { return std::string(i.param.name); });

//---------------------------------------------------------------------------------------------------
// 3. engine vs oracle
//---------------------------------------------------------------------------------------------------

class Qwen35Engine : public ::testing::TestWithParam<Q35Case> {
protected:
    // Loads the case's file (the model with the first seed whose routing margins are clear).
    ::testing::AssertionResult load(const Q35Case& tc, OracleCase* c, TempFile* f, moe::Model* model) {
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

TEST_P(Qwen35Engine, MatchesOracle) {
    const Q35Case& tc = GetParam();
    OracleCase c;
    TempFile f(std::string("eng_") + tc.name);
    moe::Model model;
    ASSERT_TRUE(load(tc, &c, &f, &model));
    SCOPED_TRACE(moe_test::describe(c.model.spec));
    const moe_test::RandomModel& rm = c.model;
    const ModelSpec& s = rm.spec;

    // What llama.cpp reports for these files: n_ff the expert width, n_ff_shared the shared
    // expert's, softmax gating, renormalised, no weight scale.
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
    EXPECT_EQ(in.n_ff_shared, rm.n_ff_shared);
    EXPECT_EQ(in.expert_gating, moe::ExpertGating::softmax);
    EXPECT_TRUE(in.expert_weights_norm);
    EXPECT_EQ(in.expert_weights_scale, 1.f);

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

    // Routing: the engine's experts must be the oracle's top-k (as sets) on every layer, except
    // near-ties in router logit (quantized weights only), which are then forced on the oracle.
    const double near_tie = tc.spec.wtype == TT::f32 ? 0.0 : 0.0625;
    int flips = 0;
    std::vector<int32_t> forced((size_t)T * (size_t)L * (size_t)K, 0);
    for (int p = 0; p < T; ++p) {
        for (int il = 0; il < L; ++il) {
            const size_t base = ((size_t)p * (size_t)L + (size_t)il) * (size_t)K;
            std::copy(full.experts.begin() + (ptrdiff_t)base, full.experts.begin() + (ptrdiff_t)(base + (size_t)K), forced.begin() + (ptrdiff_t)base);
            if (experts[base] < 0) continue;  // not observed
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
                    ASSERT_LE(kth - sc[e], near_tie) << "position " << p << " layer " << il << ": engine chose expert " << e << " (logit "
                                                     << sc[e] << ") but the k-th best logit is " << kth;
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
    std::printf("[ %-9s] %-36s engine vs oracle: prefill %.2e, decode %.2e, routing flips %d\n", tc.spec.arch.c_str(), tc.name, pre.rel(), dec.rel(), flips);
}

// reset() and truncate(n) must leave the conv and delta-net states as an uninterrupted run would
// have them: after truncate(n), evaluating tokens n .. T-1 again gives the first run's rows (row
// kernels only, so chunking does not change a token's result), and a different continuation
// matches the oracle.
TEST_P(Qwen35Engine, ResetAndTruncateRestoreRecurrentState) {
    const Q35Case& tc = GetParam();
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
    EXPECT_LE(engine_rel(first.data(), again.data(), first.size(), &same), 1e-6) << "reset + re-eval differs (stale recurrent state?)";

    // n = T - 1 (regenerate the last token), mid-sequence, inside the first conv_kernel - 1 positions, 0
    for (int n : {T - 1, T / 2 + 1, T / 2, 2, 1, 0}) {
        SCOPED_TRACE("truncate(" + std::to_string(n) + ")");
        const moe::Status st = sess.truncate(n);
        ASSERT_EQ(st, moe::Status::ok) << moe::last_error();
        ASSERT_EQ(sess.position(), n);
        ASSERT_EQ(sess.eval(c.tokens.data() + n, (size_t)(T - n), again.data()), moe::Status::ok) << moe::last_error();
        const double rel = engine_rel(first.data() + (size_t)n * row, again.data(), (size_t)(T - n) * row, &same);
        EXPECT_LE(rel, 1e-6) << "rows " << n << ".." << T - 1 << " after truncate differ from the first run";
        std::printf("[ %-9s] %-36s truncate(%2d) + re-eval vs first run: max rel %.2e%s\n", tc.spec.arch.c_str(), tc.name, n, rel, same ? " (bit-identical)" : "");
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

// Long rewinds, eval_prompt with a shared prefix, and session state files carrying the conv window
// and the delta-net states must all reproduce an uninterrupted run bit for bit (row kernels, one
// thread count), however the engine keeps or rebuilds the recurrent state.
class Qwen35EngineLong : public Qwen35Engine {};  // the fixture's load(), without parameters
TEST_F(Qwen35EngineLong, LongRewindsAndStateFiles) {
    const Q35Case tc = q35_cases()[0];
    OracleCase c;
    TempFile f("long_rewind");
    moe::Model model;
    ASSERT_TRUE(load(tc, &c, &f, &model));
    const int T = 120, V = c.model.spec.n_vocab;
    const std::vector<int32_t> tokens = moe_test::random_tokens(T, V, 777);
    moe::SessionOptions opt;
    opt.n_ctx = 160;
    opt.n_threads = 2;
    opt.n_batch = 4;
    opt.gemm_min_tokens = -1;
    moe::Session sess;
    ASSERT_EQ(moe::Session::create(model, opt, &sess), moe::Status::ok) << moe::last_error();
    std::vector<float> first((size_t)T * V), again((size_t)T * V);
    ASSERT_EQ(sess.eval(tokens.data(), (size_t)T, first.data()), moe::Status::ok) << moe::last_error();
    bool same = false;
    for (int n : {119, 100, 40, 7}) {
        SCOPED_TRACE("truncate(" + std::to_string(n) + ")");
        const moe::Status st = sess.truncate(n);
        ASSERT_EQ(st, moe::Status::ok) << moe::last_error();
        ASSERT_EQ(sess.position(), n);
        ASSERT_EQ(sess.eval(tokens.data() + n, (size_t)(T - n), again.data()), moe::Status::ok) << moe::last_error();
        EXPECT_EQ(engine_rel(first.data() + (size_t)n * V, again.data(), (size_t)(T - n) * V, &same), 0.0);
    }
    // eval_prompt with a prompt that shares 30 tokens: the session rewinds to 30
    std::vector<int32_t> other(tokens.begin(), tokens.begin() + 30);
    const std::vector<int32_t> tail = moe_test::random_tokens(5, V, 99);
    other.insert(other.end(), tail.begin(), tail.end());
    size_t reused = 0;
    ASSERT_EQ(sess.eval_prompt(other.data(), other.size(), &reused), moe::Status::ok) << moe::last_error();
    EXPECT_LE(reused, 30u);
    {
        moe::Session fresh;
        ASSERT_EQ(moe::Session::create(model, opt, &fresh), moe::Status::ok);
        ASSERT_EQ(fresh.eval(other.data(), other.size()), moe::Status::ok);
        EXPECT_EQ(engine_rel(fresh.logits(), sess.logits(), (size_t)V, &same), 0.0) << "eval_prompt after a long rewind";
    }
    // A chunk cancelled midway (Session::cancel from the progress callback once the first chunk
    // is kept) has already moved the first layers' states on: the next eval must rebuild them.
    {
        struct CancelOnce {
            moe::Session* s = nullptr;
            static bool call(void* user, size_t, size_t) {
                CancelOnce* c = static_cast<CancelOnce*>(user);
                if (c->s) c->s->cancel();
                c->s = nullptr;
                return true;
            }
        } once;
        moe::SessionOptions copt = opt;
        copt.progress = &CancelOnce::call;
        copt.progress_user = &once;
        moe::Session cs;
        ASSERT_EQ(moe::Session::create(model, copt, &cs), moe::Status::ok);
        once.s = &cs;
        ASSERT_EQ(cs.eval(tokens.data(), 10), moe::Status::cancelled) << "chunks of 4: the second one is cancelled";
        ASSERT_EQ(cs.position(), 4);
        std::vector<uint8_t> stale;  // saved while the states are stale: the loader must rebuild them too
        ASSERT_EQ(cs.save_state(&stale, nullptr), moe::Status::ok) << moe::last_error();
        ASSERT_EQ(cs.eval(tokens.data() + 4, (size_t)(T - 4), again.data()), moe::Status::ok) << moe::last_error();
        EXPECT_EQ(engine_rel(first.data() + (size_t)4 * V, again.data(), (size_t)(T - 4) * V, &same), 0.0) << "after a cancelled chunk";
        moe::Session from_stale;
        ASSERT_EQ(moe::Session::create(model, opt, &from_stale), moe::Status::ok);
        ASSERT_EQ(from_stale.load_state(stale.data(), stale.size(), nullptr), moe::Status::ok) << moe::last_error();
        ASSERT_EQ(from_stale.position(), 4);
        ASSERT_EQ(from_stale.eval(tokens.data() + 4, (size_t)(T - 4), again.data()), moe::Status::ok) << moe::last_error();
        EXPECT_EQ(engine_rel(first.data() + (size_t)4 * V, again.data(), (size_t)(T - 4) * V, &same), 0.0) << "state saved after a cancelled chunk";
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
    state.resize(state.size() - 9);  // truncated: refused, the session untouched
    EXPECT_NE(restored.load_state(state.data(), state.size(), nullptr), moe::Status::ok);
    EXPECT_EQ(restored.position(), T);
}

// Hostile or missing delta-net metadata: a clear error naming what is wrong, never a crash.
TEST(Qwen35Load, BadDeltaNetMetadataIsRefused) {
    struct Bad { const char* what; std::string omit; std::vector<std::pair<std::string, uint32_t>> keys; moe::Status want; const char* mention; };
    const std::vector<Bad> cases = {
        {"inner size != state * v heads", "", {{"qwen35moe.ssm.inner_size", 65}}, moe::Status::invalid_file, "delta-net"},
        {"conv kernel 1", "", {{"qwen35moe.ssm.conv_kernel", 1}}, moe::Status::invalid_file, "delta-net"},
        {"v heads not a multiple of k heads", "", {{"qwen35moe.ssm.group_count", 3}}, moe::Status::invalid_file, "delta-net"},
        {"state size 0", "", {{"qwen35moe.ssm.state_size", 0}}, moe::Status::invalid_file, "delta-net"},
        {"huge state", "", {{"qwen35moe.ssm.state_size", 1u << 30}}, moe::Status::invalid_file, "delta-net"},
        {"full attention interval 0", "", {{"qwen35moe.full_attention_interval", 0}}, moe::Status::invalid_file, "full_attention_interval"},
        {"no rope sections", "qwen35moe.rope.dimension_sections", {}, moe::Status::missing_key, "rope.dimension_sections"},
        {"no time step rank", "qwen35moe.ssm.time_step_rank", {}, moe::Status::missing_key, "ssm.time_step_rank"},
    };
    for (const Bad& b : cases) {
        SCOPED_TRACE(b.what);
        ModelSpec s = q35_cases()[0].spec;  // 4 v heads of 16 over 2 q/k heads
        s.omit_key = b.omit;
        s.u32_keys = b.keys;
        const moe_test::RandomModel rm = moe_test::make_random_model(s);
        ASSERT_TRUE(rm.ok()) << rm.error;
        const std::vector<uint8_t> bytes = rm.bytes();
        moe::Model model;
        EXPECT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &model), b.want) << moe::last_error();
        EXPECT_NE(std::string(moe::last_error()).find(b.mention), std::string::npos) << moe::last_error();
        EXPECT_FALSE(model.valid());
    }
}

// qwen3next: the fused blk.N.ssm_ba.weight {n_embd, 2 HV} is required (llama.cpp creates it without
// TENSOR_NOT_REQUIRED); a missing or misshapen one is refused with an error naming it. (Fails with
// "unsupported architecture" until the engine loads qwen3next.)
TEST(Qwen35Load, Qwen3NextFusedBetaAlphaIsChecked) {
    const std::vector<Q35Case> cases = q35_cases();
    const Q35Case* tc = nullptr;
    for (const Q35Case& x : cases)
        if (std::string(x.name) == "q3n_DDADDA_hd48_rot12_v3per_tied") tc = &x;
    ASSERT_NE(tc, nullptr);
    {
        const moe_test::RandomModel rm = moe_test::make_random_model(tc->spec);
        ASSERT_TRUE(rm.ok()) << rm.error;
        const std::vector<uint8_t> bytes = rm.bytes();
        moe::Model model;
        EXPECT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &model), moe::Status::ok) << moe::last_error();
    }
    struct Bad { const char* what; bool omit; moe::Status want; };
    for (const Bad& b : {Bad{"ssm_ba missing", true, moe::Status::missing_tensor}, Bad{"ssm_ba misshapen", false, moe::Status::shape_mismatch}}) {
        SCOPED_TRACE(b.what);
        ModelSpec s = tc->spec;
        (b.omit ? s.omit_tensor : s.misshape_tensor) = "blk.1.ssm_ba.weight";
        const moe_test::RandomModel rm = moe_test::make_random_model(s);
        ASSERT_TRUE(rm.ok()) << rm.error;
        const std::vector<uint8_t> bytes = rm.bytes();
        moe::Model model;
        EXPECT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &model), b.want) << moe::last_error();
        EXPECT_NE(std::string(moe::last_error()).find("ssm_ba"), std::string::npos) << moe::last_error();
        EXPECT_FALSE(model.valid());
    }
}

INSTANTIATE_TEST_SUITE_P(Cases, Qwen35Engine, ::testing::ValuesIn(q35_cases()),
                         [](const ::testing::TestParamInfo<Q35Case>& i) { return std::string(i.param.name); });

}  // namespace
