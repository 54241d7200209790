// Forward pass vs the naive float64 oracle (tests/oracle.h) on tiny random-weight models
// (tests/random_model.h) of every supported architecture, plus the Session contract: prefill vs
// token-by-token, chunked prefill, thread counts, concurrent sessions, reset/truncate, bad tokens,
// a full context, and loader errors that name the tensor or key.
//
// The oracle itself was checked against llama.cpp (tests/test_parity.cpp also does so when the
// llama_peer is built): on these models at F32 the two agree to ~5e-7 relative.
#include "moe_infer.h"
#include "oracle.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

namespace {

using moe_test::ModelSpec;
using moe_test::OracleCase;
using moe_test::RowDiff;
using TT = moe::TensorType;

const int kPrompt = 12;  // tokens evaluated in one call
const int kDecode = 8;   // then one at a time
const int kTokens = kPrompt + kDecode;

std::string tmp_dir() {
    const char* e = std::getenv("MOE_TEST_TMP");
    return e && *e ? e : "/tmp";
}

// A GGUF written to the temp dir, removed when done (the mapping survives the unlink on POSIX).
struct TempModelFile {
    std::string path;
    explicit TempModelFile(const std::string& name) {
        path = tmp_dir() + "/moe_fwd_" + std::to_string((long)getpid()) + "_" + name + ".gguf";
    }
    ~TempModelFile() { std::remove(path.c_str()); }
    TempModelFile(const TempModelFile&) = delete;
    TempModelFile& operator=(const TempModelFile&) = delete;
};

::testing::AssertionResult write_and_load(const moe_test::RandomModel& rm, const TempModelFile& f, moe::Model* out) {
    if (!rm.ok()) return ::testing::AssertionFailure() << "model build failed: " << rm.error;
    moe::Status s = rm.write(f.path);
    if (s != moe::Status::ok) return ::testing::AssertionFailure() << "write " << f.path << ": " << moe::last_error();
    s = moe::Model::load(f.path.c_str(), moe::LoadOptions{}, out);
    if (s != moe::Status::ok)
        return ::testing::AssertionFailure() << "Model::load: " << moe::status_string(s) << ": " << moe::last_error();
    return ::testing::AssertionSuccess();
}

// What a session produced for a token sequence.
struct EngineRun {
    std::vector<float> logits;    // n_tokens x n_vocab
    std::vector<int32_t> experts; // n_tokens x n_layer x n_expert_used; -1 where not observable
};

// Evaluates tokens[0, n_first) in one call (all_logits), then the rest one at a time. After each
// call, last_expert_ids() is recorded for the call's last position.
::testing::AssertionResult run_engine(const moe::Model& model, const moe::SessionOptions& opt, const std::vector<int32_t>& tokens,
                                      int n_first, EngineRun* r) {
    const moe::ModelInfo& info = model.info();
    const size_t V = (size_t)info.n_vocab, T = tokens.size();
    const size_t per_pos = (size_t)info.n_layer * (size_t)std::max(0, info.n_expert > 0 ? info.n_expert_used : 0);
    r->logits.assign(T * V, 0.f);
    r->experts.assign(T * per_pos, -1);
    moe::Session sess;
    moe::Status s = moe::Session::create(model, opt, &sess);
    if (s != moe::Status::ok) return ::testing::AssertionFailure() << "Session::create: " << moe::last_error();
    auto record_experts = [&](size_t pos) {
        if (!per_pos) return;
        const int32_t* ids = sess.last_expert_ids();
        if (ids) std::copy(ids, ids + per_pos, r->experts.begin() + (ptrdiff_t)(pos * per_pos));
    };
    size_t done = 0;
    if (n_first > 0) {
        s = sess.eval(tokens.data(), (size_t)n_first, r->logits.data());
        if (s != moe::Status::ok) return ::testing::AssertionFailure() << "eval(prompt): " << moe::status_string(s) << ": " << moe::last_error();
        if (std::memcmp(sess.logits(), r->logits.data() + (size_t)(n_first - 1) * V, V * sizeof(float)) != 0)
            return ::testing::AssertionFailure() << "logits() differs from the last row of all_logits";
        done = (size_t)n_first;
        record_experts(done - 1);
    }
    for (; done < T; ++done) {
        s = sess.eval(&tokens[done], 1);
        if (s != moe::Status::ok) return ::testing::AssertionFailure() << "eval(token " << done << "): " << moe::last_error();
        std::memcpy(r->logits.data() + done * V, sess.logits(), V * sizeof(float));
        record_experts(done);
    }
    if (sess.position() != (int32_t)T) return ::testing::AssertionFailure() << "position() " << sess.position() << " != " << T;
    return ::testing::AssertionSuccess();
}

RowDiff diff_vs_oracle(const moe_test::OracleResult& ref, const std::vector<float>& got, int first = 0, int end = -1, double clear_gap = 0) {
    RowDiff d;
    if (end < 0) end = ref.n_tokens;
    for (int i = first; i < end; ++i) d.add(i, ref.row(i), got.data() + (size_t)i * (size_t)ref.n_vocab, ref.n_vocab, clear_gap);
    return d;
}

double rel_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double mx = 0, mref = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        const double d = std::fabs((double)a[i] - (double)b[i]);
        if (!(d <= mx)) mx = d;
        mref = std::max(mref, std::fabs((double)a[i]));
    }
    return mref > 0 ? mx / mref : mx;
}

std::string diff_msg(const RowDiff& d) {
    std::ostringstream o;
    o << "max|d|/max|ref| = " << d.rel() << " (max|d| " << d.max_abs << " at position " << d.worst_row << ", token " << d.worst_col
      << "), rms rel " << d.rel_rms() << ", argmax " << d.argmax_agree << "/" << d.argmax_checked;
    if (d.first_argmax_mismatch >= 0) o << " (first mismatch at position " << d.first_argmax_mismatch << ")";
    return o.str();
}

void expect_info(const moe::Model& model, const moe_test::RandomModel& rm) {
    const moe::ModelInfo& in = model.info();
    const ModelSpec& s = rm.spec;
    EXPECT_EQ(in.architecture, s.arch);
    EXPECT_EQ(in.n_vocab, s.n_vocab);
    EXPECT_EQ(in.n_embd, s.n_embd);
    EXPECT_EQ(in.n_layer, s.n_layer);
    EXPECT_EQ(in.n_head, s.n_head);
    EXPECT_EQ(in.n_head_kv, s.n_head_kv);
    EXPECT_EQ(in.head_dim, rm.head_dim);
    EXPECT_EQ(in.n_rot, rm.head_dim);
    EXPECT_EQ(in.n_expert, rm.moe ? s.n_expert : 0);
    if (rm.moe) {
        EXPECT_EQ(in.n_expert_used, s.n_expert_used);
        EXPECT_EQ(in.expert_weights_norm, rm.norm_topk);
    }
    EXPECT_EQ(in.n_ff, s.n_ff);
    EXPECT_EQ(in.n_ff_shared, s.arch == "qwen2moe" ? rm.n_ff_shared : 0);
    EXPECT_EQ(in.rope_neox, rm.rope_neox);
    EXPECT_FLOAT_EQ(in.rope_freq_base, s.rope_base);
    EXPECT_FLOAT_EQ(in.rms_eps, s.rms_eps);
    EXPECT_EQ(in.n_ctx_train, s.n_ctx_train);
    // the minimal byte-level vocabulary loads too
    const moe::Tokenizer& tok = model.tokenizer();
    EXPECT_TRUE(tok.valid());
    EXPECT_EQ(tok.n_vocab(), s.n_vocab);
    EXPECT_EQ(tok.bos(), rm.bos);
    EXPECT_EQ(tok.eos(), rm.eos);
}

