"""
data/scenes.py: scenes (#52), a canvas of 2 x 2 tiles, each empty or one picture of the token shards, asked for the
ways GenEval asks: two objects ("a lemon and a pear"), counting ("three lemons"), position ("a lemon to the left of a
pear"), colour attribution ("a blue lemon and a green pear"). One sequence per scene:

    <bos> caption <boi> <scene> tile_0 tile_1 tile_2 tile_3 <eoi> <eos>

tiles top-left, top-right, bottom-left, bottom-right; a tile is <empty> or a picture's n_tokens tokens exactly as in
the shards. A single picture stays exactly as data.make_batch writes it.

    table = tile_table("out/openmoji-compose/shards")                  # the training pictures usable as tiles
    scenes = [scene_at(table, seed, step, i) for i in range(B)]        # a pure function of (seed, step, i)
    idx, targets, pad = make_scene_batch(shards, scenes, tokenizer, model)
    held_out_scenes(table)                                             # {category: [Scene]}, never trained on
    geneval_prompts(table, rows, n)                                    # GenEval's six categories, for analyze.py
    judge(scene, found)                                                # does a drawing show what scene asks?

Held out, never composed for training: pairs of objects never shown together, some (object, count) and some
(object, relation) combinations, each fixed by a hash of the names (held_out_scene); the held-out (object, colour)
pairs are the shards' "val" split, never in the table.
"""
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cli import BadInput
from data import TokenShards, left_padded, names_a_colour, read_folder

CATEGORIES = ("two objects", "counting", "position", "colour attribution")
NUMBERS = {2: "two", 3: "three", 4: "four"}
# Where (X, Y) may stand for "a X <relation> a Y", as cells 0 1 / 2 3: the same row for left/right, the same column
# for above/below
RELATIONS = {"to the left of": [(0, 1), (2, 3)], "to the right of": [(1, 0), (3, 2)], "above": [(0, 2), (1, 3)],
             "below": [(2, 0), (3, 1)]}
HELD_OUT_PERCENT = {"pair": 5, "count": 10, "relation": 10}  # of the object pairs, (object, count), (object, relation)
SCENE_STREAM = 52  # scene_at's random stream: apart from batch_at's [seed, epoch] and caption dropout's [seed, step, 1]

IRREGULAR = {"man": "men", "woman": "women", "person": "people", "child": "children", "mouse": "mice",
             "knife": "knives", "leaf": "leaves", "foot": "feet", "tooth": "teeth", "potato": "potatoes",
             "tomato": "tomatoes"}
PREPOSITIONS = {"with", "of", "in", "on", "for", "from"}


class Scene(NamedTuple):
    category: str  # one of CATEGORIES (or GENEVAL's, as a prompt)
    caption: str
    tiles: tuple | None  # 4 example indices of the training shards, top-left, top-right, bottom-left, bottom-right;
    # -1: empty. None: a prompt no training pictures show (GENEVAL's single object and colours)
    objects: tuple  # the names the caption asks for, in its order ("lemon", "pear")
    colours: tuple  # their colour words (colour attribution), else Nones
    count: int  # how many of each object
    relation: str | None  # position: a key of RELATIONS


def article(word):
    return "an" if word[0] in "aeiou" else "a"


def plural(name):
    """A plain English plural: "lemons", "peaches", "boxes", "buses", "cherries", "keys", "hot peppers", "faces with
    tears of joy" (the word before a preposition), a few irregular nouns ("knives", "women"), and a word that looks
    plural already stays ("prayer beads")."""
    words = name.split()
    head = next((k - 1 for k, w in enumerate(words) if k > 0 and w in PREPOSITIONS), len(words) - 1)
    w = words[head]
    if w in IRREGULAR:
        words[head] = IRREGULAR[w]
    elif w.endswith("s") and not w.endswith(("ss", "us", "is")):
        pass  # already a plural: "prayer beads", "clockwise arrows"
    elif w.endswith(("s", "x", "z", "ch", "sh")):
        words[head] = w + "es"
    elif w.endswith("y") and len(w) > 1 and w[-2] not in "aeiou":
        words[head] = w[:-1] + "ies"
    else:
        words[head] = w + "s"
    return " ".join(words)


