"""
mmmoe.py: a Mixture-of-Experts transformer in one file, with the paper's Partial LoRA for images. It reads the Hugging
Face Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE layouts: each difference is a config field and the few lines that use it.

Part of mmmoe, a reference implementation of Dutt et al. (arXiv 2503.22517): a pretrained text MoE learns to write
discrete image codes while every text token keeps flowing through the frozen weights. Read top to bottom, the idea
unfolds in this order:
  1. configs: the text MoE (MMMoEConfig) and what the paper adds to it (AdapterConfig)
  2. PLoRA, `plora()`: a low-rank update that acts at image positions only; C1 starts there
  3. attention and the routed experts, every projection through PLoRA; `expert()`, the routed expert update
  4. the model: the adapter (`add_image_adapter`, C2), C1 whole (`text_then_images`), where the images are
     (`hidden_states`), the loss each modality apart (`loss`), drawing (`generate_image`)
  5. the same, faster: copied experts computed once (`shared_base`), a one-token attention step, PLoRA folded into
     the weights while drawing, the few-row matmul form. Each equals the plain path above; the test that proves it
     is named where it is defined (docs/model.md lists them).
Hugging Face checkpoint I/O lives in hf.py.

    python mmmoe.py CHECKPOINT_DIR "The capital of France is"     # continue a text prompt
"""
import argparse
import json
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from safetensors.torch import save_file

from cli import BadInput, run
from hf import config_fields, hf_config, hf_state_dict, load_checkpoint, load_tokenizer, write_hf_checkpoint
from runs import read_json, read_tensors

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# -----------------------------------------------------------------------------
# Config


@dataclass
class MMMoEConfig:
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 8  # grouped-query attention: each K/V head serves n_heads // n_kv_heads queries
    head_dim: int = 128
    intermediate_size: int = 14336  # per expert
    n_experts: int = 8
    top_k: int = 2  # experts per token
    rope_theta: float = 1e6
    norm_eps: float = 1e-5
    max_seq_len: int = 32768
    sliding_window: int | None = None  # None: full causal attention
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    dtype: str = "bfloat16"  # the dtype the checkpoint was saved in

    # What the layouts beyond Mixtral add (hf.config_fields reads them from config.json; all off for Mixtral)
    layout: str = "mixtral"  # the checkpoint's names: mixtral, qwen2_moe, qwen3_moe or olmoe (hf.LAYOUT_NAMES)
    norm_topk_prob: bool = True  # renormalise the top-k router weights to sum to 1 (Mixtral does; OLMoE does not)
    qkv_bias: bool = False  # biases on q, k, v (Qwen2-MoE)
    o_bias: bool = False  # and on o (attention_bias in Qwen3-MoE and OLMoE; off in their releases)
    qk_norm: str | None = None  # RMSNorm on q and k: "head", each head's (Qwen3-MoE); "all", the projection's (OLMoE)
    clip_qkv: float | None = None  # q, k, v clamped to +-clip_qkv (OLMoE, where set)
    shared_expert_size: int = 0  # an always-on expert of this width, scaled by a sigmoid gate per token (Qwen2-MoE)
    dense_layers: tuple = ()  # layers with a dense SwiGLU MLP instead of experts (Qwen's mlp_only_layers)
    dense_size: int = 0  # that MLP's intermediate size

    @classmethod
    def from_hf(cls, path_or_dict):
        """Read a Hugging Face config.json of any of the four layouts (a directory, the file, or the parsed dict)."""
        return cls(**config_fields(path_or_dict))

    def to_hf(self):
        """The config.json its layout's loaders read."""
        return hf_config(self)


@dataclass
class AdapterConfig:
    """What the paper adds to a text MoE: image tokens, and Partial LoRA (PLoRA) updates that act on
    image-token positions only. Image codes take ids V..V+K-1 after the V text tokens, then <boi>, <eoi> (and with
    scene_tokens <scene>, <empty>: a 2 x 2 canvas of tiles, each a picture or empty)."""
    n_image_codes: int = 1024  # the image tokenizer's vocabulary K (VQ codes, then any colour tokens)
    colour_tokens: int = 0  # the last this many of them only ever start an image (a VQ with hue_bins)
    rank: int = 8
    alpha: float = 16.0
    attention: bool = True  # LoRA on q/k/v/o as well as on every expert's w1/w2/w3
    # LoRA on the router too, by default: with a frozen router, image tokens could only be routed as their hidden
    # states fall, and no expert could learn to take images. Text routing is untouched all the same (C1).
    router: bool = True
    # the experts' updates' rank, if not rank: a dense base's one expert at rank 32 has the budget of 8 at rank 4
    expert_rank: int = 0
    # two more image tokens for scenes: <boi> <scene> tile_0 .. tile_3 <eoi>, a tile <empty> or a picture's tokens
    scene_tokens: bool = False

# -----------------------------------------------------------------------------
# Building blocks. A projection below is `linear(x, w)`, which is x @ w.T (a faster form for a few rows on some
# CPUs is chosen at the end of the file), or an nn.Linear where it has a bias or is the router.


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x * rsqrt(mean(x^2) + eps) in float32 like the reference, cast back before the gain
        return self.weight * F.rms_norm(x.float(), x.shape[-1:], eps=self.eps).to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    """RoPE tables for integer positions (T,) or (B, T) -> cos, sin (..., T, head_dim), in float32 then in dtype."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[..., None] * inv_freq  # (..., T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, hd): the "rotate_half" layout pairs i with i + hd/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, nh, T, hd)

# -----------------------------------------------------------------------------
# The paper's mechanism: Partial LoRA (PLoRA)


class LoRA(nn.Module):
    """x -> B(A(x)) * alpha / r, a low-rank update of a frozen (out, in) weight. With n_experts there is one per expert,
    side by side: A = [A_1; ...; A_E] is (E*r, in) and B = [B_1 ... B_E] is (out, E*r), and expert e uses its own
    block. B starts at zero: an untrained adapter changes nothing."""

    def __init__(self, n_in, n_out, rank, alpha, n_experts=1):
        super().__init__()
        self.rank, self.scale = rank, alpha / rank
        self.A = nn.Parameter(torch.randn(n_experts * rank, n_in) / math.sqrt(n_in))
        self.B = nn.Parameter(torch.zeros(n_out, n_experts * rank))

    def forward(self, x, expert=0):
        r = slice(expert * self.rank, (expert + 1) * self.rank)  # this expert's block
        return linear(linear(x, self.A[r]) * self.scale, self.B[:, r])  # scaled at rank r: the smallest tensor


def plora(y, x, lora, image_rows, expert=0):
    """Partial LoRA: y + B A x at image rows, y at every other row, where y = W x is the frozen projection of x and
    image_rows (..., 1) is true at image tokens (None: there are none). C1: a text row's output IS y, bit for bit."""
    if lora is None or image_rows is None:
        return y
    return torch.where(image_rows, y + lora(x, expert), y)

