#!/usr/bin/env python3
"""Train the bundled demo model (models/demo-qwen3moe.gguf) and write the transformers reference
data under tests/data/.  Runs on one CUDA GPU in a few minutes; see README.md here for the
exact command.

What it does, in order
  1. Data: the KJV text (one verse a line, "Ge1:1 In the beginning ...").  Held-out split = the
     contiguous block from James 1:1 to the end (James, 1-2 Peter, 1-3 John, Jude, Revelation:
     835 verses, 2.7 % of the lines); everything before it is the training split.
  2. Tokenizer: byte-level BPE trained with HF `tokenizers` on the training split, vocab 4096 =
     4095 BPE tokens + "<|endoftext|>" (id 4095; BOS = EOS = PAD; never added automatically).
     Pre-tokenizer = Qwen2's: Split(QWEN2_REGEX, isolated) then ByteLevel(add_prefix_space=False,
     use_regex=False); ByteLevel decoder; no normalizer, no post-processor.  In GGUF:
     tokenizer.ggml.model = "gpt2", tokenizer.ggml.pre = "qwen2".
  3. Model: transformers Qwen3MoeForCausalLM (hyper-parameters in MODEL below), AdamW, bf16
     autocast, random 256-token windows of the training stream, router aux loss on.  Held-out
     loss is evaluated every EVAL_EVERY steps; the best held-out checkpoint is kept.
  4. Every weight stored as Q8_0 in the GGUF is quantized -> dequantized (ggml Q8_0 reference
     arithmetic) and loaded back into the model, so the float32 reference below uses exactly the
     weights in the file.  Norms and the router (ffn_gate_inp) stay F32.
  5. Export GGUF (gguf_io.py / export_gguf.py), read it back, check max |diff| == 0 against the
     model, and check an independent float64 forward pass written from the GGUF tensors with
     llama.cpp's qwen3moe semantics against transformers' logits.
  6. Reference data (float32, eager attention, TF32 off): prompts + top-20 logits + 64 greedy
     tokens, full logits of prompt 0, held-out perplexity, routing traces, tokenizer cases.
     Formats: tests/data/README.md.

Hyper-parameters (defaults; all on the command line too)
  vocab 4096 | hidden 256 | layers 6 | heads 8 q / 2 kv, head_dim 32 | experts 16, top-4,
  expert FFN 128 (norm_topk_prob) | dense FFN key 512 (unused: every layer is MoE) |
  rope_theta 10000 | rms eps 1e-6 | max positions 512 | untied embeddings |
  seq 256, batch 32, AdamW lr 2e-3 (betas 0.9/0.95, wd 0.1, eps 1e-8), warmup 100, cosine to
  10 %, grad clip 1.0, router aux coef 0.01, steps 800 (~5.7 epochs; capped by --max-train-seconds),
  held-out eval every 50 steps, best held-out checkpoint kept.  (A 2000-step run overfitted:
  held-out minimum 4.227 at step 600, 5.14 at step 2000, train 1.06.)

Reproducible from --seed up to GPU non-determinism (index_add_ atomics in the expert loop).
"""
import argparse
import hashlib
import inspect
import json
import math
import os
import struct
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)

import gguf_io  # noqa: E402
import export_gguf  # noqa: E402

QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
EOT = "<|endoftext|>"
HELDOUT_FIRST_VERSE = "Jas1:1 "

PROMPTS = [
    "In the beginning God created",
    "And Jesus said unto them,",
    "The LORD is my shepherd;",
    "And",
    "Psalm 23:1-2 (KJV): The LORD is my shepherd; I shall not want!",
    "John3:16 For God so loved the world,",
]

TOKENIZER_CASES = [
    "Hello world", " leading space", "trailing space ", "double  space", "   three leading",
    "tab\tseparated", "new\nline", "\n\n\nmany newlines", "  \n  mixed\n\t\n", "hello\r\nworld",
    "don't", "I'LL WE'VE YOU'RE", "'s 't 're 've 'm 'll 'd", "12345", "3.14159", "Psalm 23:1-6",
    "a,b;c:d!e?f", "(parens) [brackets] {braces}", "ALL CAPS SHOUT", "café", "naïve façade",
    "中文字符", "emoji 😀👍", "日本語とEnglish", "Ω≈ç√∫", "\u00a0nbsp", "x" * 40,
    "Ge1:1 In the beginning God created the heaven and the earth.\n",
    "Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen.\n",
    "And the LORD said unto Moses, Wherefore criest thou unto me?",
    "<|endoftext|>", "text<|endoftext|>more", "!!!???...", "--==>>", " 1 2 3 ", "A", " ",
]


def log(*a):
    print("[%7.1fs]" % (time.time() - T0), *a, flush=True)


T0 = time.time()


