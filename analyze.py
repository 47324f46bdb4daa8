"""
analyze.py: measure the paper's claims on a trained model, and write them up.

    python analyze.py --ckpt out/demo --out out/report          # report.md + PNGs
    python analyze.py --out out/report                          # the built-in demo model
    python analyze.py --ckpt out/demo --out out/report --samples 64   # also draw and score held-out prompts
    python analyze.py --ckpt out/scenes --out out/report --geneval 80 # a scene run: GenEval's six categories

What it measures, each before training (the same adapter, initialised, untrained) and after:
- routing by modality: for every layer and expert, the share of text and of image tokens routed there
  (heatmap), each expert's image-specificity (p_img - p_text) / (p_img + p_text) in [-1, 1] (1: only
  image tokens reach it, -1: only text), and the entropy of each modality's expert usage;
- redundancy: linear CKA between experts' outputs on the same inputs, per layer. Copy-upcycled
  experts start at exactly 1.0 (identical); PLoRA lets them diverge on image tokens;
- C1: perplexity of held-out English and a few greedy chat answers, base vs multimodal (identical);
- C2: trainable parameters against the base, by component;
- images (--samples N): pictures drawn for N captions of training emoji (phrased as people ask: "a red
  bicycle") and N of held-out emoji, each scored against its emoji: retrieval of the intended emoji among
  all emoji by VQ-feature similarity (top-1/top-5), whether the dominant hue matches, and for the held-out
  ones a Frechet distance on the project's own VQ-encoder features (not Inception FID);
- scenes (--geneval N, a run trained with scenes): GenEval's six categories on held-out prompts, four pictures each,
  each judged tile by tile (the object by shape, the colour word), beside the published figures;
- pictures described (--describe N, a run trained with describe): the object and the colour named, on training
  pictures, held-out pairs and a round trip, beside the colour their image tokens keep; a PNG of each, every picture
  under what it is and what the model said.
"""
import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open
from tqdm import tqdm

from cli import BadInput, run
from data import (COLOUR_WORDS, GROUPS, TokenShards, asked_caption, caption_rows, colour_word, english_text,
                  load_images, make_batch, object_index, read_folder)
from data.scenes import GENEVAL, geneval_prompts, judge, tile_table
from gw_init import init_model
from hf import load_tokenizer
from mmmoe import SAMPLING, AdapterConfig, MMMoE, expert, linear
from pictures import on_canvas, save_grid
from pipeline import DEMO, DRAWING_DTYPES, decode_drawings, decode_tiles, describe_pictures, drawing_dtype
from routing import routing, routing_stats
from runs import run_inputs
from upcycle import builtin_base, chat_prompt
from vq import load_vq, score_summary

# -----------------------------------------------------------------------------
# Plots with Pillow; the learning curve (--curve) and comparisons of runs (--compare, --variants)


def heatmap(values, path, title, lo=-1.0, hi=1.0, cell=18):
    """(rows, cols) values -> a PNG, blue (lo) - white - red (hi), rows = layers, cols = experts."""
    rows, cols = values.shape
    im = Image.new("RGB", (max(cols * cell + 60, 6 * len(title) + 8), rows * cell + 56), "white")
    d = ImageDraw.Draw(im)
    d.text((4, 4), title, fill="black")
    for c in range(cols):
        d.text((52 + c * cell, 28), f"{c}", fill="black")
    for r in range(rows):
        d.text((4, 46 + r * cell), f"L{r}", fill="black")
        for c in range(cols):
            v = float(values[r, c])
            t = 0.0 if math.isnan(v) else max(-1.0, min(1.0, (2 * (v - lo) / (hi - lo)) - 1))
            colour = ((255, int(255 * (1 - t)), int(255 * (1 - t))) if t > 0
                      else (int(255 * (1 + t)), int(255 * (1 + t)), 255))
            x0, y0 = 50 + c * cell, 44 + r * cell
            d.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=colour)
    im.save(path)

def line_chart(d, box, series, title, ylim, xmax, marks=()):
    """Draw series {label: ([x], [y], colour)} into box (x0, y0, x1, y1) of an ImageDraw, with axes and a legend;
    marks: x positions to draw as grey vertical lines (e.g. where a run changed)."""
    x0, y0, x1, y1 = box
    (lo, hi), xmax = ylim, max(xmax, 1e-9)
    px = lambda x: x0 + (x1 - x0) * x / xmax  # noqa: E731
    py = lambda y: y1 - (y1 - y0) * (min(max(y, lo), hi) - lo) / (hi - lo)  # noqa: E731
    d.rectangle(box, outline="black")
    for x in marks:
        d.line([(px(x), y0), (px(x), y1)], fill=(170, 170, 170), width=1)
    d.text((x0, y0 - 14), title, fill="black")
    for i in range(5):
        y = lo + (hi - lo) * i / 4
        d.line([(x0 - 4, py(y)), (x0, py(y))], fill="black")
        d.text((x0 - 34, py(y) - 6), f"{y:g}"[:5], fill="black")
        x = xmax * i / 4
        d.text((px(x) - 8, y1 + 4), f"{x:.1f}", fill="black")
    for k, (label, (xv, yv, colour)) in enumerate(series.items()):
        if len(xv) > 1:
            d.line([(px(x), py(y)) for x, y in zip(xv, yv)], fill=colour, width=2)
        for x, y in zip(xv, yv) if len(xv) < 50 else ():
            d.ellipse([px(x) - 2, py(y) - 2, px(x) + 2, py(y) + 2], fill=colour)
        d.text((x1 + 12, y0 + 6 + 14 * k), label, fill=colour)  # the legend, right of the box


def plot_curve(log, path, examples_per_epoch, batch):
    """train.py's log -> a PNG: losses against epochs (top), and the learning curve's scores (bottom)."""
    epoch = lambda r: r["step"] * batch / examples_per_epoch  # noqa: E731
    loss = [r for r in log if "loss" in r]
    val = [r for r in log if "val_image_loss" in r]
    curve = [r for r in log if "train_top1" in r]
    marks = [epoch(r) for r in log if "warm_start" in r]  # where a run was continued from another checkpoint
    xmax = max([epoch(r) for r in loss + val + curve] or [1])
    im = Image.new("RGB", (920, 620), "white")
    d = ImageDraw.Draw(im)
    d.text((12, 4), f"x: epochs over the training examples ({examples_per_epoch:,} = emoji x phrasings)",
           fill="black")
    line_chart(d, (60, 40, 700, 290), {
        "training loss (image codes)": ([epoch(r) for r in loss], [r["loss"] for r in loss], (90, 90, 90)),
        "held-out loss": ([epoch(r) for r in val], [r["val_image_loss"] for r in val], (200, 40, 40))},
        "cross-entropy of the image codes (nats; grey lines: warm starts)", (0, 12), xmax, marks)
    series = {"training captions: top-1": ("train_top1", (30, 90, 200)),
              "training captions: top-5": ("train_top5", (120, 170, 240)),
              "bare names: own colour": ("bare_colour", (20, 160, 170)),
              "held-out emoji: hue right": ("val_hue", (230, 130, 0)),
              "held-out pairs: colour right": ("pairs_colour", (40, 160, 60)),
              "held-out pairs: colour + object": ("pairs_both", (150, 40, 160))}
    line_chart(d, (60, 340, 700, 590),
               {label: ([epoch(r) for r in curve if k in r], [r[k] for r in curve if k in r], colour)
                for label, (k, colour) in series.items() if any(k in r for r in curve)},
               "drawn pictures: retrieval of the intended emoji, hue, asked colour", (0, 1), xmax, marks)
    im.save(path)