// The engine's experts must be the oracle's top-k (as sets) wherever the engine reported them.
// `near_tie`: a different choice is accepted when the router-logit gap to the k-th best is below it.
::testing::AssertionResult check_routing(const moe_test::RandomModel& rm, const moe_test::OracleResult& ref, const EngineRun& run,
                                         double near_tie, int* n_flips) {
    if (!rm.moe) return ::testing::AssertionSuccess();
    const int L = rm.spec.n_layer, K = rm.spec.n_expert_used, NE = rm.spec.n_expert;
    *n_flips = 0;
    for (int pos = 0; pos < ref.n_tokens; ++pos) {
        for (int il = 0; il < L; ++il) {
            const size_t base = ((size_t)pos * (size_t)L + (size_t)il) * (size_t)K;
            if (run.experts[base] < 0) continue;  // not observed
            std::set<int> got(run.experts.begin() + (ptrdiff_t)base, run.experts.begin() + (ptrdiff_t)(base + (size_t)K));
            std::set<int> want(ref.experts.begin() + (ptrdiff_t)base, ref.experts.begin() + (ptrdiff_t)(base + (size_t)K));
            if ((int)got.size() != K || *got.begin() < 0 || *got.rbegin() >= NE)
                return ::testing::AssertionFailure() << "position " << pos << " layer " << il << ": invalid expert ids";
            if (got == want) continue;
            const double* lg = &ref.router_logits[((size_t)pos * (size_t)L + (size_t)il) * (size_t)NE];
            double kth = 1e300;
            for (int e : want) kth = std::min(kth, lg[e]);
            for (int e : got) {
                if (want.count(e)) continue;
                if (kth - lg[e] > near_tie)
                    return ::testing::AssertionFailure() << "position " << pos << " layer " << il << ": engine chose expert " << e
                                                         << " (oracle router logit " << lg[e] << ") but the k-th best logit is " << kth;
            }
            ++*n_flips;
        }
    }
    return ::testing::AssertionSuccess();
}

//---------------------------------------------------------------------------------------------------
// F32: every position's logits within 1e-4 of the oracle (relative to the largest |logit|).
// Float32 accumulation over these sizes gives ~1e-6; llama.cpp measures ~5e-7 on the same models.
//---------------------------------------------------------------------------------------------------

struct FwdCase {
    const char* name;
    ModelSpec spec;
};
void PrintTo(const FwdCase& c, std::ostream* os) { *os << c.name << ": " << moe_test::describe(c.spec); }

ModelSpec spec(const char* arch, int E, int H, int HKV, int hd, int NE, int K, int ff, int V, int L) {
    ModelSpec s;
    s.arch = arch;
    s.n_embd = E;
    s.n_head = H;
    s.n_head_kv = HKV;
    s.head_dim = hd;
    s.n_expert = NE;
    s.n_expert_used = K;
    s.n_ff = ff;
    s.n_vocab = V;
    s.n_layer = L;
    s.seed = 11;
    return s;
}

std::vector<FwdCase> f32_cases() {
    std::vector<FwdCase> c;
    c.push_back({"qwen3moe_hd24_gqa_x5k2", spec("qwen3moe", 64, 4, 2, 24, 5, 2, 40, 300, 2)});
    {
        ModelSpec s = spec("qwen3moe", 48, 3, 1, 40, 8, 3, 24, 333, 2);
        s.tied = true;
        c.push_back({"qwen3moe_hd40_mqa_x8k3_tied", s});
    }
    c.push_back({"qwen3moe_hd20_mha_x3k1_3layers", spec("qwen3moe", 40, 2, 2, 20, 3, 1, 20, 271, 3)});
    {
        ModelSpec s = spec("qwen3moe", 64, 4, 4, 16, 4, 2, 32, 300, 4);
        s.rope_base = 1e6f;
        s.rms_eps = 1e-5f;
        c.push_back({"qwen3moe_4layers_base1e6", s});
    }
    c.push_back({"olmoe_hd20_x5k2", spec("olmoe", 80, 4, 4, 20, 5, 2, 36, 290, 2)});
    // GQA OLMoE (attn_k_norm {n_head_kv*hd}): no such real model, and llama.cpp insists on
    // attn_k_norm {n_embd}; checked here because the engine accepts the general shape.
    c.push_back({"olmoe_gqa_x8k1", spec("olmoe", 64, 4, 2, 16, 8, 1, 16, 300, 2)});
    {
        ModelSpec s = spec("qwen2moe", 64, 4, 2, 16, 8, 2, 32, 389, 2);
        s.n_ff_shared = 48;
        c.push_back({"qwen2moe_x8k2_shared48", s});
    }
    {
        ModelSpec s = spec("qwen2moe", 80, 2, 1, 40, 3, 3, 20, 300, 2);
        s.n_ff_shared = 28;
        c.push_back({"qwen2moe_hd40_mqa_allexperts", s});
    }
    c.push_back({"mixtral_mqa_x8k2", spec("llama", 64, 4, 1, 16, 8, 2, 48, 320, 2)});
    {
        ModelSpec s = spec("llama", 60, 3, 3, 20, 5, 3, 30, 301, 2);
        s.tied = true;
        c.push_back({"mixtral_hd20_x5k3_tied", s});
    }
    c.push_back({"mixtral_keylen24_x4k2", spec("llama", 64, 2, 1, 24, 4, 2, 16, 300, 1)});
    {
        ModelSpec s = spec("llama", 48, 6, 2, 8, 0, 0, 72, 300, 2);
        s.dense = true;
        s.tied = true;
        c.push_back({"llama_dense_hd8_tied", s});
    }
    return c;
}

class ForwardF32 : public ::testing::TestWithParam<FwdCase> {};

TEST_P(ForwardF32, MatchesOracle) {
    const FwdCase& tc = GetParam();
    // Routing decisions with a router-logit margin >= 1e-3: float32 noise (~1e-6) cannot flip them.
    OracleCase c = moe_test::make_oracle_case(tc.spec, kTokens, 1e-3);
    ASSERT_TRUE(c.ok) << c.error;
    SCOPED_TRACE(moe_test::describe(c.model.spec));
    TempModelFile f(tc.name);
    moe::Model model;
    ASSERT_TRUE(write_and_load(c.model, f, &model));
    expect_info(model, c.model);
    const double tol = 1e-4;

    std::vector<float> first;  // n_threads = 1, prompt in one call
    for (int threads : {1, 3}) {
        SCOPED_TRACE("n_threads " + std::to_string(threads));
        moe::SessionOptions opt;
        opt.n_ctx = 32;
        opt.n_threads = threads;
        EngineRun run;
        ASSERT_TRUE(run_engine(model, opt, c.tokens, kPrompt, &run));
        RowDiff pre = diff_vs_oracle(c.ref, run.logits, 0, kPrompt);
        RowDiff dec = diff_vs_oracle(c.ref, run.logits, kPrompt, kTokens);
        EXPECT_LT(pre.rel(), tol) << "prefill: " << diff_msg(pre);
        EXPECT_LT(dec.rel(), tol) << "decode: " << diff_msg(dec);
        int flips = 0;
        EXPECT_TRUE(check_routing(c.model, c.ref, run, 0.0, &flips));
        if (threads == 1) first = run.logits;
        else EXPECT_LT(rel_diff(first, run.logits), 1e-5) << "n_threads 1 vs 3";
    }

    // Token by token from the start, and chunked prefill (n_batch 5): same logits as one call.
    {
        moe::SessionOptions opt;
        opt.n_ctx = 32;
        opt.n_threads = 2;
        EngineRun tbt;
        ASSERT_TRUE(run_engine(model, opt, c.tokens, 0, &tbt));
        EXPECT_LT(rel_diff(first, tbt.logits), 1e-5) << "prefill in one call vs token by token";
        int flips = 0;
        EXPECT_TRUE(check_routing(c.model, c.ref, tbt, 0.0, &flips)) << "token by token (every position observed)";
        opt.n_batch = 5;
        EngineRun chunked;
        ASSERT_TRUE(run_engine(model, opt, c.tokens, kTokens, &chunked));
        EXPECT_LT(rel_diff(first, chunked.logits), 1e-5) << "one call of 20 tokens with n_batch 5";
        RowDiff d = diff_vs_oracle(c.ref, chunked.logits);
        EXPECT_LT(d.rel(), tol) << "n_batch 5: " << diff_msg(d);
    }
}

