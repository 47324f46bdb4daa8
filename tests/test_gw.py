"""gw_init.py: GW finds known correspondences; shapes, dtypes, and bad input."""
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import gw_init
from mmmoe import BadInput


def rotated_permuted_copy(n=120, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) + torch.randn(d, generator=g)  # off-centre, so cosines vary
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    perm = torch.randperm(n, generator=g)
    return x, (x @ rotation)[perm], perm


@pytest.mark.parametrize("epsilon", [0.0, 2e-3])
def test_gw_recovers_a_rotated_permuted_copy(epsilon):
    x, y, perm = rotated_permuted_copy()
    coupling = gw_init.gw_coupling(x, y, torch.ones(len(x)), torch.ones(len(y)), epsilon)  # (n, n)
    # point perm[j] of x became point j of y: GW must send x[perm[j]] to y[j]
    matched = coupling.argmax(dim=1)
    recovered = (matched[perm] == torch.arange(len(x))).float().mean()
    assert recovered >= 0.95, recovered


def test_gw_embeddings_follow_the_geometry():
    """Codes that are the same point set as some text tokens (up to rotation) get those tokens' embeddings."""
    g = torch.Generator().manual_seed(1)
    text = torch.randn(300, 16, generator=g) * 0.5 + torch.randn(16, generator=g)
    _, pick = torch.sort(torch.rand(300, generator=g))
    source = text[pick[:60]]  # 60 tokens...
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=g))
    codebook = F.normalize(source @ rotation, dim=-1)  # ...seen as a codebook in another basis
    emb, = gw_init.gw_embeddings(codebook, source, anchors=60, epsilon=0.0, temperature=1e-3)
    hits = (torch.cdist(emb, source).argmin(dim=1) == torch.arange(60)).float().mean()
    assert hits >= 0.9, hits


@pytest.mark.parametrize("method", ["gw", "random", "mean"])
def test_init_shapes_and_norms(method):
    g = torch.Generator().manual_seed(0)
    codebook, embed, head = torch.randn(40, 8, generator=g), torch.randn(200, 32, generator=g), torch.randn(200, 32, generator=g)
    e, h = gw_init.init_image_rows(codebook, embed, head, method=method, anchors=16)
    assert e.shape == h.shape == (42, 32) and e.dtype == h.dtype == torch.float32  # 40 codes + <boi> + <eoi>
    assert torch.isfinite(e).all() and len(torch.unique(e, dim=0)) == 42  # no two new tokens coincide
    tied_e, tied_h = gw_init.init_image_rows(codebook, embed, None, method=method, anchors=16)
    assert tied_h is None and tied_e.shape == (42, 32)
    if method == "gw":  # rows carry the typical norm of a text embedding
        assert abs(e[:40].norm(dim=1).mean() / embed.norm(dim=1).mean() - 1) < 0.05
    quarter, _ = gw_init.init_image_rows(codebook, embed, head, method=method, anchors=16, scale=0.25)
    assert torch.allclose(quarter, e * 0.25)  # the same rows, a quarter of the size


def test_bad_input():
    with pytest.raises(BadInput, match="non-empty 2-D"):
        gw_init.gw_embeddings(torch.zeros(0, 8), torch.randn(10, 4))
    with pytest.raises(BadInput, match="non-empty 2-D"):
        gw_init.gw_embeddings(torch.randn(5, 8, 2), torch.randn(10, 4))
    with pytest.raises(BadInput, match="unknown --method"):
        gw_init.init_image_rows(torch.randn(5, 8), torch.randn(10, 4), method="magic")


def test_command_line(tiny_setup):
    base, vq_dir, tmp = tiny_setup["base"], tiny_setup["vq"], tiny_setup["tmp"]
    common = ["--base", str(base), "--vq", str(vq_dir), "--anchors", "8"]
    for extra, words in [(["--out", str(tmp / "nowhere" / "init.safetensors")], "must be a file in an existing directory"),
                         (["--out", str(tmp)], "must be a file in an existing directory"),
                         (["--out", str(tmp / "i.safetensors"), "--anchors", "0"], "--anchors must be at least 1"),
                         (["--out", str(tmp / "i.safetensors"), "--epsilon", "-1"], "--epsilon must be >= 0")]:
        with pytest.raises(BadInput, match=words):
            gw_init.main(common + extra)
    assert not (tmp / "i.safetensors").exists()
    gw_init.main(common + ["--out", str(tmp / "i.safetensors")])
    rows = load_file(tmp / "i.safetensors")
    assert rows["image_embed"].shape == (16 + 2, 64) and rows["image_head"].shape == (16 + 2, 64)  # untied base
    assert not list(tmp.glob(".i.safetensors.tmp-*"))  # written by a rename, no temporary left behind
