"""
data: captioned images in, token shards out (what the trainer, the VQ and the analysis read).

    python data/openmoji/prepare.py --out out/openmoji                     # the built-in dataset (data/openmoji/)
    python vq.py shards --vq demo/vq --data out/openmoji --out out/shards   # -> token shards (below)

1. Folder datasets, yours or a prepared one: a folder with `captions.jsonl` ({"image": "relative/path.png",
   "caption": "..." or ["...", "..."], "split": "train"|"val" optional, "colour" and "object" optional: see
   read_folder}), or image files each with a same-named .txt caption. A list of captions is several ways of
   asking for the same picture: each becomes a training example. Unreadable images are skipped and counted in
   one summary line. The held-out split is fixed by a hash of the name.
2. Colour: a picture's colour word, hues turned round the colour wheel (recoloured copies, the colour tokens of
   vq.py), the dominant hue.
3. Token shards: images -> the image tokenizer's tokens, captions -> ids of the base LLM's tokenizer, written once
   as memory-mapped numpy arrays + a JSON index, so training never touches an image. Re-running with the same
   inputs does nothing. The format, its writer and its reader live here; the image tokenizer is vq.py's, which
   imports this package (never the other way round).
4. Scenes (#52): 2 x 2 canvases of the shards' pictures asked for as GenEval asks ("a lemon to the left of a pear",
   "three lemons"), with their held-out combinations: data/scenes.py.
"""
import hashlib
import json
import os
import sys
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from cli import BadInput
from hf import load_tokenizer
from runs import atomic_dir, check_replaceable

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif"}


def held_out(caption, percent=5):
    """A fixed split by name: the same caption is always on the same side, on every machine. Skin-tone
    variants go with their base emoji, so no held-out picture has a twin in training."""
    base = caption.split(", ")[0]
    return int(hashlib.md5(base.encode()).hexdigest(), 16) % 100 < percent


# Colour words for a dominant hue in degrees (upper bounds), and the words a name may already hold
HUE_WORDS = [(15, "red"), (50, "orange"), (70, "yellow"), (165, "green"), (255, "blue"), (290, "purple"), (340, "pink"),
             (360, "red")]
COLOUR_WORDS = {w for _, w in HUE_WORDS} | {"brown", "black", "white", "grey", "gray"}


def names_a_colour(name):
    return bool(COLOUR_WORDS & set(name.split()))  # "blue heart", "large red square"


def colour_word(x):
    """(3, H, W) in [-1, 1] -> the common name of its dominant colour ("red", "brown", ...), or None when
    it has little colour or many (a rainbow). From the saturation-weighted hue histogram (10-degree bins)
    of its coloured pixels."""
    hue, weight, value = (t[0] for t in hue_weights(x[None]))
    if weight.sum() < 0.02 * len(weight):
        return None
    bin_of = (hue / 10).long().clamp(0, 35)
    hist = torch.zeros(36, device=x.device).scatter_add_(0, bin_of, weight)
    peak = int(hist.argmax())
    if hist[[peak - 1, peak, (peak + 1) % 36]].sum() < 0.6 * hist.sum():
        return None  # no one colour dominates
    word = next(w for bound, w in HUE_WORDS if 10 * peak + 5 < bound)
    in_peak = bin_of == peak
    if word in ("red", "orange") and (value * weight)[in_peak].sum() / weight[in_peak].sum() < 0.7:
        return "brown"  # a dark orange
    return word


# -----------------------------------------------------------------------------
# Folder datasets


