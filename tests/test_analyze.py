"""analyze.py: routing specificity, redundancy and the report, on known cases and a tiny trained model."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import analyze
import train
from mmmoe import AdapterConfig, BadInput, MMMoE


class FixedRouter(torch.nn.Module):
    """Every token scores experts [-100, 5, 4, 0]: text goes to experts 1 and 2."""

    def forward(self, x):
        return x.new_tensor([-100.0, 5.0, 4.0, 0.0]).expand(len(x), 4)


class ImageBoost(torch.nn.Module):
    """In place of the router's PLoRA: +200 for expert 0, so image tokens go to experts 0 and 1."""

    def forward(self, x, expert=0):  # LoRA.forward's arguments: the input, and which expert's block
        return x.new_tensor([200.0, 0.0, 0.0, 0.0]).expand(len(x), 4)


def test_a_router_that_sends_image_tokens_to_expert_0(tiny_ckpt):
    path, _, _ = tiny_ckpt(experts=4, top_k=2)
    model = MMMoE.from_pretrained(path).add_image_adapter(AdapterConfig(n_image_codes=16, rank=4))
    for layer in model.model.layers:
        layer.block_sparse_moe.gate = FixedRouter()
        layer.block_sparse_moe.gate_lora = ImageBoost()
    idx = torch.cat([torch.randint(0, 97, (3, 6)), model.image_token(torch.randint(0, 16, (3, 10)))], 1)
    pad = torch.tensor([2, 0, 1])  # rows left-padded by this many columns: padding is counted as neither
    counts, _, routes = analyze.routing(model, [(idx, None), (idx, pad)])
    L = model.config.n_layers
    assert torch.equal(counts.sum(-1), torch.tensor([[2 * 18 + 2 * 15] * L, [2 * 30 + 2 * 30] * L]).float())
    assert routes.shape == (L, 3, 16, 2) and (routes[:, :, 6:] <= 1).all()  # each token's experts: 0 and 1 for images
    shares, spec, entropy = analyze.routing_stats(counts)
    assert torch.allclose(spec[:, 0], torch.ones(2))  # expert 0: image tokens only
    assert torch.allclose(spec[:, 1], torch.zeros(2))  # expert 1: half of both
    assert torch.allclose(spec[:, 2], -torch.ones(2))  # expert 2: text only
    assert torch.allclose(shares.sum(-1), torch.ones(2, 2)) and ((0 <= entropy) & (entropy <= 1)).all()


def test_copied_experts_are_fully_redundant_until_their_lora_differs(tiny_ckpt):
    path, cfg, sd = tiny_ckpt(experts=3, top_k=2)
    model = MMMoE.from_pretrained(path).add_image_adapter(AdapterConfig(n_image_codes=16, rank=4))
    with torch.no_grad():
        for layer in model.model.layers:  # make the experts copies of expert 0, as copy-upcycling does
            for w in ("w1", "w2", "w3"):
                p = getattr(layer.block_sparse_moe.experts, w)
                p[1:] = p[0]
    probe = [torch.randn(40, 64) for _ in model.model.layers]
    assert all(abs(c - 1) < 1e-5 for c in analyze.redundancy(model, probe))
    with torch.no_grad():
        model.model.layers[1].block_sparse_moe.experts.w2_lora.B[:, 8:12].normal_()  # expert 2's B (rank 4)
    cka = analyze.redundancy(model, probe)
    assert abs(cka[0] - 1) < 1e-5 and cka[1] < 0.999


# The figures of test_report_on_a_tiny_trained_model's report, written by analyze.py as it was before its sections were
# functions (commit 0658dab, with its drawing call's `cfg` read as `guidance`). Where a change means to move them,
# replace the file with the report.json the test writes (pytest --basetemp=/tmp/t: /tmp/t/test_report_on_*/report/).
GOLDEN = Path(__file__).parent / "data" / "tiny_report.json"
# Shares of the pictures drawn whose rank is under a cut-off (1 or 5), or whose object's is
AT_A_RANK = {"top1", "top5", "original_top1", "object_top1", "object_top5", "both", "top1_coloured", "top1_multicolour"}