# -----------------------------------------------------------------------------
# The pictures a scene is made of


def tile_table(shards_dir):
    """The training split's pictures usable as tiles, one per (object, colour) -> {"tiles": [{"index": example index
    in the "train" shards, "object": the original picture's path, "name": its bare name (captions[0]), "colour": a
    colour word or None, "own": whether it is the original}], "own": {name: index of the object's own picture},
    "coloured": {name: {colour: index}} for names that hold no colour word}. Names with a comma (skin tones) are left
    out: they read badly inside a sentence."""
    shards = TokenShards(shards_dir, "train")
    examples = [json.loads(line) for line in (shards.path / "train.jsonl").read_text().splitlines()]
    root = Path(shards.index["data"])
    rows = read_folder(root)
    by_path = {r["image"].relative_to(root).as_posix(): r for r in rows}
    by_image = {r["image"]: r for r in rows}
    tiles = []
    for i, e in enumerate(examples):
        # the shards name an image as the writer's command line did (relative or absolute): match the path inside
        # the dataset folder, its longest tail that is one
        parts = Path(e["image"]).parts
        tails = [Path(*parts[k:]).as_posix() for k in range(len(parts))]  # the longest first
        row = next((by_path[t] for t in tails if t in by_path), None)
        if row is None or e.get("copy", 0) != 0 or e["caption"] != row["captions"][0]:
            continue  # one example per picture: unaugmented, by its first caption (the bare name, or the copy's one)
        original = by_image.get(row["object"], row)
        name = original["captions"][0]
        if original["split"] != "train" or "," in name:
            continue
        tiles.append({"index": i, "object": str(original["image"]), "name": name, "colour": row["colour"],
                      "own": row["object"] is None})
    own, coloured = {}, {}
    for t in sorted(tiles, key=lambda t: (t["name"], t["colour"] or "")):
        if t["own"]:
            own.setdefault(t["name"], t["index"])
        if t["colour"] and not names_a_colour(t["name"]):
            coloured.setdefault(t["name"], {}).setdefault(t["colour"], t["index"])
    if len(own) < 2:
        raise BadInput(f"scenes: {shards.path} has {len(own)} object(s) usable as a tile; a scene needs two")
    return {"tiles": tiles, "own": own, "coloured": coloured}


# -----------------------------------------------------------------------------
# Composing scenes


def compose(table, category, objects, rng, colours=(None, None), count=1, relation=None):
    """A Scene of category with its caption and its tiles laid out as the caption says, empty cells at random
    (rng) where the category allows."""
    tiles = [-1] * 4
    if category == "counting":
        x, = objects
        caption = f"{NUMBERS[count]} {plural(x)}"
        for cell in rng.permutation(4)[:count]:
            tiles[cell] = table["own"][x]
        return Scene(category, caption, tuple(tiles), objects, (None,), count, None)
    x, y = objects
    if category == "colour attribution":
        cx, cy = colours
        caption = f"{article(cx)} {cx} {x} and {article(cy)} {cy} {y}"
        pictures = table["coloured"][x][cx], table["coloured"][y][cy]
    elif category == "position":
        caption = f"{article(x)} {x} {relation} {article(y)} {y}"
        pictures = table["own"][x], table["own"][y]
    else:
        caption = f"{article(x)} {x} and {article(y)} {y}"
        pictures = table["own"][x], table["own"][y]
    cells = RELATIONS[relation][rng.integers(2)] if category == "position" else rng.permutation(4)[:2]
    for cell, picture in zip(cells, pictures):
        tiles[cell] = picture
    return Scene(category, caption, tuple(tiles), objects, tuple(colours), 1, relation)


