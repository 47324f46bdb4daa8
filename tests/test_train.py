"""PLoRA in mmmoe.py and train.py: the text path provably untouched, training distributed and resumable."""
import base64
import contextlib
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import ROOT, with_random_adapter
from PIL import Image
from safetensors.torch import load_file

import mmmoe
import sample
import train
from data.scenes import GENEVAL
from mmmoe import AdapterConfig, BadInput, MMMoE, bfloat16_support, choose_dtype


def test_text_logits_untouched_bit_for_bit(tiny_ckpt):
    path, cfg, _ = tiny_ckpt()
    base, mm = MMMoE.from_pretrained(path), with_random_adapter(path)
    V = cfg["vocab_size"]
    text = torch.randint(0, V, (3, 17), generator=torch.Generator().manual_seed(1))
    (base_logits, _), (_, base_loss) = base(text[:, :-1]), base(text[:, :-1], text[:, 1:])
    (mm_logits, _), (_, mm_loss) = mm(text[:, :-1]), mm(text[:, :-1], text[:, 1:])
    assert mm_logits.shape[-1] == V + 16 + 2
    assert torch.equal(mm_logits[..., :V], base_logits) and torch.equal(mm_loss, base_loss)
    # mixed sequences: text before the first image token is what the base computes on that text alone
    image = mm.image_token(torch.randint(0, 16, (3, 9), generator=torch.Generator().manual_seed(2)))
    mixed = torch.cat([text[:, :11], torch.full((3, 1), mm.image_token("boi")), image], dim=1)
    logits, _ = mm(mixed)
    assert torch.equal(logits[:, :11, :V], base(text[:, :11])[0])
    # ... and the adapter does act on the image part
    plain = MMMoE.from_pretrained(path).add_image_adapter(AdapterConfig(n_image_codes=16, rank=4))
    plain.load_state_dict(mm.state_dict())
    with torch.no_grad():
        for layer in plain.model.layers:
            layer.block_sparse_moe.experts.w2_lora.B.zero_()
    assert not torch.allclose(plain(mixed)[0][:, 12:], logits[:, 12:])


@pytest.mark.parametrize("copies", [False, True])
def test_adapter_off_is_the_base_and_comes_back(tiny_ckpt, copies):
    """One model for C1: with its adapter switched off, the model with an adapter computes what a separately loaded base
    computes, bit for bit, even on image-token-free prompts after a picture's tokens have been seen; on exit it is
    the model with its adapter again (its image logits exactly as before)."""
    path, cfg, _ = tiny_ckpt(copies=copies)
    base, mm = MMMoE.from_pretrained(path), with_random_adapter(path)
    text = torch.randint(0, cfg["vocab_size"], (2, 13), generator=torch.Generator().manual_seed(3))
    mixed = torch.cat([text, mm.image_token(torch.randint(0, 16, (2, 5)))], dim=1)
    with torch.no_grad():
        before = mm(mixed)[0]
        with mm.adapter_off():
            off = mm(text)[0]
            assert mm.adapter is None and not any(p.requires_grad for p in mm.parameters())
        assert torch.equal(off, base(text)[0]) and off.shape[-1] == cfg["vocab_size"]
        assert torch.equal(mm(mixed)[0], before) and mm.adapter is not None
        assert sum(p.requires_grad for p in mm.parameters()) > 0


def test_only_the_adapter_learns(tiny_ckpt):
    path, _, _ = tiny_ckpt()
    mm = with_random_adapter(path)
    idx = torch.cat([torch.randint(0, 97, (2, 5)), mm.image_token(torch.randint(0, 16, (2, 8)))], 1)
    targets = torch.full_like(idx, -1)
    targets[:, 5:-1] = idx[:, 6:]
    _, loss = mm(idx, targets)
    loss.backward()
    trainable = {n for n, p in mm.named_parameters() if p.requires_grad}
    assert all(mm.is_adapter_param(n) for n in trainable)
    assert {"image_embed", "image_head", "model.layers.0.block_sparse_moe.gate_lora.A",
            "model.layers.1.self_attn.q_lora.B", "model.layers.1.block_sparse_moe.experts.w2_lora.B"} <= trainable
    assert all(p.grad is None for n, p in mm.named_parameters() if n not in trainable)
    assert mm.get_parameter("model.layers.1.block_sparse_moe.experts.w1_lora.B").grad.abs().sum() > 0
    counts, n_base = mm.trainable_budget()
    assert sum(counts.values()) == sum(p.numel() for n, p in mm.named_parameters() if n in trainable)
    assert n_base == sum(p.numel() for p in MMMoE.from_pretrained(path).parameters())


def test_a_loss_runs_no_column_after_its_last_target(tiny_ckpt):
    """The model is causal: the columns after a batch's last target (the last code, <eoi>, <eos>, padding)
    cannot change the loss, so a loss never computes them."""
    path, _, _ = tiny_ckpt()
    mm = with_random_adapter(path)
    g = torch.Generator().manual_seed(0)
    codes = mm.image_token(torch.randint(0, 16, (2, 8), generator=g))
    idx = torch.cat([torch.randint(0, 97, (2, 5), generator=g), torch.full((2, 1), mm.image_token("boi")), codes,
                     torch.full((2, 1), mm.image_token("eoi")), torch.full((2, 3), mm.config.eos_token_id)], 1)  # (2, 18)
    targets = torch.full_like(idx, -1)
    targets[:, 5:13] = codes  # <boi> and codes 1..7 predict codes 1..8: the last target is in column 12
    loss = mm(idx, targets)[1]
    assert mm.model.layers[0].block_sparse_moe.router_logits.shape[0] == 2 * (13 - 5)  # the image part up to it only
    assert torch.equal(loss, mm(idx[:, :13], targets[:, :13])[1])