def curve_table(log):
    """train.py's log -> markdown lines: the learning curve's points (train_top1, pairs_colour, ...) by step."""
    keys = ["train_top1", "train_top5", "train_original_top1", "bare_colour", "val_hue", "pairs_colour",
            "pairs_object_top5", "pairs_both"]
    points = [r for r in log if "train_top1" in r]
    keys = [k for k in keys if any(k in r for r in points)]
    val = {r["step"]: r["val_image_loss"] for r in log if "val_image_loss" in r}
    return ["| step | held-out loss | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 2) + "|"] + [
        f"| {r['step']} | {val.get(r['step'], math.nan):.2f} | "
        + " | ".join(f"{100 * r[k]:.0f}%" if k in r else "" for k in keys) + " |" for r in points]


def compare_inits(runs, out, target):
    """train.py runs that differ only in their init (gw / random / mean) and seed -> a table, one row per init
    (mean and spread over the seeds), and a PNG of the losses, in out/. Early training is where an init matters."""
    by_init = {}
    for run_dir in runs:
        state, _, _ = run_inputs(run_dir)
        tc = state["train_config"]
        scale = tc.get("init_scale", 1.0)
        by_init.setdefault(tc["init"] + (f" x{scale:g}" if scale != 1 else ""), []).append(state["log"])
    colours = {"gw": (200, 40, 40), "random": (30, 90, 200), "mean": (40, 150, 60)}
    table, series_loss, series_val, xmax = [], {}, {}, 1
    for init, logs in sorted(by_init.items()):
        stats = []
        for log in logs:
            loss = [(r["step"], r["loss"]) for r in log if "loss" in r]
            val = [(r["step"], r["val_image_loss"]) for r in log if "val_image_loss" in r]
            if not loss or loss[0][0] != 1 or not val:
                raise BadInput("a run to compare needs its loss at every step and held-out losses: "
                               "train it with --log_every=1")
            best = np.minimum.accumulate([x for _, x in loss])
            spike = max(x - b for (_, x), b in zip(loss[1:], best[:-1]))  # the largest rise above the best loss so far
            reach = next((s for s, v in val if v <= target), math.nan)
            stats.append((loss[0][1], spike, val[-1][1], reach, np.mean([x for _, x in loss[-20:]])))
            xmax = max(xmax, loss[-1][0])
            smooth = np.convolve([x for _, x in loss], np.ones(10) / 10, mode="valid")  # a 10-step running mean
            light = tuple(c + (255 - c) // 2 for c in colours.get(init, (230, 120, 0)))
            series_loss[f"{init} seed {len(stats) - 1}"] = ([s for s, _ in loss][9:], smooth.tolist(), light)
            series_val[f"{init} seed {len(stats) - 1}"] = ([s for s, _ in val], [v for _, v in val], light)
        m, sd = np.nanmean(stats, 0), np.nanstd(stats, 0)
        reached = sum(not math.isnan(s[3]) for s in stats)
        table.append(f"| {init} | {len(stats)} | {m[0]:.2f} ± {sd[0]:.2f} | {m[1]:.2f} ± {sd[1]:.2f} | "
                     f"{m[4]:.3f} ± {sd[4]:.3f} | {m[2]:.3f} ± {sd[2]:.3f} | "
                     + (f"{m[3]:.0f} ± {sd[3]:.0f}" if reached else "not reached") + f" ({reached} of {len(stats)}) |")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (920, 620), "white")
    d = ImageDraw.Draw(im)
    d.text((12, 4), "x: training steps; each run its own line, coloured by init (red gw, blue random, green mean, "
                    "orange gw rescaled)", fill="black")
    line_chart(d, (60, 40, 700, 290), series_loss, "training loss, 10-step running mean (nats)", (0, 10), xmax)
    line_chart(d, (60, 340, 700, 590), series_val, "held-out loss of the image codes (nats)", (0, 10), xmax)
    im.save(out / "init_compare.png")
    lines = ["| init | runs | first-batch loss | worst spike (rise above the best so far) | "
             f"training loss, last 20 steps | held-out loss at the end | steps to a held-out loss <= {target} |",
             "| --- | --- | --- | --- | --- | --- | --- |", *table]
    (out / "init_compare.md").write_text("\n".join(lines) + "\n")
    return lines

