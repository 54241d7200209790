// random_model.h - tiny random-weight MoE models as GGUF files, for the forward-pass tests.
//
// make_random_model(spec) builds a model of one of the supported architectures (qwen3moe, olmoe,
// qwen2moe, llama with experts = Mixtral style, llama without experts = dense, gpt-oss, glm4moe,
// deepseek2, lfm2moe, qwen35moe, qwen3next)
// with the exact metadata keys and tensor names/shapes llama.cpp uses (ggml order: ne0 is the
// contiguous, input dimension), plus a minimal byte-level BPE vocabulary so llama.cpp can load the
// file as well.
//
// gpt-oss (llama.cpp src/models/openai-moe.cpp): q/k/v/o biases, per-head attention sinks, sliding-
// window attention on some layers (attention.sliding_window + optional sliding_window_pattern),
// optional YaRN RoPE scaling keys, post_attention_norm before the MoE, router bias, per-expert
// gate/up/down biases, swiglu_oai experts, softmax over the selected experts' logits.
// glm4moe (src/models/glm4-moe.cpp): optional q/k/v biases and per-head q/k norm, partial NEOX RoPE
// (rope.dimension_count < head_dim), leading dense FFN blocks (feed_forward_length) before MoE blocks
// (expert_feed_forward_length), sigmoid gating with a selection bias (exp_probs_b), expert weight
// norm and scale, one ungated shared expert, and optional NextN/MTP blocks after the trunk
// (block_count counts them; an engine must skip them: llama.cpp's n_layer = block_count -
// nextn_predict_layers).
// deepseek2 (src/models/deepseek2.cpp; DeepSeek-V2/V2-Lite/V3, Kimi-K2, GLM-4.7-Flash): multi-head
// latent attention. q = attn_q x, or with a q LoRA (attention.q_lora_rank > 0) attn_q_b
// rmsnorm_{attn_q_a_norm}(attn_q_a x); attn_kv_a_mqa x = [latent (kv_lora_rank), k_rope (qk_rope)];
// the latent, RMS-normed by attn_kv_a_norm, goes up through the kv_b projection to per-head
// [k_nope (qk_nope), v (v_head)]. The kv_b projection is written either as the legacy single
// attn_kv_b {kv_lora, n_head (qk_nope + v_head)} (attention.key_length = qk_nope + qk_rope,
// value_length = v_head, head_count_kv = n_head) or, as convert_hf_to_gguf.py writes it today, split
// into attn_k_b {qk_nope, kv_lora, n_head} (transposed) and attn_v_b {kv_lora, v_head, n_head} with
// key_length = kv_lora + qk_rope, value_length = kv_lora, key_length_mla = qk_nope + qk_rope,
// value_length_mla = v_head and head_count_kv = 1 (llama.cpp picks the form from the *_mla keys).
// rope.dimension_count = qk_rope; NORM RoPE. Leading dense layers (ffn_norm, not
// post_attention_norm), shared experts of width expert_feed_forward_length * expert_shared_count,
// softmax (V2; the default when expert_gating_func is absent) or sigmoid (V3) gating, exp_probs_b,
// expert_weights_norm / _scale, grouped top-k (expert_group_count / expert_group_used_count), YaRN
// with rope.scaling.yarn_log_multiplier, optional NextN blocks after the trunk.
// lfm2moe (src/models/lfm2.cpp, whose graph lfm2moe.cpp reuses): per-layer kind from the
// attention.head_count_kv array (0 = short-convolution block, else GQA attention with per-head q/k
// RMSNorm and NEOX RoPE, n_head * head_dim = n_embd); shortconv.l_cache = conv width; the conv block
// is in_proj {n_embd, 3 n_embd} -> B, C, X; causal depthwise conv of B*X over time (kernel
// shortconv.conv {l_cache, n_embd}, state = the last l_cache - 1 values of B*X); C * conv;
// out_proj. Leading dense SwiGLU layers, then MoE layers with sigmoid (expert_gating_func)
// scores, a selection bias (exp_probs_b) and weights always renormalised, never scaled. The final
// norm is stored as token_embd_norm.weight (llama.cpp's LLM_TENSOR_OUTPUT_NORM_LFM2).
// qwen35moe (src/models/qwen35moe.cpp; Qwen3.5-35B-A3B): gated delta-net (linear attention) layers
// beside gated full-attention layers (full_attention_interval n: layer il is full attention when
// (il + 1) % n == 0; or the per-layer attention.recurrent_layers array, 1 = delta-net). A delta-net
// layer: attn_qkv {n_embd, 2 n_group d_state + dt_rank d_state} (q, k, v channels in that order),
// attn_gate {n_embd, dt_rank d_state} (z), ssm_conv1d {conv_kernel, conv channels} (F32),
// ssm_dt.bias {dt_rank}, ssm_a {dt_rank} (= -exp(A_log), negative), ssm_beta / ssm_alpha {n_embd,
// dt_rank}, ssm_norm {d_state}, ssm_out {dt_rank d_state, n_embd}; keys ssm.conv_kernel,
// ssm.state_size (head dim of q, k and v), ssm.group_count (q/k heads), ssm.time_step_rank (v heads),
// ssm.inner_size (= dt_rank d_state). A full-attention layer: attn_q {n_embd, 2 n_head head_dim}
// (per head [q (head_dim), gate (head_dim)]), attn_k / attn_v, attn_q_norm / attn_k_norm {head_dim},
// attn_output; partial rotary (rope.dimension_count < head_dim) with rope.dimension_sections (4
// ints, IMROPE). Every layer: attn_norm, post_attention_norm, softmax top-k MoE (renormalised) plus
// a shared SwiGLU expert (expert_shared_feed_forward_length) gated by sigmoid(ffn_gate_inp_shexp . x).
// qwen3next (src/models/qwen3next.cpp; Qwen3-Next-80B-A3B), the same block as qwen35moe except:
// - full-attention layers use plain partial NEOX RoPE (ggml_rope_ext over the first n_rot =
//   rope.dimension_count dims, LLAMA_ROPE_TYPE_NEOX in llama-model.cpp llama_model_rope_type); no
//   rope.dimension_sections key (load_arch_hparams reads none);
// - the delta net's v heads are grouped: v head h uses q/k head h / (HV/HK) (build_layer_attn_linear
//   repeat-interleaves q and k), where qwen35moe tiles them (h % HK);
// - beta and alpha come from one fused blk.N.ssm_ba.weight {n_embd, 2 HV} (LLM_TENSOR_SSM_BETA_ALPHA)
//   whose output rows are grouped by q/k head: with r = HV/HK, k head g owns rows [2 r g, 2 r (g+1)),
//   first the r beta rows then the r alpha rows, i.e. beta of v head g r + i is row 2 r g + i and its
//   alpha is row 2 r g + r + i (the converter keeps HF's in_proj_ba as is). The float copies keep the
//   fused matrix (ssm_ba) and the per-v-head rows unpacked (ssm_beta / ssm_alpha).
// Keys under "qwen3next.", written as convert_hf_to_gguf.py's Qwen3NextModel writes them (the
// converter splits HF's in_proj_qkvz into attn_qkv + attn_gate; the legacy fused ssm_in is not
// generated).
//
// Besides the GGUF bytes it keeps every weight as float *as it will be read back*: each tensor is
// quantized here with moe::quantize_row, the very bytes are stored in the file, and the floats kept
// are moe::dequantize_row of those bytes. The float64 oracle (oracle.h) therefore runs on exactly
// the stored weights, whatever the tensor type.
//
// Layout of the float copies: a tensor {ne0, ne1, ne2} is a flat vector indexed
// i0 + ne0 * (i1 + ne1 * i2); a matrix {n_in, n_out} is W[out * n_in + in] and y = W x means
// y[o] = sum_i W[o * n_in + i] * x[i].
//
// Header-only, test code; depends only on the public declarations of moe_infer.h.
#ifndef MOE_TEST_RANDOM_MODEL_H
#define MOE_TEST_RANDOM_MODEL_H

#include "moe_infer.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

