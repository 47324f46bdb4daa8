"""
mmmoe.py: a Mixtral-layout Mixture-of-Experts transformer in one file, with Partial LoRA for images.

Part of mmmoe, a reference implementation of Dutt et al. (arXiv 2503.22517): a pretrained text MoE
learns to write discrete image codes while every text token keeps flowing through the frozen weights.
Top to bottom: configs -> RMSNorm, RoPE, PLoRA, KV cache, attention, routed SwiGLU experts with grouped
dispatch -> the model (text and image tokens) -> Hugging Face checkpoints -> the command line.

    python mmmoe.py CHECKPOINT_DIR "The capital of France is"     # continue a text prompt
"""
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tokenizers import Tokenizer


class BadInput(Exception):
    """A problem with what the user gave us. Command-line tools print it as one line and exit 1."""


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

    @classmethod
    def from_hf(cls, path_or_dict):
        """Read a Hugging Face Mixtral config.json (a directory, the file, or the parsed dict)."""
        hf = path_or_dict
        if not isinstance(hf, dict):
            path = Path(path_or_dict)
            path = path if path.suffix == ".json" else path / "config.json"
            if not path.exists():
                raise BadInput(f"no config.json in {path.parent}")
            try:
                hf = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise BadInput(f"{path} is not valid JSON: {e}") from None
        archs = hf.get("architectures") or ["MixtralForCausalLM"]
        if archs != ["MixtralForCausalLM"]:
            raise BadInput(f"unsupported architecture {', '.join(archs)}: mmmoe implements MixtralForCausalLM "
                           "(turn a dense Llama/Mistral checkpoint into one with upcycle.py)")
        if hf.get("hidden_act", "silu") != "silu":
            raise BadInput(f"unsupported hidden_act {hf['hidden_act']!r}: Mixtral experts use silu")
        # Two shapes of config.json are in the wild: older ones keep rope_theta and torch_dtype at the
        # top level, newer ones nest it in rope_parameters and call the dtype "dtype".
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise BadInput(f"unsupported RoPE scaling {rope}: only plain RoPE is implemented")
        dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
        if dtype not in DTYPES:
            raise BadInput(f"unsupported dtype {dtype!r} in config.json (supported: {', '.join(DTYPES)})")
        eos = hf.get("eos_token_id", 2)
        n_heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            intermediate_size=hf["intermediate_size"], n_experts=hf.get("num_local_experts", 8),
            top_k=hf.get("num_experts_per_tok", 2),
            rope_theta=float(hf.get("rope_theta") or rope.get("rope_theta", 1e6)),
            norm_eps=hf.get("rms_norm_eps", 1e-5), max_seq_len=hf.get("max_position_embeddings", 32768),
            sliding_window=hf.get("sliding_window"), tie_word_embeddings=hf.get("tie_word_embeddings", False),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
            dtype=dtype,
        )

    def to_hf(self):
        """The config.json any Mixtral loader reads (the newer shape)."""
        return {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": self.vocab_size,
            "hidden_size": self.dim, "num_hidden_layers": self.n_layers, "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size, "num_local_experts": self.n_experts,
            "num_experts_per_tok": self.top_k, "hidden_act": "silu", "rms_norm_eps": self.norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_seq_len, "sliding_window": self.sliding_window,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "dtype": self.dtype,
        }

@dataclass
class AdapterConfig:
    """What the paper adds to a text MoE: image tokens, and Partial LoRA (PLoRA) updates that act on
    image-token positions only. Image codes take ids V..V+K-1 after the V text tokens, then <boi>, <eoi>."""
    n_image_codes: int = 1024  # the VQ codebook size K
    rank: int = 8
    alpha: float = 16.0
    attention: bool = True  # LoRA on q/k/v/o as well as on every expert's w1/w2/w3
    # LoRA on the router too, by default: with a frozen router, image tokens could only be routed as their
    # hidden states happen to fall, and modality-specific experts could not be learnt. Text routing is
    # untouched all the same (C1), since this LoRA also acts at image positions only.
    router: bool = True