def compare_variants(runs, out):
    """Runs of config/redundancy.sh (RUNS/VARIANT-sSEED: the same data and steps, one layout each) -> redundancy.md, a
    table with one row per variant, and redundancy.png, each run's held-out loss and training top-1 against the step.
    A row: the trainable parameters (counted in each run's adapter file: what train.py trained), the median seconds a
    step, and at the last point of the learning curve its figures, each as the mean over the seeds ± their standard
    deviation (with two seeds: half their difference), then each seed's; for an MoE also its routing report
    (RUN/report/report.json): experts with image-specificity > 0.5 and the mean expert CKA, after training."""
    by_variant = {}
    for run_dir in map(Path, runs):
        state, _, _ = run_inputs(run_dir)
        points = [r for r in state["log"] if "train_top1" in r]
        if not points:
            raise BadInput(f"{run_dir} has no learning-curve point: train it with --curve_every "
                           "(config/redundancy.json does)")
        with safe_open(run_dir / "adapter.safetensors", "pt") as f:
            sizes = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
        counts = {part: sum(v for k, v in sizes.items() if name in k) for part, name in MMMoE.BUDGET.items()}
        val = {r["step"]: r["val_image_loss"] for r in state["log"] if "val_image_loss" in r}
        step_s = [r["step_s"] for r in state["log"] if "step_s" in r]
        figures = points[-1] | {"val_loss": val.get(points[-1]["step"], math.nan),
                                "step_s": np.median(step_s or [math.nan])}
        if (run_dir / "report" / "report.json").exists():
            report = json.loads((run_dir / "report" / "report.json").read_text())
            figures |= {"image_experts": float((np.array(report["after"]["specificity"]) > 0.5).sum()),
                        "cka": float(np.mean(report["after"]["cka"]))}
        name = re.sub(r"-s\d+$", "", run_dir.name)
        by_variant.setdefault(name, []).append((state["train_config"]["seed"], counts, figures, state["log"]))
    columns = [("step_s", "s a step", "{:.2f}"), ("val_loss", "held-out loss", "{:.3f}"),
               ("train_top1", "training top-1", "{:.0%}"), ("train_top5", "training top-5", "{:.0%}"),
               ("bare_colour", "bare names: own colour", "{:.0%}"), ("pairs_colour", "pairs: colour", "{:.0%}"),
               ("pairs_both", "pairs: both", "{:.0%}"), ("image_experts", "image-leaning experts", "{:g}"),
               ("cka", "expert CKA", "{:.3f}")]
    lines = ["| variant | seeds | step | trainable parameters | " + " | ".join(c[1] for c in columns) + " |",
             "| --- " * (len(columns) + 4) + "|"]
    palette = [(200, 40, 40), (30, 90, 200), (40, 150, 60), (230, 130, 0), (150, 40, 160)]
    series_loss, series_top1, xmax = {}, {}, 1
    for v, (name, seeds) in enumerate(sorted(by_variant.items())):
        seeds.sort(key=lambda s: s[0])
        budgets = {sum(c.values()) for _, c, _, _ in seeds}
        cells = []
        for key, _, fmt in columns:
            x = [f.get(key, math.nan) for _, _, f, _ in seeds]
            have = [y for y in x if not math.isnan(y)]  # e.g. a routing report written for one seed only
            cells.append(f"{fmt.format(np.mean(have))} ± {fmt.format(np.std(have))} (" + ", ".join(
                "-" if math.isnan(y) else fmt.format(y) for y in x) + ")" if have else "-")
        lines.append(f"| {name} | {', '.join(str(s) for s, _, _, _ in seeds)} | "
                     f"{', '.join(str(f['step']) for _, _, f, _ in seeds)} | "
                     + " / ".join(f"{b:,}" for b in sorted(budgets)) + " | " + " | ".join(cells) + " |")
        for k, (seed, _, _, log) in enumerate(seeds):
            colour = tuple(c + (255 - c) * k // 2 for c in palette[v % len(palette)])  # a later seed lighter
            val = [r for r in log if "val_image_loss" in r]
            curve = [r for r in log if "train_top1" in r]
            series_loss[f"{name} seed {seed}"] = ([r["step"] for r in val], [r["val_image_loss"] for r in val], colour)
            series_top1[f"{name} seed {seed}"] = ([r["step"] for r in curve], [r["train_top1"] for r in curve], colour)
            xmax = max([xmax] + [r["step"] for r in log if "step" in r])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", (920, 620), "white")
    d = ImageDraw.Draw(im)
    d.text((12, 4), "x: training steps; a colour per variant, its second seed lighter", fill="black")
    line_chart(d, (60, 40, 700, 290), series_loss, "held-out loss of the image codes (nats)", (0, 3), xmax)
    line_chart(d, (60, 340, 700, 590), series_top1, "training captions drawn: top-1 retrieval of the asked picture",
               (0, 1), xmax)
    im.save(out / "redundancy.png")
    (out / "redundancy.md").write_text("\n".join(lines) + "\n")
    return lines

# -----------------------------------------------------------------------------
# The report. analyze() is its table of contents: a section's function gives its part of report.json and its lines
# of report.md, from the measurements beside it. The model changes under them (the base, "before", "after", the
# drawing dtype), so analyze() measures in that order; the files are written at the end.

QUESTIONS = ("What is the capital of France?", "Name three colours.", "What is 2 + 3?")  # C1's chat prompts


def analyze(ckpt, out, n_probe=32, samples=0, seed=0, guidance=SAMPLING["guidance"],
            temperature=SAMPLING["temperature"], top_k=SAMPLING["top_k"], batch_size=16, offset=0, dtype=torch.float32,
            geneval=0, describe=0):
    """A train.py run (default: the built-in demo) -> the report's figures (report.json), written to out with
    report.md and its PNGs: routing and redundancy, C1, caption use, C2 and, with samples > 0, pictures; with
    geneval > 0 (a run that draws scenes), GenEval's six categories; with describe > 0 (a run that reads pictures),
    the pictures described."""
    out, ckpt = Path(out), ckpt or DEMO
    out.mkdir(parents=True, exist_ok=True)
    state, base_dir, vq_dir = run_inputs(ckpt)
    if geneval and not state["adapter"].get("scene_tokens"):
        raise BadInput(f"--geneval: {ckpt} draws no scenes (train it with scenes > 0, as config/scenes.json does)")
    if describe and not state["train_config"].get("describe"):
        raise BadInput(f"--describe: {ckpt} was not trained to describe pictures (train it with describe > 0)")
    base_dir, tc = base_dir or builtin_base(), state["train_config"]
    # One copy of the base serves all three models in turn: the plain base (C1's reference), "before" (the
    # same adapter initialised as train.py initialises it, untrained) and "after" (the trained adapter).
    model, tokenizer = MMMoE.from_pretrained(base_dir, dtype=torch.float32).eval(), load_tokenizer(base_dir)
    english, val = english_text(tokenizer, 4096), TokenShards(tc["shards"], "val")
    text_base = text_ability(model, tokenizer, english)
    torch.manual_seed(tc["seed"])
    model.add_image_adapter(AdapterConfig(**state["adapter"]))
    init_model(model, vq_dir, tc["init"], tc["seed"], tc.get("init_scale", 1.0))
    probe = probe_batches(model, val, n_probe, english)
    before = routing_figures(model, probe)
    model.load_adapter(ckpt)  # "after" from here on
    after = routing_figures(model, probe)
    sections = [routing_section(before, after),
                c1_section(text_base, text_ability(model, tokenizer, english)),
                caption_use_section(model, TokenShards(tc["shards"], "train"), n_probe, seed),
                budget_section(model)]
    drawn, scenes, described = {}, {}, {}
    model.to(dtype)  # the pictures in sample.py's --dtype; everything above in float32
    data_dir = val.index["data"]  # every picture of the dataset trained on: what drawn ones are scored against
    sampling = {"guidance": guidance, "temperature": temperature, "top_k": top_k}
    settings, vq = sampling | {"dtype": str(dtype).removeprefix("torch.")}, load_vq(vq_dir)
    seen = dataset_pictures(vq, data_dir) if samples or geneval or describe else None
    if samples:
        figures, drawn = picture_figures(model, tokenizer, vq, seen, samples, offset, sampling, batch_size, seed)
        sections.append(pictures_section({"n": samples} | settings | figures, len(seen["rows"]), data_dir))
    if geneval:
        figures, scenes = geneval_figures(model, tokenizer, vq, seen, TokenShards(tc["shards"], "train"), geneval,
                                          sampling, batch_size, seed)
        sections.append(geneval_section({"n": geneval} | settings | figures))
    if describe:
        figures, described = describe_figures(model, tokenizer, vq, seen, describe, sampling, batch_size, seed)
        sections.append(describe_section({"n": describe} | settings | figures))
    report, lines = {}, [f"# mmmoe report: {ckpt}", ""]
    for part, section_lines in sections:
        report |= part
        lines += section_lines
    save_pictures(out, report, drawn, scenes, described, vq.config.image_size)
    (out / "report.md").write_text("\n".join(lines) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


# -----------------------------------------------------------------------------
# Routing by modality and redundancy


def probe_batches(model, val, n, english):
    """Held-out caption+image sequences, and English text, as batches of token ids and their left padding."""
    idx, _, pad = make_batch(val, np.arange(min(n, len(val))), np.zeros(min(n, len(val)), bool), model)
    return [(idx[i:i + 8], pad[i:i + 8]) for i in range(0, len(idx), 8)] + [(english.view(-1, 256)[:4], None)]


def routing_figures(model, batches):
    """The model as it is now, over the probe batches -> per layer and expert its image-specificity, per layer each
    modality's routing entropy and the experts' redundancy (report["before"] or report["after"])."""
    counts, probe, _ = routing(model, batches)
    _, spec, entropy = routing_stats(counts)
    return {"specificity": spec.tolist(), "entropy_text": entropy[0].tolist(), "entropy_image": entropy[1].tolist(),
            "cka": redundancy(model, probe)}


def routing_section(before, after):
    """routing_figures before and after training -> their part of the report and its lines."""
    row = lambda name, f: f"| {name} | {f(before)} | {f(after)} |"  # noqa: E731
    leaning = lambda side: lambda r: int((side * torch.tensor(r["specificity"]) > 0.5).sum())  # noqa: E731
    image_specific = (torch.tensor(after["specificity"]) > 0.5).nonzero().tolist()  # (layer, expert) pairs
    lines = ["## Routing by modality", "", "| | before | after |", "| --- | --- | --- |",
             row("mean routing entropy, text (0..1)", lambda r: f"{np.mean(r['entropy_text']):.3f}"),
             row("mean routing entropy, image (0..1)", lambda r: f"{np.mean(r['entropy_image']):.3f}"),
             row("experts with image-specificity > 0.5", leaning(1)),
             row("experts with image-specificity < -0.5", leaning(-1)),
             "", "Image-specific experts after training (layer, expert): "
             + (", ".join(map(str, image_specific[:24])) or "none"),
             "", "![before](specificity_before.png) ![after](specificity_after.png)", "",
             "## Redundancy (mean pairwise linear CKA of expert outputs on image tokens)", "",
             "| layer | before | after |", "| --- | --- | --- |"]
    lines += [f"| {i} | {b:.4f} | {a:.4f} |" for i, (b, a) in enumerate(zip(before["cka"], after["cka"]))]
    return {"before": before, "after": after}, lines


def linear_cka(a, b):
    """Linear CKA between two sets of features of the same N examples (N, D): 1 means the same up to
    rotation and scale."""
    a, b = a - a.mean(0), b - b.mean(0)
    return ((a.T @ b).norm() ** 2 / ((a.T @ a).norm() * (b.T @ b).norm()).clamp_min(1e-12)).item()


@torch.no_grad()
def redundancy(model, probe):
    """Mean pairwise linear CKA of the experts' outputs (with their PLoRA updates) on each layer's probe."""
    out = []
    for layer, x in zip(model.model.layers, probe):
        if x is None or len(x) < 2:
            out.append(float("nan"))
            continue
        experts = layer.block_sparse_moe.experts
        rows = torch.ones(len(x), 1, dtype=torch.bool)
        ys = [expert(x.float(), experts, e, rows) for e in range(layer.block_sparse_moe.n_experts)]
        pairs = [linear_cka(ys[i], ys[j]) for i in range(len(ys)) for j in range(i + 1, len(ys))]
        out.append(sum(pairs) / len(pairs))
    return out

# -----------------------------------------------------------------------------
# C1: text untouched


def text_ability(model, tokenizer, english):
    """The model as it is now -> the perplexity of 8 x 256 tokens of held-out English, and its greedy answers (text
    tokens only) to QUESTIONS."""
    seq = english.view(-1, 256)[:8]
    with torch.no_grad():
        ppl = math.exp(model(seq[:, :-1], seq[:, 1:])[1].item())
    text_only = torch.arange(model.config.vocab_size)
    answers = []
    for q in QUESTIONS:
        ids = torch.tensor([tokenizer.encode(chat_prompt(q)).ids])
        answer = model.generate(ids, 24, temperature=0, stop_at_eos=True, allowed_ids=text_only)[0, ids.shape[1]:]
        answers.append(tokenizer.decode(answer.tolist()))
    return ppl, answers


def c1_section(base, multimodal):
    """text_ability of the base and of the multimodal model -> report["c1"] and its lines: C1 holds if they are
    identical."""
    (ppl_base, answers_base), (ppl_mm, answers_mm) = base, multimodal
    same = [a == b for a, b in zip(answers_base, answers_mm)]
    lines = ["", "## C1: text ability", "", f"Perplexity of held-out English (CPython docs, 8 x 256 tokens): base "
             f"{ppl_base:.4f}, multimodal {ppl_mm:.4f} ({'identical' if ppl_base == ppl_mm else 'DIFFERENT'}).", ""]
    lines += [f"- {q} -> {a!r} ({'identical' if s else 'DIFFERENT'})" for q, a, s in zip(QUESTIONS, answers_base, same)]
    return {"c1": {"ppl_base": ppl_base, "ppl_multimodal": ppl_mm, "answers_identical": all(same)}}, lines

# -----------------------------------------------------------------------------
# Caption use: does the picture follow the caption?


@torch.no_grad()
def caption_use(model, shards, n=32, seed=0):
    """How much a picture's codes depend on its caption: the cross-entropy (nats) of the first code, of the first
    row of codes and of all of them, for n training examples given their own caption, another example's caption,
    and none (the <eos> filler of caption dropout). Where the three agree, the model draws from memory of the
    codes so far, not from the caption."""
    K = model.adapter.n_image_codes
    own = np.random.default_rng(seed).choice(len(shards), min(n, len(shards)), replace=False)
    pairs = {"own caption": [shards[i] for i in own],
             "another's caption": [(shards[j][0], shards[i][1]) for i, j in zip(own, np.roll(own, 1))],
             "no caption": [shards[i] for i in own]}
    out = {}
    for name, examples in pairs.items():
        losses = []
        for b in range(0, len(examples), 8):
            batch = examples[b:b + 8]
            idx, _, pad = make_batch(batch, range(len(batch)), np.full(len(batch), name == "no caption"), model)
            logits = linear(model.hidden_states(idx, pad=pad), model.image_head[:K])  # (B, T, K)
            for r, (text, codes) in enumerate(batch):
                start = int(pad[r]) + 1 + len(text)  # the <boi> position predicts the first code
                lp = torch.log_softmax(logits[r, start:start + len(codes)].float(), -1)
                losses.append(-lp.gather(1, torch.as_tensor(codes)[:, None])[:, 0])
        per_code = torch.stack(losses).mean(0)  # (n_codes,)
        row = int(math.isqrt(len(per_code)))
        out[name] = {"first_code": per_code[0].item(), "first_row": per_code[:row].mean().item(),
                     "all": per_code.mean().item()}
    return out


def caption_use_section(model, shards, n, seed):
    """caption_use on n training examples -> report["caption_use"] and its lines."""
    use = caption_use(model, shards, n, seed)
    lines = ["", "## Caption use (training examples; cross-entropy of their codes, nats)", "",
             "| given | first code | first row | all codes |", "| --- | --- | --- | --- |"]
    lines += [f"| {k} | {v['first_code']:.2f} | {v['first_row']:.2f} | {v['all']:.2f} |" for k, v in use.items()]
    return {"caption_use": use}, lines

# -----------------------------------------------------------------------------
# C2: the trainable budget


def budget_section(model):
    """The model's trainable parameters by component, against the frozen base -> report["c2"] and its lines."""
    counts, n_base = model.trainable_budget()
    total = sum(counts.values())
    lines = ["", "## C2: trainable budget", "", f"Base: {n_base:,} parameters (frozen).", ""]
    lines += [f"- {k}: {v:,} ({100 * v / n_base:.2f}%)" for k, v in counts.items()]
    lines += [f"- total: {total:,} ({100 * total / n_base:.2f}%)"]
    return {"c2": {"base": n_base} | counts}, lines

# -----------------------------------------------------------------------------
# Pictures: captions of training emoji (phrased as people ask, and by bare name), of held-out emoji (never trained),
# and of known objects in a colour they were never trained in (held-out pairs: composition), drawn and scored


def dataset_pictures(vq, data_dir):
    """Every picture of the dataset trained on, what drawn ones are scored against -> {"rows": its rows, "images":
    (N, 3, H, W), "gallery": vq.gallery of them}."""
    rows, images = load_images(read_folder(data_dir), vq.config.image_size)
    return {"rows": rows, "images": images, "gallery": vq.gallery(images, object_index(rows))}


def picture_figures(model, tokenizer, vq, seen, samples, offset, sampling, batch_size, seed):
    """Up to `samples` captions of each of GROUPS, evenly spread from offset, drawn with the sampling settings
    (generate_image's guidance, temperature, top_k) and scored against every picture of the dataset (seen:
    dataset_pictures) -> the figures of each group (report["images"][group]) and its asked and drawn pictures (for
    the PNGs)."""
    rows, everything, gallery = seen["rows"], seen["images"], seen["gallery"]
    g = torch.Generator().manual_seed(seed)
    figures, drawn = {}, {}
    for group, title in GROUPS.items():
        idx = caption_rows(rows, group)
        if not idx:
            continue
        own = torch.tensor(idx[offset:: max(1, len(idx) // samples)][:samples])  # evenly spread; offset: another set
        captions = [asked_caption(rows[i], group) for i in own.tolist()]
        drawings = draw(model, tokenizer, vq, captions, sampling, batch_size, g, f"drawing {title}")
        fake = single_pictures(drawings, vq.config.image_size)
        figures[group] = score_pictures(vq, gallery, own, everything[own], fake, captions)
        if model.adapter.scene_tokens:
            figures[group]["drawn_as_scenes"] = sum(len(tiles) == 4 for tiles in drawings) / len(drawings)
        drawn[group] = (everything[own], fake)
    if "val" in drawn:  # a Frechet distance on the VQ's features between the held-out pictures and the real ones, next
        # to the same distance between two real sets of that size (a reference at this sample size)
        real, fake = drawn["val"]
        train_idx = torch.tensor(caption_rows(rows, "train"))
        f_ref = gallery["features"][train_idx[torch.randperm(len(train_idx), generator=g)[:len(real)]]]
        with torch.no_grad():
            figures["val"] |= {"vq_frechet": frechet(vq.features(fake), vq.features(real)),
                               "vq_frechet_real_vs_real": frechet(f_ref, vq.features(real))}
    return figures, drawn


def draw(model, tokenizer, vq, captions, sampling, batch_size, g, desc):
    """What captions draw, batch_size prompts together, sampled with generator g -> a list, per caption: [picture
    (3, H, W)], or a scene's 4 tiles (each a picture or None: empty) with an adapter that has scene tokens."""
    drawings = []
    with tqdm(total=len(captions), desc=desc, unit="drawing", leave=False) as bar:
        for b in range(0, len(captions), batch_size):
            ids = [tokenizer.encode(c).ids for c in captions[b:b + batch_size]]
            tokens = model.generate_image(ids, vq.config.n_tokens, **sampling, generator=g)
            drawings += decode_drawings(model, vq, tokens)
            bar.update(len(ids))
    return drawings


def single_pictures(drawings, size):
    """draw's drawings of one object each -> (B, 3, size, size): a scene drawn instead is a miss, scored as a white
    picture (as train.py's learning curve does)."""
    white = torch.ones(3, size, size)
    return torch.stack([tiles[0] if len(tiles) == 1 else white for tiles in drawings])


def score_pictures(vq, gallery, own, real, fake, captions):
    """Pictures fake (B, 3, H, W) drawn for the captions of the gallery's pictures own (B,), which are real (B, 3, H, W)
    -> their figures: score_summary's, top-1 by kind, the colour-word ceiling the image tokenizer sets, chance levels,
    and per picture its caption, ranks and colour words."""
    scores = vq.scores(fake, gallery, own)
    asked = [gallery["colours"][i] for i in own.tolist()]
    coloured = [a for a in asked if a is not None]
    n_objects = int((gallery["objects"] == torch.arange(len(gallery["objects"]))).sum())
    multi = torch.tensor([a is None for a in asked], dtype=torch.bool)  # a multi-coloured emoji: no colour word
    rank = scores["rank"]
    by_kind = {f"top1_{k}": (rank[m.to(rank.device)] < 1).float().mean().item()
               for k, m in (("coloured", ~multi), ("multicolour", multi)) if m.any()}
    own_words = token_colours(vq, real)  # the image tokenizer's part: where not the asked word, no drawing is right
    return score_summary(scores) | by_kind | {
        "colour_ceiling": share([a == w for a, w in zip(asked, own_words) if a is not None]),
        "colour_as_own_tokens": share([c == w for a, c, w in zip(asked, scores["colour"], own_words) if a is not None]),
        "captions": captions, "ranks": rank.tolist(), "object_ranks": scores["object_rank"].tolist(),
        "asked_colours": asked, "drawn_colours": scores["colour"], "own_token_colours": own_words,
        # what drawing every picture in the commonest asked colour would score; what a random object would
        "colour_base_rate": max(map(coloured.count, coloured)) / len(coloured) if coloured else math.nan,
        "object_top5_chance": min(1.0, 5 / n_objects)}


def token_colours(vq, pictures):
    """Pictures (N, 3, H, W) -> the colour word (or None) of each one's own image tokens, decoded: what a model that
    writes, or reads, exactly those tokens gets; where it is not the picture's own word, no model can be right."""
    return [colour_word(p) for p in vq.detokenize(vq.tokenize(pictures))]


def share(ok):
    """A list of booleans -> the share that are true (NaN for an empty list: nothing to count)."""
    return sum(ok) / len(ok) if ok else math.nan


def frechet(a, b):
    """Frechet distance between Gaussians fitted to two feature sets (N, D). tr(sqrt(Ca Cb)) is the sum of
    the square roots of the eigenvalues of Ca Cb, which are real and >= 0 for covariance matrices."""
    a, b = a.double(), b.double()
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    sqrt_trace = torch.linalg.eigvals(ca @ cb).real.clamp_min(0).sqrt().sum()
    return float((a.mean(0) - b.mean(0)).pow(2).sum() + ca.trace() + cb.trace() - 2 * sqrt_trace)


def pictures_section(im, n_pictures, data_dir):
    """The drawing settings and picture_figures -> report["images"] and its lines: a table, a column per group."""
    cols = [c for c in GROUPS if c in im]
    row = lambda name, f: f"| {name} | " + " | ".join(f(im[c]) for c in cols) + " |"  # noqa: E731
    pct = lambda k: lambda r: f"{100 * r[k]:.1f}%" if k in r else "-"  # noqa: E731
    lines = ["", "## Pictures", "", f"Up to {im['n']} captions of each kind, guidance {im['guidance']}, temperature "
             f"{im['temperature']}, top-k {im['top_k']}, {im['dtype']}; each picture scored against the {n_pictures} "
             f"pictures of {data_dir}: retrieval of the asked picture by VQ-feature similarity, its colour word, "
             "and its object by shape whatever the colour:", "",
             "| | " + " | ".join(GROUPS[c] for c in cols) + " |", "| --- |" + " --- |" * len(cols),
             row("pictures drawn", lambda r: str(len(r["captions"]))),
             row("asked picture top-1", pct("top1")), row("asked picture top-5", pct("top5")),
             row("... top-1 where it has a colour word", pct("top1_coloured")),
             row("... top-1 of multi-coloured emoji", pct("top1_multicolour")),
             row("asked object's original top-1 among the originals", pct("original_top1")),
             row("median rank", lambda r: str(r["median_rank"])),
             row("dominant hue matches", pct("hue")),
             row("colour word is the asked one", pct("colour")),
             row("... drawing everything in the commonest asked colour", pct("colour_base_rate")),
             row("... the asked picture's own tokens, decoded (the ceiling the image tokenizer sets)",
                 pct("colour_ceiling")),
             row("colour word is that of the asked picture's own tokens, decoded", pct("colour_as_own_tokens")),
             row("asked object in the top 5 by shape", pct("object_top5")),
             row("... a random object", pct("object_top5_chance")),
             row("colour and object both right", pct("both"))]
    if "val" in im:
        lines += ["", "VQ-feature Frechet distance (not Inception FID), held-out emoji: "
                  f"{im['val']['vq_frechet']:.2f}; between them and as many random training emoji: "
                  f"{im['val']['vq_frechet_real_vs_real']:.2f}"]
    lines += [""] + [f"![{GROUPS[c]}](samples_{c}.png)" for c in cols]
    if "pairs" in im:
        lines += ["", "Held-out pairs, asked colour (rows) against the colour drawn (columns):", "",
                  "![colour confusion](colour_confusion.png)"]
    return {"images": im}, lines

# -----------------------------------------------------------------------------
# Scenes (#52): GenEval's six categories (Ghosh et al. 2023: template prompts, four pictures each, a detector as the
# judge) on held-out prompts. Here the judge is the project's own: each tile's object is the nearest original emoji by
# shape (whatever its colour), its colour the colour word; data.scenes.judge applies GenEval's rules to them.

PICTURES_PER_PROMPT = 4  # GenEval's
PUBLISHED = {  # GenEval overall (and where #52 quotes them, categories), on photographs: another domain
    "LlamaGen": {"overall": 0.32, "position": 0.07, "colour attribution": 0.04}, "SDXL": {"overall": 0.55},
    "Janus-Pro-7B": {"overall": 0.80}, "BAGEL": {"overall": 0.82}}


def geneval_figures(model, tokenizer, vq, seen, shards, n, sampling, batch_size, seed):
    """Up to n prompts of each of GenEval's categories (data.scenes.geneval_prompts), PICTURES_PER_PROMPT drawn of
    each and judged -> ({category: its figures}, {category: (its first drawings, their captions)} for the PNGs). A
    category the dataset has no prompt for (no recoloured copies: no colours) scores NaN, outside the overall. The
    judge's ceiling: each prompt's own pictures laid out as it says (shards: the training split), judged."""
    rows, gallery, table = seen["rows"], seen["gallery"], tile_table(shards.path)
    g = torch.Generator().manual_seed(seed)
    figures, shown = {}, {}
    for category, scenes in geneval_prompts(table, rows, n).items():
        if not scenes:
            figures[category] = {"score": math.nan, "prompts": 0, "drawn_as_scenes": math.nan, "ceiling": math.nan}
            continue
        asked = [s for s in scenes for _ in range(PICTURES_PER_PROMPT)]
        drawings = draw(model, tokenizer, vq, [s.caption for s in asked], sampling, batch_size, g, category)
        found = what_they_show(vq, gallery, rows, drawings)
        right = [judge(s, f) for s, f in zip(asked, found)]
        figures[category] = {"score": sum(right) / len(right), "prompts": len(scenes),
                             "ceiling": judge_ceiling(scenes, table, shards, vq, seen),
                             "drawn_as_scenes": sum(len(t) == 4 for t in drawings) / len(drawings),
                             "captions": [s.caption for s in asked], "right": right,
                             "found": [[list(d) for d in f] for f in found]}
        shown[category] = drawings[:16], [s.caption for s in asked[:16]]
    scores = [figures[c]["score"] for c in GENEVAL if figures[c]["prompts"]]
    return figures | {"overall": sum(scores) / len(scores)}, shown


def judge_ceiling(scenes, table, shards, vq, seen):
    """The judge's own ceiling: the share of the prompts whose own pictures, laid out as each says, it judges right."""
    truth = [own_pictures(s, table, shards, vq, seen) for s in scenes]
    found = what_they_show(vq, seen["gallery"], seen["rows"], decode_tiles(vq, truth))
    return sum(judge(s, f) for s, f in zip(scenes, found)) / len(scenes)


@torch.no_grad()
def own_pictures(scene, table, shards, vq, seen):
    """The pictures a GenEval prompt asks for, as a drawing of tokens: a single object's own training picture, a
    scene's tiles (None: empty) -> [tokens] or 4 tiles; for a held-out colour pair (colours), its own picture, never
    trained, through the VQ."""
    if scene.category == "single object":
        return [torch.from_numpy(shards[table["own"][scene.objects[0]]][1])]
    if scene.category == "colours":
        i = next(k for k, r in enumerate(seen["rows"]) if r["split"] == "val" and r["captions"][0] == scene.caption)
        return [vq.tokenize(seen["images"][i:i + 1])[0]]
    return [None if t < 0 else torch.from_numpy(shards[t][1]) for t in scene.tiles]


@torch.no_grad()
def what_they_show(vq, gallery, rows, drawings):
    """draw's drawings -> per drawing, what it shows: [(cell, object name, colour word or None)] for each picture in
    it, cell 0-3 in a scene, None for a single picture. A picture's object: the original emoji (the gallery's, not a
    recoloured copy) nearest by shape features, named by its bare name."""
    pictures = [(k, cell if len(tiles) == 4 else None, t) for k, tiles in enumerate(drawings)
                for cell, t in enumerate(tiles) if t is not None]
    if not pictures:
        return [[] for _ in drawings]
    x = torch.stack([t for _, _, t in pictures]).clamp(-1, 1)
    originals = (gallery["objects"] == torch.arange(len(gallery["objects"]))).nonzero()[:, 0]
    nearest = originals[(vq.shape_features(x) @ gallery["shapes"][originals].T).argmax(1)]
    found = [[] for _ in drawings]
    for (k, cell, t), i in zip(pictures, nearest.tolist()):
        found[k].append((cell, rows[i]["captions"][0], colour_word(t.clamp(-1, 1))))
    return found


def geneval_section(ge):
    """The drawing settings and geneval_figures -> report["geneval"] and its lines: the six categories beside the
    published figures."""
    names = list(PUBLISHED)
    cell = lambda v: "-" if v is None or v != v else f"{v:.2f}"  # noqa: E731  (None: not quoted; NaN: no prompt)
    lines = ["", "## Scenes: GenEval's six categories", "",
             f"Up to {ge['n']} prompts a category, held out but for single object (training objects by name; colours: "
             f"held-out (object, colour) pairs), {PICTURES_PER_PROMPT} pictures each; guidance {ge['guidance']}, "
             f"temperature {ge['temperature']}, top-k {ge['top_k']}, {ge['dtype']}. A picture is right when every "
             "criterion of its category holds, judged per tile: its object the nearest original emoji by shape, its "
             "colour the colour word. The published figures are on photographs judged by a detector: another domain, "
             "not a comparison of models. The ceiling is the judge's own: each prompt's own pictures (colours: the "
             "held-out pair's, never trained), laid out as it says, judged the same way.", "",
             "| category | prompts | drawn as scenes | score | ceiling | " + " | ".join(names) + " |",
             "| --- " * (5 + len(names)) + "|"]
    for c in GENEVAL:
        ours = [str(ge[c]["prompts"]), cell(ge[c]["drawn_as_scenes"]), f"**{cell(ge[c]['score'])}**",
                cell(ge[c]["ceiling"])]
        lines.append(f"| {c} | " + " | ".join(ours + [cell(PUBLISHED[m].get(c)) for m in names]) + " |")
    lines.append(f"| overall | | | **{ge['overall']:.2f}** | | "
                 + " | ".join(cell(PUBLISHED[m]["overall"]) for m in names) + " |")
    lines += [""] + [f"![{c}](geneval_{c.replace(' ', '_')}.png)" for c in GENEVAL if ge[c]["prompts"]]
    return {"geneval": ge}, lines


# -----------------------------------------------------------------------------
# Pictures described (#53): does the model name the object and its colour? Training pictures, held-out pairs (a
# known object in a colour never trained, in either direction) and a round trip (a held-out pair drawn, then read)


def describe_figures(model, tokenizer, vq, seen, n, sampling, batch_size, seed):
    """Up to n pictures of the training emoji (one per (object, colour)) and of the held-out pairs, each described
    greedily (MMMoE.describe), and as many held-out pairs' captions drawn and their pictures described -> ({group:
    figures}: the object named, the colour named (over the pictures that have one) and both, as named() counts, and
    the colour the picture's image tokens keep, the ceiling of the colour named; {group: the pictures described (N,
    3, H, W)} for the PNGs)."""
    rows, everything = seen["rows"], seen["images"]
    by_image, figures, described = {r["image"]: r for r in rows}, {}, {}
    g = torch.Generator().manual_seed(seed)
    for group in ("train", "pairs", "round trip"):
        idx = caption_rows(rows, "train" if group == "train" else "pairs")
        idx = idx[::max(1, len(idx) // n)][:n]
        names = [by_image.get(rows[i]["object"], rows[i])["captions"][0] for i in idx]
        colours = [rows[i]["colour"] for i in idx]
        pictures = everything[idx]
        if group == "round trip":
            captions = [asked_caption(rows[i], "pairs") for i in idx]
            drawn = draw(model, tokenizer, vq, captions, sampling, batch_size, g, "drawing, to describe")
            pictures = single_pictures(drawn, vq.config.image_size)
        words = describe_pictures(model, tokenizer, vq, pictures, batch_size=batch_size)
        figures[group], described[group] = named(words, names, colours), pictures
        figures[group]["tokens_colour"] = kept_colour(vq, pictures, colours)
    return figures, described


def kept_colour(vq, pictures, colours):
    """Pictures (N, 3, H, W) and the colour word each has (or None) -> the share of those with one whose image
    tokens, decoded, still have it (token_colours): what the model reading the tokens can name at best."""
    return share([c == w for c, w in zip(colours, token_colours(vq, pictures)) if c is not None])


def named(words, names, colours):
    """Descriptions, and the object and colour word (or None) each should name -> the shares named right, and each
    description with what it should name. The object is named when the words, less an article, colour words and a
    closing full stop, are its name less colour words ("a purple pear." names "pear"; "a hot dog" does not name
    "dog"); the colour when the words' colour words are the asked one and those of the name ("a blue heart")."""
    said = [w.lower().strip().removesuffix(".").split() for w in words]  # each description's words
    asked = [x.lower().split() for x in names]  # each name's words

    def bare(w):  # words, less an article in front and the colour words
        return [x for x in w[1 if w[:1] in (["a"], ["an"], ["the"]) else 0:] if x not in COLOUR_WORDS]
    has_name = [bare(w) == bare(x) for w, x in zip(said, asked)]
    has_colour = [c is None or COLOUR_WORDS & set(w) == {c} | (COLOUR_WORDS & set(x))
                  for w, x, c in zip(said, asked, colours)]
    return {"object": share(has_name), "colour": share([ok for ok, c in zip(has_colour, colours) if c is not None]),
            "both": share([a and b for a, b in zip(has_name, has_colour)]),
            "words": words, "names": names, "colours": colours}


def describe_section(d):
    """The settings and describe_figures -> report["describe"] and its lines."""
    groups = {"train": "training pictures", "pairs": "held-out pairs (never trained)",
              "round trip": "held-out pairs drawn, then described"}
    pct = lambda v: "-" if v != v else f"{100 * v:.1f}%"  # noqa: E731  (NaN: no picture with a colour word)
    lines = ["", "## Pictures described", "", f"Up to {d['n']} pictures of each kind, described greedily; the round "
             f"trip's drawn with guidance {d['guidance']}, temperature {d['temperature']}, top-k {d['top_k']}, "
             f"{d['dtype']}. The object is named when the words, less an article and colour words, are its name; the "
             "colour when their colour words are the asked one (and the name's own); both: the object, and the "
             "colour where the picture has one; the colour in its tokens: the picture's image tokens, decoded, "
             "still have the colour word (the ceiling of the colour named).", "",
             "| | pictures | object named | colour named | both | the colour in its tokens |", "| --- " * 6 + "|"]
    lines += [f"| {title} | {len(d[g]['words'])} | {pct(d[g]['object'])} | {pct(d[g]['colour'])} | "
              f"{pct(d[g]['both'])} | {pct(d[g]['tokens_colour'])} |" for g, title in groups.items()]
    pairs = d["pairs"]
    lines += ["", "Held-out pairs described: " + "; ".join(f"{x} ({c}): \"{w}\"" for w, x, c in
                                                         zip(pairs["words"][:6], pairs["names"], pairs["colours"]))]
    lines += ["", "Each picture under what it is and what the model said:", ""]
    lines += [f"![{title}](described_{g.replace(' ', '_')}.png)" for g, title in groups.items() if d[g]["words"]]
    return {"describe": d}, lines


# -----------------------------------------------------------------------------
# The report's PNGs


def save_pictures(out, report, drawn, scenes, described, size):
    """The report's PNGs in out: the image-specificity heatmaps before and after training, and for the pictures drawn
    (per group: asked pictures, drawn ones) a grid of each group and the held-out pairs' colour confusion; for the
    scenes drawn (per GenEval category: drawings and their captions) a labelled grid of each category; for the
    pictures described (per group: the pictures) a grid of each group, every picture under what it is and what the
    model said."""
    for name in ("before", "after"):
        heatmap(np.array(report[name]["specificity"]), out / f"specificity_{name}.png",
                f"image-specificity {name} (red: image, blue: text)")
    for group, (real, fake) in drawn.items():
        save_grid(torch.stack([real[:16], fake[:16]]), out / f"samples_{group}.png", size=96,
                  labels=[GROUPS[group], "drawn for their captions" + (" (never trained)" if group != "train" else "")])
    if "pairs" in drawn:
        pairs = report["images"]["pairs"]
        colour_confusion(pairs["asked_colours"], pairs["drawn_colours"], out / "colour_confusion.png")
    for category, (drawings, captions) in scenes.items():
        pictures = torch.stack([on_canvas(d, size) for d in drawings])  # (N, 3, 2 size, 2 size), N a multiple of 4
        save_grid(pictures.view(-1, PICTURES_PER_PROMPT, *pictures.shape[1:]),
                  out / f"geneval_{category.replace(' ', '_')}.png", size=128, labels=captions[::PICTURES_PER_PROMPT])
    for group, pictures in described.items():
        if not len(pictures):
            continue
        d = report["describe"][group]
        labels = [f"{c + ' ' if c else ''}{x}: \"{w}\"" for w, x, c in zip(d["words"], d["names"], d["colours"])]
        cols = min(8, len(pictures))
        rows = len(pictures) // cols  # whole rows: up to 8 pictures a row
        save_grid(pictures[:rows * cols].view(rows, cols, *pictures.shape[1:]),
                  out / f"described_{group.replace(' ', '_')}.png", size=128,
                  labels=[labels[r * cols:(r + 1) * cols] for r in range(rows)])


def colour_confusion(asked, drawn, path, cell=40):
    """Colour words asked and drawn (None: no one colour) -> a PNG table of counts, asked in rows."""
    names = sorted({w for w in asked + drawn if w}) + ["none"]
    counts = np.zeros((len(names), len(names)), int)
    for a, d in zip(asked, drawn):
        counts[names.index(a or "none"), names.index(d or "none")] += 1
    im = Image.new("RGB", (80 + cell * len(names), 50 + cell * len(names)), "white")
    draw = ImageDraw.Draw(im)
    draw.text((4, 4), "asked (rows) x drawn (columns)", fill="black")
    for i, name in enumerate(names):
        draw.text((84 + cell * i, 30), name[:6], fill="black")
        draw.text((4, 62 + cell * i), name, fill="black")
        for j in range(len(names)):
            t = counts[i, j] / max(1, counts[i].sum())  # green on the diagonal (the asked colour), red off it
            shade = ((int(255 * (1 - t)), int(255 * (1 - 0.6 * t)), int(255 * (1 - t))) if i == j
                     else (255, int(255 * (1 - 0.7 * t)), int(255 * (1 - 0.7 * t))))
            x0, y0 = 80 + cell * j, 50 + cell * i
            draw.rectangle([x0, y0, x0 + cell - 2, y0 + cell - 2], fill=shade)
            draw.text((x0 + 12, y0 + 12), str(counts[i, j]), fill="black")
    im.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a train.py output directory (default: the built-in demo)")
    p.add_argument("--out", default="out/report")
    p.add_argument("--probe", type=int, default=32, help="held-out sequences for routing and redundancy")
    p.add_argument("--samples", type=int, default=0, help="captions of training emoji (as people ask, and by bare "
                   "name), held-out emoji and held-out colour pairs to draw and score, of each (slow on CPU)")
    p.add_argument("--geneval", type=int, default=0, metavar="N", help="a run that draws scenes: up to N prompts of "
                   f"each of GenEval's six categories (held out but for single object), {PICTURES_PER_PROMPT} pictures "
                   "each (slow on CPU)")
    p.add_argument("--describe", type=int, default=0, metavar="N", help="a run that reads pictures: up to N "
                   "training pictures and held-out pairs described, and N held-out pairs drawn, then described")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", "--cfg", type=float, default=SAMPLING["guidance"],
                   help="guidance for --samples (sample.py's default)")
    p.add_argument("--temperature", type=float, default=SAMPLING["temperature"])
    p.add_argument("--top-k", type=int, default=SAMPLING["top_k"])
    p.add_argument("--batch", type=int, default=16, help="--samples: prompts drawn together")
    p.add_argument("--offset", type=int, default=0,
                   help="--samples: start the evenly spread captions here (another set)")
    p.add_argument("--dtype", choices=DRAWING_DTYPES, default="float32",
                   help="--samples: the model's dtype as it draws (sample.py's)")
    p.add_argument("--curve", metavar="PNG", help="only plot the checkpoint's learning curve (train.py's log) to PNG")
    p.add_argument("--compare", nargs="+", metavar="RUN",
                   help="only compare runs that differ in init and seed -> --out")
    p.add_argument("--target", type=float, default=5.0,
                   help="--compare: the held-out loss whose first reaching is timed")
    p.add_argument("--variants", nargs="+", metavar="RUN",
                   help="only compare config/redundancy.sh's runs (VARIANT-sSEED) -> --out")
    args = p.parse_args()
    if args.compare:
        print("\n".join(compare_inits(args.compare, args.out, args.target)))
        return
    if args.variants:
        print("\n".join(compare_variants(args.variants, args.out)))
        return
    if args.curve:
        state, _, _ = run_inputs(args.ckpt or DEMO)
        n = len(TokenShards(state["train_config"]["shards"], "train"))
        plot_curve(state["log"], args.curve, n, state["train_config"]["batch_size"])
        print("\n".join(curve_table(state["log"])))
        return
    if min(args.samples, args.geneval, args.describe) < 0 or not 0 <= args.guidance < math.inf \
            or not 0 <= args.temperature < math.inf or (args.top_k or 1) < 1 or args.batch < 1 or args.offset < 0:
        raise BadInput("--samples, --geneval and --describe >= 0, --guidance and --temperature numbers >= 0, "
                       "--top-k >= 1, --batch >= 1, --offset >= 0")
    analyze(args.ckpt, args.out, args.probe, args.samples, args.seed, args.guidance, args.temperature, args.top_k,
            args.batch, args.offset, drawing_dtype(args.dtype)[0], args.geneval, args.describe)
    print((Path(args.out) / "report.md").read_text())


if __name__ == "__main__":
    run(main)
