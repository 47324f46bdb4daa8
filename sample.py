"""
sample.py: draw pictures from text with a multimodal MoE.

    python sample.py "a red bicycle"                              # the built-in demo model, -> sample.png
    python sample.py "blue heart" "green apple" -n 4 --out grid.png
    python sample.py "a lemon" --ckpt out/demo --guidance 1.5 --temperature 0 # greedy: one picture per prompt
    python sample.py --from-file prompts.txt --out-dir out/pictures  # one PNG per line; a rerun skips what is written
    python sample.py "a lemon" "a taxi" "grapes" --dtype float32    # default auto: the faster here (bf16 on AMX)
    python sample.py --describe pear.png photo.jpg                  # the other way: picture -> words (#53)
    python sample.py --describe pear.png --ask "What colour is it?" # a question, in the base's chat format

The prompt becomes  <bos> prompt <boi>; the model then writes the image codes one at a time with the
KV cache, and the VQ decoder turns them into pixels. Inside an image only image codes can be sampled
(the decoding rule of the paper's setup). Classifier-free guidance runs the prompt and the
unconditional prompt (the same length, caption replaced by <eos>, train.py's filler) as two rows
of one batch and mixes their logits: uncond + guidance * (cond - uncond). All prompts (times -n) are drawn
together, --batch of them at a time, left-padded to one length; a batch is drawn from its own seed,
(--seed, its number), so a picture does not depend on which batches were drawn before it.

A model trained with scene tokens may draw a scene instead of a single picture: a 2 x 2 canvas of tiles, each an
emoji or empty (white). Its output shows every drawing, scene or single picture, at --size pixels: a scene's whole
canvas fills the cell (or file) that a single picture fills.

--describe reads pictures instead (a model trained with describe > 0): each PNG or JPEG resized to the VQ's size and
tokenized, then  <bos> <boi> picture <eoi>  continued greedily with text until <eos>, one line a picture,
"PICTURE: words". The picture's positions run with the adapter, the words the frozen base reading it (C1).
"""
import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from cli import BadInput, run
from data import load_image
from hf import load_tokenizer
from mmmoe import SAMPLING
from pictures import on_canvas, save_grid, to_pil
from pipeline import (DEMO, DRAWING_DTYPES, batch_generator, check_question, decode_drawings, describe_pictures,
                      drawing_dtype, load_pipeline)
from runs import run_inputs


