// Lifetimes and defined behaviour of the public handles (Model, Session), the order of eval()'s
// checks, and escaping in error messages. Each test failed on the code before the fix it guards.
#include "moe_infer.h"
#include "random_model.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <thread>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include <unistd.h>  // getpid

namespace {

std::string demo_model_path() { return std::string(MOE_SOURCE_DIR) + "/models/demo-qwen3moe.gguf"; }

moe::Model load_demo() {
    moe::Model model;
    EXPECT_EQ(moe::Model::load(demo_model_path().c_str(), moe::LoadOptions{}, &model), moe::Status::ok) << moe::last_error();
    return model;
}

std::vector<int32_t> greedy(moe::Session& session, const std::vector<int32_t>& prompt, int n) {
    moe::GenerateOptions gen;
    gen.max_tokens = n;
    gen.sampler.temperature = 0;
    gen.stop_at_end_of_generation = false;
    moe::GenerateResult result;
    EXPECT_EQ(moe::generate(session, prompt, gen, nullptr, nullptr, &result), moe::Status::ok) << moe::last_error();
    return result.tokens;
}

const std::vector<int32_t> kPrompt = {1, 2, 3, 4};  // in every vocabulary of the demo's size

// The Session shares the model's state: moving the Model handle (std::move, a growing vector)
// leaves the session working and its model() valid. Before, model() pointed at the moved-from
// handle and generate() dereferenced null.
TEST(SessionLifetime, ModelHandleMovedAway) {
    moe::SessionOptions so;
    so.n_threads = 2;
    std::vector<moe::Model> models;
    models.push_back(load_demo());
    moe::Session session;
    ASSERT_EQ(moe::Session::create(models[0], so, &session), moe::Status::ok) << moe::last_error();
    const std::vector<int32_t> expected = greedy(session, kPrompt, 8);
    session.reset();
    for (int i = 0; i < 5; ++i) models.push_back(moe::Model());  // reallocates: models[0] moves
    moe::Model moved = std::move(models[0]);
    EXPECT_FALSE(models[0].valid());
    ASSERT_TRUE(session.model().valid());
    EXPECT_EQ(session.model().info().n_vocab, moved.info().n_vocab);
    EXPECT_EQ(greedy(session, kPrompt, 8), expected);
}

// Destroying the Model while a Session lives is safe (use-after-scope under ASan before).
TEST(SessionLifetime, ModelDestroyedFirst) {
    moe::SessionOptions so;
    so.n_threads = 1;
    moe::Session session;
    std::vector<int32_t> expected;
    {
        moe::Model model = load_demo();
        ASSERT_EQ(moe::Session::create(model, so, &session), moe::Status::ok) << moe::last_error();
        expected = greedy(session, kPrompt, 6);
        session.reset();
    }
    ASSERT_TRUE(session.model().valid());
    EXPECT_TRUE(session.model().tokenizer().valid());
    EXPECT_EQ(greedy(session, kPrompt, 6), expected);
}

// Accessors of an unloaded Model and an uncreated Session answer with empty objects.
TEST(SessionLifetime, EmptyHandlesHaveDefinedAccessors) {
    moe::Model model;
    EXPECT_FALSE(model.valid());
    EXPECT_EQ(model.info().n_vocab, 0);
    EXPECT_EQ(model.info().n_layer, 0);
    EXPECT_FALSE(model.tokenizer().valid());
    EXPECT_EQ(model.file().n_tensors(), 0u);
    moe::Session session;
    EXPECT_FALSE(session.model().valid());
    EXPECT_EQ(session.model().info().n_vocab, 0);
    EXPECT_EQ(session.logits(), nullptr);
    EXPECT_EQ(session.position(), 0);
    EXPECT_EQ(session.last_expert_ids(), nullptr);
    const int32_t token = 1;
    EXPECT_EQ(session.eval(&token, 1), moe::Status::invalid_argument);
    moe::GenerateOptions gen;
    EXPECT_EQ(moe::generate(session, kPrompt, gen, nullptr, nullptr, nullptr), moe::Status::invalid_argument);
    EXPECT_EQ(moe::Session::create(model, moe::SessionOptions{}, &session), moe::Status::invalid_argument);
}

// eval() checks n against the context before reading n ids: a count far beyond the buffer must
// not be read (ASan reported a heap overflow here before).
TEST(SessionEval, SizeCheckedBeforeTokensAreRead) {
    moe::Model model = load_demo();
    moe::SessionOptions so;
    so.n_threads = 1;
    so.n_ctx = 32;
    moe::Session session;
    ASSERT_EQ(moe::Session::create(model, so, &session), moe::Status::ok);
    std::vector<int32_t> one(1, 5);
    EXPECT_EQ(session.eval(one.data(), (size_t)1 << 40), moe::Status::context_full);
    EXPECT_EQ(session.eval(one.data(), 33), moe::Status::context_full);
    EXPECT_EQ(session.position(), 0);
    EXPECT_EQ(session.eval(one.data(), 1), moe::Status::ok);
}

// The context limit is stated in the error.
TEST(SessionEval, ContextLimitIsStated) {
    moe::Model model = load_demo();
    moe::SessionOptions so;
    so.n_ctx = (1 << 22) + 1;
    moe::Session session;
    EXPECT_EQ(moe::Session::create(model, so, &session), moe::Status::invalid_argument);
    EXPECT_NE(std::string(moe::last_error()).find("4194304"), std::string::npos) << moe::last_error();
}

// Resident memory of this process in bytes, or -1 where /proc is not available.
long long resident_bytes() {
    std::FILE* f = std::fopen("/proc/self/statm", "r");
    if (!f) return -1;
    long long size = 0, resident = -1;
    if (std::fscanf(f, "%lld %lld", &size, &resident) != 2) resident = -1;
    std::fclose(f);
    return resident < 0 ? -1 : resident * 4096;
}

// kv_cache_bytes() states what a context costs (float32 K and V of every layer), and a large
// context costs memory only as it fills: before, create() zeroed the whole cache (-c 4194304 on
// the demo model: 12.9 GB written, 74 s) before the first token.
TEST(SessionMemory, LargeContextIsCommittedAsItFills) {
    moe::Model model = load_demo();
    const moe::ModelInfo& info = model.info();
    const int32_t n_ctx = 1 << 18;
    const uint64_t per_position = 2ull * 4 * (uint64_t)info.n_layer * (uint64_t)info.n_head_kv * (uint64_t)info.head_dim;
    EXPECT_EQ(moe::kv_cache_bytes(info, n_ctx), per_position * (uint64_t)n_ctx);
    EXPECT_EQ(moe::kv_cache_bytes(info, 0), per_position * (uint64_t)std::min(info.n_ctx_train, 4096));
    EXPECT_EQ(moe::kv_cache_bytes(moe::ModelInfo{}, 100), 0u);

    moe::SessionOptions small, large;
    small.n_threads = large.n_threads = 2;
    small.n_ctx = 64;
    large.n_ctx = n_ctx;
    moe::Session reference, session;
    ASSERT_EQ(moe::Session::create(model, small, &reference), moe::Status::ok) << moe::last_error();
    const long long before = resident_bytes();
    ASSERT_EQ(moe::Session::create(model, large, &session), moe::Status::ok) << moe::last_error();
    const long long after = resident_bytes();
    if (before >= 0 && after >= 0) {
        EXPECT_LT(after - before, (long long)(moe::kv_cache_bytes(info, n_ctx) / 8))
            << "create() touched the KV cache of " << moe::kv_cache_bytes(info, n_ctx) << " bytes";
    }
    // The cache is not zeroed, so this also checks that nothing reads a position before writing it.
    EXPECT_EQ(greedy(session, kPrompt, 16), greedy(reference, kPrompt, 16));
}

// Strings from a file are quoted with control bytes and ill-formed UTF-8 escaped; valid UTF-8
// stays readable.
TEST(ErrorMessages, FileBytesAreEscaped) {
    moe::GgufWriter w;
    w.set_string("general.architecture", std::string("evil\x1b[2J\x01\xff\xc3\xa9", 12));
    const std::vector<uint8_t> bytes = w.to_bytes();
    moe::Model model;
    EXPECT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &model), moe::Status::unsupported);
    const std::string msg = moe::last_error();
    for (unsigned char ch : msg) EXPECT_TRUE(ch >= 0x20 && ch != 0x7f) << "raw control byte " << (int)ch << " in: " << msg;
    EXPECT_NE(msg.find("evil\\x1b[2J\\x01\\xff\xc3\xa9"), std::string::npos) << msg;
}

}  // namespace

