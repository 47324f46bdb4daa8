"""The other direction (#53): pictures described. The examples (data.make_describe_batch), C1 with text after a
picture (every word runs the frozen base; the adapter learns only through the picture's positions), a run that draws
and describes, and sample.py --describe with its mistakes."""
import base64
import contextlib
import json
import re
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ROOT, with_random_adapter
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

import analyze
import data
import pipeline
import sample
import serve
import train
from hf import load_tokenizer
from mmmoe import BadInput


class StandIn:
    """What make_describe_batch asks of a model: V = 100 text tokens, K = 20 image codes, <boi> 120, <eoi> 121."""
    start_token, config = 0, SimpleNamespace(eos_token_id=1)

    def image_token(self, which):
        return {"boi": 120, "eoi": 121}[which] if isinstance(which, str) else which + 100


def test_a_picture_is_described_by_its_fullest_phrasing():
    examples = [{"image": "a.png", "caption": c, "copy": k} for k in (0, 1)
                for c in ("bicycle", "a bicycle", "an emoji of a bicycle", "a red bicycle")]
    examples += [{"image": "b.png", "caption": c} for c in ("blue heart", "a blue heart", "an emoji of a blue heart")]
    examples += [{"image": "c.png", "caption": "a purple pear"}]
    captions = [examples[i]["caption"] for i in data.describing(examples)]
    assert captions == ["a red bicycle"] * 8 + ["a blue heart"] * 3 + ["a purple pear"]
    assert list(data.describing(examples)[:8]) == [3] * 4 + [7] * 4  # the same augmented copy's own example


def test_make_describe_batch_layout_and_targets():
    """<bos> <boi> codes <eoi> words <eos>: the targets are the words and <eos>, each from the position before."""
    pictures = {0: (np.array([5, 6]), np.array([1, 2, 3])), 1: (np.array([7, 8, 9]), np.array([4, 4, 4]))}

    class Shards:  # example 0's picture is described by example 1's words
        describing = [1, 1]

        def __getitem__(self, i):  # -> (caption ids, codes)
            return pictures[i]
    idx, targets, pad = data.make_describe_batch(Shards(), [0, 1], StandIn())
    assert idx.tolist() == [[0, 120, 101, 102, 103, 121, 7, 8, 9, 1], [0, 120, 104, 104, 104, 121, 7, 8, 9, 1]]
    assert targets[0].tolist() == [-1] * 5 + [7, 8, 9, 1, -1] and pad.tolist() == [0, 0]


def test_half_of_the_pictures_described_are_a_question_in_the_chat_format():
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(
        ["<unk>", "<s>", "</s>", "user:", "What", "colour", "is", "it?", "this?", "in", "the", "picture?", "Red.", "A",
         "a", "red", "bicycle", "bicycle."])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    class Shards:
        describing, captions = [0] * 6, ["a red bicycle"] * 6

        def __getitem__(self, i):  # the caption's ids: "a red bicycle"
            return np.array([14, 15, 16]), np.array([i, i])
    def around(question):  # the chat format's ids before and after a picture
        return tok.encode("user:").ids, tok.encode(f"{question} </s>").ids
    idx, targets, pad = data.make_describe_batch(Shards(), [0, 3, 4, 5], StandIn(), (tok, around), [0, 3, 4, 5])
    rows = [r[p:].tolist() for r, p in zip(idx, pad)]
    assert rows[0] == [0, 120, 100, 100, 121, 14, 15, 16, 1]  # plain: <bos> picture words <eos>
    assert rows[1] == [3, 120, 103, 103, 121, 4, 6, 9, 10, 11, 2, 13, 15, 17, 1]  # user: picture What is in the
    # picture? </s> A red bicycle. <eos>
    assert rows[2][5:8] == [4, 6, 8]  # What is this?
    assert rows[3] == [3, 120, 105, 105, 121, 4, 5, 6, 7, 2, 12, 1]  # ... What colour is it? </s> Red.
    assert targets[3, -3:].tolist() == [12, 1, -1] and (targets[3, :-3] == -1).all()  # the answer and <eos>
    assert [data.asked("a red bicycle", way) is None for way in range(6)] == [True] * 3 + [False] * 3  # half the ways
    assert data.asked("a blue heart", 5) == ("What colour is it?", "Blue.")
    assert data.asked("a keycap #", 5) == ("What is in the picture?", "A keycap #.")  # no colour word: what it is
    assert data.asked("a black and white flag", 5)[0] == "What is in the picture?"  # two: not a colour question
    # a base without SmolLM2's chat format (ChatML: no <|im_start|>, as Mixtral's) is never asked: plain words only
    assert train.asking(StandIn(), tok) is None
    with pytest.raises(BadInput, match=re.escape("no <|im_start|>")):
        pipeline.around_a_picture(StandIn(), tok, "What colour is it?")
    assert pipeline.around_a_picture(StandIn(), tok) == ([0], [])
    chat = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "<|im_start|>", "<|im_end|>"])}, "<unk>"))
    chat.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    before, after = pipeline.around_a_picture(StandIn(), chat, " What colour is it? ")  # SmolLM2's: the picture
    assert before[0] == 1 and before.count(2) == 1 and after.count(2) == 1 and after[-2:] == [1, 0]  # in the user's turn