def assert_like(got, want, path="report", n=None):
    """got has want's figures: the same keys everywhere, the same strings, flags and counts; floats to 1e-3 relative;
    ranks to one place, and the shares cut from ranks to one picture of the n drawn. Across threads (1, 2), ATen's
    kernels (AVX2, default), MKL's (MKL_CBWR=COMPATIBLE) and the matmul form chosen on Intel, floats moved by <= 4e-5
    relative, and the sampled codes and the routes did not move (the smallest margin of a draw was 2e-3 relative, of
    a route's k-th over its (k+1)-th router logit 3e-4). Ranks do: the tiny dataset holds each square twice (4
    colours x 6 places: i and i + 12 are the same picture), so a twin's similarity ties the asked one's to the last
    bit, and rounding decides whether it ranks above (an object rank 4 -> 5 moved object_top5 by a picture). Every
    square has a colour word, so each share is over the n pictures of its group."""
    name = path.split("/")[-1]
    if isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys {list(got)}, not {list(want)}"
        for k, v in want.items():
            assert_like(got[k], v, f"{path}/{k}", len(want["captions"]) if "captions" in want else n)
    elif name in ("ranks", "object_ranks", "median_rank"):
        assert np.shape(got) == np.shape(want), f"{path}: {got}, not {want}"
        assert np.abs(np.subtract(got, want)).max() <= 1, f"{path}: {got}, not {want}"
    elif name in AT_A_RANK:
        assert abs(got - want) <= 1 / n + 1e-6, f"{path}: {got}, not {want}"  # shares in float32: 1/3 is 0.33333334
    elif isinstance(want, list):
        assert len(got) == len(want), f"{path}: {got}, not {want}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_like(g, w, f"{path}[{i}]", n)
    elif isinstance(want, float):
        assert got == pytest.approx(want, rel=1e-3, nan_ok=True), f"{path}: {got}, not {want}"
    else:
        assert type(got) is type(want) and got == want, f"{path}: {got!r}, not {want!r}"


