// oracle.h - a naive float64 forward pass of the models random_model.h builds.
//
// Written from the architecture definitions (design.md, formats.md 1.5/1.6), not from the engine:
// obvious loops, double precision everywhere, no caching tricks beyond keeping K and V of earlier
// positions. Slow and meant to stay that way; it is the reference the engine is tested against.
//
//   embedding -> per layer: x += attn(rmsnorm(x)); x += ffn(rmsnorm(x)) -> rmsnorm -> output
//   attn: q/k/v projections (+bias), QK-norm (qwen3moe per head; olmoe over the whole projection),
//         RoPE (NEOX pairs (i, i+n_rot/2) or NORM pairs (2i, 2i+1); theta_i = pos*base^(-2i/n_rot)),
//         causal GQA softmax(q.k / sqrt(head_dim)) v, output projection
//   ffn:  router logits -> softmax over all experts -> top-k (ties: lower index) -> weights
//         (renormalised for qwen3moe and llama) -> sum_k w_k down_k(silu(gate_k x) * up_k x);
//         qwen2moe adds sigmoid(w_sh . x) * down_sh(silu(gate_sh x) * up_sh x); dense llama is one
//         SwiGLU FFN.
//
// gpt-oss and glm4moe, as llama.cpp 0.5.0 computes them (src/models/openai-moe.cpp, glm4-moe.cpp,
// llama-graph.cpp build_moe_ffn / build_attn, ggml-cpu ops.cpp rope / soft_max / swiglu_oai):
//   x += attn(rmsnorm(x)) (+ attn_output.bias); x += moe(rmsnorm_post_attention(x))
//   RoPE: NEOX pairs (i, i + n_rot/2) for i < n_rot/2, the dims past n_rot unrotated (glm4moe:
//         n_rot = rope.dimension_count < head_dim). theta_extrap = pos * base^(-2i/n_rot).
//         YaRN (rope.scaling.type = yarn, factor f, original context n_orig, beta_fast 32, beta_slow
//         1, ext_factor 1): theta = theta_extrap * (f^-1 (1 - mix) + mix), mix = ramp(i) =
//         1 - clamp((i - lo) / max(0.001, hi - lo), 0, 1), lo = max(0, floor(d(32))), hi =
//         min(n_rot - 1, ceil(d(1))), d(b) = n_rot ln(n_orig / (2 pi b)) / (2 ln base); cos and sin
//         are scaled by mscale = attn_factor * (1 + 0.1 ln f). llama.cpp passes attn_factor =
//         rope.scaling.attn_factor (default 1) times get_mscale(f) / (1 + 0.1 ln f) = 1, so the net
//         mscale is (1 + 0.1 ln f) * rope.scaling.attn_factor, on q and on k.
//   gpt-oss attention: scale 1/sqrt(head_dim); SWA layers mask key j for query p when p - j >=
//         n_swa; softmax denominators get one extra term exp(sink_h) per head (the sink's logit is
//         not scaled and carries no value).
//   gpt-oss MoE: logits = W x + b; top-k of the logits; weights = softmax over the k selected
//         logits; expert = down(swiglu_oai(gate x + bg, up x + bu)) + bd with swiglu_oai(g, u) =
//         min(g,7) sigmoid(1.702 min(g,7)) (clamp(u,-7,7) + 1).
//   glm4moe MoE: p = sigmoid(logits) (softmax when expert_gating_func = 1); top-k of p + exp_probs_b;
//         weights = p of the chosen (renormalised if expert_weights_norm; times expert_weights_scale),
//         plus one ungated SwiGLU shared expert; the first leading_dense_block_count layers have a
//         dense SwiGLU FFN instead. NextN blocks are not run.
//
// deepseek2 as llama.cpp computes it (src/models/deepseek2.cpp, llama-context.cpp YaRN attn_factor):
//   x += wo attn(rmsnorm(x)); x += moe(rmsnorm_ffn_norm(x)), multi-head latent attention done the
//   plain (non-absorbed) way, which is the same math as llama.cpp's absorbed attn_k_b / attn_v_b path:
//   q = attn_q h, or attn_q_b rmsnorm_{q_a_norm}(attn_q_a h); per head q = [q_nope, q_rope].
//   attn_kv_a_mqa h = [latent (kv_lora), k_rope (qk_rope)]; latent -> rmsnorm_{kv_a_norm} -> kv_b ->
//   per head [k_nope, v]; k = [k_nope, k_rope] with the one k_rope shared by every head.
//   RoPE: NORM pairs (2i, 2i+1) on the trailing qk_rope dims of q (and on k_rope), theta as above
//   with n_rot = qk_rope, YaRN the same way. With L = rope.scaling.yarn_log_multiplier / 0.1 (the
//   file holds 0.1 * mscale_all_dim) and f the YaRN factor, llama.cpp's context attn_factor is
//   A / (1 + 0.1 ln f) when L != 0 (deepseek2 special case: get_mscale(f, L) / get_mscale(f, L) = 1)
//   and A otherwise (A = rope.scaling.attn_factor, default 1), so cos/sin carry mscale A (L != 0)
//   or A (1 + 0.1 ln f) (L = 0), as for the other YaRN models. The attention scale is
//   kq_scale = m^2 / sqrt(qk_nope + qk_rope), m = attn_factor_ctx (1 + 0.1 ln f) (1 + 0.1 L ln f)
//   (without YaRN: m = A). score = kq_scale q.k over [nope, rope]; softmax; v; wo.
//   MoE: p = softmax(logits) (sigmoid when expert_gating_func = 2); selection score = p (+ exp_probs_b);
//   grouped top-k when expert_group_count G > 1: group score = sum of the 2 largest selection scores
//   in each group of n_expert / G consecutive experts, the expert_group_used_count best groups are
//   kept and the other experts' scores set to -inf; then top-k; weights = p (renormalised if
//   expert_weights_norm, times expert_weights_scale); plus the ungated shared SwiGLU expert; the first
//   leading_dense_block_count layers are dense. NextN blocks are not run.
//
// lfm2moe, as llama.cpp computes it (src/models/lfm2.cpp, whose graph lfm2moe.cpp reuses; ggml-cpu
// ops.cpp ssm_conv; llama-graph.cpp build_moe_ffn):
//   x += mixer(rmsnorm_attn_norm(x)); x += ffn(rmsnorm_ffn_norm(x)); rmsnorm_token_embd_norm; output
//   mixer of a short-convolution layer (head_count_kv[il] == 0), per channel c (depthwise):
//         [B; C; X] = in_proj h (three n_embd chunks in that order); u_t = B_t * X_t;
//         conv_t = sum_{k < L} w[c][k] * u_{t - (L-1) + k} (tap L-1 is the current token; u before
//         position 0 is 0); y = out_proj (C_t * conv_t). The state carried between calls is
//         u_{t-L+2} .. u_t, the last L-1 *products* B*X (not the raw inputs).
//   mixer of an attention layer: q/k/v (no biases), RMSNorm of each q and k head over head_dim
//         (attn_q_norm / attn_k_norm), NEOX RoPE over the whole head, causal GQA softmax(q.k /
//         sqrt(head_dim)) v, attn_output.
//   ffn: dense SwiGLU for il < leading_dense_block_count, else MoE: p = sigmoid(logits) (softmax
//         when expert_gating_func = 1); top-k of p + exp_probs_b; weights = p of the chosen,
//         always renormalised (sum clamped at 6.1e-5), never scaled (llama.cpp does not read
//         expert_weights_scale for lfm2moe). No shared expert.
//
// qwen35moe, as llama.cpp computes it (src/models/qwen35moe.cpp, delta-net-base.cpp, models.h
// build_gdn_l2_norm; ggml-cpu ops.cpp ssm_conv, gated_delta_net, rope (IMROPE); llama-graph.cpp
// build_moe_ffn):
//   x += mixer(rmsnorm_attn_norm(x)); x += ffn(rmsnorm_post_attention_norm(x)); rmsnorm_output_norm;
//   output. Delta-net layer (HK q/k heads, HV v heads, head dim DS, conv kernel KC):
//     qkv = attn_qkv h (q: HK DS, k: HK DS, v: HV DS channels, in that order); z = attn_gate h;
//     beta_h = sigmoid(ssm_beta h); g_h = softplus(ssm_alpha h + ssm_dt) * ssm_a (ssm_a = -exp(A_log);
//     softplus(x) = x for x > 20, else log(1 + e^x));
//     conv: c_t = silu(sum_{k < KC} w[c][k] u_{t-(KC-1)+k}) per channel, u = the *raw* qkv (u before
//     position 0 is 0); the state carried is the last KC-1 raw qkv vectors;
//     q, k of each head l2-normalised: x / sqrt(sum x^2 + rms_eps);
//     v head h reads q/k head h % HK (the converter stores v heads tiled);
//     per v head, S (DS x DS, S[i][j], zero at position 0): S *= exp(g_h); d_j = beta_h (v_j -
//     sum_i S[i][j] k_i); S[i][j] += k_i d_j; o_j = sum_i S[i][j] q_i / sqrt(DS);
//     o of each head RMS-normed over DS with ssm_norm (rms_eps), times silu(z); y = ssm_out o.
//   Full-attention layer: attn_q h = per head [q (hd), gate (hd)]; q, k RMS-normed per head
//     (attn_q_norm / attn_k_norm); IMROPE on the first n_rot dims, NEOX pairs (i, i + n_rot/2):
//     pair i has sector s = i mod (s0+s1+s2+s3) and rotates by pos * base^(-2i/n_rot) when
//     (s%3 == 0 && s < 3 s0) || (s%3 == 1 && s < 3 s1) || (s%3 == 2 && s < 3 s2), else by 0 (text
//     tokens: the t/h/w positions are pos, the 4th is 0); causal GQA softmax(q.k / sqrt(hd)) v;
//     times sigmoid(gate); attn_output.
//   ffn: p = softmax(router logits); top-k; weights p renormalised over the k (never scaled: llama.cpp
//     does not read expert_weights_scale for qwen35moe); plus sigmoid(ffn_gate_inp_shexp . h) times
//     the shared SwiGLU expert.
//
// qwen3next (Qwen3-Next-80B-A3B), as llama.cpp computes it (src/models/qwen3next.cpp,
// delta-net-base.cpp; llama-model.cpp llama_model_rope_type): the qwen35moe pass above (same
// residual/norm layout, graph() lines 138-223; same conv, l2 norm and delta rule, lines 458-543
// and build_recurrent_attn; same gated attention, [q, gate] per head of attn_q and q/k norm,
// build_layer_attn lines 236-312; same gated RMSNorm with silu(z) and ssm_out, lines 545-560; same
// softmax MoE and sigmoid-gated shared expert, build_layer_ffn lines 565-625), except:
//   - beta and alpha come from one projection ba = ssm_ba h (2 HV rows; lines 418-446): reshaped to
//     [2r, HK] (r = HV/HK), the first r of each q/k head's 2r values are beta, the last r alpha,
//     then flattened k-head-major: beta_h = sigmoid(ba[2r (h/r) + h%r]), alpha_h = ba[2r (h/r) + r +
//     h%r]. random_model.h unpacks these rows into ssm_beta / ssm_alpha, so the code is shared.
//   - v head h reads q/k head h / r (grouped): q and k are repeat-interleaved to HV heads (reshape to
//     [DS, 1, HK], ggml_repeat_4d to [DS, r, HK], reshape to [DS, HV]; lines 517-537).
//   - full-attention RoPE is ggml_rope_ext (lines 278-287) with LLAMA_ROPE_TYPE_NEOX (llama-model.cpp
//     line 3043): NEOX pairs (i, i + n_rot/2) for i < n_rot/2 rotate by pos * base^(-2i/n_rot), the
//     dims past n_rot = rope.dimension_count are not rotated; no sections (load_arch_hparams, lines
//     4-28, reads none). The shared rope() helper below.
//   - load_arch_tensors (lines 31-130) requires n_expert > 0; every layer is MoE.
#ifndef MOE_TEST_ORACLE_H
#define MOE_TEST_ORACLE_H

