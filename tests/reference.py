"""A plainly written MoE forward, one token at a time, straight from a Hugging Face state dict of the Mixtral,
Qwen2-MoE, Qwen3-MoE or OLMoE layout, as each model's definition in transformers reads; with an image adapter,
the paper's Partial LoRA written out as plainly: at an image token, and only there, every projection W x
becomes W x + s B A x (q, k, v, o, the router, and each chosen expert's own w1, w3, w2).

Independent of mmmoe.py on purpose (no shared code): the tests check the fast model against it. It reads the
adapter as mmmoe saves it (adapter.safetensors: tensors by parameter name), and it is differentiable, so the
model's gradients can be checked against it too."""
import math

import torch


def reference_logits(sd, cfg, ids, adapter=None, scale=1.0):
    """sd: {HF key: tensor}, cfg: HF config dict, ids: list of token ids -> logits (T, V) in float64.
    adapter: {mmmoe parameter name: tensor} (image_embed, image_head and the LoRA A/B pairs; float64 leaves with
    requires_grad to get their gradients) with its LoRA scale alpha / rank: ids >= V are image tokens (code id - V),
    and the logits are (T, V + K + 2), the text rows' then the image rows'."""
    sd = {k: v.double() for k, v in sd.items()}
    ad = {k: v.to(torch.float64) for k, v in (adapter or {}).items()}
    kind = cfg.get("model_type", "mixtral")
    V, D, H = cfg["vocab_size"], cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = D // H if kind == "olmoe" else cfg.get("head_dim") or D // H
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    E, K, eps = cfg.get("num_local_experts") or cfg["num_experts"], cfg["num_experts_per_tok"], cfg["rms_norm_eps"]
    window = cfg.get("sliding_window") if kind == "mixtral" else None
    renormalise = kind == "mixtral" or cfg.get("norm_topk_prob")
    clip = cfg.get("clip_qkv")
    lm_head = sd["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else sd["lm_head.weight"]
    moe = "block_sparse_moe" if kind == "mixtral" else "mlp"
    gate_name, down_name, up_name = ("w1", "w2", "w3") if kind == "mixtral" else ("gate_proj", "down_proj", "up_proj")

    def dense(i):  # Qwen: no experts in layers of mlp_only_layers or off the decoder_sparse_step grid
        return kind.startswith("qwen") and (i in cfg["mlp_only_layers"] or (i + 1) % cfg["decoder_sparse_step"] != 0)

    def rmsnorm(x, w):
        return w * x / torch.sqrt((x * x).mean() + eps)

    def lora(name, h, block=0, blocks=1):  # s B A h with block `block` of `blocks` side by side (expert e's own)
        if name + ".A" not in ad:
            return 0
        A, B = ad[name + ".A"], ad[name + ".B"]
        r = A.shape[0] // blocks
        return scale * B[:, block * r:(block + 1) * r] @ (A[block * r:(block + 1) * r] @ h)

    def swiglu(prefix, h, plora=None, block=0, blocks=1):  # down(silu(gate h) * up h); plora: its LoRAs' prefix
        gate = sd[prefix + gate_name + ".weight"] @ h
        up = sd[prefix + up_name + ".weight"] @ h
        if plora:
            gate = gate + lora(plora + "w1_lora", h, block, blocks)
            up = up + lora(plora + "w3_lora", h, block, blocks)
        inner = gate * torch.sigmoid(gate) * up
        out = sd[prefix + down_name + ".weight"] @ inner
        return out + lora(plora + "w2_lora", inner, block, blocks) if plora else out

    def proj(name, h):
        return sd[name + ".weight"] @ h + sd.get(name + ".bias", 0)

    def rope(v, pos):  # v (hd,): pair i with i + hd/2 ("rotate_half")
        angle = torch.tensor([pos / theta ** (2 * i / hd) for i in range(hd // 2)], dtype=torch.float64)
        a, b = v[:hd // 2], v[hd // 2:]
        return torch.cat([a * angle.cos() - b * angle.sin(), b * angle.cos() + a * angle.sin()])

    image = [t >= V for t in ids]
    xs = [ad["image_embed"][t - V] if t >= V else sd["model.embed_tokens.weight"][t] for t in ids]
    for layer in range(cfg["num_hidden_layers"]):
        p, m = f"model.layers.{layer}.", f"model.layers.{layer}.block_sparse_moe."  # HF names, mmmoe's adapter names
        keys, values, new_xs = [], [], []
        for pos, x in enumerate(xs):
            at_image = image[pos]  # PLoRA acts here, or nowhere in this row
            h = rmsnorm(x, sd[p + "input_layernorm.weight"])
            q, k, v = (proj(p + f"self_attn.{n}_proj", h) + (lora(p + f"self_attn.{n}_lora", h) if at_image else 0)
                       for n in "qkv")
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
                scores = torch.stack([qi @ keys[s][g] / math.sqrt(hd) for s in visible])
                probs = torch.softmax(scores, 0)
                heads.append(sum(pr * values[s][g] for pr, s in zip(probs, visible)))
            o = torch.cat(heads)
            x = x + proj(p + "self_attn.o_proj", o) + (lora(p + "self_attn.o_lora", o) if at_image else 0)
            h = rmsnorm(x, sd[p + "post_attention_layernorm.weight"])
            plora = m + "experts." if at_image else None
            if dense(layer):  # one expert, weight 1
                new_xs.append(x + swiglu(p + "mlp.", h, plora))
                continue
            router = sd[p + f"{moe}.gate.weight"] @ h + (lora(m + "gate_lora", h) if at_image else 0)
            probs = torch.softmax(router, 0)
            chosen = sorted(range(E), key=lambda e: -probs[e].item())[:K]
            total = sum(probs[e] for e in chosen) if renormalise else 1.0
            for e in chosen:  # each chosen expert with its own low-rank update (block e of the stacked LoRA)
                x = x + probs[e] / total * swiglu(p + f"{moe}.experts.{e}.", h, plora, block=e, blocks=E)
            if p + "mlp.shared_expert_gate.weight" in sd:  # Qwen2-MoE's shared expert, gated by a sigmoid
                gate = torch.sigmoid(sd[p + "mlp.shared_expert_gate.weight"] @ h)[0]
                x = x + gate * swiglu(p + "mlp.shared_expert.", h, m + "shared_expert." if at_image else None)
            new_xs.append(x)
        xs = new_xs
    outs = [rmsnorm(x, sd["model.norm.weight"]) for x in xs]
    text = torch.stack([lm_head @ x for x in outs])
    return text if adapter is None else torch.cat([text, torch.stack([ad["image_head"] @ x for x in outs])], 1)


def reference_greedy(sd, cfg, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(reference_logits(sd, cfg, ids)[-1].argmax()))
    return ids