//---------------------------------------------------------------------------------------------------
// Batched decode (Session::eval_batch): each sequence's logits and experts equal its solo run
//---------------------------------------------------------------------------------------------------

namespace {

int32_t argmax(const float* v, int32_t n) {
    int32_t best = 0;
    for (int32_t i = 1; i < n; ++i)
        if (v[i] > v[best]) best = i;
    return best;
}

// Greedy decode of each prompt alone: the logits and experts after every decoded token.
struct SoloRun {
    std::vector<std::vector<float>> logits;
    std::vector<std::vector<int32_t>> experts;
};
SoloRun solo(const moe::Model& model, const moe::SessionOptions& so, const std::vector<int32_t>& prompt, int steps) {
    moe::Session s;
    EXPECT_EQ(moe::Session::create(model, so, &s), moe::Status::ok) << moe::last_error();
    EXPECT_EQ(s.eval(prompt.data(), prompt.size()), moe::Status::ok) << moe::last_error();
    const int32_t V = model.info().n_vocab, nk = model.info().n_layer * model.info().n_expert_used;
    SoloRun r;
    for (int i = 0; i < steps; ++i) {
        const int32_t next = argmax(s.logits(), V);
        EXPECT_EQ(s.eval(&next, 1), moe::Status::ok) << moe::last_error();
        r.logits.emplace_back(s.logits(), s.logits() + V);
        r.experts.emplace_back(s.last_expert_ids(), s.last_expert_ids() + nk);
    }
    return r;
}

}  // namespace

