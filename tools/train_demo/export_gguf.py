#!/usr/bin/env python3
"""Map a transformers Qwen3MoeForCausalLM (+ its HF `tokenizers` tokenizer) to a llama.cpp-style
`qwen3moe` GGUF v3 file, and back.  Used by train.py; numpy + torch only, our own writer
(gguf_io.py).

Tensor names/shapes follow llama.cpp's qwen3moe loader (shared formats.md 1.6).  numpy order is
[.., out, in]; the GGUF stores ne = reversed(numpy shape), so ne0 = input dim (contiguous) and
Q8_0 blocks run along the input dim.  HF Qwen3-MoE uses NEOX rotary (rotate_half) and so does
llama.cpp for qwen3moe: Q/K rows are stored unpermuted.

Expert weights: transformers 4.x keeps `mlp.experts` as a ModuleList of {gate,up,down}_proj
Linear layers; 5.x fuses them into `gate_up_proj` [E, 2F, H] (gate rows first) and
`down_proj` [E, H, F].  `layout` names which one a model uses; train.py confirms it numerically
against an independent forward pass before exporting.
"""
import json

import numpy as np

from gguf_io import (GGML_F32, GGML_Q8_0, GGUF_INT32, GGUF_STRING, GGUFWriter)

LAYOUTS = ("fused", "fused_upfirst", "fused_T", "modulelist")

# llama_ftype: 7 = MOSTLY_Q8_0
FILE_TYPE_Q8_0 = 7
TOKEN_TYPE_NORMAL, TOKEN_TYPE_CONTROL = 1, 3


# ----------------------------------------------------------------------------------------------
# experts
def possible_layouts(mlp):
    ex = mlp.experts
    if hasattr(ex, "gate_up_proj"):
        return ["fused", "fused_upfirst", "fused_T"]
    return ["modulelist"]


def get_expert_mats(mlp, layout, n_ff):
    """-> gate [E,F,H], up [E,F,H], down [E,H,F] (torch tensors, detached)."""
    ex = mlp.experts
    if layout == "modulelist":
        g = [e.gate_proj.weight.detach() for e in ex]
        u = [e.up_proj.weight.detach() for e in ex]
        d = [e.down_proj.weight.detach() for e in ex]
        import torch
        return torch.stack(g), torch.stack(u), torch.stack(d)
    gu = ex.gate_up_proj.detach()
    dn = ex.down_proj.detach()
    if layout == "fused":
        return gu[:, :n_ff, :], gu[:, n_ff:, :], dn
    if layout == "fused_upfirst":
        return gu[:, n_ff:, :], gu[:, :n_ff, :], dn
    if layout == "fused_T":   # gate_up [E, H, 2F], down [E, F, H]
        return gu[:, :, :n_ff].transpose(1, 2), gu[:, :, n_ff:].transpose(1, 2), dn.transpose(1, 2)
    raise ValueError(layout)


def set_expert_mats(mlp, layout, n_ff, gate, up, down):
    """Inverse of get_expert_mats (copies into the parameters in place)."""
    import torch
    ex = mlp.experts
    with torch.no_grad():
        if layout == "modulelist":
            for i, e in enumerate(ex):
                e.gate_proj.weight.copy_(gate[i])
                e.up_proj.weight.copy_(up[i])
                e.down_proj.weight.copy_(down[i])
            return
        gu = ex.gate_up_proj
        dn = ex.down_proj
        if layout == "fused":
            gu[:, :n_ff, :].copy_(gate); gu[:, n_ff:, :].copy_(up); dn.copy_(down)
        elif layout == "fused_upfirst":
            gu[:, n_ff:, :].copy_(gate); gu[:, :n_ff, :].copy_(up); dn.copy_(down)
        elif layout == "fused_T":
            gu[:, :, :n_ff].copy_(gate.transpose(1, 2)); gu[:, :, n_ff:].copy_(up.transpose(1, 2))
            dn.copy_(down.transpose(1, 2))
        else:
            raise ValueError(layout)