# -----------------------------------------------------------------------------
# Attention: q, k, v and o each through PLoRA


class KVCache(nn.Module):
    """Preallocated keys and values for generation (gpt-fast style): positions are written in place."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):  # input_pos (T,), k/v (B, n_kv, T, hd); under autocast, any dtype
        self.k[:, :, input_pos] = k.to(self.k.dtype)
        self.v[:, :, input_pos] = v.to(self.v.dtype)
        return self.k, self.v  # (B, n_kv, S, hd)


def attend(q, k, v, mask):
    """softmax(q k^T / sqrt(hd), where mask allows) v: q (B, nh, T, hd), k and v (B, n_kv, S, hd), each K/V head read
    by nh / n_kv query heads; mask (T, S) or (B, 1, T, S) bool, None for plain causal attention -> (B, nh, T, hd)."""
    # on a CPU, at these short lengths, the plain math kernel is the faster one (docs/speed.md)
    with sdpa_kernel(SDPBackend.MATH) if q.device.type == "cpu" else nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)


def attention_mask(q_pos, k_pos, window):
    """q_pos (..., Tq), k_pos (..., Tk) -> (..., Tq, Tk) bool, True where a query may attend: causal, and within
    the sliding window if any: key k is visible from query q when k <= q and q - k < window (Mistral/Mixtral's
    convention). Left padding (negative positions) is seen by no token but itself (a query with no key would be NaN)."""
    diff = q_pos[..., :, None] - k_pos[..., None, :]
    mask = (diff >= 0) & ((k_pos[..., None, :] >= 0) | (diff == 0))
    return mask & (diff < window) if window is not None else mask


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.clip = cfg.clip_qkv
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, q, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, cfg.dim, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # over each head (Qwen3-MoE) or over the whole projection (OLMoE)
            self.q_norm = RMSNorm(cfg.head_dim if cfg.qk_norm == "head" else q, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim if cfg.qk_norm == "head" else kv, cfg.norm_eps)
        self.q_lora = self.k_lora = self.v_lora = self.o_lora = None  # PLoRA, once an adapter is added
        self.kv_cache = None

    def project(self, x, name, image_rows):
        """One of q, k, v, o: the frozen projection (with its bias, if the layout has one), plus PLoRA at image rows."""
        proj = getattr(self, f"{name}_proj")
        y = linear(x, proj.weight) if proj.bias is None else linear(x, proj.weight) + proj.bias
        return plora(y, x, getattr(self, f"{name}_lora"), image_rows)

    def forward(self, x, cos, sin, mask, image_rows, input_pos=None, attend_cache=False):
        """x (B, T, C) -> (B, T, C). With a KV cache, these tokens' keys and values are written at input_pos (T,);
        attend_cache: continuing a sequence, attend to every token cached so far (mask spans the cache), else to
        these tokens only, exactly as without a cache."""
        B, T, _ = x.shape
        q, k, v = (self.project(x, name, image_rows) for name in "qkv")  # (B, T, nh * hd), (B, T, n_kv * hd) x 2
        if self.qk_norm == "all":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in (q, k, v))  # (B, T, heads, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # q (B, nh, T, hd), k/v (B, n_kv, T, hd)
        if self.kv_cache is not None:
            k_all, v_all = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
            if attend_cache:
                k, v = k_all, v_all
        # a decoding step (one token, attending to the cache) the same, faster: attend_one_token
        y = attend_one_token(q, k, v, mask) if T == 1 and mask is not None else attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)
        return self.project(y, "o", image_rows)  # (B, T, C)

# -----------------------------------------------------------------------------
# Routed SwiGLU experts, each with its own PLoRA update


def expert(x, experts, e, image_rows=None):
    """Expert e on its tokens x (n, C): w2(silu(w1 x) * w3 x), with w1 = gate, w3 = up, w2 = down projection. The
    routed expert update: at image rows (n, 1), each of the three projections adds expert e's own low-rank update."""
    b = e if len(experts.w1) > 1 else 0  # copied experts are stored once
    gate = plora(linear(x, experts.w1[b]), x, experts.w1_lora, image_rows, expert=e)  # (n, I)
    up = plora(linear(x, experts.w3[b]), x, experts.w3_lora, image_rows, expert=e)
    h = F.silu(gate) * up
    return plora(linear(h, experts.w2[b]), h, experts.w2_lora, image_rows, expert=e)  # (n, C)


def expert_stack(n, inter, dim):
    """n SwiGLU experts stacked as (n, out, in) tensors: w1 = gate, w3 = up, w2 = down projection."""
    experts = nn.Module()
    shapes = ((inter, dim), (dim, inter), (inter, dim))
    experts.w1, experts.w2, experts.w3 = (nn.Parameter(torch.empty(n, *shape)) for shape in shapes)
    experts.w1_lora = experts.w2_lora = experts.w3_lora = None
    return experts


