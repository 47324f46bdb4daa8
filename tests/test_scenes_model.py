"""Scenes (#52): a 2 x 2 canvas of tiles, each <empty> or a picture, drawn under the decoding rule; the adapter's two
scene rows, added to a run without them; the canvas in pixels and in sample.py's output."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from conftest import make_tiny_setup
from mmmoe import MMMoE, AdapterConfig, ImageRule, scene_tiles
from pictures import canvas, to_pil

K, COLOURS, N = 16, 4, 9  # image codes (the last 4 colours), tokens a picture: a colour then 8 codes
SCENE, EMPTY = K + 2, K + 3


def parse(row, n=N):
    """An independent reading of one drawn row (1 + 4 n,) -> None (a single picture) or the 4 tiles (None: empty),
    asserting the grammar: a picture is a colour, then n - 1 codes; a scene <scene> then 4 tiles; then -1 alone."""
    row = row.tolist()
    colour, code = range(K - COLOURS, K), range(K - COLOURS)

    def picture(i):
        assert row[i] in colour and all(t in code for t in row[i + 1:i + n]), row
        return i + n
    if row[0] != SCENE:
        end, tiles = picture(0), None
    else:
        end, tiles = 1, []
        for _ in range(4):
            tiles.append(None if row[end] == EMPTY else row[end:end + n])
            end = end + 1 if row[end] == EMPTY else picture(end)
    assert all(t == -1 for t in row[end:]), row
    return tiles


def scene_model(tiny_ckpt, seed=0, head_scale=1.0):
    """A tiny base with a random adapter that has scene tokens."""
    model = MMMoE.from_pretrained(tiny_ckpt(max_pos=512)[0], dtype=torch.float32)
    model.add_image_adapter(AdapterConfig(n_image_codes=K, colour_tokens=COLOURS, rank=4, scene_tokens=True))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if model.is_adapter_param(name):
                p.copy_(torch.randn(p.shape, generator=g) * (head_scale if name == "image_head" else 0.3))
    return model


def steer(model, scene, empty, shift=30.0):
    """Logits steered: the final hidden states get +shift in their first dimension, which the image rows read
    nowhere but in <scene>'s and <empty>'s: their logits are about scene and empty, every other's about 0."""
    k = model.adapter.n_image_codes
    with torch.no_grad():
        model.image_head[:, 0] = 0
        model.image_head[:, 1:] *= 0.01
        model.image_head[k + 2, 0], model.image_head[k + 3, 0] = scene / shift, empty / shift
    shifted = torch.zeros(model.config.dim)
    shifted[0] = shift
    return model.model.norm.register_forward_hook(lambda module, args, out: out + shifted)


CAPTIONS = [[10, 20], [11, 21, 30, 31, 40], [12], [13, 23], [14, 24, 34], [15]]


def test_every_drawn_row_obeys_the_grammar(tiny_ckpt):
    """Sampled freely, every row is a single picture or a scene whose tiles are pictures or empty, then -1; rows of
    one batch take different paths; scene_tiles reads each row as the grammar does."""
    model = scene_model(tiny_ckpt)
    steer(model, scene=np.log(COLOURS), empty=np.log(COLOURS))  # even odds: single or scene, picture or empty
    kinds = set()
    for seed, guidance in [(0, 0.0), (1, 1.5), (2, 0.0)]:
        rows = model.generate_image(CAPTIONS * 2, N, guidance=guidance, temperature=1.0, top_k=None,
                                    generator=torch.Generator().manual_seed(seed))
        assert rows.shape == (12, 1 + 4 * N)
        for row in rows:
            tiles = parse(row)
            got = scene_tiles(row, N, K)
            assert (got is None) == (tiles is None)
            if tiles is not None:
                assert [t if t is None else t.tolist() for t in got] == tiles
            kinds.add("single" if tiles is None else sum(t is None for t in tiles))
    assert {"single", 1, 2, 3} <= kinds  # singles, and scenes with 1, 2 and 3 empty tiles