def read_folder(root):
    """-> [{"image": Path, "caption": str, "captions": [str], "split": "train"|"val", "colour", "object"}] from
    captions.jsonl or image + .txt pairs. "caption" is the first of "captions", the ways of asking for that
    picture; "colour" (a colour word) and "object" (the image it is a recoloured copy of) are None unless given."""
    root = Path(root)
    index = root / "captions.jsonl"
    if index.exists():
        rows = []
        for n, line in enumerate(index.read_text().splitlines(), 1):
            if line.strip():
                try:
                    r = json.loads(line)
                    caps = [r["caption"]] if isinstance(r["caption"], str) else r["caption"]
                    if not caps or not all(isinstance(c, str) and c.strip() for c in caps) or not isinstance(r["image"], str):
                        raise TypeError
                    rows.append({"image": root / r["image"], "captions": [c.strip() for c in caps], "split": r.get("split"),
                                 "colour": r.get("colour"), "object": r.get("object") and root / r["object"]})
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise BadInput(f"{index}:{n}: expected a JSON object with \"image\" and \"caption\" "
                                   "(a non-empty string or list of strings)") from None
    elif root.is_dir():
        images = [p for p in sorted(root.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
        rows, uncaptioned = [], []
        for p in images:
            try:
                caption = p.with_suffix(".txt").read_text().strip() if p.with_suffix(".txt").exists() else ""
            except UnicodeDecodeError:
                raise BadInput(f"{p.with_suffix('.txt')} is not UTF-8 text") from None
            (rows if caption else uncaptioned).append({"image": p, "captions": [caption], "split": None, "colour": None, "object": None})
        if uncaptioned:
            print(f"skipped {len(uncaptioned)} image(s) without a caption (first: {uncaptioned[0]['image']})", file=sys.stderr)
    else:
        raise BadInput(f"no dataset folder {root}")
    if not rows:
        raise BadInput(f"no captioned images in {root}: expected captions.jsonl or image files with .txt captions")
    for r in rows:
        if r["split"] not in (None, "train", "val"):
            raise BadInput(f"{r['image']}: split {r['split']!r} is neither \"train\" nor \"val\"")
        r["caption"] = r["captions"][0]
        r["split"] = r["split"] or ("val" if held_out(r["caption"]) else "train")
    return rows


def object_index(rows):
    """(N,) for each row, the index of the row whose image it is a recoloured copy of (its own if it is none)."""
    where = {r["image"]: i for i, r in enumerate(rows)}
    return torch.tensor([where.get(r["object"], i) for i, r in enumerate(rows)])


# The pictures a trained model is asked for (analyze.py, train.py's learning curve): training emoji as people ask
# ("a red bicycle"), held-out emoji ("a lemon"), and held-out pairs, known objects in a colour they were never
# trained in ("a blue pear")
GROUPS = {"train": "training emoji", "bare": "training emoji by bare name", "val": "held-out emoji",
          "pairs": "held-out colour pairs"}


def asked_caption(row, group):
    """How a row's picture is asked for in GROUPS' group: training emoji with their colour ("a red bicycle", the last
    phrasing), one-colour training emoji by their first caption, the bare name ("bicycle": drawn in its own colour?),
    held-out emoji as people name them ("a lemon"), a held-out pair as its one caption ("a blue pear")."""
    caps = row["captions"]
    return caps[-1] if group == "train" else caps[0] if group == "bare" else caps[min(1, len(caps) - 1)]


def caption_rows(rows, group):
    """Indices of a dataset's rows in one of GROUPS, one per (object, colour)."""
    keep = {"train": lambda r: r["split"] == "train" and r["object"] is None, "val": lambda r: r["split"] == "val" and r["object"] is None,
            "bare": lambda r: r["split"] == "train" and r["object"] is None and r["colour"] is not None,
            "pairs": lambda r: r["split"] == "val" and r["object"] is not None}[group]
    return list({(r["object"] or r["image"], r["colour"]): i for i, r in enumerate(rows) if keep(r)}.values())


def load_image(path, size):
    """-> (3, size, size) float tensor in [-1, 1], or None if the file is not a readable image.
    Non-square images are resized on their short side and centre-cropped."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P"):  # transparent pixels become white
                im = im.convert("RGBA")
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im)
            im = im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError):
        return None
    scale = size / min(im.size)
    im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.LANCZOS)
    left, top = (im.width - size) // 2, (im.height - size) // 2
    im = im.crop((left, top, left + size, top + size))
    return as_tensor(im)


def as_tensor(image):
    """An RGB PIL image -> (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def load_images(rows, size, desc="loading images"):
    """Load every row's image -> (kept rows, (N, 3, size, size) tensor). Unreadable files are skipped
    and counted in one summary line, never fatal."""
    kept, images, bad = [], [], []
    for r in tqdm(rows, desc=desc, unit="image", leave=False):
        x = load_image(r["image"], size)
        if x is None:
            bad.append(r["image"])
        else:
            kept.append(r)
            images.append(x)
    if bad:
        print(f"skipped {len(bad)} unreadable image(s) (first: {bad[0]})", file=sys.stderr)
    if not kept:
        raise BadInput("no readable images")
    return kept, torch.stack(images)


def hsv(x):
    """(B, 3, H, W) in [-1, 1] -> per pixel (B, HW): hue in degrees, saturation and value, each in [0, 1] but hue."""
    rgb = ((x.clamp(-1, 1) + 1) / 2).flatten(2)  # (B, 3, HW) in [0, 1]
    mx, mn = rgb.max(1).values, rgb.min(1).values
    r, g, b = rgb.unbind(1)
    delta = (mx - mn).clamp_min(1e-6)
    hue = torch.where(mx == r, ((g - b) / delta) % 6, torch.where(mx == g, (b - r) / delta + 2, (r - g) / delta + 4)) * 60
    return hue, (mx - mn) / mx.clamp_min(1e-6), mx


def hue_weights(x):
    """(B, 3, H, W) in [-1, 1] -> per pixel (B, HW): hue in degrees, a weight that is its saturation if it is
    coloured (saturated and bright enough) and 0 for white, black, greys and outlines, and its value."""
    hue, sat, value = hsv(x)
    return hue, sat * ((sat > 0.3) & (value > 0.3)), value


def turn_hue(x, turns):
    """(B, 3, H, W) in [-1, 1] with every hue turned turns (B,) of the way round the colour wheel; saturation and
    value stay, so whites, greys and black outlines are untouched: recolour() for tensors, exactly invertible
    (turning by -t undoes t up to float rounding)."""
    hue, sat, value = hsv(x)
    h = ((hue / 60 + 6 * turns[:, None].to(hue)) % 6)[:, None]  # (B, 1, HW) in sextants
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device)[None, :, None] + h) % 6  # (B, 3, HW): HSV -> RGB, per channel
    rgb = value[:, None] * (1 - sat[:, None] * (torch.minimum(k, 4 - k)).clamp(0, 1))
    return (rgb * 2 - 1).view_as(x)


def dominant_hue(x, bins=12):
    """(B, 3, H, W) in [-1, 1] -> (B,) index of the hue bin (of `bins` around the colour wheel) holding most
    saturation among coloured pixels, or -1 for an image with no colour (white, black, greys)."""
    hue, weight, _ = hue_weights(x)
    hist = torch.zeros(len(x), bins, device=x.device).scatter_add_(1, (hue / 360 * bins).long().clamp(0, bins - 1), weight)
    return torch.where(hist.sum(1) > 0.02 * hue.shape[1], hist.argmax(1), -1)


def standard_hue(x, bins=12):
    """(B, 3, H, W) in [-1, 1] -> (the images turned round the colour wheel until their dominant hue lies in the
    first of `bins` bins, the bin each came from (B,), -1 for no colour: those stay as they are)."""
    came_from = dominant_hue(x, bins)
    return turn_hue(x, -came_from.clamp(min=0) / bins), came_from


def augment(x, generator, max_shift=0.06):
    """Light augmentation that keeps any caption true: each image moved by a whole number of pixels, up to
    max_shift of its side, white filling in. Whole pixels keep every edge as sharp as in the original: a
    sub-pixel move or a zoom resamples, blurs every picture trained on, and a VQ trained on those drew real
    (sharp) emoji 0.7 dB worse (docs/vq.md). No flips: they would turn a right arrow into a left one."""
    B, C, H, W = x.shape
    m = round(max_shift * H)
    padded = torch.nn.functional.pad(x, (m, m, m, m), value=1.0)  # (B, C, H + 2m, W + 2m), white around
    dy, dx = torch.randint(0, 2 * m + 1, (2, B, 1), generator=generator)  # each image's window into it
    rows, cols = dy + torch.arange(H), dx + torch.arange(W)  # (B, H), (B, W)
    return padded[torch.arange(B)[:, None, None, None], torch.arange(C)[:, None, None], rows[:, None, :, None], cols[:, None, None, :]]


# -----------------------------------------------------------------------------
# Token shards, and the sequences made of them


def fingerprint(rows, vq_dir, tokenizer_file, augment_copies):
    """A hash of everything the shards depend on: captions, image files (size + mtime), VQ weights,
    tokenizer. Same fingerprint -> nothing to do."""
    h = hashlib.sha256(json.dumps({"augment": augment_copies, "format": 2}).encode())  # 2: examples' kinds (MIX_KINDS)
    for r in rows:
        st = os.stat(r["image"]) if os.path.exists(r["image"]) else None
        h.update(json.dumps([str(r["image"]), r["captions"], r["split"], st and st.st_size, st and st.st_mtime_ns]).encode())
    for f in (Path(vq_dir) / "model.safetensors", Path(vq_dir) / "config.json", Path(tokenizer_file)):
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def write_shards(data, vq, vq_dir, tokenizer_file, out, augment_copies=0, seed=0, batch_size=64):
    """Tokenise a folder dataset once, with the image tokenizer `vq` (loaded from vq_dir: `vq.py shards`
    calls this) and the LLM's tokenizer.json: per split, `{split}.codes.npy` (N, n_tokens) image tokens,
    `{split}.text.npy` caption ids end to end with `{split}.offsets.npy` (N + 1) where each caption
    starts, and `{split}.jsonl` the captions as text. Each image is encoded as it is, plus
    `augment_copies` lightly augmented copies (training split only); each of its captions makes one
    example with those codes."""
    out = Path(out)
    tokenizer = load_tokenizer(tokenizer_file)
    rows = read_folder(data)
    key = fingerprint(rows, vq_dir, tokenizer_file, augment_copies)
    if (out / "index.json").exists() and json.loads((out / "index.json").read_text()).get("fingerprint") == key:
        print(f"{out} is up to date")
        return
    check_replaceable(out)
    rows, images = load_images(rows, vq.config.image_size)
    # codebook_size: every image token the LLM learns (codes, then any colour tokens)
    index = {"fingerprint": key, "codebook_size": vq.config.vocab_size, "colour_tokens": vq.config.colour_tokens, "grid": vq.config.grid,
             "image_size": vq.config.image_size, "vq": str(Path(vq_dir).resolve()), "data": str(Path(data).resolve()),
             "splits": {}}
    dtype = np.uint16 if vq.config.vocab_size <= 2**16 else np.int32
    g = torch.Generator().manual_seed(seed)
    with atomic_dir(out) as tmp:
        for split in ("train", "val"):
            keep = [i for i, r in enumerate(rows) if r["split"] == split]
            codes, text, offsets, lines = [], [], [0], []
            for c in range(1 + (augment_copies if split == "train" else 0)):
                batches = tqdm(range(0, len(keep), batch_size), desc=f"encoding {split} (copy {c + 1})", leave=False)
                with torch.no_grad():
                    image_codes = torch.cat([vq.tokenize(images[keep[b:b + batch_size]] if c == 0 else
                                                         augment(images[keep[b:b + batch_size]], g))
                                             for b in batches]) if keep else []
                for i, image in zip(keep, image_codes):  # one example per way of asking for the image
                    r = rows[i]
                    for phrasing, caption in enumerate(r["captions"]):
                        ids = tokenizer.encode(caption).ids
                        codes.append(image)
                        text.extend(ids)
                        offsets.append(offsets[-1] + len(ids))
                        lines.append(json.dumps({"image": str(r["image"]), "caption": caption, "copy": c,
                                                 "kind": example_kind(r, phrasing)}))
            np.save(tmp / f"{split}.codes.npy", (torch.stack(codes) if codes else torch.zeros(0, vq.config.n_tokens)).numpy().astype(dtype))
            np.save(tmp / f"{split}.text.npy", np.array(text, dtype=np.int32))
            np.save(tmp / f"{split}.offsets.npy", np.array(offsets, dtype=np.int64))
            (tmp / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines))
            index["splits"][split] = len(codes)
        (tmp / "index.json").write_text(json.dumps(index, indent=2))
    print(f"wrote {index['splits']} examples to {out}")


