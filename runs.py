"""
runs.py: what the two trainers (train.py: the adapter, vq.py: the image tokenizer) and everything that writes a
directory share. Directories written atomically that never replace a user's files; damaged files reported in one
line; optimizer state as safetensors; the learning-rate schedule and the order of examples, both pure functions of
the step, which is what makes a resumed run equal an uninterrupted one; reading a run directory back.
"""
import ctypes
import json
import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from cli import BadInput

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


def batch_at(n, size, step, seed, repeats=None):
    """Example indices (size,) of one optimiser step: a fixed function of (seed, step), a fresh permutation of
    the n examples every epoch, so a resumed run sees exactly the same data. repeats (n,): how many times each
    example comes in an epoch (a data mix; 0 leaves it out); None: once each."""
    pool = np.arange(n) if repeats is None else np.repeat(np.arange(n), repeats)
    per_epoch = max(1, len(pool) // size)
    epoch, i = divmod(step, per_epoch)
    order = pool[np.random.default_rng([seed, epoch]).permutation(len(pool))]
    return order[(i * size + np.arange(size)) % len(pool)]  # wraps around a dataset smaller than one batch


def run_inputs(run_dir):
    """A train.py output directory -> (its state.json as a dict, the base checkpoint directory it was
    trained on or None for the built-in base, the VQ directory: the run's own vq/ if it has one, else its "vq", which
    a run that is moved or shared records relative to itself)."""
    run_dir = Path(run_dir)
    if not (run_dir / "state.json").exists():
        raise BadInput(f"no trained model in {run_dir} (expected state.json and adapter.safetensors from train.py)")
    state = read_json(run_dir / "state.json", ("train_config", "vq"))
    if not isinstance(state["train_config"], dict) or not isinstance(state["train_config"].get("base"), str):
        raise BadInput(f"damaged checkpoint file {run_dir / 'state.json'}: no train_config.base")
    base = state["train_config"]["base"]
    vq = run_dir / "vq" if (run_dir / "vq").exists() else run_dir / state["vq"]  # run_dir / an absolute path: that path
    return state, Path(base) if base else None, vq