# -----------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 like the reference, then cast back before the gain
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def linear(x, w):
    """x (..., in) @ w.T for a weight w (out, in). For the few rows of a decoding step it is computed as
    (w @ x^T)^T, the same product, which CPU BLAS runs ~1.5-2x faster there; with many rows (and for
    the backward pass) x @ w.T is the faster one."""
    rows = x.reshape(-1, x.shape[-1])
    y = (w @ rows.T).T if len(rows) <= 16 else rows @ w.T
    return y.reshape(*x.shape[:-1], w.shape[0])


def rope_cos_sin(positions, head_dim, theta, dtype):
    """RoPE tables for integer positions (T,) -> cos, sin of shape (T, head_dim), in float32 then dtype."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd): the "rotate_half" layout pairs i with i + hd/2
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, nh, T, hd)


class LoRA(nn.Module):
    """x -> B(A(x)) * alpha / r, a low-rank update of a frozen (out, in) weight; with n_experts, one per expert.
    B starts at zero, so an untrained adapter changes nothing."""

    def __init__(self, n_in, n_out, rank, alpha, n_experts=None):
        super().__init__()
        stack = () if n_experts is None else (n_experts,)
        self.A = nn.Parameter(torch.randn(*stack, rank, n_in) / math.sqrt(n_in))
        self.B = nn.Parameter(torch.zeros(*stack, n_out, rank))
        self.scale = alpha / rank

    def forward(self, x, expert=None):
        A, B = (self.A, self.B) if expert is None else (self.A[expert], self.B[expert])
        return (x @ A.T) @ B.T * self.scale


def plora(y, x, lora, image_rows):
    """Partial LoRA: y + lora(x) where image_rows (..., 1) is true. C1: every other row IS y, bit for bit."""
    if lora is None or image_rows is None:
        return y
    return torch.where(image_rows, y + lora(x), y)


class KVCache(nn.Module):
    """Preallocated keys and values for generation (gpt-fast style): positions are written in place."""

    def __init__(self, batch_size, n_kv_heads, max_seq_len, head_dim, dtype, device):
        super().__init__()
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos, k, v):  # input_pos (T,), k/v (B, n_kv, T, hd)
        self.k[:, :, input_pos] = k
        self.v[:, :, input_pos] = v
        return self.k, self.v  # (B, n_kv, S, hd)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)
        self.q_lora = self.k_lora = self.v_lora = self.o_lora = None  # PLoRA, once an adapter is added
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos, image_rows):
        B, T, _ = x.shape
        q = plora(linear(x, self.q_proj.weight), x, self.q_lora, image_rows).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = plora(linear(x, self.k_proj.weight), x, self.k_lora, image_rows).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = plora(linear(x, self.v_proj.weight), x, self.v_lora, image_rows).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # q (B, nh, T, hd), k/v (B, n_kv, T, hd)
        if self.kv_cache is not None:
            k_all, v_all = self.kv_cache.update(input_pos, k, v)  # (B, n_kv, S, hd)
            if mask is not None and mask.shape[-1] == k_all.shape[2]:  # the mask spans the cache: attend to it
                k, v = k_all, v_all
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh * hd)
        return plora(linear(y, self.o_proj.weight), y, self.o_lora, image_rows)  # (B, T, C)


def expert(x, experts, e, image_rows=None):
    """Expert e on its tokens x (n, C): w2(silu(w1 x) * w3 x), with w1 = gate, w3 = up, w2 = down projection."""
    lora = image_rows is not None and experts.w1_lora is not None
    b = e if len(experts.w1) > 1 else 0  # a shared base holds one copy for every expert
    gate, up = linear(x, experts.w1[b]), linear(x, experts.w3[b])  # (n, I)
    if lora:  # PLoRA: this expert's own low-rank updates, on its image rows only (C1: text rows untouched)
        gate = torch.where(image_rows, gate + experts.w1_lora(x, e), gate)
        up = torch.where(image_rows, up + experts.w3_lora(x, e), up)
    h = F.silu(gate) * up
    out = linear(h, experts.w2[b])  # (n, C)
    return torch.where(image_rows, out + experts.w2_lora(h, e), out) if lora else out


def routed_lora(lora, x, mix):
    """Each slot's own expert's low-rank update, for all rows at once, with no sort and no loop: every
    expert's A x in one matmul (all A's stacked as one (E*r, in) matrix), mix (N, k, E) keeps each slot's
    expert (and may weigh it), and one matmul with all B's stacked sums over experts and ranks.
    x (N, 1 or k, in) -> (N, k, E*r), to be finished by lora_b."""
    E, r, _ = lora.A.shape
    a = linear(x, lora.A.view(E * r, -1)).view(*x.shape[:2], E, r) * (mix * lora.scale)[..., None]
    return a.flatten(2)


def lora_b(lora, a):
    """(..., E*r) -> (..., out): all experts' B matrices as one (out, E*r) matrix."""
    return linear(a, lora.B.transpose(0, 1).reshape(lora.B.shape[1], -1))