#include "random_model.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <vector>

namespace moe_test {

struct OracleResult {
    int n_tokens = 0, n_vocab = 0;
    std::vector<double> logits;         // n_tokens x n_vocab; row i = logits after token i
    // Per-layer vectors below are indexed [pos][layer]; a dense layer of a MoE model (glm4moe's
    // leading layers) holds -1 / NaN placeholders.
    std::vector<double> route_margin;   // per position: smallest (k-th - (k+1)-th) selection score over layers
    std::vector<int> experts;           // per position, per layer: the chosen experts (n_expert_used each)
    std::vector<double> router_logits;  // per position, per layer: n_expert router logits (+ router bias)
    // per position, per layer: the n_expert scores the top-k is taken on: the router logits, except
    // with sigmoid gating or a selection bias (glm4moe), and always for deepseek2: gating(logit) +
    // exp_probs_b, with -inf for the experts of groups not kept (grouped top-k). route_margin is a
    // margin on these (and on the group scores).
    std::vector<double> route_scores;
    // per position, per layer: n_embd values, the residual stream after attention plus the shared
    // expert's gated output where the layer has one (what expert prediction sees). Not for
    // lfm2moe, qwen35moe or qwen3next.
    std::vector<double> lookahead_input;
    std::vector<double> attention_residual;  // the same without the shared expert's output
    const double* row(int i) const { return logits.data() + (size_t)i * (size_t)n_vocab; }
};

class Oracle {
public:
    explicit Oracle(const RandomModel& m) : m_(m) {}

