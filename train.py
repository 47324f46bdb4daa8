"""
train.py: Partial-LoRA multimodal fine-tuning, the paper's method. A frozen text MoE learns to write
image codes; every text token keeps going through the frozen weights.

    python train.py config/cpu-demo.json --resume         # the first demo's recipe (docs/demo.md)
    python train.py config/tiny.json --steps=20           # a smoke test on CPU
    python train.py config/demo.json --resume             # continue exactly where the last checkpoint stopped
    torchrun --nproc_per_node 8 train.py config/demo.json # DDP; add --fsdp for bases that do not fit a GPU
    python train.py --nproc 8 config/demo.json            # the same, started without torchrun
    python train.py --export demo --out_dir RUN           # a run's adapter + VQ for sharing, image rows in bf16

Each example is the sequence  <bos> caption <boi> code_1 ... code_n <eoi> <eos>  from the token shards
(the data package). The loss is on the image codes: the caption runs through the frozen model (C1), so a loss
on it would have nothing to train. With probability caption_dropout the caption is replaced by <eos>
tokens of the same length: that is the unconditional prompt classifier-free guidance uses (Janus).

Top to bottom: the settings and their checks -> the loop, `train()` (batch, forward, backward, step, log) -> what
happens around it (starting or resuming, distributing, evaluating, saving) -> the command line.
"""
import functools
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.distributed.fsdp import fully_shard
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
from tqdm import tqdm

from cli import BadInput, run
from data import (GROUPS, TokenShards, asked_caption, caption_rows, english_text, load_images, make_batch,
                  make_describe_batch, mix_repeats, object_index, parse_mix, read_folder)
from data.scenes import held_out_scenes, make_scene_batch, scene_at, tile_table
from gw_init import init_model
from hf import load_tokenizer
from mmmoe import SAMPLING, AdapterConfig, MMMoE, choose_dtype, scene_tiles
from pictures import save_grid
from pipeline import around_a_picture, asks_questions
from runs import (atomic_dir, batch_at, check_replaceable, keep_freed_memory, load_optimizer, lr_at,
                  optimizer_tensors, read_json, read_tensors, recover_dir, run_inputs)
from upcycle import builtin_base
from vq import load_vq, score_summary


