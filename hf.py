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


def checkpoint_targets(name, shape, config):
    """Checkpoint tensor name -> [(our parameter name, expert j or None, index into the tensor)].

    Experts are stored one tensor per expert in the HF layout (experts.{j}.w1.weight), or fused 3-D
    by newer transformers (experts.gate_up_proj = cat(w1, w3) on dim 1, experts.down_proj = w2); we keep
    them stacked per layer as (E, out, in)."""
    name = name.replace(".mlp.", ".block_sparse_moe.")  # transformers >= 5 calls the MoE block "mlp"
    m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(w[123])\.weight", name)
    if m:
        return [(f"{m[1]}.{m[3]}", int(m[2]), ())]
    if name.endswith(".experts.gate_up_proj"):  # (E, 2I, C)
        prefix, inter = name[: -len("gate_up_proj")], config.intermediate_size
        return [(prefix + w, j, (j, part)) for w, part in (("w1", slice(0, inter)), ("w3", slice(inter, None)))
                for j in range(shape[0])]
    if name.endswith(".experts.down_proj"):  # (E, C, I)
        return [(name[: -len("down_proj")] + "w2", j, (j,)) for j in range(shape[0])]
    return [(name, None, ())]


def load_checkpoint(model, path, dtype, device):
    """Fill a model built on the meta device from a checkpoint, tensor by tensor: memory peaks at the
    model plus one tensor. Every name and shape is checked before any data is read.

    Copy upcycling makes every expert of a layer the same FFN (the paper's redundant start). Such a
    layer keeps one copy, and MoE.shared_base computes it once: 1/E of the memory, 1/top_k of the work.
    The copies are compared, not assumed: experts that differ in one number keep their own weights."""
    cfg = model.config
    index = checkpoint_index(Path(path))
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens
    sources = {n: {} for n in params}  # our name -> {expert j or None: (checkpoint name, index)}
    for name, (file, shape) in index.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        for pname, j, idx in checkpoint_targets(name, shape, cfg):
            if pname not in params or (j is not None and j >= cfg.n_experts):
                raise BadInput(f"unexpected tensor {name} in {file.name}")
            got, want = torch.empty(shape, device="meta")[idx].shape, params[pname].shape[j is not None:]
            if got != want:
                raise BadInput(f"shape mismatch for {name}: checkpoint {tuple(got)}, model {tuple(want)}")
            sources[pname][j] = (name, idx)
    for pname in params:
        for j in (range(cfg.n_experts) if ".experts." in pname else [None]):
            if j not in sources[pname]:
                name = pname if j is None else f"{pname[:-3]}.{j}.{pname[-2:]}.weight"
                raise BadInput(f"missing tensor {name} in {path}")
    read = TensorReader(index)
    with torch.no_grad():
        for pname, p in params.items():
            def part(j, like=None):  # expert j's tensor (j None: a tensor outside the experts), or whether it equals like
                t = read(*sources[pname][j], like=like)
                return t if like is not None else t.to(dtype=dtype, device=device)
            t = stack_experts(part, cfg.n_experts) if ".experts." in pname else part(None)
            module, _, attr = pname.rpartition(".")
            setattr(model.get_submodule(module), attr, nn.Parameter(t, requires_grad=p.requires_grad))
            if pname.endswith(".experts.w3"):  # the last of a layer's three expert stacks (w1, w2, w3 order)
                ex = model.get_submodule(module)
                if len({len(ex.w1), len(ex.w2), len(ex.w3)}) > 1:  # some are copies, some not: expand the copies
                    ex.w1, ex.w2, ex.w3 = (nn.Parameter(w.expand(cfg.n_experts, -1, -1).clone(), w.requires_grad)
                                           for w in (ex.w1, ex.w2, ex.w3))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def hf_state_dict(model):
    """Our parameters under Hugging Face Mixtral names, one (out, in) tensor per expert (a shared base's
    one copy written for each), so that any Mixtral loader reads them."""
    for name, p in model.named_parameters():  # a tied lm_head is left out: HF writes it once
        if ".experts." in name:
            prefix, w = name.rsplit(".", 1)
            for j in range(model.config.n_experts):
                yield f"{prefix}.{j}.{w}.weight", p[j if len(p) > 1 else 0]
        else:
            yield name, p


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