namespace {
// Decodes `steps` greedy tokens for every prompt at once with eval_batch and checks each against
// its solo run, bit for bit (n_batch 0, and 2: the batch runs as several passes).
void check_batched_against_solo(const moe::Model& model, const std::vector<std::vector<int32_t>>& prompts, int steps) {
    const int32_t V = model.info().n_vocab, nk = model.info().n_layer * model.info().n_expert_used;
    for (int n_batch : {0, 2}) {
        moe::SessionOptions so;
        so.n_threads = 2;
        so.n_ctx = 64;
        so.n_batch = n_batch;
        const size_t B = prompts.size();
        std::vector<moe::Session> sessions(B);
        std::vector<moe::Session*> ptrs;
        std::vector<SoloRun> want;
        for (size_t i = 0; i < B; ++i) {
            ASSERT_EQ(moe::Session::create(model, so, &sessions[i]), moe::Status::ok) << moe::last_error();
            ASSERT_EQ(sessions[i].eval(prompts[i].data(), prompts[i].size()), moe::Status::ok) << moe::last_error();
            ptrs.push_back(&sessions[i]);
            want.push_back(solo(model, so, prompts[i], steps));
        }
        std::vector<int32_t> next(B);
        for (int step = 0; step < steps; ++step) {
            for (size_t i = 0; i < B; ++i) next[i] = argmax(sessions[i].logits(), V);
            ASSERT_EQ(moe::Session::eval_batch(ptrs.data(), next.data(), B), moe::Status::ok) << moe::last_error();
            for (size_t i = 0; i < B; ++i) {
                SCOPED_TRACE("n_batch " + std::to_string(n_batch) + ", sequence " + std::to_string(i) + ", step " + std::to_string(step));
                EXPECT_EQ(sessions[i].position(), (int32_t)(prompts[i].size() + (size_t)step + 1));
                EXPECT_EQ(0, std::memcmp(sessions[i].logits(), want[i].logits[(size_t)step].data(), (size_t)V * sizeof(float)));
                EXPECT_EQ(std::vector<int32_t>(sessions[i].last_expert_ids(), sessions[i].last_expert_ids() + nk), want[i].experts[(size_t)step]);
            }
        }
    }
}
}  // namespace