    // Runs `tokens` as one sequence starting at position 0 and returns the logits of every position.
    // `forced_experts` (optional; per position, per layer, n_expert_used ids in any order) replaces
    // the top-k selection: the weights are still this oracle's gating of those experts (softmax or
    // sigmoid probabilities, renormalised over them where the architecture does; gpt-oss: softmax over
    // their logits). Entries for dense layers are ignored. Used to follow an engine through
    // a near-tie it legitimately resolved the other way; the caller checks the choices were near-ties.
    OracleResult run(const std::vector<int32_t>& tokens, const std::vector<int32_t>* forced_experts = nullptr) const {
        if (m_.spec.arch == "lfm2moe") return run_lfm2moe(tokens, forced_experts);
        if (m_.spec.arch == "qwen35moe" || m_.spec.arch == "qwen3next") return run_qwen35moe(tokens, forced_experts);
        const ModelSpec& s = m_.spec;
        const int E = s.n_embd, H = s.n_head, HKV = s.n_head_kv, HD = m_.head_dim, V = s.n_vocab;
        const int T = (int)tokens.size();
        const bool is_ds2 = s.arch == "deepseek2";
        OracleResult r;
        r.n_tokens = T;
        r.n_vocab = V;
        r.logits.assign((size_t)T * (size_t)V, 0.0);
        r.route_margin.assign((size_t)T, std::numeric_limits<double>::infinity());
        // K and V of every layer and position: [layer][pos][n_head_kv * hd]
        std::vector<std::vector<std::vector<double>>> kcache((size_t)s.n_layer), vcache((size_t)s.n_layer);

        for (int pos = 0; pos < T; ++pos) {
            // embedding lookup: column `token` of token_embd {n_embd, n_vocab}
            std::vector<double> x((size_t)E);
            for (int i = 0; i < E; ++i) x[(size_t)i] = m_.tok_embd[(size_t)tokens[(size_t)pos] * (size_t)E + (size_t)i];

            for (int il = 0; il < s.n_layer; ++il) {
                const LayerWeights& L = m_.layers[(size_t)il];

                // ---- attention ----
                std::vector<double> h = rms_norm(x, L.attn_norm, s.rms_eps);
                if (is_ds2) {
                    const std::vector<double> o = mla_attention(L, h, pos, il, kcache[(size_t)il], vcache[(size_t)il]);
                    for (int i = 0; i < E; ++i) x[(size_t)i] += o[(size_t)i];
                } else {
                    std::vector<double> q = matvec(L.wq, h, E, H * HD);
                    std::vector<double> k = matvec(L.wk, h, E, HKV * HD);
                    std::vector<double> v = matvec(L.wv, h, E, HKV * HD);
                    if (!L.bq.empty()) {
                        for (int i = 0; i < H * HD; ++i) q[(size_t)i] += L.bq[(size_t)i];
                        for (int i = 0; i < HKV * HD; ++i) k[(size_t)i] += L.bk[(size_t)i];
                        for (int i = 0; i < HKV * HD; ++i) v[(size_t)i] += L.bv[(size_t)i];
                    }
                    if (s.arch == "qwen3moe" || (s.arch == "glm4moe" && !L.q_norm.empty())) {  // RMSNorm of each head over head_dim
                        for (int hh = 0; hh < H; ++hh) rms_norm_inplace(&q[(size_t)hh * HD], HD, L.q_norm.data(), s.rms_eps);
                        for (int hh = 0; hh < HKV; ++hh) rms_norm_inplace(&k[(size_t)hh * HD], HD, L.k_norm.data(), s.rms_eps);
                    } else if (s.arch == "olmoe") {  // RMSNorm over the whole projection
                        rms_norm_inplace(q.data(), H * HD, L.q_norm.data(), s.rms_eps);
                        rms_norm_inplace(k.data(), HKV * HD, L.k_norm.data(), s.rms_eps);
                    }
                    for (int hh = 0; hh < H; ++hh) rope(&q[(size_t)hh * HD], pos, il);
                    for (int hh = 0; hh < HKV; ++hh) rope(&k[(size_t)hh * HD], pos, il);
                    kcache[(size_t)il].push_back(k);
                    vcache[(size_t)il].push_back(v);

                    std::vector<double> attn((size_t)(H * HD), 0.0);
                    const int group = H / HKV;  // consecutive query heads share one K/V head
                    const double scale = 1.0 / std::sqrt((double)HD);
                    // sliding window: keys j with pos - j < n_swa, i.e. the last n_swa positions
                    const int j0 = m_.swa[(size_t)il] ? std::max(0, pos - s.n_swa + 1) : 0;
                    for (int hh = 0; hh < H; ++hh) {
                        const int kvh = hh / group;
                        std::vector<double> score((size_t)(pos + 1));
                        double mx = -std::numeric_limits<double>::infinity();
                        for (int j = j0; j <= pos; ++j) {
                            double d = 0;
                            for (int c = 0; c < HD; ++c)
                                d += q[(size_t)(hh * HD + c)] * kcache[(size_t)il][(size_t)j][(size_t)(kvh * HD + c)];
                            score[(size_t)j] = d * scale;
                            mx = std::max(mx, score[(size_t)j]);
                        }
                        const bool sink = !L.attn_sinks.empty();  // one more logit in the denominator only
                        if (sink) mx = std::max(mx, (double)L.attn_sinks[(size_t)hh]);
                        double sum = sink ? std::exp((double)L.attn_sinks[(size_t)hh] - mx) : 0.0;
                        for (int j = j0; j <= pos; ++j) { score[(size_t)j] = std::exp(score[(size_t)j] - mx); sum += score[(size_t)j]; }
                        for (int j = j0; j <= pos; ++j)
                            for (int c = 0; c < HD; ++c)
                                attn[(size_t)(hh * HD + c)] += score[(size_t)j] / sum * vcache[(size_t)il][(size_t)j][(size_t)(kvh * HD + c)];
                    }
                    std::vector<double> o = matvec(L.wo, attn, H * HD, E);
                    if (!L.bo.empty())
                        for (int i = 0; i < E; ++i) o[(size_t)i] += L.bo[(size_t)i];
                    for (int i = 0; i < E; ++i) x[(size_t)i] += o[(size_t)i];
                }

                // ---- feed-forward ----
                h = rms_norm(x, L.ffn_norm, s.rms_eps);
                std::vector<double> y((size_t)E, 0.0);
                if (L.gate_inp.empty()) {  // dense FFN (dense llama, glm4moe's leading layers)
                    y = swiglu(L.ffn_gate.data(), L.ffn_up.data(), L.ffn_down.data(), h, E, m_.n_ff_dense);
                    if (m_.moe) {  // a dense layer of a MoE model: placeholders keep the per-layer layout
                        r.experts.insert(r.experts.end(), (size_t)s.n_expert_used, -1);
                        r.router_logits.insert(r.router_logits.end(), (size_t)s.n_expert, std::numeric_limits<double>::quiet_NaN());
                        r.route_scores.insert(r.route_scores.end(), (size_t)s.n_expert, std::numeric_limits<double>::quiet_NaN());
                        r.lookahead_input.insert(r.lookahead_input.end(), (size_t)E, std::numeric_limits<double>::quiet_NaN());
                        r.attention_residual.insert(r.attention_residual.end(), (size_t)E, std::numeric_limits<double>::quiet_NaN());
                    }
                } else {
                    using Gating = RandomModel::Gating;
                    std::vector<double> lookahead = x;
                    r.attention_residual.insert(r.attention_residual.end(), x.begin(), x.end());
                    const int NE = s.n_expert, K = s.n_expert_used;
                    std::vector<double> logit = matvec(L.gate_inp, h, E, NE);
                    if (!L.gate_inp_b.empty())
                        for (int e = 0; e < NE; ++e) logit[(size_t)e] += L.gate_inp_b[(size_t)e];
                    // prob: the weight an expert gets if chosen (before renormalisation); score: what
                    // the top-k is taken on
                    std::vector<double> prob((size_t)NE), score = logit;
                    if (m_.gating == Gating::softmax) {
                        double mx = -std::numeric_limits<double>::infinity();
                        for (double l : logit) mx = std::max(mx, l);
                        double sum = 0;
                        for (int e = 0; e < NE; ++e) { prob[(size_t)e] = std::exp(logit[(size_t)e] - mx); sum += prob[(size_t)e]; }
                        for (double& p : prob) p /= sum;
                    } else if (m_.gating == Gating::sigmoid) {
                        for (int e = 0; e < NE; ++e) prob[(size_t)e] = 1.0 / (1.0 + std::exp(-logit[(size_t)e]));
                    }
                    // softmax without a selection bias: the logits (same order as prob; the margin stays
                    // in logit units as before); with exp_probs_b: prob + bias (llama.cpp adds it to the
                    // gating output, not to the logits)
                    if (m_.gating == Gating::sigmoid || !L.exp_probs_b.empty() || is_ds2) {
                        score = prob;
                        for (int e = 0; e < (int)L.exp_probs_b.size(); ++e) score[(size_t)e] += L.exp_probs_b[(size_t)e];
                    }
                    if (m_.n_expert_groups > 1) {  // grouped top-k (deepseek2): keep the best groups, mask the others
                        const int G = m_.n_expert_groups, per = NE / G;
                        std::vector<double> gscore((size_t)G);
                        for (int g = 0; g < G; ++g) {
                            std::vector<double> in(score.begin() + (ptrdiff_t)g * per, score.begin() + (ptrdiff_t)(g + 1) * per);
                            std::sort(in.begin(), in.end(), std::greater<double>());
                            gscore[(size_t)g] = 0;
                            for (int i = 0; i < std::min(m_.group_score_top, per); ++i) gscore[(size_t)g] += in[(size_t)i];
                        }
                        std::vector<int> gorder((size_t)G);
                        for (int g = 0; g < G; ++g) gorder[(size_t)g] = g;
                        std::stable_sort(gorder.begin(), gorder.end(), [&](int a, int b) { return gscore[(size_t)a] > gscore[(size_t)b]; });
                        const int GU = m_.n_group_used;
                        r.route_margin[(size_t)pos] = std::min(r.route_margin[(size_t)pos],
                                                               gscore[(size_t)gorder[(size_t)GU - 1]] - gscore[(size_t)gorder[(size_t)GU]]);
                        for (int gi = GU; gi < G; ++gi)
                            for (int e = gorder[(size_t)gi] * per; e < (gorder[(size_t)gi] + 1) * per; ++e)
                                score[(size_t)e] = -std::numeric_limits<double>::infinity();
                    }
                    // top-k by score, ties to the lower index
                    std::vector<int> order((size_t)NE);
                    for (int e = 0; e < NE; ++e) order[(size_t)e] = e;
                    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[(size_t)a] > score[(size_t)b]; });
                    r.router_logits.insert(r.router_logits.end(), logit.begin(), logit.end());
                    r.route_scores.insert(r.route_scores.end(), score.begin(), score.end());
                    if (K < NE)  // how close the top-k boundary is to a tie
                        r.route_margin[(size_t)pos] = std::min(r.route_margin[(size_t)pos],
                                                               score[(size_t)order[(size_t)K - 1]] - score[(size_t)order[(size_t)K]]);
                    if (forced_experts) {  // the given experts first, in the order given
                        const size_t base = ((size_t)pos * (size_t)s.n_layer + (size_t)il) * (size_t)K;
                        std::vector<int> forced;
                        for (int i = 0; i < K; ++i) forced.push_back((int)(*forced_experts)[base + (size_t)i]);
                        for (int e = 0; e < NE; ++e)
                            if (std::find(forced.begin(), forced.end(), e) == forced.end()) forced.push_back(e);
                        order = forced;
                    }
                    if (m_.gating == Gating::softmax_weight) {  // softmax over the k selected logits
                        double mx = -std::numeric_limits<double>::infinity();
                        for (int i = 0; i < K; ++i) mx = std::max(mx, logit[(size_t)order[(size_t)i]]);
                        double sum = 0;
                        for (int i = 0; i < K; ++i) sum += std::exp(logit[(size_t)order[(size_t)i]] - mx);
                        for (int i = 0; i < K; ++i) {
                            const int e = order[(size_t)i];
                            prob[(size_t)e] = std::exp(logit[(size_t)e] - mx) / sum;
                        }
                    }
                    double wsum = 0;
                    for (int i = 0; i < K; ++i) wsum += prob[(size_t)order[(size_t)i]];
                    wsum = std::max(wsum, 6.103515625e-5);  // llama.cpp clamps the sum (a no-op for softmax)
                    for (int i = 0; i < K; ++i) {
                        const int e = order[(size_t)i];
                        r.experts.push_back(e);
                        const double wgt = (m_.norm_topk ? prob[(size_t)e] / wsum : prob[(size_t)e]) * m_.expert_scale;
                        const size_t up_off = (size_t)e * (size_t)s.n_ff * (size_t)E;
                        const size_t down_off = (size_t)e * (size_t)E * (size_t)s.n_ff;
                        std::vector<double> ye;
                        if (L.gate_exps_b.empty()) {
                            ye = swiglu(L.gate_exps.data() + up_off, L.up_exps.data() + up_off, L.down_exps.data() + down_off, h, E,
                                        s.n_ff);
                        } else {  // gpt-oss
                            ye = swiglu_oai_biased(L, e, h, E, s.n_ff);
                        }
                        for (int c = 0; c < E; ++c) y[(size_t)c] += wgt * ye[(size_t)c];
                    }
                    if (!L.gate_shexp.empty()) {  // shared expert: qwen2moe's with its sigmoid gate, glm4moe's ungated
                        double g = 1.0;
                        if (!L.gate_inp_shexp.empty()) {
                            g = 0;
                            for (int c = 0; c < E; ++c) g += (double)L.gate_inp_shexp[(size_t)c] * h[(size_t)c];
                            g = 1.0 / (1.0 + std::exp(-g));
                        }
                        std::vector<double> ys = swiglu(L.gate_shexp.data(), L.up_shexp.data(), L.down_shexp.data(), h, E,
                                                        m_.n_ff_shared);
                        for (int c = 0; c < E; ++c) y[(size_t)c] += g * ys[(size_t)c];
                        for (int c = 0; c < E; ++c) lookahead[(size_t)c] += g * ys[(size_t)c];
                    }
                    r.lookahead_input.insert(r.lookahead_input.end(), lookahead.begin(), lookahead.end());
                }
                for (int i = 0; i < E; ++i) x[(size_t)i] += y[(size_t)i];
            }

