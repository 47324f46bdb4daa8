"""vq.py: shapes, the quantizer's lookup and gradient, LlamaGen compatibility, training that resumes exactly."""
import json
import math
from dataclasses import asdict
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from PIL import Image

import vq
from mmmoe import BadInput

TINY = vq.VQConfig(image_size=16, codebook_size=16, codebook_dim=4, ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=32)


def test_encode_decode_shapes():
    for cfg in (TINY, vq.PRESETS["demo"]):
        model = vq.VQModel(cfg).eval()
        x = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
        z_q, codes, loss = model.encode(x)
        assert z_q.shape == (2, cfg.codebook_dim, cfg.grid, cfg.grid) and codes.shape == (2, cfg.grid, cfg.grid)
        assert codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < cfg.codebook_size
        assert model.decode_codes(codes).shape == x.shape
        assert torch.allclose(model.decode(z_q), model.decode_codes(codes), atol=1e-4)  # z_q = z + (e - z): rounding
    assert vq.PRESETS["demo"].grid ** 2 == 64 and vq.PRESETS["llamagen-vq16"].grid == 16


def test_scores_find_each_picture_itself_its_colour_and_its_object():
    from data import turn_hue
    torch.manual_seed(0)
    model = vq.VQModel(TINY).eval()
    gallery = torch.ones(8, 3, 16, 16)  # white, then five squares of other colours, one black, then two crosses
    for i, rgb in enumerate([(1, -1, -1), (-1, 1, -1), (-1, -1, 1), (1, 1, -1), (-1, -1, -1)], 1):
        gallery[i, :, 4:12, 4:12] = torch.tensor(rgb, dtype=torch.float)[:, None, None]
    gallery[6, :, 7:9, 2:14] = gallery[6, :, 2:14, 7:9] = torch.tensor([1.0, -1, -1])[:, None, None]  # a red cross
    gallery[7] = turn_hue(gallery[6:7], torch.tensor([2 / 3]))[0]  # ... recoloured blue: a copy of object 6
    g = model.gallery(gallery, torch.tensor([0, 1, 2, 3, 4, 5, 6, 6]))
    assert g["colours"] == [None, "red", "green", "blue", "yellow", None, "red", "blue"]
    s = model.scores(gallery, g, torch.arange(8))
    assert s["rank"].tolist() == [0] * 8  # every picture is the most similar to itself
    assert s["hue_ok"].tolist() == [-1, 1, 1, 1, 1, -1, 1, 1]  # white and black have no colour to agree with
    assert s["colour_ok"].tolist() == [-1, 1, 1, 1, 1, -1, 1, 1] and s["colour"] == g["colours"]
    s = model.scores(gallery[[2, 6]], g, torch.tensor([1, 7]))  # green drawn for red; a red cross for the blue one
    assert s["rank"][0] >= 1 and s["hue_ok"].tolist() == [0, 0] and s["colour_ok"].tolist() == [0, 0]
    assert s["object_rank"][1] == 0  # by shape, whatever the colour, the red cross is the blue cross's object
    figures = vq.score_summary(model.scores(gallery[[6]], g, torch.tensor([7])))
    assert figures["colour"] == 0 and figures["object_top1"] == 1 and figures["both"] == 0
    s = model.scores(gallery[[2]], g, torch.tensor([6]))  # a green square for the red cross: the four squares come first
    assert s["object_rank"].item() >= 4 and vq.score_summary(s)["object_top1"] == 0