TEST(BatchedDecode, EachSequenceMatchesItsSoloRun) {
    // Prompts of different lengths (different positions in one batch), two of them equal.
    check_batched_against_solo(load_demo(), {{40, 77, 258}, {1, 2, 3, 4, 5, 6, 7}, {300}, {40, 77, 258}, {9, 8, 7, 6, 5, 4, 3, 2, 1, 99, 98}}, 12);
}

// The same for the families with per-layer state of their own: sliding windows and sinks
// (gpt-oss), the MLA latent cache (deepseek2), short-convolution rings (lfm2moe), delta-net
// recurrent states (qwen35moe, qwen3next).
TEST(BatchedDecode, NewFamiliesMatchTheirSoloRuns) {
    std::vector<moe_test::ModelSpec> specs(5);
    specs[0].arch = "gpt-oss";
    specs[0].head_dim = 32;
    specs[0].n_swa = 5;  // shorter than the sequences
    specs[1].arch = "deepseek2";
    specs[1].q_lora_rank = 24;
    specs[1].kv_lora_rank = 32;
    specs[1].qk_nope = 16;
    specs[1].qk_rope = 8;
    specs[1].v_head_dim = 16;
    specs[1].n_expert_shared = 1;
    specs[2].arch = "lfm2moe";
    specs[2].n_layer = 3;
    specs[2].conv_layers = {1, 0, 1};
    specs[2].n_dense_lead = 0;
    specs[3].arch = "qwen35moe";  // delta-net states per sequence, gated attention
    specs[3].head_dim = 32;
    specs[3].n_ff_shared = 48;
    specs[4] = specs[3];
    specs[4].arch = "qwen3next";  // grouped v heads, fused ssm_ba
    for (const moe_test::ModelSpec& spec : specs) {
        SCOPED_TRACE(spec.arch);
        const moe_test::RandomModel rm = moe_test::make_random_model(spec);
        ASSERT_TRUE(rm.ok()) << rm.error;
        const std::vector<uint8_t> bytes = rm.bytes();
        moe::Model model;
        ASSERT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &model), moe::Status::ok) << moe::last_error();
        check_batched_against_solo(model, {{40, 77, 258}, {1, 2, 3, 4, 5, 6, 7}, {200}, {9, 8, 7, 6, 5, 4, 3, 2, 1, 99, 98}}, 10);
    }
}