            std::vector<double> h = rms_norm(x, m_.output_norm, s.rms_eps);
            std::vector<double> lg = matvec(m_.logits_matrix(), h, E, V);
            std::copy(lg.begin(), lg.end(), r.logits.begin() + (ptrdiff_t)pos * V);
        }
        return r;
    }

    // Ablation switch for the lfm2moe short convolution (tests only): B multiplies after the conv,
    // so the conv and its state run on the raw X (y = C * B * conv(X)) instead of on B * X.
    bool lfm_gate_after_conv = false;

    // Ablation switches for qwen35moe and qwen3next (tests only): each one changes one convention of
    // the forward pass (see the top of the file for the real ones).
    struct Qwen35Ablation {
        bool no_conv_silu = false;       // the conv output is used without silu
        bool heads_grouped = false;      // qwen35moe: v head h reads q/k head h / (HV/HK) instead of h % HK
        bool heads_tiled = false;        // qwen3next: v head h reads q/k head h % HK instead of h / (HV/HK)
        bool no_l2norm = false;          // q and k of the delta net are not l2-normalised
        bool decay_after_update = false; // S *= exp(g) after the delta-rule update instead of before
        bool beta_one = false;           // beta = 1
        bool no_z_gate = false;          // the gated RMSNorm without silu(z)
        bool rope_all_pairs = false;     // qwen35moe: plain NEOX partial rotary: every pair rotates (sections ignored)
        bool rope_norm_pairs = false;    // qwen35moe: pairs (2i, 2i+1) instead of (i, i + n_rot/2)
                                         // (qwen3next uses rope(): set RandomModel::rope_neox / n_rot instead)
        bool gate_before_q = false;      // attn_q per head [gate, q] instead of [q, gate]
        bool no_attn_gate = false;       // the attention output is not multiplied by sigmoid(gate)
    };
    Qwen35Ablation q35;

