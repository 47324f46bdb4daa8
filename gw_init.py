"""
gw_init.py: where should the new image tokens start? Initialise their embeddings (and output rows) so
that the codebook's geometry matches the geometry of the LLM's text embeddings (Gromov-Wasserstein).

    python gw_init.py --base BASE_DIR --vq demo/vq --out image_init.safetensors [--method gw|random|mean]
                      [--anchors 1024] [--epsilon 0.05] [--seed 0]

The codes of a VQ codebook and the tokens of an LLM live in different spaces (8-d unit vectors vs
576-d embeddings), so they cannot be compared directly. What CAN be compared is their internal
geometry: which codes are near each other, which tokens are near each other. Gromov-Wasserstein finds a
soft matching (a coupling) between the two sets that keeps pairwise distances: codes that are alike
are sent to tokens that are alike. Each code's new embedding is then the coupling-weighted average
(barycentric projection) of the text embeddings it is matched to, rescaled to the typical norm of a
text embedding. The paper reports that this speeds up and steadies training; `train.py --init=...`
trains from it or from the alternatives, for the comparison:
  random  normal, with the text embeddings' standard deviation;
  mean    the mean text embedding plus a little noise.

Scale: distances within each side need K x K and N x N matrices, and the coupling is K x N; for Mixtral
(32,000 tokens) and LlamaGen's VQ-16 (16,384 codes) that is 1 + 4 + 2 GB. So both sides are first
summarised by k-means anchors (default 1024 each): GW matches anchors to anchors, every code takes a
soft mix of its nearest code anchors' projections, and every text anchor stands for its cluster.
"""
import argparse
import os
import time
import warnings
from pathlib import Path

import ot
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cli import BadInput, run
from hf import TensorReader, checkpoint_index
from mmmoe import MMMoEConfig
from vq import load_vq


def kmeans(x, k, iters=10, seed=0):
    """Plain Lloyd's k-means on the rows of x (n, d) -> centroids (k, d) and cluster sizes (k,)."""
    g = torch.Generator().manual_seed(seed)
    if k >= len(x):
        return x.clone(), torch.ones(len(x))
    centroids = x[torch.randperm(len(x), generator=g)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)  # (n,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).float()
        empty = counts == 0  # an empty cluster restarts at a random point
        centroids = torch.where(empty[:, None], x[torch.randint(0, len(x), (k,), generator=g)], sums / counts.clamp_min(1)[:, None])
    return centroids, torch.bincount(torch.cdist(x, centroids).argmin(dim=1), minlength=k).float()


def cosine_distances(x):
    """Pairwise cosine distance (n, n), scaled to mean 1 so both sides of the matching speak the same units."""
    x = F.normalize(x, dim=-1)
    d = (1 - x @ x.T).clamp_min(0)
    return d / d.mean()


def gw_coupling(code_anchors, text_anchors, code_mass, text_mass, epsilon):
    """Entropic Gromov-Wasserstein coupling (M, N) between code anchors and text anchors.
    Row i says how code anchor i's mass spreads over the text anchors."""
    C1, C2 = cosine_distances(code_anchors).double(), cosine_distances(text_anchors).double()
    p, q = (code_mass / code_mass.sum()).double(), (text_mass / text_mass.sum()).double()
    if epsilon > 0:
        # POT's entropic solver works in the plain (not log) domain: for too small an epsilon its kernel
        # underflows, it warns and returns the product coupling, which would give every code the same row
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = ot.gromov.entropic_gromov_wasserstein(C1, C2, p, q, "square_loss", epsilon=epsilon, max_iter=200)
        if any("failed to produce a transport plan" in str(w.message) for w in caught):
            raise BadInput(f"entropic GW found no transport plan at epsilon {epsilon}: use a larger --epsilon")
        return plan.float()
    return ot.gromov.gromov_wasserstein(C1, C2, p, q, "square_loss").float()  # exact (conditional gradient)


def gw_embeddings(codebook, text, anchors=1024, epsilon=0.05, seed=0, temperature=0.05, extra_text=()):
    """codebook (K, d), text embeddings (V, D) -> image-code embeddings (K, D) by GW matching.
    Tensors in `extra_text` (each (V, D), e.g. an untied output matrix) are projected with the same
    coupling, so the new output rows sit where the matching says too. Returns a list: [embeddings, *extras]."""
    if codebook.ndim != 2 or text.ndim != 2 or not len(codebook) or not len(text):
        raise BadInput(f"expected non-empty 2-D codebook and text embeddings, got {tuple(codebook.shape)} and {tuple(text.shape)}")
    text, codebook = text.float(), codebook.float()
    code_anchors, code_mass = kmeans(F.normalize(codebook, dim=-1), anchors, seed=seed)
    text_anchors, text_mass = kmeans(text, anchors, seed=seed)
    coupling = gw_coupling(code_anchors, text_anchors, code_mass, text_mass, epsilon)  # (M, N)
    coupling = coupling / coupling.sum(dim=1, keepdim=True).clamp_min(1e-30)  # rows -> distributions over text anchors
    # every code mixes the projections of its most similar code anchors (soft, so no two codes coincide)
    sim = F.normalize(codebook, dim=-1) @ F.normalize(code_anchors, dim=-1).T  # (K, M)
    mix = F.softmax(sim / temperature, dim=-1) @ coupling  # (K, N): each code as a distribution over text anchors
    assign = torch.cdist(text, text_anchors).argmin(dim=1)  # text anchor of every token
    outs = []
    for matrix in (text, *extra_text):
        matrix = matrix.float()
        # the anchor stands for its cluster: project onto cluster means of this matrix
        means = torch.zeros(len(text_anchors), matrix.shape[1]).index_add_(0, assign, matrix)
        means = means / torch.bincount(assign, minlength=len(text_anchors)).clamp_min(1)[:, None].float()
        emb = mix @ means  # (K, D) barycentric projection
        emb = emb - emb.mean(0) + matrix.mean(0)  # same centre as the text rows
        outs.append(emb * (matrix.norm(dim=1).mean() / emb.norm(dim=1).clamp_min(1e-8))[:, None])  # typical text norm
    return outs