def test_colour_tokens_factor_colour_out_of_the_codes():
    from data import dominant_hue, turn_hue
    torch.manual_seed(0)
    cfg = vq.VQConfig(**{**asdict(TINY), "hue_bins": 12})
    assert (cfg.colour_tokens, cfg.vocab_size, cfg.n_tokens) == (13, 16 + 13, 1 + 64)
    model = vq.VQModel(cfg).eval()
    x = torch.ones(4, 3, 16, 16)
    x[:3, :, 3:13, 5:11] = torch.tensor([0.9, -0.6, -0.8])[:, None, None]  # a red bar ...
    x[1:3] = turn_hue(x[1:3], torch.tensor([1 / 3, 7 / 12]))  # ... turned green and blue; a white picture
    tokens = model.tokenize(x)
    assert tokens.shape == (4, 65) and tokens[:, 1:].max() < 16
    assert (tokens[:, 0] - 16).tolist() == [0, 4, 7, 12]  # the bin each came from; 12: no colour
    assert torch.equal(tokens[1, 1:], tokens[0, 1:]) and torch.equal(tokens[2, 1:], tokens[0, 1:])  # one shape: one set of codes
    plain = vq.VQModel(TINY).eval()  # the same weights without colour tokens
    plain.load_state_dict(model.state_dict())
    assert torch.equal(plain.tokenize(x[:1]), tokens[:1, 1:])  # red is the first bin already: no turn
    back, shape = model.detokenize(tokens), plain.detokenize(tokens[:, 1:])  # (4, 3, 16, 16) each
    # each picture is the one decoded shape, turned back by its colour token's bin (no colour: not turned)
    assert torch.allclose(back, turn_hue(shape, torch.tensor([0, 4, 7, 0]) / 12), atol=1e-5)
    assert dominant_hue(x[:3]).tolist() == [0, 4, 7]


def test_codes_are_the_most_similar_codebook_direction():
    model = vq.VQModel(TINY)
    z = torch.randn(3, TINY.codebook_dim, 5, 5)
    _, codes, _ = model.quantize(z)
    e = model.quantize.embedding.weight
    cos = torch.nn.functional.cosine_similarity(z.permute(0, 2, 3, 1)[..., None, :], e, dim=-1)  # (3, 5, 5, K)
    assert torch.equal(codes, cos.argmax(-1))


def test_nearest_code_in_blocks_is_the_plain_argmax():
    z = torch.nn.functional.normalize(torch.randn(203, 8), dim=-1)  # 203: the last block is a partial one
    codebook = torch.nn.functional.normalize(torch.randn(1000, 8), dim=-1)
    for rows in (1, 64, 500):
        assert torch.equal(vq.nearest_code(z, codebook, rows), (z @ codebook.T).argmax(-1))


def test_straight_through_gradient():
    model = vq.VQModel(TINY)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, _, vq_loss = model(x)
    torch.nn.functional.mse_loss(recon, x).backward(retain_graph=True)
    # the reconstruction loss reaches the encoder although argmax has no gradient...
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    # ...but not the codebook: only the codebook loss moves it
    assert model.quantize.embedding.weight.grad is None or model.quantize.embedding.weight.grad.abs().sum() == 0
    vq_loss.backward()
    assert model.quantize.embedding.weight.grad.abs().sum() > 0


def test_state_dict_is_llamagens():
    """Key names and shapes recorded from LlamaGen's own vq_model.py (VQ_16 and VQ_8, built on meta)."""
    facts = json.loads((Path(__file__).parent / "llamagen_vq_keys.json").read_text())
    for name in ("llamagen-vq16", "llamagen-vq8"):
        with torch.device("meta"):
            model = vq.VQModel(vq.PRESETS[name])
        ours = {k: list(v.shape) for k, v in model.state_dict().items()}
        assert ours == {k: v for k, v in facts[name].items() if k != "quantize.codebook_used"}