INSTANTIATE_TEST_SUITE_P(Archs, ForwardF32, ::testing::ValuesIn(f32_cases()),
                         [](const ::testing::TestParamInfo<FwdCase>& i) { return std::string(i.param.name); });

// Long caches with more threads than (token, KV head) pairs: decode splits each head group into
// query-head subgroups and the KV range into pieces whose online-softmax partials are merged across
// threads. A 300-token prompt in one call (n_batch 7: causal chunks attend to a growing cache), then
// decode token by token past 256 positions, against the float64 oracle.
TEST(ForwardLongContext, SplitAttentionMatchesOracle) {
    for (int n_kv : {1, 2}) {
        SCOPED_TRACE("n_head_kv " + std::to_string(n_kv));
        ModelSpec s = spec("llama", 48, 6, n_kv, 8, 4, 2, 16, 300, 1);
        const int n_tok = 300, n_prompt = 260;
        OracleCase c = moe_test::make_oracle_case(s, n_tok, 1e-4);
        ASSERT_TRUE(c.ok) << c.error;
        TempModelFile f("long_ctx_" + std::to_string(n_kv));
        moe::Model model;
        ASSERT_TRUE(write_and_load(c.model, f, &model));
        for (int threads : {1, 5, 16}) {
            SCOPED_TRACE("n_threads " + std::to_string(threads));
            moe::SessionOptions opt;
            opt.n_ctx = n_tok;
            opt.n_threads = threads;
            opt.n_batch = 7;
            EngineRun run;
            ASSERT_TRUE(run_engine(model, opt, c.tokens, n_prompt, &run));
            RowDiff d = diff_vs_oracle(c.ref, run.logits);
            EXPECT_LT(d.rel(), 1e-4) << diff_msg(d);
        }
    }
}

//---------------------------------------------------------------------------------------------------
// Quantized weights: the oracle runs on the dequantized weights, so the only legitimate
// difference is the engine's activation rounding (Q8_0 / Q8_K activations for quantized weights,
// as in llama.cpp; possibly F16/BF16 activations for F16/BF16 weights). Measured with llama.cpp
// (llama_peer) against this oracle on these very models, max|dlogit|/max|logit| over the 20
// positions: F16 4e-4, BF16 4.4e-3, Q8_0 1.3e-2, Q4_0 1.0-1.7e-2, Q4_K/Q5_K/Q6_K 1.2-1.9e-2.
// The tolerances below are ~3x those: an engine as accurate as llama.cpp passes with room, one with
// a real bug (wrong scale, wrong nibble, wrong expert) is off by O(1).
//
// Near-tie routing: activation rounding moves router logits by ~1e-2, which can legitimately flip
// a top-k decision whose margin is that small, and a flip swaps a whole expert. So (1) seeds are
// chosen with router margins >= 0.02, and (2) the engine is first run token by token, its expert
// choices are checked to be the oracle's top-k or within 0.25 of the k-th router logit, and the
// oracle is re-run with the engine's choices forced. Logits are then compared with the tolerance.
//---------------------------------------------------------------------------------------------------

struct QuantCase {
    const char* name;
    ModelSpec spec;
    double tol;
};
void PrintTo(const QuantCase& c, std::ostream* os) { *os << c.name << ": " << moe_test::describe(c.spec) << ", tol " << c.tol; }

ModelSpec with_type(ModelSpec s, TT t, TT fallback = TT::f32) {
    s.wtype = t;
    s.fallback_type = fallback;
    return s;
}

std::vector<QuantCase> quant_cases() {
    std::vector<QuantCase> c;
    const ModelSpec q3 = spec("qwen3moe", 64, 4, 2, 32, 5, 2, 32, 300, 2);
    c.push_back({"qwen3moe_F16", with_type(q3, TT::f16), 2e-3});
    c.push_back({"qwen3moe_BF16", with_type(q3, TT::bf16), 1.5e-2});
    c.push_back({"qwen3moe_Q8_0", with_type(q3, TT::q8_0), 4e-2});
    c.push_back({"qwen3moe_Q4_0", with_type(q3, TT::q4_0), 5e-2});
    c.push_back({"olmoe_Q4_0", with_type(spec("olmoe", 64, 4, 4, 16, 8, 3, 32, 300, 2), TT::q4_0), 5e-2});
    {
        ModelSpec s = spec("qwen2moe", 64, 4, 2, 16, 6, 2, 32, 300, 2);
        s.n_ff_shared = 64;
        c.push_back({"qwen2moe_Q8_0", with_type(s, TT::q8_0), 4e-2});
    }
    c.push_back({"mixtral_Q4_0", with_type(spec("llama", 64, 4, 1, 16, 8, 2, 64, 300, 2), TT::q4_0), 5e-2});
    {
        ModelSpec s = spec("llama", 48, 6, 2, 8, 0, 0, 72, 300, 2);
        s.dense = true;
        c.push_back({"llama_dense_BF16", with_type(s, TT::bf16), 1.5e-2});
    }
    // K-quants need ne0 % 256 == 0. The first has every matrix in Q4_K; the others keep the
    // experts' down projection (ne0 = n_ff = 64 or 96) in Q8_0, as llama-quantize's fallback does,
    // which also checks a model with mixed tensor types.
    c.push_back({"qwen3moe_Q4_K", with_type(spec("qwen3moe", 256, 4, 2, 64, 4, 2, 256, 300, 1), TT::q4_k), 5e-2});
    c.push_back({"qwen3moe_Q5_K_mixed", with_type(spec("qwen3moe", 256, 2, 1, 128, 3, 2, 64, 300, 2), TT::q5_k, TT::q8_0), 5e-2});
    c.push_back({"qwen3moe_Q6_K_mixed", with_type(spec("qwen3moe", 256, 4, 2, 64, 3, 1, 64, 300, 2), TT::q6_k, TT::q8_0), 5e-2});
    c.push_back({"qwen3moe_Q3_K_mixed", with_type(spec("qwen3moe", 256, 4, 1, 64, 5, 2, 64, 300, 2), TT::q3_k, TT::q8_0), 5e-2});
    c.push_back({"mixtral_Q4_K_mixed", with_type(spec("llama", 256, 4, 2, 64, 4, 2, 96, 300, 1), TT::q4_k, TT::q8_0), 5e-2});
    // The seed formats: FP4 (ggml), MLX affine, and TQ (its kernels read the rotated activation, so
    // this also proves the rotation is the one the weights were coded in). Odd widths fall back.
    c.push_back({"olmoe_MXFP4", with_type(spec("olmoe", 64, 4, 4, 16, 8, 3, 32, 300, 2), TT::mxfp4), 5e-2});
    c.push_back({"qwen3moe_NVFP4_mixed", with_type(spec("qwen3moe", 128, 4, 2, 32, 5, 2, 96, 300, 2), TT::nvfp4, TT::q8_0), 5e-2});
    c.push_back({"qwen3moe_TQ3", with_type(spec("qwen3moe", 128, 4, 2, 32, 4, 2, 128, 300, 2), TT::tq3), 5e-2});
    c.push_back({"qwen3moe_TQ4_mixed", with_type(spec("qwen3moe", 128, 4, 2, 48, 5, 2, 96, 300, 2), TT::tq4, TT::q8_0), 5e-2});
    c.push_back({"qwen3moe_AFFINE3_G64", with_type(spec("qwen3moe", 128, 4, 2, 32, 4, 2, 64, 300, 2), TT::affine3_g64), 5e-2});
    c.push_back({"mixtral_AFFINE4_G128_mixed", with_type(spec("llama", 128, 4, 2, 32, 4, 2, 96, 300, 1), TT::affine4_g128, TT::affine4_g32), 5e-2});
    // Hot/cold experts: some experts' matrices in a second stack of another type (and activation format).
    {
        ModelSpec s = with_type(spec("qwen3moe", 128, 4, 2, 32, 6, 2, 128, 300, 2), TT::tq3);
        s.hot_experts = {1, 4};
        s.hot_type = TT::q8_0;
        c.push_back({"qwen3moe_hotcold_Q8_0_TQ3", s, 5e-2});
        ModelSpec o = with_type(spec("olmoe", 64, 4, 4, 16, 8, 3, 32, 300, 2), TT::q4_0);
        o.hot_experts = {0, 2, 7};
        o.hot_type = TT::mxfp4;
        c.push_back({"olmoe_hotcold_MXFP4_Q4_0", o, 5e-2});
    }
    return c;
}