private:
    // lfm2moe: the whole forward pass (see the top of the file).
    OracleResult run_lfm2moe(const std::vector<int32_t>& tokens, const std::vector<int32_t>* forced_experts) const {
        const ModelSpec& s = m_.spec;
        const int E = s.n_embd, V = s.n_vocab, LC = s.l_cache;
        const int T = (int)tokens.size();
        OracleResult r;
        r.n_tokens = T;
        r.n_vocab = V;
        r.logits.assign((size_t)T * (size_t)V, 0.0);
        r.route_margin.assign((size_t)T, std::numeric_limits<double>::infinity());
        std::vector<std::vector<std::vector<double>>> kcache((size_t)s.n_layer), vcache((size_t)s.n_layer);
        // conv state of each layer: the conv inputs of the last LC-1 positions, oldest first,
        // [k * n_embd + c]; zeros before position 0
        std::vector<std::vector<double>> conv_state((size_t)s.n_layer, std::vector<double>((size_t)(LC - 1) * (size_t)E, 0.0));

        for (int pos = 0; pos < T; ++pos) {
            std::vector<double> x((size_t)E);
            for (int i = 0; i < E; ++i) x[(size_t)i] = m_.tok_embd[(size_t)tokens[(size_t)pos] * (size_t)E + (size_t)i];
            for (int il = 0; il < s.n_layer; ++il) {
                const LayerWeights& L = m_.layers[(size_t)il];
                std::vector<double> h = rms_norm(x, L.attn_norm, s.rms_eps);
                const std::vector<double> o = m_.shortconv[(size_t)il] ? lfm_shortconv(L, h, &conv_state[(size_t)il])
                                                                      : lfm_attention(L, h, pos, il, &kcache[(size_t)il], &vcache[(size_t)il]);
                for (int i = 0; i < E; ++i) x[(size_t)i] += o[(size_t)i];
                h = rms_norm(x, L.ffn_norm, s.rms_eps);
                std::vector<double> y;
                if (L.gate_inp.empty()) {  // a leading dense layer: placeholders keep the per-layer layout
                    y = swiglu(L.ffn_gate.data(), L.ffn_up.data(), L.ffn_down.data(), h, E, m_.n_ff_dense);
                    r.experts.insert(r.experts.end(), (size_t)s.n_expert_used, -1);
                    r.router_logits.insert(r.router_logits.end(), (size_t)s.n_expert, std::numeric_limits<double>::quiet_NaN());
                    r.route_scores.insert(r.route_scores.end(), (size_t)s.n_expert, std::numeric_limits<double>::quiet_NaN());
                } else {
                    y = lfm_moe(L, h, pos, il, forced_experts, &r);
                }
                for (int i = 0; i < E; ++i) x[(size_t)i] += y[(size_t)i];
            }
            std::vector<double> h = rms_norm(x, m_.output_norm, s.rms_eps);
            std::vector<double> lg = matvec(m_.logits_matrix(), h, E, V);
            std::copy(lg.begin(), lg.end(), r.logits.begin() + (ptrdiff_t)pos * V);
        }
        return r;
    }

    // qwen35moe and qwen3next: the whole forward pass (see the top of the file).
    OracleResult run_qwen35moe(const std::vector<int32_t>& tokens, const std::vector<int32_t>* forced_experts) const {
        const ModelSpec& s = m_.spec;
        const int E = s.n_embd, V = s.n_vocab, NE = s.n_expert, K = s.n_expert_used;
        const int T = (int)tokens.size();
        const int DS = s.ssm_state, CH = 2 * s.ssm_group * DS + s.ssm_dt_rank * DS;
        OracleResult r;
        r.n_tokens = T;
        r.n_vocab = V;
        r.logits.assign((size_t)T * (size_t)V, 0.0);
        r.route_margin.assign((size_t)T, std::numeric_limits<double>::infinity());
        std::vector<std::vector<std::vector<double>>> kcache((size_t)s.n_layer), vcache((size_t)s.n_layer);
        // per delta-net layer: the raw qkv of the last KC-1 positions, oldest first [k * CH + c], and
        // the HV recurrent states S[h][i][j] at [(h * DS + i) * DS + j]; zeros before position 0
        std::vector<std::vector<double>> conv_state((size_t)s.n_layer, std::vector<double>((size_t)(s.ssm_conv - 1) * (size_t)CH, 0.0));
        std::vector<std::vector<double>> ssm_state((size_t)s.n_layer, std::vector<double>((size_t)s.ssm_dt_rank * (size_t)DS * (size_t)DS, 0.0));
        for (int pos = 0; pos < T; ++pos) {
            std::vector<double> x((size_t)E);
            for (int i = 0; i < E; ++i) x[(size_t)i] = m_.tok_embd[(size_t)tokens[(size_t)pos] * (size_t)E + (size_t)i];
            for (int il = 0; il < s.n_layer; ++il) {
                const LayerWeights& L = m_.layers[(size_t)il];
                std::vector<double> h = rms_norm(x, L.attn_norm, s.rms_eps);
                const std::vector<double> o = m_.recurrent[(size_t)il] ? q35_delta_net(L, h, &conv_state[(size_t)il], &ssm_state[(size_t)il])
                                                                      : q35_attention(L, h, pos, il, &kcache[(size_t)il], &vcache[(size_t)il]);
                for (int i = 0; i < E; ++i) x[(size_t)i] += o[(size_t)i];
                h = rms_norm(x, L.ffn_norm, s.rms_eps);
                // MoE: softmax over all experts, top-k of the logits (same order), renormalised
                const std::vector<double> logit = matvec(L.gate_inp, h, E, NE);
                std::vector<double> prob((size_t)NE);
                double mx = -std::numeric_limits<double>::infinity(), sum = 0;
                for (double l : logit) mx = std::max(mx, l);
                for (int e = 0; e < NE; ++e) { prob[(size_t)e] = std::exp(logit[(size_t)e] - mx); sum += prob[(size_t)e]; }
                for (double& p : prob) p /= sum;
                std::vector<int> order((size_t)NE);
                for (int e = 0; e < NE; ++e) order[(size_t)e] = e;
                std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return logit[(size_t)a] > logit[(size_t)b]; });
                r.router_logits.insert(r.router_logits.end(), logit.begin(), logit.end());
                r.route_scores.insert(r.route_scores.end(), logit.begin(), logit.end());
                if (K < NE)
                    r.route_margin[(size_t)pos] = std::min(r.route_margin[(size_t)pos], logit[(size_t)order[(size_t)K - 1]] - logit[(size_t)order[(size_t)K]]);
                if (forced_experts) {
                    const size_t base = ((size_t)pos * (size_t)s.n_layer + (size_t)il) * (size_t)K;
                    order.assign(forced_experts->begin() + (ptrdiff_t)base, forced_experts->begin() + (ptrdiff_t)(base + (size_t)K));
                }
                double wsum = 0;
                for (int i = 0; i < K; ++i) wsum += prob[(size_t)order[(size_t)i]];
                wsum = std::max(wsum, 6.103515625e-5);
                std::vector<double> y((size_t)E, 0.0);
                for (int i = 0; i < K; ++i) {
                    const int e = order[(size_t)i];
                    r.experts.push_back(e);
                    const double wgt = m_.norm_topk ? prob[(size_t)e] / wsum : prob[(size_t)e];
                    const size_t up_off = (size_t)e * (size_t)s.n_ff * (size_t)E, down_off = (size_t)e * (size_t)E * (size_t)s.n_ff;
                    const std::vector<double> ye = swiglu(L.gate_exps.data() + up_off, L.up_exps.data() + up_off, L.down_exps.data() + down_off, h, E, s.n_ff);
                    for (int c = 0; c < E; ++c) y[(size_t)c] += wgt * ye[(size_t)c];
                }
                if (!L.gate_shexp.empty()) {  // the shared expert, gated by sigmoid(w . h) (ungated without the gate vector)
                    double g = 1.0;
                    if (!L.gate_inp_shexp.empty()) {
                        g = 0;
                        for (int c = 0; c < E; ++c) g += (double)L.gate_inp_shexp[(size_t)c] * h[(size_t)c];
                        g = 1.0 / (1.0 + std::exp(-g));
                    }
                    const std::vector<double> ys = swiglu(L.gate_shexp.data(), L.up_shexp.data(), L.down_shexp.data(), h, E, m_.n_ff_shared);
                    for (int c = 0; c < E; ++c) y[(size_t)c] += g * ys[(size_t)c];
                }
                for (int i = 0; i < E; ++i) x[(size_t)i] += y[(size_t)i];
            }
            std::vector<double> h = rms_norm(x, m_.output_norm, s.rms_eps);
            std::vector<double> lg = matvec(m_.logits_matrix(), h, E, V);
            std::copy(lg.begin(), lg.end(), r.logits.begin() + (ptrdiff_t)pos * V);
        }
        return r;
    }

    // qwen35moe / qwen3next gated delta-net mixer for one token; `conv` (the last KC-1 raw qkv vectors) and
    // `state` (HV matrices DS x DS) move one position on.
    std::vector<double> q35_delta_net(const LayerWeights& L, const std::vector<double>& h, std::vector<double>* conv,
                                      std::vector<double>* state) const {
        const ModelSpec& s = m_.spec;
        const int E = s.n_embd, DS = s.ssm_state, HK = s.ssm_group, HV = s.ssm_dt_rank, KC = s.ssm_conv;
        const int CH = 2 * HK * DS + HV * DS;
        const std::vector<double> qkv = matvec(L.ssm_qkv, h, E, CH);
        const std::vector<double> z = matvec(L.ssm_z, h, E, HV * DS);
        const std::vector<double> b = matvec(L.ssm_beta, h, E, HV), a = matvec(L.ssm_alpha, h, E, HV);
        // causal depthwise conv over [state; this token], then silu; the state keeps raw inputs
        std::vector<double> c((size_t)CH);
        for (int ch = 0; ch < CH; ++ch) {
            double acc = (double)L.ssm_conv1d[(size_t)ch * (size_t)KC + (size_t)(KC - 1)] * qkv[(size_t)ch];
            for (int k = 0; k < KC - 1; ++k) acc += (double)L.ssm_conv1d[(size_t)ch * (size_t)KC + (size_t)k] * (*conv)[(size_t)k * (size_t)CH + (size_t)ch];
            for (int k = 0; k + 1 < KC - 1; ++k) (*conv)[(size_t)k * (size_t)CH + (size_t)ch] = (*conv)[(size_t)(k + 1) * (size_t)CH + (size_t)ch];
            (*conv)[(size_t)(KC - 2) * (size_t)CH + (size_t)ch] = qkv[(size_t)ch];
            c[(size_t)ch] = q35.no_conv_silu ? acc : silu(acc);
        }
        // l2 norm of each q and k head: x / sqrt(sum x^2 + eps)
        if (!q35.no_l2norm) {
            for (int hh = 0; hh < 2 * HK; ++hh) {
                double ss = 0;
                for (int i = 0; i < DS; ++i) ss += c[(size_t)(hh * DS + i)] * c[(size_t)(hh * DS + i)];
                const double inv = 1.0 / std::sqrt(ss + (double)s.rms_eps);
                for (int i = 0; i < DS; ++i) c[(size_t)(hh * DS + i)] *= inv;
            }
        }
        // q/k head of each v head: qwen35moe tiles (h % HK), qwen3next groups (h / (HV/HK))
        const bool grouped = m_.dnet_heads_grouped ? !q35.heads_tiled : q35.heads_grouped;
        std::vector<double> o((size_t)HV * (size_t)DS);
        for (int hv = 0; hv < HV; ++hv) {
            const int hk = grouped ? hv / (HV / HK) : hv % HK;
            const double* q = &c[(size_t)hk * DS];
            const double* k = &c[(size_t)(HK + hk) * DS];
            const double* v = &c[(size_t)(2 * HK * DS + hv * DS)];
            const double dt = (double)(L.ssm_dt.empty() ? 0.f : L.ssm_dt[(size_t)hv]) + a[(size_t)hv];
            const double sp = dt > 20.0 ? dt : std::log1p(std::exp(dt));
            const double decay = std::exp(sp * (double)L.ssm_a[(size_t)hv]);
            const double beta = q35.beta_one ? 1.0 : 1.0 / (1.0 + std::exp(-b[(size_t)hv]));
            double* S = &(*state)[(size_t)hv * (size_t)DS * (size_t)DS];  // S[i][j] at i * DS + j
            if (!q35.decay_after_update)
                for (int i = 0; i < DS * DS; ++i) S[i] *= decay;
            std::vector<double> d((size_t)DS);
            for (int j = 0; j < DS; ++j) {
                double kv = 0;
                for (int i = 0; i < DS; ++i) kv += S[i * DS + j] * k[i];
                d[(size_t)j] = beta * (v[j] - kv);
            }
            for (int i = 0; i < DS; ++i)
                for (int j = 0; j < DS; ++j) S[i * DS + j] += k[i] * d[(size_t)j];
            if (q35.decay_after_update)
                for (int i = 0; i < DS * DS; ++i) S[i] *= decay;
            const double scale = 1.0 / std::sqrt((double)DS);  // cancelled by the RMSNorm below up to eps
            for (int j = 0; j < DS; ++j) {
                double acc = 0;
                for (int i = 0; i < DS; ++i) acc += S[i * DS + j] * q[i];
                o[(size_t)(hv * DS + j)] = acc * scale;
            }
            // gated RMSNorm of the head: rmsnorm(o) * ssm_norm * silu(z)
            rms_norm_inplace(&o[(size_t)hv * DS], DS, L.ssm_norm.data(), s.rms_eps);
            if (!q35.no_z_gate)
                for (int j = 0; j < DS; ++j) o[(size_t)(hv * DS + j)] *= silu(z[(size_t)(hv * DS + j)]);
        }
        return matvec(L.ssm_out, o, HV * DS, E);
    }

    // qwen35moe IMROPE of one head at `pos` (text tokens): NEOX pairs over the first n_rot dims; a
    // pair whose section is not t/h/w (see the top) keeps its values (the 4th position is 0).
    void q35_rope(double* v, int pos) const {
        const int n = m_.n_rot;
        const int* sec = m_.rope_sections;
        const int sect_dims = sec[0] + sec[1] + sec[2] + sec[3];
        for (int i = 0; i < n / 2; ++i) {
            const int sc = i % sect_dims;
            const bool rotates = (sc % 3 == 0 && sc < 3 * sec[0]) || (sc % 3 == 1 && sc < 3 * sec[1]) || (sc % 3 == 2 && sc < 3 * sec[2]);
            const double theta = rotates || q35.rope_all_pairs ? (double)pos * std::pow((double)m_.spec.rope_base, -2.0 * i / n) : 0.0;
            const int a = q35.rope_norm_pairs ? 2 * i : i, b = q35.rope_norm_pairs ? 2 * i + 1 : i + n / 2;
            const double x0 = v[a], x1 = v[b], cs = std::cos(theta), sn = std::sin(theta);
            v[a] = x0 * cs - x1 * sn;
            v[b] = x0 * sn + x1 * cs;
        }
    }

    // qwen35moe / qwen3next gated full attention for the token at `pos` in layer `il`.
    std::vector<double> q35_attention(const LayerWeights& L, const std::vector<double>& h, int pos, int il, std::vector<std::vector<double>>* kc,
                                      std::vector<std::vector<double>>* vc) const {
        const ModelSpec& s = m_.spec;
        const int E = s.n_embd, H = s.n_head, HKV = s.n_head_kv, HD = m_.head_dim;
        const std::vector<double> qg = matvec(L.wq, h, E, 2 * H * HD);
        std::vector<double> q((size_t)H * HD), gate((size_t)H * HD);
        for (int hh = 0; hh < H; ++hh)
            for (int c = 0; c < HD; ++c) {
                const double first = qg[(size_t)(hh * 2 * HD + c)], second = qg[(size_t)(hh * 2 * HD + HD + c)];
                q[(size_t)(hh * HD + c)] = q35.gate_before_q ? second : first;
                gate[(size_t)(hh * HD + c)] = q35.gate_before_q ? first : second;
            }
        std::vector<double> k = matvec(L.wk, h, E, HKV * HD), v = matvec(L.wv, h, E, HKV * HD);
        if (!L.q_norm.empty()) {
            for (int hh = 0; hh < H; ++hh) rms_norm_inplace(&q[(size_t)hh * HD], HD, L.q_norm.data(), s.rms_eps);
            for (int hh = 0; hh < HKV; ++hh) rms_norm_inplace(&k[(size_t)hh * HD], HD, L.k_norm.data(), s.rms_eps);
        }
        if (s.arch == "qwen3next") {  // plain partial NEOX (ggml_rope_ext)
            for (int hh = 0; hh < H; ++hh) rope(&q[(size_t)hh * HD], pos, il);
            for (int hh = 0; hh < HKV; ++hh) rope(&k[(size_t)hh * HD], pos, il);
        } else {  // IMROPE
            for (int hh = 0; hh < H; ++hh) q35_rope(&q[(size_t)hh * HD], pos);
            for (int hh = 0; hh < HKV; ++hh) q35_rope(&k[(size_t)hh * HD], pos);
        }
        kc->push_back(k);
        vc->push_back(v);
        std::vector<double> attn((size_t)(H * HD), 0.0);
        const int group = H / HKV;
        const double scale = 1.0 / std::sqrt((double)HD);
        for (int hh = 0; hh < H; ++hh) {
            const int kvh = hh / group;
            std::vector<double> score((size_t)(pos + 1));
            double mx = -std::numeric_limits<double>::infinity();
            for (int j = 0; j <= pos; ++j) {
                double d = 0;
                for (int c = 0; c < HD; ++c) d += q[(size_t)(hh * HD + c)] * (*kc)[(size_t)j][(size_t)(kvh * HD + c)];
                score[(size_t)j] = d * scale;
                mx = std::max(mx, score[(size_t)j]);
            }
            double sum = 0;
            for (int j = 0; j <= pos; ++j) { score[(size_t)j] = std::exp(score[(size_t)j] - mx); sum += score[(size_t)j]; }
            for (int j = 0; j <= pos; ++j)
                for (int c = 0; c < HD; ++c) attn[(size_t)(hh * HD + c)] += score[(size_t)j] / sum * (*vc)[(size_t)j][(size_t)(kvh * HD + c)];
        }
        if (!q35.no_attn_gate)
            for (size_t i = 0; i < attn.size(); ++i) attn[i] *= 1.0 / (1.0 + std::exp(-gate[i]));
        return matvec(L.wo, attn, H * HD, E);
    }

    // lfm2moe short-convolution block for one token; `state` holds the previous LC-1 conv inputs
    // and is shifted by one.
    std::vector<double> lfm_shortconv(const LayerWeights& L, const std::vector<double>& h, std::vector<double>* state) const {
        const int E = m_.spec.n_embd, LC = m_.spec.l_cache;
        const std::vector<double> bcx = matvec(L.shortconv_in_proj, h, E, 3 * E);
        const double* B = &bcx[0];
        const double* C = &bcx[(size_t)E];
        const double* X = &bcx[2 * (size_t)E];
        std::vector<double> y((size_t)E);
        for (int c = 0; c < E; ++c) {
            const double u = lfm_gate_after_conv ? X[c] : B[c] * X[c];
            double acc = (double)L.shortconv_conv[(size_t)c * (size_t)LC + (size_t)(LC - 1)] * u;  // tap LC-1: this token
            for (int k = 0; k < LC - 1; ++k)                                                            // taps 0..LC-2: the state
                acc += (double)L.shortconv_conv[(size_t)c * (size_t)LC + (size_t)k] * (*state)[(size_t)k * (size_t)E + (size_t)c];
            for (int k = 0; k + 1 < LC - 1; ++k)  // shift the window by one: drop the oldest, append u
                (*state)[(size_t)k * (size_t)E + (size_t)c] = (*state)[(size_t)(k + 1) * (size_t)E + (size_t)c];
            (*state)[(size_t)(LC - 2) * (size_t)E + (size_t)c] = u;
            y[(size_t)c] = C[c] * (lfm_gate_after_conv ? B[c] * acc : acc);
        }
        return matvec(L.shortconv_out_proj, y, E, E);
    }

    // lfm2moe attention block for the token at `pos`: per-head q/k RMSNorm, NEOX RoPE, causal GQA.
    std::vector<double> lfm_attention(const LayerWeights& L, const std::vector<double>& h, int pos, int il,
                                      std::vector<std::vector<double>>* kc, std::vector<std::vector<double>>* vc) const {
        const ModelSpec& s = m_.spec;
        const int E = s.n_embd, H = s.n_head, HKV = s.n_head_kv, HD = m_.head_dim;
        std::vector<double> q = matvec(L.wq, h, E, H * HD), k = matvec(L.wk, h, E, HKV * HD), v = matvec(L.wv, h, E, HKV * HD);
        if (!L.q_norm.empty()) {
            for (int hh = 0; hh < H; ++hh) rms_norm_inplace(&q[(size_t)hh * HD], HD, L.q_norm.data(), s.rms_eps);
            for (int hh = 0; hh < HKV; ++hh) rms_norm_inplace(&k[(size_t)hh * HD], HD, L.k_norm.data(), s.rms_eps);
        }
        for (int hh = 0; hh < H; ++hh) rope(&q[(size_t)hh * HD], pos, il);
        for (int hh = 0; hh < HKV; ++hh) rope(&k[(size_t)hh * HD], pos, il);
        kc->push_back(k);
        vc->push_back(v);
        std::vector<double> attn((size_t)(H * HD), 0.0);
        const int group = H / HKV;
        const double scale = 1.0 / std::sqrt((double)HD);
        for (int hh = 0; hh < H; ++hh) {
            const int kvh = hh / group;
            std::vector<double> score((size_t)(pos + 1));
            double mx = -std::numeric_limits<double>::infinity();
            for (int j = 0; j <= pos; ++j) {
                double d = 0;
                for (int c = 0; c < HD; ++c) d += q[(size_t)(hh * HD + c)] * (*kc)[(size_t)j][(size_t)(kvh * HD + c)];
                score[(size_t)j] = d * scale;
                mx = std::max(mx, score[(size_t)j]);
            }
            double sum = 0;
            for (int j = 0; j <= pos; ++j) { score[(size_t)j] = std::exp(score[(size_t)j] - mx); sum += score[(size_t)j]; }
            for (int j = 0; j <= pos; ++j)
                for (int c = 0; c < HD; ++c) attn[(size_t)(hh * HD + c)] += score[(size_t)j] / sum * (*vc)[(size_t)j][(size_t)(kvh * HD + c)];
        }
        return matvec(L.wo, attn, H * HD, E);
    }

    // lfm2moe MoE block (sigmoid or softmax scores, selection bias, renormalised weights); records
    // the routing in `r` like run() does.
    std::vector<double> lfm_moe(const LayerWeights& L, const std::vector<double>& h, int pos, int il, const std::vector<int32_t>* forced_experts,
                                OracleResult* r) const {
        const ModelSpec& s = m_.spec;
        const int E = s.n_embd, NE = s.n_expert, K = s.n_expert_used;
        const std::vector<double> logit = matvec(L.gate_inp, h, E, NE);
        std::vector<double> prob((size_t)NE);
        if (m_.gating == RandomModel::Gating::softmax) {
            double mx = -std::numeric_limits<double>::infinity(), sum = 0;
            for (double l : logit) mx = std::max(mx, l);
            for (int e = 0; e < NE; ++e) { prob[(size_t)e] = std::exp(logit[(size_t)e] - mx); sum += prob[(size_t)e]; }
            for (double& p : prob) p /= sum;
        } else {
            for (int e = 0; e < NE; ++e) prob[(size_t)e] = 1.0 / (1.0 + std::exp(-logit[(size_t)e]));
        }
        std::vector<double> score = prob;  // the selection bias is added to the gating output
        for (int e = 0; e < (int)L.exp_probs_b.size(); ++e) score[(size_t)e] += L.exp_probs_b[(size_t)e];
        std::vector<int> order((size_t)NE);
        for (int e = 0; e < NE; ++e) order[(size_t)e] = e;
        std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return score[(size_t)a] > score[(size_t)b]; });
        r->router_logits.insert(r->router_logits.end(), logit.begin(), logit.end());
        r->route_scores.insert(r->route_scores.end(), score.begin(), score.end());
        if (K < NE)
            r->route_margin[(size_t)pos] = std::min(r->route_margin[(size_t)pos], score[(size_t)order[(size_t)K - 1]] - score[(size_t)order[(size_t)K]]);
        if (forced_experts) {
            const size_t base = ((size_t)pos * (size_t)s.n_layer + (size_t)il) * (size_t)K;
            order.assign(forced_experts->begin() + (ptrdiff_t)base, forced_experts->begin() + (ptrdiff_t)(base + (size_t)K));
        }
        double wsum = 0;
        for (int i = 0; i < K; ++i) wsum += prob[(size_t)order[(size_t)i]];
        wsum = std::max(wsum, 6.103515625e-5);
        std::vector<double> y((size_t)E, 0.0);
        for (int i = 0; i < K; ++i) {
            const int e = order[(size_t)i];
            r->experts.push_back(e);
            const double wgt = (m_.norm_topk ? prob[(size_t)e] / wsum : prob[(size_t)e]) * m_.expert_scale;
            const size_t up_off = (size_t)e * (size_t)s.n_ff * (size_t)E, down_off = (size_t)e * (size_t)E * (size_t)s.n_ff;
            const std::vector<double> ye = swiglu(L.gate_exps.data() + up_off, L.up_exps.data() + up_off, L.down_exps.data() + down_off, h, E, s.n_ff);
            for (int c = 0; c < E; ++c) y[(size_t)c] += wgt * ye[(size_t)c];
        }
        return y;
    }

    // deepseek2's multi-head latent attention for one position; appends this position's per-head
    // keys {n_head * (qk_nope + qk_rope)} and values {n_head * v_head} to kc / vc.
    std::vector<double> mla_attention(const LayerWeights& L, const std::vector<double>& h, int pos, int il,
                                      std::vector<std::vector<double>>& kc, std::vector<std::vector<double>>& vc) const {
        const ModelSpec& s = m_.spec;
        const int E = s.n_embd, H = s.n_head, HD = m_.head_dim, VD = m_.v_head_dim;
        const int NOPE = s.qk_nope, ROPE = s.qk_rope, KVR = s.kv_lora_rank, QL = s.q_lora_rank;
        std::vector<double> q;
        if (!L.wq_a.empty()) {  // q LoRA
            std::vector<double> qa = matvec(L.wq_a, h, E, QL);
            rms_norm_inplace(qa.data(), QL, L.q_a_norm.data(), s.rms_eps);
            q = matvec(L.wq_b, qa, QL, H * HD);
        } else {
            q = matvec(L.wq, h, E, H * HD);
        }
        const std::vector<double> kva = matvec(L.wkv_a, h, E, KVR + ROPE);
        std::vector<double> latent(kva.begin(), kva.begin() + KVR), k_rope(kva.begin() + KVR, kva.end());
        rms_norm_inplace(latent.data(), KVR, L.kv_a_norm.data(), s.rms_eps);
        const std::vector<double> kv = matvec(L.wkv_b, latent, KVR, H * (NOPE + VD));  // per head [k_nope, v]
        rope(k_rope.data(), pos, il);
        std::vector<double> k((size_t)H * HD), v((size_t)H * VD);
        for (int hh = 0; hh < H; ++hh) {
            rope(&q[(size_t)hh * HD + (size_t)NOPE], pos, il);  // the trailing qk_rope dims
            for (int c = 0; c < NOPE; ++c) k[(size_t)(hh * HD + c)] = kv[(size_t)(hh * (NOPE + VD) + c)];
            for (int c = 0; c < ROPE; ++c) k[(size_t)(hh * HD + NOPE + c)] = k_rope[(size_t)c];
            for (int j = 0; j < VD; ++j) v[(size_t)(hh * VD + j)] = kv[(size_t)(hh * (NOPE + VD) + NOPE + j)];
        }
        kc.push_back(k);
        vc.push_back(v);
        const double scale = mla_kq_scale();
        std::vector<double> attn((size_t)H * VD, 0.0);
        for (int hh = 0; hh < H; ++hh) {
            std::vector<double> score((size_t)(pos + 1));
            double mx = -std::numeric_limits<double>::infinity();
            for (int j = 0; j <= pos; ++j) {
                double d = 0;
                for (int c = 0; c < HD; ++c) d += q[(size_t)(hh * HD + c)] * kc[(size_t)j][(size_t)(hh * HD + c)];
                score[(size_t)j] = d * scale;
                mx = std::max(mx, score[(size_t)j]);
            }
            double sum = 0;
            for (int j = 0; j <= pos; ++j) { score[(size_t)j] = std::exp(score[(size_t)j] - mx); sum += score[(size_t)j]; }
            for (int j = 0; j <= pos; ++j)
                for (int c = 0; c < VD; ++c) attn[(size_t)(hh * VD + c)] += score[(size_t)j] / sum * vc[(size_t)j][(size_t)(hh * VD + c)];
        }
        return matvec(L.wo, attn, H * VD, E);
    }
    // deepseek2: L = mscale_all_dim, i.e. the file's rope.scaling.yarn_log_multiplier / 0.1 (YaRN only)
    double yarn_log_mul() const {
        const ModelSpec& s = m_.spec;
        return s.arch == "deepseek2" && s.rope_scaling == "yarn" ? (double)s.yarn_log_mul / 0.1 : 0.0;
    }
    // deepseek2's kq_scale (see the top): m^2 / sqrt(qk_nope + qk_rope)
    double mla_kq_scale() const {
        const ModelSpec& s = m_.spec;
        const double A = s.rope_attn_factor != 0.f ? (double)s.rope_attn_factor : 1.0;
        const bool yarn = s.rope_scaling == "yarn";
        const double f = yarn ? (double)s.rope_factor : 1.0, lf = std::log(f), Lm = yarn_log_mul();
        double ctx = A;  // llama-context.cpp's yarn_attn_factor
        if (yarn) ctx = (Lm != 0.0 ? 1.0 : (f <= 1.0 ? 1.0 : 1.0 + 0.1 * lf)) / (1.0 + 0.1 * lf) * A;
        const double ms = ctx * (1.0 + 0.1 * lf) * (1.0 + 0.1 * Lm * lf);
        return ms * ms / std::sqrt((double)m_.head_dim);
    }
    // y = W x with W {n_in, n_out}: y[o] = sum_i W[o*n_in + i] x[i]
    static std::vector<double> matvec(const std::vector<float>& W, const std::vector<double>& x, int n_in, int n_out) {
        return matvec(W.data(), x, n_in, n_out);
    }
    static std::vector<double> matvec(const float* W, const std::vector<double>& x, int n_in, int n_out) {
        std::vector<double> y((size_t)n_out, 0.0);
        for (int o = 0; o < n_out; ++o) {
            double acc = 0;
            for (int i = 0; i < n_in; ++i) acc += (double)W[(size_t)o * (size_t)n_in + (size_t)i] * x[(size_t)i];
            y[(size_t)o] = acc;
        }
        return y;
    }
    static std::vector<double> rms_norm(const std::vector<double>& x, const std::vector<float>& w, float eps) {
        std::vector<double> y = x;
        rms_norm_inplace(y.data(), (int)y.size(), w.data(), eps);
        return y;
    }
    static void rms_norm_inplace(double* x, int n, const float* w, float eps) {
        double ss = 0;
        for (int i = 0; i < n; ++i) ss += x[i] * x[i];
        const double inv = 1.0 / std::sqrt(ss / n + (double)eps);
        for (int i = 0; i < n; ++i) x[i] = x[i] * inv * (double)w[i];
    }
    static double silu(double v) { return v / (1.0 + std::exp(-v)); }
    // down(silu(gate x) * up x); gate/up {n_embd, n_ff}, down {n_ff, n_embd}
    static std::vector<double> swiglu(const float* gate, const float* up, const float* down, const std::vector<double>& x,
                                      int n_embd, int n_ff) {
        std::vector<double> g = matvec(gate, x, n_embd, n_ff), u = matvec(up, x, n_embd, n_ff);
        for (int i = 0; i < n_ff; ++i) g[(size_t)i] = silu(g[(size_t)i]) * u[(size_t)i];
        return matvec(down, g, n_ff, n_embd);
    }
    // gpt-oss expert e: down(swiglu_oai(gate x + bg, up x + bu)) + bd, swiglu_oai(g, u) =
    // g' sigmoid(1.702 g') (u' + 1) with g' = min(g, 7), u' = clamp(u, -7, 7) (ggml's constants).
    static std::vector<double> swiglu_oai_biased(const LayerWeights& L, int e, const std::vector<double>& x, int n_embd, int n_ff) {
        const double alpha = 1.702, limit = 7.0;
        const size_t up_off = (size_t)e * (size_t)n_ff * (size_t)n_embd, down_off = (size_t)e * (size_t)n_embd * (size_t)n_ff;
        std::vector<double> g = matvec(L.gate_exps.data() + up_off, x, n_embd, n_ff);
        std::vector<double> u = matvec(L.up_exps.data() + up_off, x, n_embd, n_ff);
        for (int i = 0; i < n_ff; ++i) {
            const double gi = std::min(g[(size_t)i] + (double)L.gate_exps_b[(size_t)e * (size_t)n_ff + (size_t)i], limit);
            const double ui = std::min(std::max(u[(size_t)i] + (double)L.up_exps_b[(size_t)e * (size_t)n_ff + (size_t)i], -limit), limit);
            g[(size_t)i] = gi / (1.0 + std::exp(-alpha * gi)) * (ui + 1.0);
        }
        std::vector<double> y = matvec(L.down_exps.data() + down_off, g, n_ff, n_embd);
        for (int c = 0; c < n_embd; ++c) y[(size_t)c] += (double)L.down_exps_b[(size_t)e * (size_t)n_embd + (size_t)c];
        return y;
    }
    // Rotates the first n_rot values of one head at position `pos` in layer `il` (NEOX pairs
    // (i, i + n_rot/2) or NORM pairs (2i, 2i+1)); YaRN when the spec asks for it (see the top).
    void rope(double* v, int pos, int il) const {
        const ModelSpec& s = m_.spec;
        const int n = m_.n_rot;
        const double base = m_.swa[(size_t)il] && s.rope_base_swa > 0.f ? (double)s.rope_base_swa : (double)s.rope_base;
        const bool new_family = s.arch == "gpt-oss" || s.arch == "glm4moe" || s.arch == "deepseek2";
        const bool yarn = new_family && s.rope_scaling == "yarn";
        const double factor = yarn ? (double)s.rope_factor : 1.0;  // freq_scale = 1 / factor
        double mscale = new_family && s.rope_attn_factor != 0.f ? (double)s.rope_attn_factor : 1.0;
        double lo = 0, hi = 0;
        if (yarn) {
            // deepseek2 with a yarn_log_multiplier: llama.cpp's context cancels this factor (see the top)
            if (factor > 1.0 && yarn_log_mul() == 0.0) mscale *= 1.0 + 0.1 * std::log(factor);
            const double n_orig = s.rope_orig_ctx > 0 ? (double)s.rope_orig_ctx : (double)s.n_ctx_train;
            auto corr_dim = [&](double n_turns) { return n * std::log(n_orig / (n_turns * 2 * 3.14159265358979323846)) / (2 * std::log(base)); };
            lo = std::max(0.0, std::floor(corr_dim(32.0)));
            hi = std::min((double)(n - 1), std::ceil(corr_dim(1.0)));
        }
        for (int i = 0; i < n / 2; ++i) {
            double theta = (double)pos * std::pow(base, -2.0 * i / n);
            if (yarn) {
                const double mix = 1.0 - std::min(1.0, std::max(0.0, (i - lo) / std::max(0.001, hi - lo)));
                theta = theta / factor * (1.0 - mix) + theta * mix;
            }
            const double c = std::cos(theta) * mscale, sn = std::sin(theta) * mscale;
            const int a = m_.rope_neox ? i : 2 * i;
            const int b = m_.rope_neox ? i + n / 2 : 2 * i + 1;
            const double x0 = v[a], x1 = v[b];
            v[a] = x0 * c - x1 * sn;
            v[b] = x0 * sn + x1 * c;
        }
    }

    const RandomModel& m_;
};