class MoE(nn.Module):
    """Top-k routed SwiGLU experts, stored stacked per layer as (E, out, in) tensors, or as one (1, out, in)
    copy when every expert holds the same weights (a copy-upcycled base: the loader keeps one)."""

    def __init__(self, cfg):
        super().__init__()
        self.top_k = cfg.top_k
        self.gate = nn.Linear(cfg.dim, cfg.n_experts, bias=False)  # the router
        self.experts = nn.Module()
        self.experts.w1 = nn.Parameter(torch.empty(cfg.n_experts, cfg.intermediate_size, cfg.dim))
        self.experts.w2 = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim, cfg.intermediate_size))
        self.experts.w3 = nn.Parameter(torch.empty(cfg.n_experts, cfg.intermediate_size, cfg.dim))
        self.gate_lora = self.experts.w1_lora = self.experts.w2_lora = self.experts.w3_lora = None
        self.router_logits = self.image_rows = None  # of the last forward: load balancing, routing analysis

    def forward(self, x, image_rows):
        B, T, C = x.shape
        x = x.view(-1, C)  # (N, C) with N = B * T
        image_rows = None if image_rows is None else image_rows.view(-1, 1)  # (N, 1)
        router_logits = plora(self.gate(x), x, self.gate_lora, image_rows)  # (N, E)
        self.router_logits, self.image_rows = router_logits, image_rows
        # Mixtral's router: float32 softmax over all experts, keep the top k, renormalise them to sum to 1
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        weights, expert_idx = torch.topk(probs, self.top_k, dim=-1)  # (N, k)
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        shared = len(self.experts.w1) == 1
        y = (self.shared_base if shared else self.grouped)(x, weights, expert_idx, image_rows)
        return y.view(B, T, C)

    def grouped(self, x, weights, expert_idx, image_rows):
        """Distinct experts. Grouped dispatch: flatten the N*k (token, slot) pairs and sort them by expert
        id, so that every expert sees one contiguous slice and runs one matmul per weight on it."""
        flat_expert = expert_idx.view(-1)  # (N*k,)
        order = torch.argsort(flat_expert, stable=True)  # pair indices grouped by expert
        token_idx = order // self.top_k  # (N*k,) the token each sorted pair came from
        counts = torch.bincount(flat_expert, minlength=len(self.experts.w1)).tolist()
        x_sorted = x[token_idx]  # (N*k, C)
        rows_sorted = None if image_rows is None else image_rows[token_idx]  # (N*k, 1)
        out = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = None if rows_sorted is None else rows_sorted[start:start + n]
                out[start:start + n] = expert(x_sorted[start:start + n], self.experts, e, rows)
                start += n
        out = out * weights.view(-1)[order, None]  # scale by the router weight of each pair
        return torch.zeros_like(x).index_add_(0, token_idx, out)  # sum each token's k expert outputs

    def shared_base(self, x, weights, expert_idx, image_rows):
        """Experts that are copies of one FFN (the paper's redundant start) and differ only by their PLoRA
        updates. Then w1 x and w3 x are the same for every expert: computed once per token. The down
        projection is linear, so sum_s w_s W2 h_s = W2 (sum_s w_s h_s): once per token, not top_k times.
        A text row has no update at all: with weights summing to 1 it is exactly the dense FFN."""
        ex = self.experts
        gate, up = linear(x, ex.w1[0]), linear(x, ex.w3[0])  # (N, I), shared by every expert
        h = F.silu(gate) * up  # (N, I)
        if image_rows is None or ex.w1_lora is None:
            return linear(h, ex.w2[0])  # (N, C)
        route = F.one_hot(expert_idx, len(ex.w1_lora.A)).to(x.dtype)  # (N, k, E): each slot's expert
        x = x[:, None]  # (N, 1, C)
        gate_k = gate[:, None] + lora_b(ex.w1_lora, routed_lora(ex.w1_lora, x, route))  # (N, k, I)
        up_k = up[:, None] + lora_b(ex.w3_lora, routed_lora(ex.w3_lora, x, route))
        h_k = F.silu(gate_k) * up_k  # (N, k, I): what each slot's expert computes before w2
        w = weights[..., None]  # (N, k, 1)
        h = torch.where(image_rows, (w * h_k).sum(1), h)  # (N, I); C1: text rows keep the base's h
        y = linear(h, ex.w2[0])  # (N, C)
        lora = lora_b(ex.w2_lora, routed_lora(ex.w2_lora, h_k, route * w).sum(1))  # sum_s w_s B_s A_s h_s: (N, C)
        return torch.where(image_rows, y + lora, y)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.block_sparse_moe = MoE(cfg)

    def forward(self, x, cos, sin, mask, input_pos, image_rows):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos, image_rows)
        return x + self.block_sparse_moe(self.post_attention_layernorm(x), image_rows)