class ForwardQuant : public ::testing::TestWithParam<QuantCase> {};

TEST_P(ForwardQuant, MatchesOracleOnStoredWeights) {
    const QuantCase& tc = GetParam();
    OracleCase c = moe_test::make_oracle_case(tc.spec, kTokens, 0.02);
    ASSERT_TRUE(c.ok) << c.error;
    SCOPED_TRACE(moe_test::describe(c.model.spec));
    TempModelFile f(tc.name);
    moe::Model model;
    ASSERT_TRUE(write_and_load(c.model, f, &model));
    expect_info(model, c.model);
    const int V = tc.spec.n_vocab;

    // 1. token by token: every position's experts are observable
    moe::SessionOptions opt;
    opt.n_ctx = 32;
    opt.n_threads = 2;
    EngineRun tbt;
    ASSERT_TRUE(run_engine(model, opt, c.tokens, 0, &tbt));
    int flips = 0;
    ASSERT_TRUE(check_routing(c.model, c.ref, tbt, 0.25, &flips));
    moe_test::OracleResult ref = c.ref;
    if (flips > 0) ref = moe_test::Oracle(c.model).run(c.tokens, &tbt.experts);

    RowDiff d = diff_vs_oracle(ref, tbt.logits);
    EXPECT_LT(d.rel(), tc.tol) << "token by token: " << diff_msg(d) << "; near-tie routing flips " << flips;
    // argmax must agree wherever the oracle's top-2 gap is beyond what the tolerance allows
    RowDiff clear = diff_vs_oracle(ref, tbt.logits, 0, -1, 2 * tc.tol * d.max_ref);
    EXPECT_EQ(clear.argmax_agree, clear.argmax_checked) << diff_msg(clear);
    EXPECT_GE(d.argmax_agree, (kTokens * 3) / 4) << "argmax agrees on too few positions: " << diff_msg(d);

    // 2. prompt in one call (the prefill path, row kernels), then decode; 3 threads
    opt.n_threads = 3;
    opt.gemm_min_tokens = -1;
    EngineRun pre;
    ASSERT_TRUE(run_engine(model, opt, c.tokens, kPrompt, &pre));
    RowDiff d2 = diff_vs_oracle(ref, pre.logits);
    EXPECT_LT(d2.rel(), tc.tol) << "prefill + decode: " << diff_msg(d2);
    // Prefill and decode may use different kernels (GEMM vs GEMV) but the same activation rounding
    // is expected; report the difference, bound it by the oracle tolerance.
    const double self = rel_diff(tbt.logits, pre.logits);
    EXPECT_LT(self, tc.tol) << "prefill vs token by token";
    // 3. the same with every matrix of the prompt as panels (prefill GEMM; experts of one use too,
    //    where the CPU has a panel kernel): the same products summed in another order.
    opt.gemm_min_tokens = 1;
    EngineRun panels;
    ASSERT_TRUE(run_engine(model, opt, c.tokens, kPrompt, &panels));
    RowDiff d3 = diff_vs_oracle(ref, panels.logits);
    EXPECT_LT(d3.rel(), tc.tol) << "prefill through panels + decode: " << diff_msg(d3);
    EXPECT_LT(rel_diff(pre.logits, panels.logits), tc.tol) << "panels vs row kernels";
    // 4. where the CPU has AMX: the panels on the tile unit (a model loaded with set_amx(true)) must
    //    give step 3's logits bit for bit.
    if (moe::amx_available()) {
        moe::set_amx(true);
        moe::Model amx_model;
        const moe::Status st = moe::Model::load(f.path.c_str(), moe::LoadOptions{}, &amx_model);
        moe::set_amx(false);
        ASSERT_EQ(st, moe::Status::ok) << moe::last_error();
        EngineRun amx;
        ASSERT_TRUE(run_engine(amx_model, opt, c.tokens, kPrompt, &amx));
        EXPECT_EQ(0, std::memcmp(amx.logits.data(), panels.logits.data(), panels.logits.size() * sizeof(float))) << "AMX vs AVX-512 VNNI panels";
    }
    std::printf("[ quant    ] %-22s vs oracle: token-by-token %.2e (rms %.2e), prefill %.2e; prefill vs tbt %.2e; "
                "argmax %d/%d; routing flips %d\n",
                tc.name, d.rel(), d.rel_rms(), d2.rel(), self, d.argmax_agree, d.argmax_checked, flips);
    (void)V;
}

INSTANTIATE_TEST_SUITE_P(Types, ForwardQuant, ::testing::ValuesIn(quant_cases()),
                         [](const ::testing::TestParamInfo<QuantCase>& i) { return std::string(i.param.name); });

