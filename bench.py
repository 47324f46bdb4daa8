"""
Speed figures, one line each. Nothing here is a test: run it when you want numbers.

    python bench.py model     # prefill and KV-cached decode tokens/s, loader peak memory
    python bench.py gw        # GW initialisation at Mixtral scale: time and peak memory
    python bench.py train     # PLoRA training tokens/s (CPU: a tiny model; CUDA: the upcycled SmolLM2 at bf16, MFU)
    python bench.py base      # the built-in base: training step (shared vs grouped; bfloat16 where native), sample.py

On CPU it uses 2 threads (this project's reference machine). If transformers happens to be installed,
`model` also times its MixtralForCausalLM on the same weights; transformers is not a dependency.
"""
import argparse
import importlib.util
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from gw_init import init_image_rows
from mmmoe import AdapterConfig, MMMoE, MMMoEConfig, bfloat16_support, choose_dtype, linear
from runs import keep_freed_memory
from upcycle import builtin_base


def flops_per_token(config, seq_len):
    """Matmul FLOPs of one token's forward pass with seq_len tokens of context (routed experts only:
    each token runs top_k of them). Backward costs twice this."""
    c = config
    attn_proj = c.dim * c.head_dim * (2 * c.n_heads + 2 * c.n_kv_heads)
    experts = c.top_k * 3 * c.dim * c.intermediate_size + c.dim * c.n_experts
    attn_scores = 2 * c.n_heads * c.head_dim * seq_len  # q.k and p.v over seq_len keys
    return 2 * (c.n_layers * (attn_proj + experts + attn_scores) + c.dim * c.vocab_size)


def best_of(fn, repeats=3):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak_gflops(n=2048, dtype=torch.float32):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / best_of(lambda: a @ b, 5) / 1e9


def read_bandwidth_gbs(mb=256):
    """How fast this machine streams memory: sum a tensor far larger than the caches."""
    big = torch.ones(mb * 2**20 // 4)
    return big.nbytes / best_of(big.sum, 5) / 1e9


def random_model(config, seed=0):
    torch.manual_seed(seed)
    model = MMMoE(config)
    for name, p in model.named_parameters():
        torch.nn.init.normal_(p, std=0.02) if "norm" not in name else torch.nn.init.ones_(p)
    return model.eval()


def peak_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def bench_loader(path):
    """Run in a fresh process: load the checkpoint, report the growth of peak RSS. The first module built
    on the meta device costs torch ~70 MB of one-time lazy initialisation, whatever its size: done first."""
    code = ("import sys, torch; sys.path.insert(0, %r); import bench, mmmoe; torch.nn.Embedding(1, 1, device='meta'); "
            "before = bench.peak_rss_mb(); mmmoe.MMMoE.from_pretrained(%r, dtype=torch.float32); "
            "print(bench.peak_rss_mb() - before)")
    out = subprocess.run([sys.executable, "-c", code % (str(Path(__file__).parent), str(path))],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def bench_model(args):
    cfg = MMMoEConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                      intermediate_size=896, n_experts=8, top_k=2, max_seq_len=4096, dtype="float32")
    model = random_model(cfg)
    B, T, n_new = 4, 256, 128
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak (2048^3, {torch.get_num_threads()} threads): {peak:.1f} GFLOP/s")
    with torch.no_grad():
        t = best_of(lambda: model(idx))
    gflops = flops_per_token(cfg, T / 2) * B * T / t / 1e9
    print(f"mmmoe prefill {B}x{T}: {B * T / t:,.0f} tokens/s ({gflops:.1f} GFLOP/s, {100 * gflops / peak:.0f}% of peak)")
    prompt = idx[:1, :16]
    t = best_of(lambda: model.generate(prompt, n_new, temperature=0))
    # batch-1 decode is bound by memory, not arithmetic: every token streams each weight it uses once
    weight_mb = flops_per_token(cfg, 0) / 2 * 4 / 1e6  # fp32 bytes of the weights one token touches
    print(f"mmmoe KV-cached greedy decode of {n_new} tokens: {n_new / t:,.0f} tokens/s ({1000 * t / n_new:.2f} ms/token; "
          f"{weight_mb:.0f} MB of weights a token = {weight_mb * n_new / t / 1e3:.1f} GB/s, "
          f"this machine reads {read_bandwidth_gbs():.1f} GB/s)")
    t = best_of(lambda: weight_products(model, n_new))
    print(f"  the same weight products alone, one row each ({n_new} tokens' worth, two experts a layer in turn): "
          f"{1000 * t / n_new:.2f} ms/token = {weight_mb * n_new / t / 1e3:.1f} GB/s: the most a decode that calls "
          f"the BLAS product by product can stream")

    with tempfile.TemporaryDirectory() as tmp:
        if importlib.util.find_spec("transformers"):  # optional comparison, same weights
            from transformers import MixtralForCausalLM  # here: transformers is not a dependency
            model.save_pretrained(tmp)
            hf = MixtralForCausalLM.from_pretrained(tmp, dtype=torch.float32, attn_implementation="sdpa").eval()
            with torch.no_grad():
                assert (hf(idx).logits - model(idx)[0]).abs().max() < 1e-3  # same logits, or the timing means nothing
                t = best_of(lambda: hf(idx))
            print(f"transformers prefill {B}x{T}: {B * T / t:,.0f} tokens/s "
                  f"({flops_per_token(cfg, T / 2) * B * T / t / 1e9:.1f} GFLOP/s)")
            t = best_of(lambda: hf.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False))
            print(f"transformers KV-cached greedy decode of {n_new} tokens: {n_new / t:,.0f} tokens/s "
                  f"({1000 * t / n_new:.2f} ms/token)")
        big = MMMoEConfig(vocab_size=8192, dim=512, n_layers=3, n_heads=8, n_kv_heads=4, head_dim=64,
                          intermediate_size=1792, n_experts=8, top_k=2, dtype="float32")
        random_model(big).save_pretrained(Path(tmp) / "big", max_shard_bytes=100 * 2**20)
        nbytes = sum(f.stat().st_size for f in (Path(tmp) / "big").glob("*.safetensors"))
        grown = bench_loader(Path(tmp) / "big")
        print(f"loader peak RSS growth: {grown:.0f} MB for a {nbytes / 2**20:.0f} MB checkpoint "
              f"({grown / (nbytes / 2**20):.2f}x)")