class MoE(nn.Module):
    """Top-k routed SwiGLU experts, stored stacked per layer as (E, out, in) tensors, or as one (1, out, in)
    copy when every expert holds the same weights (copied experts, as upcycling makes them). A dense layer
    among MoE layers is one expert without a router; Qwen2-MoE adds a shared expert that every token runs."""

    def __init__(self, cfg, dense=False):
        super().__init__()
        self.n_experts, inter = (1, cfg.dense_size) if dense else (cfg.n_experts, cfg.intermediate_size)
        self.top_k, self.norm_topk_prob = (1, True) if dense else (cfg.top_k, cfg.norm_topk_prob)
        self.gate = None if dense else nn.Linear(cfg.dim, cfg.n_experts, bias=False)  # the router
        self.experts = expert_stack(self.n_experts, inter, cfg.dim)
        self.shared_expert = self.shared_expert_gate = None
        if cfg.shared_expert_size and not dense:
            self.shared_expert = expert_stack(1, cfg.shared_expert_size, cfg.dim)
            self.shared_expert_gate = nn.Linear(cfg.dim, 1, bias=False)
        self.gate_lora = None
        self.router_logits = self.image_rows = None  # of the last forward: load balancing, routing analysis

    def forward(self, x, image_rows):
        B, T, C = x.shape
        x = x.view(-1, C)  # (N, C) with N = B * T
        image_rows = None if image_rows is None else image_rows.view(-1, 1)  # (N, 1)
        weights, expert_idx = self.route(x, image_rows)  # (N, k) each
        if len(self.experts.w1) == 1:  # copied experts (or a dense layer): grouped's result, faster
            y = shared_base(self, x, weights, expert_idx, image_rows)
        else:
            y = self.grouped(x, weights, expert_idx, image_rows)
        if self.shared_expert is not None:  # Qwen2-MoE: every token also runs the shared expert, gated per token
            gate = torch.sigmoid(linear(x, self.shared_expert_gate.weight))  # (N, 1)
            y = y + gate * expert(x, self.shared_expert, 0, image_rows)
        return y.view(B, T, C)

    def route(self, x, image_rows):
        """The router, with its own PLoRA update at image rows: a float32 softmax over all experts, keep the top k
        (Mixtral renormalises them to sum to 1) -> their weights (N, k) in x's dtype and expert ids (N, k)."""
        self.image_rows = image_rows  # kept with the router's logits for the load-balancing loss and the analysis
        if self.gate is None:  # a dense layer: its one expert, weight 1
            return x.new_ones(len(x), 1), torch.zeros(len(x), 1, dtype=torch.long, device=x.device)
        self.router_logits = plora(self.gate(x), x, self.gate_lora, image_rows)  # (N, E)
        probs = F.softmax(self.router_logits, dim=-1, dtype=torch.float32)
        weights, expert_idx = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        weights = weights / weights.sum(dim=-1, keepdim=True) if self.norm_topk_prob else weights
        return weights.to(x.dtype), expert_idx

    def grouped(self, x, weights, expert_idx, image_rows):
        """Grouped dispatch: flatten the N*k (token, slot) pairs and sort them by expert id, so that every expert
        sees one contiguous slice and runs once on it (expert(), its own update included); then each output,
        weighted by its router weight, is added back to its token."""
        flat_expert = expert_idx.view(-1)  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)  # pair indices grouped by expert
        token_idx = order // self.top_k  # (N*k,) the token each sorted pair came from
        counts = torch.bincount(flat_expert, minlength=self.n_experts).tolist()
        x_sorted = x[token_idx]  # (N*k, C)
        rows_sorted = None if image_rows is None else image_rows[token_idx]  # (N*k, 1)
        out, start = torch.empty_like(x_sorted), 0
        for e, n in enumerate(counts):
            if n:
                rows = None if rows_sorted is None else rows_sorted[start:start + n]
                out[start:start + n] = expert(x_sorted[start:start + n], self.experts, e, rows)
                start += n
        out = out * weights.view(-1)[order, None]  # scale by the router weight of each pair
        return torch.zeros_like(x).index_add_(0, token_idx, out)  # sum each token's k expert outputs


class Block(nn.Module):
    def __init__(self, cfg, i):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.block_sparse_moe = MoE(cfg, dense=i in cfg.dense_layers)

    def forward(self, x, cos, sin, mask, image_rows, input_pos=None, attend_cache=False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, image_rows, input_pos, attend_cache)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x), image_rows)

# -----------------------------------------------------------------------------
# The model


# Image sampling defaults, the best measured on the demo (docs/demo.md)
SAMPLING = {"guidance": 1.5, "temperature": 0.7, "top_k": 50}


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, allowed_ids=None, generator=None):
    """logits (B, V) -> next token ids (B,)."""
    logits = logits.float()
    if allowed_ids is not None:  # every other token gets probability 0
        logits = torch.full_like(logits, float("-inf")).index_copy(1, allowed_ids, logits[:, allowed_ids])
    if temperature == 0:
        return logits.argmax(dim=-1)
    # the candidates, most likely first: the top k (then a draw among 50 codes costs 50 random numbers, not 16k), or all
    logits, ids = torch.topk(logits, min(top_k or logits.size(-1), logits.size(-1)), dim=-1)  # (B, k)
    probs = F.softmax(logits / temperature, dim=-1)
    if top_p is not None:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs > top_p, 0.0)  # the mass before it already >= p
    return ids.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)


class ImageRule:
    """The decoding rule inside an image, row by row: which image tokens each row may take next. Image tokens are
    numbered from 0 here: K codes (the last colour_tokens of them colours), <boi>, <eoi>, and with scene tokens
    <scene>, <empty>. A picture is n_codes tokens: a colour token first if the VQ has them, then codes. A row writes
    one picture, or (with scene tokens) <scene> and then 4 tiles, each <empty> or a picture. A row's state: the
    tokens still to come in the picture it writes (left) and the tiles still to start (tiles; -1 before its first
    token). A row that is done may take <eoi> alone (what it takes then is not used)."""

    def __init__(self, adapter, n_codes, batch_size, device):
        K, C = adapter.n_image_codes, adapter.colour_tokens
        ids = torch.arange(K + 2 + 2 * adapter.scene_tokens, device=device)
        self.n_codes, self.scene, self.empty = n_codes, K + 2, K + 3
        self.code = ids < K - C  # (K + 2 [+ 2],): inside a picture
        self.first = (ids >= K - C) & (ids < K) if C else ids < K  # a picture's first token: its colour, or a code
        self.eoi, self.may_scene, self.may_empty = ids == K + 1, ids == K + 2, ids == K + 3
        self.left = torch.zeros(batch_size, dtype=torch.long, device=device)  # (B,)
        self.tiles = torch.full_like(self.left, -1)

    @property
    def done(self):  # (B,) bool
        return (self.left == 0) & (self.tiles == 0)

    def allowed(self):
        """-> (B, K + 2 [+ 2]) bool: the tokens each row may take next."""
        start, tiles = (self.left == 0)[:, None], self.tiles[:, None]  # (B, 1)
        allowed = torch.where(start, self.first & (tiles != 0), self.code)
        allowed |= start & ((tiles == -1) & self.may_scene | (tiles > 0) & self.may_empty)
        return allowed | self.done[:, None] & self.eoi

    def take(self, tokens):
        """Each row's next token (B,), one that allowed() allows: the state moves on."""
        new = (self.left == 0) & ~self.done  # the token starts a picture, a scene or an empty tile
        picture = new & (tokens != self.scene) & (tokens != self.empty)
        self.left = torch.where(picture, self.n_codes - 1, (self.left - 1).clamp(min=0))
        started = torch.where(new, (self.tiles - 1).clamp(min=0), self.tiles)  # a single picture: -1 -> 0, done
        self.tiles = torch.where(new & (tokens == self.scene), 4, started)


