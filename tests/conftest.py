"""Tiny random checkpoints written in the exact Hugging Face layouts (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE), by the tests themselves."""
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

WORDS = ["<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(94)]  # 97 tokens, one per id


def tiny_hf_config(*, vocab=97, dim=64, layers=2, heads=4, kv_heads=2, inter=96, experts=4, top_k=2,
                   tied=False, newer=True, window=None, max_pos=256):
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": vocab,
           "hidden_size": dim, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": heads, "num_key_value_heads": kv_heads, "num_local_experts": experts,
           "num_experts_per_tok": top_k, "rms_norm_eps": 1e-5, "max_position_embeddings": max_pos,
           "tie_word_embeddings": tied, "sliding_window": window, "hidden_act": "silu",
           "bos_token_id": 0, "eos_token_id": 1}
    if newer:  # transformers >= 5: nested RoPE parameters, "dtype", explicit head_dim
        cfg |= {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "dtype": "float32",
                "head_dim": dim // heads}
    else:  # older: top-level rope_theta and torch_dtype
        cfg |= {"rope_theta": 10000.0, "torch_dtype": "float32"}
    return cfg


# The three other layouts, each as transformers 5 writes its config.json (the fields that matter), tiny and with
# every feature on that the layout has: Qwen2-MoE a shared expert, q/k/v biases, a dense layer (mlp_only_layers)
# and no renormalised top-k; Qwen3-MoE per-head q/k norms, head_dim unlike hidden / heads, a dense layer by
# decoder_sparse_step; OLMoE q/k norms over the whole projection, clip_qkv, 8 experts top-3, no renormalisation.
LAYOUTS = {
    "qwen2_moe": {"architectures": ["Qwen2MoeForCausalLM"], "num_experts": 4, "moe_intermediate_size": 32,
                  "intermediate_size": 80, "shared_expert_intermediate_size": 48, "norm_topk_prob": False,
                  "qkv_bias": True, "decoder_sparse_step": 1, "mlp_only_layers": [1], "use_sliding_window": False,
                  "sliding_window": 0, "max_window_layers": 28},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "num_experts": 4, "moe_intermediate_size": 32,
                  "intermediate_size": 80, "head_dim": 24, "norm_topk_prob": True, "attention_bias": False,
                  "decoder_sparse_step": 2, "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None},
    "olmoe": {"architectures": ["OlmoeForCausalLM"], "num_experts": 8, "num_experts_per_tok": 3, "intermediate_size": 32,
              "norm_topk_prob": False, "attention_bias": False, "clip_qkv": 2.0},
}


def tiny_layout_config(layout, layers=3, **kw):
    """A tiny config.json of one of LAYOUTS (mixtral: tiny_hf_config's)."""
    if layout == "mixtral":
        return tiny_hf_config(layers=layers, **kw)
    cfg = {k: v for k, v in tiny_hf_config(layers=layers, **kw).items()
           if k not in ("num_local_experts", "sliding_window", "head_dim", "architectures")}
    return cfg | {"model_type": layout, "rms_norm_eps": 1e-6} | LAYOUTS[layout]


def dense_layer(cfg, i):
    """Qwen's rule: a layer without experts if listed in mlp_only_layers or off the decoder_sparse_step grid."""
    return cfg["model_type"].startswith("qwen") and (i in cfg["mlp_only_layers"] or (i + 1) % cfg["decoder_sparse_step"] != 0)


def tiny_hf_state_dict(cfg, seed=0, copies=False):
    """Random weights under the layout's names; copies=True: every expert of a layer holds the same FFN (a
    copy-upcycled base)."""
    g = torch.Generator().manual_seed(seed)
    layout = cfg["model_type"]
    D, V = cfg["hidden_size"], cfg["vocab_size"]
    E = cfg.get("num_local_experts") or cfg["num_experts"]
    I = cfg["moe_intermediate_size"] if layout.startswith("qwen") else cfg["intermediate_size"]
    hd = cfg.get("head_dim") or D // cfg["num_attention_heads"]
    H, KV = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    moe, names = ("block_sparse_moe", ("w1", "w2", "w3")) if layout == "mixtral" else ("mlp", ("gate_proj", "down_proj", "up_proj"))
    rnd = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731
    mlp = lambda p, inter: {p + names[0] + ".weight": rnd(inter, D), p + names[1] + ".weight": rnd(D, inter),  # noqa: E731
                            p + names[2] + ".weight": rnd(inter, D)}
    sd = {"model.embed_tokens.weight": torch.randn(V, D, generator=g), "model.norm.weight": 1 + rnd(D)}
    if not cfg["tie_word_embeddings"]:
        sd["lm_head.weight"] = rnd(V, D)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd |= {p + "input_layernorm.weight": 1 + rnd(D), p + "post_attention_layernorm.weight": 1 + rnd(D),
               p + "self_attn.q_proj.weight": rnd(H, D), p + "self_attn.k_proj.weight": rnd(KV, D),
               p + "self_attn.v_proj.weight": rnd(KV, D), p + "self_attn.o_proj.weight": rnd(D, H)}
        if dense_layer(cfg, i):
            sd |= mlp(p + "mlp.", cfg["intermediate_size"])
        else:
            sd[p + f"{moe}.gate.weight"] = rnd(E, D) * 5
            for j in range(E):
                q = p + f"{moe}.experts.{j}."
                if copies and j > 0:
                    sd |= {q + f"{w}.weight": sd[p + f"{moe}.experts.0.{w}.weight"].clone() for w in names}
                else:
                    sd |= mlp(q, I)
        if cfg.get("qkv_bias") or cfg.get("attention_bias"):
            sd |= {p + "self_attn.q_proj.bias": rnd(H), p + "self_attn.k_proj.bias": rnd(KV), p + "self_attn.v_proj.bias": rnd(KV)}
        if cfg.get("attention_bias"):
            sd[p + "self_attn.o_proj.bias"] = rnd(D)
        if layout in ("qwen3_moe", "olmoe"):
            q, kv = (hd, hd) if layout == "qwen3_moe" else (H, KV)
            sd |= {p + "self_attn.q_norm.weight": 1 + rnd(q), p + "self_attn.k_norm.weight": 1 + rnd(kv)}
        if layout == "qwen2_moe" and not dense_layer(cfg, i):
            sd |= mlp(p + "mlp.shared_expert.", cfg["shared_expert_intermediate_size"])
            sd[p + "mlp.shared_expert_gate.weight"] = rnd(1, D) * 5
    return sd


def write_checkpoint(path, cfg, sd, shards=1):
    """Write sd as HF does: model.safetensors, or model-0000i-of-0000n.safetensors + index."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    names = list(sd)
    if shards == 1:
        save_file(sd, path / "model.safetensors")
    else:
        weight_map = {}
        for s in range(shards):
            fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: sd[k] for k in names[s::shards]}
            save_file(part, path / fname)
            weight_map |= dict.fromkeys(part, fname)
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    return path


def with_random_adapter(base, seed=0, scale=0.3, **kw):
    """The base plus an adapter whose every tensor is non-zero (as after training)."""
    from mmmoe import AdapterConfig, MMMoE
    model = MMMoE.from_pretrained(base).add_image_adapter(AdapterConfig(n_image_codes=16, rank=4, **kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A factory: tiny_ckpt(**config overrides, shards=n) -> (path, hf config, state dict)."""
    def make(shards=1, seed=0, name="ckpt", copies=False, layout=None, **kw):
        cfg = tiny_hf_config(**kw) if layout is None else tiny_layout_config(layout, **kw)
        sd = tiny_hf_state_dict(cfg, seed, copies)
        return write_checkpoint(tmp_path / name, cfg, sd, shards), cfg, sd
    return make


@pytest.fixture
def tiny_setup(tmp_path, tiny_ckpt):
    """A tiny base, a tiny VQ and token shards of coloured squares: everything train.py needs."""
    return make_tiny_setup(tmp_path, tiny_ckpt(dim=64, layers=2, experts=4, top_k=2)[0])


def make_tiny_setup(tmp_path, base):
    import data
    import vq
    from PIL import Image
    folder = tmp_path / "squares"
    folder.mkdir()
    colours = [(220, 30, 30), (30, 180, 60), (30, 60, 220), (240, 210, 30)]
    lines = []
    for i in range(24):
        im = Image.new("RGB", (16, 16), "white")
        im.paste(colours[i % 4], (1 + i % 6, 2, 9 + i % 6, 12))
        im.save(folder / f"{i}.png")
        row = {"image": f"{i}.png", "caption": f"w{10 + i % 4} w{20 + i % 6}", "split": "val" if i < 4 else "train",
               "colour": ["red", "green", "blue", "yellow"][i % 4]}
        if i < 2:  # held out as pairs: the same shape as image i + 6, in a colour it is not trained in
            row["object"] = f"{i + 6}.png"
        lines.append(json.dumps(row))
    (folder / "captions.jsonl").write_text("\n".join(lines))
    torch.manual_seed(0)
    vq.save_vq(vq.VQModel(vq.VQConfig(image_size=16, codebook_size=16, codebook_dim=4, ch=32, ch_mult=(1, 2),
                                      num_res_blocks=1, z_channels=32)), tmp_path / "vq")
    data.write_shards(folder, vq.load_vq(tmp_path / "vq"), tmp_path / "vq", base / "tokenizer.json", tmp_path / "shards")
    return {"base": base, "vq": tmp_path / "vq", "shards": tmp_path / "shards", "tmp": tmp_path}