# What a data mix (train.py's mix) can draw more or less often: each example is one of these
MIX_KINDS = {"copy": "a recoloured copy of another picture", "multicolour": "a picture with no colour word",
             "bare": "a one-colour picture asked for by its first caption (OpenMoji: the bare name, 'lemon')",
             "original": "a one-colour picture asked for any other way ('an emoji of a lemon', 'a yellow lemon')"}


def example_kind(row, phrasing):
    """The MIX_KINDS kind of the example that asks for row's picture with its caption number `phrasing`."""
    return "copy" if row["object"] else "multicolour" if row["colour"] is None else "bare" if phrasing == 0 else "original"


def parse_mix(mix):
    """A data mix, "kind=n,kind=n" (MIX_KINDS, n a whole number >= 0) -> {kind: n}; "" -> {}."""
    out = {}
    for part in filter(None, (p.strip() for p in mix.split(","))):
        kind, _, n = part.partition("=")
        if kind.strip() not in MIX_KINDS or not n.strip().isdigit():
            raise BadInput(f"mix: {part!r} is not kind=n, with n a whole number >= 0 and kind one of {', '.join(MIX_KINDS)}")
        out[kind.strip()] = int(n)
    return out


def mix_repeats(shards, mix):
    """-> (len(shards),) how many times each example comes in an epoch under the data mix (parse_mix), or None for
    no mix: every example once."""
    weights = parse_mix(mix)
    if not weights:
        return None
    if None in shards.kinds:
        raise BadInput(f"mix: the shards in {shards.path} were written before examples had kinds; write them again "
                       "with the same vq.py shards command")
    repeats = np.array([weights.get(k, 1) for k in shards.kinds])
    if not repeats.any():
        raise BadInput(f"mix: {mix!r} leaves no training example")
    return repeats