def test_steered_logits_draw_scenes_with_empty_tiles_and_two_objects_cost_about_two_pictures(tiny_ckpt):
    """<scene> and <empty> made likely: scenes of empty tiles (5 tokens, then -1). A scene of two pictures costs
    1 + 2 + 2 n tokens: within 2.2 times a single picture's n for the real VQ's n (65) and the tiny one's (64)."""
    model = scene_model(tiny_ckpt)
    steer(model, scene=20.0, empty=20.0)
    rows = model.generate_image(CAPTIONS, N, guidance=1.5, temperature=0)
    assert (rows[:, :5] == torch.tensor([SCENE] + [EMPTY] * 4)).all() and (rows[:, 5:] == -1).all()
    n = 64
    model = scene_model(tiny_ckpt)
    steer(model, scene=20.0, empty=np.log(COLOURS))
    rows = model.generate_image(CAPTIONS * 2, n, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(0))
    two = [row for row in rows if sum(t is not None for t in parse(row, n)) == 2]
    assert two and all(int((row >= 0).sum()) == 3 + 2 * n <= 2.2 * n for row in two)


def test_prompts_drawn_together_equal_each_drawn_alone(tiny_ckpt):
    """Greedy, with and without guidance: a batch whose rows take different paths (single pictures, scenes with
    different tiles empty) draws each prompt's own tokens."""
    model = scene_model(tiny_ckpt, seed=3)  # not steered: each row's own hidden states decide
    for guidance in (0.0, 1.5):
        together = model.generate_image(CAPTIONS, N, guidance=guidance, temperature=0)
        alone = torch.cat([model.generate_image([c], N, guidance=guidance, temperature=0) for c in CAPTIONS])
        assert torch.equal(together, alone)
        kinds = [parse(row) for row in together]
        assert None in kinds and any(k is not None for k in kinds), together  # the paths differ


def test_the_grammar_state_machine_by_hand():
    """ImageRule: what it allows at each step of a scene of a picture and three empty tiles, then of a single."""
    rule = ImageRule(AdapterConfig(n_image_codes=K, colour_tokens=COLOURS, scene_tokens=True), 3, 2, "cpu")
    colour, code = set(range(K - COLOURS, K)), set(range(K - COLOURS))

    def allowed(row):
        return set(rule.allowed()[row].nonzero()[:, 0].tolist())
    assert allowed(0) == allowed(1) == colour | {SCENE}
    for tokens, row0, row1 in [((SCENE, 12), colour | {EMPTY}, code), ((12, 0), code, code),
                               ((1, 1), code, {K + 1}), ((2, K + 1), colour | {EMPTY}, {K + 1}),
                               ((EMPTY, K + 1), colour | {EMPTY}, {K + 1}), ((EMPTY, K + 1), colour | {EMPTY}, {K + 1}),
                               ((EMPTY, K + 1), {K + 1}, {K + 1})]:
        assert not rule.done.all()
        rule.take(torch.tensor(tokens))
        assert (allowed(0), allowed(1)) == (row0, row1), tokens
    assert rule.done.all()


def test_add_scene_tokens_keeps_every_row_and_the_old_tokens_outputs(tiny_ckpt, tmp_path):
    """A single-picture adapter given scene tokens: every old image row as it was, the two new ones <boi>'s, the
    logits over an old sequence the same (bit for bit, the new columns added); saved and loaded, it stays so."""
    model = scene_model(tiny_ckpt)
    path = tiny_ckpt(max_pos=512)[0]
    old = MMMoE.from_pretrained(path, dtype=torch.float32)
    old.add_image_adapter(AdapterConfig(n_image_codes=K, colour_tokens=COLOURS, rank=4))
    with torch.no_grad():
        for (name, p), (_, q) in zip(old.named_parameters(), model.named_parameters()):
            p.copy_(q[:len(p)])  # the random adapter's weights, without its scene rows
    V = old.config.vocab_size
    idx = torch.tensor([[0, 10, 20, V + K, V + 13, V + 1, V + 2]])
    with torch.no_grad():
        before = old(idx)[0]
    embed, head = old.image_embed.detach().clone(), old.image_head.detach().clone()
    old.add_scene_tokens()
    assert old.adapter.scene_tokens and old.image_token("scene") == V + SCENE and old.image_token("empty") == V + EMPTY
    assert torch.equal(old.image_embed[:K + 2], embed) and torch.equal(old.image_head[:K + 2], head)
    assert torch.equal(old.image_embed[K + 2:], embed[[K, K]]) and torch.equal(old.image_head[K + 2:], head[[K, K]])
    assert old.image_embed.requires_grad and old.image_head.requires_grad
    with torch.no_grad():
        after = old(idx)[0]
    assert after.shape[-1] == before.shape[-1] + 2 and torch.equal(after[..., :-2], before)
    old.save_adapter(tmp_path, {"step": 1})
    again = MMMoE.from_pretrained(path, dtype=torch.float32)
    again.load_adapter(tmp_path)
    assert again.adapter.scene_tokens and torch.equal(again.image_head, old.image_head)
    with pytest.raises(Exception, match="scene tokens already"):
        again.add_scene_tokens()


