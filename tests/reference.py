"""A plainly written MoE forward, one token at a time, straight from a Hugging Face state dict of the Mixtral,
Qwen2-MoE, Qwen3-MoE or OLMoE layout, as each model's definition in transformers reads.

Independent of mmmoe.py on purpose (no shared code): the tests check the fast model against it."""
import math

import torch


def reference_logits(sd, cfg, ids):
    """sd: {HF key: tensor}, cfg: HF config dict, ids: list of token ids -> logits (T, V) in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    kind = cfg.get("model_type", "mixtral")
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = D // H if kind == "olmoe" else cfg.get("head_dim") or D // H
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    E, K, eps = cfg.get("num_local_experts") or cfg["num_experts"], cfg["num_experts_per_tok"], cfg["rms_norm_eps"]
    window = cfg.get("sliding_window") if kind == "mixtral" else None
    renormalise = kind == "mixtral" or cfg.get("norm_topk_prob")
    clip = cfg.get("clip_qkv")
    lm_head = sd["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else sd["lm_head.weight"]
    moe, (gate_name, down_name, up_name) = ("block_sparse_moe", ("w1", "w2", "w3")) if kind == "mixtral" else ("mlp", ("gate_proj", "down_proj", "up_proj"))

    def dense(i):  # Qwen: no experts in layers of mlp_only_layers or off the decoder_sparse_step grid
        return kind.startswith("qwen") and (i in cfg["mlp_only_layers"] or (i + 1) % cfg["decoder_sparse_step"] != 0)

    def rmsnorm(x, w):
        return w * x / math.sqrt(sum(v * v for v in x.tolist()) / len(x) + eps)

    def swiglu(prefix, h):  # down(silu(gate h) * up h)
        gate = sd[prefix + gate_name + ".weight"] @ h
        return sd[prefix + down_name + ".weight"] @ (gate * torch.sigmoid(gate) * (sd[prefix + up_name + ".weight"] @ h))

    def proj(name, h):
        return sd[name + ".weight"] @ h + sd.get(name + ".bias", 0)

    def rope(v, pos):  # v (hd,): pair i with i + hd/2 ("rotate_half")
        out = v.clone()
        for i in range(hd // 2):
            angle = pos / theta ** (2 * i / hd)
            a, b = v[i].item(), v[i + hd // 2].item()
            out[i] = a * math.cos(angle) - b * math.sin(angle)
            out[i + hd // 2] = b * math.cos(angle) + a * math.sin(angle)
        return out

    xs = [sd["model.embed_tokens.weight"][t] for t in ids]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        keys, values, new_xs = [], [], []
        for pos, x in enumerate(xs):
            h = rmsnorm(x, sd[p + "input_layernorm.weight"])
            q, k, v = (proj(p + f"self_attn.{n}_proj", h) for n in "qkv")
            if kind == "olmoe":  # OLMoE: RMSNorm over the whole q and k projections, then clip
                q, k = rmsnorm(q, sd[p + "self_attn.q_norm.weight"]), rmsnorm(k, sd[p + "self_attn.k_norm.weight"])
            if clip:
                q, k, v = (t.clamp(-clip, clip) for t in (q, k, v))
            q, k, v = q.view(H, hd), k.view(KV, hd), v.view(KV, hd)
            if kind == "qwen3_moe":  # Qwen3-MoE: RMSNorm over each head
                q = torch.stack([rmsnorm(r, sd[p + "self_attn.q_norm.weight"]) for r in q])
                k = torch.stack([rmsnorm(r, sd[p + "self_attn.k_norm.weight"]) for r in k])
            keys.append(torch.stack([rope(k[j], pos) for j in range(KV)]))
            values.append(v)
            heads = []
            for i in range(H):
                qi, g = rope(q[i], pos), i // (H // KV)  # query head i reads K/V head g
                visible = [s for s in range(pos + 1) if window is None or pos - s < window]
                scores = torch.tensor([qi @ keys[s][g] / math.sqrt(hd) for s in visible], dtype=torch.float64)
                probs = torch.softmax(scores, 0)
                heads.append(sum(pr * values[s][g] for pr, s in zip(probs, visible)))
            x = x + proj(p + "self_attn.o_proj", torch.cat(heads))
            h = rmsnorm(x, sd[p + "post_attention_layernorm.weight"])
            if dense(layer):
                x = x + swiglu(p + "mlp.", h)
                new_xs.append(x)
                continue
            probs = torch.softmax(sd[p + f"{moe}.gate.weight"] @ h, 0)
            chosen = sorted(range(E), key=lambda e: -probs[e].item())[:K]
            total = sum(probs[e] for e in chosen) if renormalise else 1.0
            for e in chosen:
                x = x + probs[e] / total * swiglu(p + f"{moe}.experts.{e}.", h)
            if p + "mlp.shared_expert_gate.weight" in sd:  # Qwen2-MoE's shared expert, gated by a sigmoid
                x = x + torch.sigmoid(sd[p + "mlp.shared_expert_gate.weight"] @ h)[0] * swiglu(p + "mlp.shared_expert.", h)
            new_xs.append(x)
        xs = new_xs
    return torch.stack([lm_head @ rmsnorm(x, sd["model.norm.weight"]) for x in xs])


def reference_greedy(sd, cfg, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(reference_logits(sd, cfg, ids)[-1].argmax()))
    return ids