class TokenShards:
    """Read-only view of one split of the shards: shards[i] -> (caption ids, image codes), int64 arrays.
    The arrays are memory-mapped: opening costs nothing, and workers share the pages. captions, kinds: each
    example's caption and MIX_KINDS kind (None in shards written before kinds were); describing: the example whose
    caption describes each one's picture (describing())."""

    def __init__(self, path, split):
        path = Path(path)
        if not (path / "index.json").exists():
            raise BadInput(f"no token shards in {path} (make them with: python vq.py shards ...)")
        self.path, self.index = path, json.loads((path / "index.json").read_text())
        if split not in self.index["splits"]:
            raise BadInput(f"no {split!r} split in {path}")
        self.codes = np.load(path / f"{split}.codes.npy", mmap_mode="r")
        self.text = np.load(path / f"{split}.text.npy", mmap_mode="r")
        self.offsets = np.load(path / f"{split}.offsets.npy", mmap_mode="r")
        examples = [json.loads(line) for line in (path / f"{split}.jsonl").read_text().splitlines()]
        self.captions, self.kinds = [e["caption"] for e in examples], [e.get("kind") for e in examples]
        self.describing = describing(examples)

    def __len__(self):
        return len(self.codes)

    def __getitem__(self, i):
        text = self.text[self.offsets[i]:self.offsets[i + 1]]
        return np.asarray(text, dtype=np.int64), np.asarray(self.codes[i], dtype=np.int64)


