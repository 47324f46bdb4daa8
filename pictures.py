"""
pictures.py: pixels for people. The image tokenizer's output, (3, H, W) tensors in [-1, 1], as PIL images, and
labelled grids of them at viewing size: what sample.py, analyze.py, train.py's learning curve, vq.py and the explorer
write. Every pixel of a 32-px emoji is enlarged to a sharp square (nearest neighbour).
"""
import torch
from PIL import Image, ImageDraw, ImageFont


def to_pil(x):
    """(3, H, W) in [-1, 1] -> PIL image"""
    return Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


def canvas(tiles, height, width):
    """A scene's 4 tiles, top-left, top-right, bottom-left, bottom-right, each a picture (3, H, W) or None (empty)
    -> one picture (3, 2H, 2W): the tiles side by side, no frame or gap, an empty tile white."""
    tiles = [torch.ones(3, height, width) if t is None else t for t in tiles]
    return torch.cat([torch.cat(tiles[:2], dim=2), torch.cat(tiles[2:], dim=2)], dim=1)  # rows of (3, H, 2W)


def on_canvas(drawing, size):
    """A drawing, [picture] or a scene's 4 tiles (pictures (3, size, size) or None), -> (3, 2 size, 2 size): the
    scene's canvas, or the single picture enlarged 2x (nearest neighbour: at any output size it looks as it would
    alone)."""
    if len(drawing) == 4:
        return canvas(drawing, size, size)
    return drawing[0].repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # each pixel a 2 x 2 square


def save_grid(rows_of_images, path, size=None, labels=None):
    """(R, C, 3, H, W) -> one image file with R rows of C pictures, each enlarged to size x size pixels
    (nearest neighbour: every pixel of a 32-px emoji stays a sharp square). labels: one per row (above
    it, running on), or R lists of C (one above each picture, wrapped to its width: up to three lines)."""
    R, C, _, H, W = rows_of_images.shape
    size = size or H
    font = ImageFont.load_default(size=max(10, min(16, size // 16)))
    if labels and isinstance(labels[0], str):  # one label per row: above its first picture, running on
        labels = [[[label]] + [[]] * (C - 1) for label in labels]
    elif labels:  # one per picture: its words in lines no wider than the picture
        labels = [[wrap(label, font, size - 8) for label in row] for row in labels]
    line = font.size + 4
    band = max((len(cell) for row in labels for cell in row), default=0) * line + 4 if labels else 0
    canvas = Image.new("RGB", (C * size, R * (size + band)), "white")
    draw = ImageDraw.Draw(canvas)
    for r in range(R):
        for c in range(C):
            y = r * (size + band)
            for k, text in enumerate(labels[r][c] if labels else []):
                draw.text((c * size + 4, y + 3 + k * line), text, fill="black", font=font)
            canvas.paste(to_pil(rows_of_images[r, c]).resize((size, size), Image.NEAREST), (c * size, y + band))
    canvas.save(path)


def wrap(text, font, width, max_lines=3):
    """text -> at most max_lines lines no wider than width pixels in font (the last one cut short with ... if need be)."""
    lines = []
    for word in text.split():
        if lines and font.getlength(lines[-1] + " " + word) <= width:
            lines[-1] += " " + word
        else:
            lines.append(word)
    lines = [cut(s, font, width) for s in lines]
    if len(lines) > max_lines:
        lines = lines[:max_lines - 1] + [cut(" ".join(lines[max_lines - 1:]) + "...", font, width)]
    return lines


def cut(text, font, width):
    """text, shortened with ... until it is no wider than width pixels."""
    while font.getlength(text) > width and len(text) > 3:
        text = text[:-4].rstrip() + "..."
    return text