# ----------------------------------------------------------------------------------------------
def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, ".devdata", "kjv.txt"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--expert-ff", type=int, default=128)
    p.add_argument("--dense-ff", type=int, default=512)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--wd", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--max-train-seconds", type=float, default=270.0)
    p.add_argument("--n-gen", type=int, default=64)
    p.add_argument("--top-n", type=int, default=20)
    p.add_argument("--heldout-bytes", type=int, default=40000)
    p.add_argument("--route-windows", type=int, default=4)
    p.add_argument("--model-out", default=os.path.join(ROOT, "models", "demo-qwen3moe.gguf"))
    p.add_argument("--data-out", default=os.path.join(ROOT, "tests", "data"))
    p.add_argument("--tool-out", default=HERE)
    p.add_argument("--from-gguf", action="store_true",
                   help="skip training: take the weights from --model-out and tokenizer.json, redo the reference data")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
def train_tokenizer(train_lines, vocab):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - 1, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[])
    tok.train_from_iterator(train_lines, trainer=trainer)
    tok.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
    assert tok.get_vocab_size(with_added_tokens=True) == vocab, tok.get_vocab_size(with_added_tokens=True)
    assert tok.token_to_id(EOT) == vocab - 1
    return tok


def make_config(a, eot_id, attn):
    from transformers import Qwen3MoeConfig
    kw = dict(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.dense_ff,
              num_hidden_layers=a.layers, num_attention_heads=a.heads,
              num_key_value_heads=a.kv_heads, head_dim=a.head_dim, hidden_act="silu",
              max_position_embeddings=512, initializer_range=0.02, rms_norm_eps=1e-6,
              use_cache=False, tie_word_embeddings=False, attention_bias=False,
              attention_dropout=0.0, decoder_sparse_step=1, moe_intermediate_size=a.expert_ff,
              num_experts_per_tok=a.top_k, num_experts=a.experts, norm_topk_prob=True,
              output_router_logits=False, router_aux_loss_coef=a.aux_coef, mlp_only_layers=[],
              bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=None)
    sig = inspect.signature(Qwen3MoeConfig.__init__).parameters
    if "rope_parameters" in sig:
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    else:
        kw["rope_theta"] = 10000.0
    has_var_kw = any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.values())
    direct = {k: v for k, v in kw.items() if k in sig or has_var_kw}
    cfg = Qwen3MoeConfig(**direct)
    for k, v in kw.items():
        if k in ("rope_parameters", "rope_theta"):
            continue
        if k not in direct or getattr(cfg, k, None) != v:
            setattr(cfg, k, v)
    cfg._attn_implementation = attn
    assert cfg.head_dim == a.head_dim and cfg.norm_topk_prob and not cfg.tie_word_embeddings
    assert cfg.num_experts == a.experts and cfg.num_experts_per_tok == a.top_k
    return cfg


def build_model(cfg, attn):
    from transformers import AutoModelForCausalLM
    try:
        m = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    except TypeError:
        from transformers import Qwen3MoeForCausalLM
        cfg._attn_implementation = attn
        m = Qwen3MoeForCausalLM(cfg)
    return m


def check_rope(model, a):
    import torch
    want = 1.0 / (10000.0 ** (torch.arange(0, a.head_dim, 2, dtype=torch.float64) / a.head_dim))
    n = 0
    for mod in model.modules():
        inv = getattr(mod, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            d = (inv.double().cpu() - want).abs().max().item()
            assert d < 1e-6, "rotary inv_freq differs from theta=10000 (%g)" % d
            n += 1
    assert n > 0, "no rotary embedding found"


# ----------------------------------------------------------------------------------------------
# independent float64 forward (llama.cpp qwen3moe semantics) from GGUF-named tensors
def oracle_moe(torch, f, Wr, G, U, D, k, return_route=False):
    lg = f @ Wr.T
    pr = torch.softmax(lg, -1)
    w, idx = torch.topk(pr, k, -1)
    w = w / w.sum(-1, keepdim=True)
    g = torch.einsum("nkfh,nh->nkf", G[idx], f)
    u = torch.einsum("nkfh,nh->nkf", U[idx], f)
    h = torch.nn.functional.silu(g) * u
    y = torch.einsum("nkhf,nkf->nkh", D[idx], h)
    out = (w[..., None] * y).sum(1)
    return (out, idx, w, pr) if return_route else out


def oracle_forward(torch, T, ids, cfg):
    nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps = cfg.rms_norm_eps
    base = export_gguf.rope_theta_of(cfg)
    dev = T["token_embd.weight"].device
    n = len(ids)
    x = T["token_embd.weight"][torch.tensor(ids, device=dev)]
    pos = torch.arange(n, dtype=torch.float64, device=dev)
    inv = base ** (-torch.arange(0, hd, 2, dtype=torch.float64, device=dev) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]

    def rms(t, w):
        return t / torch.sqrt((t * t).mean(-1, keepdim=True) + eps) * w

    def rope(t):
        a, b = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], -1)

    mask = torch.triu(torch.ones(n, n, dtype=torch.bool, device=dev), 1)
    for l in range(cfg.num_hidden_layers):
        p = "blk.%d." % l
        a = rms(x, T[p + "attn_norm.weight"])
        q = (a @ T[p + "attn_q.weight"].T).view(n, nh, hd)
        k = (a @ T[p + "attn_k.weight"].T).view(n, nkv, hd)
        v = (a @ T[p + "attn_v.weight"].T).view(n, nkv, hd)
        q = rope(rms(q, T[p + "attn_q_norm.weight"]))
        k = rope(rms(k, T[p + "attn_k_norm.weight"]))
        k = k.repeat_interleave(nh // nkv, dim=1)
        v = v.repeat_interleave(nh // nkv, dim=1)
        s = torch.einsum("ihd,jhd->hij", q, k) / math.sqrt(hd)
        s = s.masked_fill(mask, float("-inf"))
        o = torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), v).reshape(n, nh * hd)
        x = x + o @ T[p + "attn_output.weight"].T
        f = rms(x, T[p + "ffn_norm.weight"])
        x = x + oracle_moe(torch, f, T[p + "ffn_gate_inp.weight"], T[p + "ffn_gate_exps.weight"],
                           T[p + "ffn_up_exps.weight"], T[p + "ffn_down_exps.weight"],
                           cfg.num_experts_per_tok)
    x = rms(x, T["output_norm.weight"])
    out = T["output.weight"] if "output.weight" in T else T["token_embd.weight"]
    return x @ out.T