def read_prompts(path):
    """A prompt file: one prompt per line (UTF-8; surrounding spaces dropped). An empty file or a blank line is a
    mistake."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read the prompt file {path}: {getattr(e, 'strerror', None) or e}") from None
    if not lines:
        raise BadInput(f"the prompt file {path} is empty")
    blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
    if blank:
        raise BadInput(f"{path}: line {blank[0]} is blank (one prompt per line, no empty lines)")
    return [line.strip() for line in lines]


def file_names(prompts, n):
    """Each prompt's file names in --out-dir: its words in lower case joined by '-' (at most 80 characters), a second
    prompt with the same name gets '-2', and so on; with -n above 1, one file per picture: name_0.png, name_1.png,
    ..."""
    seen, names = {}, []
    for prompt in prompts:
        stem = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:80].strip("-") or "prompt"
        seen[stem] = seen.get(stem, 0) + 1
        stem += f"-{seen[stem]}" if seen[stem] > 1 else ""
        names.append([f"{stem}.png"] if n == 1 else [f"{stem}_{k}.png" for k in range(n)])
    return names


def check_args(args):
    out = Path(args.out)
    for bad, message in [
            (args.describe and (args.prompts or args.from_file), "give prompts or --describe PICTURE ..., not both"),
            (args.ask is not None and not args.describe, "--ask goes with --describe PICTURE ..."),
            (args.ask is not None and not args.ask.strip(), "--ask: an empty question"),
            (not args.prompts and not args.from_file and not args.describe, "give prompts, or --from-file FILE"),
            (args.prompts and args.from_file, "give prompts or --from-file FILE, not both"),
            (bool(args.from_file) != bool(args.out_dir),
             "--from-file and --out-dir go together: a file of prompts, a folder of pictures"),
            (any(not p.strip() for p in args.prompts), "empty prompt"),
            (args.n < 1, f"-n must be at least 1 (got {args.n})"),
            (args.batch < 1, f"--batch must be at least 1 (got {args.batch})"),
            (not 0 <= args.guidance < math.inf, f"--guidance must be a number >= 0 (got {args.guidance})"),
            (not 0 <= args.temperature < math.inf, f"--temperature must be a number >= 0 (got {args.temperature})"),
            (args.top_k is not None and args.top_k < 1, f"--top-k must be at least 1 (got {args.top_k})"),
            (args.top_p is not None and not 0 < args.top_p <= 1, f"--top-p must be in (0, 1] (got {args.top_p})"),
            (not 8 <= args.size <= 4096, f"--size must be 8..4096 pixels (got {args.size})"),
            (args.threads is not None and args.threads < 1, f"--threads must be at least 1 (got {args.threads})"),
            (args.cols is not None and (args.cols < 1 or args.n != 1), "--cols needs -n 1 and at least one column"),
            (args.out_dir and Path(args.out_dir).exists() and not Path(args.out_dir).is_dir(),
             f"--out-dir {args.out_dir} is a file"),
            (not args.out_dir and out.is_dir(),
             f"--out {out} is a directory; give a file name such as {out / 'sample.png'}"),
            (not args.out_dir and not out.parent.is_dir(), f"--out {out}: no directory {out.parent}"),
            (out.suffix.lower() not in Image.registered_extensions(),
             f"--out {out}: not an image file name (.png, .jpg, ...)")]:
        if bad:
            raise BadInput(message)


def draw(model, vq, captions, args, generator):
    """Captions' token ids -> what each draws, (N, 3, h, w) in [-1, 1]: the VQ's pictures (N, 3, H, W), or with an
    adapter that has scene tokens, each on a canvas's size (N, 3, 2H, 2W): a scene's 2 x 2 canvas, a single picture
    enlarged 2x (nearest neighbour, so that at --size it looks as it would alone)."""
    tokens = model.generate_image(captions, vq.config.n_tokens, args.guidance, args.temperature, args.top_k,
                                  args.top_p, generator)
    drawings = decode_drawings(model, vq, tokens)
    if not model.adapter.scene_tokens:
        return torch.stack([picture for picture, in drawings])
    return torch.stack([on_canvas(drawing, vq.config.image_size) for drawing in drawings])


def write_index(out_dir, prompts, names):
    """--out-dir's index.jsonl, what each file shows (pictures of earlier runs are kept) -> every file's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    index = "".join(json.dumps({"file": f, "prompt": prompt}) + "\n" for prompt, files in zip(prompts, names)
                    for f in files)
    (out_dir / "index.jsonl.tmp").write_text(index)
    os.replace(out_dir / "index.jsonl.tmp", out_dir / "index.jsonl")
    return [out_dir / f for fs in names for f in fs]


def read_pictures(paths, size):
    """--describe's files -> (N, 3, size, size), each checked first: a folder, a missing or unreadable file is one
    line."""
    pictures = []
    for path in map(Path, paths):
        if path.is_dir():
            raise BadInput(f"--describe {path}: a folder, not a picture")
        if not path.exists():
            raise BadInput(f"--describe {path}: no such file")
        picture = load_image(path, size)
        if picture is None:
            raise BadInput(f"--describe {path}: not a picture this can read (PNG, JPEG, ...)")
        pictures.append(picture)
    return torch.stack(pictures)