namespace moe_test {

// What to build. Defaults give a small qwen3moe at F32.
struct ModelSpec {
    std::string arch = "qwen3moe";  // "qwen3moe" | "olmoe" | "qwen2moe" | "llama" | "gpt-oss" | "glm4moe" | "deepseek2" | "lfm2moe" | "qwen35moe"
                                    // | "qwen3next"
    bool dense = false;             // llama only: plain SwiGLU FFN, no experts
    int n_vocab = 300;              // >= 262 (256 byte tokens + 4 merges + 2 control tokens)
    int n_embd = 64;
    int n_layer = 2;
    int n_head = 4;
    int n_head_kv = 2;
    int head_dim = 0;               // 0: n_embd / n_head. qwen3moe, llama, gpt-oss and glm4moe may set any
                                    // value (written as attention.key_length / value_length)
    int n_expert = 4;
    int n_expert_used = 2;
    int n_ff = 32;                  // per-expert FFN width (dense FFN width when dense)
    int n_ff_shared = 0;            // qwen2moe shared expert width; 0: same as n_ff (glm4moe: see n_expert_shared)
    int n_ctx_train = 4096;
    float rope_base = 10000.f;
    float rms_eps = 1e-6f;
    // Type of the big matrices (attention, experts, dense FFN, token_embd, output). Norms, biases
    // and routers stay F32. A tensor whose ne0 is not a multiple of the type's block size is
    // stored as `fallback_type` instead (or F32 if that does not fit either), like llama-quantize.
    moe::TensorType wtype = moe::TensorType::f32;
    moe::TensorType fallback_type = moe::TensorType::f32;
    bool tied = false;              // no `output` tensor: logits use token_embd
    uint64_t seed = 1;
    // Per-tensor type overrides: a tensor whose name contains `first` is stored as `second` (the
    // first match wins; big matrices only). For mixed-type models and for narrowing down a bug.
    std::vector<std::pair<std::string, moe::TensorType>> type_overrides;
    // Scale of the router weights (router logits have std ~ router_scale).
    double router_scale = 2.0;
    // Hot/cold experts (moe-quantize --recipe hotcold): these experts' matrices are stored in the
    // ffn_*_hot_exps stacks as hot_type and listed (same ids in every layer) in moe_infer.hot_experts;
    // the ffn_*_exps stacks keep the others. The weights drawn are the same as without the split.
    std::vector<int> hot_experts;
    moe::TensorType hot_type = moe::TensorType::f32;
    // ---- lfm2moe only (it also reads n_dense_lead, n_ff_dense, gating_func and
    // expert_weights_scale from the glm4moe fields below) ----
    std::vector<int> conv_layers;   // per layer: 1 = short-convolution block, 0 = attention (n_layer
                                    // entries); empty: attention on every third layer (il % 3 == 2)
    int l_cache = 3;                // shortconv.l_cache: the conv width (>= 2)
    // ---- qwen35moe and qwen3next only (they also read head_dim, n_rot (0: head_dim / 4, the partial
    // rotary factor 0.25 of both) and n_ff_shared (0: n_ff)); qwen3next ignores rope_sections ----
    int full_attn_interval = 4;     // full_attention_interval: layer il is full attention when (il + 1) % n == 0
    std::vector<int> recr_layers;   // non-empty (n_layer entries): attention.recurrent_layers as an i32
                                    // array instead (1 = delta-net, 0 = full attention); the interval key is not written
    std::vector<int> rope_sections; // rope.dimension_sections (4 ints); empty: n_rot/2 split like [11, 11, 10, 0]
    int ssm_conv = 4;               // ssm.conv_kernel
    int ssm_state = 16;             // ssm.state_size: head dim of the delta-net q, k and v heads
    int ssm_group = 2;              // ssm.group_count: q/k heads
    int ssm_dt_rank = 4;            // ssm.time_step_rank: v heads (a multiple of ssm_group)
    // ---- gpt-oss and glm4moe only (the other arches ignore these) ----
    bool qkv_bias = true;           // attn_q/k/v.bias (gpt-oss files always have them; optional in llama.cpp)
    // Sliding-window attention (gpt-oss). llama.cpp: a query at position p attends keys at positions
    // p - n_swa < j <= p on SWA layers; without a pattern key, layer il is SWA when il % 2 == 0.
    int n_swa = 16;                 // attention.sliding_window (required)
    int swa_pattern = -1;           // attention.sliding_window_pattern as a u32 n: layer il is SWA when
                                    // il % n < n - 1 (n = 0: every layer); -1: key not written
    std::vector<int> swa_layers;    // non-empty: the pattern as an i32 array instead, 1 = SWA layer
    float rope_base_swa = 0.f;      // rope.freq_base_swa for the SWA layers; 0: not written (= rope_base)
    // RoPE scaling: "" writes no keys (plain RoPE); "yarn" writes rope.scaling.type = yarn, .factor
    // and .original_context_length (0: not written, llama.cpp then uses n_ctx_train).
    std::string rope_scaling;
    float rope_factor = 32.f;       // rope.scaling.factor (yarn only)
    int rope_orig_ctx = 0;          // rope.scaling.original_context_length (yarn only)
    float rope_attn_factor = 0.f;   // rope.scaling.attn_factor; 0: not written (llama.cpp: 1)
    // glm4moe
    int n_rot = 0;                  // rope.dimension_count; 0: head_dim / 2 (GLM-4.5's partial rotary)
    int n_dense_lead = 1;           // leading_dense_block_count: layers [0, n) have a dense SwiGLU FFN
    int n_ff_dense = 0;             // feed_forward_length, the dense layers' width; 0: 3 * n_ff
    int n_expert_shared = 1;        // expert_shared_count (>= 1): one ungated shared SwiGLU expert of
                                    // width n_ff * n_expert_shared
    int gating_func = 2;            // expert_gating_func: 1 softmax, 2 sigmoid; 0: not written (llama.cpp: sigmoid)
    bool expert_weights_norm = true;   // expert_weights_norm: the selected weights renormalised to sum 1
    float expert_weights_scale = 0.f;  // expert_weights_scale; 0: not written (0 and 1: no scaling)
    bool qk_norm = false;           // attn_q_norm / attn_k_norm {head_dim}: RMSNorm of each head
    int n_nextn = 0;                // nextn_predict_layers: NextN/MTP blocks written after the n_layer
                                    // trunk blocks (block_count = n_layer + n_nextn); not run by the oracle
    // ---- deepseek2 only (also uses n_dense_lead, n_ff_dense, n_expert_shared, gating_func (0: not
    // written, llama.cpp then uses softmax), expert_weights_norm (written only when true, as the
    // converter does), expert_weights_scale, n_nextn and the YaRN keys above; ignores head_dim,
    // n_head_kv, n_rot, qkv_bias, qk_norm) ----
    int q_lora_rank = 0;            // attention.q_lora_rank; 0: plain attn_q (the key is still written as 0:
                                    // llama.cpp requires it unless n_layer is 26/27 (V2-Lite))
    int kv_lora_rank = 32;          // attention.kv_lora_rank
    int qk_nope = 32;               // per-head key dims without RoPE
    int qk_rope = 16;               // per-head key dims with RoPE (rope.dimension_count); k_rope is shared by all heads
    int v_head_dim = 32;            // per-head value dims
    bool kv_b_split = true;         // attn_k_b + attn_v_b with the *_mla keys (today's converter); false: attn_kv_b
    int n_expert_groups = 0;        // expert_group_count; 0: not written (no grouping)
    int n_group_used = 0;           // expert_group_used_count
    float yarn_log_mul = 0.f;       // rope.scaling.yarn_log_multiplier as written (= 0.1 * mscale_all_dim); 0: not written
    // Fault injection for loader tests.
    std::string omit_tensor;        // this tensor is not written
    std::string misshape_tensor;    // this tensor is written with ne[1] + 1 (ne[0] + 1 if 1-D)
    std::string omit_key;           // this metadata key is not written
    std::vector<std::pair<std::string, uint32_t>> u32_keys;  // written last (over any value above): hostile metadata
};

struct LayerWeights {
    std::vector<float> attn_norm;                   // {n_embd} (lfm2moe: also the conv blocks' input norm)
    std::vector<float> shortconv_conv;              // lfm2moe conv layers: {l_cache, n_embd}, tap k of channel c at
                                                    // [c * l_cache + k]; tap l_cache - 1 is the current token
    std::vector<float> shortconv_in_proj;           // lfm2moe: {n_embd, 3 n_embd}: rows [0,E) B, [E,2E) C, [2E,3E) X
    std::vector<float> shortconv_out_proj;          // lfm2moe: {n_embd, n_embd}
    std::vector<float> wq, wk, wv;                  // {n_embd, n_head*hd} / {n_embd, n_head_kv*hd}
    std::vector<float> bq, bk, bv;                  // qwen2moe only: {n_head*hd} / {n_head_kv*hd}
    std::vector<float> wo;                          // {n_head*hd, n_embd}
    std::vector<float> q_norm, k_norm;              // qwen3moe, glm4moe {hd}; olmoe {n_head*hd} / {n_head_kv*hd}
    std::vector<float> bo;                          // gpt-oss: attn_output.bias {n_embd}
    std::vector<float> attn_sinks;                  // gpt-oss: attn_sinks.weight {n_head}
    std::vector<float> ffn_norm;                    // {n_embd}; gpt-oss and glm4moe: post_attention_norm.weight
    std::vector<float> gate_inp_b;                  // gpt-oss: ffn_gate_inp.bias {n_expert}
    std::vector<float> exp_probs_b;                 // glm4moe: exp_probs_b.bias {n_expert} (selection only)
    std::vector<float> gate_exps_b, up_exps_b;      // gpt-oss: {n_ff, n_expert}
    std::vector<float> down_exps_b;                 // gpt-oss: {n_embd, n_expert}
    std::vector<float> gate_inp;                    // {n_embd, n_expert}
    std::vector<float> gate_exps, up_exps;          // {n_embd, n_ff, n_expert}
    std::vector<float> down_exps;                   // {n_ff, n_embd, n_expert}
    std::vector<float> gate_inp_shexp;              // qwen2moe: {n_embd} (glm4moe: none, the shared expert is ungated)
    std::vector<float> gate_shexp, up_shexp;        // qwen2moe, glm4moe: {n_embd, n_ff_shared}
    std::vector<float> down_shexp;                  // qwen2moe, glm4moe: {n_ff_shared, n_embd}
    // qwen35moe / qwen3next delta-net layers (HV = ssm_dt_rank v heads, HK = ssm_group q/k heads, DS = ssm_state;
    // full-attention layers use wq {n_embd, 2 n_head hd} (per head q then gate), wk, wv, wo, q/k_norm)
    std::vector<float> ssm_qkv;                     // attn_qkv {n_embd, 2 HK DS + HV DS}: q, k, v channels
    std::vector<float> ssm_z;                       // attn_gate {n_embd, HV DS}
    std::vector<float> ssm_conv1d;                  // {conv_kernel, conv channels}: tap k of channel c at
                                                    // [c * conv_kernel + k]; the last tap is the current token
    std::vector<float> ssm_dt;                      // ssm_dt.bias {HV}
    std::vector<float> ssm_a;                       // ssm_a {HV} = -exp(A_log)
    std::vector<float> ssm_beta, ssm_alpha;         // {n_embd, HV}, row h = v head h (qwen3next: unpacked from ssm_ba)
    std::vector<float> ssm_ba;                      // qwen3next: ssm_ba {n_embd, 2 HV} as stored: for q/k head g
                                                    // (r = HV/HK) rows 2rg..2rg+r-1 beta, 2rg+r..2rg+2r-1 alpha
    std::vector<float> ssm_norm;                    // {DS}
    std::vector<float> ssm_out;                     // {HV DS, n_embd}
    std::vector<float> ffn_gate, ffn_up, ffn_down;  // dense llama, glm4moe's leading dense layers:
                                                    // {n_embd, n_ff_dense} x2, {n_ff_dense, n_embd}
    // deepseek2 (MLA); wq holds attn_q {n_embd, n_head*hd} when there is no q LoRA
    std::vector<float> wq_a;                        // attn_q_a {n_embd, q_lora_rank}
    std::vector<float> q_a_norm;                    // attn_q_a_norm {q_lora_rank}
    std::vector<float> wq_b;                        // attn_q_b {q_lora_rank, n_head*hd}
    std::vector<float> wkv_a;                       // attn_kv_a_mqa {n_embd, kv_lora_rank + qk_rope}
    std::vector<float> kv_a_norm;                   // attn_kv_a_norm {kv_lora_rank}
    std::vector<float> wkv_b;                       // {kv_lora_rank, n_head*(qk_nope + v_head)}: per head qk_nope
                                                    // k rows then v_head v rows; rebuilt from attn_k_b / attn_v_b
                                                    // (as read back) when the file has the split form
};

struct RandomModel {
    ModelSpec spec;
    // Derived hyper-parameters.
    int head_dim = 0;
    int n_ff_shared = 0;
    int n_ff_dense = 0;        // dense FFN width (dense llama: n_ff; glm4moe's leading dense layers)
    int n_rot = 0;             // rotated dims per head (head_dim except glm4moe; deepseek2: qk_rope)
    int v_head_dim = 0;        // value dims per head (head_dim except deepseek2)
    bool rope_neox = true;
    bool norm_topk = true;     // renormalise the top-k router weights
    bool moe = true;           // false: dense llama (glm4moe: some layers are dense, see LayerWeights::gate_inp)
    std::vector<bool> shortconv; // lfm2moe, per layer: a short-convolution block instead of attention
    std::vector<bool> recurrent; // qwen35moe, qwen3next, per layer: a gated delta-net layer instead of full attention
    bool dnet_heads_grouped = false; // qwen3next: delta-net v head h reads q/k head h / (HV/HK) (qwen35moe: h % HK)
    int rope_sections[4] = {0, 0, 0, 0};  // qwen35moe: IMROPE sections as written
    // Routing: how the top-k is chosen and weighted.
    //   softmax:        p = softmax(logits) over all experts; top-k of logits; w = p (renormalised if norm_topk)
    //   sigmoid:        p = sigmoid(logits); top-k of p + exp_probs_b; w = p (renormalised if norm_topk)
    //   softmax_weight: top-k of logits (+ router bias); w = softmax over the k selected logits
    enum class Gating { softmax, sigmoid, softmax_weight };
    Gating gating = Gating::softmax;
    double expert_scale = 1.0; // the routed experts' weights are multiplied by this
    std::vector<bool> swa;     // per trunk layer: sliding-window attention (gpt-oss)
    int bos = -1, eos = -1;
    // Weights as stored (after the quantize -> dequantize round trip).
    std::vector<float> tok_embd;     // {n_embd, n_vocab}
    std::vector<float> output_norm;  // {n_embd}
    std::vector<float> output;       // {n_embd, n_vocab}; empty when tied
    std::vector<LayerWeights> layers;
    // The file.
    moe::GgufWriter writer;
    std::vector<std::pair<std::string, moe::TensorType>> tensor_types;  // what each tensor became
    moe::Status status = moe::Status::ok;  // first failure while building
    std::string error;