// LoadOptions::repack: a model whose matrices have widths the tiles take (Q4_0: 128-multiples,
// Q4_K, Q6_K: 256-multiples) and row counts that are not 16-multiples (wk: 80, the head: 300 rows),
// loaded with and without tiles. Where the CPU has the tile kernels both match the oracle and each
// other (only the float order differs), token by token, through the rows/tiles prefill and through
// panels packed from the tiles; with an expert store or repack off nothing is repacked.
void check_repack_on(const OracleCase& c, const char* path, moe::Isa isa);
void check_repack(const ModelSpec& sp, const char* name) {
    OracleCase c = moe_test::make_oracle_case(sp, kTokens, 0.02);
    ASSERT_TRUE(c.ok) << c.error;
    TempModelFile f(name);
    ASSERT_EQ(c.model.write(f.path), moe::Status::ok) << moe::last_error();
    // The best kernels of this CPU, and AVX2's tile kernels as well where it has more.
    struct RestoreIsa {
        ~RestoreIsa() { moe::force_isa(moe::detected_isa()); }
    } restore;
    std::vector<moe::Isa> isas = {moe::detected_isa()};
    if (moe::detected_isa() == moe::Isa::avx512 || moe::detected_isa() == moe::Isa::avx512_vnni) isas.push_back(moe::Isa::avx2);
    for (moe::Isa isa : isas) {
        SCOPED_TRACE(moe::isa_name(isa));
        ASSERT_EQ(moe::force_isa(isa), moe::Status::ok) << moe::last_error();
        check_repack_on(c, f.path.c_str(), isa);
    }
}
void check_repack_on(const OracleCase& c, const char* path, moe::Isa isa) {
    moe::LoadOptions with, without;
    without.repack = false;
    std::vector<std::pair<uint64_t, uint64_t>> calls;  // the progress pass after the repack still counts to the file size
    with.progress = [](void* user, uint64_t done, uint64_t total) {
        static_cast<std::vector<std::pair<uint64_t, uint64_t>>*>(user)->push_back({done, total});
        return true;
    };
    with.progress_user = &calls;
    moe::Model tiled, rows;
    ASSERT_EQ(moe::Model::load(path, with, &tiled), moe::Status::ok) << moe::last_error();
    ASSERT_FALSE(calls.empty());
    for (size_t i = 1; i < calls.size(); ++i) EXPECT_GE(calls[i].first, calls[i - 1].first);
    EXPECT_EQ(calls.back().first, calls.back().second);
    EXPECT_EQ(calls.back().second, (uint64_t)tiled.file().file_size());
    ASSERT_EQ(moe::Model::load(path, without, &rows), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(rows.repacked_bytes(), 0u);
    const bool has_tiles = isa == moe::Isa::avx2 || isa == moe::Isa::avx512 || isa == moe::Isa::avx512_vnni;
    if (has_tiles) EXPECT_GT(tiled.repacked_bytes(), 0u);
    else EXPECT_EQ(tiled.repacked_bytes(), 0u);
    // Which tensors: the experts and the head (300 x a multiple of the tile width) in tiles where
    // the CPU has them, never the embedding nor the router; none without repack.
    EXPECT_EQ(tiled.tensor_repacked("blk.0.ffn_up_exps.weight"), has_tiles);
    EXPECT_EQ(tiled.tensor_repacked("output.weight"), has_tiles && tiled.file().find_tensor("output.weight"));
    EXPECT_FALSE(tiled.tensor_repacked("token_embd.weight"));
    EXPECT_FALSE(tiled.tensor_repacked("blk.0.ffn_gate_inp.weight"));
    EXPECT_FALSE(tiled.tensor_repacked("no.such.tensor"));
    EXPECT_FALSE(tiled.tensor_repacked(nullptr));
    EXPECT_FALSE(rows.tensor_repacked("blk.0.ffn_up_exps.weight"));
    uint64_t listed = 0;
    for (size_t i = 0; i < tiled.file().n_tensors(); ++i)
        if (tiled.tensor_repacked(tiled.file().tensor_at(i).name.c_str())) listed += tiled.file().tensor_at(i).n_bytes;
    EXPECT_EQ(listed, tiled.repacked_bytes());
    moe::LoadOptions budget;
    budget.mem_budget = (uint64_t)1 << 30;
    moe::Model stored;
    ASSERT_EQ(moe::Model::load(path, budget, &stored), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(stored.repacked_bytes(), 0u);

    moe::SessionOptions opt;
    opt.n_ctx = 32;
    opt.n_threads = 3;
    for (int gemm_min : {-1, 1}) {  // prefill on rows/tiles, or as panels (from the tiles)
        SCOPED_TRACE("gemm_min_tokens " + std::to_string(gemm_min));
        opt.gemm_min_tokens = gemm_min;
        EngineRun a, b;
        ASSERT_TRUE(run_engine(tiled, opt, c.tokens, kPrompt, &a));
        ASSERT_TRUE(run_engine(rows, opt, c.tokens, kPrompt, &b));
        int flips = 0;
        ASSERT_TRUE(check_routing(c.model, c.ref, a, 0.25, &flips));
        moe_test::OracleResult ref = c.ref;
        if (flips > 0) ref = moe_test::Oracle(c.model).run(c.tokens, &a.experts);
        const RowDiff d = diff_vs_oracle(ref, a.logits);
        EXPECT_LT(d.rel(), 5e-2) << "tiles vs oracle: " << diff_msg(d);
        EXPECT_LT(rel_diff(b.logits, a.logits), 1e-3) << "tiles vs rows";
        EngineRun s;
        ASSERT_TRUE(run_engine(stored, opt, c.tokens, kPrompt, &s));
        EXPECT_EQ(0, std::memcmp(s.logits.data(), b.logits.data(), b.logits.size() * sizeof(float))) << "expert store vs rows";
    }
}
TEST(Repack, Q4_0TilesMatchRowsAndOracle) { check_repack(with_type(spec("qwen3moe", 128, 4, 2, 40, 6, 2, 128, 300, 2), TT::q4_0), "repack_q4_0"); }
// Q4_K, Q6_K: wo's 160 columns take neither (the fallback type); the rest are tiles.
TEST(Repack, Q4_KTilesMatchRowsAndOracle) { check_repack(with_type(spec("qwen3moe", 256, 4, 2, 40, 6, 2, 256, 300, 2), TT::q4_k), "repack_q4_k"); }
// Q6_K on a llama-style MoE: the row kernel adds 16 lanes of d x (sub-block sums) in float, the
// tile one exact int32 sum per super-block; this random model's 256-column dot products cancel to
// ~1e-3 of their terms, where the two differ by up to 1e-3 relative, and qwen3's per-head q/k norms
// carry that to 1.5% of the logits (the tile path fed the row kernel's values reproduces the rows
// bit for bit); without those norms both agree to < 1e-3 as the other types do.
TEST(Repack, Q6_KTilesMatchRowsAndOracle) { check_repack(with_type(spec("llama", 256, 4, 2, 40, 6, 2, 256, 300, 2), TT::q6_k), "repack_q6_k"); }

//---------------------------------------------------------------------------------------------------
// Session contract
//---------------------------------------------------------------------------------------------------

class SessionContract : public ::testing::Test {
protected:
    void SetUp() override {
        ModelSpec s = spec("qwen2moe", 64, 4, 2, 16, 6, 2, 32, 300, 2);
        s.n_ff_shared = 40;
        c_ = moe_test::make_oracle_case(s, kTokens, 1e-3);
        ASSERT_TRUE(c_.ok) << c_.error;
        file_.reset(new TempModelFile(std::string("contract_") + ::testing::UnitTest::GetInstance()->current_test_info()->name()));
        ASSERT_TRUE(write_and_load(c_.model, *file_, &model_));
    }
    OracleCase c_;
    std::unique_ptr<TempModelFile> file_;
    moe::Model model_;
};

TEST_F(SessionContract, ConcurrentSessionsOnOneModel) {
    // Two token sequences; sequential reference runs, then both at once from two threads (twice).
    const std::vector<int32_t> a = c_.tokens, b = moe_test::random_tokens(kTokens, c_.model.spec.n_vocab, 999);
    moe::SessionOptions opt;
    opt.n_ctx = 32;
    opt.n_threads = 2;
    EngineRun ra, rb;
    ASSERT_TRUE(run_engine(model_, opt, a, kPrompt, &ra));
    ASSERT_TRUE(run_engine(model_, opt, b, kPrompt, &rb));
    for (int round = 0; round < 2; ++round) {
        EngineRun ca, cb;
        ::testing::AssertionResult oka = ::testing::AssertionSuccess(), okb = ::testing::AssertionSuccess();
        std::thread ta([&] { oka = run_engine(model_, opt, a, kPrompt, &ca); });
        std::thread tb([&] { okb = run_engine(model_, opt, b, kPrompt, &cb); });
        ta.join();
        tb.join();
        ASSERT_TRUE(oka);
        ASSERT_TRUE(okb);
        EXPECT_EQ(0, std::memcmp(ca.logits.data(), ra.logits.data(), ra.logits.size() * sizeof(float))) << "round " << round << " seq a";
        EXPECT_EQ(0, std::memcmp(cb.logits.data(), rb.logits.data(), rb.logits.size() * sizeof(float))) << "round " << round << " seq b";
        EXPECT_EQ(ca.experts, ra.experts);
        EXPECT_EQ(cb.experts, rb.experts);
    }
    RowDiff d = diff_vs_oracle(c_.ref, ra.logits);
    EXPECT_LT(d.rel(), 1e-4) << diff_msg(d);
}

TEST_F(SessionContract, ResetAndTruncateReproduce) {
    const size_t V = (size_t)c_.model.spec.n_vocab;
    moe::SessionOptions opt;
    opt.n_ctx = 32;
    opt.n_threads = 2;
    moe::Session s;
    ASSERT_EQ(moe::Session::create(model_, opt, &s), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(s.n_ctx(), 32);
    EXPECT_EQ(s.position(), 0);
    std::vector<float> first((size_t)kTokens * V), again((size_t)kTokens * V);
    ASSERT_EQ(s.eval(c_.tokens.data(), (size_t)kTokens, first.data()), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(s.position(), kTokens);
    s.reset();
    EXPECT_EQ(s.position(), 0);
    ASSERT_EQ(s.eval(c_.tokens.data(), (size_t)kTokens, again.data()), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(0, std::memcmp(first.data(), again.data(), first.size() * sizeof(float))) << "reset + re-eval differs";

    // truncate to 7 positions, then continue with different tokens: must equal a fresh run of the
    // same 7-token prefix + those tokens (the KV entries beyond 7 must not leak into attention)
    std::vector<int32_t> alt(c_.tokens.begin(), c_.tokens.begin() + 7);
    const std::vector<int32_t> tail = moe_test::random_tokens(6, c_.model.spec.n_vocab, 4242);
    alt.insert(alt.end(), tail.begin(), tail.end());
    ASSERT_EQ(s.truncate(7), moe::Status::ok);
    EXPECT_EQ(s.position(), 7);
    EXPECT_NE(s.truncate(8), moe::Status::ok) << "truncate beyond position() must fail";
    std::vector<float> cont(tail.size() * V);
    ASSERT_EQ(s.eval(tail.data(), tail.size(), cont.data()), moe::Status::ok) << moe::last_error();
    moe_test::OracleResult ref = moe_test::Oracle(c_.model).run(alt);
    RowDiff d;
    for (size_t i = 0; i < tail.size(); ++i) d.add((int)(7 + i), ref.row((int)(7 + i)), cont.data() + i * V, (int)V);
    EXPECT_LT(d.rel(), 1e-4) << "after truncate(7): " << diff_msg(d);
}

TEST_F(SessionContract, BadTokensAndFullContext) {
    const int32_t V = c_.model.spec.n_vocab;
    moe::SessionOptions opt;
    opt.n_ctx = 16;
    opt.n_threads = 1;
    moe::Session s;
    ASSERT_EQ(moe::Session::create(model_, opt, &s), moe::Status::ok) << moe::last_error();
    ASSERT_EQ(s.eval(c_.tokens.data(), 10), moe::Status::ok);
    std::vector<float> ref(s.logits(), s.logits() + V);

    const int32_t bad_hi[3] = {1, V, 2}, bad_neg[1] = {-1};
    EXPECT_EQ(s.eval(bad_hi, 3), moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()), "");
    EXPECT_EQ(s.eval(bad_neg, 1), moe::Status::invalid_argument);
    EXPECT_EQ(s.eval(c_.tokens.data(), 0), moe::Status::invalid_argument);
    EXPECT_EQ(s.position(), 10) << "a rejected eval must not move the position";

    EXPECT_EQ(s.eval(c_.tokens.data() + 10, 7), moe::Status::context_full) << "10 + 7 > n_ctx 16";
    EXPECT_EQ(s.position(), 10) << "context_full must evaluate nothing";
    EXPECT_EQ(0, std::memcmp(ref.data(), s.logits(), (size_t)V * sizeof(float))) << "logits() changed by a rejected eval";

    // the remaining 6 positions still work and match the oracle
    ASSERT_EQ(s.eval(c_.tokens.data() + 10, 6), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(s.position(), 16);
    RowDiff d;
    d.add(15, c_.ref.row(15), s.logits(), V);
    EXPECT_LT(d.rel(), 1e-4) << diff_msg(d);
    EXPECT_EQ(s.eval(c_.tokens.data(), 1), moe::Status::context_full);
    EXPECT_EQ(s.position(), 16);
}

TEST_F(SessionContract, LoadFromMemoryMatchesFile) {
    const std::vector<uint8_t> bytes = c_.model.bytes();
    moe::Model mem;
    ASSERT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &mem), moe::Status::ok) << moe::last_error();
    moe::SessionOptions opt;
    opt.n_ctx = 32;
    opt.n_threads = 2;
    EngineRun from_file, from_mem;
    ASSERT_TRUE(run_engine(model_, opt, c_.tokens, kPrompt, &from_file));
    ASSERT_TRUE(run_engine(mem, opt, c_.tokens, kPrompt, &from_mem));
    EXPECT_EQ(0, std::memcmp(from_file.logits.data(), from_mem.logits.data(), from_file.logits.size() * sizeof(float)));
    moe::LoadOptions no_mmap;
    no_mmap.use_mmap = false;
    moe::Model read;
    ASSERT_EQ(moe::Model::load(file_->path.c_str(), no_mmap, &read), moe::Status::ok) << moe::last_error();
    EngineRun from_read;
    ASSERT_TRUE(run_engine(read, opt, c_.tokens, kPrompt, &from_read));
    EXPECT_EQ(0, std::memcmp(from_file.logits.data(), from_read.logits.data(), from_file.logits.size() * sizeof(float)));
}

//---------------------------------------------------------------------------------------------------
// Loader errors name what is wrong
//---------------------------------------------------------------------------------------------------

struct LoadErrCase {
    const char* name;
    const char* arch;
    const char* omit_tensor;
    const char* misshape_tensor;
    const char* omit_key;
    moe::Status want;
    const char* must_mention;
};
void PrintTo(const LoadErrCase& c, std::ostream* os) {
    *os << c.name << ": " << c.arch << ", expect " << moe::status_string(c.want) << " naming '" << c.must_mention << "'";
}

class LoaderErrors : public ::testing::TestWithParam<LoadErrCase> {};

TEST_P(LoaderErrors, StatusNamesTheCulprit) {
    const LoadErrCase& e = GetParam();
    ModelSpec s = spec(e.arch, 64, 4, 2, 16, 4, 2, 32, 300, 2);
    if (std::string(e.arch) == "qwen2moe") s.n_ff_shared = 32;
    if (std::string(e.arch) == "olmoe") s.n_head_kv = 4;
    s.omit_tensor = e.omit_tensor;
    s.misshape_tensor = e.misshape_tensor;
    s.omit_key = e.omit_key;
    moe_test::RandomModel rm = moe_test::make_random_model(s);
    ASSERT_TRUE(rm.ok()) << rm.error;
    TempModelFile f(e.name);
    ASSERT_EQ(rm.write(f.path), moe::Status::ok);
    moe::Model model;
    moe::Status st = moe::Model::load(f.path.c_str(), moe::LoadOptions{}, &model);
    EXPECT_EQ(st, e.want) << "got " << moe::status_string(st) << ": " << moe::last_error();
    EXPECT_NE(std::string(moe::last_error()).find(e.must_mention), std::string::npos)
        << "last_error() = \"" << moe::last_error() << "\" does not mention " << e.must_mention;
    EXPECT_FALSE(model.valid());
    const std::vector<uint8_t> bytes = rm.bytes();
    moe::Model mem;
    EXPECT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &mem), e.want);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, LoaderErrors,
    ::testing::Values(
        LoadErrCase{"missing_down_exps", "qwen3moe", "blk.1.ffn_down_exps.weight", "", "", moe::Status::missing_tensor, "blk.1.ffn_down_exps.weight"},
        LoadErrCase{"missing_q_norm", "qwen3moe", "blk.0.attn_q_norm.weight", "", "", moe::Status::missing_tensor, "blk.0.attn_q_norm.weight"},
        LoadErrCase{"missing_shexp_gate", "qwen2moe", "blk.1.ffn_gate_inp_shexp.weight", "", "", moe::Status::missing_tensor, "blk.1.ffn_gate_inp_shexp.weight"},
        // attention biases are optional (as in llama.cpp), but a present one must have the right shape
        LoadErrCase{"shape_q_bias", "qwen2moe", "", "blk.0.attn_q.bias", "", moe::Status::shape_mismatch, "blk.0.attn_q.bias"},
        LoadErrCase{"missing_output_norm", "llama", "output_norm.weight", "", "", moe::Status::missing_tensor, "output_norm.weight"},
        LoadErrCase{"shape_attn_k", "qwen3moe", "", "blk.0.attn_k.weight", "", moe::Status::shape_mismatch, "blk.0.attn_k.weight"},
        LoadErrCase{"shape_router", "olmoe", "", "blk.1.ffn_gate_inp.weight", "", moe::Status::shape_mismatch, "blk.1.ffn_gate_inp.weight"},
        LoadErrCase{"shape_up_exps", "llama", "", "blk.0.ffn_up_exps.weight", "", moe::Status::shape_mismatch, "blk.0.ffn_up_exps.weight"},
        LoadErrCase{"shape_k_norm", "olmoe", "", "blk.0.attn_k_norm.weight", "", moe::Status::shape_mismatch, "blk.0.attn_k_norm.weight"},
        LoadErrCase{"shape_output", "qwen2moe", "", "output.weight", "", moe::Status::shape_mismatch, "output.weight"},
        LoadErrCase{"missing_embd_len", "qwen3moe", "", "", "qwen3moe.embedding_length", moe::Status::missing_key, "qwen3moe.embedding_length"},
        LoadErrCase{"missing_block_count", "llama", "", "", "llama.block_count", moe::Status::missing_key, "llama.block_count"}),
    [](const ::testing::TestParamInfo<LoadErrCase>& i) { return std::string(i.param.name); });

//---------------------------------------------------------------------------------------------------
// Hot/cold expert files: the same weights split into two stacks give the same logits, bit for bit;
// a broken hot expert list is refused with its name
//---------------------------------------------------------------------------------------------------

std::vector<float> logits_of(const moe_test::RandomModel& rm, const char* name, const std::vector<int32_t>& tokens) {
    TempModelFile f(name);
    moe::Model model;
    if (!write_and_load(rm, f, &model)) return {};
    moe::SessionOptions opt;
    opt.n_ctx = 32;
    opt.n_threads = 2;
    EngineRun run;
    if (!run_engine(model, opt, tokens, 4, &run)) return {};
    return run.logits;
}

TEST(HotColdExperts, SplitStacksGiveIdenticalLogits) {
    ModelSpec s = with_type(spec("qwen3moe", 64, 4, 2, 16, 6, 2, 32, 300, 3), TT::q8_0);
    const std::vector<int32_t> tokens = {5, 77, 200, 13, 42, 99, 7, 150, 3, 260};
    const std::vector<float> plain = logits_of(moe_test::make_random_model(s), "hotcold_plain", tokens);
    s.hot_experts = {0, 3, 5};
    s.hot_type = TT::q8_0;
    moe_test::RandomModel split = moe_test::make_random_model(s);
    ASSERT_TRUE(split.ok()) << split.error;
    bool has_hot = false;
    for (const auto& t : split.tensor_types) has_hot |= t.first == "blk.2.ffn_down_hot_exps.weight";
    ASSERT_TRUE(has_hot);
    const std::vector<float> hotcold = logits_of(split, "hotcold_split", tokens);
    ASSERT_FALSE(plain.empty());
    ASSERT_EQ(plain.size(), hotcold.size());
    EXPECT_EQ(0, std::memcmp(plain.data(), hotcold.data(), plain.size() * sizeof(float)));
}

// The expert store serves hot and cold experts alike (slots sized for the larger), same logits.
TEST(HotColdExperts, ExpertStoreWithABudget) {
    ModelSpec s = with_type(spec("qwen3moe", 64, 4, 2, 16, 6, 2, 32, 300, 3), TT::q4_0);
    s.hot_experts = {2, 3};
    s.hot_type = TT::q8_0;
    moe_test::RandomModel rm = moe_test::make_random_model(s);
    TempModelFile f("hotcold_store");
    moe::Model plain;
    ASSERT_TRUE(write_and_load(rm, f, &plain));
    const std::vector<int32_t> tokens = {5, 77, 200, 13, 42, 99, 7, 150, 3, 260, 11, 12};
    moe::SessionOptions opt;
    opt.n_ctx = 32;
    opt.n_threads = 2;
    EngineRun want;
    ASSERT_TRUE(run_engine(plain, opt, tokens, 0, &want));
    moe::LoadOptions all;
    all.mem_budget = 1ull << 40;
    all.expert_reads = moe::ExpertReads::buffered;
    moe::Model full;
    ASSERT_EQ(moe::Model::load(f.path.c_str(), all, &full), moe::Status::ok) << moe::last_error();
    const moe::ExpertStoreStats st = full.expert_store_stats();
    ASSERT_EQ(st.slots, 3 * 6);
    moe::LoadOptions some = all;
    some.mem_budget = st.resident_bytes + st.cache_bytes / 3;  // a third of the experts
    moe::Model part;
    ASSERT_EQ(moe::Model::load(f.path.c_str(), some, &part), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(part.expert_store_stats().slots, 6);
    for (const moe::Model* m : {&full, &part}) {
        EngineRun got;
        ASSERT_TRUE(run_engine(*m, opt, tokens, 0, &got));
        EXPECT_EQ(0, std::memcmp(want.logits.data(), got.logits.data(), want.logits.size() * sizeof(float)));
    }
    EXPECT_GT(part.expert_store_stats().misses, 0u);
}

TEST(HotColdExperts, BadHotListIsRefused) {
    ModelSpec s = with_type(spec("qwen3moe", 64, 4, 2, 16, 6, 2, 32, 300, 2), TT::q8_0);
    s.hot_experts = {1, 4};
    const struct { std::vector<int32_t> ids; const char* mention; } cases[] = {
        {{1, 4, 1}, "hot experts"},         // one layer's ids short
        {{1, 4, 1, 4, 2}, "lists 5 ids"},    // one too many
        {{4, 1, 1, 4}, "must ascend"},
        {{1, 4, 1, 6}, "must ascend"},       // out of range (6 experts)
        {{1, 4, -1, 4}, "must ascend"},
    };
    for (const auto& c : cases) {
        moe_test::RandomModel rm = moe_test::make_random_model(s);
        ASSERT_TRUE(rm.ok()) << rm.error;
        rm.writer.set_i32_array("moe_infer.hot_experts", c.ids);
        const std::vector<uint8_t> bytes = rm.bytes();
        moe::Model model;
        EXPECT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &model), moe::Status::invalid_file) << c.mention;
        EXPECT_NE(std::string(moe::last_error()).find(c.mention), std::string::npos) << moe::last_error();
    }
    // the list missing altogether
    s.omit_key = "moe_infer.hot_experts";
    moe_test::RandomModel no_list = moe_test::make_random_model(s);
    ASSERT_TRUE(no_list.ok()) << no_list.error;
    const std::vector<uint8_t> bytes = no_list.bytes();
    moe::Model model;
    EXPECT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &model), moe::Status::invalid_file);
    EXPECT_NE(std::string(moe::last_error()).find("no moe_infer.hot_experts list"), std::string::npos) << moe::last_error();
}

