"""
sample.py: draw pictures from text with a multimodal MoE.

    python sample.py "a red bicycle"                              # the built-in demo model, -> sample.png
    python sample.py "blue heart" "green apple" -n 4 --out grid.png
    python sample.py "a lemon" --ckpt out/demo --cfg 1.5 --temperature 0 # greedy: one picture per prompt

The prompt becomes  <bos> prompt <boi>; the model then writes the image codes one at a time with the
KV cache, and the VQ decoder turns them into pixels. Inside an image only image codes can be sampled
(the decoding rule of the paper's setup). Classifier-free guidance runs the prompt and the
unconditional prompt (the same length, caption replaced by <eos>, train.py's filler) as two rows
of one batch and mixes their logits: uncond + cfg * (cond - uncond).
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from cli import BadInput, run
from hf import load_tokenizer
from runs import run_inputs
from mmmoe import SAMPLING, MMMoE

DEMO = Path(__file__).parent / "demo"  # the committed demo: adapter.safetensors + state.json, and vq/


def load_pipeline(ckpt=None, device="cpu"):
    """-> (model with adapter, tokenizer, VQ) for a train.py checkpoint directory, or the built-in demo."""
    from upcycle import builtin_base
    from vq import load_vq
    ckpt = ckpt or DEMO
    _, base, vq_dir = run_inputs(ckpt)
    base = base or builtin_base()
    model = MMMoE.from_pretrained(base, dtype=torch.float32, device=device)
    model.load_adapter(ckpt)
    vq = load_vq(vq_dir, device)
    if (vq.config.vocab_size, vq.config.colour_tokens) != (model.adapter.n_image_codes, model.adapter.colour_tokens):
        raise BadInput(f"the VQ has {vq.config.vocab_size} image tokens ({vq.config.colour_tokens} of them colours) but the "
                       f"adapter was trained for {model.adapter.n_image_codes} ({model.adapter.colour_tokens})")
    return model.eval(), load_tokenizer(base), vq


def check_args(args):
    from PIL import Image
    out = Path(args.out)
    for bad, message in [
            (any(not p.strip() for p in args.prompts), "empty prompt"),
            (args.n < 1, f"-n must be at least 1 (got {args.n})"),
            (not 0 <= args.cfg < math.inf, f"--cfg must be a number >= 0 (got {args.cfg})"),
            (not 0 <= args.temperature < math.inf, f"--temperature must be a number >= 0 (got {args.temperature})"),
            (args.top_k is not None and args.top_k < 1, f"--top-k must be at least 1 (got {args.top_k})"),
            (args.top_p is not None and not 0 < args.top_p <= 1, f"--top-p must be in (0, 1] (got {args.top_p})"),
            (not 8 <= args.size <= 4096, f"--size must be 8..4096 pixels (got {args.size})"),
            (args.threads is not None and args.threads < 1, f"--threads must be at least 1 (got {args.threads})"),
            (args.cols is not None and (args.cols < 1 or args.n != 1), "--cols needs -n 1 and at least one column"),
            (out.is_dir(), f"--out {out} is a directory; give a file name such as {out / 'sample.png'}"),
            (not out.parent.is_dir(), f"--out {out}: no directory {out.parent}"),
            (out.suffix.lower() not in Image.registered_extensions(), f"--out {out}: not an image file name (.png, .jpg, ...)")]:
        if bad:
            raise BadInput(message)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="+")
    p.add_argument("-n", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="sample.png")
    p.add_argument("--ckpt", default=None, help="a train.py output directory (default: the built-in demo model)")
    p.add_argument("--cfg", type=float, default=SAMPLING["cfg"], help="classifier-free guidance scale (0 = off)")
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"], help="0 = greedy (then -n gives identical pictures)")
    p.add_argument("--top-k", type=int, default=SAMPLING["top_k"])
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="pixels per picture in the output (enlarged to be seen)")
    p.add_argument("--cols", type=int, default=None, help="with -n 1: lay the prompts out this many per row")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    check_args(args)  # before anything slow: a mistake costs a second, not a whole drawing
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    model, tokenizer, vq = load_pipeline(args.ckpt)
    n_tokens = vq.config.n_tokens
    rows = []
    generator = torch.Generator().manual_seed(args.seed)
    t1 = time.time()
    for prompt in args.prompts:
        ids = model.image_prompt(tokenizer.encode(prompt.strip()).ids, n_tokens).repeat(args.n, 1)
        rows.append(vq.detokenize(model.generate_image(ids, n_tokens, args.cfg, args.temperature, args.top_k, args.top_p, generator)))
    from vq import save_grid
    pictures, labels = torch.stack(rows), args.prompts
    if args.cols:  # a grid of single pictures, each under its own prompt (empty cells stay white)
        cells = -(-len(args.prompts) // args.cols) * args.cols
        pictures = torch.cat([pictures[:, 0], torch.ones(cells - len(rows), *pictures.shape[2:])])
        pictures = pictures.view(-1, args.cols, *pictures.shape[1:])
        labels = [(args.prompts + [""] * cells)[i:i + args.cols] for i in range(0, cells, args.cols)]
    save_grid(pictures, args.out, args.size, labels=labels)
    n = len(args.prompts) * args.n
    print(f"wrote {args.out}: {n} image(s) in {time.time() - t1:.1f}s (+{t1 - t0:.1f}s loading)", file=sys.stderr)


if __name__ == "__main__":
    run(main)
    # The picture is written and reported. Leave without the interpreter's teardown of torch's modules:
    # measured at 0.5-0.65 s after the last line, even for `import torch` alone: 7% of a whole drawing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