def describing(examples):
    """Shard examples ({"image", "caption", "copy"}) -> (N,) for each, the example of the same picture (the same image,
    the same augmented copy) whose caption describes it (#53): the last of its phrasings but the "an emoji of" one.
    The phrasings come in prepare.py's order (phrasings(): the bare name, "a ...", "an emoji of a ...", the colour
    one), so that is the one with its colour where the picture has one colour word ("a red bicycle"), else "a ..."
    ("a blue heart"); a recoloured copy has one caption ("a purple keycap #")."""
    best = {}
    for i, e in enumerate(examples):
        picture = e["image"], e.get("copy", 0)
        if not e["caption"].startswith("an emoji of") or picture not in best:
            best[picture] = i
    return np.array([best[e["image"], e.get("copy", 0)] for e in examples])


def make_batch(shards, indices, drop, model):
    """-> idx (B, T), targets (B, T), pad (B,): targets are the next image code at every position that predicts
    one, -1 elsewhere. Each example is  <bos> caption <boi> code_1 ... code_n <eoi> <eos>, left-padded with pad[i]
    <eos> tokens that no token sees (MMMoE.hidden_states), so that every row's <boi> is in one column: the columns before
    it are all text, which runs as the base runs it, and the image part is all image tokens, where PLoRA acts on
    every row. drop[i]: example i gets the unconditional prompt (its caption's tokens all <eos>: classifier-free
    guidance's caption dropout)."""
    seqs, tgts = [], []
    bos, boi, eoi, eos = model.start_token, model.image_token("boi"), model.image_token("eoi"), model.config.eos_token_id
    for i, d in zip(indices, drop):
        text, codes = shards[i]
        text = np.full_like(text, eos) if d else text
        image = model.image_token(codes)
        seq = np.concatenate([[bos], text, [boi], image, [eoi, eos]])
        tgt = np.full(len(seq), -1)
        tgt[1 + len(text):1 + len(text) + len(codes)] = image  # the <boi> position predicts the first code
        seqs.append(seq)
        tgts.append(tgt)
    return left_padded(seqs, tgts, eos)