def draw(table, category, rng):
    """A random Scene of category from the table, held out or not."""
    if category == "colour attribution":
        names = list(table["coloured"])
        x, y = (names[k] for k in rng.choice(len(names), 2, replace=False))
        colours = tuple(str(rng.choice(sorted(table["coloured"][n]))) for n in (x, y))  # each in a colour it has
        return compose(table, category, (x, y), rng, colours)
    names = list(table["own"])
    if category == "counting":
        return compose(table, category, (names[rng.integers(len(names))],), rng, count=int(rng.integers(2, 5)))
    x, y = (names[k] for k in rng.choice(len(names), 2, replace=False))
    relation = list(RELATIONS)[rng.integers(len(RELATIONS))] if category == "position" else None
    return compose(table, category, (x, y), rng, relation=relation)


def percent(key):
    """A fixed number in 0..99 for a string: the same on every machine."""
    return int(hashlib.md5(key.encode()).hexdigest(), 16) % 100


def held_out_scene(scene):
    """Whether a scene is never trained on: its two objects are a held-out pair (whatever the category, in either
    order), or it counts a held-out (object, count), or its first object stands in a held-out (object, relation)."""
    if len(set(scene.objects)) == 2 and percent(" and ".join(sorted(scene.objects))) < HELD_OUT_PERCENT["pair"]:
        return True
    if scene.category == "counting" and percent(f"{scene.count} {scene.objects[0]}") < HELD_OUT_PERCENT["count"]:
        return True
    relation = f"{scene.objects[0]} {scene.relation}"
    return scene.category == "position" and percent(relation) < HELD_OUT_PERCENT["relation"]


def scene_at(table, seed, step, i):
    """The i-th scene of an optimiser step: a pure function of (seed, step, i), so a resumed run and every DDP rank
    see the same scenes. A category at random, then its objects, drawn again while the scene is held out."""
    rng = np.random.default_rng([seed, step, i, SCENE_STREAM])
    categories = [c for c in CATEGORIES if c != "colour attribution" or len(table["coloured"]) >= 2]
    for _ in range(1000):
        scene = draw(table, categories[rng.integers(len(categories))], rng)
        if not held_out_scene(scene):
            return scene
    raise BadInput(f"scenes: 1000 scenes drawn in a row were all held out; the table has {len(table['own'])} objects")


def held_out_scenes(table, n=20):
    """-> {category: up to n held-out Scenes}, the same every time: prompts for evaluation, each with the objects,
    colours, count and relation its picture should show, and one layout of tiles that the caption describes."""
    rng = np.random.default_rng([SCENE_STREAM, 1])
    out = {}
    for category in CATEGORIES:
        found = {}
        for _ in range(200 * n if category != "colour attribution" or len(table["coloured"]) >= 2 else 0):
            scene = draw(table, category, rng)
            if held_out_scene(scene):
                found.setdefault(scene.caption, scene)
                if len(found) == n:
                    break
        out[category] = list(found.values())
    return out


# -----------------------------------------------------------------------------
# Sequences


def make_scene_batch(shards, scenes, tokenizer, model, drop=None):
    """-> idx (B, T), targets (B, T), pad (B,) as data.make_batch: each of scenes is a Scene,
    <bos> caption <boi> <scene> tile_0 ... tile_3 <eoi> <eos>, or a shard example index, one picture exactly as
    make_batch writes it. Targets: every image token after <boi> up to the last tile's last token, predicted by the
    position before it; -1 elsewhere (not <eoi>). Left-padded with <eos>, which no token sees. drop[i]: the caption's
    tokens all <eos> (caption dropout)."""
    seqs, tgts = [], []
    bos, boi, eoi = model.start_token, model.image_token("boi"), model.image_token("eoi")
    eos = model.config.eos_token_id
    drop = np.zeros(len(scenes), bool) if drop is None else drop
    for s, d in zip(scenes, drop):
        if isinstance(s, Scene):
            text = np.array(tokenizer.encode(s.caption).ids, dtype=np.int64)
            tiles = [[model.image_token("empty")] if t < 0 else model.image_token(shards[t][1]) for t in s.tiles]
            image = np.concatenate([[model.image_token("scene")], *tiles])
        else:
            text, codes = shards[s]
            image = model.image_token(codes)
        text = np.full_like(text, eos) if d else text
        seq = np.concatenate([[bos], text, [boi], image, [eoi, eos]])
        tgt = np.full(len(seq), -1)
        tgt[1 + len(text):1 + len(text) + len(image)] = image  # the <boi> position predicts the first image token
        seqs.append(seq)
        tgts.append(tgt)
    return left_padded(seqs, tgts, eos)