// Rows that several sequences of a batch use are dotted with all their activations in one pass
// where the kernel has that form (Q4_0, IQ4_NL, MXFP4, Q4_K, Q6_K on AVX-512 VNNI:
// RowKernel::dot_uses); the logits must stay bit for bit those of each sequence alone. Rows of 3
// groups of 128 (an odd count) or 2 super-blocks, 6 sequences (the 4- and 2-row forms), 4 experts
// of which 2 are used (experts shared within the batch).
TEST(BatchedDecode, RowsDottedTogetherMatchSoloRuns) {
    using T = moe::TensorType;
    struct Pass {
        moe::Isa isa;
        std::vector<T> types;
    };
    std::vector<Pass> passes = {{moe::detected_isa(), {T::q4_0, T::iq4_nl, T::mxfp4, T::q4_k, T::q6_k}}};
    // The AVX2 forms too where the CPU has more (its Q8_0-block, MXFP4, Q4_K and Q6_K templates).
    if (moe::detected_isa() > moe::Isa::avx2 && moe::detected_isa() <= moe::Isa::avx512_vnni)
        passes.push_back({moe::Isa::avx2, {T::q4_0, T::mxfp4, T::q4_k, T::q6_k}});
    struct RestoreIsa {
        ~RestoreIsa() { moe::force_isa(moe::detected_isa()); }
    } restore;
    for (const Pass& pass : passes) {
        ASSERT_EQ(moe::force_isa(pass.isa), moe::Status::ok) << moe::last_error();
        for (T t : pass.types) {
            SCOPED_TRACE(std::string(moe::tensor_type_name(t)) + " " + moe::isa_name(pass.isa));
            const bool k_quant = t == T::q4_k || t == T::q6_k;
            moe_test::ModelSpec spec;
            spec.n_embd = k_quant ? 512 : 384;
            spec.n_head = k_quant ? 8 : 6;
            spec.n_head_kv = 2;
            spec.n_ff = 256;
            spec.wtype = t;
            const moe_test::RandomModel rm = moe_test::make_random_model(spec);
            ASSERT_TRUE(rm.ok()) << rm.error;
            const std::vector<uint8_t> bytes = rm.bytes();
            moe::Model model;
            ASSERT_EQ(moe::Model::load_memory(bytes.data(), bytes.size(), moe::LoadOptions{}, &model), moe::Status::ok) << moe::last_error();
            check_batched_against_solo(model, {{40, 77, 258}, {1, 2, 3, 4, 5, 6, 7}, {200}, {9, 8, 7, 6, 5}, {40, 77, 258}, {11, 12}}, 6);
        }
    }
}

// The same through Q4_0, Q4_K and Q6_K tiles (LoadOptions::repack, a mapped file on AVX-512 VNNI): an
// expert several sequences use runs the tile kernel once per sequence, bit for bit its solo run.
TEST(BatchedDecode, TiledMatricesMatchSoloRuns) {
    for (moe::TensorType type : {moe::TensorType::q4_0, moe::TensorType::q4_k, moe::TensorType::q6_k}) {
        SCOPED_TRACE(moe::tensor_type_name(type));
        moe_test::ModelSpec spec;
        spec.n_embd = type == moe::TensorType::q4_0 ? 384 : 512;  // a multiple of the tiles' width
        spec.n_head = type == moe::TensorType::q4_0 ? 6 : 8;
        spec.n_head_kv = 2;
        spec.n_ff = 256;
        spec.wtype = type;
        const moe_test::RandomModel rm = moe_test::make_random_model(spec);
        ASSERT_TRUE(rm.ok()) << rm.error;
        const char* dir = std::getenv("MOE_TEST_TMP");
        const std::string path = std::string(dir && *dir ? dir : "/tmp") + "/moe_batch_tiles_" + std::to_string((long)getpid()) + ".gguf";
        ASSERT_EQ(rm.write(path), moe::Status::ok) << moe::last_error();
        moe::Model model;
        const moe::Status st = moe::Model::load(path.c_str(), moe::LoadOptions{}, &model);
        std::remove(path.c_str());  // the mapping keeps the file
        ASSERT_EQ(st, moe::Status::ok) << moe::last_error();
        if (moe::detected_isa() == moe::Isa::avx512_vnni) {
            EXPECT_TRUE(model.tensor_repacked("blk.0.ffn_down_exps.weight"));
        }
        check_batched_against_solo(model, {{40, 77, 258}, {1, 2, 3, 4, 5, 6, 7}, {200}, {9, 8, 7, 6, 5}, {40, 77, 258}, {11, 12}}, 6);
    }
}