def scene_tiles(tokens, n_codes, n_image_codes):
    """A row of generate_image's output with scene tokens (1 + 4 n_codes,), padded with -1 -> None for a single
    picture (its tokens are tokens[:n_codes]), or a scene's 4 tiles, top-left, top-right, bottom-left, bottom-right:
    each None (<empty>) or a picture's tokens (n_codes,). The beginning of a row (while drawing) reads as far as it
    goes: the last tile begun may be short, those not begun None."""
    if int(tokens[0]) != n_image_codes + 2:  # not <scene>
        return None
    tiles, i = [], 1
    for _ in range(4):
        empty = i >= len(tokens) or int(tokens[i]) == n_image_codes + 3
        tiles.append(None if empty else tokens[i:i + n_codes])
        i += 1 if empty else n_codes
    return tiles


class MMMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # module names mirror the Hugging Face checkpoint keys, so loading is a plain name lookup; built uninitialised
        # (weights are loaded): random init would cost time and be overwritten
        embed = nn.Embedding(config.vocab_size, config.dim, _weight=torch.empty(config.vocab_size, config.dim))
        self.model = nn.ModuleDict(dict(
            embed_tokens=embed,
            layers=nn.ModuleList(Block(config, i) for i in range(config.n_layers)),
            norm=RMSNorm(config.dim, config.norm_eps),
        ))
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.adapter = self.image_embed = self.image_head = None  # see add_image_adapter

    def add_image_adapter(self, adapter):
        """Extend the vocabulary with image tokens and add PLoRA. The text embeddings and output rows stay
        as they are (frozen tensors); the new rows are separate parameters, tied if the base is tied."""
        cfg, a = self.config, adapter
        self.adapter = a
        # codes, <boi>, <eoi> (, <scene>, <empty>)
        self.image_embed = nn.Parameter(torch.zeros(a.n_image_codes + 2 + 2 * a.scene_tokens, cfg.dim))
        tied = cfg.tie_word_embeddings
        self.image_head = self.image_embed if tied else nn.Parameter(torch.zeros_like(self.image_embed))
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        for layer in self.model.layers:
            attn, moe = layer.self_attn, layer.block_sparse_moe
            if a.attention:
                attn.q_lora, attn.k_lora = LoRA(cfg.dim, q, a.rank, a.alpha), LoRA(cfg.dim, kv, a.rank, a.alpha)
                attn.v_lora, attn.o_lora = LoRA(cfg.dim, kv, a.rank, a.alpha), LoRA(q, cfg.dim, a.rank, a.alpha)
            # each expert (of a shared expert, of a dense MLP too) gets its own update, with alpha / r as elsewhere
            for ex, n in [(moe.experts, moe.n_experts)] + [(moe.shared_expert, 1)] * (moe.shared_expert is not None):
                inter, r = ex.w1.shape[1], a.expert_rank or a.rank
                ex.w1_lora, ex.w3_lora = (LoRA(cfg.dim, inter, r, a.alpha * r / a.rank, n) for _ in "13")
                ex.w2_lora = LoRA(inter, cfg.dim, r, a.alpha * r / a.rank, n)
            if a.router and moe.gate is not None:
                moe.gate_lora = LoRA(cfg.dim, cfg.n_experts, a.rank, a.alpha)
        self.to(device=self.lm_head.weight.device)  # the adapter stays float32 (its own master weights)
        for name, param in self.named_parameters():  # C2: only what the adapter added can learn
            param.requires_grad_(self.is_adapter_param(name))
        return self

    def add_scene_tokens(self):
        """Give an adapter without them the two scene rows, <scene> and <empty> (a warm start of scenes from a
        single-picture run): every image row kept as it is, the two new ones starting as copies of <boi>'s."""
        if self.adapter.scene_tokens:
            raise BadInput("the adapter has scene tokens already")
        K = self.adapter.n_image_codes

        def grown(rows):  # (K + 2, C) -> (K + 4, C)
            return nn.Parameter(torch.cat([rows.detach(), rows.detach()[K:K + 1].expand(2, -1)]))
        tied = self.image_head is self.image_embed
        self.image_embed = grown(self.image_embed)
        self.image_head = self.image_embed if tied else grown(self.image_head)
        self.adapter = AdapterConfig(**vars(self.adapter) | {"scene_tokens": True})
        return self

    @staticmethod
    def is_adapter_param(name):
        return "_lora." in name or name.startswith("image_")

    BUDGET = {"LoRA experts": "expert", "LoRA attention": "self_attn.", "LoRA router": "gate_lora",
              "image rows": "image_"}

    def trainable_budget(self):
        """C2: trainable parameters by component (BUDGET: what their names hold), and the base's parameter count."""
        params = list(self.named_parameters())
        counts = {k: sum(p.numel() for n, p in params if p.requires_grad and v in n) for k, v in self.BUDGET.items()}

        def copies(name, p):  # copied experts are stored once; the MoE they stand for has n_experts
            shared = ".experts.w" in name and len(p) == 1
            return self.get_submodule(name[:name.index(".experts.")]).n_experts if shared else 1
        return counts, sum(p.numel() * copies(n, p) for n, p in params if not p.requires_grad)

    def image_token(self, which):
        """Token id of image code `which` (int or tensor), or of "boi" / "eoi" (/ "scene" / "empty")."""
        K, V = self.adapter.n_image_codes, self.config.vocab_size
        if isinstance(which, str):
            names = ("boi", "eoi", "scene", "empty") if self.adapter.scene_tokens else ("boi", "eoi")
            return V + K + names.index(which)
        return which + V

    def forward(self, idx, targets=None, pad=None, colour_weight=1.0):
        """idx (B, T) token ids -> (logits (B, T, V [+ K + 2 (+ 2) with an adapter]), None), or with targets (None,
        loss): a loss needs the output layer only at its targets (over a 49k text vocabulary the rest would be a large
        share of a step). pad (B,): the columns at the start of each row that are left padding, seen by no token, so
        that rows of different lengths share a batch."""
        if targets is not None and (targets >= 0).any():  # causal: the columns after the last target cannot change it
            last = int((targets >= 0).any(0).nonzero()[-1]) + 1
            idx, targets = idx[:, :last], targets[:, :last]
        parts = self.text_then_images(idx, pad)
        if targets is not None:
            return None, self.loss(torch.cat(parts, dim=1), targets, colour_weight)
        return torch.cat([self.logits(x) for x in parts], dim=1), None

    def text_then_images(self, idx, pad=None):
        """idx (B, T) -> the final hidden states as a list of parts along T, C1 whole. A text token's logits are the
        base's, bit for bit, by three things: (1) PLoRA adds nothing at a text row (plora); (2) the columns before the
        batch's first image token run alone, exactly as the base runs them (the same shapes, the frozen weights, no
        gradient), and the rest attends to them through the KV cache, so no other row can change their arithmetic;
        (3) the loss scores a text target against the text vocabulary only (loss). Text after a picture attends to
        it: that text is conditioned on an image, so it differs from the base by design."""
        image = idx >= self.config.vocab_size
        if self.adapter is None or not image.any() or image[:, 0].any():  # no text before an image: nothing to split
            return [self.hidden_states(idx, pad=pad)]
        P, (B, T) = int(image.any(dim=0).nonzero()[0]), idx.shape  # P: the first column with an image token
        self.setup_caches(B, T)
        with torch.no_grad():
            text = self.hidden_states(idx[:, :P], torch.arange(P, device=idx.device), pad)
        rest = self.hidden_states(idx[:, P:], torch.arange(P, T, device=idx.device), pad)
        self.clear_caches()
        return [text, rest]

    def hidden_states(self, idx, input_pos=None, pad=None):
        """idx (B, T) -> the final normalised hidden states (B, T, C), before any output layer. input_pos None: whole
        sequences from column 0 (training, scoring); input_pos (T,): the columns of idx in the KV cache of
        setup_caches (from column 0: prefill, attending to these tokens; later: attending to the whole cache)."""
        cfg, V = self.config, self.config.vocab_size
        pad = pad if pad is not None and bool(pad.any()) else None  # no row padded: plain causal attention
        columns = torch.arange(idx.shape[1], device=idx.device) if input_pos is None else input_pos  # (T,)
        # each row's own positions: after left padding a row starts at position 0, its padding is negative
        positions = columns if pad is None else columns - pad[:, None]  # (T,) or (B, T)
        image = idx >= V
        # where PLoRA acts: a (B, T, 1) mask of the image rows; None where there is no adapter or no image token
        # (then this is exactly the base model's computation)
        image_rows = image[..., None] if self.adapter is not None and bool(image.any()) else None
        x = self.model.embed_tokens(idx.clamp(max=V - 1))  # (B, T, C)
        if image_rows is not None:  # the image rows join the residual stream in its dtype (bf16 stays bf16)
            x = torch.where(image_rows, self.image_embed[(idx - V).clamp(min=0)].to(x.dtype), x)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)  # (..., T, hd)
        attend_cache = int(columns[0]) > 0  # continuing a cached sequence
        if attend_cache:  # its keys: the whole cache, each row's own positions (slots not yet written are masked)
            keys = torch.arange(self.model.layers[0].self_attn.kv_cache.k.shape[2], device=idx.device)
            keys = keys if pad is None else keys - pad[:, None]  # (S,) or (B, S)
        else:  # from column 0: these tokens only, as the uncached forward does
            keys = positions
        plain = not attend_cache and pad is None and cfg.sliding_window is None  # causal attention, no mask needed
        mask = None if plain else attention_mask(positions, keys, cfg.sliding_window)  # (T, S) or (B, T, S)
        if pad is not None:  # one table and one mask per row, shared by the heads
            cos, sin, mask = cos[:, None], sin[:, None], mask[:, None]  # (B, 1, T, hd), (B, 1, T, S)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, image_rows, input_pos, attend_cache)
        return self.model.norm(x)

    def logits(self, x):
        """Final hidden states (..., C) -> (..., V [+ K + 2 (+ 2)]): the text columns are the base's."""
        logits = linear(x, self.lm_head.weight)
        return logits if self.adapter is None else torch.cat([logits, linear(x, self.image_head)], dim=-1)

    def loss(self, x, targets, colour_weight=1.0):
        """Mean cross-entropy over targets >= 0 from the final hidden states x (B, T, C), each target over its own
        modality (the decoding rule): a text target against the text vocabulary only, so text probabilities are exactly
        the base's; an image target against the image tokens only. A colour token's term is multiplied by
        colour_weight."""
        V = self.config.vocab_size
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        text, image = (targets >= 0) & (targets < V), targets >= V
        nll = [F.cross_entropy(linear(x[text], self.lm_head.weight).float(), targets[text], reduction="none")]
        if self.adapter is not None:
            code = targets[image] - V  # the colour tokens are the last adapter.colour_tokens codes
            K, C = self.adapter.n_image_codes, self.adapter.colour_tokens
            weight = torch.where((code >= K - C) & (code < K), colour_weight, 1.0)
            logits = linear(x[image], self.image_head).float()
            nll.append(F.cross_entropy(logits, code, reduction="none") * weight)
        return torch.cat(nll).mean()

    # Generation: a static KV cache (gpt-fast), prefill then one token at a time

    def setup_caches(self, batch_size, max_seq_len):
        """Allocate a static KV cache in every layer (replacing any previous one)."""
        p, c = self.model.embed_tokens.weight, self.config
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, c.n_kv_heads, max_seq_len, c.head_dim, p.dtype, p.device)

    def clear_caches(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, allowed_ids=None,
                 stop_at_eos=False, generator=None, head=None, feed=None, image_steps=False, pad=None):
        """Continue each row of idx (R, T), left-padded by pad (R,) columns if given, by max_new_tokens with a static
        KV cache -> (R, T + n). temperature 0 is greedy; allowed_ids (a 1-D tensor of token ids) restricts what can
        be sampled; stop_at_eos ends early once every row has produced eos (finished rows then repeat eos).
        head(hidden (R, C), i) -> logits (B, n) to sample new token i from (default: self.logits) and feed(sampled
        (B,), i) -> the tokens (R,) fed back (default: the sampled ones) let a caller steer it: generate_image, which
        also says image_steps (every token fed is an image token, or eos in a row that is done and no longer read),
        so that the steps run folded_plora()."""
        R, T = idx.shape
        if T + max_new_tokens > self.config.max_seq_len:
            raise BadInput(f"prompt of {T} tokens + {max_new_tokens} new ones exceeds the model's context of "
                           f"{self.config.max_seq_len} tokens")
        head, feed = head or (lambda x, i: self.logits(x)), feed or (lambda t, i: t)
        eos, out, pos = self.config.eos_token_id, [idx], torch.arange(T, device=idx.device)
        with torch.inference_mode():  # no autograd bookkeeping at all
            self.setup_caches(R, T + max_new_tokens)
            done = torch.zeros(R, dtype=torch.bool, device=idx.device)
            logits = head(self.hidden_states(idx, pos, pad)[:, -1], 0)  # prefill: the prompt's text runs as the base's
            with self.folded_plora() if image_steps else nullcontext():  # PLoRA, the same, faster (below)
                for i in range(max_new_tokens):
                    nxt = feed(sample_next(logits, temperature, top_k, top_p, allowed_ids, generator), i)  # (R,)
                    if stop_at_eos:
                        nxt = torch.where(done, eos, nxt)
                        done |= nxt == eos
                    out.append(nxt[:, None])
                    if i + 1 == max_new_tokens or (stop_at_eos and done.all()):
                        break
                    step = self.hidden_states(nxt[:, None], pos[-1:] + 1 + i, pad)  # decode one token
                    logits = head(step[:, -1], i + 1)
        self.clear_caches()
        return torch.cat(out, dim=1)  # outside inference mode: an ordinary tensor for the caller

    @property
    def start_token(self):  # <bos>, or <eos> for a base without one: the first token of every sequence and prompt
        return self.config.bos_token_id if self.config.bos_token_id is not None else self.config.eos_token_id

    def generate_image(self, captions, n_codes, guidance=SAMPLING["guidance"], temperature=SAMPLING["temperature"],
                       top_k=SAMPLING["top_k"], top_p=None, generator=None, progress=None):
        """Captions' token ids (a list of lists) -> image tokens (B, n_codes), drawn as one batch: each prompt
        <start> caption <boi>, left-padded with <eos> (seen by no token). Inside an image only image tokens can be
        sampled, and of them only those ImageRule allows each row next (the decoding rule), so the output layer is the
        rows some row may take, the rest -inf: a colour token first, if the VQ has them, then the codes. With scene
        tokens a row may write a scene instead: -> (B, 1 + 4 n_codes), each row padded with -1 after its last token
        (scene_tiles reads one). With guidance, each row gets an unconditional twin, the caption replaced by <eos>
        (train.py's caption dropout), and the two rows' logits mix: uncond + guidance * (cond - uncond) (classifier-free
        guidance). progress(i, tokens (B,)), if given, sees each new image token as it is drawn (serve.py's page; -1
        for a row already done)."""
        rows = [[self.start_token, *ids, self.image_token("boi")] for ids in captions]
        B, T = len(rows), max(map(len, rows))
        steps = 1 + 4 * n_codes if self.adapter.scene_tokens else n_codes  # the longest a row can be
        if T + steps > self.config.max_seq_len:
            raise BadInput(f"prompt too long: {T} tokens + {steps} image tokens exceed the model's context of "
                           f"{self.config.max_seq_len}")
        eos = self.config.eos_token_id
        idx = torch.tensor([[eos] * (T - len(r)) + r for r in rows], device=self.lm_head.weight.device)  # (B, T)
        pad = T - torch.tensor([len(r) for r in rows], device=idx.device)  # (B,)
        if guidance:  # the twin keeps <start> and <boi>, <eos> everywhere else
            column = torch.arange(T, device=idx.device)
            keep = (column == pad[:, None]) | (column == T - 1)
            idx, pad = torch.cat([idx, torch.where(keep, idx, eos)]), pad.repeat(2)  # (2B, T): cond rows, then twins
        rule, drawn, lo = ImageRule(self.adapter, n_codes, B, idx.device), [], 0

        def head(x, i):  # (2B or B, C) -> (B, hi - lo): the image tokens lo..hi-1 some row may take, -inf if not this
            nonlocal lo
            allowed = rule.allowed()  # (B, K + 2 [+ 2])
            cols = allowed.any(0).nonzero()[:, 0].tolist()  # the tokens some row may take
            lo, hi = cols[0], cols[-1] + 1
            logits = linear(x, self.image_head[lo:hi])
            logits = logits[B:] + guidance * (logits[:B] - logits[B:]) if guidance else logits
            return logits.masked_fill(~allowed[:, lo:hi], float("-inf"))

        def feed(t, i):  # (B,) sampled among lo..hi-1 -> the tokens fed back, to both twins: <eos> once a row is done
            tokens = torch.where(rule.done, -1, lo + t)  # (B,) image tokens from 0, -1 where the row is done
            drawn.append(tokens)
            rule.take(lo + t)
            if progress is not None:
                progress(i, tokens)
            return torch.where(rule.done, eos, self.image_token(tokens)).repeat(2 if guidance else 1)
        self.generate(idx, steps, temperature, top_k, top_p, stop_at_eos=True, generator=generator, head=head,
                      feed=feed, image_steps=True, pad=pad)
        return F.pad(torch.stack(drawn, 1), (0, steps - len(drawn)), value=-1)  # (B, steps)

    def describe(self, pictures, before, after=(), max_new_tokens=32):
        """Pictures' image tokens (B, n), from 0 (a VQ's tokenize) -> the words each is described with, greedy: a list
        of token ids per picture, up to its <eos>. Each row is  before <boi> picture <eoi> after  (before: <start>, or
        a chat turn's beginning), continued with text tokens only. The picture's positions run with the adapter (so
        with no question the first word is read off <eoi>'s row); every text position runs the frozen base, reading
        the picture through attention (C1: no text row uses an adapter weight, test_describe's proof)."""
        boi, eoi, eos = self.image_token("boi"), self.image_token("eoi"), self.config.eos_token_id
        rows = [[*before, boi, *self.image_token(p).tolist(), eoi, *after] for p in pictures.cpu()]
        idx = torch.tensor(rows, device=self.lm_head.weight.device)  # (B, T): the rows are all one length
        text = torch.arange(self.config.vocab_size, device=idx.device)
        out = self.generate(idx, max_new_tokens, temperature=0, allowed_ids=text, stop_at_eos=True)[:, idx.shape[1]:]
        return [row[:row.index(eos)] if eos in row else row for row in out.tolist()]

    # The adapter's checkpoint format, in a directory: adapter.safetensors holds only what training changed
    # (the adapter's tensors, by parameter name); state.json its AdapterConfig, the base's vocabulary size
    # and whatever the trainer adds (step, settings, log).

    def save_adapter(self, path, state):
        tensors = {n: p.detach().contiguous().cpu() for n, p in self.named_parameters() if self.is_adapter_param(n)}
        save_file(tensors, Path(path) / "adapter.safetensors")
        state = state | {"adapter": vars(self.adapter), "vocab_size": self.config.vocab_size,
                         "layout": self.config.layout}
        (Path(path) / "state.json").write_text(json.dumps(state, indent=1))

    def load_adapter(self, path):
        """Put a saved adapter onto this base (adding one if it has none, and the scene rows if it has them and this
        adapter not) -> the state.json it came with."""
        path = Path(path)
        if not (path / "state.json").exists():
            raise BadInput(f"no trained adapter in {path} (expected state.json and adapter.safetensors)")
        state = read_json(path / "state.json", ("adapter", "vocab_size"))
        tensors = read_tensors(path / "adapter.safetensors")
        V, layout = self.config.vocab_size, state.get("layout", "mixtral")
        if state["vocab_size"] != V:
            raise BadInput(f"{path} was trained on a base with {state['vocab_size']} text tokens, this one has {V}")
        if layout != self.config.layout:
            raise BadInput(f"{path} was trained on a {layout} base, this one is {self.config.layout}")
        if self.adapter is None:
            try:
                self.add_image_adapter(AdapterConfig(**state["adapter"]))
            except TypeError as e:
                raise BadInput(f"damaged checkpoint file {path / 'state.json'}: adapter {e}") from None
        if state["adapter"].get("scene_tokens") and not self.adapter.scene_tokens:  # room for its two scene rows
            self.add_scene_tokens()
        for name, p in [(n, p) for n, p in self.named_parameters() if self.is_adapter_param(n)]:
            if name not in tensors or tensors[name].shape != p.shape:
                got = tuple(tensors[name].shape) if name in tensors else "missing"
                raise BadInput(f"adapter tensor {name} in {path}: {got}, this model has {tuple(p.shape)}")
            with torch.no_grad():
                p.copy_(tensors[name])
        return state

    @contextmanager
    def adapter_off(self):
        """The base model alone while the block runs: every PLoRA update and the image rows switched off, so nothing of
        the adapter is computed and the output layer is the text vocabulary's, as before add_image_adapter. One model
        serves as both (C1 compared without a second copy of the base); on exit the adapter is back."""
        loras = [(m, name, c) for m in self.modules() for name, c in m.named_children() if isinstance(c, LoRA)]
        image = (self.adapter, self.image_embed, self.image_head)
        try:
            for m, name, _ in loras:
                setattr(m, name, None)
            self.adapter = self.image_embed = self.image_head = None
            yield self
        finally:
            for m, name, child in loras:
                setattr(m, name, child)
            self.adapter, self.image_embed, self.image_head = image

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """Load a Hugging Face checkpoint directory (config.json + safetensors) of any of the four layouts."""
        path = Path(path)
        config = MMMoEConfig.from_hf(path)
        dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or DTYPES[config.dtype]
        with torch.device("meta"):  # no memory: shapes only
            model = cls(config)
        load_checkpoint(model, path, dtype, device)
        return model.eval()

    def save_pretrained(self, path, tokenizer=None, max_shard_bytes=2 * 1024**3):
        """Write the Hugging Face layout (config.json, sharded safetensors + index) atomically."""
        config = self.config.to_hf() | {"dtype": str(self.lm_head.weight.dtype).removeprefix("torch.")}
        write_hf_checkpoint(path, config, hf_state_dict(self), tokenizer, max_shard_bytes=max_shard_bytes)

    # The same, faster: for training and drawing

    @contextmanager
    def folded_plora(self):
        """For steps whose tokens are all image tokens (generate_image's decoding): PLoRA's attention and router
        updates folded into their weights, W + scale B A, one matmul instead of three. The same function up to
        rounding (tests/test_train.py::test_folded_plora_equals_plain_on_image_tokens_and_is_undone); the expert
        updates stay routed. On exit the base's own weights are back."""
        folds = []  # (the nn.Linear, its base weight, the module that holds its LoRA, the LoRA's name, the LoRA)
        for layer in self.model.layers:
            attn, moe = layer.self_attn, layer.block_sparse_moe
            for m, w, name in [(attn, f"{p}_proj", f"{p}_lora") for p in "qkvo"] + [(moe, "gate", "gate_lora")]:
                if getattr(m, name) is not None:
                    folds.append((getattr(m, w), getattr(m, w).weight, m, name, getattr(m, name)))
        try:
            with torch.no_grad():
                for lin, weight, m, name, up in folds:
                    lin.weight = nn.Parameter(torch.addmm(weight, up.B, up.A, alpha=up.scale), requires_grad=False)
                    setattr(m, name, None)  # plora() then passes the folded product through
            yield
        finally:
            for lin, weight, m, name, up in folds:
                lin.weight = weight
                setattr(m, name, up)

    def compile_blocks(self):
        """torch.compile each block for training (train.py draws under set_stance("force_eager")): one graph for every
        length, elementwise chains fused; grouped dispatch (data-dependent slices) stays eager. Pinned by
        tests/test_train.py::test_compiled_blocks_equal_eager."""
        for layer in self.model.layers:
            layer.block_sparse_moe.grouped = torch.compiler.disable(layer.block_sparse_moe.grouped)
            layer.compile(dynamic=True)
        return self