# -----------------------------------------------------------------------------
# GenEval's six categories (Ghosh et al. 2023) on this domain: the prompts analyze.py asks, and the judge of a drawing

GENEVAL = ("single object", "two objects", "counting", "colours", "position", "colour attribution")


def geneval_prompts(table, rows, n):
    """-> {category of GENEVAL: up to n Scenes}, the same every time. Single object: training objects by name ("a
    lemon"; trained prompts: an emoji never trained cannot be drawn by its name); colours: compose's held-out (object,
    colour) pairs, never trained ("a blue pear"); the other four: held_out_scenes'. Objects whose name holds a colour
    word ("blue heart") are left out: the judge tells objects apart by shape, and "blue heart" and "green heart" share
    theirs. rows: the dataset's (data.read_folder), where the held-out pairs are."""
    names = [x for x in sorted(table["own"]) if not names_a_colour(x)]
    single = [Scene("single object", f"{article(x)} {x}", None, (x,), (None,), 1, None)
              for x in names[::max(1, len(names) // n)][:n]]
    by_image = {r["image"]: r for r in rows}
    pairs = [r for r in rows if r["split"] == "val" and r["object"] is not None and r["colour"] is not None
             and not names_a_colour(by_image[r["object"]]["captions"][0])]  # a guard: prepare.py recolours none
    colours = [Scene("colours", r["captions"][0], None, (by_image[r["object"]]["captions"][0],), (r["colour"],), 1,
                     None) for r in pairs[::max(1, len(pairs) // n)][:n]]
    held = {c: [s for s in scenes if not any(map(names_a_colour, s.objects))][:n]
            for c, scenes in held_out_scenes(table, 2 * n).items()}
    return {"single object": single, "two objects": held["two objects"], "counting": held["counting"],
            "colours": colours, "position": held["position"], "colour attribution": held["colour attribution"]}


def judge(scene, found):
    """Does a drawing show what scene asks, every criterion of its category (GenEval's rules)? found: what the
    drawing shows, [(cell, object name, colour word or None)], cell 0-3 in a scene (top-left, top-right, bottom-left,
    bottom-right), None for a single picture. Single object: the object is there; colours: in the asked colour; two
    objects: both are there; counting: exactly count of the object; position: X and Y are there, X's cell left of
    (right of, above, below) Y's, whatever the other axis; colour attribution: X in its colour and Y in its."""
    def cells(name, colour=None):  # where the drawing shows name (in colour, if one is asked)
        return [cell for cell, n, c in found if n == name and colour in (None, c)]
    x, cx = scene.objects[0], scene.colours[0]
    if scene.category in ("single object", "colours"):
        return bool(cells(x, cx))
    if scene.category == "counting":
        return len(cells(x)) == scene.count
    y, cy = scene.objects[1], scene.colours[1]
    if scene.category == "position":
        return any(a is not None and b is not None and beyond(scene.relation, a, b) for a in cells(x) for b in cells(y))
    return bool(cells(x, cx)) and bool(cells(y, cy))  # two objects (no colours asked), colour attribution


def beyond(relation, a, b):
    """Whether cell a stands in relation (a key of RELATIONS) to cell b, in a 2 x 2 grid (cells 0 1 / 2 3)."""
    (row_a, col_a), (row_b, col_b) = divmod(a, 2), divmod(b, 2)
    return {"to the left of": col_a < col_b, "to the right of": col_a > col_b, "above": row_a < row_b,
            "below": row_a > row_b}[relation]