    // deepseek2: a top-k over expert groups first (expert_group_count > 1)
    int n_expert_groups = 0, n_group_used = 0;
    int group_score_top = 2;   // a group's score is the sum of its this many best selection scores (llama.cpp: 2)

    bool ok() const { return status == moe::Status::ok; }
    const std::vector<float>& logits_matrix() const { return output.empty() ? tok_embd : output; }
    moe::Status write(const std::string& path) const { return writer.write(path.c_str()); }
    std::vector<uint8_t> bytes() const { return writer.to_bytes(); }
};

namespace detail_rm {

// splitmix64 + Box-Muller: deterministic on every platform, independent of the library.
struct Rng {
    uint64_t s;
    explicit Rng(uint64_t seed) : s(seed * 0x2545F4914F6CDD1Dull + 0x1234567ull) {}
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return ((double)(next() >> 11) + 0.5) * (1.0 / 9007199254740992.0); }  // (0,1)
    double normal() {
        const double u1 = uniform(), u2 = uniform();
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
    }
    uint32_t below(uint32_t n) { return (uint32_t)(next() % n); }
};

inline void append_utf8(std::string& s, uint32_t cp) {
    if (cp < 0x80) {
        s += (char)cp;
    } else if (cp < 0x800) {
        s += (char)(0xC0 | (cp >> 6));
        s += (char)(0x80 | (cp & 0x3F));
    } else {
        s += (char)(0xE0 | (cp >> 12));
        s += (char)(0x80 | ((cp >> 6) & 0x3F));
        s += (char)(0x80 | (cp & 0x3F));
    }
}

// GPT-2 byte-level alphabet: printable bytes map to themselves, the other 68 bytes to U+0100.. in
// byte order.
inline std::vector<std::string> byte_level_tokens() {
    std::vector<std::string> out(256);
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
        const bool printable = (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
        append_utf8(out[b], printable ? b : 256 + extra++);
    }
    return out;
}

inline bool is_kquant(moe::TensorType t) {
    return t == moe::TensorType::q2_k || t == moe::TensorType::q3_k || t == moe::TensorType::q4_k || t == moe::TensorType::q5_k ||
           t == moe::TensorType::q6_k;
}

}  // namespace detail_rm

