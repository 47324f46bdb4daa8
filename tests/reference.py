"""A plainly written Mixtral forward, one token at a time, straight from a Hugging Face state dict.

Independent of mmmoe.py on purpose (no shared code): the tests check the fast model against it."""
import math

import torch


def reference_logits(sd, cfg, ids):
    """sd: {HF key: tensor}, cfg: HF config dict, ids: list of token ids -> logits (T, V) in float64."""
    sd = {k: v.double() for k, v in sd.items()}
    D, H = cfg["hidden_size"], cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    hd = cfg.get("head_dim") or D // H
    theta = cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"]
    E, K, eps, window = cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["rms_norm_eps"], cfg.get("sliding_window")
    lm_head = sd["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else sd["lm_head.weight"]

    def rmsnorm(x, w):
        return w * x / math.sqrt(sum(v * v for v in x.tolist()) / len(x) + eps)

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
            q = (sd[p + "self_attn.q_proj.weight"] @ h).view(H, hd)
            k = (sd[p + "self_attn.k_proj.weight"] @ h).view(KV, hd)
            v = (sd[p + "self_attn.v_proj.weight"] @ h).view(KV, hd)
            keys.append(torch.stack([rope(k[j], pos) for j in range(KV)]))
            values.append(v)
            heads = []
            for i in range(H):
                qi, g = rope(q[i], pos), i // (H // KV)  # query head i reads K/V head g
                visible = [s for s in range(pos + 1) if window is None or pos - s < window]
                scores = torch.tensor([qi @ keys[s][g] / math.sqrt(hd) for s in visible], dtype=torch.float64)
                probs = torch.softmax(scores, 0)
                heads.append(sum(pr * values[s][g] for pr, s in zip(probs, visible)))
            x = x + sd[p + "self_attn.o_proj.weight"] @ torch.cat(heads)
            h = rmsnorm(x, sd[p + "post_attention_layernorm.weight"])
            probs = torch.softmax(sd[p + "block_sparse_moe.gate.weight"] @ h, 0)
            chosen = sorted(range(E), key=lambda e: -probs[e].item())[:K]
            total = sum(probs[e] for e in chosen)
            for e in chosen:
                w = lambda n: sd[p + f"block_sparse_moe.experts.{e}.{n}.weight"]  # noqa: E731
                gate = w("w1") @ h
                x = x + probs[e] / total * (w("w2") @ (gate * torch.sigmoid(gate) * (w("w3") @ h)))
            new_xs.append(x)
        xs = new_xs
    return torch.stack([lm_head @ rmsnorm(x, sd["model.norm.weight"]) for x in xs])


def reference_greedy(sd, cfg, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(reference_logits(sd, cfg, ids)[-1].argmax()))
    return ids
