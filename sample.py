"""
sample.py: draw pictures from text with a multimodal MoE.

    python sample.py "a red bicycle"                              # the built-in demo model, -> sample.png
    python sample.py "blue heart" "green apple" -n 4 --out grid.png
    python sample.py "lemon" --ckpt out/demo --cfg 3 --temperature 1 --top-k 100 --seed 1

The prompt becomes  <bos> prompt <boi>; the model then writes the image codes one at a time with the
KV cache, and the VQ decoder turns them into pixels. Inside an image only image codes can be sampled
(the decoding rule of the paper's setup). Classifier-free guidance runs the prompt and the
unconditional prompt (the same length, caption replaced by <eos>, train.py's filler) as two rows
of one batch and mixes their logits: uncond + cfg * (cond - uncond).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from mmmoe import BadInput, MMMoE, linear, load_tokenizer, sample_next

DEMO = Path(__file__).parent / "demo"  # the committed demo: adapter.safetensors + state.json, and vq/


@torch.no_grad()
def generate_codes(model, prompt_ids, n_codes, cfg=3.0, temperature=1.0, top_k=None, top_p=None, generator=None):
    """prompt_ids (B, T) ending in <boi> -> image codes (B, n_codes). With cfg, each row gets an
    unconditional twin: the same prompt with everything between <bos> and <boi> replaced by <eos>, the
    filler of train.py's caption dropout."""
    B, T = prompt_ids.shape
    K = model.adapter.n_image_codes
    idx = prompt_ids
    if cfg:
        uncond = prompt_ids.clone()
        uncond[:, 1:-1] = model.config.eos_token_id
        idx = torch.cat([prompt_ids, uncond])  # (2B, T): cond rows, then their unconditional twins
    model.setup_caches(idx.shape[0], T + n_codes)
    pos = torch.arange(T, device=idx.device)
    head = model.image_head[:K]  # only the code rows can be sampled here: skip the text vocabulary entirely
    hidden = model.hidden_states(idx, pos)[:, -1]  # prefill
    codes = []
    for i in range(n_codes):
        logits = linear(hidden, head)  # (2B or B, K)
        if cfg:
            cond, uncond = logits[:B], logits[B:]
            logits = uncond + cfg * (cond - uncond)
        code = sample_next(logits, temperature, top_k, top_p, generator=generator)  # (B,)
        codes.append(code)
        if i + 1 < n_codes:
            nxt = model.image_token(code).repeat(2 if cfg else 1)[:, None]  # the same code goes to both twins
            hidden = model.hidden_states(nxt, pos[-1:] + 1 + i)[:, -1]  # decode one token
    model.clear_caches()
    return torch.stack(codes, dim=1)


def resolve_checkpoint(ckpt=None):
    """-> (checkpoint dir, its state.json, base model dir, VQ dir) for a train.py output directory, or the
    built-in demo. The VQ is the checkpoint's own vq/ folder if it has one, else the one it was trained with."""
    from upcycle import builtin_base
    ckpt = Path(ckpt) if ckpt else DEMO
    if not (ckpt / "state.json").exists():
        raise BadInput(f"no trained model in {ckpt} (expected state.json and adapter.safetensors from train.py)")
    state = json.loads((ckpt / "state.json").read_text())
    base = Path(state["train_config"]["base"]) if state["train_config"]["base"] else builtin_base()
    return ckpt, state, base, ckpt / "vq" if (ckpt / "vq").exists() else Path(state["vq"])


def load_pipeline(ckpt=None, device="cpu"):
    """-> (model with adapter, tokenizer, VQ) for a train.py checkpoint directory, or the built-in demo."""
    from train import load_adapter
    from vq import load_vq
    ckpt, state, base, vq_dir = resolve_checkpoint(ckpt)
    model = MMMoE.from_pretrained(base, dtype=torch.float32, device=device)
    load_adapter(model, ckpt)
    vq = load_vq(vq_dir, device)
    if vq.config.codebook_size != model.adapter.n_image_codes:
        raise BadInput(f"the VQ has {vq.config.codebook_size} codes but the adapter was trained for {model.adapter.n_image_codes}")
    return model.eval(), load_tokenizer(base), vq


def prompt_ids(model, tokenizer, prompt, n_codes):
    """<bos> prompt <boi> as a (1, T) tensor, after checking the prompt is usable."""
    if not prompt.strip():
        raise BadInput("empty prompt")
    from train import start_token
    ids = [start_token(model.config)] + tokenizer.encode(prompt.strip()).ids + [model.image_token("boi")]
    if len(ids) + n_codes > model.config.max_seq_len:
        raise BadInput(f"prompt too long: {len(ids)} tokens + {n_codes} image codes exceed the model's context of "
                       f"{model.config.max_seq_len}")
    return torch.tensor([ids])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+")
    p.add_argument("-n", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="sample.png")
    p.add_argument("--ckpt", default=None, help="a train.py output directory (default: the built-in demo model)")
    p.add_argument("--cfg", type=float, default=3.0, help="classifier-free guidance scale (0 = off)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tokenizer, vq = load_pipeline(args.ckpt)
    n_codes = vq.config.grid ** 2
    rows = []
    generator = torch.Generator().manual_seed(args.seed)
    t1 = time.time()
    for prompt in args.prompts:
        ids = prompt_ids(model, tokenizer, prompt, n_codes).repeat(args.n, 1)
        codes = generate_codes(model, ids, n_codes, args.cfg, args.temperature, args.top_k, args.top_p, generator)
        with torch.no_grad():
            rows.append(vq.decode_codes(codes.view(-1, vq.config.grid, vq.config.grid)))
    from vq import save_grid
    save_grid(torch.stack(rows), args.out)
    n = len(args.prompts) * args.n
    print(f"wrote {args.out}: {n} image(s) in {time.time() - t1:.1f}s (+{t1 - t0:.1f}s loading)", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:
        raise SystemExit(f"error: {e}")