@dataclass
class TrainConfig:
    base: str = ""  # a Hugging Face MoE checkpoint directory (any of the four layouts); "": the built-in SmolLM2 MoE
    shards: str = "out/openmoji/shards"
    out_dir: str = "out/train"
    init: str = "gw"  # new image rows: gw | random | mean
    init_scale: float = 1.0  # ... multiplied by this (gw_init.init_image_rows)
    rank: int = 8
    alpha: float = 16.0
    attention: bool = True
    router: bool = True
    expert_rank: int = 0  # the experts' updates' rank, if not rank (mmmoe.AdapterConfig): equal budgets across layouts
    batch_size: int = 16  # sequences per process per micro-step
    grad_accum: int = 1
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    aux_loss_coef: float = 0.01  # router load balancing, over image tokens
    # the colour token's term in the loss (a VQ with hue_bins) multiplied by this: one token of a picture's 65 carries
    # its whole colour (the held-out loss stays the plain mean, comparable across runs)
    colour_weight: float = 1.0
    log_every: int = 10  # training loss into the log every this many steps (1: every step, e.g. to compare inits)
    eval_every: int = 100
    eval_batches: int = 4
    curve_every: int = 0  # draw fixed training and held-out captions and score them (the learning curve); 0: never
    curve_captions: int = 12  # of each split
    init_from: str = ""  # a checkpoint to warm-start from (adapter and step, fresh optimizer) when out_dir has none
    # with init_from: a stage of its own, `steps` more steps with their own warm-up and decay from the warm start's
    # step (without it, steps, warm-up and decay are the whole run's, counted from step 0)
    restart_schedule: bool = False
    # a data mix: how many times each kind of example (data.MIX_KINDS) comes in an epoch, "multicolour=4,bare=3";
    # a kind not named comes once, 0 leaves it out. The order stays a function of (seed, step)
    mix: str = ""
    # scenes (#52): on this share of the steps the batch is 2 x 2 scenes composed from the shards' pictures
    # (data/scenes.py), else single pictures; the adapter gets the scene tokens (warm-started from <boi>'s row)
    scenes: float = 0.0
    # describe (#53): on this share of the steps the batch is pictures described, the other direction: <boi> a
    # picture <eoi> then its words, the loss on the words (data.make_describe_batch): one adapter draws and reads
    describe: float = 0.0
    save_every: int = 100
    # bfloat16: the frozen base stored in bf16 and every matmul under bf16 autocast (the adapter keeps float32
    # master weights); auto: the faster of the two here (mmmoe.choose_dtype: bf16 on CUDA and on a CPU with AMX)
    dtype: str = "auto"
    # each transformer block through torch.compile: one graph serves every layer, its chains of elementwise operations
    # fused (on a CPU that needs a C++ compiler; without one, a warning and eager). The first steps compile (20-60 s)
    compile: bool = False
    fsdp: bool = False
    seed: int = 0

    def check(self):
        """Every setting's range, checked before anything is loaded: the first one wrong is one line."""
        parse_mix(self.mix)
        for ok, what in [
                (self.steps >= 1, "steps >= 1"), (self.batch_size >= 1, "batch_size >= 1"),
                (self.grad_accum >= 1, "grad_accum >= 1"),
                (self.rank >= 1 and self.expert_rank >= 0, "rank >= 1, expert_rank >= 0"),
                (self.lr > 0 and self.min_lr >= 0, "lr > 0 and min_lr >= 0"), (self.warmup >= 0, "warmup >= 0"),
                (0 <= self.caption_dropout < 1, "0 <= caption_dropout < 1"),
                (min(self.log_every, self.eval_every, self.eval_batches, self.save_every) >= 1,
                 "log_every, eval_every, eval_batches, save_every >= 1"),
                (self.curve_every >= 0 and self.curve_captions >= 1, "curve_every >= 0, curve_captions >= 1"),
                (not (self.fsdp and self.curve_every),
                 "curve_every=0 under --fsdp (the curve draws with the whole model in one process)"),
                (self.init in ("gw", "random", "mean"), "init: gw, random or mean"),
                (not self.restart_schedule or self.init_from,
                 "init_from with restart_schedule (a stage starts from a checkpoint)"),
                (0 < self.init_scale < math.inf, "init_scale > 0"),
                (0 <= self.scenes and 0 <= self.describe and self.scenes + self.describe <= 1,
                 "scenes >= 0, describe >= 0, scenes + describe <= 1"),
                (0 < self.colour_weight < math.inf, "colour_weight > 0"),
                (self.dtype in ("auto", "float32", "bfloat16"), "dtype: auto, float32 or bfloat16")]:
            if not ok:
                raise BadInput(f"bad setting: {what} is required")
        return self


# A resumed run continues the same computation: these settings must be the run's own, and so must the precision
# (check_same_computation). The number of processes may change: what counts is the global batch, batch_size x
# processes x grad_accum
COMPUTATION = ("base", "shards", "init", "init_scale", "rank", "expert_rank", "alpha", "attention", "router", "steps",
               "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "caption_dropout", "aux_loss_coef", "seed",
               "mix", "restart_schedule", "colour_weight", "scenes", "describe")

# -----------------------------------------------------------------------------
# The loop