def make_describe_batch(shards, indices, model, chat=None, ways=None):
    """The other direction (#53) -> idx, targets, pad as make_batch: each example <bos> <boi> code_1 ... code_n <eoi>
    words <eos>, the words those that describe its picture (shards.describing), the targets those words and the
    <eos> after them, each predicted by the position before it. The words are text rows, which run the frozen base
    (C1); they read the picture through attention, so the adapter learns from them only through what it computes at
    the picture's positions. chat: (tokenizer, around: a question -> the token ids before and after the picture,
    pipeline.around_a_picture) and ways: for each example the way it is asked (asked(); without ways, all plain).
    Half of the ways are a question about the picture in the chat format, as a chat model is asked: the chat's
    beginning (no <bos>: the format starts with its own), the picture then the question as the user's words, the
    answer and <eos> the targets."""
    seqs, tgts = [], []
    bos, boi, eoi, eos = model.start_token, model.image_token("boi"), model.image_token("eoi"), model.config.eos_token_id
    for i, way in zip(indices, np.zeros(len(indices), int) if ways is None else ways, strict=True):
        _, codes = shards[i]
        words, _ = shards[shards.describing[i]]
        before, after = [bos], []
        question = asked(shards.captions[shards.describing[i]], way) if chat is not None else None
        if question is not None:
            tokenizer, around = chat
            before, after = around(question[0])
            words = tokenizer.encode(question[1]).ids
        seq = np.array([*before, boi, *model.image_token(codes), eoi, *after, *words, eos], dtype=np.int64)
        tgt = np.full(len(seq), -1)
        # the token before the words predicts the first word, ..., the last word <eos>
        tgt[-len(words) - 2:-1] = seq[-len(words) - 1:]
        seqs.append(seq)
        tgts.append(tgt)
    return left_padded(seqs, tgts, eos)


def asked(description, way):
    """How a picture described by `description` is asked, way 0-5 -> None (0-2: plain, its words after it), or
    (question, answer): "What is this?" / "What is in the picture?" -> "A red bicycle." (3, 4), "What colour is it?"
    -> "Red." (5) where the description holds one colour word (with none, or two, what it is). sample.py --ask asks
    any question the same way."""
    if way < 3:
        return None
    colours = [w for w in description.split() if w in COLOUR_WORDS]
    if len(colours) == 1 and way == 5:
        return "What colour is it?", f"{colours[0].capitalize()}."
    return ("What is this?", "What is in the picture?")[way % 2], f"{description[0].upper()}{description[1:]}."


def left_padded(seqs, tgts, eos):
    """Sequences and their targets, of different lengths -> idx (B, T), targets (B, T), pad (B,): each row left-padded
    to the longest with eos (seen by no token) and targets -1 there."""
    T = max(map(len, seqs))
    pad = [T - len(s) for s in seqs]
    idx = torch.tensor(np.stack([np.pad(s, (p, 0), constant_values=eos) for s, p in zip(seqs, pad)]))
    targets = torch.tensor(np.stack([np.pad(t, (p, 0), constant_values=-1) for t, p in zip(tgts, pad)]))
    return idx, targets, torch.tensor(pad)


def english_text(tokenizer, n_tokens=4096):
    """Held-out English for the C1 check: CPython's own documentation, which ships with every Python."""
    ids = tokenizer.encode(" ".join(topics[k] for k in sorted(topics))).ids
    return torch.tensor(ids[:n_tokens])
