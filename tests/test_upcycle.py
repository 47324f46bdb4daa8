"""upcycle.py: dense GGUF / HF Llama -> Mixtral-layout MoE that computes the dense function."""
import json
import math
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from conftest import ROOT
from gguf.quants import dequantize, quantize
from reference import reference_logits
from safetensors import safe_open
from safetensors.torch import save_file
from tokenizers import pre_tokenizers

import upcycle
from mmmoe import BadInput, MMMoE, load_tokenizer

D, I, L, H, KV = 32, 64, 2, 4, 2
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "t he", "c a", "ca t", "Ġ cat"]


def dense_llama(vocab, seed=0):
    """A random dense Llama state dict in the HF layout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    sd = {"model.embed_tokens.weight": torch.randn(vocab, D, generator=g), "model.norm.weight": 1 + r(D)}
    for i in range(L):
        p = f"model.layers.{i}."
        sd |= {p + "self_attn.q_proj.weight": r(H * 8, D), p + "self_attn.k_proj.weight": r(KV * 8, D),
               p + "self_attn.v_proj.weight": r(KV * 8, D), p + "self_attn.o_proj.weight": r(D, H * 8),
               p + "mlp.gate_proj.weight": r(I, D), p + "mlp.up_proj.weight": r(I, D), p + "mlp.down_proj.weight": r(D, I),
               p + "input_layernorm.weight": 1 + r(D), p + "post_attention_layernorm.weight": 1 + r(D)}
    return sd


def as_one_expert(sd):
    """The dense model written as a 1-expert Mixtral (a softmax over one expert is exactly 1)."""
    out = {}
    for k, v in sd.items():
        if ".mlp." in k:
            layer, proj = k.split(".mlp.")
            w = {"gate_proj.weight": "w1", "up_proj.weight": "w3", "down_proj.weight": "w2"}[proj]
            out[f"{layer}.block_sparse_moe.experts.0.{w}.weight"] = v
            out[f"{layer}.block_sparse_moe.gate.weight"] = torch.zeros(1, D)
        else:
            out[k] = v
    return out


def hf_cfg(vocab, tied=True):
    return {"hidden_size": D, "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": 8,
            "num_hidden_layers": L, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": tied,
            "num_local_experts": 1, "num_experts_per_tok": 1, "vocab_size": vocab}


def llamacpp_permute(w, heads):
    """What llama.cpp's converter does to Q and K rows (interleaving the two RoPE halves of each head)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path, sd, arch="llama", skip=(), q8=(), odd_type=None):
    tokens = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [m.replace(" ", "") for m in MERGES]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(L), w.add_context_length(128), w.add_embedding_length(D), w.add_feed_forward_length(I)
    w.add_head_count(H), w.add_head_count_kv(KV), w.add_rope_freq_base(10000.0), w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2"), w.add_token_list(tokens), w.add_token_merges(MERGES)
    w.add_token_types([3] * 3 + [1] * (len(tokens) - 3)), w.add_bos_token_id(1), w.add_eos_token_id(2)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    names |= {f"model.layers.{i}.{k}.weight": f"blk.{i}.{v}.weight" for i in range(L) for k, v in per_layer.items()}
    effective = {}  # what the GGUF really holds, in the HF layout (after Q8_0 rounding)
    for hf_name, t in sd.items():
        name, a = names[hf_name], t.numpy()
        if name in skip:
            continue
        stored = llamacpp_permute(a, H if "attn_q" in name else KV) if ("attn_q" in name or "attn_k" in name) else a
        if name in q8:
            raw = quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            a_eff = dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
            if "attn_q" in name or "attn_k" in name:  # undo the permutation to get the HF-layout value
                heads = H if "attn_q" in name else KV
                a_eff = a_eff.reshape(heads, a.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(a.shape)
            effective[hf_name] = torch.from_numpy(a_eff.copy())
        elif name == odd_type:
            w.add_tensor(name, stored.astype(np.int32))
        else:
            w.add_tensor(name, np.ascontiguousarray(stored))
            effective[hf_name] = t
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return effective, len(tokens)


def test_gguf_copy_upcycle_equals_dense(tmp_path):
    vocab = 3 + 256 + len(MERGES)
    sd = dense_llama(vocab)
    eff, _ = write_gguf(tmp_path / "m.gguf", sd, q8=("blk.0.attn_q.weight", "blk.1.ffn_down.weight"))
    upcycle.upcycle(tmp_path / "m.gguf", tmp_path / "moe", experts=4, top_k=2)
    model = MMMoE.from_pretrained(tmp_path / "moe")
    assert (model.config.n_experts, model.config.top_k, model.config.tie_word_embeddings) == (4, 2, True)
    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    dense = reference_logits(as_one_expert(eff), hf_cfg(vocab), ids[0].tolist())  # independent of upcycle.py
    assert (model(ids)[0][0].double() - dense).abs().max() < 1e-4
    with safe_open(tmp_path / "moe" / "model.safetensors", "pt") as f:  # four identical copies on disk ...
        w1 = [f.get_tensor(f"model.layers.1.block_sparse_moe.experts.{j}.w1.weight") for j in range(4)]
    assert all(torch.equal(w, w1[0]) for w in w1)
    assert len(model.model.layers[1].block_sparse_moe.experts.w1) == 1  # ... and one in memory


def test_gguf_tokenizer(tmp_path):
    write_gguf(tmp_path / "m.gguf", dense_llama(3 + 256 + len(MERGES)))
    upcycle.upcycle(tmp_path / "m.gguf", tmp_path / "moe", experts=2, top_k=1)
    tok = load_tokenizer(tmp_path / "moe")
    enc = tok.encode("<|im_start|>the cat 2024<|im_end|>")
    assert enc.tokens[:4] == ["<|im_start|>", "the", "Ġcat", "Ġ"]  # specials atomic, merges applied
    assert enc.tokens[4:8] == ["2", "0", "2", "4"]  # digits one by one
    assert tok.decode(enc.ids, skip_special_tokens=False) == "<|im_start|>the cat 2024<|im_end|>"
    cfg = json.loads((tmp_path / "moe" / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")


def write_hf_llama(path, sd, vocab, arch="LlamaForCausalLM", tied=False):
    path.mkdir()
    cfg = {"architectures": [arch], "hidden_size": D, "intermediate_size": I, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": KV, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "vocab_size": vocab, "tie_word_embeddings": tied, "max_position_embeddings": 128, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, path / "model.safetensors")
    return path


def test_hf_llama_copy_and_split(tmp_path):
    sd = dense_llama(50) | {"lm_head.weight": torch.randn(50, D) * 0.2}
    src = write_hf_llama(tmp_path / "llama", sd, 50)
    upcycle.upcycle(src, tmp_path / "copy", experts=4, top_k=2)
    ids = torch.arange(3, 15)[None]
    copy = MMMoE.from_pretrained(tmp_path / "copy")
    dense = reference_logits(as_one_expert(sd), hf_cfg(50, tied=False), ids[0].tolist())
    assert (copy(ids)[0][0].double() - dense).abs().max() < 1e-4

    upcycle.upcycle(src, tmp_path / "split", experts=4, top_k=2, mode="split")
    split = MMMoE.from_pretrained(tmp_path / "split")
    assert split.config.intermediate_size == I // 4
    moe = split.model.layers[0].block_sparse_moe.experts
    # the experts partition the dense FFN's neurons; down projections carry the E/k = 2 rescale
    assert torch.equal(torch.cat(list(moe.w1)), sd["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(torch.cat(list(moe.w3)), sd["model.layers.0.mlp.up_proj.weight"])
    assert torch.allclose(torch.cat(list(moe.w2), dim=1), 2 * sd["model.layers.0.mlp.down_proj.weight"])
    assert (split(ids)[0][0].double() - dense).abs().max() > 1e-2  # text changes: documented


def test_real_smollm2_wheel(tmp_path, monkeypatch):
    """The built-in base: copy-upcycled logits equal the dense model's, it still answers and scores English."""
    monkeypatch.setenv("MMMOE_CACHE", str(tmp_path / "cache"))
    moe_dir = upcycle.builtin_base(experts=3, top_k=2)
    stamp = (moe_dir / "config.json").stat().st_mtime_ns
    assert upcycle.builtin_base(experts=3, top_k=2) == moe_dir  # cached: built once
    assert (moe_dir / "config.json").stat().st_mtime_ns == stamp
    upcycle.upcycle(upcycle.builtin_gguf(), tmp_path / "dense", experts=1, top_k=1)  # the dense model itself
    tok = load_tokenizer(moe_dir)
    text = "The quick brown fox jumps over the lazy dog. It was a sunny day in the park, and children were playing."
    ids = torch.tensor([tok.encode(text).ids])
    moe = MMMoE.from_pretrained(moe_dir)
    with torch.no_grad():
        logits, loss = moe(ids[:, :-1])[0], moe(ids[:, :-1], ids[:, 1:])[1]
        dense = MMMoE.from_pretrained(tmp_path / "dense")(ids[:, :-1])[0]
    assert (logits - dense).abs().max() < 1e-3
    assert abs(math.exp(loss.item()) - 20.56) < 0.05  # transformers' own GGUF loading gives 20.56
    prompt = torch.tensor([tok.encode(upcycle.chat_prompt("What is the capital of France?")).ids])
    answer = tok.decode(moe.generate(prompt, 20, temperature=0, stop_at_eos=True)[0, prompt.shape[1]:].tolist())
    assert "Paris" in answer, answer


# --- bad input: one line, non-zero exit, no output directory ---------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "upcycle.py"), *map(str, args)], capture_output=True, text=True)


@pytest.mark.parametrize("case", ["arch", "missing", "quant", "not_llama", "topk", "text", "truncated"])
def test_bad_input(tmp_path, case):
    sd = dense_llama(3 + 256 + len(MERGES))
    src, words = tmp_path / "m.gguf", ()
    if case == "arch":
        write_gguf(src, sd, arch="qwen2")
        words = ("GGUF architecture 'qwen2' is not supported",)
    elif case == "missing":
        write_gguf(src, sd, skip=("blk.1.ffn_up.weight",))
        words = ("missing tensor blk.1.ffn_up.weight",)
    elif case == "quant":
        write_gguf(src, sd, odd_type="blk.0.attn_v.weight")
        words = ("unsupported quantisation type I32", "blk.0.attn_v.weight")
    elif case == "text":
        src.write_text("not a model\n")
        words = ("m.gguf is not a readable GGUF file", "magic")
    elif case == "truncated":
        write_gguf(src, sd)
        src.write_bytes(src.read_bytes()[:src.stat().st_size * 2 // 3])
        words = ("m.gguf is not a readable GGUF file (truncated",)
    elif case == "not_llama":
        src = write_hf_llama(tmp_path / "qwen", {"x": torch.zeros(1)}, 10, arch="Qwen2ForCausalLM")
        words = ("not a Llama/Mistral checkpoint",)
    else:
        write_gguf(src, sd)
    extra = ("--experts", 2, "--top-k", 3) if case == "topk" else ()
    words = words or ("--experts (2) must be at least --top-k (3)",)
    r = run_cli("--source", src, "--out", tmp_path / "out", *extra)
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0, r.stderr
    assert all(w in r.stderr for w in words), r.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))  # nothing half-written


def test_out_never_replaces_the_users_files(tmp_path):
    write_gguf(tmp_path / "m.gguf", dense_llama(3 + 256 + len(MERGES)))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = run_cli("--source", tmp_path / "m.gguf", "--out", mine)
    assert r.returncode == 1 and "holds files that mmmoe did not write there (notes.txt)" in r.stderr, r.stderr
    assert (mine / "notes.txt").read_text() == "keep me"
    (tmp_path / "a_file").write_text("x")
    r = run_cli("--source", tmp_path / "m.gguf", "--out", tmp_path / "a_file")
    assert r.returncode == 1 and "is a file" in r.stderr and (tmp_path / "a_file").read_text() == "x"
    # its own output it may replace: a second run over the first one succeeds
    assert run_cli("--source", tmp_path / "m.gguf", "--out", tmp_path / "moe").returncode == 0
    assert run_cli("--source", tmp_path / "m.gguf", "--out", tmp_path / "moe").returncode == 0


def test_damaged_tokenizer_is_one_line(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": 3}')
    with pytest.raises(BadInput, match=r"damaged checkpoint file .*tokenizer\.json"):
        load_tokenizer(tmp_path)