# -----------------------------------------------------------------------------
# The same, faster. Each function here computes what a plain one above computes; the test named in it proves it.


def shared_base(moe, x, weights, expert_idx, image_rows):
    """MoE.grouped for copied experts (copies of one FFN: the paper's redundant start), which differ only by their PLoRA
    updates, faster. w1 x and w3 x are the same for every expert: computed once per token. The down projection is
    linear, so sum_s w_s W2 h_s = W2 (sum_s w_s h_s): once per token, not top_k times. A text row has no update at all:
    with weights summing to 1 it is exactly the dense FFN. Pinned by test_shared_base_equals_grouped_dispatch
    (tests/test_train.py) and test_plora_logits_and_gradients_equal_the_plain_reference (tests/test_layouts.py)."""
    ex = moe.experts
    gate, up = linear(x, ex.w1[0]), linear(x, ex.w3[0])  # (N, I), shared by every expert
    h = F.silu(gate) * up  # the base's own h (N, I)
    if not moe.norm_topk_prob:  # the top-k weights need not sum to 1: k copies give their sum times one output
        h = h * weights.sum(-1, keepdim=True)
    if image_rows is None or ex.w1_lora is None:
        return linear(h, ex.w2[0])  # (N, C)
    # (k, N, E): each slot's expert, one-hot (F.one_hot would first check the ids' range: a GPU sync a layer)
    route = x.new_zeros(moe.top_k, len(x), moe.n_experts).scatter_(-1, expert_idx.T[..., None], 1.0)
    # each slot's gate and up: the shared product plus its own expert's B A x (all k slots' rows in one matmul)
    gate_k = gate + linear(routed_lora(ex.w1_lora, x, route), ex.w1_lora.B)  # (k, N, I)
    up_k = up + linear(routed_lora(ex.w3_lora, x, route), ex.w3_lora.B)
    h_k = F.silu(gate_k) * up_k  # (k, N, I): what each slot's expert computes before w2
    w = weights.T[..., None]  # (k, N, 1)
    h = torch.where(image_rows, (w * h_k).sum(0), h)  # (N, I); C1: text rows keep the base's h
    y = linear(h, ex.w2[0])  # (N, C)
    lora = linear(routed_lora(ex.w2_lora, h_k, route * w).sum(0), ex.w2_lora.B)  # sum_s w_s B_s A_s h_s: (N, C)
    return torch.where(image_rows, y + lora, y)


