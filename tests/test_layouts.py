"""The four Hugging Face MoE layouts: each loads from its own tiny checkpoint (conftest.LAYOUTS), equals the
independent per-token reference, generates the same with and without the KV cache, saves back bit for bit,
and takes PLoRA with its text path untouched (C1)."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import LAYOUTS, ROOT, tiny_hf_state_dict, tiny_layout_config, with_random_adapter, write_checkpoint
from reference import reference_greedy, reference_logits
from safetensors.torch import load_file

import sample
import train
from mmmoe import AdapterConfig, BadInput, MMMoE, MMMoEConfig

ALL = ["mixtral", *LAYOUTS]


@pytest.fixture(params=ALL)
def layout_ckpt(request, tiny_ckpt):
    return tiny_ckpt(layout=request.param, name=request.param)


def test_logits_and_greedy_equal_the_reference(layout_ckpt):
    path, cfg, sd = layout_ckpt
    model = MMMoE.from_pretrained(path)
    ids = torch.randint(0, cfg["vocab_size"], (1, 9), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(sd, cfg, ids[0].tolist())
    assert (model(ids)[0][0].double() - ref).abs().max() < 1e-4
    prompt = [0, 5, 17, 42]
    assert model.generate(torch.tensor([prompt]), 5, temperature=0)[0].tolist() == reference_greedy(sd, cfg, prompt, 5)


def test_the_features_of_each_layout_are_really_used(layout_ckpt):
    """The fixtures exercise what each layout adds: a test of a feature that is never switched on proves nothing."""
    path, cfg, _ = layout_ckpt
    c = MMMoE.from_pretrained(path).config
    expect = {"mixtral": dict(norm_topk_prob=True, qk_norm=None, shared_expert_size=0, dense_layers=()),
              "qwen2_moe": dict(norm_topk_prob=False, qkv_bias=True, shared_expert_size=48, dense_layers=(1,), dense_size=80),
              "qwen3_moe": dict(norm_topk_prob=True, qk_norm="head", head_dim=24, dense_layers=(0, 2), dense_size=80),
              "olmoe": dict(norm_topk_prob=False, qk_norm="all", clip_qkv=2.0, n_experts=8, top_k=3)}[c.layout]
    assert {k: getattr(c, k) for k in expect} == expect


def test_kv_cached_generation_equals_uncached(layout_ckpt):
    path, cfg, _ = layout_ckpt
    model = MMMoE.from_pretrained(path)
    idx = torch.randint(2, cfg["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(3))
    out = model.generate(idx, 8, temperature=0)
    for t in range(6, 14):  # every token the cached loop chose is the argmax of a full forward over what came before
        assert torch.equal(model(out[:, :t])[0][:, -1].argmax(-1), out[:, t])


def test_save_and_load_round_trip_bit_for_bit(layout_ckpt, tmp_path):
    path, cfg, sd = layout_ckpt
    model = MMMoE.from_pretrained(path)
    model.save_pretrained(tmp_path / "saved")
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    assert saved.keys() == sd.keys() and all(torch.equal(saved[k], sd[k]) for k in sd)
    written = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert written["architectures"] == cfg["architectures"] and MMMoEConfig.from_hf(written) == model.config
    ids = torch.arange(2, 14)[None]
    assert torch.equal(MMMoE.from_pretrained(tmp_path / "saved")(ids)[0], model(ids)[0])


def test_copy_upcycled_experts_share_one_copy_in_every_layout(tiny_ckpt):
    """Copies of one FFN are kept once (shared_base) in any layout, and give what distinct copies give; without
    renormalised top-k weights (OLMoE, Qwen2-MoE) the copies' outputs add up to the weights' sum times one."""
    for layout in LAYOUTS:
        path, cfg, sd = tiny_ckpt(layout=layout, name=layout + "-copies", copies=True)
        model = MMMoE.from_pretrained(path)
        moe = [layer.block_sparse_moe for layer in model.model.layers if layer.block_sparse_moe.gate is not None]
        assert moe and all(len(m.experts.w1) == 1 for m in moe)
        ids = torch.randint(0, cfg["vocab_size"], (1, 7), generator=torch.Generator().manual_seed(4))
        assert (model(ids)[0][0].double() - reference_logits(sd, cfg, ids[0].tolist())).abs().max() < 1e-4


@pytest.mark.parametrize("copies", [False, True], ids=["distinct-experts", "copied-experts"])
@pytest.mark.parametrize("layout", ALL)
def test_plora_logits_and_gradients_equal_the_plain_reference(tiny_ckpt, layout, copies):
    """The model with an adapter against tests/reference.py's PLoRA, one token at a time in float64: the logits at every
    position (text before the picture, the picture, text after it) and the gradient of every adapter tensor. Copied
    experts run the shared-base fast path, distinct ones grouped dispatch. The text before the first image token is
    the base's own computation, torch.equal (C1)."""
    path, cfg, sd = tiny_ckpt(layout=layout, name=layout, copies=copies)
    model = MMMoE.from_pretrained(path).add_image_adapter(AdapterConfig(n_image_codes=16, rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    moe = next(layer.block_sparse_moe for layer in model.model.layers if layer.block_sparse_moe.gate is not None)
    assert (len(moe.experts.w1) == 1) == copies  # the path this case is about
    V = cfg["vocab_size"]
    text = torch.randint(2, V, (1, 5), generator=g)
    codes = model.image_token(torch.randint(0, 16, (1, 6), generator=g))
    idx = torch.cat([text, torch.full((1, 1), model.image_token("boi")), codes, torch.ones(1, 1, dtype=torch.long)], 1)
    logits = model(idx)[0][0]  # (T, V + 18)
    adapter = {n: p.detach().double().requires_grad_() for n, p in model.named_parameters() if p.requires_grad}
    adapter.setdefault("image_head", adapter["image_embed"])  # a tied base: one tensor, both roles
    ref = reference_logits(sd, cfg, idx[0].tolist(), adapter, scale=8.0 / 4)
    assert (logits.double() - ref).abs().max() <= 1e-4 * ref.abs().max()  # float32 rounding: measured <= 1e-5
    assert torch.equal(logits[:5, :V], MMMoE.from_pretrained(path)(text)[0][0])  # C1, bit for bit
    # the gradient of any scalar of all the logits; float32 against float64 sums of ~1e4: measured <= 3e-5 of the norm,
    # where a wrong mask, expert or scale is off by O(1)
    weights = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    (logits.double() * weights).sum().backward()
    (ref * weights).sum().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            want = adapter[name].grad
            assert (p.grad.double() - want).norm() <= 1e-4 * want.norm() + 1e-9, name
    assert adapter["model.layers.0.block_sparse_moe.experts.w2_lora.B"].grad.norm() > 0  # the experts' updates count


def test_plora_on_each_layout_keeps_text_bitwise_and_trains(layout_ckpt, tiny_setup, tmp_path):
    path, cfg, _ = layout_ckpt
    base = MMMoE.from_pretrained(path)
    mm, g = with_random_adapter(path), torch.Generator().manual_seed(1)
    shared = [layer.block_sparse_moe.shared_expert for layer in mm.model.layers if layer.block_sparse_moe.shared_expert]
    assert all(s.w1_lora is not None for s in shared) and (mm.config.layout != "qwen2_moe" or shared)
    text = torch.randint(2, cfg["vocab_size"], (2, 10), generator=g)
    mixed = torch.cat([text, mm.image_token(torch.randint(0, 16, (2, 6), generator=g))], dim=1)
    logits = mm(mixed)[0]
    assert torch.equal(logits[:, :10, :cfg["vocab_size"]], base(text)[0])  # C1, bit for bit
    assert torch.equal(mm(text)[0][..., :cfg["vocab_size"]], base(text)[0])
    # two training steps on the tiny emoji-like shards with this base, then the text path is still the base's
    tc = train.TrainConfig(base=str(path), shards=str(tiny_setup["shards"]), out_dir=str(tmp_path / "run"), rank=4,
                           batch_size=4, steps=2, warmup=1, eval_every=2, eval_batches=1, save_every=2, dtype="float32", init="mean")
    trained = train.train(tc)
    assert torch.equal(trained(text)[0][..., :cfg["vocab_size"]], base(text)[0])
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 2 and state["layout"] == cfg["model_type"]
    model, tok, vq = sample.load_pipeline(tmp_path / "run")  # what sample.py --ckpt loads: this layout's base and adapter
    n = vq.config.grid ** 2
    codes = model.generate_image([tok.encode("w10 w20").ids], n, generator=torch.Generator().manual_seed(0))
    assert model.config.layout == cfg["model_type"] and vq.detokenize(codes).shape == (1, 3, 16, 16)
    other = "olmoe" if cfg["model_type"] != "olmoe" else "qwen3_moe"  # the adapter refuses another layout's base
    c = tiny_layout_config(other)
    other_path = write_checkpoint(tmp_path / other, c, tiny_hf_state_dict(c))
    with pytest.raises(BadInput, match=f"trained on a {cfg['model_type']} base, this one is {other}"):
        MMMoE.from_pretrained(other_path).load_adapter(tmp_path / "run")


@pytest.mark.parametrize("layout,change,words", [
    ("qwen2_moe", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3_moe", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "RoPE scaling"),
    ("olmoe", {"hidden_act": "gelu"}, "hidden_act"),
    ("qwen2_moe", {"moe_intermediate_size": None}, "moe_intermediate_size"),
    ("olmoe", {"architectures": ["OlmoeForSequenceClassification"]}, "unsupported architecture OlmoeForSequenceClassification"),
])
def test_what_is_not_implemented_is_one_line(tmp_path, layout, change, words):
    cfg = tiny_layout_config(layout) | change
    path = write_checkpoint(tmp_path / "x", cfg, {"model.norm.weight": torch.ones(64)})
    with pytest.raises(BadInput) as e:
        MMMoE.from_pretrained(path)
    assert "\n" not in str(e.value) and words in str(e.value), str(e.value)


def test_a_tensor_of_another_layout_is_named(tiny_ckpt, tmp_path):
    path, cfg, sd = tiny_ckpt(layout="qwen3_moe")
    sd = dict(sd)
    sd["model.layers.1.mlp.shared_expert_gate.weight"] = torch.zeros(1, 64)  # a Qwen2-MoE tensor
    with pytest.raises(BadInput, match="unexpected tensor model.layers.1.mlp.shared_expert_gate.weight"):
        MMMoE.from_pretrained(write_checkpoint(tmp_path / "y", cfg, sd))
    del sd["model.layers.1.mlp.shared_expert_gate.weight"], sd["model.layers.1.self_attn.k_norm.weight"]
    with pytest.raises(BadInput, match="missing tensor model.layers.1.self_attn.k_norm.weight"):
        MMMoE.from_pretrained(write_checkpoint(tmp_path / "z", cfg, sd))


def test_the_command_line_continues_text_with_each_layout(tiny_ckpt):
    for layout in LAYOUTS:
        path, _, _ = tiny_ckpt(layout=layout, name=layout)
        out = subprocess.run([sys.executable, str(ROOT / "mmmoe.py"), str(path), "w5 w6 w7", "--max-new-tokens", "4"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr
        assert all(w.startswith("w") or w.startswith("<") for w in out.stdout.split())


def test_attention_bias_on_all_four_projections(tmp_path):
    """Qwen3-MoE's and OLMoE's attention_bias (off in their releases) puts biases on q, k, v and o."""
    for layout in ("qwen3_moe", "olmoe"):
        cfg = tiny_layout_config(layout) | {"attention_bias": True}
        sd = tiny_hf_state_dict(cfg)
        assert "model.layers.0.self_attn.o_proj.bias" in sd
        model = MMMoE.from_pretrained(write_checkpoint(tmp_path / layout, cfg, sd))
        ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(5))
        assert (model(ids)[0][0].double() - reference_logits(sd, cfg, ids[0].tolist())).abs().max() < 1e-4