// Expert prediction reads the residual stream after attention plus the shared expert's gated output
// (issue 9), checked against the float64 oracle's value at every (position, layer) for a gated
// shared expert (qwen2moe), an ungated one after a dense layer (glm4moe) and none (qwen3moe), in
// chunks of 1 to 4 tokens; logits stay bit-identical to a session without prediction, and with a
// memory budget (the shared expert runs while the routed experts' reads are in flight).
class RecordingPredictor : public moe::ExpertPredictor {
public:
    explicit RecordingPredictor(int n_embd) : n_embd_(n_embd) {}
    int predict(int layer, int target, const float* hidden, int32_t* experts, int max) override {
        if (target != layer + 1) return 0;
        layers.push_back(layer);
        inputs.insert(inputs.end(), hidden, hidden + n_embd_);
        const int k = std::min(max, 2);  // any guess: prediction must not change the logits
        for (int i = 0; i < k; ++i) experts[i] = (layer + i) % 3;
        return k;
    }
    std::vector<int> layers;
    std::vector<float> inputs;

private:
    int n_embd_;
};

TEST(ForwardPrediction, PredictorSeesTheSharedExpertOutput) {
    std::vector<FwdCase> cases;
    {
        ModelSpec s = spec("qwen2moe", 64, 4, 2, 16, 8, 2, 32, 389, 3);
        s.n_ff_shared = 48;
        cases.push_back({"qwen2moe_shared_gated", s});
    }
    {
        ModelSpec s = spec("glm4moe", 96, 4, 2, 24, 6, 3, 20, 300, 4);
        s.n_dense_lead = 1;
        s.n_ff_dense = 40;
        s.n_expert_shared = 2;
        cases.push_back({"glm4moe_shared_ungated", s});
    }
    cases.push_back({"qwen3moe_no_shared", spec("qwen3moe", 64, 4, 2, 16, 6, 2, 32, 300, 3)});
    {  // Q4_K with 256-multiple widths: the shared expert runs from tiles where the CPU has them
       // (whose sums round unlike the row kernel's: reading its rows instead changes the logits)
        ModelSpec s = with_type(spec("qwen2moe", 256, 4, 2, 64, 8, 2, 256, 389, 3), TT::q4_k);
        s.n_ff_shared = 256;
        cases.push_back({"qwen2moe_shared_q4_k_tiles", s});
    }
    const std::vector<int> chunks = {1, 1, 3, 1, 4, 2};  // 12 tokens
    for (const FwdCase& tc : cases) {
        SCOPED_TRACE(tc.name);
        OracleCase c = moe_test::make_oracle_case(tc.spec, 12, 1e-3);
        ASSERT_TRUE(c.ok) << c.error;
        TempModelFile f(std::string("predict_") + tc.name);
        moe::Model model;
        ASSERT_TRUE(write_and_load(c.model, f, &model));
        const int E = model.info().n_embd, L = model.info().n_layer, V = model.info().n_vocab;
        const bool shared = tc.spec.arch != "qwen3moe";
        const bool quantized = tc.spec.wtype != TT::f32;  // quantized activations: ~1% from the oracle
        if (quantized && moe::detected_isa() == moe::Isa::avx512_vnni) {
            EXPECT_TRUE(model.tensor_repacked("blk.0.ffn_down_shexp.weight"));
        }
        moe::LoadOptions budget;
        budget.mem_budget = 1ull << 40;
        budget.expert_reads = moe::ExpertReads::buffered;
        moe::Model full;
        ASSERT_EQ(moe::Model::load(f.path.c_str(), budget, &full), moe::Status::ok) << moe::last_error();
        budget.mem_budget = full.expert_store_stats().resident_bytes + full.expert_store_stats().cache_bytes / 2;
        moe::Model half;
        ASSERT_EQ(moe::Model::load(f.path.c_str(), budget, &half), moe::Status::ok) << moe::last_error();

        moe::SessionOptions plain_opt;
        plain_opt.n_ctx = 32;
        plain_opt.n_threads = 3;
        for (const moe::Model* m : {&model, &half}) {
            SCOPED_TRACE(m == &model ? "mapped" : "expert store, half the experts");
            // Without prediction on the same model (the store reads rows, the mapped Q4_K model tiles).
            moe::Session plain;
            ASSERT_EQ(moe::Session::create(*m, plain_opt, &plain), moe::Status::ok) << moe::last_error();
            std::vector<float> want;
            for (size_t pos = 0, i = 0; i < chunks.size(); pos += (size_t)chunks[i++]) {
                ASSERT_EQ(plain.eval(&c.tokens[pos], chunks[i]), moe::Status::ok) << moe::last_error();
                want.insert(want.end(), plain.logits(), plain.logits() + V);
            }
            auto rec = std::make_shared<RecordingPredictor>(E);
            moe::SessionOptions opt = plain_opt;
            opt.predict_depth = 2;
            opt.predictor = rec;
            moe::Session s;
            ASSERT_EQ(moe::Session::create(*m, opt, &s), moe::Status::ok) << moe::last_error();
            size_t call = 0;
            double worst = 0, shared_part = 0;
            for (size_t pos = 0, i = 0; i < chunks.size(); pos += (size_t)chunks[i++]) {
                ASSERT_EQ(s.eval(&c.tokens[pos], chunks[i]), moe::Status::ok) << moe::last_error();
                ASSERT_EQ(0, std::memcmp(s.logits(), want.data() + i * (size_t)V, (size_t)V * sizeof(float))) << "chunk " << i;
                // The calls of a chunk: layer by layer (MoE layers before the last), token by token.
                for (int il = 0; il + 1 < L; ++il) {
                    if (tc.spec.arch == "glm4moe" && il < tc.spec.n_dense_lead) continue;
                    for (int t = 0; t < chunks[i]; ++t, ++call) {
                        ASSERT_LT(call, rec->layers.size());
                        ASSERT_EQ(rec->layers[call], il);
                        const size_t at = ((pos + (size_t)t) * (size_t)L + (size_t)il) * (size_t)E;
                        const double* ref = c.ref.lookahead_input.data() + at;
                        const double* att = c.ref.attention_residual.data() + at;
                        double max_ref = 0, max_diff = 0, max_shared = 0;
                        for (int k = 0; k < E; ++k) {
                            max_ref = std::max(max_ref, std::fabs(ref[k]));
                            max_diff = std::max(max_diff, std::fabs(ref[k] - (double)rec->inputs[call * (size_t)E + (size_t)k]));
                            max_shared = std::max(max_shared, std::fabs(ref[k] - att[k]));
                        }
                        worst = std::max(worst, max_diff / max_ref);
                        shared_part = std::max(shared_part, max_shared / max_ref);
                    }
                }
            }
            EXPECT_EQ(call, rec->layers.size());
            EXPECT_LT(worst, quantized ? 5e-2 : 1e-4);
            if (shared) EXPECT_GT(shared_part, 1e-2) << "the shared expert's output is too small to tell";
            else EXPECT_EQ(shared_part, 0.0);
        }
        EXPECT_GT(half.expert_store_stats().prefetches, 0u);
    }
}

}  // namespace