def routed_lora(lora, x, mix):
    """Each slot's own expert's low-rank update, for all rows at once, with no sort and no loop: A (all experts' A's)
    gives every expert's projection in one matmul; mix (k, N, E) keeps each slot's expert (and may weigh it); B (all
    experts' B's) then sums what is left in one matmul. x (N, in) or (k, N, in) -> (k, N, E*r), to be multiplied by
    B."""
    a = linear(x, lora.A)  # (N, E*r) or (k, N, E*r)
    N, E = mix.shape[1:]
    return (a.view(-1, N, E, lora.rank) * (mix * lora.scale)[..., None]).flatten(2)


def attend_one_token(q, k, v, mask):
    """attend() for a decoding step, one query per row (T = 1), faster: the query heads that share a K/V head become
    the rows of one query (B, n_kv, nh / n_kv, hd), so K and V are not copied per head, and SDPA runs its fused
    kernel. tests/test_model.py::test_decoding_step_equals_the_whole_sequence."""
    B, n_kv, hd = k.shape[0], k.shape[1], q.shape[-1]
    q = q.contiguous().view(B, n_kv, -1, hd)  # contiguous, so that SDPA runs its fused kernel
    # -> (B, nh, 1, hd); reshape, not view: on CUDA the output need not be contiguous
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).reshape(B, -1, 1, hd)


