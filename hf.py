"""
hf.py: Hugging Face checkpoints in and out, for mmmoe.py: a directory of config.json, model.safetensors
(or shards + model.safetensors.index.json) and tokenizer.json, as every Mixtral loader reads and writes.

Reading streams tensor by tensor through the safetensors library (which validates every header) into
a model built on the meta device, after every name and shape is checked; writing goes to a temporary
directory that replaces the target only once complete. The name map from checkpoint keys to the
model's parameters is checkpoint_targets: the one place that knows a checkpoint's layout.
Directories are written atomically by runs.py's atomic_dir, which the trainers' checkpoints use too.
"""
import json
import re
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer

from cli import BadInput
from runs import atomic_dir

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_index(path):
    """{tensor name: (file, shape)} of a checkpoint directory: model.safetensors, or the shards its index
    lists. safetensors' own reader validates each header (offsets, sizes); we add that shards are plain
    file names inside the directory, and that no tensor is stored twice."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise BadInput(f"{index} is not a safetensors index (JSON with a weight_map)") from None
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise BadInput(f"no model.safetensors or model.safetensors.index.json in {path}")
    tensors = {}
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise BadInput(f"{index} lists {name!r}: shards must be files in the checkpoint directory")
        if not (path / name).is_file():
            raise BadInput(f"missing shard {name} listed in {index}")
        try:
            with safe_open(path / name, "pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise BadInput(f"tensor {key} is stored twice: in {tensors[key][0].name} and {name}")
                    t = f.get_slice(key)
                    if t.get_dtype() not in SAFETENSORS_DTYPES:
                        raise BadInput(f"unsupported dtype {t.get_dtype()} for {key} in {name}")
                    tensors[key] = (path / name, tuple(t.get_shape()))
        except SafetensorError as e:
            raise BadInput(f"corrupt safetensors header in {path / name}: {' '.join(str(e).split())}") from None
    return tensors


class TensorReader:
    """read(name, index=()) -> a copy of a tensor of checkpoint_index's files, or of the part `index`
    selects; read(name, index, like=t) -> whether that part equals t, compared where it lies (no copy).
    safe_open maps a file, and each page touched stays in memory while it is open: the files are closed
    every 64 MB read, so memory holds the model plus that, never the whole checkpoint."""

    def __init__(self, index):
        self.index, self.files, self.bytes = index, {}, 0

    def __call__(self, name, idx=(), like=None):
        file = self.index[name][0]
        self.files[file] = self.files.get(file) or safe_open(file, "pt")
        view = self.files[file].get_slice(name)[idx]  # a view of the mapped file: copied out, or compared, now
        out = view.clone() if like is None else torch.equal(view.to(like.device, like.dtype), like)
        self.bytes += view.nbytes
        if self.bytes > 64 * 2**20:
            self.files, self.bytes = {}, 0
        return out


# -----------------------------------------------------------------------------
# Layouts: the four Hugging Face MoE families, told apart by config.json's architectures


ARCHITECTURES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
                 "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe"}


def config_fields(hf):
    """A config.json (a checkpoint directory, the file, or the parsed dict) -> MMMoEConfig's fields. What differs
    between the layouts is a handful of fields; a setting that would change the math and is not implemented is
    refused, never ignored."""
    if not isinstance(hf, dict):
        path = Path(hf)
        path = path if path.suffix == ".json" else path / "config.json"
        if not path.exists():
            raise BadInput(f"no config.json in {path.parent}")
        try:
            hf = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadInput(f"{path} is not valid JSON: {' '.join(str(e).split())}") from None
    if not isinstance(hf, dict):
        raise BadInput("config.json must hold a JSON object")
    archs = hf.get("architectures") or [{v: k for k, v in ARCHITECTURES.items()}.get(hf.get("model_type"), "MixtralForCausalLM")]
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise BadInput(f"unsupported architecture {', '.join(map(str, archs))}: mmmoe reads {', '.join(ARCHITECTURES)} "
                       "(turn a dense Llama/Mistral checkpoint into a Mixtral with upcycle.py)")
    layout = ARCHITECTURES[archs[0]]
    mixtral, qwen = layout == "mixtral", layout.startswith("qwen")
    sizes = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "moe_intermediate_size" if qwen else "intermediate_size"]
    missing = [k for k in sizes + ["shared_expert_intermediate_size"] * (layout == "qwen2_moe")
               if not isinstance(hf.get(k), int) or hf[k] < 1]
    if missing:
        raise BadInput(f"config.json lacks a positive integer {missing[0]}")
    # Mixtral's num_local_experts, the others' num_experts: transformers maps each name to the other, and writes either
    experts = next((k for k in ("num_local_experts", "num_experts") if k in hf), "num_local_experts")
    n_experts = hf.get(experts, 8)
    if not 1 <= hf.get("num_experts_per_tok", 2) <= n_experts:
        raise BadInput(f"config.json: num_experts_per_tok {hf.get('num_experts_per_tok')} must be 1..{experts} ({n_experts})")
    if hf.get("hidden_act", "silu") != "silu":
        raise BadInput(f"unsupported hidden_act {hf['hidden_act']!r}: the experts here use silu")
    # Two shapes of config.json are in the wild: older ones keep rope_theta and torch_dtype at the
    # top level, newer ones nest it in rope_parameters and call the dtype "dtype".
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise BadInput(f"unsupported RoPE scaling {rope}: only plain RoPE is implemented")
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise BadInput(f"unsupported dtype {dtype!r} in config.json (supported: float32, float16, bfloat16)")
    if qwen and hf.get("use_sliding_window"):
        raise BadInput("config.json: use_sliding_window is true: Qwen's per-layer sliding windows are not implemented")
    L, step, eos, n_heads = hf["num_hidden_layers"], hf.get("decoder_sparse_step") or 1, hf.get("eos_token_id", 2), hf["num_attention_heads"]
    # Qwen: layer i has experts unless listed in mlp_only_layers or off the decoder_sparse_step grid (then a dense MLP)
    dense = [i for i in range(L) if i in (hf.get("mlp_only_layers") or []) or (i + 1) % step] if qwen else []
    bias = bool(hf.get("attention_bias")) and layout in ("qwen3_moe", "olmoe")  # there: on all four projections
    return dict(
        layout=layout, vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=L, n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        head_dim=hf.get("head_dim") if layout != "olmoe" and hf.get("head_dim") else hf["hidden_size"] // n_heads,
        intermediate_size=hf["moe_intermediate_size" if qwen else "intermediate_size"], n_experts=n_experts,
        top_k=hf.get("num_experts_per_tok", 2), norm_topk_prob=mixtral or bool(hf.get("norm_topk_prob", False)),
        qkv_bias=bool(hf.get("qkv_bias", True)) if layout == "qwen2_moe" else bias, o_bias=bias,
        qk_norm={"qwen3_moe": "head", "olmoe": "all"}.get(layout), clip_qkv=hf.get("clip_qkv") if layout == "olmoe" else None,
        shared_expert_size=hf.get("shared_expert_intermediate_size", 0) if layout == "qwen2_moe" else 0,
        dense_layers=tuple(dense), dense_size=hf.get("intermediate_size", 0) if dense else 0,
        rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 1e6)),
        norm_eps=hf.get("rms_norm_eps", 1e-5), max_seq_len=hf.get("max_position_embeddings", 32768),
        sliding_window=hf.get("sliding_window") if mixtral else None, tie_word_embeddings=hf.get("tie_word_embeddings", False),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos, dtype=dtype,
    )


def hf_config(c):
    """An MMMoEConfig -> the config.json its layout's loaders read (the newer shape); config_fields inverts it."""
    out = {"architectures": [{v: k for k, v in ARCHITECTURES.items()}[c.layout]], "model_type": c.layout,
           "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads,
           "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim, "num_experts_per_tok": c.top_k, "hidden_act": "silu",
           "rms_norm_eps": c.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
           "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_word_embeddings,
           "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "dtype": c.dtype}
    if c.layout == "mixtral":
        return out | {"intermediate_size": c.intermediate_size, "num_local_experts": c.n_experts, "sliding_window": c.sliding_window}
    out |= {"num_experts": c.n_experts, "norm_topk_prob": c.norm_topk_prob}
    if c.layout == "olmoe":
        return out | {"intermediate_size": c.intermediate_size, "attention_bias": c.o_bias, "clip_qkv": c.clip_qkv}
    out |= {"moe_intermediate_size": c.intermediate_size, "intermediate_size": c.dense_size or c.intermediate_size,
            "decoder_sparse_step": 1, "mlp_only_layers": list(c.dense_layers), "use_sliding_window": False}
    if c.layout == "qwen3_moe":
        return out | {"attention_bias": c.o_bias}
    return out | {"shared_expert_intermediate_size": c.shared_expert_size, "qkv_bias": c.qkv_bias}


# Checkpoint names, one table per layout: our name inside a layer -> the checkpoint's ({j}: expert j), for the
# MoE block; attention and norms are named alike in every layout and need no entry. A dense layer among MoE
# layers (Qwen's mlp_only_layers) is our MoE with one expert and no router: its weights are the "dense" entries.
QWEN_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
MOE = "block_sparse_moe."
LAYOUT_NAMES = {
    "mixtral": {MOE + "gate.weight": MOE + "gate.weight",
                **{f"{MOE}experts.{w}": f"{MOE}experts.{{j}}.{w}.weight" for w in QWEN_MLP}},
    "qwen2_moe": {MOE + "gate.weight": "mlp.gate.weight",
                  **{f"{MOE}experts.{w}": f"mlp.experts.{{j}}.{n}.weight" for w, n in QWEN_MLP.items()},
                  **{f"{MOE}shared_expert.{w}": f"mlp.shared_expert.{n}.weight" for w, n in QWEN_MLP.items()},
                  MOE + "shared_expert_gate.weight": "mlp.shared_expert_gate.weight",
                  **{f"dense.{MOE}experts.{w}": f"mlp.{n}.weight" for w, n in QWEN_MLP.items()}},
    "qwen3_moe": {MOE + "gate.weight": "mlp.gate.weight",
                  **{f"{MOE}experts.{w}": f"mlp.experts.{{j}}.{n}.weight" for w, n in QWEN_MLP.items()},
                  **{f"dense.{MOE}experts.{w}": f"mlp.{n}.weight" for w, n in QWEN_MLP.items()}},
    "olmoe": {MOE + "gate.weight": "mlp.gate.weight",
              **{f"{MOE}experts.{w}": f"mlp.experts.{{j}}.{n}.weight" for w, n in QWEN_MLP.items()}},
}


def checkpoint_names(model):
    """{(our parameter name, j): the checkpoint's name} for every base parameter; j is the expert of a stacked
    (E, out, in) expert tensor, None for any other. A shared expert and a dense MLP are stacks of one."""
    table, layers = LAYOUT_NAMES[model.config.layout], model.model.layers
    names = {}
    for pname, p in model.named_parameters():
        if model.is_adapter_param(pname) or (pname == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        prefix, i, local = re.fullmatch(r"(model\.layers\.(\d+)\.)?(.*)", pname).groups()
        moe = layers[int(i)].block_sparse_moe if i is not None else None
        hf = table.get(f"dense.{local}" if moe is not None and moe.gate is None else local, local)
        # a stack's experts: the layer's n_experts (a shared base holds one copy for all), a shared expert's one
        n = moe.n_experts if ".experts.w" in pname else 1 if ".shared_expert.w" in pname else 0
        for j in range(n) if n else [None]:
            names[pname, j] = (prefix or "") + hf.format(j=j)
    return names


def stack_experts(read, n):
    """One layer's n expert tensors -> (n, ...), or (1, ...) when all are copies of the first: then one copy
    is all that is ever held. read(j) -> expert j's tensor; read(j, like=t) -> whether it equals t."""
    first = read(0)
    if all(read(j, like=first) for j in range(1, n)):
        return first[None]  # (1, ...): one copy serves every expert
    out = first.expand(n, *first.shape).clone()  # they differ: each expert keeps its own weights
    for j in range(1, n):
        out[j] = read(j)
    return out


def checkpoint_sources(model, index):
    """{our name: {j: (checkpoint name, index into it)}} for a checkpoint_index. Experts are stored one tensor
    per expert (the layouts' tables), or fused 3-D by newer transformers in any layout: mlp.experts.gate_up_proj
    = cat(w1, w3) on dim 1 (E, 2I, C) and mlp.experts.down_proj = w2 (E, C, I). Every name and shape is checked."""
    names = checkpoint_names(model)
    ours = {v: k for k, v in names.items()}
    if model.config.layout == "mixtral":  # transformers >= 5 calls Mixtral's MoE block "mlp" too
        ours |= {v.replace(f".{MOE}", ".mlp."): k for k, v in names.items()}
    params, sources = dict(model.named_parameters()), {}
    for name, (file, shape) in index.items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        m = re.fullmatch(r"(model\.layers\.\d+\.)mlp\.experts\.(gate_up_proj|down_proj)", name)
        if m and f"{m[1]}{MOE}experts.w1" in params:
            stack = f"{m[1]}{MOE}experts."
            inter = params[stack + "w1"].shape[1]
            parts = [("w1", slice(0, inter)), ("w3", slice(inter, None))] if m[2] == "gate_up_proj" else [("w2", slice(None))]
            targets = [(stack + w, j, (j, part)) for w, part in parts for j in range(shape[0])]
        elif name in ours:
            targets = [(*ours[name], ())]
        else:
            raise BadInput(f"unexpected tensor {name} in {file.name}")
        for pname, j, idx in targets:
            want = params[pname].shape[j is not None:]
            got = torch.empty(shape, device="meta")[idx].shape if j is None or j < len(params[pname]) else None
            if got is None:
                raise BadInput(f"unexpected tensor {name} in {file.name}")
            if got != want:
                raise BadInput(f"shape mismatch for {name}: checkpoint {tuple(got)}, model {tuple(want)}")
            sources.setdefault(pname, {})[j] = (name, idx)
    for (pname, j), name in names.items():
        if j not in sources.get(pname, {}):
            raise BadInput(f"missing tensor {name} in the checkpoint")
    return sources


def load_checkpoint(model, path, dtype, device):
    """Fill a model built on the meta device from a checkpoint, tensor by tensor: memory peaks at the
    model plus one tensor. Every name and shape is checked before any data is read.

    Copy upcycling makes every expert of a layer the same FFN (the paper's redundant start). Such a
    layer keeps one copy, and shared_base computes it once: 1/E of the memory, 1/top_k of the work.
    The copies are compared, not assumed: experts that differ in one number keep their own weights."""
    index = checkpoint_index(Path(path))
    sources, read = checkpoint_sources(model, index), TensorReader(index)
    with torch.no_grad():
        for pname, p in list(model.named_parameters()):
            if pname not in sources:  # a tied lm_head
                continue
            def part(j, like=None):  # expert j's tensor (j None: a tensor outside the experts), or whether it equals like
                t = read(*sources[pname][j], like=like)
                return t if like is not None else t.to(dtype=dtype, device=device)
            t = stack_experts(part, len(p)) if None not in sources[pname] else part(None)
            module, _, attr = pname.rpartition(".")
            setattr(model.get_submodule(module), attr, nn.Parameter(t, requires_grad=p.requires_grad))
            if pname.endswith(".experts.w3"):  # the last of a layer's three expert stacks (w1, w2, w3 order)
                ex, n = model.get_submodule(module), len(p)
                if len({len(ex.w1), len(ex.w2), len(ex.w3)}) > 1:  # some are copies, some not: expand the copies
                    ex.w1, ex.w2, ex.w3 = (nn.Parameter(w.expand(n, -1, -1).clone(), w.requires_grad)
                                           for w in (ex.w1, ex.w2, ex.w3))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def hf_state_dict(model):
    """Our base parameters under the layout's checkpoint names, one (out, in) tensor per expert (a shared base's
    one copy written for each), so that any loader of that layout reads them."""
    params = dict(model.named_parameters())
    for (pname, j), name in checkpoint_names(model).items():
        p = params[pname]
        yield name, p if j is None else p[j if len(p) > 1 else 0]


def write_hf_checkpoint(path, hf_config, tensors, tokenizer=None, extra_files=None, max_shard_bytes=2 * 1024**3):
    """Write (name, tensor) pairs as a Hugging Face checkpoint directory, atomically: config.json,
    generation_config.json, model.safetensors or shards + index, and tokenizer.json if given.

    `tensors` may be a generator: only one shard is held in memory at a time."""
    with atomic_dir(path) as tmp:
        shards, shard, size, total = [], {}, 0, 0

        def flush():
            fname = f"model-{len(shards) + 1:05d}.safetensors"  # renamed to -of-N once N is known
            # clone: safetensors refuses tensors that share memory, and expert slices or copies do
            save_file({k: v.detach().cpu().clone() for k, v in shard.items()}, tmp / fname, metadata={"format": "pt"})
            shards.append((fname, list(shard)))

        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
                shard, size = {}, 0
            shard[name] = t
            size, total = size + nbytes, total + nbytes
        flush()
        if len(shards) == 1:
            (tmp / shards[0][0]).rename(tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (fname, names) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                (tmp / fname).rename(tmp / final)
                weight_map |= dict.fromkeys(names, final)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def load_tokenizer(path):
    """A checkpoint directory's tokenizer.json (or that file itself) as a `tokenizers.Tokenizer`."""
    file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise BadInput(f"no tokenizer.json in {path}")
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # the tokenizers library raises a plain Exception for a file it cannot parse
        raise BadInput(f"damaged checkpoint file {file}: {' '.join(str(e).split())[:200]}") from None
