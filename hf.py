"""
hf.py: Hugging Face checkpoints in and out, for mmmoe.py: a directory of config.json, model.safetensors
(or shards + model.safetensors.index.json) and tokenizer.json, as every Mixtral loader reads and writes.

Reading streams tensor by tensor through the safetensors library (which validates every header) into
a model built on the meta device, after every name and shape is checked; writing goes to a temporary
directory that replaces the target only once complete. The name map from checkpoint keys to the
model's parameters is checkpoint_targets: the one place that knows a checkpoint's layout.

The same care serves the two trainers (train.py, vq.py): atomic run directories that never replace a
user's files, damaged files reported in one line, optimizer state as safetensors, the learning-rate
schedule and the order of examples that make a resumed run equal an uninterrupted one.
"""
import ctypes
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from cli import BadInput

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


MANIFEST = ".mmmoe-files"  # in every directory atomic_dir writes: the names it wrote there


def check_replaceable(path):
    """Refuse (one line) to replace `path` unless it is absent, empty, or holds only what an earlier
    atomic_dir wrote there: the user's own files are never deleted. Called before long work starts."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"{path} is a file: give a directory name that is free or was written by mmmoe")
    names = {p.name for p in path.iterdir()} if path.is_dir() else set()
    ours = set(json.loads((path / MANIFEST).read_text())) | {MANIFEST} if (path / MANIFEST).is_file() else set()
    foreign = sorted(names - ours)
    if foreign:
        raise BadInput(f"{path} holds files that mmmoe did not write there ({', '.join(foreign[:3])}"
                       f"{', ...' if len(foreign) > 3 else ''}): not replacing it; choose another directory")


def recover_dir(path):
    """Finish what a process killed inside atomic_dir left half done. Its two renames (path -> .old,
    .tmp -> path) happen only once .tmp is complete, so if path is missing beside an .old, the matching
    .tmp is the newest complete copy. Leftovers of dead processes are then removed."""
    path = Path(path)
    for old in path.parent.glob(f".{path.name}.old-*"):
        tmp = old.with_name(old.name.replace(".old-", ".tmp-"))
        if not path.exists():
            (tmp if tmp.is_dir() else old).rename(path)
    for leftover in [*path.parent.glob(f".{path.name}.old-*"), *path.parent.glob(f".{path.name}.tmp-*")]:
        pid = leftover.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not Path(f"/proc/{pid}").exists():  # its writer is gone
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def atomic_dir(path):
    """Yield a fresh temporary directory beside `path`; once the caller has written everything, it
    replaces `path` by renames (on error it is deleted). Readers never see a half-written directory, a
    kill at any moment leaves a whole one (recover_dir), and only mmmoe's own files are ever replaced."""
    path = Path(path)
    recover_dir(path)
    check_replaceable(path)
    tmp, old = (path.with_name(f".{path.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        (tmp / MANIFEST).write_text(json.dumps(sorted(p.name for p in tmp.iterdir())))
        for f in [*tmp.iterdir(), tmp]:  # on disk before the renames make it the current version
            fd = os.open(f, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    check_replaceable(path)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


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

# -----------------------------------------------------------------------------
# Training runs: what train.py (the adapter) and vq.py (the image tokenizer) share


def read_tensors(file, device="cpu"):
    """A safetensors file of a checkpoint -> {name: tensor}; a missing or damaged file is one line."""
    if not Path(file).is_file():
        raise BadInput(f"missing checkpoint file {file}")
    try:
        return load_file(file, device=device)
    except (SafetensorError, OSError, ValueError) as e:  # truncated, or a header that is not safetensors
        raise BadInput(f"damaged checkpoint file {file}: {' '.join(str(e).split())}") from None


def read_json(file, required=()):
    """A checkpoint's JSON file -> dict, with `required` keys present; anything else is one line."""
    try:
        state = json.loads(Path(file).read_text())
    except FileNotFoundError:
        raise BadInput(f"missing checkpoint file {file}") from None
    except (ValueError, OSError) as e:
        raise BadInput(f"damaged checkpoint file {file}: {e}") from None
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise BadInput(f"damaged checkpoint file {file}: no {missing[0]!r}")
    return state


def optimizer_tensors(opt):
    """AdamW's state as named tensors (for safetensors) + the JSON-able rest (its param_groups)."""
    sd = opt.state_dict()
    tensors = {f"{i}.{k}": v.contiguous().cpu() for i, s in sd["state"].items() for k, v in s.items() if torch.is_tensor(v)}
    return tensors, sd["param_groups"]


def load_optimizer(opt, tensors, param_groups):
    """The inverse of optimizer_tensors, into `opt`."""
    state = {}
    for key, v in tensors.items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    try:
        opt.load_state_dict({"state": state, "param_groups": param_groups})
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"the saved optimizer state does not fit this model: {e}") from None


def keep_freed_memory():
    """Make glibc's malloc keep freed memory for reuse. PyTorch's CPU tensors come straight from malloc, and
    glibc hands a block of more than a few MB back to the system when it is freed, so every training step's
    activations would be fresh pages the kernel must fault in and zero: 10-20% of a VQ step on these CPUs
    (docs/speed.md). Training reallocates the same sizes every step, so the memory is not lost, only kept.
    No-op where the C library is not glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 2**30)  # M_MMAP_THRESHOLD: blocks up to 1 GB come from the reusable heap, not mmap
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD: never give the heap's free top back


def lr_at(step, lr, warmup, steps, min_lr=0.0):
    """Linear warmup over `warmup` steps, then a cosine from lr down to min_lr at `steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def batch_at(n, size, step, seed):
    """Example indices (size,) of one optimiser step: a fixed function of (seed, step), a fresh
    permutation of the n examples every epoch, so a resumed run sees exactly the same data."""
    per_epoch = max(1, n // size)
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[(i * size + np.arange(size)) % n]  # wraps around a dataset smaller than one batch


def run_inputs(run_dir):
    """A train.py output directory -> (its state.json as a dict, the base checkpoint directory it was
    trained on or None for the built-in base, the VQ directory: the run's own vq/ if it has one)."""
    run_dir = Path(run_dir)
    if not (run_dir / "state.json").exists():
        raise BadInput(f"no trained model in {run_dir} (expected state.json and adapter.safetensors from train.py)")
    state = read_json(run_dir / "state.json", ("train_config", "vq"))
    if not isinstance(state["train_config"], dict) or not isinstance(state["train_config"].get("base"), str):
        raise BadInput(f"damaged checkpoint file {run_dir / 'state.json'}: no train_config.base")
    base = state["train_config"]["base"]
    return state, Path(base) if base else None, run_dir / "vq" if (run_dir / "vq").exists() else Path(state["vq"])