def test_colour_weight_multiplies_the_colour_tokens_term_only(tiny_ckpt):
    """train.py's colour_weight: the colour token's cross-entropy (the last colour_tokens image codes) counts w times
    in the mean; every other term, and the loss at w = 1, are the plain loss's."""
    path, _, _ = tiny_ckpt()
    mm = with_random_adapter(path, colour_tokens=3)  # image codes 13, 14, 15 are colour tokens
    g = torch.Generator().manual_seed(0)
    colour, codes = torch.tensor([13, 15]), torch.randint(0, 13, (2, 6), generator=g)
    image = mm.image_token(torch.cat([colour[:, None], codes], 1))  # (2, 7): a colour token, then codes
    idx = torch.cat([torch.randint(0, 97, (2, 4), generator=g), torch.full((2, 1), mm.image_token("boi")), image], 1)
    targets = torch.full_like(idx, -1)
    targets[:, 4:-1] = idx[:, 5:]  # <boi> predicts the colour token, each code the next
    logits = mm(idx)[0][:, 4:-1, -18:].float()  # (2, 7, 18): the image tokens' columns (codes, <boi>, <eoi>)
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets[:, 4:-1] - 97, reduction="none")  # (2, 7)
    plain = mm(idx, targets)[1]
    assert torch.allclose(plain, nll.mean(), atol=1e-6)
    assert torch.equal(mm(idx, targets, colour_weight=1.0)[1], plain)
    weighted = nll.clone()
    weighted[:, 0] *= 5.0
    assert torch.allclose(mm(idx, targets, colour_weight=5.0)[1], weighted.mean(), atol=1e-6)
    assert not torch.allclose(weighted.mean(), plain)


def test_grouped_plora_equals_per_token(tiny_ckpt):
    """Per-expert LoRA inside the grouped dispatch equals applying each token's experts one by one."""
    import mmmoe
    path, _, _ = tiny_ckpt()
    moe = with_random_adapter(path).model.layers[0].block_sparse_moe
    torch.manual_seed(0)
    x = torch.randn(2, 9, 64)
    image_rows = (torch.rand(2, 9) < 0.5)[..., None]
    y = moe(x, image_rows)
    flat, rows = x.view(-1, 64), image_rows.view(-1)
    for t in range(len(flat)):
        logits = moe.gate.weight @ flat[t] + (moe.gate_lora(flat[t:t + 1])[0] if rows[t] else 0)
        w, chosen = torch.softmax(logits, 0).topk(2)
        expected = sum(wi / w.sum() * mmmoe.expert(flat[t:t + 1], moe.experts, e, rows[t:t + 1, None])[0]
                       for wi, e in zip(w, chosen.tolist()))
        # float32 summation order differs between a grouped and a single-row matmul: outputs here are ~1e3,
        # so compare at 1e-5 of the row's scale (a wrong expert or weight is off by O(1) of it)
        assert (y.view(-1, 64)[t] - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_shared_base_equals_grouped_dispatch(tiny_ckpt):
    """A copy-upcycled base keeps one copy of each layer's FFN and computes it once (shared_base). With a
    trained adapter it must compute what grouped dispatch over E separate copies computes."""
    path, cfg, _ = tiny_ckpt(copies=True)
    shared, grouped = with_random_adapter(path), with_random_adapter(path)  # the same adapter weights
    for layer in grouped.model.layers:  # force the general path: E separate (identical) copies
        ex = layer.block_sparse_moe.experts
        assert len(ex.w1) == 1
        ex.w1, ex.w2, ex.w3 = (torch.nn.Parameter(w.expand(4, -1, -1).clone(), False) for w in (ex.w1, ex.w2, ex.w3))
    V = cfg["vocab_size"]
    g = torch.Generator().manual_seed(0)
    idx = torch.cat([torch.randint(0, V, (3, 6), generator=g), torch.full((3, 1), shared.image_token("boi")),
                     shared.image_token(torch.randint(0, 16, (3, 12), generator=g))], 1)
    targets = torch.cat([idx[:, 1:], torch.full((3, 1), -1)], 1)
    (ls, _), (lg, _) = shared(idx), grouped(idx)
    assert (ls - lg).abs().max() < 1e-5 * lg.abs().max()  # float32 sums in another order, nothing more
    assert not torch.allclose(ls, with_random_adapter(path, seed=1)(idx)[0])  # the adapter matters here
    (shared(idx, targets)[1] + ls.square().mean()).backward()
    (grouped(idx, targets)[1] + lg.square().mean()).backward()
    for (n, p), (_, q) in zip(shared.named_parameters(), grouped.named_parameters()):
        if p.requires_grad:
            assert (p.grad - q.grad).norm() <= 1e-4 * q.grad.norm(), n
    text = idx[:, :6]  # C1 on the shared path: text logits are the base's, bit for bit
    assert torch.equal(shared(text)[0][..., :V], MMMoE.from_pretrained(path)(text)[0])


def plain_reference_gradients(model, examples, autocast):
    """The plain path a training step must equal: each example alone, unpadded, every column through the masked
    PLoRA path (hidden_states, no prefix split), then the mean cross-entropy over all targets."""
    import data
    model.zero_grad()
    losses, n = [], 0
    for ex in examples:
        idx, targets, pad = data.make_batch([ex], [0], [False], model)
        assert int(pad[0]) == 0
        with autocast:
            losses.append(model.loss(model.hidden_states(idx), targets) * int((targets >= 0).sum()))
        n += int((targets >= 0).sum())
    (sum(losses) / n).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}