// Builds the model. Check `ok()` / `error` before use.
inline RandomModel make_random_model(const ModelSpec& spec) {
    using moe::TensorType;
    RandomModel m;
    m.spec = spec;
    const std::string& A = spec.arch;
    const bool is_qwen3 = A == "qwen3moe", is_olmoe = A == "olmoe", is_qwen2 = A == "qwen2moe", is_llama = A == "llama";
    const bool is_oss = A == "gpt-oss", is_glm = A == "glm4moe", is_ds2 = A == "deepseek2";
    const bool is_lfm = A == "lfm2moe";
    const bool is_q3n = A == "qwen3next";
    const bool is_q35 = A == "qwen35moe" || is_q3n;  // the qwen35moe code paths, with qwen3next's branches
    auto fail = [&](const std::string& msg) {
        if (m.ok()) { m.status = moe::Status::invalid_argument; m.error = msg; }
    };
    if (!is_qwen3 && !is_olmoe && !is_qwen2 && !is_llama && !is_oss && !is_glm && !is_ds2 && !is_lfm && !is_q35) { fail("unknown arch " + A); return m; }
    if (spec.dense && !is_llama) { fail("dense is only for llama"); return m; }
    m.moe = !spec.dense;
    m.head_dim = spec.head_dim > 0 ? spec.head_dim : spec.n_embd / spec.n_head;
    m.n_ff_shared = spec.n_ff_shared > 0 ? spec.n_ff_shared : spec.n_ff;
    m.n_ff_dense = spec.n_ff;
    m.n_rot = m.head_dim;
    m.v_head_dim = m.head_dim;
    m.rope_neox = !is_llama;
    m.norm_topk = is_qwen3 || is_llama;
    m.swa.assign((size_t)std::max(0, spec.n_layer), false);
    if (is_oss) {
        m.norm_topk = false;
        m.gating = RandomModel::Gating::softmax_weight;
        if (spec.tied) { fail("gpt-oss needs an output tensor (no tied embeddings)"); return m; }
        if (spec.n_swa <= 0) { fail("gpt-oss needs n_swa > 0"); return m; }
        if (!spec.swa_layers.empty() && (int)spec.swa_layers.size() != spec.n_layer) { fail("swa_layers needs n_layer entries"); return m; }
        for (int il = 0; il < spec.n_layer; ++il) {
            bool swa;
            if (!spec.swa_layers.empty()) swa = spec.swa_layers[(size_t)il] != 0;
            else {
                const int n = spec.swa_pattern >= 0 ? spec.swa_pattern : 2;  // llama.cpp's default for gpt-oss
                swa = n == 0 || il % n < n - 1;
            }
            m.swa[(size_t)il] = swa;
        }
    }
    if (is_glm) {
        m.n_rot = spec.n_rot > 0 ? spec.n_rot : m.head_dim / 2;
        m.n_ff_dense = spec.n_ff_dense > 0 ? spec.n_ff_dense : 3 * spec.n_ff;
        m.n_ff_shared = spec.n_ff * spec.n_expert_shared;
        m.norm_topk = spec.expert_weights_norm;
        if (spec.gating_func == 1) m.gating = RandomModel::Gating::softmax;
        else if (spec.gating_func == 0 || spec.gating_func == 2) m.gating = RandomModel::Gating::sigmoid;
        else { fail("glm4moe gating_func must be 0, 1 or 2"); return m; }
        if (spec.expert_weights_scale != 0.f) m.expert_scale = (double)spec.expert_weights_scale;
        if (m.n_rot % 2 || m.n_rot > m.head_dim) { fail("n_rot must be even and <= head_dim"); return m; }
        if (spec.n_expert_shared < 1) { fail("glm4moe needs n_expert_shared >= 1"); return m; }
        if (spec.n_dense_lead < 0 || spec.n_dense_lead > spec.n_layer) { fail("bad n_dense_lead"); return m; }
        if (spec.n_nextn < 0) { fail("bad n_nextn"); return m; }
    }
    if (is_ds2) {
        m.head_dim = spec.qk_nope + spec.qk_rope;
        m.n_rot = spec.qk_rope;
        m.v_head_dim = spec.v_head_dim;
        m.rope_neox = false;
        m.n_ff_dense = spec.n_ff_dense > 0 ? spec.n_ff_dense : 3 * spec.n_ff;
        m.n_ff_shared = spec.n_ff * spec.n_expert_shared;
        m.norm_topk = spec.expert_weights_norm;
        if (spec.gating_func == 0 || spec.gating_func == 1) m.gating = RandomModel::Gating::softmax;
        else if (spec.gating_func == 2) m.gating = RandomModel::Gating::sigmoid;
        else { fail("deepseek2 gating_func must be 0, 1 or 2"); return m; }
        if (spec.expert_weights_scale != 0.f) m.expert_scale = (double)spec.expert_weights_scale;
        m.n_expert_groups = spec.n_expert_groups;
        m.n_group_used = spec.n_group_used;
        if (spec.qk_nope < 1 || spec.qk_rope < 2 || spec.qk_rope % 2 || spec.v_head_dim < 1 || spec.kv_lora_rank < 1 || spec.q_lora_rank < 0) {
            fail("bad deepseek2 MLA dims"); return m;
        }
        if (spec.n_expert_shared < 1) { fail("deepseek2 needs n_expert_shared >= 1"); return m; }
        if (spec.n_dense_lead < 0 || spec.n_dense_lead > spec.n_layer) { fail("bad n_dense_lead"); return m; }
        if (spec.n_nextn < 0) { fail("bad n_nextn"); return m; }
        if (spec.n_expert_groups > 1) {  // llama.cpp's asserts, plus enough experts in the kept groups for the top-k
            const int per = spec.n_expert / spec.n_expert_groups;
            if (spec.n_expert % spec.n_expert_groups || per < 2 || spec.n_group_used < 1 || spec.n_group_used >= spec.n_expert_groups ||
                spec.n_expert_used > per * spec.n_group_used) {
                fail("bad expert groups"); return m;
            }
        }
    }
    if (is_lfm) {
        m.n_ff_dense = spec.n_ff_dense > 0 ? spec.n_ff_dense : 3 * spec.n_ff;
        m.norm_topk = true;  // build_moe_ffn(..., norm_w = true, ...) in lfm2.cpp
        if (spec.gating_func == 1) m.gating = RandomModel::Gating::softmax;
        else if (spec.gating_func == 2) m.gating = RandomModel::Gating::sigmoid;
        else { fail("lfm2moe gating_func must be 1 or 2 (the key is required)"); return m; }
        // expert_weights_scale: written if set, but llama.cpp never reads it for lfm2moe (scale 1)
        if (spec.l_cache < 2) { fail("lfm2moe needs l_cache >= 2"); return m; }
        if (spec.n_dense_lead < 0 || spec.n_dense_lead > spec.n_layer) { fail("bad n_dense_lead"); return m; }
        if (!spec.conv_layers.empty() && (int)spec.conv_layers.size() != spec.n_layer) { fail("conv_layers needs n_layer entries"); return m; }
        if (m.head_dim * spec.n_head != spec.n_embd) { fail("lfm2moe needs head_dim * n_head == n_embd"); return m; }
        m.shortconv.assign((size_t)std::max(0, spec.n_layer), false);
        for (int il = 0; il < spec.n_layer; ++il)
            m.shortconv[(size_t)il] = spec.conv_layers.empty() ? il % 3 != 2 : spec.conv_layers[(size_t)il] != 0;
    }
    if (is_q35) {
        m.n_rot = spec.n_rot > 0 ? spec.n_rot : m.head_dim / 4;
        m.norm_topk = true;  // build_moe_ffn(..., norm_w = true, ..., SOFTMAX) in qwen35moe.cpp / qwen3next.cpp
        m.dnet_heads_grouped = is_q3n;
        if (m.n_rot % 2 || m.n_rot > m.head_dim) { fail("n_rot must be even and <= head_dim"); return m; }
        if (!spec.recr_layers.empty() && (int)spec.recr_layers.size() != spec.n_layer) { fail("recr_layers needs n_layer entries"); return m; }
        if (spec.recr_layers.empty() && spec.full_attn_interval < 1) { fail("full_attn_interval must be >= 1"); return m; }
        if (spec.ssm_conv < 2 || spec.ssm_state < 1 || spec.ssm_group < 1 || spec.ssm_dt_rank % spec.ssm_group) { fail("bad " + A + " ssm dims"); return m; }
        m.recurrent.assign((size_t)std::max(0, spec.n_layer), false);
        for (int il = 0; il < spec.n_layer; ++il)
            m.recurrent[(size_t)il] = spec.recr_layers.empty() ? (il + 1) % spec.full_attn_interval != 0 : spec.recr_layers[(size_t)il] != 0;
        if (is_q3n) {
            // plain NEOX: no sections (rope_sections stays 0 0 0 0)
        } else if (!spec.rope_sections.empty()) {
            if (spec.rope_sections.size() != 4) { fail("rope_sections needs 4 entries"); return m; }
            for (int i = 0; i < 4; ++i) m.rope_sections[i] = spec.rope_sections[(size_t)i];
        } else {
            const int P = m.n_rot / 2;
            m.rope_sections[0] = (P + 2) / 3;
            m.rope_sections[1] = (P + 1) / 3;
            m.rope_sections[2] = P / 3;
        }
        const int sect = m.rope_sections[0] + m.rope_sections[1] + m.rope_sections[2] + m.rope_sections[3];
        if (!is_q3n && (sect < 1 || sect > m.n_rot / 2 || m.rope_sections[0] + m.rope_sections[1] + m.rope_sections[2] < 1)) { fail("bad rope_sections"); return m; }
    }
    if ((is_oss || is_glm || is_ds2) && !spec.rope_scaling.empty() && spec.rope_scaling != "yarn") { fail("rope_scaling must be \"\" or yarn"); return m; }
    const int E = spec.n_embd, H = spec.n_head, HKV = spec.n_head_kv, HD = m.head_dim;
    const int NE = spec.n_expert, NF = spec.n_ff, NFS = m.n_ff_shared, V = spec.n_vocab;
    if (spec.n_vocab < 262) { fail("n_vocab must be >= 262"); return m; }
    if (H <= 0 || HKV <= 0 || (H % HKV && !is_ds2)) { fail("n_head must be a multiple of n_head_kv"); return m; }
    if (HD <= 0 || (HD % 2 && !is_ds2)) { fail("head_dim must be even"); return m; }
    if ((is_olmoe || is_qwen2) && HD * H != E) { fail(A + " needs head_dim * n_head == n_embd"); return m; }
    if (m.moe && (NE <= 0 || spec.n_expert_used <= 0 || spec.n_expert_used > NE)) { fail("bad expert counts"); return m; }

    detail_rm::Rng rng(spec.seed);
    moe::GgufWriter& w = m.writer;
    const std::string P = A + ".";

    // ---- metadata --------------------------------------------------------------------------
    auto key_ok = [&](const std::string& k) { return k != spec.omit_key; };
    auto set_u32 = [&](const std::string& k, uint32_t v) { if (key_ok(k)) w.set_u32(k, v); };
    auto set_f32 = [&](const std::string& k, float v) { if (key_ok(k)) w.set_f32(k, v); };
    auto set_str = [&](const std::string& k, const std::string& v) { if (key_ok(k)) w.set_string(k, v); };
    set_str("general.architecture", A);
    set_str("general.name", "moe_infer random test model");
    set_u32("general.alignment", 32);
    set_u32(P + "context_length", (uint32_t)spec.n_ctx_train);
    set_u32(P + "embedding_length", (uint32_t)E);
    set_u32(P + "block_count", (uint32_t)(spec.n_layer + (is_glm || is_ds2 ? spec.n_nextn : 0)));
    set_u32(P + "attention.head_count", (uint32_t)H);
    // deepseek2: the split form is MQA over the latent (one K/V head), the legacy one MHA
    set_u32(P + "attention.head_count_kv", (uint32_t)(is_ds2 ? (spec.kv_b_split ? 1 : H) : HKV));
    set_f32(P + "attention.layer_norm_rms_epsilon", spec.rms_eps);
    set_f32(P + "rope.freq_base", spec.rope_base);
    if (m.moe) {
        set_u32(P + "expert_count", (uint32_t)NE);
        set_u32(P + "expert_used_count", (uint32_t)spec.n_expert_used);
    }
    if (is_lfm) {
        // as convert_hf_to_gguf.py's LFM2MoeModel writes them: head_count_kv per layer, 0 marking a
        // short-convolution layer (replaces the scalar written above, in place); no key_length
        // (head_dim = n_embd / n_head), no rope.dimension_count (n_rot = head_dim)
        std::vector<int32_t> kv((size_t)spec.n_layer);
        for (int il = 0; il < spec.n_layer; ++il) kv[(size_t)il] = m.shortconv[(size_t)il] ? 0 : HKV;
        if (key_ok(P + "attention.head_count_kv")) w.set_i32_array(P + "attention.head_count_kv", kv);
        set_u32(P + "feed_forward_length", (uint32_t)m.n_ff_dense);
        set_u32(P + "expert_feed_forward_length", (uint32_t)NF);
        set_u32(P + "leading_dense_block_count", (uint32_t)spec.n_dense_lead);
        set_u32(P + "expert_gating_func", (uint32_t)spec.gating_func);
        set_u32(P + "vocab_size", (uint32_t)V);
        set_u32(P + "shortconv.l_cache", (uint32_t)spec.l_cache);
        if (spec.expert_weights_scale != 0.f) set_f32(P + "expert_weights_scale", spec.expert_weights_scale);  // ignored by llama.cpp
    } else if (is_q35) {
        // as convert_hf_to_gguf.py's Qwen3_5MoeTextModel (qwen3next: Qwen3NextModel, no sections) writes them
        set_u32(P + "expert_feed_forward_length", (uint32_t)NF);
        set_u32(P + "expert_shared_feed_forward_length", (uint32_t)NFS);
        set_u32(P + "attention.key_length", (uint32_t)HD);
        set_u32(P + "attention.value_length", (uint32_t)HD);
        set_u32(P + "rope.dimension_count", (uint32_t)m.n_rot);
        if (!is_q3n && key_ok(P + "rope.dimension_sections"))
            w.set_i32_array(P + "rope.dimension_sections", std::vector<int32_t>(m.rope_sections, m.rope_sections + 4));
        set_u32(P + "ssm.conv_kernel", (uint32_t)spec.ssm_conv);
        set_u32(P + "ssm.state_size", (uint32_t)spec.ssm_state);
        set_u32(P + "ssm.group_count", (uint32_t)spec.ssm_group);
        set_u32(P + "ssm.time_step_rank", (uint32_t)spec.ssm_dt_rank);
        set_u32(P + "ssm.inner_size", (uint32_t)(spec.ssm_state * spec.ssm_dt_rank));
        if (!spec.recr_layers.empty()) {  // the converter writes a bool array; llama.cpp also takes i32
            if (key_ok(P + "attention.recurrent_layers"))
                w.set_i32_array(P + "attention.recurrent_layers", std::vector<int32_t>(spec.recr_layers.begin(), spec.recr_layers.end()));
        } else {
            set_u32(P + "full_attention_interval", (uint32_t)spec.full_attn_interval);
        }
    } else if (is_qwen3) {
        // feed_forward_length is the (unused) dense size in real files: deliberately different
        // from the expert width, so an engine that reads the wrong key fails the shape checks.
        set_u32(P + "feed_forward_length", (uint32_t)(3 * E));
        set_u32(P + "expert_feed_forward_length", (uint32_t)NF);
        set_u32(P + "attention.key_length", (uint32_t)HD);
        set_u32(P + "attention.value_length", (uint32_t)HD);
    } else if (is_qwen2) {
        set_u32(P + "feed_forward_length", (uint32_t)(3 * E));
        set_u32(P + "expert_feed_forward_length", (uint32_t)NF);
        set_u32(P + "expert_shared_feed_forward_length", (uint32_t)NFS);
    } else if (is_olmoe) {
        set_u32(P + "feed_forward_length", (uint32_t)NF);
    } else if (is_llama) {  // llama: per-expert (or dense) FFN width
        set_u32(P + "feed_forward_length", (uint32_t)NF);
        set_u32(P + "rope.dimension_count", (uint32_t)HD);
        if (HD * H != E) {
            set_u32(P + "attention.key_length", (uint32_t)HD);
            set_u32(P + "attention.value_length", (uint32_t)HD);
        }
    } else if (is_ds2) {
        const int KVR = spec.kv_lora_rank;
        set_u32(P + "vocab_size", (uint32_t)V);
        set_u32(P + "leading_dense_block_count", (uint32_t)spec.n_dense_lead);
        set_u32(P + "feed_forward_length", (uint32_t)m.n_ff_dense);
        set_u32(P + "expert_feed_forward_length", (uint32_t)NF);
        set_u32(P + "expert_shared_count", (uint32_t)spec.n_expert_shared);
        set_u32(P + "attention.q_lora_rank", (uint32_t)spec.q_lora_rank);
        set_u32(P + "attention.kv_lora_rank", (uint32_t)KVR);
        if (spec.kv_b_split) {
            set_u32(P + "attention.key_length", (uint32_t)(KVR + spec.qk_rope));
            set_u32(P + "attention.value_length", (uint32_t)KVR);
            set_u32(P + "attention.key_length_mla", (uint32_t)HD);
            set_u32(P + "attention.value_length_mla", (uint32_t)spec.v_head_dim);
        } else {
            set_u32(P + "attention.key_length", (uint32_t)HD);
            set_u32(P + "attention.value_length", (uint32_t)spec.v_head_dim);
        }
        set_u32(P + "rope.dimension_count", (uint32_t)spec.qk_rope);
        if (spec.expert_weights_scale != 0.f) set_f32(P + "expert_weights_scale", spec.expert_weights_scale);
        if (spec.expert_weights_norm && key_ok(P + "expert_weights_norm")) w.set_bool(P + "expert_weights_norm", true);
        if (spec.gating_func != 0) set_u32(P + "expert_gating_func", (uint32_t)spec.gating_func);
        if (spec.n_expert_groups > 0) {
            set_u32(P + "expert_group_count", (uint32_t)spec.n_expert_groups);
            set_u32(P + "expert_group_used_count", (uint32_t)spec.n_group_used);
        }
        if (spec.n_nextn > 0) set_u32(P + "nextn_predict_layers", (uint32_t)spec.n_nextn);
        if (spec.rope_scaling == "yarn") {
            set_str(P + "rope.scaling.type", "yarn");
            set_f32(P + "rope.scaling.factor", spec.rope_factor);
            if (spec.rope_orig_ctx > 0) set_u32(P + "rope.scaling.original_context_length", (uint32_t)spec.rope_orig_ctx);
            if (spec.yarn_log_mul != 0.f) set_f32(P + "rope.scaling.yarn_log_multiplier", spec.yarn_log_mul);
        }
        if (spec.rope_attn_factor != 0.f) set_f32(P + "rope.scaling.attn_factor", spec.rope_attn_factor);
    } else {  // gpt-oss, glm4moe
        set_u32(P + "attention.key_length", (uint32_t)HD);
        set_u32(P + "attention.value_length", (uint32_t)HD);
        set_u32(P + "expert_feed_forward_length", (uint32_t)NF);
        if (is_oss) {
            // feed_forward_length is not read by llama.cpp for gpt-oss: deliberately not the expert width
            set_u32(P + "feed_forward_length", (uint32_t)(3 * E));
            set_u32(P + "attention.sliding_window", (uint32_t)spec.n_swa);
            if (!spec.swa_layers.empty()) {
                if (key_ok(P + "attention.sliding_window_pattern"))
                    w.set_i32_array(P + "attention.sliding_window_pattern", std::vector<int32_t>(spec.swa_layers.begin(), spec.swa_layers.end()));
            } else if (spec.swa_pattern >= 0) {
                set_u32(P + "attention.sliding_window_pattern", (uint32_t)spec.swa_pattern);
            }
            if (spec.rope_base_swa > 0.f) set_f32(P + "rope.freq_base_swa", spec.rope_base_swa);
        } else {
            set_u32(P + "feed_forward_length", (uint32_t)m.n_ff_dense);
            set_u32(P + "rope.dimension_count", (uint32_t)m.n_rot);
            set_u32(P + "leading_dense_block_count", (uint32_t)spec.n_dense_lead);
            set_u32(P + "expert_shared_count", (uint32_t)spec.n_expert_shared);
            if (spec.gating_func != 0) set_u32(P + "expert_gating_func", (uint32_t)spec.gating_func);
            if (key_ok(P + "expert_weights_norm")) w.set_bool(P + "expert_weights_norm", spec.expert_weights_norm);
            if (spec.expert_weights_scale != 0.f) set_f32(P + "expert_weights_scale", spec.expert_weights_scale);
            if (spec.n_nextn > 0) set_u32(P + "nextn_predict_layers", (uint32_t)spec.n_nextn);
        }
        if (spec.rope_scaling == "yarn") {
            set_str(P + "rope.scaling.type", "yarn");
            set_f32(P + "rope.scaling.factor", spec.rope_factor);
            if (spec.rope_orig_ctx > 0) set_u32(P + "rope.scaling.original_context_length", (uint32_t)spec.rope_orig_ctx);
        }
        if (spec.rope_attn_factor != 0.f) set_f32(P + "rope.scaling.attn_factor", spec.rope_attn_factor);
    }
    for (const auto& kv : spec.u32_keys) w.set_u32(kv.first, kv.second);

    // Tokenizer: 256 byte-level tokens, 4 merges, fillers, 2 control tokens at the end.
    {
        std::vector<std::string> tokens = detail_rm::byte_level_tokens();
        const std::string G = tokens[' '];  // "Ġ"
        const std::vector<std::pair<std::string, std::string>> merges = {{G, "t"}, {"h", "e"}, {"i", "n"}, {G, "a"}};
        std::vector<std::string> merge_strs;
        for (const auto& mg : merges) {
            tokens.push_back(mg.first + mg.second);
            merge_strs.push_back(mg.first + " " + mg.second);
        }
        while ((int)tokens.size() < V - 2) tokens.push_back("tok" + std::to_string(tokens.size()));
        const bool llama_bpe = is_llama;
        tokens.push_back(llama_bpe ? "<|begin_of_text|>" : "<|im_start|>");
        tokens.push_back(llama_bpe ? "<|end_of_text|>" : "<|endoftext|>");
        std::vector<int32_t> types(tokens.size(), 1);
        types[V - 2] = 3;
        types[V - 1] = 3;
        m.bos = llama_bpe ? V - 2 : V - 1;
        m.eos = V - 1;
        set_str("tokenizer.ggml.model", "gpt2");
        set_str("tokenizer.ggml.pre", llama_bpe ? "llama-bpe" : "qwen2");
        if (key_ok("tokenizer.ggml.tokens")) w.set_string_array("tokenizer.ggml.tokens", tokens);
        if (key_ok("tokenizer.ggml.token_type")) w.set_i32_array("tokenizer.ggml.token_type", types);
        if (key_ok("tokenizer.ggml.merges")) w.set_string_array("tokenizer.ggml.merges", merge_strs);
        set_u32("tokenizer.ggml.bos_token_id", (uint32_t)m.bos);
        set_u32("tokenizer.ggml.eos_token_id", (uint32_t)m.eos);
        if (key_ok("tokenizer.ggml.add_bos_token")) w.set_bool("tokenizer.ggml.add_bos_token", false);
    }

    // ---- tensors ---------------------------------------------------------------------------
    // gen: values ~ N(mean, std^2); `big`: stored as wtype (else F32). Returns the read-back floats.
    // store: writes `vals` as `name` (type as below, or `forced`) and returns the read-back floats.
    auto store = [&](const std::string& name, std::vector<int64_t> ne, std::vector<float> vals, bool big, const TensorType* forced) -> std::vector<float> {
        if (!m.ok() || name == spec.omit_tensor) return vals;
        TensorType t = TensorType::f32;
        if (forced) {
            t = *forced;
        } else if (big) {
            t = spec.wtype;
            for (const auto& ov : spec.type_overrides)
                if (name.find(ov.first) != std::string::npos) { t = ov.second; break; }
            if (ne[0] % moe::tensor_type_block_elems(t)) t = spec.fallback_type;
            if (ne[0] % moe::tensor_type_block_elems(t)) t = TensorType::f32;
        }
        std::vector<int64_t> file_ne = ne;
        std::vector<float> file_vals = vals;
        if (name == spec.misshape_tensor) {
            if (file_ne.size() == 1) file_ne[0] += 1; else file_ne[1] += 1;
            t = TensorType::f32;
            int64_t nn = 1;
            for (int64_t d : file_ne) nn *= d;
            file_vals.assign((size_t)nn, 0.5f);
        }
        int64_t nn = (int64_t)file_vals.size();
        std::vector<uint8_t> bytes((size_t)(nn / moe::tensor_type_block_elems(t) * moe::tensor_type_block_bytes(t)));
        moe::Status s = moe::quantize_row(t, file_vals.data(), bytes.data(), nn);
        if (s == moe::Status::ok) s = moe::dequantize_row(t, bytes.data(), file_vals.data(), nn);
        if (s == moe::Status::ok) s = w.add_tensor(name, t, (uint32_t)file_ne.size(), file_ne.data(), bytes.data());
        if (s != moe::Status::ok) {
            m.status = s;
            m.error = "tensor " + name + ": " + moe::last_error();
            return vals;
        }
        m.tensor_types.emplace_back(name, t);
        if (name != spec.misshape_tensor) vals = file_vals;
        return vals;
    };
    auto draw = [&](std::vector<int64_t> ne, double mean, double std) {
        int64_t n = 1;
        for (int64_t d : ne) n *= d;
        std::vector<float> vals((size_t)n);
        for (float& v : vals) v = (float)(mean + std * rng.normal());  // drawn even if omitted: same weights
        return vals;
    };
    auto add = [&](const std::string& name, std::vector<int64_t> ne, double mean, double std, bool big) {
        return store(name, ne, draw(ne, mean, std), big, nullptr);
    };
    // An expert stack {ne0, ne1, n_expert}, split into cold and hot stacks when spec.hot_experts is set.
    auto add_experts = [&](const std::string& b, const std::string& what, std::vector<int64_t> ne, double std) {
        std::vector<float> vals = draw(ne, 0, std);
        if (spec.hot_experts.empty()) return store(b + "ffn_" + what + "_exps.weight", ne, vals, true, nullptr);
        const size_t per = (size_t)(ne[0] * ne[1]);
        std::vector<float> cold, hot;
        for (int64_t e = 0; e < ne[2]; ++e) {
            const bool is_hot = std::find(spec.hot_experts.begin(), spec.hot_experts.end(), (int)e) != spec.hot_experts.end();
            (is_hot ? hot : cold).insert((is_hot ? hot : cold).end(), vals.begin() + (std::ptrdiff_t)(e * per), vals.begin() + (std::ptrdiff_t)((e + 1) * per));
        }
        const int64_t n_hot = (int64_t)(hot.size() / per);
        cold = store(b + "ffn_" + what + "_exps.weight", {ne[0], ne[1], ne[2] - n_hot}, cold, true, nullptr);
        hot = store(b + "ffn_" + what + "_hot_exps.weight", {ne[0], ne[1], n_hot}, hot, true, &spec.hot_type);
        size_t ci = 0, hi = 0;
        for (int64_t e = 0; e < ne[2]; ++e) {
            const bool is_hot = std::find(spec.hot_experts.begin(), spec.hot_experts.end(), (int)e) != spec.hot_experts.end();
            const std::vector<float>& src = is_hot ? hot : cold;
            size_t& at = is_hot ? hi : ci;
            std::copy(src.begin() + (std::ptrdiff_t)(at * per), src.begin() + (std::ptrdiff_t)((at + 1) * per), vals.begin() + (std::ptrdiff_t)(e * per));
            ++at;
        }
        return vals;
    };
    if (m.moe && !spec.hot_experts.empty() && key_ok("moe_infer.hot_experts")) {
        std::vector<int32_t> ids(spec.hot_experts.begin(), spec.hot_experts.end());
        std::sort(ids.begin(), ids.end());
        std::vector<int32_t> all;
        for (int il = 0; il < spec.n_layer; ++il) all.insert(all.end(), ids.begin(), ids.end());
        w.set_i32_array("moe_infer.hot_experts", all);
    }

    // One block of gpt-oss or glm4moe (il >= n_layer: a glm4moe NextN block, always MoE).
    auto add_new_family_layer = [&](LayerWeights& L, int il) {
        const std::string b = "blk." + std::to_string(il) + ".";
        const double s_in = 1.0 / std::sqrt((double)E);
        L.attn_norm = add(b + "attn_norm.weight", {E}, 1.0, 0.1, false);
        L.wq = add(b + "attn_q.weight", {E, H * HD}, 0, s_in, true);
        L.wk = add(b + "attn_k.weight", {E, HKV * HD}, 0, s_in, true);
        L.wv = add(b + "attn_v.weight", {E, HKV * HD}, 0, s_in, true);
        if (spec.qkv_bias) {
            L.bq = add(b + "attn_q.bias", {H * HD}, 0, 0.3, false);
            L.bk = add(b + "attn_k.bias", {HKV * HD}, 0, 0.3, false);
            L.bv = add(b + "attn_v.bias", {HKV * HD}, 0, 0.3, false);
        }
        L.wo = add(b + "attn_output.weight", {H * HD, E}, 0, 1.0 / std::sqrt((double)(H * HD)), true);
        if (is_oss) {
            L.bo = add(b + "attn_output.bias", {E}, 0, 0.3, false);
            L.attn_sinks = add(b + "attn_sinks.weight", {H}, 0, 1.0, false);
        }
        if (is_glm && spec.qk_norm) {
            L.q_norm = add(b + "attn_q_norm.weight", {HD}, 1.0, 0.2, false);
            L.k_norm = add(b + "attn_k_norm.weight", {HD}, 1.0, 0.2, false);
        }
        L.ffn_norm = add(b + "post_attention_norm.weight", {E}, 1.0, 0.1, false);
        if (is_glm && il < spec.n_dense_lead) {
            const int NFD = m.n_ff_dense;
            L.ffn_gate = add(b + "ffn_gate.weight", {E, NFD}, 0, s_in, true);
            L.ffn_up = add(b + "ffn_up.weight", {E, NFD}, 0, s_in, true);
            L.ffn_down = add(b + "ffn_down.weight", {NFD, E}, 0, 1.0 / std::sqrt((double)NFD), true);
            return;
        }
        L.gate_inp = add(b + "ffn_gate_inp.weight", {E, NE}, 0, spec.router_scale * s_in, false);
        if (is_oss) L.gate_inp_b = add(b + "ffn_gate_inp.bias", {NE}, 0, 0.5, false);
        // the selection bias moves sigmoid scores in (0, 1): 0.2 changes the choice often, not always
        if (is_glm) L.exp_probs_b = add(b + "exp_probs_b.bias", {NE}, 0, 0.2, false);
        // gpt-oss: gate/up ~ N(0, 3^2) so that swiglu_oai's clamps at 7 are reached now and then
        const double s_gu = is_oss ? 3.0 * s_in : s_in;
        L.gate_exps = add_experts(b, "gate", {E, NF, NE}, s_gu);
        L.up_exps = add_experts(b, "up", {E, NF, NE}, s_gu);
        L.down_exps = add_experts(b, "down", {NF, E, NE}, 1.0 / std::sqrt((double)NF));
        if (is_oss) {
            L.gate_exps_b = add(b + "ffn_gate_exps.bias", {NF, NE}, 0, 0.5, false);
            L.up_exps_b = add(b + "ffn_up_exps.bias", {NF, NE}, 0, 0.5, false);
            L.down_exps_b = add(b + "ffn_down_exps.bias", {E, NE}, 0, 0.3, false);
        }
        if (is_glm) {
            L.gate_shexp = add(b + "ffn_gate_shexp.weight", {E, NFS}, 0, s_in, true);
            L.up_shexp = add(b + "ffn_up_shexp.weight", {E, NFS}, 0, s_in, true);
            L.down_shexp = add(b + "ffn_down_shexp.weight", {NFS, E}, 0, 1.0 / std::sqrt((double)NFS), true);
        }
    };

    // One deepseek2 block (il >= n_layer: a NextN block, always MoE).
    auto add_deepseek2_layer = [&](LayerWeights& L, int il) {
        const std::string b = "blk." + std::to_string(il) + ".";
        const double s_in = 1.0 / std::sqrt((double)E);
        const int QL = spec.q_lora_rank, KVR = spec.kv_lora_rank, NOPE = spec.qk_nope, ROPE = spec.qk_rope, VD = spec.v_head_dim;
        L.attn_norm = add(b + "attn_norm.weight", {E}, 1.0, 0.1, false);
        if (QL > 0) {
            L.wq_a = add(b + "attn_q_a.weight", {E, QL}, 0, s_in, true);
            L.q_a_norm = add(b + "attn_q_a_norm.weight", {QL}, 1.0, 0.2, false);
            L.wq_b = add(b + "attn_q_b.weight", {QL, H * HD}, 0, 1.0 / std::sqrt((double)QL), true);
        } else {
            L.wq = add(b + "attn_q.weight", {E, H * HD}, 0, s_in, true);
        }
        L.wkv_a = add(b + "attn_kv_a_mqa.weight", {E, KVR + ROPE}, 0, s_in, true);
        L.kv_a_norm = add(b + "attn_kv_a_norm.weight", {KVR}, 1.0, 0.2, false);
        // kv_b: drawn once in the {kv_lora, n_head (nope + v)} layout, stored as is or split the
        // way convert_hf_to_gguf.py splits it (k_b transposed to {nope, kv_lora, n_head})
        std::vector<float> kvb = draw({KVR, (int64_t)H * (NOPE + VD)}, 0, 1.0 / std::sqrt((double)KVR));
        if (!spec.kv_b_split) {
            L.wkv_b = store(b + "attn_kv_b.weight", {KVR, (int64_t)H * (NOPE + VD)}, kvb, true, nullptr);
        } else {
            std::vector<float> kb((size_t)NOPE * KVR * H), vb((size_t)KVR * VD * H);
            auto kv_at = [&](int h, int row, int r) -> float& { return kvb[((size_t)h * (size_t)(NOPE + VD) + (size_t)row) * (size_t)KVR + (size_t)r]; };
            for (int h = 0; h < H; ++h)
                for (int r = 0; r < KVR; ++r) {
                    for (int c = 0; c < NOPE; ++c) kb[(size_t)c + (size_t)NOPE * ((size_t)r + (size_t)KVR * (size_t)h)] = kv_at(h, c, r);
                    for (int j = 0; j < VD; ++j) vb[(size_t)r + (size_t)KVR * ((size_t)j + (size_t)VD * (size_t)h)] = kv_at(h, NOPE + j, r);
                }
            kb = store(b + "attn_k_b.weight", {NOPE, KVR, H}, kb, true, nullptr);
            vb = store(b + "attn_v_b.weight", {KVR, VD, H}, vb, true, nullptr);
            for (int h = 0; h < H; ++h)  // the float copy from what was read back
                for (int r = 0; r < KVR; ++r) {
                    for (int c = 0; c < NOPE; ++c) kv_at(h, c, r) = kb[(size_t)c + (size_t)NOPE * ((size_t)r + (size_t)KVR * (size_t)h)];
                    for (int j = 0; j < VD; ++j) kv_at(h, NOPE + j, r) = vb[(size_t)r + (size_t)KVR * ((size_t)j + (size_t)VD * (size_t)h)];
                }
            L.wkv_b = kvb;
        }
        L.wo = add(b + "attn_output.weight", {(int64_t)H * VD, E}, 0, 1.0 / std::sqrt((double)(H * VD)), true);
        L.ffn_norm = add(b + "ffn_norm.weight", {E}, 1.0, 0.1, false);
        if (il < spec.n_dense_lead) {
            const int NFD = m.n_ff_dense;
            L.ffn_gate = add(b + "ffn_gate.weight", {E, NFD}, 0, s_in, true);
            L.ffn_up = add(b + "ffn_up.weight", {E, NFD}, 0, s_in, true);
            L.ffn_down = add(b + "ffn_down.weight", {NFD, E}, 0, 1.0 / std::sqrt((double)NFD), true);
            return;
        }
        L.gate_inp = add(b + "ffn_gate_inp.weight", {E, NE}, 0, spec.router_scale * s_in, false);
        // selection bias: sigmoid gating only (DeepSeek-V3 ships it; V2's softmax has none)
        if (m.gating == RandomModel::Gating::sigmoid) L.exp_probs_b = add(b + "exp_probs_b.bias", {NE}, 0, 0.2, false);
        L.gate_exps = add_experts(b, "gate", {E, NF, NE}, s_in);
        L.up_exps = add_experts(b, "up", {E, NF, NE}, s_in);
        L.down_exps = add_experts(b, "down", {NF, E, NE}, 1.0 / std::sqrt((double)NF));
        L.gate_shexp = add(b + "ffn_gate_shexp.weight", {E, NFS}, 0, s_in, true);
        L.up_shexp = add(b + "ffn_up_shexp.weight", {E, NFS}, 0, s_in, true);
        L.down_shexp = add(b + "ffn_down_shexp.weight", {NFS, E}, 0, 1.0 / std::sqrt((double)NFS), true);
    };

    // One lfm2moe block: input norm, then a short-convolution block or GQA attention (per-head q/k
    // norm, no biases), then ffn_norm and a dense SwiGLU FFN (il < n_dense_lead) or the MoE.
    auto add_lfm2moe_layer = [&](LayerWeights& L, int il) {
        const std::string b = "blk." + std::to_string(il) + ".";
        const double s_in = 1.0 / std::sqrt((double)E);
        L.attn_norm = add(b + "attn_norm.weight", {E}, 1.0, 0.1, false);
        if (m.shortconv[(size_t)il]) {
            // the conv kernel stays F32 (ggml_ssm_conv reads it as float); taps ~ N(0, 0.6^2) so that
            // earlier tokens move the output about as much as the current one
            L.shortconv_conv = add(b + "shortconv.conv.weight", {spec.l_cache, E}, 0, 0.6, false);
            L.shortconv_in_proj = add(b + "shortconv.in_proj.weight", {E, 3 * E}, 0, s_in, true);
            L.shortconv_out_proj = add(b + "shortconv.out_proj.weight", {E, E}, 0, s_in, true);
        } else {
            L.wq = add(b + "attn_q.weight", {E, H * HD}, 0, s_in, true);
            L.wk = add(b + "attn_k.weight", {E, HKV * HD}, 0, s_in, true);
            L.wv = add(b + "attn_v.weight", {E, HKV * HD}, 0, s_in, true);
            L.wo = add(b + "attn_output.weight", {H * HD, E}, 0, 1.0 / std::sqrt((double)(H * HD)), true);
            L.q_norm = add(b + "attn_q_norm.weight", {HD}, 1.0, 0.2, false);
            L.k_norm = add(b + "attn_k_norm.weight", {HD}, 1.0, 0.2, false);
        }
        L.ffn_norm = add(b + "ffn_norm.weight", {E}, 1.0, 0.1, false);
        if (il < spec.n_dense_lead) {
            const int NFD = m.n_ff_dense;
            L.ffn_gate = add(b + "ffn_gate.weight", {E, NFD}, 0, s_in, true);
            L.ffn_up = add(b + "ffn_up.weight", {E, NFD}, 0, s_in, true);
            L.ffn_down = add(b + "ffn_down.weight", {NFD, E}, 0, 1.0 / std::sqrt((double)NFD), true);
            return;
        }
        L.gate_inp = add(b + "ffn_gate_inp.weight", {E, NE}, 0, spec.router_scale * s_in, false);
        L.exp_probs_b = add(b + "exp_probs_b.bias", {NE}, 0, 0.2, false);  // as glm4moe's: flips some choices
        L.gate_exps = add_experts(b, "gate", {E, NF, NE}, s_in);
        L.up_exps = add_experts(b, "up", {E, NF, NE}, s_in);
        L.down_exps = add_experts(b, "down", {NF, E, NE}, 1.0 / std::sqrt((double)NF));
    };

    // One qwen35moe / qwen3next block: attn_norm, a gated delta-net or a gated full-attention mixer,
    // post_attention_norm, the softmax MoE and the sigmoid-gated shared expert.
    auto add_qwen35moe_layer = [&](LayerWeights& L, int il) {
        const std::string b = "blk." + std::to_string(il) + ".";
        const double s_in = 1.0 / std::sqrt((double)E);
        L.attn_norm = add(b + "attn_norm.weight", {E}, 1.0, 0.1, false);
        if (m.recurrent[(size_t)il]) {
            const int DS = spec.ssm_state, HK = spec.ssm_group, HV = spec.ssm_dt_rank, KC = spec.ssm_conv;
            const int CH = 2 * HK * DS + HV * DS;
            L.ssm_qkv = add(b + "attn_qkv.weight", {E, CH}, 0, s_in, true);
            L.ssm_z = add(b + "attn_gate.weight", {E, HV * DS}, 0, s_in, true);
            // taps ~ N(0, 0.5^2): earlier tokens move the conv output about as much as the current one
            L.ssm_conv1d = add(b + "ssm_conv1d.weight", {KC, CH}, 0, 0.5, false);
            // dt_bias ~ N(-2, 0.5^2) and A_log ~ N(-0.5, 0.5^2): exp(g) ~ 0.9, a memory of ~10 tokens
            L.ssm_dt = add(b + "ssm_dt.bias", {HV}, -2.0, 0.5, false);
            std::vector<float> a = draw({HV}, -0.5, 0.5);
            for (float& v : a) v = -std::exp(v);
            L.ssm_a = store(b + "ssm_a", {HV}, a, false, nullptr);
            if (!is_q3n) {
                L.ssm_beta = add(b + "ssm_beta.weight", {E, HV}, 0, s_in, true);
                L.ssm_alpha = add(b + "ssm_alpha.weight", {E, HV}, 0, s_in, true);
            } else {
                // the same draws, fused into ssm_ba {E, 2 HV} in qwen3next's per-q/k-head layout, then
                // unpacked again from what was read back
                const std::vector<float> beta = draw({E, HV}, 0, s_in), alpha = draw({E, HV}, 0, s_in);
                const int r = HV / HK;
                auto ba_row = [&](int hv, bool is_alpha) { return (size_t)(2 * r * (hv / r) + (is_alpha ? r : 0) + hv % r); };
                std::vector<float> ba((size_t)E * (size_t)(2 * HV));
                for (int hv = 0; hv < HV; ++hv)
                    for (int e = 0; e < E; ++e) {
                        ba[ba_row(hv, false) * (size_t)E + (size_t)e] = beta[(size_t)hv * (size_t)E + (size_t)e];
                        ba[ba_row(hv, true) * (size_t)E + (size_t)e] = alpha[(size_t)hv * (size_t)E + (size_t)e];
                    }
                L.ssm_ba = store(b + "ssm_ba.weight", {E, 2 * HV}, ba, true, nullptr);
                L.ssm_beta.assign((size_t)E * (size_t)HV, 0.f);
                L.ssm_alpha.assign((size_t)E * (size_t)HV, 0.f);
                for (int hv = 0; hv < HV; ++hv)
                    for (int e = 0; e < E; ++e) {
                        L.ssm_beta[(size_t)hv * (size_t)E + (size_t)e] = L.ssm_ba[ba_row(hv, false) * (size_t)E + (size_t)e];
                        L.ssm_alpha[(size_t)hv * (size_t)E + (size_t)e] = L.ssm_ba[ba_row(hv, true) * (size_t)E + (size_t)e];
                    }
            }
            L.ssm_norm = add(b + "ssm_norm.weight", {DS}, 1.0, 0.2, false);
            L.ssm_out = add(b + "ssm_out.weight", {HV * DS, E}, 0, 1.0 / std::sqrt((double)(HV * DS)), true);
        } else {
            L.wq = add(b + "attn_q.weight", {E, 2 * H * HD}, 0, s_in, true);
            L.wk = add(b + "attn_k.weight", {E, HKV * HD}, 0, s_in, true);
            L.wv = add(b + "attn_v.weight", {E, HKV * HD}, 0, s_in, true);
            L.wo = add(b + "attn_output.weight", {H * HD, E}, 0, 1.0 / std::sqrt((double)(H * HD)), true);
            L.q_norm = add(b + "attn_q_norm.weight", {HD}, 1.0, 0.2, false);
            L.k_norm = add(b + "attn_k_norm.weight", {HD}, 1.0, 0.2, false);
        }
        L.ffn_norm = add(b + "post_attention_norm.weight", {E}, 1.0, 0.1, false);
        L.gate_inp = add(b + "ffn_gate_inp.weight", {E, NE}, 0, spec.router_scale * s_in, false);
        L.gate_exps = add_experts(b, "gate", {E, NF, NE}, s_in);
        L.up_exps = add_experts(b, "up", {E, NF, NE}, s_in);
        L.down_exps = add_experts(b, "down", {NF, E, NE}, 1.0 / std::sqrt((double)NF));
        L.gate_inp_shexp = add(b + "ffn_gate_inp_shexp.weight", {E}, 0, s_in, false);
        L.gate_shexp = add(b + "ffn_gate_shexp.weight", {E, NFS}, 0, s_in, true);
        L.up_shexp = add(b + "ffn_up_shexp.weight", {E, NFS}, 0, s_in, true);
        L.down_shexp = add(b + "ffn_down_shexp.weight", {NFS, E}, 0, 1.0 / std::sqrt((double)NFS), true);
    };

    const double emb_std = spec.tied ? 2.5 / std::sqrt((double)E) : 1.0;
    m.tok_embd = add("token_embd.weight", {E, V}, 0, emb_std, true);
    // lfm2moe: the final norm is named token_embd_norm (llama.cpp's "fix for wrong tensor name")
    m.output_norm = add(is_lfm ? "token_embd_norm.weight" : "output_norm.weight", {E}, 1.0, 0.1, false);
    if (!spec.tied) m.output = add("output.weight", {E, V}, 0, 2.5 / std::sqrt((double)E), true);

    m.layers.resize((size_t)spec.n_layer);
    for (int il = 0; il < spec.n_layer; ++il) {
        LayerWeights& L = m.layers[(size_t)il];
        const std::string b = "blk." + std::to_string(il) + ".";
        const double s_in = 1.0 / std::sqrt((double)E);
        if (is_oss || is_glm) {
            add_new_family_layer(L, il);
            continue;
        }
        if (is_ds2) {
            add_deepseek2_layer(L, il);
            continue;
        }
        if (is_lfm) {
            add_lfm2moe_layer(L, il);
            continue;
        }
        if (is_q35) {
            add_qwen35moe_layer(L, il);
            continue;
        }
        L.attn_norm = add(b + "attn_norm.weight", {E}, 1.0, 0.1, false);
        L.wq = add(b + "attn_q.weight", {E, H * HD}, 0, s_in, true);
        L.wk = add(b + "attn_k.weight", {E, HKV * HD}, 0, s_in, true);
        L.wv = add(b + "attn_v.weight", {E, HKV * HD}, 0, s_in, true);
        if (is_qwen2) {
            L.bq = add(b + "attn_q.bias", {H * HD}, 0, 0.3, false);
            L.bk = add(b + "attn_k.bias", {HKV * HD}, 0, 0.3, false);
            L.bv = add(b + "attn_v.bias", {HKV * HD}, 0, 0.3, false);
        }
        L.wo = add(b + "attn_output.weight", {H * HD, E}, 0, 1.0 / std::sqrt((double)(H * HD)), true);
        if (is_qwen3) {
            L.q_norm = add(b + "attn_q_norm.weight", {HD}, 1.0, 0.2, false);
            L.k_norm = add(b + "attn_k_norm.weight", {HD}, 1.0, 0.2, false);
        } else if (is_olmoe) {
            L.q_norm = add(b + "attn_q_norm.weight", {H * HD}, 1.0, 0.2, false);
            L.k_norm = add(b + "attn_k_norm.weight", {HKV * HD}, 1.0, 0.2, false);
        }
        L.ffn_norm = add(b + "ffn_norm.weight", {E}, 1.0, 0.1, false);
        if (m.moe) {
            L.gate_inp = add(b + "ffn_gate_inp.weight", {E, NE}, 0, spec.router_scale * s_in, false);
            L.gate_exps = add_experts(b, "gate", {E, NF, NE}, s_in);
            L.up_exps = add_experts(b, "up", {E, NF, NE}, s_in);
            L.down_exps = add_experts(b, "down", {NF, E, NE}, 1.0 / std::sqrt((double)NF));
            if (is_qwen2) {
                L.gate_inp_shexp = add(b + "ffn_gate_inp_shexp.weight", {E}, 0, s_in, false);
                L.gate_shexp = add(b + "ffn_gate_shexp.weight", {E, NFS}, 0, s_in, true);
                L.up_shexp = add(b + "ffn_up_shexp.weight", {E, NFS}, 0, s_in, true);
                L.down_shexp = add(b + "ffn_down_shexp.weight", {NFS, E}, 0, 1.0 / std::sqrt((double)NFS), true);
            }
        } else {
            L.ffn_gate = add(b + "ffn_gate.weight", {E, NF}, 0, s_in, true);
            L.ffn_up = add(b + "ffn_up.weight", {E, NF}, 0, s_in, true);
            L.ffn_down = add(b + "ffn_down.weight", {NF, E}, 0, 1.0 / std::sqrt((double)NF), true);
        }
    }
    // glm4moe and deepseek2 NextN/MTP blocks: a full MoE block plus the nextn.* tensors. llama.cpp's
    // trunk graph never runs them (n_layer = block_count - nextn_predict_layers), so neither does the oracle.
    if (is_glm || is_ds2) {
        for (int il = spec.n_layer; il < spec.n_layer + spec.n_nextn; ++il) {
            LayerWeights L;
            if (is_glm) add_new_family_layer(L, il);
            else add_deepseek2_layer(L, il);
            const std::string b = "blk." + std::to_string(il) + ".";
            add(b + "nextn.eh_proj.weight", {2 * E, E}, 0, 1.0 / std::sqrt(2.0 * E), true);
            add(b + "nextn.enorm.weight", {E}, 1.0, 0.1, false);
            add(b + "nextn.hnorm.weight", {E}, 1.0, 0.1, false);
            add(b + "nextn.shared_head_norm.weight", {E}, 1.0, 0.1, false);
        }
    }
    return m;
}