// ---- helpers shared by the forward and parity tests --------------------------------------

template <typename T> inline int argmax_row(const T* row, int n) {  // ties: lowest id
    int best = 0;
    for (int i = 1; i < n; ++i)
        if (row[i] > row[best]) best = i;
    return best;
}

// Gap between the largest and the second largest value of a row.
inline double top2_gap(const double* row, int n) {
    double a = -std::numeric_limits<double>::infinity(), b = a;
    for (int i = 0; i < n; ++i) {
        if (row[i] > a) { b = a; a = row[i]; } else if (row[i] > b) { b = row[i]; }
    }
    return a - b;
}

// Accumulates the difference between reference rows (double) and engine rows (float).
struct RowDiff {
    double max_abs = 0, max_ref = 0, sum_sq = 0, sum_sq_ref = 0;
    int worst_row = -1, worst_col = -1, rows = 0;
    int argmax_checked = 0, argmax_agree = 0;  // argmax compared where the reference's top-2 gap is clear
    int first_argmax_mismatch = -1;
    void add(int row_index, const double* ref, const float* got, int n, double clear_gap = 0) {
        for (int i = 0; i < n; ++i) {
            const double d = std::fabs(ref[i] - (double)got[i]);
            if (!(d <= max_abs)) { max_abs = d; worst_row = row_index; worst_col = i; }  // NaN counts as worst
            max_ref = std::max(max_ref, std::fabs(ref[i]));
            sum_sq += d * d;
            sum_sq_ref += ref[i] * ref[i];
        }
        ++rows;
        if (top2_gap(ref, n) > clear_gap) {
            ++argmax_checked;
            if (argmax_row(ref, n) == argmax_row(got, n)) ++argmax_agree;
            else if (first_argmax_mismatch < 0) first_argmax_mismatch = row_index;
        }
    }
    // max |ref - got| / max |ref|
    double rel() const { return max_ref > 0 ? max_abs / max_ref : max_abs; }
    // rms(ref - got) / rms(ref)
    double rel_rms() const { return sum_sq_ref > 0 ? std::sqrt(sum_sq / sum_sq_ref) : std::sqrt(sum_sq); }
};

