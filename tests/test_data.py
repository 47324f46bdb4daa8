"""data/: OpenMoji captions and rendering (data/openmoji/prepare.py), folder datasets with bad files, token shards."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_vq import TINY, colour_dataset
from tokenizers import Tokenizer, models, pre_tokenizers

import data
import vq
from data.openmoji import prepare
from mmmoe import BadInput


def test_emoji_captions():
    assert prepare.emoji_caption([0x1F6B2]) == "bicycle"
    assert prepare.emoji_caption([0x1F499]) == "blue heart"
    assert prepare.emoji_caption([0x2764, 0xFE0F]) == "red heart"  # not Unicode's "heavy black heart"
    assert prepare.emoji_caption([0x1F44B, 0x1F3FD]) == "waving hand sign, medium skin tone"
    assert prepare.emoji_caption([0x1F468, 0x200D, 0x1F373]) == "man cooking"
    assert prepare.emoji_caption([0x1F3C3, 0x200D, 0x2640, 0xFE0F]) == "woman runner"
    assert prepare.emoji_caption([0x0035, 0xFE0F, 0x20E3]) == "keycap 5"
    assert prepare.emoji_caption([0x1F1E9, 0x1F1EA]) is None  # flags: no names offline
    assert prepare.emoji_caption([0xE000]) is None  # OpenMoji's private-use extras
    names = [p.stem for p in (prepare.openmoji_dir() / "svg").glob("*.svg")]
    captioned = {prepare.emoji_caption([int(h, 16) for h in n.split("-")]) for n in names} - {None}
    assert len(captioned) > 3000


def test_render_emoji_fits_and_keeps_colour():
    from PIL import ImageFont
    font = ImageFont.truetype(str(prepare.openmoji_dir() / "font" / "glyf_colr0.ttf"), 300)
    bike = np.asarray(prepare.render_emoji("\U0001F6B2", font, 64)).astype(int)
    assert bike.shape == (64, 64, 3)
    border = lambda im: np.concatenate([im[0], im[-1], im[:, 0], im[:, -1]])  # noqa: E731
    assert border(bike).min() > 240  # a clipped glyph would put its black outline on the border
    ink = bike[(bike.min(-1) < 200) & (bike.max(-1) - bike.min(-1) > 60)]  # coloured pixels
    assert len(ink) > 50 and (ink[:, 0] > ink[:, 1] + 60).mean() > 0.8  # OpenMoji's bicycle is red
    chef = np.asarray(prepare.render_emoji("\U0001F468\u200D\U0001F373", font, 64))  # a ZWJ sequence: one glyph
    assert border(chef).min() > 240 and chef.min() < 100


def test_recolour_turns_hues_and_keeps_white_and_outlines():
    from PIL import ImageFont
    font = ImageFont.truetype(str(prepare.openmoji_dir() / "font" / "glyf_colr0.ttf"), 300)
    bike = prepare.render_emoji("\U0001F6B2", font, 64)  # red
    assert data.colour_word(data.as_tensor(bike)) == "red"
    assert data.colour_word(data.as_tensor(prepare.recolour(bike, 1 / 3))) == "green"
    assert data.colour_word(data.as_tensor(prepare.recolour(bike, 2 / 3))) == "blue"
    before, after = np.asarray(bike).astype(int), np.asarray(prepare.recolour(bike, 1 / 3)).astype(int)
    grey = before.max(-1) - before.min(-1) < 8  # white background, black outline
    assert grey.mean() > 0.5 and np.abs(after[grey] - before[grey]).max() <= 8
    assert np.abs(np.asarray(prepare.recolour(bike, 0)).astype(int) - before).max() <= 8  # no turn: the same picture


@pytest.mark.parametrize("all_emoji", [False, True])
def test_recoloured_objects_hold_one_colour_each_out(tmp_path, all_emoji):
    # all_emoji (the shipped demo's last stage) trains the emoji held out by name; the colour pairs stay held out
    prepare.build_openmoji(tmp_path / "om", size=32, recolours=5, objects=4, all_emoji=all_emoji)
    rows = data.read_folder(tmp_path / "om")
    originals = [r for r in rows if r["object"] is None]
    assert len(originals) == 4 and all(r["split"] == "train" and r["colour"] for r in originals)
    for o in originals:
        copies = [r for r in rows if r["object"] == o["image"]]
        held = {r["colour"] for r in copies if r["split"] == "val"}
        assert len(held) == 1 and held == {prepare.held_out_colour(o["caption"], {r["colour"] for r in copies})}
        assert o["colour"] not in {r["colour"] for r in copies}  # a copy has a colour of its own
        assert all(r["captions"] == [prepare.phrasings(o["caption"], r["colour"])[-1]] for r in copies)  # "a blue ..."
        assert all(data.colour_word(data.load_image(r["image"], 32)) == r["colour"] for r in copies)
    assert data.object_index(rows).tolist() == [next(i for i, o in enumerate(rows) if o["image"] == (r["object"] or r["image"])) for r in rows]
    # the same pairs on every machine and run: a hash of name and colour, not an order or a random draw
    assert prepare.held_out_colour("pear", {"blue", "red", "pink"}) == prepare.held_out_colour("pear", ["pink", "red", "blue"])


def test_held_out_split_is_fixed_by_name():
    names = [f"thing {i}" for i in range(2000)]
    split = [data.held_out(n) for n in names]
    assert [prepare.split_of(n) == "val" for n in names] == split
    assert {prepare.split_of(n, all_emoji=True) for n in names} == {"train"}
    assert split == [data.held_out(n) for n in names]
    assert 0.03 < sum(split) / len(split) < 0.07
    assert all(data.held_out(n) == data.held_out(n + ", dark skin tone") for n in names[:200])


def test_folder_datasets_and_unreadable_images(tmp_path, capsys):
    root = colour_dataset(tmp_path / "jsonl", n=5)
    (root / "3.png").write_bytes(b"this is not a png")
    rows, images = data.load_images(data.read_folder(root), 16)
    assert len(rows) == 4 and images.shape == (4, 3, 16, 16)
    assert images.min() >= -1 and images.max() <= 1
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err
    txt = tmp_path / "pairs"
    txt.mkdir()
    Image.new("RGBA", (40, 20), (255, 0, 0, 128)).save(txt / "a.png")
    (txt / "a.txt").write_text("a translucent red bar\n")
    Image.new("RGB", (8, 8)).save(txt / "uncaptioned.png")
    rows = data.read_folder(txt)
    assert [r["caption"] for r in rows] == ["a translucent red bar"] and rows[0]["split"] in ("train", "val")
    assert "skipped 1 image(s) without a caption" in capsys.readouterr().err  # counted, not silently dropped
    (txt / "a.txt").write_bytes(b"caf\xe9")  # Latin-1, not UTF-8
    with pytest.raises(BadInput, match="a.txt is not UTF-8 text"):
        data.read_folder(txt)
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, 100  # so that this image counts as a decompression bomb
    try:
        assert data.load_image(tmp_path / "big.png", 16) is None  # skipped like any unreadable file, no traceback
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "captions.jsonl").write_text('{"image": "x.png", "caption": "ok"}\n{"image": "y.png"}\n')
    with pytest.raises(BadInput, match="captions.jsonl:2"):
        data.read_folder(tmp_path / "broken")
    (tmp_path / "broken" / "captions.jsonl").write_text('{"image": "x.png", "caption": "ok", "split": "test"}\n')
    with pytest.raises(BadInput, match="split 'test' is neither"):
        data.read_folder(tmp_path / "broken")


def tiny_tokenizer(path):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", "red", "green", "blue", "yellow", "square"])},
                                     unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_shards_round_trip_and_rerun_is_a_no_op(tmp_path, capsys):
    root = colour_dataset(tmp_path / "data")
    vq.save_vq(vq.VQModel(TINY), tmp_path / "vq")
    tok = tiny_tokenizer(tmp_path / "tok.json")
    data.write_shards(root, vq.load_vq(tmp_path / "vq"), tmp_path / "vq", tok, tmp_path / "shards", augment_copies=1)
    train, val = data.TokenShards(tmp_path / "shards", "train"), data.TokenShards(tmp_path / "shards", "val")
    assert (len(train), len(val)) == (2 * 11, 1)  # 11 training images, each also once augmented
    rows, images = data.load_images([r for r in data.read_folder(root) if r["split"] == "train"], 16)
    codes = vq.encode_images(vq.load_vq(tmp_path / "vq"), images).flatten(1)
    for i in range(11):  # the first copy is the image itself
        text, c = train[i]
        assert np.array_equal(c, codes[i].numpy()) and c.dtype == np.int64
        assert text.tolist() == Tokenizer.from_file(str(tok)).encode(rows[i]["caption"]).ids
        assert train.captions[i] == rows[i]["caption"] == train.captions[i + 11]
    stamp = (tmp_path / "shards" / "train.codes.npy").stat().st_mtime_ns
    data.write_shards(root, vq.load_vq(tmp_path / "vq"), tmp_path / "vq", tok, tmp_path / "shards", augment_copies=1)
    assert "up to date" in capsys.readouterr().out
    assert (tmp_path / "shards" / "train.codes.npy").stat().st_mtime_ns == stamp
    lines = (root / "captions.jsonl").read_text().replace("red square 4", "crimson square 4")
    (root / "captions.jsonl").write_text(lines)
    data.write_shards(root, vq.load_vq(tmp_path / "vq"), tmp_path / "vq", tok, tmp_path / "shards", augment_copies=1)
    assert "crimson square 4" in data.TokenShards(tmp_path / "shards", "train").captions


def test_augment_moves_whole_pixels_and_fills_white():
    x = torch.ones(4, 3, 16, 16)  # all white stays all white
    assert torch.equal(data.augment(x, torch.Generator().manual_seed(0)), x)
    x = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = data.augment(x, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), value=1.0)  # 6% of 32 px: up to 2 px each way
    moves = set()
    for img, o in zip(padded, out):  # each picture is its original moved by whole pixels, nothing resampled
        found = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(img[:, dy:dy + 32, dx:dx + 32], o)]
        assert len(found) == 1
        moves |= set(found)
    assert len(moves) > 10  # and the moves differ from picture to picture


def test_dominant_hue():
    def square(rgb):  # a coloured square with a black outline on white
        x = torch.ones(3, 32, 32)
        x[:, 6:26, 6:26] = -1
        x[:, 8:24, 8:24] = torch.tensor(rgb).view(3, 1, 1) / 127.5 - 1
        return x
    images = torch.stack([square((220, 30, 30)), square((40, 200, 40)), square((60, 30, 220)), torch.ones(3, 32, 32)])  # hues 356°, 120°, 249°
    assert data.dominant_hue(images).tolist() == [0, 4, 8, -1]  # red, green, blue; white has none


def test_colour_words_and_phrasings():
    def square(rgb, rgb2=None):  # a coloured square with a black outline on white (and a second colour)
        x = torch.ones(3, 32, 32)
        x[:, 6:26, 6:26] = -1
        x[:, 8:24, 8:24] = torch.tensor(rgb).view(3, 1, 1) / 127.5 - 1
        if rgb2:
            x[:, 8:24, 16:24] = torch.tensor(rgb2).view(3, 1, 1) / 127.5 - 1
        return x
    words = [data.colour_word(square(c)) for c in [(220, 30, 30), (241, 179, 28), (252, 234, 43), (40, 200, 40),
                                                   (60, 30, 220), (140, 90, 40), (128, 128, 128)]]
    assert words == ["red", "orange", "yellow", "green", "blue", "brown", None]  # grey has no colour word
    assert data.colour_word(square((220, 30, 30), (40, 200, 40))) is None  # two colours, neither dominant
    assert prepare.phrasings("bicycle", "red") == ["bicycle", "a bicycle", "an emoji of a bicycle", "a red bicycle"]
    assert prepare.phrasings("apple", "orange")[1:] == ["an apple", "an emoji of an apple", "an orange apple"]
    assert prepare.phrasings("blue heart", "blue") == ["blue heart", "a blue heart", "an emoji of a blue heart"]


def test_a_list_of_captions_makes_one_example_each(tmp_path):
    root = colour_dataset(tmp_path / "data")
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    rows[0]["caption"] = [rows[0]["caption"], "a " + rows[0]["caption"], "an emoji of " + rows[0]["caption"]]
    rows[0]["colour"], rows[4]["object"], rows[4]["split"] = "red", rows[0]["image"], rows[0].get("split")  # a recoloured copy
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    vq.save_vq(vq.VQModel(TINY), tmp_path / "vq")
    data.write_shards(root, vq.load_vq(tmp_path / "vq"), tmp_path / "vq", tiny_tokenizer(tmp_path / "tok.json"), tmp_path / "shards")
    split = rows[0].get("split") or "train"
    shards = data.TokenShards(tmp_path / "shards", split)
    same = [i for i, c in enumerate(shards.captions) if c.endswith(rows[0]["caption"][0])]
    assert [shards.captions[i] for i in same] == rows[0]["caption"]  # three examples, one per phrasing ...
    assert all(np.array_equal(shards[i][1], shards[same[0]][1]) for i in same)  # ... of the same picture
    # each example's kind, for a data mix: by its first caption or another, a copy, or a picture with no colour word
    kinds = dict(zip(shards.captions, shards.kinds))
    assert [kinds[c] for c in rows[0]["caption"]] == ["bare", "original", "original"] and kinds[rows[4]["caption"]] == "copy"
    assert set(data.TokenShards(tmp_path / "shards", "train").kinds) == {"multicolour"}  # no colour word given
    for bad in ('{"image": "0.png", "caption": 7}', '{"image": "0.png", "caption": []}', '{"image": "0.png", "caption": [""]}'):
        (root / "captions.jsonl").write_text(bad + "\n")
        with pytest.raises(BadInput, match="captions.jsonl:1: expected"):
            data.read_folder(root)


def test_shards_never_replace_the_dataset_they_read(tmp_path):
    root = colour_dataset(tmp_path / "data")
    vq.save_vq(vq.VQModel(TINY), tmp_path / "vq")
    with pytest.raises(BadInput, match="holds files that mmmoe did not write there"):
        data.write_shards(root, vq.load_vq(tmp_path / "vq"), tmp_path / "vq", tiny_tokenizer(tmp_path / "tok.json"), root)  # --out = --data
    assert (root / "captions.jsonl").exists() and len(list(root.glob("*.png"))) == 12