def test_convert_llamagen_checkpoint(tmp_path):
    cfg = vq.VQConfig(image_size=32, codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=2, z_channels=64)
    src = vq.VQModel(cfg).eval()
    sd = dict(src.state_dict(), **{"quantize.codebook_used": torch.zeros(65536)})  # as LlamaGen saves it
    torch.save({"model": sd, "steps": 1000}, tmp_path / "vq.pt")
    r = subprocess.run([sys.executable, str(ROOT / "vq.py"), "convert-llamagen", str(tmp_path / "vq.pt"),
                        str(tmp_path / "out"), "--image-size", "32"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    loaded = vq.load_vq(tmp_path / "out")
    assert loaded.config == cfg  # architecture read back from the tensor shapes
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(src.encode(x)[1], loaded.encode(x)[1])
        assert torch.equal(src(x)[0], loaded(x)[0])
    torch.save({"model": {"something": torch.zeros(3)}}, tmp_path / "bad.pt")
    r = subprocess.run([sys.executable, str(ROOT / "vq.py"), "convert-llamagen", str(tmp_path / "bad.pt"), str(tmp_path / "o2")],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "does not look like a LlamaGen VQ state dict" in r.stderr and r.stderr.count("\n") == 1


def test_decode_checks_its_codes(tmp_path):
    vq.save_vq(vq.VQModel(TINY), tmp_path / "v")  # 16 px, 8 x 8 codes of 16
    vq.save_vq(vq.VQModel(vq.VQConfig(**{**asdict(TINY), "hue_bins": 12})), tmp_path / "hue")  # + 13 colour tokens
    for model, good in (("v", {"codes": [[1, 2, 3, 4] * 2] * 8}), ("hue", {"codes": [20] + [1, 2, 3, 4] * 16})):
        (tmp_path / "c.jsonl").write_text(json.dumps(good) + "\n")
        vq.main(["decode", "--vq", str(tmp_path / model), "--codes", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "x.png")])
        assert Image.open(tmp_path / "x.png").size[0] == 256  # shown at viewing size
    for model, bad, words in [("v", {"codes": [[1, 2, 3, 4]] * 4}, "expected 64 integers: 8 x 8 codes in 0..15"),
                              ("v", {"codes": [[0.5] * 8] * 8}, "64 integers"), ("v", {"codes": [[1, 2, 3], [4]]}, "with \"codes\""),
                              ("v", {"codes": [[99] * 8] * 8}, "in 0..15"), ("v", {"code": []}, "with \"codes\""),
                              ("hue", {"codes": [1] * 65}, "a colour token in 16..28, then 8 x 8 codes"),
                              ("hue", {"codes": [20] + [17] * 64}, "codes in 0..15"), ("hue", {"codes": [20] * 64}, "65 integers")]:
        (tmp_path / "c.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(BadInput, match=words):
            vq.main(["decode", "--vq", str(tmp_path / model), "--codes", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "y.png")])
    assert not (tmp_path / "y.png").exists()


def test_damaged_checkpoint_is_refused(tmp_path):
    vq.save_vq(vq.VQModel(TINY), tmp_path / "v")
    f = tmp_path / "v" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(BadInput, match="damaged checkpoint file"):
        vq.load_vq(tmp_path / "v")


def colour_dataset(path, n=12):
    """Coloured squares on white, captioned by colour: a tiny folder dataset."""
    path.mkdir()
    colours = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 210, 30)}
    lines = []
    for i in range(n):
        name = list(colours)[i % 4]
        im = Image.new("RGB", (16, 16), "white")
        im.paste(colours[name], (2 + i % 5, 3, 10 + i % 5, 12))
        im.save(path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"{name} square {i}", "split": "val" if i == 0 else "train"}))
    (path / "captions.jsonl").write_text("\n".join(lines))
    return path