def weight_products(model, n_tokens):
    """Only the matrix products of n_tokens decoding steps, as linear() computes them for one row: per layer
    q, k, v, o, the router and two experts' w1, w3, w2 (the next two each step, so that they come from
    memory as routed experts do), then the output layer. No attention, no routing, no other operator."""
    x = {n: torch.randn(1, n) for n in (model.config.dim, model.config.intermediate_size)}
    E = model.config.n_experts
    for t in range(n_tokens):
        for layer in model.model.layers:
            a, moe = layer.self_attn, layer.block_sparse_moe
            for w in (a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight, moe.gate.weight):
                linear(x[w.shape[1]], w)
            for e in (2 * t % E, (2 * t + 1) % E):
                for w in (moe.experts.w1[e], moe.experts.w3[e], moe.experts.w2[e]):
                    linear(x[w.shape[1]], w)
        linear(x[model.config.dim], model.lm_head.weight)


def bench_gw(args):
    """Mixtral-8x7B's vocabulary (32,000 x 4,096, untied: embeddings and output rows) against LlamaGen
    VQ-16's codebook (16,384 x 8), random tensors of those shapes."""
    g = torch.Generator().manual_seed(0)
    embed, head = torch.randn(32000, 4096, generator=g) * 0.02, torch.randn(32000, 4096, generator=g) * 0.02
    codebook = torch.randn(16384, 8, generator=g)
    before, t0 = peak_rss_mb(), time.perf_counter()
    e, h = init_image_rows(codebook, embed, head, method="gw", anchors=args.anchors)
    print(f"gw init, 32,000 x 4,096 (untied) vs 16,384 codes, {args.anchors} anchors: {time.perf_counter() - t0:.0f} s, "
          f"peak RSS {peak_rss_mb() / 1024:.2f} GB (inputs {(embed.nbytes + head.nbytes) / 2**30:.2f} GB; "
          f"growth {(peak_rss_mb() - before) / 1024:.2f} GB); {len(torch.unique(e, dim=0)):,} distinct code rows")


def bench_train(args):
    """Training steps of PLoRA on sequences shaped like the demo's (8 caption tokens, <boi>, 64 codes,
    <eoi>, <eos>). FLOPs counted: 4N per token of the image part (forward, and gradients flowing back
    through the frozen weights), 2N per caption token (forward only: it runs without gradient), N the
    active matmul parameters per token (flops_per_token above); LoRA's own work is left out."""
    keep_freed_memory()  # as train.py does: the steps' activations reuse freed memory, not fresh pages from the kernel
    cuda = torch.cuda.is_available()
    if cuda:
        model = MMMoE.from_pretrained(builtin_base(), dtype=torch.bfloat16, device="cuda")
    else:
        model = random_model(MMMoEConfig(vocab_size=4096, dim=256, n_layers=4, n_heads=8, n_kv_heads=4, head_dim=32,
                                         intermediate_size=896, n_experts=8, top_k=2, max_seq_len=4096))
    model.add_image_adapter(AdapterConfig(n_image_codes=1024, rank=16, alpha=32)).train()
    B, caption, codes = (32, 8, 64) if cuda else (8, 8, 64)
    V, dev = model.config.vocab_size, model.lm_head.weight.device
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, V, (B, 1 + caption), generator=g)
    image = model.image_token(torch.randint(0, 1024, (B, codes), generator=g))
    idx = torch.cat([text, torch.full((B, 1), model.image_token("boi")), image], 1).to(dev)
    targets = torch.full_like(idx, -1)
    targets[:, caption + 1:-1] = idx[:, caption + 2:]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = model(idx, targets)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    t = best_of(step, 5 if cuda else 3)
    T = idx.shape[1]
    n_image = T - (caption + 1)
    flops = B * (4 * n_image + 2 * (caption + 1)) * flops_per_token(model.config, T / 2) / 2
    line = f"PLoRA training, batch {B} x {T} tokens: {B * T / t:,.0f} tokens/s, {flops / t / 1e12:.2f} TFLOP/s"
    if cuda:
        peak = 989e12 if "H100" in torch.cuda.get_device_name() else float(args.peak_tflops) * 1e12
        line += f", MFU {100 * flops / t / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s bf16 dense ({torch.cuda.get_device_name()})"
    print(line)