def test_text_logits_are_the_base_s_with_scene_tokens(tiny_ckpt):
    """C1 with scene tokens: over <bos> caption <boi> <scene> <empty> colour codes ..., the text positions' text
    logits equal the base's alone, bit for bit."""
    model = scene_model(tiny_ckpt)
    V = model.config.vocab_size
    image = [V + K, V + SCENE, V + EMPTY, V + 13, V + 1, V + 2, V + EMPTY, V + EMPTY, V + K + 1]
    idx = torch.tensor([[0, 10, 20, 30] + image, [0, 11, 21, 31] + image])
    with torch.no_grad():
        logits = model(idx)[0]
        with model.adapter_off():
            base = model(idx[:, :4])[0]
    assert logits.shape[-1] == V + K + 4 and torch.equal(logits[:, :4, :V], base)


def test_the_canvas_puts_each_tile_in_its_place_and_empty_tiles_white():
    tiles = [torch.full((3, 4, 5), v) for v in (-1.0, 0.0, 0.25, 0.5)]
    tiles[1] = None
    c = canvas(tiles, 4, 5)
    assert c.shape == (3, 8, 10)
    assert (c[:, :4, :5] == -1).all() and (c[:, :4, 5:] == 1).all()  # top-left; top-right empty: white
    assert (c[:, 4:, :5] == 0.25).all() and (c[:, 4:, 5:] == 0.5).all()  # bottom-left, bottom-right


@pytest.fixture
def scene_run(tmp_path, tiny_ckpt):
    """The tiny trained run of tests/test_sample.py (on a base with room for a scene of its VQ's 64-token pictures),
    warm-started for scenes: add_scene_tokens, saved as the run's adapter."""
    setup = make_tiny_setup(tmp_path, tiny_ckpt(max_pos=512)[0])
    run = tmp_path / "run"
    train.train(train.TrainConfig(base=str(setup["base"]), shards=str(setup["shards"]), out_dir=str(run), rank=4,
                                  batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=2,
                                  init="mean"))
    model, _, _ = sample.load_pipeline(run)
    model.add_scene_tokens().save_adapter(run, json.loads((run / "state.json").read_text()))
    return run


def drawn_by(monkeypatch, change):
    """sample.py's pipeline with its model changed by change(model) (steered, or its drawing replaced) -> the list of
    the token rows it draws, filled as it draws."""
    load, drawn = sample.load_pipeline, []

    def loaded(*args, **kw):
        model, tokenizer, vq = load(*args, **kw)
        change(model)
        generate_image = model.generate_image
        model.generate_image = lambda *a, **k: drawn.append(generate_image(*a, **k)) or drawn[-1]
        return model, tokenizer, vq
    monkeypatch.setattr(sample, "load_pipeline", loaded)
    return drawn


def cell_of(picture, size):
    return np.asarray(to_pil(picture).resize((size, size), Image.NEAREST)).astype(int)


