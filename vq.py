"""
vq.py: the image tokenizer. A VQ autoencoder turns an image into a grid of discrete codes the LLM
can predict, and codes back into an image.

    python vq.py train --data out/openmoji --out out/vq --preset demo      # resumable: add --resume
    python vq.py eval --vq demo/vq --data out/openmoji --grid recon.png     # PSNR, code usage, perplexity
    python vq.py shards --vq demo/vq --data out/openmoji --out out/shards  # a dataset -> token shards
    python vq.py encode --vq demo/vq a.png b.png > codes.jsonl
    python vq.py decode --vq demo/vq --codes codes.jsonl --out decoded.png
    python vq.py convert-llamagen vq_ds16_c2i.pt OUT_DIR                    # LlamaGen's published weights

The architecture is the taming-transformers / LlamaGen family (conv encoder and decoder of ResNet
blocks, attention at the lowest resolution, GroupNorm, swish), with LlamaGen's quantizer: a
low-dimensional codebook whose entries and latents are l2-normalised, so the nearest code is the most
similar direction (cosine lookup); this keeps most codes in use. Module names mirror LlamaGen's
`tokenizer/tokenizer_image/vq_model.py`, so its state dicts load as they are.

Training uses pixel L2 plus the codebook and commitment losses, a straight-through gradient, and
restarts codes that went unused. LlamaGen also trains with LPIPS and a PatchGAN; we have no perceptual
network weights offline, and the flat-coloured emoji of the demo do not need them.
"""
import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from cli import BadInput, run
from data import (augment, colour_word, dominant_hue, load_image, load_images, read_folder, standard_hue, turn_hue,
                  write_shards)
from pictures import save_grid
from runs import (atomic_dir, batch_at, check_replaceable, keep_freed_memory, load_optimizer, lr_at,
                  optimizer_tensors, read_json, read_tensors, recover_dir)
from upcycle import builtin_base


@dataclass
class VQConfig:
    image_size: int = 256
    codebook_size: int = 16384
    codebook_dim: int = 8
    ch: int = 128
    ch_mult: tuple = (1, 1, 2, 2, 4)  # one entry per resolution; each but the last halves it
    num_res_blocks: int = 2
    z_channels: int = 256
    beta: float = 0.25  # commitment loss weight
    # >= 0: a cell that is plain white in the image is always this code, whatever the encoder makes of it
    # (emoji are drawn on white: one code for "nothing here" instead of the 174 the demo VQ spread it over)
    background_code: int = -1
    # > 0: colour gets a token of its own. An image is first turned round the colour wheel until its dominant
    # hue lies in the first of hue_bins bins; its tokens are one colour token, K + the bin it was turned from
    # (K + hue_bins: no colour), then the codes of the turned image. A red pear and a blue pear are then the same
    # codes after different colour tokens: what the LLM learns of a shape carries over to every colour.
    hue_bins: int = 0

    @property
    def grid(self):
        """Codes per image side: 256 px with 5 levels -> 16 x 16 codes."""
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    @property
    def colour_tokens(self):
        return self.hue_bins + 1 if self.hue_bins else 0

    @property
    def vocab_size(self):
        """Image tokens the LLM learns: the codes, then the colour tokens."""
        return self.codebook_size + self.colour_tokens

    @property
    def n_tokens(self):
        """Tokens per image: the colour token, if any, then grid x grid codes."""
        return (self.colour_tokens > 0) + self.grid ** 2


PRESETS = {
    "llamagen-vq16": VQConfig(),  # 256 px -> 16 x 16 codes (LlamaGen VQ-16, also Janus's)
    "llamagen-vq8": VQConfig(ch_mult=(1, 2, 2, 4)),  # 256 px -> 32 x 32 codes
    # The built-in demo: 32 px emoji -> 8 x 8 = 64 codes, one per 4 x 4 pixels. 64 codes keep an image's
    # token sequence short enough to train and sample on a CPU; at 32 px an emoji still reads at a glance,
    # and a code covers 4x fewer pixels than at 64 px. 16,384 codes: 14 bits a cell, not 10, is what the
    # 64 codes lacked most (docs/vq.md: what was tried, with numbers).
    "demo": VQConfig(image_size=32, codebook_size=16384, codebook_dim=8, ch=32, ch_mult=(1, 2, 4),
                     num_res_blocks=1, z_channels=128),
}