TEST(BatchedDecode, BadBatchesAreRefusedBeforeAnythingRuns) {
    const moe::Model model = load_demo();
    const moe::Model other = load_demo();
    moe::SessionOptions so;
    so.n_threads = 2;
    so.n_ctx = 8;
    moe::Session a, b, c, full, empty;
    for (moe::Session* s : {&a, &b, &full}) ASSERT_EQ(moe::Session::create(model, so, s), moe::Status::ok);
    ASSERT_EQ(moe::Session::create(other, so, &c), moe::Status::ok);
    const std::vector<int32_t> eight(8, 5);
    ASSERT_EQ(full.eval(eight.data(), eight.size()), moe::Status::ok);
    const int32_t tok[3] = {1, 2, 3};
    struct Case { std::vector<moe::Session*> s; std::vector<int32_t> t; moe::Status want; const char* mention; };
    const Case cases[] = {
        {{&a, &a}, {1, 2}, moe::Status::invalid_argument, "appears twice"},
        {{&a, &c}, {1, 2}, moe::Status::invalid_argument, "another model"},
        {{&a, nullptr}, {1, 2}, moe::Status::invalid_argument, "session 1 is null"},
        {{&a, &empty}, {1, 2}, moe::Status::invalid_argument, "session 1 is null or not created"},
        {{&a, &b, &full}, {1, 2, 3}, moe::Status::context_full, "session 2 is full"},
        {{&a, &b}, {1, model.info().n_vocab}, moe::Status::invalid_argument, "out of range"},
    };
    for (const Case& k : cases) {
        EXPECT_EQ(moe::Session::eval_batch(k.s.data(), k.t.data(), k.s.size()), k.want) << k.mention;
        EXPECT_NE(std::string(moe::last_error()).find(k.mention), std::string::npos) << moe::last_error();
        EXPECT_EQ(a.position(), 0);
        EXPECT_EQ(b.position(), 0);
    }
    EXPECT_EQ(moe::Session::eval_batch(nullptr, tok, 1), moe::Status::invalid_argument);
    moe::Session* one[1] = {&a};
    EXPECT_EQ(moe::Session::eval_batch(one, tok, 0), moe::Status::invalid_argument);
    EXPECT_EQ(moe::Session::eval_batch(one, tok, 1), moe::Status::ok);
    EXPECT_EQ(a.position(), 1);
}

// generate_batch: every sequence's tokens, text and stop reason as generate() alone gives them,
// with per-sequence samplers (greedy, seeded sampling, a stop string, different lengths).
TEST(BatchedDecode, GenerateBatchMatchesGenerate) {
    const moe::Model model = load_demo();
    moe::SessionOptions so;
    so.n_threads = 2;
    so.n_ctx = 96;
    std::vector<int32_t> kjv;
    ASSERT_EQ(model.tokenizer().encode("In the beginning God created the heaven and the earth.", true, false, &kjv), moe::Status::ok);
    const std::vector<std::vector<int32_t>> prompts = {kjv, {1, 2, 3, 4}, std::vector<int32_t>(kjv.begin(), kjv.begin() + 3), kjv};
    std::vector<moe::GenerateOptions> opts(4);
    opts[0].max_tokens = 24; opts[0].sampler.temperature = 0;
    opts[1].max_tokens = 9;  opts[1].sampler.temperature = 0.8f; opts[1].sampler.seed = 7;
    opts[2].max_tokens = 30; opts[2].sampler.temperature = 0; opts[2].stop = {"the"};
    opts[3].max_tokens = 24; opts[3].sampler.temperature = 1.0f; opts[3].sampler.seed = 99;
    std::vector<moe::GenerateResult> want(4);
    for (size_t i = 0; i < 4; ++i) {
        moe::Session s;
        ASSERT_EQ(moe::Session::create(model, so, &s), moe::Status::ok);
        ASSERT_EQ(moe::generate(s, prompts[i], opts[i], nullptr, nullptr, &want[i]), moe::Status::ok) << moe::last_error();
    }
    std::vector<moe::Session> sessions(4);
    std::vector<moe::Session*> ptrs;
    for (moe::Session& s : sessions) {
        ASSERT_EQ(moe::Session::create(model, so, &s), moe::Status::ok);
        ptrs.push_back(&s);
    }
    struct Streamed { std::vector<std::string> text = std::vector<std::string>(4); } streamed;
    auto on_token = [](void* user, size_t seq, int32_t, const char* text, size_t size) {
        static_cast<Streamed*>(user)->text.at(seq).append(text, size);
        return true;
    };
    std::vector<moe::GenerateResult> got;
    ASSERT_EQ(moe::generate_batch(ptrs.data(), prompts, opts, on_token, &streamed, &got), moe::Status::ok) << moe::last_error();
    ASSERT_EQ(got.size(), 4u);
    for (size_t i = 0; i < 4; ++i) {
        SCOPED_TRACE("sequence " + std::to_string(i));
        EXPECT_EQ(got[i].tokens, want[i].tokens);
        EXPECT_EQ(got[i].text, want[i].text);
        EXPECT_EQ(streamed.text[i], want[i].text);
        EXPECT_EQ(got[i].stopped_by_string, want[i].stopped_by_string);
        EXPECT_EQ(got[i].stopped_by_eog, want[i].stopped_by_eog);
        EXPECT_EQ(sessions[i].position(), (int32_t)(prompts[i].size() + want[i].tokens.size() - 1));
    }
    EXPECT_TRUE(want[2].stopped_by_string);  // the stop string is exercised
    EXPECT_LT(want[2].tokens.size(), 30u);
    // one options entry for all; a mismatched count is refused
    EXPECT_EQ(moe::generate_batch(ptrs.data(), prompts, std::vector<moe::GenerateOptions>(2), nullptr, nullptr, nullptr), moe::Status::invalid_argument);
}