def test_sample_writes_a_scene_s_canvas_and_a_single_picture_beside_it(scene_run, tmp_path, monkeypatch):
    """A grid of a scene (its tokens given) and a single picture: the scene's cell is its canvas, each tile in its
    quadrant (an empty one white), and the single picture fills its cell."""
    _, _, vq = sample.load_pipeline(scene_run)
    n, k = vq.config.n_tokens, 16
    a, b, single = (torch.arange(i, n + i) * i % k for i in (1, 3, 5))  # three pictures' codes
    scene = torch.cat([torch.tensor([k + 2, k + 3]), a, torch.tensor([k + 3]), b, torch.full((2 * n - 2,), -1)])
    rows = torch.stack([scene, torch.cat([single, torch.full((3 * n + 1,), -1)])])  # tiles: empty, a, empty, b

    def given(model):
        model.generate_image = lambda captions, *args: rows
    drawn_by(monkeypatch, given)
    sample.main(["w10 w20", "w11 w21", "--cols", "2", "--size", "64", "--ckpt", str(scene_run), "--out",
                 str(tmp_path / "g.png")])
    im = np.asarray(Image.open(tmp_path / "g.png").convert("RGB")).astype(int)
    band = im.shape[0] - 64
    assert im.shape[1] == 128 and 0 < band < 64
    a, b, one = (cell_of(p, s) for p, s in zip(vq.detokenize(torch.stack([a, b, single])), (32, 32, 64)))
    cell = im[band:, :64]
    assert (cell[:32, :32] == 255).all() and (cell[32:, :32] == 255).all()  # tiles 0 and 2 empty: white
    assert np.array_equal(cell[:32, 32:], a) and np.array_equal(cell[32:, 32:], b)  # tiles 1 and 3
    assert np.array_equal(im[band:, 64:], one)  # the single picture, its whole cell


def test_a_prompt_file_draws_steered_scenes_each_to_its_file(scene_run, tmp_path, monkeypatch):
    """--from-file with the run steered to scenes (tiles about as often empty as not): each file is its scene's
    canvas at --size, drawn by the model itself; a tile empty in the tokens is white in the file, any other is the
    VQ's picture of it."""
    drawn = drawn_by(monkeypatch, lambda model: steer(model, scene=20.0, empty=np.log(16)))
    (tmp_path / "p.txt").write_text("w10 w20\nw11 w21\nw12\n")
    sample.main(["--from-file", str(tmp_path / "p.txt"), "--out-dir", str(tmp_path / "o"), "--ckpt", str(scene_run),
                 "--size", "64", "--temperature", "1", "--seed", "1", "--dtype", "float32"])  # steer's hook: float32
    _, _, vq = sample.load_pipeline(scene_run)
    (rows,) = drawn
    empties = 0
    for row, name in zip(rows, ["w10-w20.png", "w11-w21.png", "w12.png"]):
        tiles = scene_tiles(row, vq.config.n_tokens, 16)  # a scene (steered so), its tiles None or (n,)
        im = np.asarray(Image.open(tmp_path / "o" / name).convert("RGB")).astype(int)
        assert im.shape == (64, 64, 3)
        for t, (y, x) in zip(tiles, [(0, 0), (0, 32), (32, 0), (32, 32)]):
            want = np.full((32, 32, 3), 255) if t is None else cell_of(vq.detokenize(t[None])[0], 32)
            assert np.array_equal(im[y:y + 32, x:x + 32], want)
            empties += t is None
    assert 0 < empties < 12



def test_colour_weight_leaves_the_scene_tokens_terms_alone(tiny_ckpt):
    """colour_weight multiplies a colour token's term only: a loss over <scene> and <empty> targets is the same at
    any colour_weight (they come after the colour tokens, but are none)."""
    model = scene_model(tiny_ckpt)
    V = model.config.vocab_size
    idx = torch.tensor([[0, 10, 20, V + K, V + SCENE, V + EMPTY, V + EMPTY]])
    targets = torch.tensor([[-1, -1, -1, V + SCENE, V + EMPTY, V + EMPTY, -1]])
    with torch.no_grad():
        losses = [model(idx, targets, colour_weight=w)[1] for w in (1.0, 5.0)]
    assert torch.equal(*losses)
