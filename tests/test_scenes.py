"""data/scenes.py: scenes of 2 x 2 tiles (#52): plurals, captions that say what the layout shows, held-out scenes never
composed, scene_at a pure function of (seed, step, i), and the sequences and targets of make_scene_batch."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import data
from data.scenes import (CATEGORIES, GENEVAL, RELATIONS, Scene, geneval_prompts, held_out_scene, held_out_scenes, judge,
                         make_scene_batch, plural, scene_at, tile_table)

NAMES = ["apple", "banana", "cherry", "peach", "lemon", "pear", "grape", "melon", "kiwi fruit", "hot pepper", "carrot",
         "onion", "mushroom", "peanut", "chestnut", "bread", "croissant", "pretzel", "bagel", "pancake", "waffle",
         "cheese", "egg", "box", "bus", "brush", "watch", "key", "baby", "orange"]
COLOURS = ["red", "orange", "yellow", "green", "blue", "purple"]
N_TOKENS = 17  # a colour token, then 4 x 4 codes


class StandIn:
    """What make_scene_batch asks of a model: V = 100 text tokens, K = 20 image codes, <boi> <eoi> <scene> <empty>."""
    start_token, config = 0, SimpleNamespace(eos_token_id=1)

    def image_token(self, which):
        return {"boi": 120, "eoi": 121, "scene": 122, "empty": 123}[which] if isinstance(which, str) else which + 100


def write_dataset(tmp_path):
    """A folder dataset (no image files: captions.jsonl is all tile_table reads) and its "train" shards written as
    data.write_shards writes them: per object its own picture (colour: its own, but "multi" none) and two recoloured
    copies, one of them held out ("val"); a multicolour picture; a skin-tone name. Codes: example k's picture is
    filled with k % 20."""
    rows = []
    for n, name in enumerate(NAMES):
        own = COLOURS[n % len(COLOURS)]
        rows.append({"image": f"images/{n}.png", "caption": [name, f"a {name}"], "split": "train", "colour": own})
        for j, (w, split) in enumerate([(COLOURS[(n + 1) % 6], "train"), (COLOURS[(n + 2) % 6], "val")]):
            rows.append({"image": f"images/{n}-hue{j}.png", "caption": [f"a {w} {name}"], "split": split, "colour": w,
                         "object": f"images/{n}.png"})
    rows.append({"image": "images/rainbow.png", "caption": ["rainbow"], "split": "train"})
    rows.append({"image": "images/hand.png", "caption": ["waving hand, medium skin tone"], "split": "train",
                 "colour": "red"})
    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines, codes, text, offsets = [], [], [], [0]
    for copy in (0, 1):  # an augmented copy too, as write_shards(augment_copies=1)
        for r in data.read_folder(root):
            if r["split"] == "train":
                for phrasing, caption in enumerate(r["captions"]):
                    lines.append({"image": f"data/{r['image'].relative_to(root)}", "caption": caption, "copy": copy,
                                  "kind": data.example_kind(r, phrasing)})
                    codes.append(np.full(N_TOKENS, len(codes) % 20))
                    text.extend([2 + len(codes) % 50] * 3)
                    offsets.append(len(text))
    out = tmp_path / "shards"
    out.mkdir()
    np.save(out / "train.codes.npy", np.array(codes, dtype=np.uint16))
    np.save(out / "train.text.npy", np.array(text, dtype=np.int32))
    np.save(out / "train.offsets.npy", np.array(offsets, dtype=np.int64))
    (out / "train.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    (out / "index.json").write_text(json.dumps({"splits": {"train": len(codes)}, "data": str(root)}))
    return out


@pytest.fixture
def shards_dir(tmp_path):
    return write_dataset(tmp_path)


def word_tokenizer():
    words = {w for name in NAMES for w in name.split()} | {plural(w) for w in NAMES} | set(COLOURS) | \
        {"a", "an", "and", "two", "three", "four"} | {w for r in RELATIONS for w in r.split()}
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<unk>", *sorted(words)])}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


def test_plural():
    words = ["lemon", "peach", "box", "bus", "brush", "waltz", "cherry", "key", "knife", "woman"]
    assert [plural(w) for w in words] == \
        ["lemons", "peaches", "boxes", "buses", "brushes", "waltzes", "cherries", "keys", "knives", "women"]
    assert plural("hot pepper") == "hot peppers"
    assert plural("face with tears of joy") == "faces with tears of joy"
    assert plural("keycap 5") == "keycap 5s"
    assert [plural(w) for w in ["prayer beads", "glass", "cactus"]] == ["prayer beads", "glasses", "cactuses"]


def test_tile_table(shards_dir):
    table = tile_table(shards_dir)
    shards = data.TokenShards(shards_dir, "train")
    assert sorted(table["own"]) == sorted(NAMES + ["rainbow"])  # the skin tone is left out
    assert all(shards.captions[i] == name for name, i in table["own"].items())  # its bare name, unaugmented ...
    assert all(i < len(shards) // 2 for i in table["own"].values())  # ... the first copy
    for n, name in enumerate(NAMES[:-1]):  # its own colour and the one trained copy, never the held-out ("val") one
        own, trained = COLOURS[n % 6], COLOURS[(n + 1) % 6]
        assert sorted(table["coloured"][name]) == sorted([own, trained])
        assert shards.captions[table["coloured"][name][trained]] == f"a {trained} {name}"
    assert "rainbow" not in table["coloured"] and "orange" not in table["coloured"]  # no colour; a colour word already
    copies = [t for t in table["tiles"] if not t["own"]]
    assert len(copies) == len(NAMES)
    assert all(t["object"].endswith(f"images/{NAMES.index(t['name'])}.png") for t in copies)


def cell_of(tiles, index):
    return [c for c, t in enumerate(tiles) if t == index]


def test_captions_say_what_the_layout_shows(shards_dir):
    table = tile_table(shards_dir)
    seen, patterns = set(), {c: set() for c in CATEGORIES}
    for i in range(400):
        s = scene_at(table, 0, 3, i)
        seen.add(s.category if s.category != "position" else s.relation)
        patterns[s.category].add(tuple(t >= 0 for t in s.tiles))
        filled = [t for t in s.tiles if t >= 0]
        assert 2 <= len(filled) <= 4
        if s.category == "counting":
            x, = s.objects
            assert s.caption == f"{['two', 'three', 'four'][s.count - 2]} {plural(x)}"
            assert filled == [table["own"][x]] * s.count
            continue
        x, y = s.objects
        assert x != y and len(filled) == 2
        if s.category == "colour attribution":
            cx, cy = s.colours
            assert s.caption.endswith(f"{cx} {x} and {'an' if cy[0] in 'aeiou' else 'a'} {cy} {y}")
            pictures = table["coloured"][x][cx], table["coloured"][y][cy]
        else:
            pictures = table["own"][x], table["own"][y]
        assert sorted(filled) == sorted(pictures)
        if s.category == "two objects":
            assert s.caption == f"{'an' if x[0] in 'aeiou' else 'a'} {x} and {'an' if y[0] in 'aeiou' else 'a'} {y}"
        if s.category == "position":
            assert s.caption.endswith(f"{x} {s.relation} {'an' if y[0] in 'aeiou' else 'a'} {y}")
            (rx, cx), (ry, cy) = (divmod(cell_of(s.tiles, p)[0], 2) for p in pictures)  # (row, column) of X and Y
            assert {"to the left of": rx == ry and cx < cy, "to the right of": rx == ry and cx > cy,
                    "above": cx == cy and rx < ry, "below": cx == cy and rx > ry}[s.relation]
    assert seen == {"two objects", "counting", "colour attribution", *RELATIONS}
    # empty cells at random where the category allows: any 2 of 4 cells, any 2-4 for counting, a free row or column
    assert {c: len(p) for c, p in patterns.items()} == {"two objects": 6, "counting": 6 + 4 + 1, "position": 4,
                                                        "colour attribution": 6}


def test_scene_at_is_a_pure_function_of_seed_step_and_i(shards_dir):
    table = tile_table(shards_dir)
    assert scene_at(table, 0, 5, 2) == scene_at(tile_table(shards_dir), 0, 5, 2)
    assert [scene_at(table, 0, 5, i) for i in range(8)] != [scene_at(table, 0, 6, i) for i in range(8)]
    assert [scene_at(table, 0, 5, i) for i in range(8)] != [scene_at(table, 1, 5, i) for i in range(8)]
    assert len({scene_at(table, 0, 5, i) for i in range(8)}) > 1


def test_held_out_scenes_are_never_composed(shards_dir):
    table = tile_table(shards_dir)
    held = held_out_scenes(table)
    assert held == held_out_scenes(tile_table(shards_dir))  # the same every time
    assert set(held) == set(CATEGORIES) and all(held[c] for c in CATEGORIES)
    assert all(held_out_scene(s) and s.category == c for c in held for s in held[c])
    composed = [scene_at(table, 0, step, i) for step in range(100) for i in range(20)]
    assert not any(held_out_scene(s) for s in composed)
    assert not {s.caption for s in composed} & {s.caption for c in held for s in held[c]}
    pairs = {frozenset(s.objects) for s in composed if len(s.objects) == 2}
    assert not pairs & {frozenset(s.objects) for s in held["two objects"]}  # in no category, in either order
    counted = {(s.objects[0], s.count) for s in composed if s.category == "counting"}
    assert not counted & {(s.objects[0], s.count) for s in held["counting"]}
    assert any(s.category == "counting" and not held_out_scene(s._replace(count=n)) for s in held["counting"]
               for n in (2, 3, 4))  # a count is held out for some objects, not for all


def test_make_scene_batch_layout_and_targets(shards_dir):
    table, shards = tile_table(shards_dir), data.TokenShards(shards_dir, "train")
    tok, model = word_tokenizer(), StandIn()
    pear, lemon = table["own"]["pear"], table["own"]["lemon"]
    scene = Scene("position", "a pear to the left of a lemon", (-1, -1, pear, lemon), ("pear", "lemon"),
                  (None, None), 1, "to the left of")
    idx, targets, pad = make_scene_batch(shards, [scene, lemon], tok, model)
    text = tok.encode(scene.caption).ids
    tile = lambda i: list(shards[i][1] + 100)  # noqa: E731
    by_hand = [0, *text, 120, 122, 123, 123, *tile(pear), *tile(lemon), 121, 1]
    assert idx[0].tolist() == by_hand and pad[0] == 0
    image = [122, 123, 123, *tile(pear), *tile(lemon)]
    assert targets[0].tolist() == [-1] * len(text) + [-1] + image + [-1, -1, -1]  # <boi> predicts <scene>; not <eoi>
    # a single picture, exactly as data.make_batch writes it, left-padded with <eos>
    single, single_targets, single_pad = data.make_batch(shards, [lemon], [False], model)
    assert idx[1, pad[1]:].tolist() == single[0].tolist() and (idx[1, :pad[1]] == 1).all()
    assert targets[1, pad[1]:].tolist() == single_targets[0].tolist() and (targets[1, :pad[1]] == -1).all()
    dropped = make_scene_batch(shards, [scene], tok, model, drop=[True])[0][0]
    assert dropped[1:1 + len(text)].tolist() == [1] * len(text)  # the caption all <eos>, the rest as it was
    assert dropped[1 + len(text):].tolist() == by_hand[1 + len(text):]


def test_a_two_object_scene_costs_at_most_2_2_pictures(shards_dir):
    table, shards = tile_table(shards_dir), data.TokenShards(shards_dir, "train")
    tok, model = word_tokenizer(), StandIn()
    two = next(s for i in range(100) for s in [scene_at(table, 0, 0, i)] if s.category == "two objects")
    idx, targets, _ = make_scene_batch(shards, [two, table["own"]["pear"]], tok, model)
    image_tokens = (targets >= 0).sum(1)  # (2,): the image tokens of each
    assert image_tokens.tolist()[1] == N_TOKENS and image_tokens[0] <= 2.2 * image_tokens[1]
    assert 0 not in tok.encode(two.caption).ids  # every word known: no <unk>


def test_judge_applies_genevals_rules():
    """Every criterion of a category must hold: the object (in its colour), the exact count, the side, both colours."""
    def scene(category, objects, colours=(None, None), count=1, relation=None):
        return Scene(category, "", None, objects, colours, count, relation)
    pear, lemon = scene("two objects", ("pear", "lemon")), scene("counting", ("lemon",), count=3)
    assert judge(scene("single object", ("pear",)), [(None, "pear", "green")])
    assert not judge(scene("single object", ("pear",)), [(None, "lemon", "yellow")])
    assert judge(scene("colours", ("pear",), ("blue",)), [(None, "pear", "blue")])
    assert not judge(scene("colours", ("pear",), ("blue",)), [(None, "pear", "green")])
    assert not judge(scene("colours", ("pear",), ("blue",)), [(None, "lemon", "blue")])
    assert judge(pear, [(0, "lemon", None), (3, "pear", None)]) and not judge(pear, [(0, "pear", None)])
    assert judge(lemon, [(0, "lemon", None), (1, "lemon", None), (3, "lemon", None), (2, "pear", None)])
    assert not judge(lemon, [(0, "lemon", None), (1, "lemon", None)])
    assert not judge(lemon, [(c, "lemon", None) for c in range(4)])  # exactly three
    left = scene("position", ("pear", "lemon"), relation="to the left of")
    assert judge(left, [(2, "pear", None), (1, "lemon", None)])  # a column to the left, whatever the rows
    assert not judge(left, [(0, "pear", None), (2, "lemon", None)])  # the same column
    assert not judge(left, [(1, "pear", None), (0, "lemon", None)])
    assert not judge(left, [(None, "pear", None)])  # a single picture shows no place
    above = scene("position", ("pear", "lemon"), relation="above")
    assert judge(above, [(1, "pear", None), (2, "lemon", None)]) and not judge(above, [(2, "pear", None), (3, "lemon", None)])
    below = scene("position", ("pear", "lemon"), relation="below")
    assert judge(below, [(3, "pear", None), (0, "lemon", None)]) and not judge(below, [(0, "pear", None), (3, "lemon", None)])
    right = scene("position", ("pear", "lemon"), relation="to the right of")
    assert judge(right, [(1, "pear", None), (0, "lemon", None)]) and not judge(right, [(0, "pear", None), (1, "lemon", None)])
    both = scene("colour attribution", ("pear", "lemon"), ("blue", "red"))
    assert judge(both, [(0, "pear", "blue"), (1, "lemon", "red")])
    assert not judge(both, [(0, "pear", "red"), (1, "lemon", "blue")])  # the colours swapped: attribution fails
    assert not judge(both, [(0, "pear", "blue")])


def test_geneval_prompts_are_held_out_or_say_why_not(shards_dir):
    """Six categories; single objects are trained objects by name; colours are the held-out (object, colour) pairs
    (the shards' "val" copies, never in the table); the other four are held_out_scenes'."""
    table = tile_table(shards_dir)
    rows = data.read_folder(shards_dir.parent / "data")
    prompts = geneval_prompts(table, rows, 5)
    assert tuple(prompts) == GENEVAL and all(0 < len(p) <= 5 for p in prompts.values())
    assert all(s.objects[0] in table["own"] and s.caption in (f"a {s.objects[0]}", f"an {s.objects[0]}")
               for s in prompts["single object"])
    for s in prompts["colours"]:
        x, c = s.objects[0], s.colours[0]
        assert s.caption == f"a {c} {x}" and c not in table["coloured"].get(x, {})  # never trained in that colour
        n = NAMES.index(x)
        assert c == COLOURS[(n + 2) % 6]  # the fixture's held-out copy
    held = held_out_scenes(table, 10)
    assert all(prompts[c] == [s for s in held[c] if "orange" not in s.objects][:5] for c in CATEGORIES)
    assert all(not data.names_a_colour(x) for c in prompts for s in prompts[c] for x in s.objects)