# ----------------------------------------------------------------------------------------------
# HF model <-> GGUF tensor dict
def _np(t):
    return t.detach().float().cpu().numpy().astype(np.float32)


def hf_to_gguf_tensors(model, layout, cfg):
    """Ordered list of (gguf name, float32 numpy array in numpy order, ggml type)."""
    m = model.model
    F = cfg.moe_intermediate_size
    out = [("token_embd.weight", _np(m.embed_tokens.weight), GGML_Q8_0),
           ("output_norm.weight", _np(m.norm.weight), GGML_F32)]
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", _np(model.lm_head.weight), GGML_Q8_0))
    for i, L in enumerate(m.layers):
        p = "blk.%d." % i
        a = L.self_attn
        g, u, d = get_expert_mats(L.mlp, layout, F)
        out += [
            (p + "attn_norm.weight", _np(L.input_layernorm.weight), GGML_F32),
            (p + "attn_q.weight", _np(a.q_proj.weight), GGML_Q8_0),
            (p + "attn_k.weight", _np(a.k_proj.weight), GGML_Q8_0),
            (p + "attn_v.weight", _np(a.v_proj.weight), GGML_Q8_0),
            (p + "attn_output.weight", _np(a.o_proj.weight), GGML_Q8_0),
            (p + "attn_q_norm.weight", _np(a.q_norm.weight), GGML_F32),
            (p + "attn_k_norm.weight", _np(a.k_norm.weight), GGML_F32),
            (p + "ffn_norm.weight", _np(L.post_attention_layernorm.weight), GGML_F32),
            (p + "ffn_gate_inp.weight", _np(L.mlp.gate.weight), GGML_F32),
            (p + "ffn_gate_exps.weight", _np(g), GGML_Q8_0),
            (p + "ffn_up_exps.weight", _np(u), GGML_Q8_0),
            (p + "ffn_down_exps.weight", _np(d), GGML_Q8_0),
        ]
    return out


def gguf_tensors_to_hf(model, layout, cfg, tensors):
    """Copy GGUF-named float32 numpy arrays (numpy order) into the HF model in place."""
    import torch
    m = model.model
    F = cfg.moe_intermediate_size
    dev = m.embed_tokens.weight.device

    def T(name):
        return torch.from_numpy(np.ascontiguousarray(tensors[name])).to(dev)

    with torch.no_grad():
        m.embed_tokens.weight.copy_(T("token_embd.weight"))
        m.norm.weight.copy_(T("output_norm.weight"))
        if not cfg.tie_word_embeddings:
            model.lm_head.weight.copy_(T("output.weight"))
        for i, L in enumerate(m.layers):
            p = "blk.%d." % i
            a = L.self_attn
            L.input_layernorm.weight.copy_(T(p + "attn_norm.weight"))
            a.q_proj.weight.copy_(T(p + "attn_q.weight"))
            a.k_proj.weight.copy_(T(p + "attn_k.weight"))
            a.v_proj.weight.copy_(T(p + "attn_v.weight"))
            a.o_proj.weight.copy_(T(p + "attn_output.weight"))
            a.q_norm.weight.copy_(T(p + "attn_q_norm.weight"))
            a.k_norm.weight.copy_(T(p + "attn_k_norm.weight"))
            L.post_attention_layernorm.weight.copy_(T(p + "ffn_norm.weight"))
            L.mlp.gate.weight.copy_(T(p + "ffn_gate_inp.weight"))
            set_expert_mats(L.mlp, layout, F, T(p + "ffn_gate_exps.weight"),
                            T(p + "ffn_up_exps.weight"), T(p + "ffn_down_exps.weight"))