// A model, a token sequence and the oracle's logits for it, with routing decisions that are not
// near-ties: every top-k boundary has a router-logit margin >= min_margin, so an engine whose
// router logits are off by less than that picks the same experts as the oracle. (With quantized
// weights the engine quantizes activations too, which moves router logits by ~1e-2; a near-tie
// flip would then swap a whole expert and make the comparison meaningless.) Seeds spec.seed,
// spec.seed+1, ... are tried until one qualifies; `ok` is false if none of max_tries does.
struct OracleCase {
    RandomModel model;
    std::vector<int32_t> tokens;
    OracleResult ref;
    bool ok = false;
    std::string error;
};

inline OracleCase make_oracle_case(ModelSpec spec, int n_tokens, double min_margin, int max_tries = 40) {
    OracleCase c;
    for (int attempt = 0; attempt < max_tries; ++attempt, ++spec.seed) {
        c.model = make_random_model(spec);
        if (!c.model.ok()) { c.error = c.model.error; return c; }
        c.tokens = random_tokens(n_tokens, spec.n_vocab, spec.seed);
        c.ref = Oracle(c.model).run(c.tokens);
        double m = std::numeric_limits<double>::infinity();
        for (double x : c.ref.route_margin) m = std::min(m, x);
        if (m >= min_margin) { c.ok = true; return c; }
    }
    c.error = "no seed with router margins >= " + std::to_string(min_margin) + " in " + std::to_string(max_tries) + " tries";
    return c;
}

}  // namespace moe_test

#endif  // MOE_TEST_ORACLE_H