def train(tc, resume=False):
    rank, world, device = start_processes(tc)
    main_process, out_dir = rank == 0, Path(tc.out_dir)
    check_out_dir(out_dir, resume)
    train_set, val = open_shards(tc)
    table = tile_table(tc.shards) if tc.scenes else None  # the pictures scenes are made of
    dtype, note = choose_dtype(tc.dtype, device)  # auto: the faster precision on this machine
    if note and main_process:
        print(note, file=sys.stderr)
    codes, colours = train_set.index["codebook_size"], train_set.index.get("colour_tokens", 0)
    model, base = build_model(tc, device, dtype, codes, colours)
    step, log, first, saved = start_or_resume(model, tc, dtype, out_dir, resume, world, train_set, main_process)
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel updates every tensor, not a loop over them
    opt = torch.optim.AdamW(params, lr=tc.lr, betas=(0.9, 0.95), weight_decay=tc.weight_decay, fused=True)
    if saved is not None:
        restore_optimizer(opt, out_dir, saved, device)
    trained = distribute(model, tc, params, world, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    tokenizer = load_tokenizer(base)
    held_out = held_out_batches(val, train_set, table, tc, tokenizer, model)  # held-out losses beside val_image_loss
    repeats = mix_repeats(train_set, tc.mix)  # (n,) times each example comes in an epoch (a data mix), or None
    text_ids = english_text(tokenizer)  # held-out English: C1's perplexity check
    global_size, last = tc.batch_size * world * tc.grad_accum, first + tc.steps
    bar = tqdm(total=last, initial=step, desc="training", unit="step", disable=not main_process)
    clock, curve, samples = Clock(step), None, None
    model.train()
    while step < last:
        # the batch: a pure function of (seed, step), so a resumed run and every DDP process see the right examples
        indices = batch_at(len(train_set), global_size, step, tc.seed, repeats)
        drop = np.random.default_rng([tc.seed, step, 1]).random(len(indices)) < tc.caption_dropout
        kind = step_kind(tc, step)  # what this step trains on: pictures drawn, scenes drawn, or pictures described
        batch_of = batch_maker(kind, train_set, indices, drop, table, tokenizer, model, tc, step)
        for g in opt.param_groups:
            g["lr"] = lr_at(step - first, tc.lr, tc.warmup, tc.steps, tc.min_lr)
        loss, aux, tokens = forward_backward(trained, model, batch_of, tc, rank, world, autocast, params)
        clock.tokens += tokens
        if not torch.isfinite(loss):  # stop before a bad update reaches the weights; the last checkpoint stays good
            stop_on_a_bad_loss(loss, step, out_dir)
        norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if main_process and (step % tc.log_every == 0 or step == last):
            log.append({"step": step, "loss": loss.item(), "aux": aux.item(), "grad_norm": norm.item(),
                        "lr": opt.param_groups[0]["lr"], "kind": kind} | clock.read(step, world))
        if step % tc.eval_every == 0 or step == last:
            with torch.compiler.set_stance("force_eager"):
                result = evaluate(model, tc, val, text_ids, device, autocast, held_out)
            if main_process:
                log.append({"step": step} | result)
                bar.write(json.dumps(log[-1]))
        if main_process and tc.curve_every and (step % tc.curve_every == 0 or step == last):
            curve = curve or learning_curve_setup(model, tokenizer, train_set, tc)
            with torch.compiler.set_stance("force_eager"):
                figures, *samples = curve(model, autocast)
            log.append({"step": step, "epoch": step * global_size / len(train_set)} | figures)
            bar.write(json.dumps(log[-1]))
        if main_process and (step % tc.save_every == 0 or step == last):
            save_checkpoint(out_dir, model, opt, step, tc, log, train_set.index["vq"], world, samples, first)
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    return model

# -----------------------------------------------------------------------------
# One step's forward and backward, and what the log records of it


def forward_backward(trained, model, batch_of, tc, rank, world, autocast, params):
    """This process's share of a global batch (batch_of: a slice of it -> its idx, targets, pad), in grad_accum
    micro-steps: forward, loss, backward -> (the last micro-step's loss, its load-balancing loss, the tokens seen);
    gradients are then in params (averaged over the processes). trained is the model, or DDP around it."""
    device, tokens = params[0].device, 0
    for micro in range(tc.grad_accum):
        part = slice((micro * world + rank) * tc.batch_size, (micro * world + rank + 1) * tc.batch_size)
        idx, targets, pad = (t.to(device) for t in batch_of(part))
        last = micro == tc.grad_accum - 1
        sync = nullcontext() if last or world == 1 or tc.fsdp else trained.no_sync()  # DDP: all-reduce once, at the end
        with sync, autocast:
            _, loss = trained(idx, targets, pad=pad, colour_weight=tc.colour_weight)
            aux = load_balancing_loss(model)
            total = (loss + tc.aux_loss_coef * aux) / tc.grad_accum
            if world > 1:  # every trainable tensor takes part in every step, even with no image token in the
                total = total + 0.0 * sum(p.sum() for p in params)  # batch: DDP's all-reduce sees the same set
        total.backward()
        tokens += idx.numel()
    if tc.fsdp and world > 1:  # the adapter is not FSDP's: average its gradients in one all-reduce, as DDP would
        flat = torch.cat([p.grad.flatten() for p in params])
        dist.all_reduce(flat)
        for p, g in zip(params, (flat / world).split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    return loss, aux, tokens


def load_balancing_loss(model):
    """Switch-style auxiliary loss on image tokens, averaged over layers: E * sum_e f_e * P_e, with f_e
    the share of routed slots that went to expert e and P_e its mean router probability."""
    losses = []
    for layer in model.model.layers:
        moe = layer.block_sparse_moe
        if moe.image_rows is None or moe.gate is None:  # no image tokens, or a dense layer (no router)
            continue
        logits = moe.router_logits[moe.image_rows.view(-1)]  # (n_image_tokens, E)
        probs = F.softmax(logits.float(), dim=-1)
        chosen = F.one_hot(probs.topk(moe.top_k, dim=-1).indices, probs.shape[-1]).sum(1).float()  # (n, E)
        losses.append(probs.shape[-1] * (chosen.mean(0) / moe.top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean() if losses else torch.zeros((), device=model.lm_head.weight.device)


def step_kind(tc, step):
    """What a step trains on: a batch of scenes on a share tc.scenes of the steps, of pictures described on a share
    tc.describe, else of single pictures drawn. Whole batches, so that no single picture is padded to a scene's
    length. A pure function of (seed, step): resume and DDP stay exact."""
    u = np.random.default_rng([tc.seed, step, 2]).random()
    return "scenes" if u < tc.scenes else "describe" if u < tc.scenes + tc.describe else "pictures"


def batch_maker(kind, train_set, indices, drop, table, tokenizer, model, tc, step):
    """A step's global batch of step_kind's kind -> batch_of(part): a slice of it (a process's micro-step) as idx,
    targets, pad. Scenes are composed at batch time (data/scenes.py, a pure function of (seed, step, i)); pictures
    described are the step's examples, read the other way (data.make_describe_batch; no caption to drop: drop is
    for the two kinds that draw)."""
    if kind == "scenes":
        scenes = [scene_at(table, tc.seed, step, i) for i in range(len(indices))]
        return lambda part: make_scene_batch(train_set, scenes[part], tokenizer, model, drop[part])
    if kind == "describe":
        # the way each is asked (half of the ways a question in the base's chat format) turns with the step: over the
        # epochs a recoloured copy, one example, is asked each way about equally often
        ways = (indices + step) % 6
        return lambda part: make_describe_batch(train_set, indices[part], model, asking(model, tokenizer), ways[part])
    return lambda part: make_batch(train_set, indices[part], drop[part], model)


def asking(model, tokenizer):
    """make_describe_batch's chat: the questions about a picture in the base's chat format, as sample.py --ask asks;
    None (every picture described plainly) for a base that has not SmolLM2's format (pipeline.asks_questions)."""
    return (tokenizer, functools.partial(around_a_picture, model, tokenizer)) if asks_questions(tokenizer) else None


def held_out_batches(val, train_set, table, tc, tokenizer, model):
    """The held-out losses a run logs beside val_image_loss, one global batch each (in micro-batches): with scenes,
    held-out scenes (pairs, counts, relations never trained: held_out_scenes), the categories in turn; with describe,
    held-out pictures described (val's examples, evenly spread)."""
    n, batches = tc.batch_size * tc.grad_accum, {}
    if table is not None:
        groups = list(held_out_scenes(table).values())
        scenes = [s for row in zip(*[g for g in groups if g]) for s in row][:n]
        batches["val_scene_loss"] = [make_scene_batch(train_set, scenes[b:b + tc.batch_size], tokenizer, model)
                                     for b in range(0, len(scenes), tc.batch_size)]
    if tc.describe:
        spread = np.linspace(0, len(val) - 1, min(n, len(val))).astype(int)
        ways = np.arange(len(spread)) % 6  # every way in turn (asked())
        batches["val_describe_loss"] = [make_describe_batch(val, spread[b:b + tc.batch_size], model,
                                                            asking(model, tokenizer), ways[b:b + tc.batch_size])
                                        for b in range(0, len(spread), tc.batch_size)]
    return batches


class Clock:
    """Tokens a second since the start, and wall seconds a step since the last log record (evaluations included),
    both from one clock reading."""

    def __init__(self, step):
        self.t0 = self.t_log = time.time()
        self.tokens, self.step_log = 0, step

    def read(self, step, world):
        now = time.time()
        out = {"tokens_per_s": self.tokens * world / (now - self.t0),
               "step_s": (now - self.t_log) / (step - self.step_log)}
        self.t_log, self.step_log = now, step
        return out


def stop_on_a_bad_loss(loss, step, out_dir):
    where = "No checkpoint was written yet"
    if (out_dir / "state.json").exists():
        saved = json.loads((out_dir / "state.json").read_text())["step"]
        where = f"The last good checkpoint (step {saved}) is in {out_dir}"
    raise BadInput(f"the loss became {loss.item()} at step {step}; stopped. {where}")

# -----------------------------------------------------------------------------
# Around the loop: processes, data, the model, starting or resuming


def start_processes(tc):
    """-> (this process's rank, the number of processes, its device); DDP's process group when there are several."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    if tc.fsdp and world == 1:
        raise BadInput("--fsdp shards the base over processes: start it with --nproc N or torchrun --nproc_per_node N")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    keep_freed_memory()  # every step allocates the same activations again: reuse the memory (docs/speed.md)
    torch.manual_seed(tc.seed)
    return rank, world, device


def check_out_dir(out_dir, resume):
    """A run is never written over without --resume, and a directory of the user's own files never at all."""
    recover_dir(out_dir)  # a run killed while saving left its newest whole checkpoint beside out_dir
    if not resume and (out_dir / "state.json").exists():
        step = json.loads((out_dir / "state.json").read_text()).get("step")
        raise BadInput(f"{out_dir} already holds a run (step {step}): add --resume to continue it, or choose "
                       "another --out_dir")
    check_replaceable(out_dir)


def open_shards(tc):
    train_set, val = TokenShards(tc.shards, "train"), TokenShards(tc.shards, "val")
    if not len(train_set) or not len(val):
        raise BadInput(f"{tc.shards} has {len(train_set)} training and {len(val)} held-out examples: training needs "
                       "both")
    return train_set, val


def build_model(tc, device, dtype, n_codes, colour_tokens):
    base = Path(tc.base) if tc.base else builtin_base()
    # the adapter is float32 always; under bf16 autocast a float32 base would be rounded to bf16 at every matmul
    model = MMMoE.from_pretrained(base, dtype=dtype, device=device)
    adapter = AdapterConfig(n_image_codes=n_codes, colour_tokens=colour_tokens, rank=tc.rank, alpha=tc.alpha,
                            attention=tc.attention, router=tc.router, expert_rank=tc.expert_rank)
    return model.add_image_adapter(adapter), base


def start_or_resume(model, tc, dtype, out_dir, resume, world, train_set, main_process):
    """The adapter's starting point -> (step, log, the step the schedule counts from, the saved state to resume or
    None): the run's own last checkpoint (--resume), a warm start (init_from), or fresh image rows (init); then the
    scene tokens, if the run has scenes and the start did not."""
    step, log, first, state = 0, [], 0, None
    if resume and (out_dir / "state.json").exists():
        state = read_json(out_dir / "state.json", ("step", "log", "train_config", "param_groups"))
        model.load_adapter(out_dir)
        step, log, first = state["step"], state["log"], state.get("schedule_start", 0)
        check_same_computation(tc, dtype, state, world, out_dir)
    elif tc.init_from:  # e.g. the committed demo/ on a machine where the run's own checkpoints are gone
        step, log = (s := model.load_adapter(tc.init_from))["step"], s["log"]
        first = step if tc.restart_schedule else 0
        restart = {"schedule_start": step} if tc.restart_schedule else {}
        log.append({"step": step, "warm_start": tc.init_from} | restart)
        print(f"warm start from {tc.init_from} at step {step}: adapter loaded, optimizer state starts afresh",
              file=sys.stderr)
    else:
        if resume and main_process:
            print(f"no checkpoint in {out_dir} yet: starting at step 0", file=sys.stderr)
        init_model(model, train_set.index["vq"], tc.init, tc.seed, tc.init_scale)
    if tc.scenes and not model.adapter.scene_tokens:
        model.add_scene_tokens()
    if main_process:
        counts, n_base = model.trainable_budget()
        total = sum(counts.values())
        print(f"trainable: {total:,} parameters = {100 * total / n_base:.2f}% of the {n_base:,}-parameter base ("
              + ", ".join(f"{k} {v:,}" for k, v in counts.items()) + ")", file=sys.stderr)
    return step, log, first, state


def check_same_computation(tc, dtype, state, world, out_dir):
    """Refuse (one line) to resume a run with settings that change its computation. The precision compared is the one
    each run computes in (auto may choose another on another machine)."""
    saved = state["train_config"]
    differ = [f"{k}={getattr(tc, k)} (run: {saved[k]})" for k in COMPUTATION
              if k in saved and saved[k] != getattr(tc, k)]
    precision = str(dtype).removeprefix("torch.")
    if state.get("precision", precision) != precision:
        differ.append(f"dtype={tc.dtype}, {precision} here (run: {saved.get('dtype')}, {state['precision']})")
    elif "precision" not in state and saved.get("dtype", tc.dtype) != tc.dtype:  # saved before precision was
        differ.append(f"dtype={tc.dtype} (run: {saved['dtype']})")
    run_batch = saved.get("batch_size", tc.batch_size) * state.get("world", 1) * saved.get("grad_accum", tc.grad_accum)
    if run_batch != tc.batch_size * world * tc.grad_accum:
        differ.append(f"a global batch of {tc.batch_size * world * tc.grad_accum} (run: {run_batch})")
    if differ:
        raise BadInput(f"{out_dir} is a run with other settings: {', '.join(differ)}; resume it with its own, or "
                       "start a new --out_dir with --init_from to continue from it")


def restore_optimizer(opt, out_dir, state, device):
    tensors = read_tensors(out_dir / "optimizer.safetensors", device=str(device))
    if "rng" not in tensors:
        raise BadInput(f"damaged checkpoint file {out_dir / 'optimizer.safetensors'}: no 'rng'")
    torch.set_rng_state(tensors.pop("rng").cpu())
    load_optimizer(opt, tensors, state["param_groups"])


def distribute(model, tc, params, world, device):
    """-> what the loop calls: the model itself, or DDP around it; under FSDP2 the frozen base is sharded over the
    processes and the adapter (~1%) stays whole on every one. Compiles the blocks if asked."""
    trained = model
    if tc.fsdp:
        for layer in model.model.layers:
            fully_shard(layer, ignored_params=set(params))
        fully_shard(model, ignored_params=set(params))
    elif world > 1:
        ids = [device] if device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if tc.compile and compiler_found(device):
        model.compile_blocks()  # evaluation and drawing run eagerly (the loop): compiling their shapes would not pay
    return trained


def compiler_found(device):
    """torch.compile writes C++ for a CPU, which needs a compiler (inductor calls g++ or clang++); CUDA needs none."""
    if device.type == "cuda" or shutil.which("g++") or shutil.which("clang++"):
        return True
    print("warning: compile=true, but no C++ compiler (g++ or clang++) was found: training runs eagerly",
          file=sys.stderr)
    return False

# -----------------------------------------------------------------------------
# Checkpoints, evaluation, the learning curve


def save_checkpoint(out_dir, model, opt, step, tc, log, vq_dir, world=1, samples=None, schedule_start=0):
    """Only what training changed (adapter tensors) + optimizer + RNG + step, atomically; and samples.png, the
    learning curve's latest pictures (samples: the grid and labels its curve() returned), if there are any."""
    opt_tensors, param_groups = optimizer_tensors(opt)
    state = {"step": step, "train_config": asdict(tc), "world": world, "param_groups": param_groups, "vq": str(vq_dir),
             "log": log, "schedule_start": schedule_start,
             "precision": str(model.lm_head.weight.dtype).removeprefix("torch.")}  # what dtype (auto) computed in
    try:
        with atomic_dir(out_dir) as tmp:
            model.save_adapter(tmp, state)
            save_file(opt_tensors | {"rng": torch.get_rng_state()}, tmp / "optimizer.safetensors")
            (tmp / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
            if samples is not None:
                save_grid(samples[0], tmp / "samples.png", size=64, labels=samples[1])
    except OSError as e:  # e.g. the disk is full: the half-written copy is gone, the previous checkpoint intact
        raise BadInput(f"could not save step {step} to {out_dir} ({e.strerror or e}); the previous checkpoint there "
                       "is intact: free the space and add --resume") from None


@torch.no_grad()
def evaluate(model, tc, val, text_ids, device, autocast, held_out=None):
    """-> the held-out losses: val_image_loss (the first eval_batches global batches of val's pictures drawn: the
    same examples whatever the micro-batch), text_ppl (held-out English: C1's check, the base's to the bit) and each of
    held_out's ({name: its micro-batches}: held_out_batches). Each the mean over all its targets, as one batch."""
    model.eval()
    n = tc.eval_batches * tc.batch_size * tc.grad_accum
    pictures = [make_batch(val, np.arange(b, b + tc.batch_size) % len(val), np.zeros(tc.batch_size, bool), model)
                for b in range(0, n, tc.batch_size)]
    seq = text_ids.view(-1, 256).to(device)  # (n, 256) chunks of English
    with autocast:
        text_loss = model(seq[:, :-1], seq[:, 1:])[1].item()
        image_loss = mean_loss(model, pictures, device)
        losses = {name: mean_loss(model, batches, device) for name, batches in (held_out or {}).items()}
    model.train()
    return {"val_image_loss": image_loss, "text_ppl": math.exp(text_loss)} | losses


def mean_loss(model, batches, device):
    """The loss over every target of some micro-batches, as one batch of them all would give it."""
    total, count = 0.0, 0
    for x, y, pad in batches:
        k = int((y >= 0).sum())
        total += model(x.to(device), y.to(device), pad=pad.to(device))[1].item() * k
        count += k
    return total / count


def learning_curve_setup(model, tokenizer, train_set, tc):
    """-> curve(model, autocast): draws a fixed set of captions of each of data.GROUPS (training emoji as people ask,
    held-out emoji, held-out colour pairs), greedily with sample.py's default guidance (at guidance 3 the demo drew
    nothing recognisable), and scores each picture against the dataset's pictures (VQModel.scores, score_summary):
    the asked picture's rank by VQ features (0 = top-1), hue and colour-word agreement, the asked object's rank by
    shape."""
    device = model.lm_head.weight.device
    vq = load_vq(train_set.index["vq"], device)
    rows, images = load_images(read_folder(train_set.index["data"]), vq.config.image_size, desc="curve gallery")
    images = images.to(device)
    gallery = vq.gallery(images, object_index(rows))
    white = vq.tokenize(torch.ones(1, *images.shape[1:], device=device))[0]  # (n,): a picture with nothing on it
    picked = {}  # group -> [(row, caption)]
    for group in GROUPS:
        idx = caption_rows(rows, group)
        idx = idx[:: max(1, len(idx) // tc.curve_captions)][: tc.curve_captions]
        picked[group] = [(i, asked_caption(rows[i], group)) for i in idx]

    @torch.no_grad()
    def curve(model, autocast):
        """-> (figures, a grid of what was asked over what was drawn, (rows, cols, 3, H, W), and its row labels)."""
        model.eval()
        n = vq.config.n_tokens
        out, grid, labels = {}, [], []
        for group, chosen in picked.items():
            if not chosen:
                continue
            with autocast:  # the model as it trains, all captions of the group as one batch; the VQ in float32
                tokens = model.generate_image([tokenizer.encode(caption).ids for _, caption in chosen], n,
                                              guidance=SAMPLING["guidance"], temperature=0)
            if model.adapter.scene_tokens:  # one object asked: a scene drawn instead is a miss, scored as white
                K = model.adapter.n_image_codes
                tokens = torch.stack([row[:n] if scene_tiles(row, n, K) is None else white for row in tokens])
            pictures, own = vq.detokenize(tokens), torch.tensor([i for i, _ in chosen])
            out |= {f"{group}_{k}": v for k, v in score_summary(vq.scores(pictures, gallery, own)).items()}
            grid += [images[own[:12]].cpu(), pictures[:12].cpu()]
            labels += [f"{GROUPS[group]}: asked", f"drawn (greedy, guidance {SAMPLING['guidance']})"]
        model.train()
        width = max(len(row) for row in grid)
        padded = [torch.cat([row, torch.ones(width - len(row), *row.shape[1:])]) for row in grid]
        return out, torch.stack(padded), labels
    return curve


# -----------------------------------------------------------------------------
# Sharing a run, and the command line


def export(run_dir, out):
    """A run's adapter for sharing, as the committed demo/ is: adapter.safetensors with its image rows in bfloat16
    (half their size; the LoRA stays float32, and load_adapter reads either), state.json, and the run's VQ as vq/,
    so that the directory is all sample.py needs besides the base. No path of this machine is written: the VQ is
    "vq" (beside the adapter), the run and its warm start are named, not located. Each file is replaced by a rename,
    never half-written."""
    state, _, vq_dir = run_inputs(run_dir)
    tensors = read_tensors(Path(run_dir) / "adapter.safetensors")
    config = state["train_config"]
    names = {k: Path(config[k]).name for k in ("out_dir", "init_from") if config.get(k)}
    log = [r | {"warm_start": Path(r["warm_start"]).name} if "warm_start" in r else r for r in state["log"]]
    state = state | {"vq": "vq", "train_config": config | names, "log": log}
    out = Path(out)
    (out / "vq").mkdir(parents=True, exist_ok=True)
    half = {k: v.to(torch.bfloat16) if k.startswith("image_") else v for k, v in tensors.items()}
    files = {"adapter.safetensors": lambda p: save_file(half, p),
             "state.json": lambda p: p.write_text(json.dumps(state, indent=1))}
    for name in ("config.json", "model.safetensors"):
        files[f"vq/{name}"] = lambda p, name=name: shutil.copyfile(Path(vq_dir) / name, p)
    for name, write in files.items():
        tmp = out / f"{name}.tmp-{os.getpid()}"
        write(tmp)
        os.replace(tmp, out / name)
    size = sum((out / n).stat().st_size for n in files) / 1e6
    print(f"exported {run_dir} (step {state['step']}) to {out}: {size:.1f} MB")


def parse_args(argv):
    """A config/*.json preset, then --key=value overrides; --resume, --nproc N and --export DIR are flags. Every
    value is checked here (TrainConfig.check), before anything is loaded."""
    values, resume, nproc, export_to = {}, False, None, None
    types = {f.name: f.type for f in fields(TrainConfig)}
    rest = list(argv)
    while rest:
        arg = rest.pop(0)
        if arg == "--resume":
            resume = True
        elif arg.startswith("--nproc") or arg.startswith("--export"):
            value = arg.split("=", 1)[1] if "=" in arg else (rest.pop(0) if rest else "")
            if arg.startswith("--nproc"):
                nproc = setting("nproc", value, int)
            elif not value:
                raise BadInput("--export needs a directory to write the adapter to")
            else:
                export_to = value
        elif arg.startswith("--"):
            key, _, value = arg[2:].partition("=")
            key = key.replace("-", "_")
            if key not in types:
                raise BadInput(f"unknown setting --{key} (settings: {', '.join(types)})")
            values[key] = setting(key, value, types[key])
        elif arg.endswith(".json"):
            values = read_preset(arg, types) | values
        else:
            raise BadInput(f"unexpected argument {arg!r}: a config/*.json file, --key=value, --resume, --nproc N or "
                           "--export DIR")
    if nproc is not None and nproc < 1:
        raise BadInput("bad setting: --nproc >= 1 is required")
    return TrainConfig(**values).check(), resume, nproc, export_to


def read_preset(path, types):
    """A config/*.json file -> its settings, each a known one of the right type."""
    try:
        preset = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise BadInput(f"no config file {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInput(f"{path} is not valid JSON: {' '.join(str(e).split())}") from None
    if not isinstance(preset, dict):
        raise BadInput(f"{path} must hold a JSON object of settings")
    for key, value in preset.items():
        if key not in types:
            raise BadInput(f"unknown setting {key!r} in {path} (settings: {', '.join(types)})")
        if not isinstance(value, types[key]) and not (types[key] is float and type(value) is int):
            raise BadInput(f"{path}: {key} must be {types[key].__name__}, not {value!r}")
    return preset


def setting(key, value, kind):
    """A --key=value string as the setting's type, or one line saying what was expected."""
    if kind is bool:
        if value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise BadInput(f"--{key}={value}: expected true or false")
        return value.lower() in ("1", "true", "yes")
    try:
        return kind(value)
    except ValueError:
        expected = "an integer" if kind is int else "a number" if kind is float else "text"
        raise BadInput(f"--{key}={value}: expected {expected}") from None


def main(argv=None):
    tc, resume, nproc, export_to = parse_args(sys.argv[1:] if argv is None else argv)
    if export_to:
        return export(tc.out_dir, export_to)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if nproc is not None and world > 1 and nproc != world:
        raise BadInput(f"--nproc {nproc} asks for {nproc} processes but torchrun started {world}: "
                       f"use `torchrun --nproc_per_node {nproc} train.py ...` or "
                       f"`torchrun train.py --nproc {nproc} ...`")
    # `python train.py --nproc 8`, and `torchrun train.py --nproc 8` (torchrun's default is one process): that one
    # process starts the 8 workers on this node with torch's elastic launcher, as torchrun --nproc_per_node 8 would
    if nproc is not None and nproc > 1 and world == 1:
        config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, rdzv_backend="c10d",
                              rdzv_endpoint="localhost:0", run_id=f"mmmoe-{os.getpid()}", max_restarts=0)
        elastic_launch(config, worker)(tc, resume)
    else:
        train(tc, resume)


def worker(tc, resume):  # what each process started by --nproc runs
    run(train, tc, resume)


if __name__ == "__main__":
    run(main)