def describe(args):
    """--describe: each picture read, tokenized by the run's VQ and described (MMMoE.describe), one line each."""
    read_pictures(args.describe, 8)  # each file checked before the model loads
    dtype, note = drawing_dtype(args.dtype)
    state, base, _ = run_inputs(args.ckpt or DEMO)
    if args.ask and base:  # a base of its own (the built-in SmolLM2 has the chat format): a question it can be asked?
        check_question(load_tokenizer(base))
    model, tokenizer, vq = load_pipeline(args.ckpt, dtype=dtype)
    if not state["train_config"].get("describe"):
        print(f"note: {args.ckpt or DEMO} was not trained to describe pictures (train.py's describe setting): its "
              "words are the base's guesses", file=sys.stderr)
    pictures = read_pictures(args.describe, vq.config.image_size)  # at the size the VQ was trained on
    if note:
        print(note, file=sys.stderr)
    for path, words in zip(args.describe, describe_pictures(model, tokenizer, vq, pictures, args.ask, args.batch)):
        print(f"{path}: {words}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*")
    p.add_argument("-n", type=int, default=1, help="images per prompt")
    p.add_argument("--out", default="sample.png")
    p.add_argument("--from-file", metavar="FILE", help="prompts, one per line, each drawn to its own PNG in --out-dir")
    p.add_argument("--out-dir", metavar="DIR",
                   help="with --from-file: where the pictures go (a rerun skips those written)")
    p.add_argument("--ckpt", default=None, help="a train.py output directory (default: the built-in demo model)")
    p.add_argument("--guidance", "--cfg", type=float, default=SAMPLING["guidance"],
                   help="classifier-free guidance scale (0 = off)")
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"],
                   help="0 = greedy (then -n gives identical pictures)")
    p.add_argument("--top-k", type=int, default=SAMPLING["top_k"])
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=16, help="pictures drawn together (memory grows with it)")
    p.add_argument("--size", type=int, default=256, help="pixels per picture in the output (enlarged to be seen)")
    p.add_argument("--cols", type=int, default=None, help="with -n 1: lay the prompts out this many per row")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--describe", nargs="+", metavar="PICTURE", help="read pictures instead: one line of words each")
    p.add_argument("--ask", metavar="QUESTION", help="with --describe: a question about each picture")
    p.add_argument("--dtype", choices=DRAWING_DTYPES, default="auto",
                   help="auto: the faster here (bfloat16 on a CPU with AMX; not code for code float32's pictures)")
    args = p.parse_args(argv)
    check_args(args)  # before anything slow: a mistake costs a second, not a whole drawing
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.describe:
        return describe(args)
    dtype, note = drawing_dtype(args.dtype)  # said once every check has passed, before the drawing
    prompts = read_prompts(args.from_file) if args.from_file else [prompt.strip() for prompt in args.prompts]
    t0 = time.time()
    model, tokenizer, vq = load_pipeline(args.ckpt, dtype=dtype)
    n_tokens = 1 + 4 * vq.config.n_tokens if model.adapter.scene_tokens else vq.config.n_tokens  # at most, a drawing
    ids = [tokenizer.encode(prompt).ids for prompt in prompts]
    room = model.config.max_seq_len - n_tokens - 2  # <bos> and <boi> besides the caption
    too_long = [k for k, i in enumerate(ids) if len(i) > room]
    if too_long:
        where = f"line {too_long[0] + 1} of {args.from_file}" if args.from_file else f"prompt {too_long[0] + 1}"
        raise BadInput(f"prompt too long ({where}): {len(ids[too_long[0]])} tokens + {n_tokens} image tokens exceed "
                       f"the model's context of {model.config.max_seq_len}")
    jobs = [caption for caption in ids for _ in range(args.n)]  # one per picture, prompt by prompt
    names = file_names(prompts, args.n) if args.out_dir else None
    files = write_index(Path(args.out_dir), prompts, names) if args.out_dir else None  # in the order of jobs
    if note:
        print(note, file=sys.stderr)
    t1 = time.time()
    starts = range(0, len(jobs), args.batch)  # batch k is jobs[starts[k]:starts[k] + args.batch]
    written = [bool(args.out_dir) and all(f.exists() for f in files[s:s + args.batch]) for s in starts]
    skipped = sum(len(jobs[s:s + args.batch]) for s, w in zip(starts, written) if w)
    pictures = []
    with tqdm(total=len(jobs), initial=skipped, desc="drawing", unit="picture", disable=len(starts) == 1) as bar:
        for k, s in enumerate(starts):
            if written[k]:
                continue
            drawn = draw(model, vq, jobs[s:s + args.batch], args, batch_generator(args.seed, k))  # (batch, 3, h, w)
            for picture, path in zip(drawn, files[s:s + args.batch] if args.out_dir else []):
                to_pil(picture).resize((args.size, args.size), Image.NEAREST).save(tmp := path.with_suffix(".tmp.png"))
                os.replace(tmp, path)  # each file whole or absent
            pictures += [] if args.out_dir else [drawn]
            bar.update(len(drawn))
    n = len(jobs)
    if args.out_dir:
        print(f"{args.out_dir}: {n} picture(s) of {len(prompts)} prompt(s) ({skipped} there already); drawn in "
              f"{time.time() - t1:.1f}s (+{t1 - t0:.1f}s loading)", file=sys.stderr)
        return
    pictures, labels = torch.cat(pictures).view(len(prompts), args.n, *pictures[0].shape[1:]), prompts
    if args.cols:  # a grid of single pictures, each under its own prompt (empty cells stay white)
        cells = -(-len(prompts) // args.cols) * args.cols
        pictures = torch.cat([pictures[:, 0], torch.ones(cells - len(prompts), *pictures.shape[2:])])
        pictures = pictures.view(-1, args.cols, *pictures.shape[1:])
        labels = [(prompts + [""] * cells)[i:i + args.cols] for i in range(0, cells, args.cols)]
    save_grid(pictures, args.out, args.size, labels=labels)
    print(f"wrote {args.out}: {n} image(s) in {time.time() - t1:.1f}s (+{t1 - t0:.1f}s loading)", file=sys.stderr)


if __name__ == "__main__":
    run(main)
    # The picture is written and reported. Leave without the interpreter's teardown of torch's modules:
    # measured at 0.5-0.65 s after the last line, even for `import torch` alone: 7% of a whole drawing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
