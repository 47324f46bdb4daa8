"""
routing.py: which experts an MoE sends its tokens to, by modality. The statistics behind the paper's claim that
modality-specific experts emerge: analyze.py's report (before and after training) and serve.py's heatmap of one
drawing use the same two functions.

For every layer and expert: the share of the text tokens and of the image tokens routed there, each expert's
image-specificity (p_img - p_text) / (p_img + p_text) in [-1, 1] (1: only image tokens reach it, -1: only text),
and the entropy of each modality's expert usage.
"""
import math

import torch


@torch.no_grad()
def routing(model, batches):
    """Run the model over (token ids (B, T), left padding (B,) or None) batches -> routed-slot counts (2, L, E) for
    text [0] and image [1] tokens; each layer's MoE inputs at image tokens (the redundancy probe); and the last
    batch's routes (L, B, T, k), the experts each of its tokens went to (-1 in a dense layer). Padding is counted as
    neither. A hook sees every MoE call: a sequence that starts with text runs in two (the text prefix alone, then
    the rest)."""
    L, E, V = model.config.n_layers, model.config.n_experts, model.config.vocab_size
    counts = torch.zeros(2, L, E)
    probe = [[] for _ in range(L)]
    ids, picks = None, [[] for _ in range(L)]  # the batch being run (padding as -1); each layer's routes so far

    def count(i):
        def hook(moe, args, output):
            x = args[0]  # (B, t, C): the batch's next t columns
            B, t, _ = x.shape
            cols = ids[:, sum(p.shape[1] for p in picks[i]):][:, :t]  # (B, t)
            if moe.gate is None:  # a dense layer among MoE layers routes nothing
                picks[i].append(torch.full((B, t, model.config.top_k), -1))
                return
            chosen = torch.softmax(moe.router_logits.float(), -1).topk(moe.top_k, dim=-1).indices  # (B * t, k)
            picks[i].append(chosen.view(B, t, -1).cpu())
            image = (cols >= V).reshape(-1)
            text = ~image & (cols >= 0).reshape(-1)
            for m, rows in ((0, text), (1, image)):
                counts[m, i] += torch.bincount(chosen[rows].flatten(), minlength=E).float().cpu()
            probe[i].append(x.reshape(-1, x.shape[-1])[image])
        return hook
    hooks = [layer.block_sparse_moe.register_forward_hook(count(i)) for i, layer in enumerate(model.model.layers)]
    try:
        for idx, pad in batches:
            padding = torch.arange(idx.shape[1], device=idx.device) < (0 if pad is None else pad[:, None].to(idx.device))
            ids, picks = torch.where(padding, -1, idx), [[] for _ in range(L)]
            model(idx, pad=pad)
    finally:
        for h in hooks:
            h.remove()
    return counts, [torch.cat(p) if p else None for p in probe], torch.stack([torch.cat(p, 1) for p in picks])


def routing_stats(counts):
    """counts (2, L, E) -> shares (2, L, E), specificity (L, E), usage entropy (2, L) in [0, 1]."""
    shares = counts / counts.sum(-1, keepdim=True).clamp_min(1)
    spec = (shares[1] - shares[0]) / (shares[1] + shares[0]).clamp_min(1e-12)
    entropy = -(shares * shares.clamp_min(1e-12).log()).sum(-1) / math.log(counts.shape[-1])
    return shares, spec, entropy