def detect_expert_layout(torch, model, cfg):
    """Feed random inputs through layer 0's HF MoE block and through oracle_moe with each
    candidate interpretation of the expert tensors; return the one that matches."""
    L = model.model.layers[0]
    g = torch.Generator(device="cpu").manual_seed(0)
    x = 4.0 * torch.randn(1, 64, cfg.hidden_size, generator=g).to(next(model.parameters()).device)
    with torch.no_grad():
        y = L.mlp(x)
        if isinstance(y, tuple):
            y = y[0]
        y = y[0].double()
        res = {}
        for lay in export_gguf.possible_layouts(L.mlp):
            G, U, D = export_gguf.get_expert_mats(L.mlp, lay, cfg.moe_intermediate_size)
            E_, F_, H_ = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
            if tuple(G.shape) != (E_, F_, H_) or tuple(U.shape) != (E_, F_, H_) or tuple(D.shape) != (E_, H_, F_):
                res[lay] = float("inf")        # shapes rule this interpretation out
                continue
            yo = oracle_moe(torch, x[0].double(), L.mlp.gate.weight.double(), G.double(), U.double(),
                            D.double(), cfg.num_experts_per_tok)
            res[lay] = ((yo - y).abs().max() / y.abs().max()).item()
    log("expert layout check (relative max diff of layer-0 MoE output):", res)
    best = min(res, key=res.get)
    assert res[best] < 1e-4, "no expert layout matches the HF MoE block: %r" % res
    return best


# ----------------------------------------------------------------------------------------------
def reference_model(torch, a, eot_id, dev, state=None, gguf_reader=None):
    """float32 eager Qwen3MoeForCausalLM holding exactly the weights of the GGUF.
    state: trained float weights -> Q8_0 round trip applied here; returns the un-rounded GGUF
    tensors too (to be written).  gguf_reader: weights taken from an existing GGUF."""
    cfg = make_config(a, eot_id, "eager")
    ref = build_model(cfg, "eager").to(dev).float()
    if state is not None:
        ref.load_state_dict(state)
    ref.eval()
    assert ref.config._attn_implementation == "eager", ref.config._attn_implementation
    layout = detect_expert_layout(torch, ref, cfg)
    if gguf_reader is not None:
        export_gguf.gguf_tensors_to_hf(ref, layout, cfg, {n: gguf_reader.tensor(n) for n in gguf_reader.tensor_order})
        return ref, cfg, layout, None
    orig = export_gguf.hf_to_gguf_tensors(ref, layout, cfg)
    qdq = {n: (gguf_io.q8_0_roundtrip(arr) if t == gguf_io.GGML_Q8_0 else arr) for n, arr, t in orig}
    export_gguf.gguf_tensors_to_hf(ref, layout, cfg, qdq)
    maxq = max(float(np.abs(qdq[n] - arr).max()) for n, arr, t in orig if t == gguf_io.GGML_Q8_0)
    log("Q8_0 round trip applied to the reference model; max |w - qdq(w)| = %.3g" % maxq)
    return ref, cfg, layout, orig


def check_readback(ref, cfg, layout, path):
    rd = gguf_io.GGUFReader(path)
    now = export_gguf.hf_to_gguf_tensors(ref, layout, cfg)
    assert len(now) == len(rd.tensors), (len(now), len(rd.tensors))
    maxdiff = 0.0
    for name, arr, gtype in now:
        back = rd.tensor(name)
        assert back.shape == arr.shape, (name, back.shape, arr.shape)
        assert rd.tensors[name][1] == gtype, name
        maxdiff = max(maxdiff, float(np.abs(back - arr).max()))
    assert maxdiff == 0.0, "GGUF read-back differs from the model weights (%g)" % maxdiff
    return rd, maxdiff