# -----------------------------------------------------------------------------
# The model


class MMMoE(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        # module names mirror the Hugging Face checkpoint keys, so loading is a plain name lookup
        self.model = nn.ModuleDict(dict(
            # built uninitialised (weights are loaded); random init on the meta device costs torch a 2-s import
            embed_tokens=nn.Embedding(config.vocab_size, config.dim, _weight=torch.empty(config.vocab_size, config.dim)),
            layers=nn.ModuleList(Block(config) for _ in range(config.n_layers)),
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
        self.image_embed = nn.Parameter(torch.zeros(a.n_image_codes + 2, cfg.dim))  # codes, <boi>, <eoi>
        self.image_head = self.image_embed if cfg.tie_word_embeddings else nn.Parameter(torch.zeros_like(self.image_embed))
        q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        for layer in self.model.layers:
            attn, moe = layer.self_attn, layer.block_sparse_moe
            if a.attention:
                attn.q_lora, attn.k_lora = LoRA(cfg.dim, q, a.rank, a.alpha), LoRA(cfg.dim, kv, a.rank, a.alpha)
                attn.v_lora, attn.o_lora = LoRA(cfg.dim, kv, a.rank, a.alpha), LoRA(q, cfg.dim, a.rank, a.alpha)
            moe.experts.w1_lora = LoRA(cfg.dim, cfg.intermediate_size, a.rank, a.alpha, cfg.n_experts)
            moe.experts.w3_lora = LoRA(cfg.dim, cfg.intermediate_size, a.rank, a.alpha, cfg.n_experts)
            moe.experts.w2_lora = LoRA(cfg.intermediate_size, cfg.dim, a.rank, a.alpha, cfg.n_experts)
            if a.router:
                moe.gate_lora = LoRA(cfg.dim, cfg.n_experts, a.rank, a.alpha)
        self.to(device=self.lm_head.weight.device)  # the adapter stays float32 (its own master weights)
        for name, param in self.named_parameters():  # C2: only what the adapter added can learn
            param.requires_grad_(self.is_adapter_param(name))
        return self

    @staticmethod
    def is_adapter_param(name):
        return "_lora." in name or name.startswith("image_")

    def image_token(self, which):
        """Token id of image code `which` (int or tensor), or of "boi" / "eoi"."""
        K, V = self.adapter.n_image_codes, self.config.vocab_size
        return {"boi": V + K, "eoi": V + K + 1}[which] if isinstance(which, str) else which + V

    def forward(self, idx, targets=None, input_pos=None):
        """idx (B, T) token ids -> (logits (B, T, V [+ K + 2 with an adapter]), None), or with targets
        (None, loss): a loss needs the output layer only at its targets, and over a 49k text vocabulary
        the rest would be a large share of a training step. input_pos None: a whole sequence from
        position 0 (training, scoring); input_pos (T,): the positions of idx in the KV cache that
        setup_caches made (prefill, then one token at a time)."""
        B, T = idx.shape
        image = idx >= self.config.vocab_size
        if input_pos is None and self.adapter is not None and image.any() and not image[:, 0].any():
            # C1 for sequences that start with text: the columns before the batch's first image token run
            # alone, exactly as the base model runs them (same shapes, frozen weights, no gradient); the
            # rest attends to them through a KV cache. So that text's logits are the base's bit for bit,
            # whatever follows, and no backward pass runs through the frozen prefix.
            P = int(image.any(dim=0).nonzero()[0])
            self.setup_caches(B, T)
            with torch.no_grad():
                parts = [self.hidden_states(idx[:, :P], torch.arange(P, device=idx.device))]
            parts.append(self.hidden_states(idx[:, P:], torch.arange(P, T, device=idx.device)))
            self.clear_caches()
        else:
            parts = [self.hidden_states(idx, input_pos)]
        if targets is not None:
            return None, self.loss(torch.cat(parts, dim=1), targets)
        return torch.cat([self.logits(x) for x in parts], dim=1), None

    def logits(self, x):
        """Final hidden states (..., C) -> (..., V [+ K + 2]): the text columns are the base's."""
        logits = linear(x, self.lm_head.weight)
        return logits if self.adapter is None else torch.cat([logits, linear(x, self.image_head)], dim=-1)

    def hidden_states(self, idx, input_pos=None):
        """idx (B, T) -> the final normalised hidden states (B, T, C), before any output layer."""
        cfg, V = self.config, self.config.vocab_size
        positions = torch.arange(idx.shape[1], device=idx.device) if input_pos is None else input_pos
        # (B, T, 1), or None for text only: then this is exactly the base model's computation
        image_rows = (idx >= V)[..., None] if self.adapter is not None and bool((idx >= V).any()) else None
        x = self.model.embed_tokens(idx.clamp(max=V - 1))  # (B, T, C)
        if image_rows is not None:
            x = torch.where(image_rows, self.image_embed[(idx - V).clamp(min=0)], x)
        cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, x.dtype)
        if int(positions[0]) == 0:  # from the start: attend to these tokens only, as the uncached forward does
            mask = None if cfg.sliding_window is None else attention_mask(positions, positions, cfg.sliding_window)
        else:  # continuing a cached sequence: attend over the whole cache (unwritten slots are masked)
            cache_len = self.model.layers[0].self_attn.kv_cache.k.shape[2]  # needs setup_caches() first
            mask = attention_mask(positions, torch.arange(cache_len, device=idx.device), cfg.sliding_window)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, input_pos, image_rows)
        return self.model.norm(x)

    def loss(self, x, targets):
        """Mean cross-entropy over targets >= 0 from the final hidden states x (B, T, C), each target over
        its own modality (the decoding rule): a text target against the text vocabulary only, so text
        probabilities are exactly the base's; an image target against the image tokens only."""
        V = self.config.vocab_size
        x, targets = x.reshape(-1, x.size(-1)), targets.reshape(-1)
        text, image = (targets >= 0) & (targets < V), targets >= V
        nll = [F.cross_entropy(linear(x[text], self.lm_head.weight).float(), targets[text], reduction="none")]
        if self.adapter is not None:
            nll.append(F.cross_entropy(linear(x[image], self.image_head).float(), targets[image] - V, reduction="none"))
        return torch.cat(nll).mean()

    def setup_caches(self, batch_size, max_seq_len):
        """Allocate a static KV cache in every layer (replacing any previous one)."""
        p = self.model.embed_tokens.weight
        for layer in self.model.layers:
            layer.self_attn.kv_cache = KVCache(batch_size, self.config.n_kv_heads, max_seq_len,
                                               self.config.head_dim, p.dtype, p.device)

    def clear_caches(self):
        for layer in self.model.layers:
            layer.self_attn.kv_cache = None

    @classmethod
    def from_pretrained(cls, path, dtype=None, device="cpu"):
        """Load a Hugging Face Mixtral checkpoint directory (config.json + safetensors)."""
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

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
                 allowed_ids=None, stop_at_eos=False, generator=None):
        """Continue each row of idx (B, T) by max_new_tokens with a static KV cache -> (B, T + n).

        temperature 0 is greedy; allowed_ids (a 1-D tensor of token ids) restricts what can be sampled;
        stop_at_eos ends early once every row has produced eos (finished rows then repeat eos)."""
        B, T = idx.shape
        if T + max_new_tokens > self.config.max_seq_len:
            raise BadInput(f"prompt of {T} tokens + {max_new_tokens} new ones exceeds the model's context of "
                           f"{self.config.max_seq_len} tokens")
        self.setup_caches(B, T + max_new_tokens)
        eos = self.config.eos_token_id
        done = torch.zeros(B, dtype=torch.bool, device=idx.device)
        out, pos = [idx], torch.arange(T, device=idx.device)
        logits = self.logits(self.hidden_states(idx, pos)[:, -1])  # prefill
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, allowed_ids, generator)  # (B,)
            if stop_at_eos:
                nxt = torch.where(done, eos, nxt)
                done |= nxt == eos
            out.append(nxt[:, None])
            if i + 1 == max_new_tokens or (stop_at_eos and done.all()):
                break
            logits = self.logits(self.hidden_states(nxt[:, None], pos[-1:] + 1 + i)[:, -1])  # decode one token
        self.clear_caches()
        return torch.cat(out, dim=1)