# MKL, torch's BLAS on x86, picks kernels by CPU vendor, and so the faster of two forms of a decoding step's few-row
# product: x @ w^T on Intel, (w @ x^T)^T on AMD; in bf16 (oneDNN) the second everywhere (docs/speed.md).
FEW_ROWS_TRANSPOSED = Path("/proc/cpuinfo").exists() and "GenuineIntel" not in Path("/proc/cpuinfo").read_text()


def linear(x, w):
    """x (..., in) @ w.T for a weight w (out, in); for up to 16 rows on a CPU, in the form its BLAS runs faster (the
    same product: tests/test_model.py::test_decoding_step_equals_the_whole_sequence runs both forms)."""
    rows = x.reshape(-1, x.shape[-1])
    few = len(rows) <= 16 and x.device.type == "cpu"
    y = (w @ rows.T).T if few and (FEW_ROWS_TRANSPOSED or x.dtype == torch.bfloat16) else rows @ w.T
    return y.reshape(*x.shape[:-1], w.shape[0])

# -----------------------------------------------------------------------------
# The machine: which precision is the faster here


def bfloat16_support(device):
    """How this device computes bf16: "fast" (CUDA; a CPU with AMX tiles), "slow" (a CPU with AVX512-BF16 but no AMX:
    slower than float32 on the machines measured, docs/speed.md) or "emulated" (neither: many times slower)."""
    if device.type == "cuda" or torch.cpu._is_amx_tile_supported():
        return "fast"
    return "slow" if torch.cpu._is_avx512_bf16_supported() else "emulated"