# -----------------------------------------------------------------------------
# The model


def Normalize(c):
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1, self.conv1 = Normalize(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = Normalize(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the pixels of a (small) feature map."""

    def __init__(self, c):
        super().__init__()
        self.norm = Normalize(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (m(h).view(B, 1, C, H * W).transpose(2, 3) for m in (self.q, self.k, self.v))  # (B, 1, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as taming and LlamaGen do


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level(c_in, c_out, n_blocks, attn, resample):
    """One resolution: n ResNet blocks (each followed by attention at the lowest resolution), then resampling."""
    block = nn.Module()
    block.res = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out) for i in range(n_blocks))
    block.attn = nn.ModuleList(AttnBlock(c_out) for _ in range(n_blocks if attn else 0))
    if resample is not None:
        setattr(block, resample.__name__.lower(), resample(c_out))
    return block


def run_level(block, h):
    for i, res in enumerate(block.res):
        h = res(h)
        if len(block.attn):
            h = block.attn[i](h)
    for name in ("downsample", "upsample"):
        if hasattr(block, name):
            h = getattr(block, name)(h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs, last = [cfg.ch * m for m in cfg.ch_mult], len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            level(([cfg.ch] + chs)[i], chs[i], cfg.num_res_blocks, i == last, Downsample if i < last else None)
            for i in range(len(chs)))
        self.mid = nn.ModuleList([ResnetBlock(chs[-1], chs[-1]), AttnBlock(chs[-1]), ResnetBlock(chs[-1], chs[-1])])
        self.norm_out = Normalize(chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) -> (B, z, H/f, W/f)
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = run_level(block, h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs, last = [cfg.ch * m for m in cfg.ch_mult], len(cfg.ch_mult) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[-1], 3, padding=1)
        self.mid = nn.ModuleList([ResnetBlock(chs[-1], chs[-1]), AttnBlock(chs[-1]), ResnetBlock(chs[-1], chs[-1])])
        # from the lowest resolution up; the decoder has one more ResNet block per level than the encoder
        self.conv_blocks = nn.ModuleList(
            level(chs[min(i + 1, last)], chs[i], cfg.num_res_blocks + 1, i == last, Upsample if i > 0 else None)
            for i in reversed(range(len(chs))))
        self.norm_out = Normalize(chs[0])
        self.conv_out = nn.Conv2d(chs[0], 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = run_level(block, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.beta = cfg.beta
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_dim)
        nn.init.normal_(self.embedding.weight)

    def codebook(self):
        return F.normalize(self.embedding.weight, dim=-1)  # (K, d), unit vectors

    def forward(self, z):
        """z (B, d, h, w) -> (z_q with a straight-through gradient, codes (B, h, w), codebook + commitment loss)."""
        z = F.normalize(z.permute(0, 2, 3, 1).float(), dim=-1)  # (B, h, w, d), unit vectors
        codebook = self.codebook()
        codes = nearest_code(z.flatten(0, -2), codebook).view(z.shape[:-1])  # (B, h, w); no gradient flows through a choice
        z_q = codebook[codes]  # (B, h, w, d)
        # the codebook moves toward the encoder's latents; the encoder is held to its chosen codes (beta)
        loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
        z_q = z + (z_q - z).detach()  # straight-through: the decoder's gradient flows into the encoder
        return z_q.permute(0, 3, 1, 2), codes, loss


@torch.no_grad()
def nearest_code(z, codebook, rows=64):
    """unit vectors z (N, d), codebook (K, d) -> (N,) the index of each one's nearest code, i.e. its largest
    cosine similarity: (z @ codebook.T).argmax(-1), made `rows` rows at a time in one reused buffer. With
    d = 8 and K = 16,384 the whole (N, K) matrix (134 MB for a demo batch) costs more in fresh memory pages
    than in arithmetic; blocks of 64 rows fit in cache and take well under half the time."""
    buf = z.new_empty(min(rows, len(z)), len(codebook))
    return torch.cat([torch.mm(zi, codebook.T, out=buf[:len(zi)]).argmax(-1) for zi in z.split(rows)])


class VQModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.encoder, self.decoder = Encoder(cfg), Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

    def encode(self, x):
        """images (B, 3, H, W) in [-1, 1] -> (z_q (B, d, h, w), codes (B, h, w), vq loss)"""
        z_q, codes, loss = self.quantize(self.quant_conv(self.encoder(x)))
        return (*self.background(x, z_q, codes), loss)

    def background(self, x, z_q, codes):
        """With a background_code, every plain-white cell of x gets that code (and its codebook vector)."""
        b = self.config.background_code
        if b < 0:
            return z_q, codes
        white = white_cells(x, self.config.grid)  # (B, h, w)
        e = self.quantize.codebook()[b].to(z_q.dtype)  # (d,)
        return torch.where(white[:, None], e[None, :, None, None], z_q), torch.where(white, b, codes)

    def decode(self, z_q):
        return self.decoder(self.post_quant_conv(z_q))

    def decode_codes(self, codes):
        """codes (B, h, w) -> images (B, 3, H, W) in [-1, 1] (not clamped)"""
        return self.decode(self.quantize.codebook()[codes].permute(0, 3, 1, 2))

    def forward(self, x):
        z_q, codes, vq_loss = self.encode(x)
        return self.decode(z_q), codes, vq_loss

    @torch.no_grad()
    def tokenize(self, x):
        """images (B, 3, H, W) in [-1, 1] -> the LLM's image tokens (B, n_tokens): [colour token,] codes."""
        cfg = self.config
        if not cfg.hue_bins:
            return self.encode(x)[1].flatten(1)
        turned, bins = standard_hue(x, cfg.hue_bins)  # bins (B,): -1 for no colour
        colour = cfg.codebook_size + torch.where(bins < 0, cfg.hue_bins, bins)
        return torch.cat([colour[:, None], self.encode(turned)[1].flatten(1)], dim=1)

    @torch.no_grad()
    def detokenize(self, tokens):
        """image tokens (B, n_tokens) -> images (B, 3, H, W) in [-1, 1]: the codes decoded, turned back to their colour."""
        cfg = self.config
        x = self.decode_codes(tokens[:, -cfg.grid ** 2:].reshape(-1, cfg.grid, cfg.grid)).clamp(-1, 1)
        if not cfg.hue_bins:
            return x
        bins = tokens[:, 0] - cfg.codebook_size  # hue_bins: no colour, no turn
        return turn_hue(x, torch.where(bins < cfg.hue_bins, bins, 0) / cfg.hue_bins)

    def features(self, x):
        """images (B, 3, H, W) -> unit-length encoder features (B, d*h*w): what a picture shows, to find the
        most similar ones (retrieval in analyze.py and train.py's learning curve)."""
        return F.normalize(self.quant_conv(self.encoder(x)).flatten(1), dim=-1)

    def shape_features(self, x):
        """features() of the image turned to one standard colour (its dominant hue into the first of 12 bins):
        what it shows whatever its colour, to find the object in a picture drawn in a colour it never had."""
        return self.features(standard_hue(x)[0])

    @torch.no_grad()
    def gallery(self, images, objects, batch_size=256):
        """What drawn pictures are scored against: a dataset's images (N, 3, H, W) and objects (N,), the index
        of the image each one is a recoloured copy of (its own index if it is an original)."""
        parts = [(self.features(x), self.shape_features(x)) for x in images.split(batch_size)]
        return {"features": torch.cat([f for f, _ in parts]), "shapes": torch.cat([s for _, s in parts]),
                "hues": dominant_hue(images), "colours": [colour_word(x) for x in images], "objects": objects.to(images.device)}

    @torch.no_grad()
    def scores(self, pictures, gallery, own):
        """Does each picture (B, 3, H, W) show what was asked, the gallery's image own (B,)? -> per picture:
        rank, where that image comes among the gallery by feature similarity (0: the most similar, top-1);
        hue_ok, 1 if the dominant hues agree, 0 if not, -1 where the image has no colour; colour, the colour
        word of the picture (or None) and colour_ok, whether it is the asked image's (-1: that has none);
        object_rank, where the asked image's object comes among the gallery's objects by shape, whatever
        the colours (a blue pear drawn as a green pear is rank 0); original_rank, where the asked image's object
        comes among the originals alone by feature similarity (recoloured copies left out of the gallery)."""
        x, own = pictures.clamp(-1, 1), own.to(pictures.device)
        def rank(f, g, i):  # where g[i] comes among g by similarity to f: the number of entries more similar
            similarity = f @ g.T  # (B, N)
            return (similarity > similarity.gather(1, i[:, None])).sum(1)
        is_object = gallery["objects"] == torch.arange(len(gallery["objects"]), device=x.device)
        objects = gallery["objects"][own]  # (B,) gallery indices of the asked objects
        want, drawn = gallery["hues"][own], dominant_hue(x)
        colour = [colour_word(p) for p in x]
        asked = [gallery["colours"][i] for i in own.tolist()]
        return {"rank": rank(self.features(x), gallery["features"], own),
                "object_rank": rank(self.shape_features(x), gallery["shapes"][is_object], is_object.cumsum(0)[objects] - 1),
                "original_rank": rank(self.features(x), gallery["features"][is_object], is_object.cumsum(0)[objects] - 1),
                "hue_ok": torch.where(want < 0, -1, (drawn == want).long()),
                "colour": colour, "colour_ok": torch.tensor([-1 if a is None else int(a == c) for a, c in zip(asked, colour)], device=x.device)}


def score_summary(scores):
    """VQModel.scores of some pictures -> their figures (shares in 0..1): top-1 and top-5 retrieval of the asked
    picture, its median rank, top-1 among the originals alone, hue and colour-word agreement, the asked object in
    the top 5 by shape, and the colour and the object both right (composition)."""
    share = lambda ok: ok[ok >= 0].float().mean().item() if (ok >= 0).any() else 0.0  # noqa: E731
    ranks = scores["rank"]
    return {"top1": (ranks < 1).float().mean().item(), "top5": (ranks < 5).float().mean().item(),
            "median_rank": int(ranks.sort().values[len(ranks) // 2]), "original_top1": (scores["original_rank"] < 1).float().mean().item(),
            "hue": share(scores["hue_ok"]),
            "colour": share(scores["colour_ok"]), "object_top1": (scores["object_rank"] < 1).float().mean().item(),
            "object_top5": (scores["object_rank"] < 5).float().mean().item(),
            "both": share(torch.where(scores["colour_ok"] >= 0, scores["colour_ok"] * (scores["object_rank"] < 5), -1))}


def white_cells(x, grid):
    """images (B, 3, H, W) in [-1, 1] -> (B, grid, grid): True where a code's whole cell is plain white."""
    cell = x.shape[-1] // grid
    return (x.unfold(2, cell, cell).unfold(3, cell, cell) > 0.9).flatten(-2).all(-1).all(1)


def save_vq(model, path, extra=None):
    """The project's format: config.json + model.safetensors (+ extra files), written atomically."""
    with atomic_dir(path) as tmp:
        (tmp / "config.json").write_text(json.dumps(asdict(model.config), indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
        for name, write in (extra or {}).items():
            write(tmp / name)


def load_vq(path, device="cpu"):
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "model.safetensors").exists():
        raise BadInput(f"no VQ model in {path} (expected config.json and model.safetensors)")
    try:
        cfg = VQConfig(**read_json(path / "config.json"))
    except TypeError as e:
        raise BadInput(f"damaged checkpoint file {path / 'config.json'}: {e}") from None
    cfg.ch_mult = tuple(cfg.ch_mult)
    model = VQModel(cfg)
    load_state_dict_checked(model, read_tensors(path / "model.safetensors"), path)
    return model.to(device).eval()


def load_state_dict_checked(model, sd, source):
    expected = model.state_dict()
    for k in expected:
        if k not in sd:
            raise BadInput(f"missing tensor {k} in {source}")
        if sd[k].shape != expected[k].shape:
            raise BadInput(f"shape mismatch for {k}: checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)}")
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        raise BadInput(f"unexpected tensor {unexpected[0]} in {source}")
    model.load_state_dict(sd)


def convert_llamagen(src, out, image_size=256):
    """LlamaGen's published checkpoint (torch.save of {"model"|"ema"|"state_dict": state dict}) -> our format.
    The architecture (levels, widths, codebook) is read off the tensor shapes."""
    if not Path(src).is_file():
        raise BadInput(f"no such file: {src}")
    try:  # weights_only: tensors and plain containers are rebuilt, no code in the file ever runs
        ckpt = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError or EOFError, with advice we do not want
        why = "it holds Python objects besides tensors" if "Weights only load failed" in str(e) else "not a torch.save file"
        raise BadInput(f"{src} is not a plain state dict of tensors ({why})") from None
    sd = next((ckpt[k] for k in ("ema", "model", "state_dict") if isinstance(ckpt, dict) and k in ckpt), ckpt)
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise BadInput(f"{src} is not a plain state dict of tensors (found a {type(sd).__name__})")
    sd = {k: v for k, v in sd.items() if k != "quantize.codebook_used"}  # a training-time usage counter
    try:
        K, d = sd["quantize.embedding.weight"].shape
        ch = sd["encoder.conv_in.weight"].shape[0]
        n_levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks."))
        ch_mult = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(n_levels))
        n_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.conv_blocks.0.res."))
        z = sd["encoder.conv_out.weight"].shape[0]
    except (KeyError, ValueError, AttributeError):
        raise BadInput(f"{src} does not look like a LlamaGen VQ state dict") from None
    model = VQModel(VQConfig(image_size=image_size, codebook_size=K, codebook_dim=d, ch=ch, ch_mult=ch_mult,
                             num_res_blocks=n_res, z_channels=z))
    load_state_dict_checked(model, sd, src)
    save_vq(model, out)
    return model

# -----------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    preset: str = "demo"
    steps: int = 6000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    restart_every: int = 200  # steps between dead-code restarts
    colour_loss: float = 0.0  # weight of an extra L2 on grid-cell mean colours (each code's cell)
    chroma_loss: float = 0.0  # weight of an extra L2 on each pixel's chroma (its colour minus its grey)
    eval_every: int = 500  # steps between held-out PSNR and hue figures (log and progress line)
    save_every: int = 250
    seed: int = 0
    background: bool = False  # plain-white cells get one code: the one the encoder gives the middle of a white image
    decoder_of: str = ""  # train only the decoder of this trained VQ: its encoder and codebook, every code's meaning, stay
    hue_bins: int = 0  # > 0: colour as a token of its own (VQConfig.hue_bins): train on images turned to the first bin


def psnr(x, y):
    """PSNR in dB between image batches in [-1, 1], per image, on the usual [0, 1] scale."""
    mse = ((x.clamp(-1, 1) - y) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def restart_dead_codes(model, usage, latents, generator):
    """Codes no latent chose since the last restart get a fresh start at a random recent latent, so the
    whole codebook stays in use. Returns how many were restarted."""
    dead = (usage == 0).nonzero().squeeze(1)
    if len(dead):
        pick = torch.randint(0, latents.shape[0], (len(dead),), generator=generator)
        with torch.no_grad():
            model.quantize.embedding.weight[dead] = latents[pick].to(model.quantize.embedding.weight.dtype)
    usage.zero_()
    return len(dead)


def train(data, out, tc, resume=False, device=None, max_minutes=None, vq_config=None):
    """Train (or with resume=True continue) a VQ on a folder dataset; checkpoints go to `out`."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out)
    recover_dir(out)
    if (out / "train_state.json").exists() and not resume:
        raise BadInput(f"{out} already holds a VQ training run: add --resume to continue it, or choose another --out")
    check_replaceable(out)
    resuming = resume and (out / "train_state.json").exists()
    if resuming:  # a resumed run keeps its own settings: say so rather than ignore the command line's
        saved = read_json(out / "train_state.json", ("train_config",))["train_config"]
        differ = [f"--{k.replace('_', '-')} {v} (run: {saved[k]})" for k, v in asdict(tc).items() if k in saved and saved[k] != v]
        if differ:
            raise BadInput(f"{out} is a run with other settings: {', '.join(differ)}; resume it with its own")
    torch.manual_seed(tc.seed)  # the initial weights, too, are a function of the seed
    model = load_vq(out) if resuming else load_vq(tc.decoder_of) if tc.decoder_of else VQModel(vq_config or PRESETS[tc.preset])
    if tc.background and model.config.background_code < 0:
        g = model.config.grid
        with torch.no_grad():
            white = model.encode(torch.ones(1, 3, model.config.image_size, model.config.image_size))[1][0, g // 2, g // 2]
        model.config = replace(model.config, background_code=int(white))
    if tc.hue_bins:
        model.config = replace(model.config, hue_bins=tc.hue_bins)
    for part in (model.encoder, model.quant_conv, model.quantize) if tc.decoder_of else ():
        part.requires_grad_(False)
    cfg = model.config
    rows = read_folder(data)
    _, images = load_images([r for r in rows if r["split"] == "train"], cfg.image_size)
    val_rows = [r for r in rows if r["split"] == "val"]
    held_out = load_images(val_rows, cfg.image_size)[1].to(device) if val_rows else None  # (N, 3, H, W) or None
    model.to(device).train()
    keep_freed_memory()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=tc.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, log = 0, []
    usage = torch.zeros(cfg.codebook_size, device=device)  # how often each code was chosen since the last restart
    if resuming:
        state = read_json(out / "train_state.json", ("step", "log", "train_config", "optimizer"))
        step, log = state["step"], state["log"]
        tensors = read_tensors(out / "train_state.safetensors")
        if "usage" not in tensors:
            raise BadInput(f"damaged checkpoint file {out / 'train_state.safetensors'}: no 'usage'")
        usage.copy_(tensors.pop("usage"))
        load_optimizer(opt, tensors, state["optimizer"]["param_groups"])
        print(f"resuming {out} at step {step}", file=sys.stderr)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)
    t0 = time.time()
    bar = tqdm(total=tc.steps, initial=step, desc="training VQ", unit="step")
    while step < tc.steps:
        g = torch.Generator().manual_seed(tc.seed * 1000003 + step)
        x = augment(images[torch.from_numpy(batch_at(len(images), tc.batch_size, step, tc.seed))], g).to(device)
        if cfg.hue_bins:  # the codes then only need to draw shapes in one colour; the colour token says which
            x = standard_hue(x, cfg.hue_bins)[0]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc.lr, tc.warmup, tc.steps)
        with autocast, torch.set_grad_enabled(not tc.decoder_of):
            z = model.quant_conv(model.encoder(x))
            z_q, codes, vq_loss = model.quantize(z)
            z_q, codes = model.background(x, z_q, codes)
        with autocast:
            recon = model.decode(z_q.to(z.dtype))
            rec_loss = F.mse_loss(recon.float(), x)
            # flat-coloured images: the mean colour of each code's cell is what a code must above all carry
            cell = cfg.image_size // cfg.grid
            colour_loss = F.mse_loss(F.avg_pool2d(recon.float(), cell), F.avg_pool2d(x, cell))
            chroma = lambda im: im - im.mean(1, keepdim=True)  # noqa: E731
            chroma_loss = F.mse_loss(chroma(recon.float()), chroma(x))
        loss = rec_loss + vq_loss + tc.colour_loss * colour_loss + tc.chroma_loss * chroma_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        usage += torch.bincount(codes.flatten(), minlength=cfg.codebook_size)
        step += 1
        if step % tc.restart_every == 0 and step < tc.steps * 0.9 and not tc.decoder_of:
            latents = F.normalize(z.detach().permute(0, 2, 3, 1).reshape(-1, cfg.codebook_dim).float(), dim=-1)
            restarted = restart_dead_codes(model, usage, latents, g)
            log.append({"step": step, "restarted_codes": restarted})
        bar.update(1)
        bar.set_postfix(psnr=f"{psnr(recon.detach().float(), x).mean():.1f}", loss=f"{loss.item():.4f}")
        if step % 50 == 0:
            log.append({"step": step, "loss": loss.item(), "rec_loss": rec_loss.item(), "minutes": (time.time() - t0) / 60})
        if held_out is not None and (step % tc.eval_every == 0 or step == tc.steps):
            figures = {"step": step} | held_out_figures(held_out, reconstruct(model, held_out)[1])
            log.append(figures)
            bar.write(f"step {step}: held-out PSNR {figures['psnr_val']:.2f} dB, hue right {figures['hue_match_val']:.1%}")
        out_of_time = max_minutes is not None and time.time() - t0 > 60 * max_minutes
        if step % tc.save_every == 0 or step == tc.steps or out_of_time:
            save_training(model, opt, usage, step, tc, log, out)
        if out_of_time:
            print(f"stopped at step {step} after {max_minutes} min; continue with --resume", file=sys.stderr)
            break
    bar.close()
    return model.eval()


def save_training(model, opt, usage, step, tc, log, out):
    """Model, optimizer, code usage, step and config, in one atomic directory swap."""
    tensors, param_groups = optimizer_tensors(opt)
    tensors |= {"usage": usage.cpu()}
    state = {"step": step, "train_config": asdict(tc), "optimizer": {"param_groups": param_groups}, "log": log}
    save_vq(model, out, {"train_state.safetensors": lambda p: save_file(tensors, p),
                         "train_state.json": lambda p: p.write_text(json.dumps(state))})

# -----------------------------------------------------------------------------
# Evaluation and the command line


@torch.no_grad()
def encode_images(model, images, batch_size=64):
    """(N, 3, H, W) in [-1, 1] -> image tokens (N, n_tokens) int64"""
    return torch.cat([model.tokenize(x) for x in images.split(batch_size)])


@torch.no_grad()
def reconstruct(model, images):
    """(N, 3, H, W) in [-1, 1] -> their tokens (N, n_tokens) and the images decoded from them (N, 3, H, W)"""
    tokens = encode_images(model, images)
    return tokens, torch.cat([model.detokenize(t) for t in tokens.split(64)])


def held_out_figures(images, recon):
    """The two figures a VQ is judged by: mean PSNR, and how often a reconstruction's dominant hue is the
    original's (among the images that have one)."""
    hue, hue_recon = dominant_hue(images.cpu()), dominant_hue(recon.cpu())
    return {"psnr_val": psnr(recon, images).mean().item(), "hue_match_val": (hue == hue_recon)[hue >= 0].float().mean().item()}


@torch.no_grad()
def evaluate(model, data, grid=None):
    rows = read_folder(data)
    rows, images = load_images(rows, model.config.image_size)
    tokens, recon = reconstruct(model, images)
    codes = tokens[:, -model.config.grid ** 2:].reshape(-1, model.config.grid, model.config.grid)  # (N, h, w)
    val = torch.tensor([r["split"] == "val" for r in rows])
    counts = torch.bincount(codes.flatten(), minlength=model.config.codebook_size).float()
    p = counts / counts.sum()
    # What the LLM must predict where a picture is plain white (emoji are drawn on white): the more codes share
    # that one look, the more arbitrary choices it has to learn. The entropy of the code on all-white cells: 0 if
    # white is always one code.
    white = white_cells(images, model.config.grid)  # (N, h, w)
    _, n = torch.unique(codes[white], return_counts=True)
    q = n / max(1, n.sum())
    result = held_out_figures(images[val], recon[val]) | {
              "psnr_train": psnr(recon[~val], images[~val]).mean().item(),
              "white_cells": white.float().mean().item(), "white_codes": len(n), "white_code_entropy": -(q * q.log()).sum().item(),
              "codebook_usage": (counts > 0).float().mean().item(), "code_perplexity": math.exp(-(p[p > 0] * p[p > 0].log()).sum().item()),
              "images": len(rows), "held_out": int(val.sum())}
    if grid:
        save_grid(torch.stack([images[val][:16], recon[val][:16]]), grid, size=96,
                  labels=["held-out emoji", f"their reconstructions from {model.config.grid ** 2} codes each"])
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train a VQ on a folder dataset")
    t.add_argument("--data", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--max-minutes", type=float, default=None, help="save and stop after this long")
    for f, v in asdict(TrainConfig()).items():
        if isinstance(v, bool):
            t.add_argument("--" + f.replace("_", "-"), action="store_true")
        else:
            t.add_argument("--" + f.replace("_", "-"), type=type(v), default=v)
    e = sub.add_parser("eval", help="held-out PSNR, codebook usage and code perplexity")
    e.add_argument("--vq", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--grid", help="write originals over reconstructions (held-out) to this PNG")
    sh = sub.add_parser("shards", help="a folder dataset -> token shards for train.py (the data package's format)")
    sh.add_argument("--vq", required=True)
    sh.add_argument("--data", required=True)
    sh.add_argument("--out", required=True)
    sh.add_argument("--tokenizer", default=None, help="tokenizer.json, or a checkpoint directory holding one "
                    "(default: the built-in base's)")
    sh.add_argument("--augment", type=int, default=0, help="extra augmented copies of each training image")
    en = sub.add_parser("encode", help="images -> one JSON line of codes each")
    en.add_argument("--vq", required=True)
    en.add_argument("images", nargs="+")
    de = sub.add_parser("decode", help="JSON lines of codes -> a row of images")
    de.add_argument("--vq", required=True)
    de.add_argument("--codes", required=True)
    de.add_argument("--out", required=True)
    c = sub.add_parser("convert-llamagen", help="LlamaGen's VQ weights -> this project's format")
    c.add_argument("src")
    c.add_argument("out")
    c.add_argument("--image-size", type=int, default=256)
    args = p.parse_args(argv)
    if args.cmd == "train":
        if args.preset not in PRESETS:
            raise BadInput(f"unknown preset {args.preset!r}: {', '.join(PRESETS)}")
        if not 0 <= args.hue_bins <= 360:
            raise BadInput(f"--hue-bins must be 0 (no colour tokens) .. 360 (got {args.hue_bins})")
        tc = TrainConfig(**{f: getattr(args, f) for f in asdict(TrainConfig())})
        train(args.data, args.out, tc, resume=args.resume, max_minutes=args.max_minutes)
    elif args.cmd == "eval":
        print(json.dumps(evaluate(load_vq(args.vq), args.data, args.grid), indent=2))
    elif args.cmd == "shards":
        tok = Path(args.tokenizer) if args.tokenizer else builtin_base()
        tok = tok / "tokenizer.json" if tok.is_dir() else tok
        write_shards(args.data, load_vq(args.vq), args.vq, tok, args.out, args.augment)
    elif args.cmd == "encode":
        model = load_vq(args.vq)
        for f in args.images:
            x = load_image(f, model.config.image_size)
            if x is None:
                raise BadInput(f"cannot read image {f}")
            print(json.dumps({"image": f, "codes": encode_images(model, x[None])[0].tolist()}))
    elif args.cmd == "decode":
        model = load_vq(args.vq)
        cfg = model.config
        n, K, C = cfg.n_tokens, cfg.codebook_size, cfg.colour_tokens
        want = f"{n} integers: " + (f"a colour token in {K}..{K + C - 1}, then " if C else "") + f"{cfg.grid} x {cfg.grid} codes in 0..{K - 1}"
        if not Path(args.codes).is_file():
            raise BadInput(f"no codes file {args.codes}")
        codes = []
        for i, line in enumerate(Path(args.codes).read_text().splitlines(), 1):
            if line.strip():
                try:
                    c = torch.tensor(json.loads(line)["codes"]).flatten()
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    raise BadInput(f"{args.codes}:{i}: expected a JSON object with \"codes\": {want}") from None
                if c.dtype != torch.int64 or c.numel() != n or not (0 <= c[C > 0:].min() and c[C > 0:].max() < K) or \
                        (C and not K <= c[0] < K + C):
                    raise BadInput(f"{args.codes}:{i}: expected {want} for this VQ")
                codes.append(c)
        if not codes:
            raise BadInput(f"no codes in {args.codes}")
        save_grid(model.detokenize(torch.stack(codes))[None], args.out, size=256)
    elif args.cmd == "convert-llamagen":
        convert_llamagen(args.src, args.out, args.image_size)


if __name__ == "__main__":
    run(main)