def init_image_rows(codebook, embed, head=None, method="gw", anchors=1024, epsilon=0.05, seed=0, scale=1.0, extra=2):
    """-> (input embeddings (K + extra, D), output rows (K + extra, D) or None if tied) for K codes and `extra`
    tokens after them: any colour tokens (vq.py's hue_bins), then <boi>, <eoi>,
    all multiplied by scale (1: where the method puts them; for gw and random that is the typical norm of a
    text embedding, and tied rows are also the output layer's: the size of the first image logits).

    The extra tokens start at the mean of the new code embeddings plus a little noise: inside the image
    region of the space, but not equal to any code. For a tied base (one matrix for input and output),
    the image rows are tied as well and `head` is None."""
    g = torch.Generator().manual_seed(seed)
    K, D = len(codebook), embed.shape[1]
    embed = embed.float()
    extras = () if head is None else (head.float(),)
    if method == "gw":
        rows = gw_embeddings(codebook, embed, anchors, epsilon, seed, extra_text=extras)
    elif method == "random":
        rows = [torch.randn(K, D, generator=g) * m.std() for m in (embed, *extras)]
    elif method == "mean":
        rows = [m.mean(0) + torch.randn(K, D, generator=g) * m.std() * 0.1 for m in (embed, *extras)]
    else:
        raise BadInput(f"unknown --method {method!r}: gw, random or mean")
    out = []
    for r, m in zip(rows, (embed, *extras)):
        specials = r.mean(0) + torch.randn(extra, D, generator=g) * m.std() * 0.1  # [colours,] <boi>, <eoi>
        out.append(torch.cat([r, specials]) * scale)
    return out[0], (out[1] if head is not None else None)


def init_model(model, vq_dir, method="gw", seed=0, scale=1.0):
    """Give a model's new image rows (model.image_embed, and model.image_head if untied) their start:
    the codebook of the VQ in vq_dir matched to the model's text embeddings (or a baseline)."""
    codebook = load_vq(vq_dir).quantize.codebook().detach()
    head = None if model.config.tie_word_embeddings else model.lm_head.weight.detach().cpu()
    embed, out = init_image_rows(codebook, model.model.embed_tokens.weight.detach().cpu(), head, method, seed=seed,
                                 scale=scale, extra=len(model.image_embed) - len(codebook))
    with torch.no_grad():
        model.image_embed.copy_(embed)
        if out is not None:
            model.image_head.copy_(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a Hugging Face MoE checkpoint directory (Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE)")
    p.add_argument("--vq", required=True, help="VQ model directory")
    p.add_argument("--out", required=True, help="output .safetensors with image_embed (and image_head if untied)")
    p.add_argument("--method", default="gw", choices=["gw", "random", "mean"])
    p.add_argument("--anchors", type=int, default=1024)
    p.add_argument("--epsilon", type=float, default=0.05, help="entropic regularisation (0 = exact GW)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=float, default=1.0, help="multiply the new rows by this (1: where the method puts them)")
    args = p.parse_args(argv)
    out_path = Path(args.out)
    if args.anchors < 1:
        raise BadInput(f"--anchors must be at least 1, got {args.anchors}")
    if not args.epsilon >= 0:
        raise BadInput(f"--epsilon must be >= 0, got {args.epsilon}")
    if not 0 < args.scale < float("inf"):
        raise BadInput(f"--scale must be a number > 0, got {args.scale}")
    if out_path.is_dir() or not out_path.parent.is_dir():
        raise BadInput(f"--out {out_path} must be a file in an existing directory")
    t0 = time.time()
    cfg = MMMoEConfig.from_hf(args.base)
    read = TensorReader(checkpoint_index(Path(args.base)))
    embed = read("model.embed_tokens.weight").float()
    head = None if cfg.tie_word_embeddings else read("lm_head.weight").float()
    vq = load_vq(args.vq)
    codebook = vq.quantize.codebook().detach()
    image_embed, image_head = init_image_rows(codebook, embed, head, args.method, args.anchors, args.epsilon, args.seed,
                                              args.scale, 2 + vq.config.colour_tokens)
    out = {"image_embed": image_embed.contiguous()} | ({"image_head": image_head.contiguous()} if image_head is not None else {})
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    save_file(out, tmp)
    os.replace(tmp, out_path)  # atomic: a kill leaves the old file or the new one, never half of one
    print(f"wrote {args.out}: {len(codebook)} codes + {vq.config.colour_tokens} colour tokens + <boi>, <eoi> -> {embed.shape[1]}-d rows ({args.method}) "
          f"in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    run(main)