//---------------------------------------------------------------------------------------------------
// Progress and cancellation: eval() reports each chunk, stops when asked, and keeps exactly the
// chunks it finished (the session continues as if the rest had never been sent)
//---------------------------------------------------------------------------------------------------

namespace {

struct ProgressLog {
    std::vector<std::pair<size_t, size_t>> calls;
    size_t stop_after = 0;     // return false at this many calls (0: never)
    moe::Session* cancel_on = nullptr;  // call cancel() on this session at the first call
};
bool log_progress(void* user, size_t done, size_t total) {
    ProgressLog& p = *static_cast<ProgressLog*>(user);
    p.calls.emplace_back(done, total);
    if (p.cancel_on && p.calls.size() == 1) p.cancel_on->cancel();
    return !(p.stop_after && p.calls.size() == p.stop_after);
}

std::vector<int32_t> ids(size_t n) {
    std::vector<int32_t> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = (int32_t)(1 + (i * 7919) % 1000);
    return v;
}

// Logits after `tokens` evaluated by a fresh session with the same options.
std::vector<float> fresh_logits(const moe::Model& model, moe::SessionOptions so, const std::vector<int32_t>& tokens) {
    so.progress = nullptr;
    moe::Session s;
    EXPECT_EQ(moe::Session::create(model, so, &s), moe::Status::ok);
    EXPECT_EQ(s.eval(tokens.data(), tokens.size()), moe::Status::ok) << moe::last_error();
    return std::vector<float>(s.logits(), s.logits() + model.info().n_vocab);
}

// Chunks of 64 tokens, each reported to `log`.
moe::SessionOptions chunked_options(ProgressLog* log) {
    moe::SessionOptions so;
    so.n_threads = 2;
    so.n_ctx = 256;
    so.n_batch = 64;
    so.progress = log_progress;
    so.progress_user = log;
    return so;
}

}  // namespace