// Random token ids in [0, n_vocab), deterministic from the seed.
inline std::vector<int32_t> random_tokens(int n, int n_vocab, uint64_t seed) {
    detail_rm::Rng rng(seed ^ 0xA5A5A5A5DEADBEEFull);
    std::vector<int32_t> t((size_t)n);
    for (int32_t& x : t) x = (int32_t)rng.below((uint32_t)n_vocab);
    return t;
}

// A short human-readable description, for test messages.
inline std::string describe(const ModelSpec& s) {
    char buf[320];
    const bool ds2 = s.arch == "deepseek2";  // its head_dim is qk_nope + qk_rope; n_head_kv is not used
    std::snprintf(buf, sizeof buf, "%s%s %s V=%d E=%d L=%d H=%d/%d hd=%d X=%d/%d ff=%d%s%s seed=%llu",
                  s.arch.c_str(), s.dense ? "(dense)" : "", moe::tensor_type_name(s.wtype), s.n_vocab, s.n_embd,
                  s.n_layer, s.n_head, ds2 ? (s.kv_b_split ? 1 : s.n_head) : s.n_head_kv,
                  ds2 ? s.qk_nope + s.qk_rope : s.head_dim > 0 ? s.head_dim : s.n_embd / s.n_head, s.n_expert,
                  s.n_expert_used, s.n_ff, s.n_ff_shared ? (" shff=" + std::to_string(s.n_ff_shared)).c_str() : "",
                  s.tied ? " tied" : "", (unsigned long long)s.seed);
    std::string out = buf;
    if (s.arch == "deepseek2") {
        char more[400];
        std::snprintf(more, sizeof more, " qlora=%d kvlora=%d nope=%d rope=%d v=%d %s dense=%d/ff%d shared=%d gating=%d norm=%d scale=%g groups=%d/%d nextn=%d",
                      s.q_lora_rank, s.kv_lora_rank, s.qk_nope, s.qk_rope, s.v_head_dim, s.kv_b_split ? "k_b/v_b" : "kv_b", s.n_dense_lead,
                      s.n_ff_dense, s.n_expert_shared, s.gating_func, (int)s.expert_weights_norm, (double)s.expert_weights_scale,
                      s.n_expert_groups, s.n_group_used, s.n_nextn);
        out += more;
        if (!s.rope_scaling.empty()) {
            std::snprintf(more, sizeof more, " %s(x%g orig=%d logmul=%g)", s.rope_scaling.c_str(), (double)s.rope_factor, s.rope_orig_ctx,
                          (double)s.yarn_log_mul);
            out += more;
        }
    }
    if (s.arch == "lfm2moe") {
        std::string kinds;
        for (int il = 0; il < s.n_layer; ++il)
            kinds += (s.conv_layers.empty() ? il % 3 != 2 : s.conv_layers[(size_t)il] != 0) ? 'C' : 'A';
        char more[160];
        std::snprintf(more, sizeof more, " layers=%s L_cache=%d dense=%d/ff%d gating=%d%s", kinds.c_str(), s.l_cache, s.n_dense_lead,
                      s.n_ff_dense, s.gating_func, s.expert_weights_scale != 0.f ? " scale-key(ignored)" : "");
        out += more;
    }
    if (s.arch == "qwen35moe" || s.arch == "qwen3next") {
        std::string kinds;
        for (int il = 0; il < s.n_layer; ++il)
            kinds += (s.recr_layers.empty() ? (il + 1) % std::max(1, s.full_attn_interval) != 0 : s.recr_layers[(size_t)il] != 0) ? 'D' : 'A';
        std::string sect = s.arch == "qwen3next" ? "none" : "auto";
        if (s.rope_sections.size() == 4 && s.arch != "qwen3next")
            sect = std::to_string(s.rope_sections[0]) + "/" + std::to_string(s.rope_sections[1]) + "/" + std::to_string(s.rope_sections[2]) + "/" +
                   std::to_string(s.rope_sections[3]);
        char more[200];
        std::snprintf(more, sizeof more, " layers=%s%s rot=%d sections=%s conv=%d state=%d qk_heads=%d v_heads=%d", kinds.c_str(),
                      s.recr_layers.empty() ? "" : "(array)", s.n_rot, sect.c_str(), s.ssm_conv, s.ssm_state, s.ssm_group, s.ssm_dt_rank);
        out += more;
    }
    if (s.arch == "gpt-oss" || s.arch == "glm4moe") {
        char more[320];
        if (s.arch == "gpt-oss")
            std::snprintf(more, sizeof more, " swa=%d pattern=%d%s", s.n_swa, s.swa_pattern, s.swa_layers.empty() ? "" : "(array)");
        else
            std::snprintf(more, sizeof more, " rot=%d dense=%d/ff%d shared=%d gating=%d norm=%d scale=%g%s nextn=%d",
                          s.n_rot, s.n_dense_lead, s.n_ff_dense, s.n_expert_shared, s.gating_func, (int)s.expert_weights_norm,
                          (double)s.expert_weights_scale, s.qk_norm ? " qknorm" : "", s.n_nextn);
        out += more;
        if (!s.qkv_bias) out += " no-qkv-bias";
        if (!s.rope_scaling.empty()) {
            std::snprintf(more, sizeof more, " %s(x%g orig=%d)", s.rope_scaling.c_str(), (double)s.rope_factor, s.rope_orig_ctx);
            out += more;
        }
    }
    return out;
}

}  // namespace moe_test

#endif  // MOE_TEST_RANDOM_MODEL_H