def oracle_check(torch, ref, rd, cfg, seqs, dev):
    """max |oracle(float64, GGUF tensors) - transformers float32| over the given sequences."""
    TT = {n: torch.from_numpy(rd.tensor(n)).to(dev).double() for n in rd.tensor_order}
    mx, bad = 0.0, 0
    with torch.no_grad():
        for seq in seqs:
            hf = ref(input_ids=torch.tensor([seq], device=dev), use_cache=False).logits[0].double()
            orc = oracle_forward(torch, TT, seq, cfg)
            mx = max(mx, float((orc - hf).abs().max()))
            bad += int((orc.argmax(-1) != hf.argmax(-1)).sum())
    return mx, bad


def main():
    a = parse_args()
    import torch
    import torch.nn.functional as F
    import tokenizers
    import transformers
    from tokenizers import Tokenizer
    log("torch", torch.__version__, "transformers", transformers.__version__, "tokenizers",
        tokenizers.__version__, "cuda", torch.cuda.is_available(),
        torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False      # float32 work below must be true float32;
    torch.backends.cudnn.allow_tf32 = False            # training itself runs under bf16 autocast
    torch.set_float32_matmul_precision("highest")
    os.makedirs(a.data_out, exist_ok=True)
    os.makedirs(os.path.dirname(a.model_out), exist_ok=True)
    torch.manual_seed(a.seed)
    np_rng = np.random.default_rng(a.seed)

    # ---------------- data + tokenizer
    with open(a.data, "r", encoding="utf-8", newline="") as f:
        lines = f.read().splitlines(keepends=True)
    cut = next(i for i, s in enumerate(lines) if s.startswith(HELDOUT_FIRST_VERSE))
    train_lines, held_lines = lines[:cut], lines[cut:]
    log("lines: train %d (%s .. %s), held-out %d (%s .. %s)" % (
        len(train_lines), train_lines[0].split()[0], train_lines[-1].split()[0], len(held_lines),
        held_lines[0].split()[0], held_lines[-1].split()[0]))
    tok_path = os.path.join(a.tool_out, "tokenizer.json")
    if a.from_gguf:
        tok = Tokenizer.from_file(tok_path)
        log("tokenizer loaded from", tok_path)
    else:
        tok = train_tokenizer(train_lines, a.vocab)
        with open(tok_path, "w", encoding="utf-8") as f:
            f.write(tok.to_str())
        log("tokenizer trained")
    tok_json = tok.to_str()
    eot_id = tok.token_to_id(EOT)
    log("vocab", tok.get_vocab_size(), "eot", eot_id, "merges", len(json.loads(tok_json)["model"]["merges"]))

    train_ids = np.concatenate([np.array(e.ids, dtype=np.int64) for e in tok.encode_batch(train_lines)])
    held_text = "".join(held_lines)
    held_ids = np.array(tok.encode(held_text).ids, dtype=np.int64)
    per_line = np.concatenate([np.array(e.ids, dtype=np.int64) for e in tok.encode_batch(held_lines)])
    log("tokens: train %d (%.2f bytes/token), held-out %d; per-line == whole-text encoding: %s" % (
        len(train_ids), sum(len(s.encode()) for s in train_lines) / len(train_ids), len(held_ids),
        np.array_equal(per_line, held_ids)))

    # unigram baseline (add-one) on the held-out split, same positions as the windowed eval
    counts = np.bincount(train_ids, minlength=a.vocab).astype(np.float64) + 1.0
    logp_uni = np.log(counts / counts.sum())
    nwin_h = len(held_ids) // a.seq
    hw = held_ids[:nwin_h * a.seq].reshape(nwin_h, a.seq)
    unigram_ce = float(-logp_uni[hw[:, 1:]].mean())
    log("unigram held-out CE %.4f nats (ppl %.1f)" % (unigram_ce, math.exp(unigram_ce)))
    train_t = torch.from_numpy(train_ids).to(dev)
    held_t = torch.from_numpy(hw).to(dev)
    ar = torch.arange(a.seq, device=dev)

    @torch.no_grad()
    def eval_windows(m, win, autocast=True, bs=64):
        was_training = m.training
        m.eval()
        tot, cnt = 0.0, 0
        for i in range(0, win.shape[0], bs):
            x = win[i:i + bs]
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                lg = m(input_ids=x, use_cache=False).logits
            lp = torch.log_softmax(lg.float(), -1)[:, :-1]
            nll = -lp.gather(-1, x[:, 1:, None])[..., 0]
            tot += nll.double().sum().item()
            cnt += nll.numel()
        m.train(was_training)
        return tot / cnt

    prompt_ids = [tok.encode(t).ids for t in PROMPTS]
    train_facts = {}

    if not a.from_gguf:
        # ---------------- model
        cfg = make_config(a, eot_id, "sdpa")
        model = build_model(cfg, "sdpa").to(dev).float()
        torch.manual_seed(a.seed)
        with torch.no_grad():      # explicit init (= HF's default scheme), independent of the version
            for p_ in model.parameters():
                if p_.ndim >= 2:
                    p_.normal_(0.0, cfg.initializer_range)
                else:
                    p_.fill_(1.0)  # the only 1-D parameters are RMSNorm weights
        check_rope(model, a)
        assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr(), "tied?"
        log("dtype", next(model.parameters()).dtype, "attn", model.config._attn_implementation,
            "sliding_window", getattr(model.config, "sliding_window", None),
            "use_sliding_window", getattr(model.config, "use_sliding_window", None))

        # ---------------- pre-flight: the whole export/verification path on the initial weights
        ref0, cfg0, layout0, orig0 = reference_model(torch, a, eot_id, dev, state=model.state_dict())
        pf = os.path.join("/tmp", "preflight-%d.gguf" % os.getpid())
        export_gguf.write_gguf(pf, cfg0, orig0, tok_json, "preflight")
        rd0, _ = check_readback(ref0, cfg0, layout0, pf)
        mx0, bad0 = oracle_check(torch, ref0, rd0, cfg0, [prompt_ids[0] + prompt_ids[1]], dev)
        log("pre-flight on initial weights: layout %s, GGUF read-back exact, oracle max diff %.3g, argmax diffs %d"
            % (layout0, mx0, bad0))
        os.unlink(pf)
        del ref0, rd0, orig0

        n_params = sum(p.numel() for p in model.parameters())
        n_expert_params = 3 * a.experts * a.hidden * a.expert_ff * a.layers
        n_active = n_params - n_expert_params + n_expert_params * a.top_k // a.experts - a.vocab * a.hidden
        log("model: %d parameters (%.2fM), experts %.2fM, active per token (excl. embedding) %.2fM" % (
            n_params, n_params / 1e6, n_expert_params / 1e6, n_active / 1e6))

        # ---------------- training
        decay, no_decay = [], []
        for n_, p_ in model.named_parameters():
            (decay if p_.ndim >= 2 and not n_.endswith("mlp.gate.weight") else no_decay).append(p_)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": a.wd},
                                 {"params": no_decay, "weight_decay": 0.0}],
                                lr=a.lr, betas=(0.9, 0.95), eps=1e-8, fused=(dev.type == "cuda"))

        def lr_at(step):
            if step < a.warmup:
                return a.lr * (step + 1) / a.warmup
            t = (step - a.warmup) / max(1, a.steps - a.warmup)
            return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))

        def aux_of(out):
            aux = getattr(out, "aux_loss", None)
            if aux is None and getattr(out, "router_logits", None) is not None:
                from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func
                aux = load_balancing_loss_func(out.router_logits, a.experts, a.top_k, None)
            return aux

        curve = open(os.path.join(a.tool_out, "loss_curve.tsv"), "w")
        curve.write("# step\ttokens\ttrain_ce\ttrain_aux\theldout_ce\tlr\telapsed_s"
                    "   (train_ce/aux: mean over the steps since the previous row, bf16 autocast;"
                    " heldout_ce: all %d held-out windows of %d tokens, nats/token; unigram %.4f)\n"
                    % (nwin_h, a.seq, unigram_ce))
        best = (float("inf"), -1, None)
        model.train()
        t_train = time.time()
        acc_ce, acc_aux, acc_n = 0.0, 0.0, 0
        step = 0
        stopped_early = False
        for step in range(1, a.steps + 1):
            for gparam in opt.param_groups:
                gparam["lr"] = lr_at(step - 1)
            starts = torch.from_numpy(np_rng.integers(0, len(train_ids) - a.seq, size=a.batch)).to(dev)
            x = train_t[starts[:, None] + ar[None, :]]
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                out = model(input_ids=x, use_cache=False, output_router_logits=True)
            lg = out.logits.float()
            ce = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), x[:, 1:].reshape(-1))
            aux = aux_of(out)
            loss = ce + (a.aux_coef * aux if aux is not None else 0.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            acc_ce += ce.item()
            acc_aux += float(aux.detach()) if aux is not None else float("nan")
            acc_n += 1
            if step == 10:
                log("10 steps done (%.2f s/step incl. warm-up)" % ((time.time() - t_train) / 10))
            over = time.time() - t_train > a.max_train_seconds
            if step % a.eval_every == 0 or step == a.steps or over:
                hce = eval_windows(model, held_t)
                el = time.time() - t_train
                curve.write("%d\t%d\t%.4f\t%.4f\t%.4f\t%.6f\t%.1f\n" % (
                    step, step * a.batch * a.seq, acc_ce / acc_n, acc_aux / acc_n, hce, lr_at(step - 1), el))
                curve.flush()
                log("step %5d  train %.4f  aux %.4f  held-out %.4f  lr %.2e  %.0f s" % (
                    step, acc_ce / acc_n, acc_aux / acc_n, hce, lr_at(step - 1), el))
                acc_ce, acc_aux, acc_n = 0.0, 0.0, 0
                if hce < best[0]:
                    best = (hce, step, {k: v.detach().clone() for k, v in model.state_dict().items()})
            if over:
                stopped_early = True
                log("stopping: --max-train-seconds reached at step", step)
                break
        train_seconds = time.time() - t_train
        curve.close()
        log("training done: %d steps in %.1f s; best held-out %.4f at step %d" % (step, train_seconds, best[0], best[1]))
        train_facts = dict(n_params=n_params, train_steps=step, train_seconds="%.1f" % train_seconds,
                           stopped_early=int(stopped_early), best_step=best[1],
                           best_heldout_ce_bf16="%.4f" % best[0])
        del model, opt

        ref, ref_cfg, layout, orig = reference_model(torch, a, eot_id, dev, state=best[2])
        size = export_gguf.write_gguf(a.model_out, ref_cfg, orig, tok_json, "moe_infer demo (KJV, qwen3moe)")
    else:
        info_path = os.path.join(a.data_out, "model_info.txt")
        if not os.path.exists(info_path):
            info_path = os.path.join(ROOT, "tests", "data", "model_info.txt")
        if os.path.exists(info_path):
            keep = ("n_params", "train_steps", "train_seconds", "stopped_early", "best_step", "best_heldout_ce_bf16")
            for ln in open(info_path):
                kv = ln.split()
                if len(kv) == 2 and kv[0] in keep:
                    train_facts[kv[0]] = kv[1]
        ref, ref_cfg, layout, _ = reference_model(torch, a, eot_id, dev, gguf_reader=gguf_io.GGUFReader(a.model_out))
        size = os.path.getsize(a.model_out)
    log("expert tensor layout:", layout)

    rd, maxdiff = check_readback(ref, ref_cfg, layout, a.model_out)
    sha = hashlib.sha256(open(a.model_out, "rb").read()).hexdigest()
    log("GGUF %s: %d bytes (%.2f MiB), %d tensors, sha256 %s; read-back max |diff| vs model = %g" % (
        a.model_out, size, size / 2 ** 20, len(rd.tensors), sha, maxdiff))
    n_params = sum(p.numel() for p in ref.parameters())

    # ---------------- reference: prompts
    @torch.no_grad()
    def logits_of(ids):
        return ref(input_ids=torch.tensor([ids], device=dev), use_cache=False).logits[0].float()

    prompts_out = []
    greedy_mismatch = 0
    min_margin = float("inf")
    for pi, text in enumerate(PROMPTS):
        pids = prompt_ids[pi]
        seq = list(pids)
        for _ in range(a.n_gen):
            seq.append(int(torch.argmax(logits_of(seq)[-1]).item()))
        full = logits_of(seq)                                   # [L, V]
        top2 = torch.topk(full, 2, -1).values
        for i in range(len(pids) - 1, len(seq) - 1):
            if int(torch.argmax(full[i])) != seq[i + 1]:
                greedy_mismatch += 1
            min_margin = min(min_margin, float(top2[i, 0] - top2[i, 1]))
        tv, ti = torch.topk(full, a.top_n, -1)
        prompts_out.append(dict(text=text, ids=pids, seq=seq, gen=seq[len(pids):],
                                gen_text=tok.decode(seq[len(pids):], skip_special_tokens=False),
                                topi=ti.cpu().numpy(), topv=tv.cpu().numpy()))
        if pi == 0:
            full.cpu().numpy().astype("<f4").tofile(os.path.join(a.data_out, "ref_logits_p0.f32"))
        log("prompt %d %r -> %r" % (pi, text, prompts_out[-1]["gen_text"][:150]))
    oracle_max, oracle_bad = oracle_check(torch, ref, rd, ref_cfg, [P["seq"] for P in prompts_out], dev)
    log("oracle (float64, from GGUF tensors) vs transformers float32 over all prompt sequences: max |logit diff| %.3g,"
        " argmax mismatches %d; greedy re-check mismatches %d; smallest top1-top2 margin on greedy paths %.4g" % (
            oracle_max, oracle_bad, greedy_mismatch, min_margin))

    with open(os.path.join(a.data_out, "ref_prompts.txt"), "w", encoding="utf-8") as f:
        f.write("# transformers %s float32 eager reference for models/demo-qwen3moe.gguf (sha256 %s)\n"
                % (transformers.__version__, sha))
        f.write("# format: tests/data/README.md. Row r: token at position r, then the top-%d (id logit) "
                "pairs of the logits after that token, best first.\n" % a.top_n)
        f.write("n_prompts %d\nn_vocab %d\ntop_n %d\nn_gen %d\n" % (len(PROMPTS), a.vocab, a.top_n, a.n_gen))
        for pi, P in enumerate(prompts_out):
            f.write("prompt %d\n" % pi)
            f.write("# text: %s\n" % json.dumps(P["text"], ensure_ascii=False))
            f.write("text_hex %s\n" % P["text"].encode().hex())
            f.write("n_prompt_tokens %d\n" % len(P["ids"]))
            f.write("prompt_ids %s\n" % " ".join(map(str, P["ids"])))
            f.write("gen_ids %s\n" % " ".join(map(str, P["gen"])))
            f.write("# greedy: %s\n" % json.dumps(P["gen_text"], ensure_ascii=False))
            f.write("gen_text_hex %s\n" % P["gen_text"].encode().hex())
            f.write("rows %d\n" % len(P["seq"]))
            for r in range(len(P["seq"])):
                pairs = " ".join("%d %.9g" % (int(i), float(v)) for i, v in zip(P["topi"][r], P["topv"][r]))
                f.write("r %d %d %s\n" % (r, P["seq"][r], pairs))
            f.write("end\n")

    # ---------------- held-out perplexity on tests/data/heldout.txt
    sel, nb = [], 0
    for s in held_lines:
        if nb + len(s.encode()) > a.heldout_bytes:
            break
        sel.append(s)
        nb += len(s.encode())
    ho_text = "".join(sel)
    with open(os.path.join(a.data_out, "heldout.txt"), "w", encoding="utf-8", newline="") as f:
        f.write(ho_text)
    ho_ids = tok.encode(ho_text).ids
    with open(os.path.join(a.data_out, "heldout_tokens.txt"), "w") as f:
        f.write("n_tokens %d\n" % len(ho_ids))
        for i in range(0, len(ho_ids), 16):
            f.write(" ".join(map(str, ho_ids[i:i + 16])) + "\n")
    nw = len(ho_ids) // a.seq
    W = torch.tensor(ho_ids[:nw * a.seq], device=dev).view(nw, a.seq)
    win_nll = []
    with torch.no_grad():
        for i in range(0, nw, 8):
            x = W[i:i + 8]
            lp = torch.log_softmax(ref(input_ids=x, use_cache=False).logits.float(), -1)[:, :-1]
            nll = -lp.gather(-1, x[:, 1:, None])[..., 0]
            win_nll += nll.double().sum(-1).tolist()
    npred = nw * (a.seq - 1)
    ppl = math.exp(sum(win_nll) / npred)
    with open(os.path.join(a.data_out, "heldout_ppl.txt"), "w") as f:
        f.write("# transformers float32 eager perplexity of tests/data/heldout.txt (no BOS; windows of %d tokens,"
                " non-overlapping, final partial window dropped; tokens 1..%d of each window predicted)\n"
                % (a.seq, a.seq - 1))
        f.write("n_tokens %d\nwindow %d\nn_windows %d\nn_predicted %d\n" % (len(ho_ids), a.seq, nw, npred))
        f.write("ppl %.6g\n" % ppl)
        f.write("mean_nll %.9g\n" % (sum(win_nll) / npred))
        f.write("# per window: index, sum of NLL (nats) over its %d predicted tokens\n" % (a.seq - 1))
        for i, s in enumerate(win_nll):
            f.write("w %d %.9g\n" % (i, s))
    log("heldout.txt: %d bytes, %d lines (%s .. %s), %d tokens, %d windows; ppl %.6g" % (
        nb, len(sel), sel[0].split()[0], sel[-1].split()[0], len(ho_ids), nw, ppl))

    # ---------------- routing traces (first --route-windows windows of heldout_tokens)
    nrw = min(a.route_windows, nw)
    cap = {}
    hooks = []
    for li, L in enumerate(ref.model.layers):
        hooks.append(L.mlp.register_forward_pre_hook(
            lambda mod, args, kwargs, li=li: cap.__setitem__(
                ("in", li), (args[0] if args else kwargs["hidden_states"]).detach()),
            with_kwargs=True))
        hooks.append(L.mlp.gate.register_forward_hook(
            lambda mod, args, out, li=li: cap.__setitem__(("gate", li), out)))
    n_tok = nrw * a.seq
    ids_r = np.zeros((n_tok, a.layers, a.top_k), np.int32)
    w_r = np.zeros((n_tok, a.layers, a.top_k), np.float32)
    p_r = np.zeros((n_tok, a.layers, a.experts), np.float32)
    hf_sel_mismatch = 0
    hf_sel_checked = 0
    with torch.no_grad():
        for wi in range(nrw):
            ref(input_ids=W[wi:wi + 1], use_cache=False)
            for li, L in enumerate(ref.model.layers):
                xin = cap[("in", li)].reshape(-1, a.hidden).float()
                lg = torch.nn.functional.linear(xin, L.mlp.gate.weight)
                pr = torch.softmax(lg, -1, dtype=torch.float)
                tw, ti = torch.topk(pr, a.top_k, -1)
                tw = tw / tw.sum(-1, keepdim=True)
                s = slice(wi * a.seq, (wi + 1) * a.seq)
                ids_r[s, li] = ti.cpu().numpy()
                w_r[s, li] = tw.cpu().numpy()
                p_r[s, li] = pr.cpu().numpy()
                go = cap[("gate", li)]
                cand = [t for t in (go if isinstance(go, (tuple, list)) else [go])
                        if isinstance(t, torch.Tensor) and not t.is_floating_point()]
                if cand:
                    hf_sel = cand[0].reshape(-1, a.top_k)
                    hf_sel_checked += hf_sel.shape[0]
                    hf_sel_mismatch += int((torch.sort(hf_sel, -1).values != torch.sort(ti, -1).values)
                                           .any(-1).sum())
    for h in hooks:
        h.remove()
    with open(os.path.join(a.data_out, "routing_heldout.bin"), "wb") as f:
        f.write(b"MOERTRC1")
        f.write(struct.pack("<6I", nrw, a.seq, a.layers, a.experts, a.top_k, 0))
        f.write(np.asarray(ho_ids[:n_tok], dtype="<i4").tobytes())
        f.write(ids_r.astype("<i4").tobytes())
        f.write(w_r.astype("<f4").tobytes())
        f.write(p_r.astype("<f4").tobytes())
    sp = -np.sort(-p_r, -1)
    gap = sp[..., a.top_k - 1] - sp[..., a.top_k]
    load = np.bincount(ids_r.reshape(-1), minlength=a.experts)
    log("routing: %d tokens x %d layers; selections re-checked against the HF router's own output: %d/%d differ;"
        " k-th vs (k+1)-th prob gap < 1e-4 in %d of %d (token,layer); expert load (all layers) %s" % (
            n_tok, a.layers, hf_sel_mismatch, hf_sel_checked, int((gap < 1e-4).sum()), gap.size, load.tolist()))

    # ---------------- tokenizer cases
    with open(os.path.join(a.data_out, "tokenizer_cases.txt"), "w", encoding="utf-8") as f:
        f.write("# HF tokenizers %s encode(text).ids of tools/train_demo/tokenizer.json (= the GGUF vocab);"
                " special tokens in the text are matched (llama.cpp: parse_special=true); no BOS.\n"
                % tokenizers.__version__)
        f.write("# line: <utf-8 text as hex> <n_ids> <ids...>\n")
        for text in TOKENIZER_CASES + PROMPTS:
            ids = tok.encode(text).ids
            if tok.decode(ids, skip_special_tokens=False) != text:
                log("WARNING: decode(encode(%r)) differs" % text)
            f.write("# %s\n" % json.dumps(text, ensure_ascii=False))
            f.write("%s %d %s\n" % (text.encode().hex(), len(ids), " ".join(map(str, ids))))

    # ---------------- final losses (float32, Q8_0 weights)
    g = np.random.default_rng(a.seed + 1)
    st = torch.from_numpy(g.integers(0, len(train_ids) - a.seq, size=256)).to(dev)
    final_train = eval_windows(ref, train_t[st[:, None] + ar[None, :]], autocast=False, bs=32)
    final_held = eval_windows(ref, held_t, autocast=False, bs=32)
    log("final (float32, Q8_0 weights): train CE %.4f (256 random windows), held-out CE %.4f (ppl %.2f),"
        " unigram %.4f" % (final_train, final_held, math.exp(final_held), unigram_ce))

    info = [
        ("gguf", os.path.relpath(a.model_out, ROOT)), ("gguf_bytes", size), ("gguf_sha256", sha),
        ("architecture", "qwen3moe"), ("n_vocab", a.vocab), ("n_embd", a.hidden), ("n_layer", a.layers),
        ("n_head", a.heads), ("n_head_kv", a.kv_heads), ("head_dim", a.head_dim),
        ("n_expert", a.experts), ("n_expert_used", a.top_k), ("n_ff_exp", a.expert_ff),
        ("n_ctx_train", 512), ("rope_freq_base", 10000), ("rms_eps", "1e-06"), ("eot_id", eot_id),
        ("n_params", train_facts.get("n_params", n_params)), ("expert_layout_hf", layout),
    ]
    info += [(k, train_facts[k]) for k in ("train_steps", "train_seconds", "stopped_early", "best_step",
                                           "best_heldout_ce_bf16") if k in train_facts]
    info += [
        ("final_train_ce_f32", "%.4f" % final_train), ("final_heldout_ce_f32", "%.4f" % final_held),
        ("unigram_heldout_ce", "%.4f" % unigram_ce),
        ("heldout_txt_ppl", "%.6g" % ppl), ("heldout_txt_tokens", len(ho_ids)),
        ("oracle_max_abs_logit_diff", "%.3g" % oracle_max), ("greedy_min_margin", "%.4g" % min_margin),
        ("transformers", transformers.__version__), ("torch", torch.__version__),
        ("tokenizers", tokenizers.__version__), ("seed", a.seed),
        ("device", (torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu").replace(" ", "_")),
    ]
    with open(os.path.join(a.data_out, "model_info.txt"), "w") as f:
        f.write("# facts about models/demo-qwen3moe.gguf and the run that made it (key value)\n")
        for k, v in info:
            f.write("%s %s\n" % (k, v))
    log("all done in %.1f s" % (time.time() - T0))


if __name__ == "__main__":
    main()