TEST(SessionControl, ProgressReportsEachChunkAndCanStop) {
    const moe::Model model = load_demo();
    const std::vector<int32_t> prompt = ids(150);
    ProgressLog log;
    const moe::SessionOptions so = chunked_options(&log);
    moe::Session s;
    ASSERT_EQ(moe::Session::create(model, so, &s), moe::Status::ok);
    ASSERT_EQ(s.eval(prompt.data(), prompt.size()), moe::Status::ok);
    EXPECT_EQ(log.calls, (std::vector<std::pair<size_t, size_t>>{{64, 150}, {128, 150}, {150, 150}}));

    s.reset();
    log = ProgressLog{};
    log.stop_after = 2;
    EXPECT_EQ(s.eval(prompt.data(), prompt.size()), moe::Status::cancelled);
    EXPECT_NE(std::string(moe::last_error()).find("after 128 of 150"), std::string::npos) << moe::last_error();
    EXPECT_EQ(s.position(), 128);
    // the rest, sent again, continues exactly where the kept chunks end
    log = ProgressLog{};
    ASSERT_EQ(s.eval(prompt.data() + 128, prompt.size() - 128), moe::Status::ok);
    const std::vector<float> want = fresh_logits(model, so, prompt);
    EXPECT_EQ(0, std::memcmp(s.logits(), want.data(), want.size() * sizeof(float)));
}

TEST(SessionControl, CancelDropsTheChunkInFlight) {
    const moe::Model model = load_demo();
    const std::vector<int32_t> prompt = ids(150);
    ProgressLog log;
    const moe::SessionOptions so = chunked_options(&log);
    moe::Session s;
    ASSERT_EQ(moe::Session::create(model, so, &s), moe::Status::ok);
    // cancel() during the call (from the progress callback, after the first chunk): the second
    // chunk stops between layers and is dropped
    log.cancel_on = &s;
    EXPECT_EQ(s.eval(prompt.data(), prompt.size()), moe::Status::cancelled);
    EXPECT_NE(std::string(moe::last_error()).find("cancelled"), std::string::npos) << moe::last_error();
    EXPECT_EQ(s.position(), 64);
    EXPECT_EQ(log.calls.size(), 1u);
    // the request was consumed: the rest goes through and matches an uninterrupted run
    log = ProgressLog{};
    ASSERT_EQ(s.eval(prompt.data() + 64, prompt.size() - 64), moe::Status::ok);
    const std::vector<float> want = fresh_logits(model, so, prompt);
    EXPECT_EQ(0, std::memcmp(s.logits(), want.data(), want.size() * sizeof(float)));
    // a request made between calls stops the next one; decode continues after it
    const std::vector<float> before(s.logits(), s.logits() + model.info().n_vocab);
    s.cancel();
    const int32_t t = 42;
    EXPECT_EQ(s.eval(&t, 1), moe::Status::cancelled);
    EXPECT_EQ(s.position(), 150);
    EXPECT_EQ(0, std::memcmp(s.logits(), before.data(), before.size() * sizeof(float)));
    EXPECT_EQ(s.eval(&t, 1), moe::Status::ok);
    EXPECT_EQ(s.position(), 151);
}

// From another thread while a long prefill runs: it stops at a chunk boundary, promptly.
TEST(SessionControl, CancelFromAnotherThread) {
    const moe::Model model = load_demo();
    const std::vector<int32_t> prompt = ids(3000);
    moe::SessionOptions so;
    so.n_threads = 2;
    so.n_ctx = 4096;
    so.n_batch = 256;
    moe::Session s;
    ASSERT_EQ(moe::Session::create(model, so, &s), moe::Status::ok);
    std::atomic<bool> started{false};
    std::thread canceller([&] {
        while (!started.load()) std::this_thread::yield();
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
        s.cancel();
    });
    started = true;
    const auto t0 = std::chrono::steady_clock::now();
    const moe::Status st = s.eval(prompt.data(), prompt.size());
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    canceller.join();
    if (st == moe::Status::ok) GTEST_SKIP() << "the prefill finished (" << seconds << " s) before cancel() came";
    EXPECT_EQ(st, moe::Status::cancelled) << moe::last_error();
    EXPECT_EQ(s.position() % 256, 0);
    EXPECT_LT(s.position(), 3000);
}