def attention_mask(q_pos, k_pos, window):
    """(Tq, Tk) bool, True where a query may attend: causal, and within the sliding window if any.
    A key is visible from query q when k <= q and q - k < window (Mistral/Mixtral's convention)."""
    diff = q_pos[:, None] - k_pos[None, :]
    return (diff >= 0) & (diff < window) if window is not None else diff >= 0


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, allowed_ids=None, generator=None):
    """logits (B, V) -> next token ids (B,)."""
    logits = logits.float()
    if allowed_ids is not None:  # every other token gets probability 0
        logits = torch.full_like(logits, float("-inf")).index_copy(1, allowed_ids, logits[:, allowed_ids])
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if top_p is not None:  # nucleus: keep the smallest set of tokens whose probability reaches top_p
        sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
        drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p  # mass before this token already >= p
        probs = probs.scatter(-1, sorted_idx, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

# -----------------------------------------------------------------------------
# Hugging Face checkpoints: config.json, model.safetensors or shards + model.safetensors.index.json

SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def checkpoint_index(path):
    """{tensor name: (file, shape)} of a checkpoint directory: model.safetensors, or the shards its index
    lists. safetensors' own reader validates each header (offsets, sizes); we add that shards are plain
    file names inside the directory, and that no tensor is stored twice."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise BadInput(f"{index} is not a safetensors index (JSON with a weight_map)") from None
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise BadInput(f"no model.safetensors or model.safetensors.index.json in {path}")
    tensors = {}
    for name in files:
        if not isinstance(name, str) or Path(name).name != name or name in (".", ".."):
            raise BadInput(f"{index} lists {name!r}: shards must be files in the checkpoint directory")
        if not (path / name).is_file():
            raise BadInput(f"missing shard {name} listed in {index}")
        try:
            with safe_open(path / name, "pt") as f:
                for key in f.keys():
                    if key in tensors:
                        raise BadInput(f"tensor {key} is stored twice: in {tensors[key][0].name} and {name}")
                    t = f.get_slice(key)
                    if t.get_dtype() not in SAFETENSORS_DTYPES:
                        raise BadInput(f"unsupported dtype {t.get_dtype()} for {key} in {name}")
                    tensors[key] = (path / name, tuple(t.get_shape()))
        except SafetensorError as e:
            raise BadInput(f"corrupt safetensors header in {path / name}: {' '.join(str(e).split())}") from None
    return tensors


class TensorReader:
    """read(name, index=()) -> a copy of a tensor of checkpoint_index's files, or of the part `index`
    selects. safe_open maps a file, and each page touched stays in memory while it is open: the files
    are closed every 256 MB read, so memory holds the model plus that, never the whole checkpoint."""

    def __init__(self, index):
        self.index, self.files, self.bytes = index, {}, 0

    def __call__(self, name, idx=()):
        file = self.index[name][0]
        self.files[file] = self.files.get(file) or safe_open(file, "pt")
        t = self.files[file].get_slice(name)[idx].clone()  # a view of the mapped file until copied out
        self.bytes += t.nbytes
        if self.bytes > 256 * 2**20:
            self.files, self.bytes = {}, 0
        return t


def stack_experts(tensors, n):
    """One layer's expert tensors, in order -> (n, ...), or (1, ...) when all are copies of the first:
    then one copy is all that is ever held."""
    first = next(tensors)
    out = first[None]  # (1, ...): one copy serves every expert, while they are all the same
    for j, t in enumerate(tensors, 1):
        if len(out) == 1 and torch.equal(t, first):
            continue
        if len(out) == 1:  # they differ: from here on every expert keeps its own weights
            out = first.expand(n, *first.shape).clone()
        out[j] = t
    return out


def checkpoint_targets(name, shape, config):
    """Checkpoint tensor name -> [(our parameter name, expert j or None, index into the tensor)].

    Experts are stored one tensor per expert in the HF layout (experts.{j}.w1.weight), or fused 3-D
    by newer transformers (experts.gate_up_proj = cat(w1, w3) on dim 1, experts.down_proj = w2); we keep
    them stacked per layer as (E, out, in)."""
    name = name.replace(".mlp.", ".block_sparse_moe.")  # transformers >= 5 calls the MoE block "mlp"
    m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(w[123])\.weight", name)
    if m:
        return [(f"{m[1]}.{m[3]}", int(m[2]), ())]
    if name.endswith(".experts.gate_up_proj"):  # (E, 2I, C)
        prefix, inter = name[: -len("gate_up_proj")], config.intermediate_size
        return [(prefix + w, j, (j, part)) for w, part in (("w1", slice(0, inter)), ("w3", slice(inter, None)))
                for j in range(shape[0])]
    if name.endswith(".experts.down_proj"):  # (E, C, I)
        return [(name[: -len("down_proj")] + "w2", j, (j,)) for j in range(shape[0])]
    return [(name, None, ())]


def load_checkpoint(model, path, dtype, device):
    """Fill a model built on the meta device from a checkpoint, tensor by tensor: memory peaks at the
    model plus one tensor. Every name and shape is checked before any data is read.

    Copy upcycling makes every expert of a layer the same FFN (the paper's redundant start). Such a
    layer keeps one copy, and MoE.shared_base computes it once: 1/E of the memory, 1/top_k of the work.
    The copies are compared, not assumed: experts that differ in one number keep their own weights."""
    cfg = model.config
    index = checkpoint_index(Path(path))
    params = dict(model.named_parameters())  # a tied lm_head appears once, as embed_tokens
    sources = {n: {} for n in params}  # our name -> {expert j or None: (checkpoint name, index)}
    for name, (file, shape) in index.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # some tied checkpoints store the shared matrix twice
        for pname, j, idx in checkpoint_targets(name, shape, cfg):
            if pname not in params or (j is not None and j >= cfg.n_experts):
                raise BadInput(f"unexpected tensor {name} in {file.name}")
            got, want = torch.empty(shape, device="meta")[idx].shape, params[pname].shape[j is not None:]
            if got != want:
                raise BadInput(f"shape mismatch for {name}: checkpoint {tuple(got)}, model {tuple(want)}")
            sources[pname][j] = (name, idx)
    for pname in params:
        for j in (range(cfg.n_experts) if ".experts." in pname else [None]):
            if j not in sources[pname]:
                name = pname if j is None else f"{pname[:-3]}.{j}.{pname[-2:]}.weight"
                raise BadInput(f"missing tensor {name} in {path}")
    read = TensorReader(index)
    with torch.no_grad():
        for pname, p in params.items():
            parts = (read(*sources[pname][j]).to(dtype=dtype, device=device) for j in sorted(sources[pname], key=lambda j: j or 0))
            t = stack_experts(parts, cfg.n_experts) if ".experts." in pname else next(parts)
            module, _, attr = pname.rpartition(".")
            setattr(model.get_submodule(module), attr, nn.Parameter(t, requires_grad=p.requires_grad))
            if pname.endswith(".experts.w3"):  # the last of a layer's three expert stacks (w1, w2, w3 order)
                ex = model.get_submodule(module)
                if len({len(ex.w1), len(ex.w2), len(ex.w3)}) > 1:  # some are copies, some not: expand the copies
                    ex.w1, ex.w2, ex.w3 = (nn.Parameter(w.expand(cfg.n_experts, -1, -1).clone(), w.requires_grad)
                                           for w in (ex.w1, ex.w2, ex.w3))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight


def hf_state_dict(model):
    """Our parameters under Hugging Face Mixtral names, one (out, in) tensor per expert (a shared base's
    one copy written for each), so that any Mixtral loader reads them."""
    for name, p in model.named_parameters():  # a tied lm_head is left out: HF writes it once
        if ".experts." in name:
            prefix, w = name.rsplit(".", 1)
            for j in range(model.config.n_experts):
                yield f"{prefix}.{j}.{w}.weight", p[j if len(p) > 1 else 0]
        else:
            yield name, p


@contextmanager
def atomic_dir(path):
    """Yield a fresh temporary directory beside `path`; on success it replaces `path` by renames, on
    error it is deleted. Readers never see a half-written checkpoint."""
    path = Path(path)
    tmp, old = (path.with_name(f".{path.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def write_hf_checkpoint(path, hf_config, tensors, tokenizer=None, extra_files=None, max_shard_bytes=2 * 1024**3):
    """Write (name, tensor) pairs as a Hugging Face checkpoint directory, atomically: config.json,
    generation_config.json, model.safetensors or shards + index, and tokenizer.json if given.

    `tensors` may be a generator: only one shard is held in memory at a time."""
    with atomic_dir(path) as tmp:
        shards, shard, size, total = [], {}, 0, 0

        def flush():
            fname = f"model-{len(shards) + 1:05d}.safetensors"  # renamed to -of-N once N is known
            # clone: safetensors refuses tensors that share memory, and expert slices or copies do
            save_file({k: v.detach().cpu().clone() for k, v in shard.items()}, tmp / fname, metadata={"format": "pt"})
            shards.append((fname, list(shard)))

        for name, t in tensors:
            nbytes = t.numel() * t.element_size()
            if shard and size + nbytes > max_shard_bytes:
                flush()
                shard, size = {}, 0
            shard[name] = t
            size, total = size + nbytes, total + nbytes
        flush()
        if len(shards) == 1:
            (tmp / shards[0][0]).rename(tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, (fname, names) in enumerate(shards):
                final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                (tmp / fname).rename(tmp / final)
                weight_map |= dict.fromkeys(names, final)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        gen = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id") if hf_config.get(k) is not None}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))
        if tokenizer is not None:
            tokenizer.save(str(tmp / "tokenizer.json"))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)


def load_tokenizer(path):
    """The checkpoint's tokenizer.json as a `tokenizers.Tokenizer`."""
    file = Path(path) / "tokenizer.json"
    if not file.exists():
        raise BadInput(f"no tokenizer.json in {path}")
    return Tokenizer.from_file(str(file))

# -----------------------------------------------------------------------------
# Command line: continue a text prompt with any Mixtral-layout checkpoint


def main(argv=None):
    import argparse
    p = argparse.ArgumentParser(description="Continue a prompt with a Mixtral-layout checkpoint.")
    p.add_argument("ckpt", help="directory with config.json, *.safetensors and tokenizer.json")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    args = p.parse_args(argv)
    if not args.prompt.strip():
        raise BadInput("empty prompt")
    model, tokenizer = MMMoE.from_pretrained(args.ckpt, dtype=torch.float32), load_tokenizer(args.ckpt)
    idx = torch.tensor([tokenizer.encode(args.prompt).ids])
    out = model.generate(idx, args.max_new_tokens, args.temperature, stop_at_eos=True)
    print(tokenizer.decode(out[0, idx.shape[1]:].tolist()))


if __name__ == "__main__":
    try:
        main()
    except BadInput as e:
        raise SystemExit(f"error: {e}")