def test_training_resumes_exactly(tmp_path, monkeypatch):
    data = colour_dataset(tmp_path / "data")
    tc = vq.TrainConfig(steps=6, batch_size=4, lr=1e-3, warmup=2, restart_every=2, save_every=3, eval_every=3)
    straight = vq.train(data, tmp_path / "a", tc, vq_config=TINY, device="cpu")

    real_save = vq.save_training

    def crash_after_first_save(*a, **k):  # the machine dies right after the step-3 checkpoint
        real_save(*a, **k)
        raise KeyboardInterrupt
    monkeypatch.setattr(vq, "save_training", crash_after_first_save)
    with pytest.raises(KeyboardInterrupt):
        vq.train(data, tmp_path / "b", tc, vq_config=TINY, device="cpu")
    monkeypatch.setattr(vq, "save_training", real_save)
    assert json.loads((tmp_path / "b" / "train_state.json").read_text())["step"] == 3
    resumed = vq.train(data, tmp_path / "b", tc, resume=True, device="cpu")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    result = vq.evaluate(resumed, data, grid=tmp_path / "grid.png")
    assert 0 < result["codebook_usage"] <= 1 and 1 <= result["code_perplexity"] <= 16 and result["held_out"] == 1
    # the run logged the held-out figures every eval_every steps, across the crash; the last ones are eval's
    logged = [e for e in json.loads((tmp_path / "b" / "train_state.json").read_text())["log"] if "psnr_val" in e]
    assert [e["step"] for e in logged] == [3, 6] and logged[0]["psnr_val"] != logged[1]["psnr_val"]
    assert logged[1]["psnr_val"] == pytest.approx(result["psnr_val"], rel=1e-5) and logged[1]["hue_match_val"] == result["hue_match_val"]
    assert 0 < result["white_cells"] < 1 and 1 <= result["white_codes"] <= 16  # the squares are drawn on white
    assert 0 <= result["white_code_entropy"] <= math.log(result["white_codes"]) + 1e-6
    width, height = Image.open(tmp_path / "grid.png").size  # one held-out original over its reconstruction,
    assert width == 96 and 2 * 96 < height < 2 * 140  # each enlarged to 96 px under its label


def test_convert_llamagen_refuses_what_is_not_a_plain_state_dict(tmp_path):
    import argparse
    cases = {"list.pt": ([torch.ones(2)], "found a list"), "objects.pt": ({"model": argparse.Namespace(a=1)}, "Python objects"),
             "other.pt": ({"model": {"w": torch.ones(2)}}, "does not look like a LlamaGen VQ")}
    for name, (obj, words) in cases.items():
        torch.save(obj, tmp_path / name)
    (tmp_path / "text.pt").write_text("hello")
    cases |= {"text.pt": (None, "not a torch.save file"), "missing.pt": (None, "no such file")}
    for name, (_, words) in cases.items():
        with pytest.raises(BadInput, match=words):
            vq.main(["convert-llamagen", str(tmp_path / name), str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_background_code_and_a_decoder_fine_tune(tmp_path):
    """--background: every plain-white cell is one code; --decoder-of: only the decoder learns, so the encoder,
    the codebook and with them every other cell's code stay exactly the trained VQ's."""
    data = colour_dataset(tmp_path / "data")
    tc = vq.TrainConfig(steps=3, batch_size=4, warmup=1, save_every=3, eval_every=3, restart_every=2)
    base = vq.train(data, tmp_path / "a", tc, vq_config=TINY, device="cpu")
    tuned = vq.train(data, tmp_path / "b", vq.TrainConfig(**{**asdict(tc), "background": True, "decoder_of": str(tmp_path / "a")}),
                     device="cpu")
    b = tuned.config.background_code
    white = torch.ones(1, 3, 16, 16)
    assert b == base.encode(white)[1][0, TINY.grid // 2, TINY.grid // 2]  # what the encoder calls the middle of white
    images = torch.ones(3, 3, 16, 16)
    images[:, :, 4:12, 4:12] = torch.tensor([[1.0, -1, -1], [-1, 1, -1], [-1, -1, 1]])[:, :, None, None]
    codes, plain = tuned.encode(images)[1], vq.white_cells(images, TINY.grid)
    assert plain.any() and not plain.all() and (codes[plain] == b).all()
    assert torch.equal(codes[~plain], base.encode(images)[1][~plain])  # the rest: the trained VQ's codes
    for name, p in tuned.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.", "quantize.")):
            assert torch.equal(p, base.state_dict()[name]), name
    assert not torch.equal(tuned.decoder.conv_out.weight, base.decoder.conv_out.weight)
    assert vq.load_vq(tmp_path / "b").config.background_code == b  # the rule travels with the model
    result = vq.evaluate(tuned, data)
    assert result["white_codes"] == 1 and result["white_code_entropy"] == 0