def test_a_picture_is_asked_every_way_over_the_epochs(monkeypatch):
    """A recoloured copy is one example: the way it is asked (data.asked) turns with the step (an example that came at
    six consecutive steps would be asked all six ways); the held-out batch asks every way in turn."""
    seen = []
    monkeypatch.setattr(train, "make_describe_batch", lambda shards, indices, model, chat, ways: seen.append(list(ways)))
    monkeypatch.setattr(train, "asking", lambda model, tokenizer: None)
    for step in range(6):
        train.batch_maker("describe", None, np.array([7, 7]), None, None, None, None, None, step)(slice(0, 1))
    assert sorted(w for ways in seen for w in ways) == list(range(6))
    seen.clear()
    tc = train.TrainConfig(batch_size=4, grad_accum=3, describe=0.5)
    train.held_out_batches(np.arange(100), None, None, tc, None, None)
    assert sum(seen, []) == [0, 1, 2, 3, 4, 5] * 2


def test_the_words_after_a_picture_run_the_frozen_base(tiny_ckpt):
    """C1 in the other direction: with the picture's keys and values cached (computed with the adapter), the words
    after it give the same logits, torch.equal, with the adapter switched off: no text position computes with an
    adapter weight. Training's whole-sequence forward computes the same (to float rounding), and its loss on the words
    reaches the adapter through the picture's positions: the LoRA and the image rows of the tokens in the picture."""
    path, cfg, _ = tiny_ckpt()
    model, V = with_random_adapter(path), cfg["vocab_size"]
    g = torch.Generator().manual_seed(1)
    codes, words = torch.randint(0, 12, (2, 9), generator=g), torch.randint(3, V, (2, 6), generator=g)
    prefix = torch.cat([torch.tensor([[model.start_token, model.image_token("boi")]] * 2), model.image_token(codes),
                        torch.full((2, 1), model.image_token("eoi"))], 1)  # (2, 12)
    T = prefix.shape[1]

    def words_after_the_picture(adapter):
        model.setup_caches(2, T + words.shape[1])
        with torch.no_grad():
            model.hidden_states(prefix, torch.arange(T))  # the picture, with the adapter, into the cache
            with (model.adapter_off() if not adapter else torch.no_grad()):
                out = model.logits(model.hidden_states(words, torch.arange(T, T + words.shape[1])))
        model.clear_caches()
        return out[..., :V]
    cached = words_after_the_picture(adapter=True)
    assert torch.equal(cached, words_after_the_picture(adapter=False))
    seq = torch.cat([prefix, words], 1)
    whole = model(seq)[0][:, T:, :V]
    assert (whole - cached).abs().max() <= 1e-4 * cached.abs().max()
    targets = torch.cat([torch.full((2, T - 1), -1), words, torch.full((2, 1), -1)], 1)  # <eoi> predicts word 1
    model(seq, targets)[1].backward()
    lora = [p.grad for n, p in model.named_parameters() if "lora" in n]
    assert all(g is not None for g in lora) and sum(g.abs().sum() for g in lora) > 0
    used = torch.zeros(18, dtype=torch.bool)
    used[codes.flatten()], used[16:] = True, True  # the codes in the picture, <boi> and <eoi>
    row_grad = model.image_embed.grad.abs().sum(1)
    assert (row_grad[used] > 0).all() and (row_grad[~used] == 0).all()