# ----------------------------------------------------------------------------------------------
# tokenizer
def tokenizer_arrays(tok_json):
    """From a HF tokenizers JSON string: tokens (by id), token types, merges ("a b"), eot id."""
    j = json.loads(tok_json)
    assert j["model"]["type"] == "BPE"
    vocab = dict(j["model"]["vocab"])
    special = set()
    for at in j.get("added_tokens", []):
        vocab[at["content"]] = at["id"]
        if at.get("special"):
            special.add(at["id"])
    n = max(vocab.values()) + 1
    tokens = [None] * n
    for t, i in vocab.items():
        assert tokens[i] is None, "duplicate id %d" % i
        tokens[i] = t
    assert all(t is not None for t in tokens), "vocabulary has holes"
    types = [TOKEN_TYPE_CONTROL if i in special else TOKEN_TYPE_NORMAL for i in range(n)]
    merges = []
    for mg in j["model"]["merges"]:
        if isinstance(mg, str):
            a, b = mg.split(" ")
        else:
            a, b = mg
        assert " " not in a and " " not in b
        merges.append(a + " " + b)
    eot = vocab["<|endoftext|>"]
    return tokens, types, merges, eot


# ----------------------------------------------------------------------------------------------
def write_gguf(path, cfg, tensors, tok_json, name):
    """tensors: list of (name, float32 numpy array, ggml type) in file order."""
    tokens, types, merges, eot = tokenizer_arrays(tok_json)
    assert len(tokens) == cfg.vocab_size, (len(tokens), cfg.vocab_size)
    A = "qwen3moe"
    w = GGUFWriter(alignment=32)
    w.add_str("general.architecture", A)
    w.add_str("general.name", name)
    w.add_u32("general.alignment", 32)
    w.add_u32("general.file_type", FILE_TYPE_Q8_0)
    w.add_u32("general.quantization_version", 2)
    w.add_u32(A + ".vocab_size", cfg.vocab_size)
    w.add_u32(A + ".context_length", cfg.max_position_embeddings)
    w.add_u32(A + ".embedding_length", cfg.hidden_size)
    w.add_u32(A + ".block_count", cfg.num_hidden_layers)
    w.add_u32(A + ".feed_forward_length", cfg.intermediate_size)
    w.add_u32(A + ".expert_feed_forward_length", cfg.moe_intermediate_size)
    w.add_u32(A + ".expert_count", cfg.num_experts)
    w.add_u32(A + ".expert_used_count", cfg.num_experts_per_tok)
    w.add_u32(A + ".attention.head_count", cfg.num_attention_heads)
    w.add_u32(A + ".attention.head_count_kv", cfg.num_key_value_heads)
    w.add_u32(A + ".attention.key_length", cfg.head_dim)
    w.add_u32(A + ".attention.value_length", cfg.head_dim)
    w.add_f32(A + ".attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_f32(A + ".rope.freq_base", rope_theta_of(cfg))
    w.add_str("tokenizer.ggml.model", "gpt2")
    w.add_str("tokenizer.ggml.pre", "qwen2")
    w.add_array("tokenizer.ggml.tokens", GGUF_STRING, tokens)
    w.add_array("tokenizer.ggml.token_type", GGUF_INT32, types)
    w.add_array("tokenizer.ggml.merges", GGUF_STRING, merges)
    w.add_u32("tokenizer.ggml.bos_token_id", eot)
    w.add_u32("tokenizer.ggml.eos_token_id", eot)
    w.add_u32("tokenizer.ggml.padding_token_id", eot)
    w.add_bool("tokenizer.ggml.add_bos_token", False)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    for tname, arr, gtype in tensors:
        w.add_tensor(tname, arr, gtype)
    return w.write(path)


def rope_theta_of(cfg):
    rp = getattr(cfg, "rope_parameters", None)
    if rp is not None and hasattr(rp, "get") and rp.get("rope_theta") is not None:
        return float(rp["rope_theta"])
    return float(getattr(cfg, "rope_theta"))