def choose_dtype(name, device):
    """A precision setting, "auto", "float32" or "bfloat16", for training or drawing -> (dtype, a line to show or None).
    auto is the faster of the two here: bf16 where it is fast, float32 elsewhere; bfloat16 asked for where it is
    slower is given, with a line that says so."""
    support = bfloat16_support(device)
    why = {"fast": "CUDA" if device.type == "cuda" else "this CPU has AMX",
           "slow": "this CPU has AVX512-BF16 but no AMX: bf16 runs slower than float32 here",
           "emulated": "this CPU has no bf16 instructions (AVX512-BF16, AMX): bf16 is emulated, many times slower",
           }[support]
    if name == "auto":
        dtype = torch.bfloat16 if support == "fast" else torch.float32
        return dtype, f"precision auto: {str(dtype).removeprefix('torch.')} ({why})"
    if name == "bfloat16" and support != "fast":
        return torch.bfloat16, f"warning: bfloat16 asked for, but {why}; auto would choose float32"
    return DTYPES[name], None

# -----------------------------------------------------------------------------
# Command line: continue a text prompt with a checkpoint of any of the four layouts


def main(argv=None):
    p = argparse.ArgumentParser(description="Continue a prompt with a Mixtral, Qwen2-MoE, Qwen3-MoE or OLMoE model.")
    p.add_argument("ckpt", help="directory with config.json, *.safetensors and tokenizer.json")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = p.parse_args(argv)
    if not args.prompt.strip():
        raise BadInput("empty prompt")
    if args.max_new_tokens < 1 or not 0 <= args.temperature < math.inf:
        raise BadInput("--max-new-tokens must be at least 1 and --temperature a number >= 0")
    model, tokenizer = MMMoE.from_pretrained(args.ckpt, dtype=torch.float32), load_tokenizer(args.ckpt)
    idx = torch.tensor([tokenizer.encode(args.prompt).ids])
    out = model.generate(idx, args.max_new_tokens, args.temperature, stop_at_eos=True)
    print(tokenizer.decode(out[0, idx.shape[1]:].tolist()))


if __name__ == "__main__":
    run(main)