def test_a_run_that_draws_and_describes(tiny_setup, tmp_path):
    """describe=0.5: about half of the steps are pictures described, whole batches; the held-out describe loss is
    logged; sample.py --describe reads a picture file, one line, and --ask is refused in one line (the tiny base has no
    chat format); the text alone stays the base's (C1)."""
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(tmp_path / "run"),
                           rank=4, batch_size=4, steps=4, warmup=1, eval_every=2, eval_batches=1, save_every=2, lr=1e-2,
                           init="mean", dtype="float32", describe=0.5)
    kinds = [train.step_kind(tc, step) for step in range(40)]
    assert set(kinds) == {"describe", "pictures"} and 10 <= kinds.count("describe") <= 30
    mixed = train.TrainConfig(**{**tc.__dict__, "scenes": 0.3, "describe": 0.3})
    kinds = [train.step_kind(mixed, step) for step in range(100)]
    assert set(kinds) == {"scenes", "describe", "pictures"}
    assert [k == "scenes" for k in kinds] == [train.step_kind(mixed.__class__(**{**mixed.__dict__, "describe": 0}), s)
                                               == "scenes" for s in range(100)]  # describe leaves the scene steps
    train.train(tc)
    log = json.loads((tmp_path / "run" / "state.json").read_text())["log"]
    losses = [r["val_describe_loss"] for r in log if "val_describe_loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    picture, other = tmp_path / "square.png", tmp_path / "other.jpg"
    Image.open(tiny_setup["tmp"] / "squares" / "5.png").save(picture)
    Image.open(tiny_setup["tmp"] / "squares" / "14.png").save(other)
    read = [sys.executable, str(ROOT / "sample.py"), "--ckpt", str(tmp_path / "run"), "--dtype", "float32", "--describe"]
    r = subprocess.run(read + [str(picture), str(other)], capture_output=True, text=True, timeout=300)
    lines = r.stdout.splitlines()
    assert r.returncode == 0 and [line.split(": ")[0] for line in lines] == [str(picture), str(other)], r.stderr
    alone = subprocess.run(read + [str(picture), str(other), "--batch", "1"], capture_output=True, text=True, timeout=300)
    assert alone.stdout.splitlines() == lines  # read together as each alone
    # the tiny base's tokenizer has no chat format: a question is refused in one line (the chat format's layout:
    # test_half_of_the_pictures_described_are_a_question_in_the_chat_format)
    asked = subprocess.run(read + [str(picture), "--ask", "w10 w11"], capture_output=True, text=True, timeout=300)
    assert asked.returncode == 1 and asked.stderr.startswith("error: questions about a picture"), asked.stderr
    explorer, sent = serve.Explorer(tmp_path / "run"), []  # the page: a picture dropped on it, each drawing read back
    image = base64.b64encode(picture.read_bytes()).decode()
    assert explorer.describe({"image": image, "question": ""})["words"] == lines[0].split(": ", 1)[1]
    with pytest.raises(BadInput, match="chat format"):
        explorer.describe({"image": image, "question": "w10 w11"})
    for bad, words in [("not base64!", "base64"), (base64.b64encode(b"some text").decode(), "not a picture")]:
        with pytest.raises(serve.Refused, match=words):
            explorer.describe({"image": bad, "question": ""})
    explorer.draw({"prompt": "w10 w20", "n": 2, "guidance": 1.5, "temperature": 1.0, "seed": 0}, sent.append)
    assert len(sent[-1]["described"]) == 2 and all(isinstance(w, str) for w in sent[-1]["described"])
    report = analyze.analyze(tmp_path / "run", tmp_path / "report", n_probe=4, describe=3)["describe"]
    assert len(report["train"]["words"]) == 3 and len(report["pairs"]["words"]) == len(report["round trip"]["words"]) == 2
    assert report["pairs"]["names"] == ["w12 w20", "w13 w21"]  # squares 0 and 1 are recoloured copies of 6 and 7
    assert report["pairs"]["colours"] == ["red", "green"]
    assert all(0 <= report[g][k] <= 1 for g in ("train", "pairs", "round trip") for k in ("object", "colour", "both"))
    assert 0 <= report["pairs"]["tokens_colour"] <= 1  # both held-out pairs have a colour word
    assert "## Pictures described" in (tmp_path / "report" / "report.md").read_text()
    for group, n in [("train", 3), ("pairs", 2), ("round_trip", 2)]:  # each picture under its words, 128 px wide
        assert Image.open(tmp_path / "report" / f"described_{group}.png").width == 128 * n
    plain = train.TrainConfig(**{**tc.__dict__, "out_dir": str(tmp_path / "plain"), "describe": 0.0, "steps": 1,
                                 "eval_every": 1, "save_every": 1})
    train.train(plain)
    with pytest.raises(BadInput, match="was not trained to describe"):  # said before any work
        analyze.analyze(tmp_path / "plain", tmp_path / "r2", describe=2)


def test_the_colour_kept_by_the_tokens_counts_pictures_with_a_colour_word():
    red, green = -torch.ones(3, 8, 8), -torch.ones(3, 8, 8)  # black, then one channel full: pure red, pure green
    red[0], green[1] = 1, 1
    lossless = SimpleNamespace(tokenize=lambda x: x, detokenize=lambda t: t)  # the decoded tokens: the picture
    pictures = torch.stack([red, green, green])
    assert analyze.kept_colour(lossless, pictures, ["red", "blue", None]) == 0.5  # the green one has no colour word
    none = analyze.kept_colour(lossless, pictures, [None, None, None])
    assert none != none  # NaN: no picture with a colour word to count


def test_named_counts_the_object_and_the_only_colour_word():
    words = ["a red bicycle", "a red and blue bicycle", "a bicycles", "a blue heart.", "a bicycle", "a hot dog"]
    out = analyze.named(words, ["bicycle", "bicycle", "bicycle", "blue heart", "bicycle", "dog"],
                        ["red", "red", "red", None, "green", None])
    assert out["object"] == 3 / 6  # "bicycles" is not "bicycle", nor "red and blue bicycle", nor "hot dog" "dog"
    assert out["colour"] == 1 / 4  # two colours named is not the colour; the multicoloured heart has none to name
    assert out["both"] == 2 / 6  # the object, and its colour where it has one


@pytest.mark.parametrize("args,words", [
    (["--describe", "FOLDER"], "a folder, not a picture"), (["--describe", "MISSING"], "no such file"),
    (["--describe", "TEXT"], "not a picture this can read"), (["--ask", "what is it?"], "--ask goes with --describe"),
    (["w1", "--describe", "TEXT"], "not both"), (["--describe", "TEXT", "--ask", " "], "an empty question")])
def test_describe_mistakes_are_one_line_before_any_work(tmp_path, args, words):
    (tmp_path / "notes.txt").write_text("not a picture")
    (tmp_path / "folder").mkdir()
    where = {"FOLDER": tmp_path / "folder", "MISSING": tmp_path / "missing.png", "TEXT": tmp_path / "notes.txt"}
    with pytest.raises(BadInput, match=words):  # the checkpoint does not exist: nothing was loaded first
        sample.main([str(where.get(a, a)) for a in args] + ["--ckpt", str(tmp_path / "nowhere")])


def test_held_out_losses_are_the_same_whatever_the_micro_batch(tiny_setup):
    """A global batch of 4 as one micro-batch or as two of 2: the same held-out examples, the same losses."""
    model = with_random_adapter(tiny_setup["base"])
    tokenizer = load_tokenizer(tiny_setup["base"])
    val, shards = data.TokenShards(tiny_setup["shards"], "val"), data.TokenShards(tiny_setup["shards"], "train")
    whole = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), batch_size=4,
                              eval_batches=2, describe=0.5)
    halves = train.TrainConfig(**{**whole.__dict__, "batch_size": 2, "grad_accum": 2})
    text = data.english_text(tokenizer, 512)
    losses = [train.evaluate(model, tc, val, text, torch.device("cpu"), contextlib.nullcontext(),
                             train.held_out_batches(val, shards, None, tc, tokenizer, model)) for tc in (whole, halves)]
    assert set(losses[0]) == {"val_image_loss", "text_ppl", "val_describe_loss"}
    assert all(losses[1][k] == pytest.approx(v, rel=1e-5) for k, v in losses[0].items())