def ragged_examples(g, n_codes=8):
    """Examples (caption ids, codes) with captions of 1 to 6 tokens: a batch of them is left-padded."""
    return [(torch.randint(2, 97, (k,), generator=g).numpy(), torch.randint(0, 16, (n_codes,), generator=g).numpy())
            for k in (1, 6, 3, 4)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_left_padded_training_step_equals_the_plain_path(tiny_ckpt, dtype):
    """make_batch left-pads, so the image part of a batch is image tokens only (every row of the mask true); the padding is seen by no token. The gradient of every trainable tensor equals the plain
    path's on the same model: within 1e-4 of its norm in float32 (measured up to 2e-5 on an AMD EPYC with AVX2, 1e-5
    elsewhere), within 1e-2 in bf16 (the base in bf16 under bf16 autocast, as train.py runs it; measured 0.5%), where
    a wrong mask or position is off by O(1)."""
    import data

    def model_in(dtype):
        model = with_random_adapter(path)
        model.model.to(dtype)
        model.lm_head.to(dtype)
        return model
    path, _, _ = tiny_ckpt()
    dtype = getattr(torch, dtype)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    examples = ragged_examples(torch.Generator().manual_seed(0))
    model = model_in(dtype)
    idx, targets, pad = data.make_batch(examples, range(4), [False] * 4, model)
    assert pad.tolist() == [5, 0, 3, 2] and (idx[:, 7:-2] >= model.config.vocab_size).all()  # <boi> aligned in column 7
    with autocast:
        loss = model(idx, targets, pad=pad)[1]
    loss.backward()
    reference = plain_reference_gradients(model_in(dtype), examples, autocast)
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert (p.grad - reference[name]).norm() <= tolerance * reference[name].norm(), name
    assert len(reference) == sum(p.requires_grad for p in model.parameters()) and all(g.norm() > 0 for g in reference.values())


def test_text_logits_untouched_with_left_padding(tiny_ckpt):
    """C1 for padded batches: the text columns are the base's, bit for bit, on the same padded batch; and a padded
    row computes what the row computes alone (padding seen by no token), up to float32 rounding."""
    import data
    path, cfg, _ = tiny_ckpt()
    base, mm = MMMoE.from_pretrained(path), with_random_adapter(path, scale=0.05)  # 0.3 amplifies rounding to 1e-5
    examples = ragged_examples(torch.Generator().manual_seed(1))
    idx, _, pad = data.make_batch(examples, range(4), [False] * 4, mm)
    V = cfg["vocab_size"]
    logits = mm(idx, pad=pad)[0]
    assert torch.equal(logits[:, :7, :V], base(idx[:, :7], pad=pad)[0])  # the text before the aligned <boi>
    for r, p in enumerate(pad.tolist()):
        alone = mm(idx[r:r + 1, p:])[0]
        assert (logits[r, p:] - alone[0]).abs().max() <= 1e-5 * alone.abs().max()


@pytest.mark.skipif(not train.compiler_found(torch.device("cpu")), reason="torch.compile on a CPU needs a C++ compiler")
@pytest.mark.parametrize("copies", [True, False])
def test_compiled_blocks_equal_eager(tiny_ckpt, copies):
    """train.py's compile=true runs each block through torch.compile (one graph for any length), with copied experts
    (the shared base) or distinct ones (grouped dispatch, left eager inside): the loss and the gradients equal eager's
    within 1e-5 of their scale (fused kernels round in another order)."""
    import data
    path, _, _ = tiny_ckpt(copies=copies)
    examples = ragged_examples(torch.Generator().manual_seed(2))
    grads = []
    for compiled in (False, True):
        model = with_random_adapter(path, scale=0.05)
        if compiled:
            model.compile_blocks()
        for n in (4, 3):  # two batches of other lengths: the same graph serves both
            idx, targets, pad = data.make_batch(examples[:n], range(n), [False] * n, model)
            model.zero_grad()
            loss = model(idx, targets, pad=pad)[1]
            loss.backward()
        grads.append([loss] + [p.grad for p in model.parameters() if p.requires_grad])
    for eager, comp in zip(*grads):  # measured: <= 1e-6 (an adapter of scale 0.3 amplifies rounding to 1e-4)
        assert (eager - comp).norm() <= 1e-5 * eager.norm()


def test_redundancy_variants_have_equal_budgets_and_a_dense_base_keeps_c1(tiny_ckpt):
    """config/redundancy.sh's variants: 4 experts at rank 2, the router frozen, one dense expert at rank 8. The
    experts' and attention's trainable counts are equal (from trainable_budget, not by hand), only the router's LoRA
    differs; the frozen router trains no router tensor; the dense variant's text logits are its base's, bit for bit."""
    moe_path, cfg, _ = tiny_ckpt(experts=4, top_k=2, copies=True, name="moe")
    dense_path, _, _ = tiny_ckpt(experts=1, top_k=1, name="dense")
    moe, frozen = (with_random_adapter(moe_path, expert_rank=2, router=r) for r in (True, False))
    dense = with_random_adapter(dense_path, expert_rank=8, router=False)
    (m, _), (f, _), (d, _) = (x.trainable_budget() for x in (moe, frozen, dense))
    assert m["LoRA experts"] == f["LoRA experts"] == d["LoRA experts"] > 0 and m["LoRA attention"] == f["LoRA attention"] == d["LoRA attention"]
    assert m["LoRA router"] > 0 == f["LoRA router"] == d["LoRA router"]
    assert not [n for n, p in frozen.named_parameters() if p.requires_grad and "gate" in n]
    text = torch.randint(0, cfg["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(3))
    image = dense.image_token(torch.randint(0, 16, (2, 5), generator=torch.Generator().manual_seed(4)))
    mixed = torch.cat([text, torch.full((2, 1), dense.image_token("boi")), image], 1)
    base = MMMoE.from_pretrained(dense_path)
    assert torch.equal(dense(text)[0][..., :cfg["vocab_size"]], base(text)[0])
    assert torch.equal(dense(mixed)[0][:, :9, :cfg["vocab_size"]], base(text)[0])
    assert dense.model.layers[0].block_sparse_moe.experts.w1_lora.A.shape == (8, 64)  # rank 8, one expert


def test_folded_plora_equals_plain_on_image_tokens_and_is_undone(tiny_ckpt):
    """generate_image's decoding steps run with the attention and router updates folded into their weights
    (MMMoE.folded_plora): on image tokens the same function up to rounding; afterwards the base's own weights."""
    path, cfg, _ = tiny_ckpt(copies=True)
    model = with_random_adapter(path)
    V, g = cfg["vocab_size"], torch.Generator().manual_seed(0)
    prompt = torch.cat([torch.randint(0, V, (2, 5), generator=g), torch.full((2, 1), model.image_token("boi"))], 1)
    codes = model.image_token(torch.randint(0, 16, (2, 7), generator=g))
    before = {n: p.clone() for n, p in model.named_parameters()}

    def image_steps(folded):  # the prompt as the base runs it, then image tokens one at a time from the cache
        model.setup_caches(2, 13)
        model.hidden_states(prompt, torch.arange(6))
        with model.folded_plora() if folded else contextlib.nullcontext():
            out = torch.cat([model.hidden_states(codes[:, i:i + 1], torch.tensor([6 + i])) for i in range(7)], 1)
        model.clear_caches()
        return out
    with torch.no_grad():
        plain, folded = image_steps(False), image_steps(True)
    assert (plain - folded).abs().max() < 1e-5 * plain.abs().max()
    with model.folded_plora():  # folded in for real: the weight is another matrix, its update switched off
        attn = model.model.layers[0].self_attn
        assert attn.q_lora is None and not torch.equal(attn.q_proj.weight, before["model.layers.0.self_attn.q_proj.weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.model.layers[0].self_attn.q_lora is not None and model.model.layers[0].block_sparse_moe.gate_lora is not None


def run_train(setup, out, *extra, env=None, command_only=False):
    args = ["--base=" + str(setup["base"]), "--shards=" + str(setup["shards"]), "--out_dir=" + str(out), "--rank=4",
            "--batch_size=4", "--steps=4", "--warmup=1", "--eval_every=2", "--eval_batches=1", "--save_every=2",
            "--caption_dropout=0.3", "--init=mean", "--dtype=float32", "--log_every=1", *extra]  # float32: on any CPU
    # init=mean: GW on the tiny fixture runs all its iterations (~10 s a process) and these tests are about processes;
    # the DDP test keeps init=gw, so that every rank is seen to start from the same GW rows
    cmd = [sys.executable, str(ROOT / "train.py"), *args]
    return cmd if command_only else subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def test_ddp_two_processes_equal_one(tiny_setup):
    one = run_train(tiny_setup, tiny_setup["tmp"] / "one", "--steps=3", "--aux_loss_coef=0", "--init=gw")
    assert one.returncode == 0, one.stderr[-2000:]
    two = run_train(tiny_setup, tiny_setup["tmp"] / "two", "--steps=3", "--aux_loss_coef=0", "--init=gw", "--batch_size=2", "--nproc", "2")
    assert two.returncode == 0, two.stderr[-2000:]
    assert same_training(tiny_setup["tmp"] / "one", tiny_setup["tmp"] / "two")
    assert "trainable:" in one.stderr and "% of the" in one.stderr  # C2, printed at start


def same_training(dir_a, dir_b):
    """Two runs of one global batch on different numbers of processes trained alike, as far as float32 allows.
    Measured (tiny fixture, 6 steps, one process against DDP and FSDP on two, ATEN_CPU_CAPABILITY=avx2 and an AVX512
    CPU's own kernels, 2026-12-04): the global gradient norm before clipping, which rank 0 logs after the all-reduce,
    agrees to 2.4e-7 / 4.0e-7 (relative) at the first step, where only the summation order of the 2-way split differs,
    and to 1.8e-5 within 6 steps; the adapters agree to 8.6e-5 / 8.0e-5 of each tensor's largest entry, most in LoRA A
    matrices, whose gradients start at 0 (B = 0) and which Adam rescales to full steps. The bounds below are 25x, 5x
    and 12x those. A skipped all-reduce, or gradients summed instead of averaged, moves every gradient norm by ~1e-1
    or 2x, and the adapters by O(1) of their scale."""
    a, b = load_file(dir_a / "adapter.safetensors"), load_file(dir_b / "adapter.safetensors")
    assert a.keys() == b.keys()
    worst = max(((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12)).item() for k in a)
    norms = [[r["grad_norm"] for r in json.loads((d / "state.json").read_text())["log"] if "grad_norm" in r] for d in (dir_a, dir_b)]
    assert len(norms[0]) == len(norms[1]) > 0, "both runs log every step (log_every=1)"
    drift = [abs(x - y) / x for x, y in zip(*norms)]
    assert drift[0] < 1e-5 and max(drift) < 1e-4, drift
    return worst < 1e-3


def test_fsdp_two_processes_equal_one_and_resume_anywhere(tiny_setup):
    """FSDP2 (gloo, CPU) shards the frozen base over 2 processes and keeps the adapter whole: it trains as one
    process does on the same global batch; its checkpoint resumes exactly under FSDP, and under 1 process."""
    tmp, quiet = tiny_setup["tmp"], dict(os.environ, OMP_NUM_THREADS="1")
    common = ("--steps=6", "--save_every=1", "--aux_loss_coef=0")
    fsdp = ("--batch_size=2", "--fsdp=true", "--nproc", "2")
    for out, extra in [("one", ()), ("fsdp", fsdp)]:
        r = run_train(tiny_setup, tmp / out, *common, *extra, env=quiet)
        assert r.returncode == 0, r.stderr[-3000:]
    assert same_training(tmp / "one", tmp / "fsdp")
    # kill an FSDP run (both workers) as soon as it has saved a checkpoint, then resume it, twice over
    cmd = run_train(tiny_setup, tmp / "killed", *common, *fsdp, env=quiet, command_only=True)
    proc = subprocess.Popen(cmd, env=quiet, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp / "killed" / "state.json"
    while proc.poll() is None and not state.exists():
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    step = json.loads(state.read_text())["step"]
    assert 1 <= step < 6, step
    shutil.copytree(tmp / "killed", tmp / "killed-1")
    r = run_train(tiny_setup, tmp / "killed", *common, *fsdp, "--resume", env=quiet)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_file(tmp / "fsdp" / "adapter.safetensors"), load_file(tmp / "killed" / "adapter.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # resumed under FSDP: exactly the uninterrupted FSDP run
    r = run_train(tiny_setup, tmp / "killed-1", *common, "--resume", env=quiet)  # 1 process, batch 4: the same global batch
    assert r.returncode == 0, r.stderr[-3000:]
    assert same_training(tmp / "fsdp", tmp / "killed-1")
    assert json.loads((tmp / "killed-1" / "state.json").read_text())["world"] == 1


def test_torchrun_with_nproc_trains_on_that_many_processes(tiny_setup):
    """`torchrun train.py -- --nproc 2`: torchrun starts one process, which starts the 2 workers. (Without the
    `--`, torch 2.13's torchrun takes --nproc for an abbreviation of its own options and stops: pytorch#120601.)"""
    tmp, quiet = tiny_setup["tmp"], dict(os.environ, OMP_NUM_THREADS="1")
    one = run_train(tiny_setup, tmp / "one", "--steps=3", "--aux_loss_coef=0", env=quiet)
    assert one.returncode == 0, one.stderr[-2000:]
    cmd = run_train(tiny_setup, tmp / "tr", "--steps=3", "--aux_loss_coef=0", "--batch_size=2", "--nproc", "2", command_only=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", cmd[1], "--", *cmd[2:]], capture_output=True, text=True,
                       env=quiet, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp / "tr" / "state.json").read_text())["world"] == 2
    assert same_training(tmp / "one", tmp / "tr")


def test_bfloat16_training_on_the_cpu(tiny_setup, capsys, monkeypatch):
    """dtype=bfloat16: the frozen base in bf16 under bf16 autocast, the adapter float32; the learning curve
    draws with it; a float32 resume of a bfloat16 run is a different computation and is refused, and so is
    dtype=auto where auto chooses float32; where it chooses bf16 (AMX), the run resumes."""
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(tiny_setup["tmp"] / "bf"),
                           rank=4, batch_size=4, steps=3, warmup=1, eval_every=3, eval_batches=1, save_every=3,
                           curve_every=3, curve_captions=2, dtype="bfloat16")
    model = train.train(tc)
    fast = bfloat16_support(torch.device("cpu")) == "fast"  # where bf16 is slower, the run says so
    assert ("warning: bfloat16 asked for" in capsys.readouterr().err) != fast
    assert model.lm_head.weight.dtype == torch.bfloat16 and model.image_embed.dtype == torch.float32
    log = json.loads((tiny_setup["tmp"] / "bf" / "state.json").read_text())["log"]
    assert all(math.isfinite(r["loss"]) for r in log if "loss" in r) and any("train_top1" in r for r in log)
    assert load_file(tiny_setup["tmp"] / "bf" / "adapter.safetensors")["image_embed"].dtype == torch.float32
    with pytest.raises(BadInput, match=r"dtype=float32, float32 here \(run: bfloat16, bfloat16\)"):
        train.train(train.TrainConfig(**{**tc.__dict__, "dtype": "float32"}), resume=True)
    auto = train.TrainConfig(**{**tc.__dict__, "dtype": "auto"})
    for amx in (False, True):  # an AVX2 machine, then one with AMX
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: amx)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        if not amx:
            with pytest.raises(BadInput, match=r"dtype=auto, float32 here \(run: bfloat16, bfloat16\)"):
                train.train(auto, resume=True)
        else:
            assert train.train(auto, resume=True).lm_head.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("machine,avx512_bf16,amx,auto", [("cuda", False, False, torch.bfloat16), ("cpu", True, True, torch.bfloat16),
                                                          ("cpu", True, False, torch.float32), ("cpu", False, False, torch.float32)])
def test_auto_precision_is_the_faster_one_and_a_slow_bfloat16_is_said(monkeypatch, machine, avx512_bf16, amx, auto):
    """auto: bf16 on CUDA and on a CPU with AMX; float32 on AVX512-BF16 without AMX (bf16 measured slower there) and
    on AVX2 (emulated). Each choice is said in a line; bfloat16 asked for where it is slower is given, with a warning."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    device = torch.device(machine)
    dtype, note = choose_dtype("auto", device)
    assert dtype == auto and note.startswith(f"precision auto: {str(auto).removeprefix('torch.')}")
    assert choose_dtype("float32", device) == (torch.float32, None)
    dtype, note = choose_dtype("bfloat16", device)
    assert dtype == torch.bfloat16 and (note is None) == (auto == torch.bfloat16)


def test_resume_equals_uninterrupted_and_survives_a_killed_save(tiny_setup, monkeypatch):
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), rank=4, batch_size=4, steps=4,
                           warmup=1, eval_every=2, eval_batches=1, save_every=2, caption_dropout=0.3)
    straight = train.train(train.TrainConfig(**{**tc.__dict__, "out_dir": str(tiny_setup["tmp"] / "a")}))
    tc.out_dir = str(tiny_setup["tmp"] / "b")
    real_save = train.save_checkpoint
    calls = []

    def killed_at_second_save(out_dir, *a):  # the process dies while writing the step-4 checkpoint
        calls.append(1)
        if len(calls) == 2:
            monkeypatch.setattr(train, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        real_save(out_dir, *a)
    monkeypatch.setattr(train, "save_checkpoint", killed_at_second_save)
    with pytest.raises(KeyboardInterrupt):
        train.train(tc)
    monkeypatch.undo()
    state = json.loads((tiny_setup["tmp"] / "b" / "state.json").read_text())
    assert state["step"] == 2  # the step-2 checkpoint is intact
    assert not list(tiny_setup["tmp"].glob(".b.tmp*"))
    resumed = train.train(tc, resume=True)
    for (n, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(p, q), n
    log = [json.loads(line) for line in (tiny_setup["tmp"] / "b" / "log.jsonl").read_text().splitlines()]
    assert any("text_ppl" in r for r in log) and any("val_image_loss" in r for r in log)


def test_text_perplexity_during_training_is_the_base(tiny_setup):
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(tiny_setup["tmp"] / "c"),
                           rank=4, batch_size=4, steps=2, warmup=1, eval_every=1, eval_batches=1, save_every=2, dtype="float32")
    model = train.train(tc)
    text = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(text[:, :-1], text[:, 1:])[1], MMMoE.from_pretrained(tiny_setup["base"])(text[:, :-1], text[:, 1:])[1])


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tiny_setup, monkeypatch):
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(tiny_setup["tmp"] / "n"),
                           rank=4, batch_size=4, steps=6, warmup=1, eval_every=10, save_every=2)
    real, calls = MMMoE.loss, []

    def loss_that_blows_up(self, logits, targets, colour_weight=1.0):  # training's 4th step (step index 3) diverges
        calls.append(self.training)
        return real(self, logits, targets, colour_weight) * (float("nan") if sum(calls) == 4 and self.training else 1.0)
    monkeypatch.setattr(MMMoE, "loss", loss_that_blows_up)
    with pytest.raises(BadInput, match=r"loss became nan at step 3; stopped. The last good checkpoint \(step 2\)"):
        train.train(tc)
    assert json.loads((tiny_setup["tmp"] / "n" / "state.json").read_text())["step"] == 2


def test_command_line_mistakes_are_one_line(tiny_setup):
    r = run_train(tiny_setup, tiny_setup["tmp"] / "x", "--learning_rate=3")
    assert r.returncode == 1 and "unknown setting --learning_rate" in r.stderr and r.stderr.strip().count("\n") == 0
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0")  # torchrun started 2 processes, --nproc asks for 8
    r = run_train(tiny_setup, tiny_setup["tmp"] / "y", "--nproc", "8", env=env)
    assert r.returncode == 1 and "torchrun started 2" in r.stderr and r.stderr.strip().count("\n") == 0


def test_learning_curve_and_warm_start(tiny_setup):
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(tiny_setup["tmp"] / "w"),
                           rank=4, batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=2,
                           curve_every=2, curve_captions=2)
    train.train(tc)
    point = next(r for r in json.loads((tiny_setup["tmp"] / "w" / "state.json").read_text())["log"] if "train_top1" in r)
    assert 0 <= point["train_top1"] <= point["train_top5"] <= 1 and 0 <= point["val_hue"] <= 1
    assert 0 <= point["val_median_rank"] < 24 and point["epoch"] == 2 * 4 / 20
    assert 0 <= point["pairs_both"] <= min(point["pairs_colour"], point["pairs_object_top5"]) <= 1  # the fixture's held-out pairs
    from PIL import Image
    with Image.open(tiny_setup["tmp"] / "w" / "samples.png") as im:  # asked over drawn, for each of the three groups
        assert im.size[1] > 6 * 64
    # a fresh out_dir continues from another run's adapter and step, with a fresh optimizer
    more = train.TrainConfig(**{**tc.__dict__, "out_dir": str(tiny_setup["tmp"] / "w2"), "steps": 3, "curve_every": 0,
                                "init_from": str(tiny_setup["tmp"] / "w")})
    model = train.train(more)
    state = json.loads((tiny_setup["tmp"] / "w2" / "state.json").read_text())
    assert state["step"] == 3 and {"step": 2, "warm_start": str(tiny_setup["tmp"] / "w")} in state["log"]
    assert not torch.equal(model.image_embed, MMMoE.from_pretrained(tiny_setup["base"]).add_image_adapter(
        AdapterConfig(n_image_codes=16, rank=4)).image_embed)  # it carries trained rows, not a fresh init
    # restart_schedule: a stage of its own, 3 more steps from step 2 with their own warm-up and decay
    stage = train.TrainConfig(**{**more.__dict__, "out_dir": str(tiny_setup["tmp"] / "w3"), "restart_schedule": True,
                                 "warmup": 2, "log_every": 1, "lr": 0.01, "min_lr": 0.001})
    train.train(stage)
    state = json.loads((tiny_setup["tmp"] / "w3" / "state.json").read_text())
    lrs = [r["lr"] for r in state["log"] if "lr" in r and r["step"] > 2]
    from runs import lr_at
    assert state["step"] == 5 and state["schedule_start"] == 2 and lrs == [lr_at(i, 0.01, 2, 3, 0.001) for i in range(3)]
    assert lrs[0] == 0.005  # warming up again (the run's own schedule would be past its warm-up at step 2)
    with pytest.raises(BadInput, match="init_from with restart_schedule"):
        train.parse_args(["--restart_schedule=true"])


def test_a_data_mix_draws_each_kind_as_often_as_it_says():
    """mix "multicolour=3,copy=0": in every epoch each multi-coloured example comes 3 times, copies never, the rest
    once; the order is a function of (seed, step) only, and with no mix it is the plain permutation of before."""
    import data
    from runs import batch_at

    class Shards:  # what mix_repeats reads of a TokenShards
        kinds, path = ["bare", "multicolour", "copy", "original", "multicolour"], "s"

        def __len__(self):
            return 5
    repeats = data.mix_repeats(Shards(), "multicolour=3, copy=0")
    assert repeats.tolist() == [1, 3, 0, 1, 3]
    epoch = np.concatenate([batch_at(5, 4, step, 7, repeats) for step in range(2)])  # 8 of an epoch's 8 examples
    assert np.bincount(epoch, minlength=5).tolist() == [1, 3, 0, 1, 3]
    assert np.array_equal(batch_at(5, 4, 1, 7, repeats), batch_at(5, 4, 1, 7, repeats))
    assert np.array_equal(batch_at(5, 2, 3, 7), np.random.default_rng([7, 1]).permutation(5)[[2, 3]])
    for bad in ("multicolour", "rainbow=2", "copy=-1", "bare=1.5"):
        with pytest.raises(BadInput, match="mix:"):
            data.parse_mix(bad)
    with pytest.raises(BadInput, match="leaves no training example"):
        data.mix_repeats(Shards(), "bare=0,multicolour=0,copy=0,original=0")


def test_export_halves_the_image_rows_and_is_all_sample_needs(tiny_setup):
    run, out = tiny_setup["tmp"] / "run", tiny_setup["tmp"] / "shared"
    args = [f"--base={tiny_setup['base']}", f"--shards={tiny_setup['shards']}", f"--out_dir={run}"]
    train.main(args + ["--rank=4", "--batch_size=4", "--steps=2", "--warmup=1", "--eval_every=2", "--eval_batches=1", "--init=mean"])
    train.main(args + ["--export", str(out)])
    full, half = load_file(run / "adapter.safetensors"), load_file(out / "adapter.safetensors")
    assert full.keys() == half.keys() and half["image_embed"].dtype == torch.bfloat16
    assert all(torch.equal(half[k], full[k]) for k in full if not k.startswith("image_"))  # the LoRA as trained
    import sample
    model, _, vq = sample.load_pipeline(out)  # the exported directory alone (its vq/ beside the adapter)
    assert torch.equal(model.image_embed, full["image_embed"].to(torch.bfloat16).float())
    assert (out / "vq" / "config.json").read_text() == (tiny_setup["vq"] / "config.json").read_text()
    train.main([f"--out_dir={out}", "--export", str(tiny_setup["tmp"] / "again")])  # bf16 -> float32 -> bf16 is exact
    assert (tiny_setup["tmp"] / "again" / "adapter.safetensors").read_bytes() == (out / "adapter.safetensors").read_bytes()


@pytest.mark.parametrize("args,words", [(["--lr=abc"], "--lr=abc: expected a number"), (["--attention=flase"], "expected true or false"),
                                        (["--steps=-1"], "steps >= 1"), (["--batch_size=0"], "batch_size >= 1"),
                                        (["--nproc=abc"], "--nproc=abc: expected an integer"), (["--init=magic"], "init: gw"),
                                        (["--caption_dropout=1"], "caption_dropout"), (["nope.json"], "no config file"),
                                        (["--colour_weight=0"], "colour_weight > 0")])
def test_bad_settings_are_one_line_before_any_work(args, words):
    with pytest.raises(BadInput, match=words):
        train.parse_args(args)


def test_bad_config_files(tmp_path):
    for text, words in [("{nope", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"), ('{"steps": "ten"}', "steps must be int"),
                        ('{"stepz": 3}', "unknown setting 'stepz'")]:
        (tmp_path / "c.json").write_text(text)
        with pytest.raises(BadInput, match=words):
            train.parse_args([str(tmp_path / "c.json")])


def test_a_run_is_never_written_over(tiny_setup):
    """Without --resume an existing run is refused (not restarted over); a folder of the user's own files is
    never replaced; a run killed between the two renames of a save resumes from its newest whole checkpoint."""
    out = tiny_setup["tmp"] / "r"
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(out), rank=4,
                           batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=1)
    train.train(tc)
    with pytest.raises(BadInput, match=r"already holds a run \(step 2\): add --resume"):
        train.train(tc)
    mine = tiny_setup["tmp"] / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my notes")
    with pytest.raises(BadInput, match="holds files that mmmoe did not write there"):
        train.train(train.TrainConfig(**{**tc.__dict__, "out_dir": str(mine)}))
    assert (mine / "notes.txt").read_text() == "my notes"
    # what a kill between `out -> .r.old-PID` and `.r.tmp-PID -> out` leaves: no out, an old and a whole tmp
    old, tmp = out.with_name(".r.old-999999"), out.with_name(".r.tmp-999999")
    out.rename(tmp)
    (old / "x").mkdir(parents=True)
    with pytest.raises(BadInput, match=r"is a run with other settings: lr=0.5 \(run: 0.001\)"):
        train.train(train.TrainConfig(**{**tc.__dict__, "lr": 0.5}), resume=True)
    assert (out / "state.json").exists() and not old.exists() and not tmp.exists()  # recovered before refusing
    train.train(train.TrainConfig(**{**tc.__dict__, "eval_every": 1}), resume=True)  # cadence may differ
    state = json.loads((out / "state.json").read_text())
    assert state["step"] == 2 and [r["step"] for r in state["log"] if "val_image_loss" in r] == [2]  # not restarted


def test_a_full_disk_and_a_damaged_optimizer_file_are_one_line(tiny_setup, monkeypatch):
    out = tiny_setup["tmp"] / "d"
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(out), rank=4,
                           batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=1)
    real, calls = train.save_file, []

    def full_at_second_save(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(*a, **k)
    monkeypatch.setattr(train, "save_file", full_at_second_save)
    with pytest.raises(BadInput, match=r"could not save step 2 to .* \(No space left on device\); the previous checkpoint"):
        train.train(tc)
    monkeypatch.undo()
    assert json.loads((out / "state.json").read_text())["step"] == 1 and not list(tiny_setup["tmp"].glob(".d.*"))
    (out / "optimizer.safetensors").write_bytes((out / "optimizer.safetensors").read_bytes()[:100])
    with pytest.raises(BadInput, match=r"damaged checkpoint file .*optimizer\.safetensors"):
        train.train(tc, resume=True)


def test_scenes_warm_started_from_single_pictures_train_resume_and_draw(tiny_setup, tmp_path):
    """scenes=0.5 (#52): about half of the steps train on a batch of 2 x 2 scenes of the shards' pictures. A warm
    start from a single-picture run gets the two scene rows (copies of <boi>'s), trains, logs a held-out scene loss;
    --resume makes room for the scene rows before loading them; sample.py draws with the run (a canvas's size)."""
    base = tmp_path / "base"  # the tiny base with room for a scene: 1 + 4 x 64 image tokens after the caption
    shutil.copytree(tiny_setup["base"], base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 512}))
    single = train.TrainConfig(base=str(base), shards=str(tiny_setup["shards"]), out_dir=str(tmp_path / "one"),
                               rank=4, batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=2,
                               dtype="float32", init="mean")
    before = train.train(single)
    K = before.adapter.n_image_codes
    scenes = train.TrainConfig(**{**single.__dict__, "out_dir": str(tmp_path / "scenes"), "init_from": single.out_dir,
                                  "restart_schedule": True, "steps": 3, "eval_every": 3, "save_every": 3, "scenes": 0.5})
    kinds = [train.step_kind(scenes, step) for step in range(40)]  # whole batches, about half of them scenes
    assert set(kinds) == {"scenes", "pictures"} and 10 <= kinds.count("scenes") <= 30
    model = train.train(scenes)
    assert model.adapter.scene_tokens and model.image_embed.shape[0] == K + 4
    assert not torch.equal(model.image_embed[:K + 2].detach(), before.image_embed.detach())  # it trained
    state = json.loads((tmp_path / "scenes" / "state.json").read_text())
    assert state["step"] == 5 and state["adapter"]["scene_tokens"] and any("val_scene_loss" in r for r in state["log"])
    again = train.train(scenes, resume=True)  # nothing left to run: the saved adapter, scene rows included, loads
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters()))
    onwards = train.TrainConfig(**{**scenes.__dict__, "out_dir": str(tmp_path / "onwards"), "init_from": scenes.out_dir,
                                   "steps": 1, "eval_every": 1, "save_every": 1})
    assert train.train(onwards).image_embed.shape[0] == K + 4  # a warm start from a scene run: its scene rows
    out = tmp_path / "drawn.png"
    sample.main(["w10 w20", "w11 w21", "--ckpt", str(tmp_path / "scenes"), "--out", str(out), "--size", "64"])
    assert Image.open(out).size[0] == 64  # each drawing, scene or single picture, in a --size cell
    drawn, tokenizer, vq = sample.load_pipeline(tmp_path / "scenes")
    args = sample.argparse.Namespace(guidance=1.5, temperature=1.0, top_k=None, top_p=None)
    pictures = sample.draw(drawn, vq, [tokenizer.encode("w10 w20").ids] * 3, args, torch.Generator().manual_seed(0))
    assert pictures.shape == (3, 3, 2 * vq.config.image_size, 2 * vq.config.image_size)  # a canvas's size
    import analyze
    import serve
    with pytest.raises(BadInput, match="--geneval: .* draws no scenes"):  # before any work
        analyze.analyze(tmp_path / "one", tmp_path / "report", geneval=2)
    report = analyze.analyze(tmp_path / "scenes", tmp_path / "report", n_probe=4, samples=2, geneval=2, batch_size=8)
    ge = report["geneval"]
    assert 0 <= report["images"]["train"]["drawn_as_scenes"] <= 1  # a scene drawn for one object: a miss
    for category in GENEVAL:
        c = ge[category]
        assert 0 < c["prompts"] <= 2 and len(c["right"]) == len(c["found"]) == 4 * c["prompts"]
        assert c["score"] == sum(c["right"]) / len(c["right"]) and 0 <= c["drawn_as_scenes"] <= 1
        assert 0 <= c["ceiling"] <= 1  # the judge on the prompts' own pictures (colours: the held-out pair's)
        assert all(cell in (None, 0, 1, 2, 3) for found in c["found"] for cell, _, _ in found)
        assert (tmp_path / "report" / f"geneval_{category.replace(' ', '_')}.png").exists()
    assert ge["overall"] == pytest.approx(sum(ge[c]["score"] for c in GENEVAL) / 6)
    assert "## Scenes: GenEval's six categories" in (tmp_path / "report" / "report.md").read_text()
    explorer, lines = serve.Explorer(tmp_path / "scenes"), []  # the explorer draws them: canvases, as sample.py
    explorer.draw({"prompt": "w10 w20", "n": 2, "guidance": 1.5, "temperature": 1.0, "seed": 0}, lines.append)
    done, canvases = lines[-1], [Image.open(io.BytesIO(base64.b64decode(b))) for b in lines[-1]["images"]]
    assert done["done"] and all(m["tokens"] % vq.config.grid == 0 for m in lines[:-1]) and len(canvases) == 2
    row = torch.tensor(done["codes"][0])
    starts, routes = done["routing"]["tile_starts"], done["routing"]["routes"]
    assert len(routes[0]) == int((row >= 0).sum())  # every image token of the first drawing routed
    if len(starts) == 4:  # a scene: each tile's codes where tile_starts says
        for tile, start in zip(mmmoe.scene_tiles(row, vq.config.n_tokens, K), starts):
            assert (tile is None) == (start is None) and (tile is None or torch.equal(row[start:start + len(tile)], tile))
    tile = torch.randint(0, K, (vq.config.n_tokens,))  # a scene by hand: <scene> <empty> tile <empty> <empty>
    scene = torch.tensor([K + 2, K + 3, *tile, K + 3, K + 3])
    shown = explorer.routing(tokenizer.encode("w10 w20").ids, scene, [None, tile, None, None])
    assert shown["tile_starts"] == [None, 2, None, None] and len(shown["routes"][0]) == len(scene)