def test_report_on_a_tiny_trained_model(tiny_setup, tmp_path):
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(tmp_path / "run"),
                           rank=4, batch_size=4, steps=3, warmup=1, eval_every=3, eval_batches=1, save_every=3, lr=1e-2,
                           init="mean",  # the report, not the init, is tested: GW on the tiny fixture costs ~10 s
                           dtype="float32")  # not auto: bf16 on a CPU with AMX would train other figures than GOLDEN's
    train.train(tc)
    report = analyze.analyze(tmp_path / "run", tmp_path / "report", n_probe=4, samples=3)
    assert report["c1"]["ppl_base"] == report["c1"]["ppl_multimodal"] and report["c1"]["answers_identical"]
    for when in ("before", "after"):
        spec = torch.tensor(report[when]["specificity"])
        assert spec.shape == (2, 4) and ((-1 <= spec) & (spec <= 1)).all()
        assert all(0 <= c <= 1 + 1e-6 for c in report[when]["cka"])
    assert min(report["images"]["val"]["vq_frechet"], report["images"]["val"]["vq_frechet_real_vs_real"]) > -1e-6
    assert report["images"]["dtype"] == "float32"  # the dtype drawn in (--dtype), said with the figures
    for group, n in (("train", 3), ("val", 2), ("pairs", 2)):  # the fixture holds out 2 squares and 2 (shape, colour) pairs
        im = report["images"][group]
        assert 0 <= im["hue"] <= 1 and 0 <= im["top1"] <= im["top5"] <= 1 and len(im["captions"]) == n
        assert 0 <= im["both"] <= min(im["colour"], im["object_top5"]) and 0 <= im["object_top1"] <= im["object_top5"] <= 1
        assert 1 / n <= im["colour_base_rate"] <= 1  # the commonest asked colour's share
        assert all(0 <= r < 24 for r in im["ranks"])  # a rank among the 24 pictures of the tiny dataset
        assert all(0 <= r < 22 for r in im["object_ranks"])  # ... among its 22 objects (2 pictures are recoloured copies)
        assert len(im["asked_colours"]) == len(im["drawn_colours"]) == len(im["own_token_colours"]) == n
        coloured = [(a, d, w) for a, d, w in zip(im["asked_colours"], im["drawn_colours"], im["own_token_colours"]) if a is not None]
        assert im["colour_ceiling"] == sum(a == w for a, _, w in coloured) / len(coloured)  # the tokenizer's own colour
        assert im["colour_as_own_tokens"] == sum(d == w for _, d, w in coloured) / len(coloured)
    assert report["images"]["pairs"]["captions"] == ["w10 w20", "w11 w21"]  # squares 0 and 1, held out as pairs
    assert report["images"]["pairs"]["asked_colours"] == ["red", "green"]
    assert report["c2"]["LoRA router"] > 0 and report["c2"]["base"] > 0
    use = report["caption_use"]
    assert set(use) == {"own caption", "another's caption", "no caption"}
    assert all(v["all"] > 0 and v["first_code"] > 0 for v in use.values())
    text = (tmp_path / "report" / "report.md").read_text()
    assert "## Routing by modality" in text and "identical" in text and (tmp_path / "report" / "specificity_after.png").exists()
    assert "the ceiling the image tokenizer sets" in text and "colour and object both right" in text and (tmp_path / "report" / "colour_confusion.png").exists()
    assert_like(json.loads((tmp_path / "report" / "report.json").read_text()), json.loads(GOLDEN.read_text()))


def test_compare_inits(tiny_setup, tmp_path):
    runs = []
    for init, seed, scale in (("gw", 0, 1.0), ("gw", 1, 1.0), ("mean", 0, 1.0), ("gw", 0, 0.25)):
        runs.append(tmp_path / f"{init}-{seed}-{scale}")
        train.train(train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(runs[-1]), init=init,
                                      init_scale=scale, seed=seed, rank=4, batch_size=4, steps=4, warmup=1, eval_every=2,
                                      eval_batches=1, save_every=4, log_every=1))
    lines = analyze.compare_inits(runs, tmp_path / "cmp", target=100.0)
    assert [line.split(" | ")[:2] for line in lines[2:]] == [["| gw", "2"], ["| gw x0.25", "1"], ["| mean", "1"]]
    assert "2 ± 0 (2 of 2)" in lines[2]  # a held-out loss below 100 is reached at the first evaluation, step 2
    assert (tmp_path / "cmp" / "init_compare.png").exists() and (tmp_path / "cmp" / "init_compare.md").exists()
    first = json.loads((runs[2] / "state.json").read_text())["log"][0]
    assert first["step"] == 1 and math.isfinite(first["loss"])
    train.train(train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(tmp_path / "sparse"),
                                  rank=4, batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=2, init="mean"))
    with pytest.raises(BadInput, match="--log_every=1"):
        analyze.compare_inits([tmp_path / "sparse"], tmp_path / "cmp2", target=5.0)


def test_caption_use_swaps_captions_not_pictures(tiny_ckpt):
    path, _, _ = tiny_ckpt()
    model = MMMoE.from_pretrained(path).add_image_adapter(AdapterConfig(n_image_codes=16, rank=4))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as after training: every adapter tensor non-zero
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    codes = [torch.randint(0, 16, (16,), generator=g).numpy() for _ in range(8)]
    same = [(np.array([5, 6, 7]), c) for c in codes]  # every example has the same caption
    use = analyze.caption_use(model, same, n=8)
    assert use["own caption"] == use["another's caption"]  # swapping identical captions changes nothing
    assert use["no caption"] != use["own caption"]  # the caption does reach the codes
    differ = [(np.array([5 + i, 6, 7]), c) for i, c in enumerate(codes)]
    assert analyze.caption_use(model, differ, n=8)["another's caption"] != use["own caption"]