def bench_base(args):
    """The built-in base (copy-upcycled SmolLM2-135M, 8 experts, top-2) as the demo uses it:
    `sample.py "a red bicycle"` run as a user runs it (first, while this process is small: a child's peak
    memory counts the parent it was forked from), then a PLoRA training step on 8 demo-shaped sequences
    with the shared-base experts, and the same step with the experts forced back to 8 separate copies; and which
    precision train.py's dtype=auto picks here."""
    print(f"machine: fp32 matmul peak {matmul_peak_gflops():.1f} GFLOP/s, reads {read_bandwidth_gbs():.1f} GB/s "
          f"({torch.get_num_threads()} threads)")
    if (Path(__file__).parent / "demo" / "state.json").exists():
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(Path(__file__).parent / "sample.py"), "a red bicycle", "--out", str(Path(tmp) / "s.png")]
            for run in ("cold", "warm"):
                t0 = time.perf_counter()
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                wall = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"sample.py \"a red bicycle\" (warm): {wall:.1f} s wall, peak RSS {peak:,.0f} MB; it says: {out.stderr.strip()}")
    native = bfloat16_support(torch.device("cpu")) != "emulated"  # emulated bf16 ran at 0.3 GFLOP/s on 2048^3: a minute a product
    print(f"machine: bf16 matmul peak {matmul_peak_gflops(2048 if native else 512, torch.bfloat16):.1f} GFLOP/s "
          f"({'native' if native else 'emulated: no AVX512-BF16 or AMX'})")

    keep_freed_memory()  # as train.py does: the steps' activations reuse freed memory, not fresh pages from the kernel

    def step_time(dtype, grouped=False, compiled=False):
        model = MMMoE.from_pretrained(builtin_base(), dtype=dtype)
        model.add_image_adapter(AdapterConfig(n_image_codes=1024, rank=args.rank, alpha=2.0 * args.rank)).train()
        B, V, g = 8, model.config.vocab_size, torch.Generator().manual_seed(0)
        idx = torch.cat([torch.randint(0, V, (B, 9), generator=g), torch.full((B, 1), model.image_token("boi")),
                         model.image_token(torch.randint(0, 1024, (B, 64), generator=g)),
                         torch.full((B, 1), model.image_token("eoi")), torch.full((B, 1), model.config.eos_token_id)], 1)
        targets = torch.full_like(idx, -1)
        targets[:, 9:74] = idx[:, 10:75]  # <boi> and the codes predict the codes and <eoi>
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)  # as train.py's
        if compiled:  # as train.py's compile=true
            model.compile_blocks()
        if grouped:  # the same experts as 8 separate copies: the general (grouped) path
            for layer in model.model.layers:
                ex = layer.block_sparse_moe.experts
                ex.w1, ex.w2, ex.w3 = (torch.nn.Parameter(w.expand(8, -1, -1).clone(), False) for w in (ex.w1, ex.w2, ex.w3))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):  # as train.py's dtype=bfloat16
                loss = model(idx, targets)[1]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return best_of(step), B * idx.shape[1]  # best_of's warm-up step is where a compiled step compiles (~15-60 s)
    (shared, n), (grouped, _) = step_time(torch.float32), step_time(torch.float32, True)
    compiled, _ = step_time(torch.float32, compiled=True)
    line = (f"PLoRA training step, rank {args.rank}, {n} tokens (8 demo-shaped sequences): float32 shared base {shared:.2f} s "
            f"({n / shared:.0f} tokens/s; compiled {compiled:.2f} s), grouped copies {grouped:.2f} s ({grouped / shared:.2f}x slower); ")
    if native:
        (bf16, _), (bf16_compiled, _) = step_time(torch.bfloat16), step_time(torch.bfloat16, compiled=True)
        line += (f"bfloat16 shared base {bf16:.2f} s ({n / bf16:.0f} tokens/s, {shared / bf16:.2f}x faster than float32; "
                 f"compiled {bf16_compiled:.2f} s)")
    else:  # measured once on such a machine: 93 s a step, 20x slower than float32
        line += "bfloat16 not timed (emulated here)"
    print(f"{line}; train.py's {choose_dtype('auto', torch.device('cpu'))[1]}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["model", "gw", "train", "base"])
    p.add_argument("--rank", type=int, default=8, help="base: LoRA rank")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--anchors", type=int, default=1024, help="gw: anchors per side")
    p.add_argument("--peak-tflops", type=float, default=989, help="train on CUDA: the GPU's bf16 dense peak")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    {"model": bench_model, "gw": bench_gw, "train": bench_train, "base": bench_base}[args.what](args)