def test_learning_curve_plot_marks_a_warm_start(tmp_path):
    from PIL import Image
    log = [{"step": s, "loss": 7 - s / 20} for s in range(10, 110, 10)] + [{"step": 50, "warm_start": "elsewhere"}]
    log += [{"step": s, "val_image_loss": 6.0} for s in (50, 100)] + [{"step": 100, "train_top1": 0.5, "train_top5": 0.75, "val_hue": 0.5}]
    analyze.plot_curve(log, tmp_path / "curve.png", examples_per_epoch=400, batch=8)
    im = Image.open(tmp_path / "curve.png").convert("RGB")
    assert im.size == (920, 620)  # the legend right of the plots
    x = round(60 + 640 * (50 * 8 / 400) / (100 * 8 / 400))  # the warm start, half-way along the x axis
    assert im.getpixel((x, 150)) == (170, 170, 170) and im.getpixel((x + 3, 150)) == (255, 255, 255)


def test_compare_variants_counts_from_the_adapters_and_spreads_over_seeds(tiny_setup, tmp_path):
    """analyze.py --variants: one row per variant (the run's name less -sSEED), the trainable parameters its adapter
    file holds (train.py's count), each figure the mean ± std over the seeds, then each seed's; the routing report's
    figures where a run has one; a run without a learning curve is one line."""
    runs, budgets = [tmp_path / name for name in ("moe-s0", "moe-s1", "frozen-router-s0", "plain-s0")], {}
    for run_dir in runs:
        tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(run_dir), init="mean",
                               rank=4, batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=2, log_every=1,
                               curve_every=0 if "plain" in run_dir.name else 2, curve_captions=2, seed=int(run_dir.name[-1]),
                               router="frozen" not in run_dir.name)
        budgets[run_dir.name] = sum(train.train(tc).trainable_budget()[0].values())
        assert json.loads((run_dir / "state.json").read_text())["log"][0]["step_s"] > 0
    report = analyze.analyze(runs[0], runs[0] / "report", n_probe=4)  # as config/redundancy.sh writes it
    lines = analyze.compare_variants(runs[:3], tmp_path / "cmp")
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines[2:]}
    assert list(rows) == ["frozen-router", "moe"] and rows["moe"][1:3] == ["0, 1", "2, 2"]
    assert rows["frozen-router"][3] == f"{budgets['frozen-router-s0']:,}" and rows["moe"][3] == f"{budgets['moe-s0']:,}"
    assert budgets["moe-s0"] > budgets["frozen-router-s0"]  # the router's LoRA
    top1 = [next(r for r in json.loads((r / "state.json").read_text())["log"] if "train_top1" in r)["train_top1"] for r in runs[:2]]
    assert rows["moe"][6] == f"{np.mean(top1):.0%} ± {abs(top1[0] - top1[1]) / 2:.0%} ({top1[0]:.0%}, {top1[1]:.0%})"
    leaning = int((torch.tensor(report["after"]["specificity"]) > 0.5).sum())
    assert rows["moe"][-2] == f"{leaning} ± 0 ({leaning}, -)" and rows["moe"][-1].startswith(f"{np.mean(report['after']['cka']):.3f}")
    assert rows["frozen-router"][-1] == "- |"  # no routing report
    assert (tmp_path / "cmp" / "redundancy.png").exists() and (tmp_path / "cmp" / "redundancy.md").read_text().startswith("| variant")
    with pytest.raises(BadInput, match="no learning-curve point"):
        analyze.compare_variants([runs[3]], tmp_path / "cmp2")
