"""mmmoe.py against an independent reference, its loader against bad input, generation against itself."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from reference import reference_greedy, reference_logits
from safetensors import safe_open
from safetensors.torch import save_file

import hf
import mmmoe
from mmmoe import BadInput, MMMoE, MMMoEConfig


@pytest.mark.parametrize("kw", [dict(), dict(newer=False), dict(tied=True), dict(tied=True, newer=False),
                                dict(window=4), dict(kv_heads=4), dict(top_k=1)])
def test_logits_match_per_token_reference(tiny_ckpt, kw):
    path, cfg, sd = tiny_ckpt(**kw)
    model = MMMoE.from_pretrained(path)
    ids = torch.randint(0, cfg["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(1))
    logits, _ = model(ids)
    ref = reference_logits(sd, cfg, ids[0].tolist())
    assert (logits[0].double() - ref).abs().max() < 1e-4


def test_greedy_matches_reference(tiny_ckpt):
    path, cfg, sd = tiny_ckpt(window=5)
    model = MMMoE.from_pretrained(path)
    prompt = [0, 5, 17, 42]
    out = model.generate(torch.tensor([prompt]), 8, temperature=0)
    assert out[0].tolist() == reference_greedy(sd, cfg, prompt, 8)


def test_grouped_dispatch_equals_per_token_loop():
    cfg = MMMoEConfig(dim=32, intermediate_size=48, n_experts=6, top_k=2, n_layers=1, n_heads=4, n_kv_heads=2,
                      head_dim=8, vocab_size=50)
    moe = mmmoe.MoE(cfg)
    torch.manual_seed(0)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 17, 32)
    y = moe(x, None)
    flat = x.view(-1, 32)
    expected = torch.zeros_like(flat)
    for t in range(flat.shape[0]):  # the naive way: every token on its own, one expert at a time
        probs = torch.softmax(moe.gate.weight @ flat[t], 0)
        w, chosen = probs.topk(2)
        for weight, e in zip(w / w.sum(), chosen.tolist()):
            expected[t] += weight * mmmoe.expert(flat[t:t + 1], moe.experts, e)[0]
    assert torch.allclose(y.view(-1, 32), expected, atol=1e-5)
    counts = torch.bincount(torch.softmax(moe.router_logits, -1).topk(2).indices.flatten(), minlength=6)
    assert (counts > 0).sum() >= 4  # routing really spreads over experts in this test


@pytest.mark.parametrize("transposed", [False, True])
def test_decoding_step_equals_the_whole_sequence(tiny_ckpt, monkeypatch, transposed):
    """A one-token step from the KV cache (its query heads folded onto the K/V head they share, SDPA's fused
    kernel: attend_one_token) gives the hidden state that the whole sequence gives at that position (grouped-query
    attention: 4 query heads, 2 K/V heads; 3 rows), with linear()'s few-row products in either form, (w x^T)^T as
    on AMD (which also hands back a transposed query) or x w^T as on Intel."""
    monkeypatch.setattr(mmmoe, "FEW_ROWS_TRANSPOSED", transposed)
    path, cfg, _ = tiny_ckpt()
    model = MMMoE.from_pretrained(path)
    ids = torch.randint(0, 97, (3, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = model.hidden_states(ids)  # (3, 9, C), no cache
        model.setup_caches(3, 9)
        model.hidden_states(ids[:, :8], torch.arange(8))
        step = model.hidden_states(ids[:, 8:], torch.tensor([8]))  # (3, 1, C)
        model.clear_caches()
    assert (step[:, 0] - whole[:, 8]).abs().max() < 1e-5 * whole.abs().max()


def test_cached_generation_equals_uncached(tiny_ckpt):
    path, cfg, _ = tiny_ckpt(window=6)
    model = MMMoE.from_pretrained(path)
    prompt = torch.randint(0, 97, (3, 5), generator=torch.Generator().manual_seed(2))
    for temperature, top_k, top_p in [(0, None, None), (1.0, 20, 0.9)]:
        cached = model.generate(prompt, 12, temperature, top_k, top_p, generator=torch.Generator().manual_seed(3))
        ids, g = prompt, torch.Generator().manual_seed(3)
        for _ in range(12):  # recompute the whole sequence every step: no cache at all
            nxt = mmmoe.sample_next(model(ids)[0][:, -1], temperature, top_k, top_p, generator=g)
            ids = torch.cat([ids, nxt[:, None]], 1)
        assert torch.equal(cached, ids)


@pytest.mark.parametrize("window", [None, 4])
def test_left_padded_rows_compute_what_each_row_computes_alone(tiny_ckpt, window):
    """Rows of different lengths in one batch: left padding (pad (B,) columns) that no token sees, and each row's own
    positions from 0. Logits, and cached greedy generation, equal each row run alone (with a sliding window too)."""
    path, cfg, _ = tiny_ckpt(window=window)
    model = MMMoE.from_pretrained(path)
    g = torch.Generator().manual_seed(5)
    rows = [torch.randint(2, 97, (n,), generator=g) for n in (7, 3, 5)]
    pad = torch.tensor([0, 4, 2])
    idx = torch.stack([torch.cat([torch.full((p,), 1), r]) for r, p in zip(rows, pad.tolist())])  # (3, 7), <eos> as filler
    logits = model(idx, pad=pad)[0]
    out = model.generate(idx, 6, temperature=0, pad=pad)
    for r, (row, p) in enumerate(zip(rows, pad.tolist())):
        alone = model(row[None])[0][0]
        assert (logits[r, p:] - alone).abs().max() <= 1e-5 * alone.abs().max()
        assert torch.equal(out[r, 7:], model.generate(row[None], 6, temperature=0)[0, len(row):])
    assert not torch.allclose(logits[1, 4:], model(idx[1:2])[0][0, 4:])  # unmasked, the padding would change the row


def test_allowed_ids_and_eos(tiny_ckpt):
    path, cfg, _ = tiny_ckpt()
    model = MMMoE.from_pretrained(path)
    allowed = torch.tensor([3, 7, 11])
    out = model.generate(torch.tensor([[0, 4]] * 2), 20, 1.0, allowed_ids=allowed,
                         generator=torch.Generator().manual_seed(0))
    assert set(out[:, 2:].flatten().tolist()) <= {3, 7, 11}
    only_eos = model.generate(torch.tensor([[0, 4]]), 20, 1.0, allowed_ids=torch.tensor([1]), stop_at_eos=True)
    assert only_eos.tolist() == [[0, 4, 1]]  # stopped at the first eos


def test_save_load_round_trip(tiny_ckpt, tmp_path):
    for kw in [dict(), dict(tied=True)]:
        path, cfg, sd = tiny_ckpt(name=f"src{len(kw)}", **kw)
        model = MMMoE.from_pretrained(path)
        out = tmp_path / f"saved{len(kw)}"
        model.save_pretrained(out, max_shard_bytes=40_000)
        index = json.loads((out / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # really sharded
        assert set(index["weight_map"]) == set(sd)  # exactly the HF key set, per-expert layout
        for name, fname in index["weight_map"].items():  # readable by safetensors itself, bit for bit
            with safe_open(out / fname, "pt") as f:
                assert torch.equal(f.get_tensor(name), sd[name])
        again = MMMoE.from_pretrained(out)
        for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
            assert torch.equal(a, b), n
        assert again.config == model.config
        assert (again.lm_head.weight is again.model.embed_tokens.weight) == bool(kw)


def test_bfloat16_checkpoint_and_dtype_override(tiny_ckpt, tmp_path):
    path, cfg, sd = tiny_ckpt()
    model = MMMoE.from_pretrained(path, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    back = MMMoE.from_pretrained(tmp_path / "bf16")  # the checkpoint's own dtype by default
    assert back.lm_head.weight.dtype == torch.bfloat16
    assert torch.equal(back.lm_head.weight, sd["lm_head.weight"].bfloat16())


def test_fused_expert_layout(tiny_ckpt, tmp_path):
    from conftest import write_checkpoint
    path, cfg, sd = tiny_ckpt()
    fused = {}
    for k, v in sd.items():  # rewrite as newer transformers keep it in memory: mlp.experts.gate_up_proj
        if ".experts." not in k:
            fused[k.replace("block_sparse_moe", "mlp")] = v
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.block_sparse_moe.experts."
        w = lambda n: torch.stack([sd[p + f"{j}.{n}.weight"] for j in range(4)])  # noqa: E731
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.cat([w("w1"), w("w3")], 1)
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = w("w2")
    a = MMMoE.from_pretrained(path)
    b = MMMoE.from_pretrained(write_checkpoint(tmp_path / "fused", cfg, fused))
    ids = torch.arange(20)[None]
    assert torch.equal(a(ids)[0], b(ids)[0])


def test_mixtral_8x7b_builds_on_meta_with_published_count():
    hf = {"architectures": ["MixtralForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
          "max_position_embeddings": 32768, "num_attention_heads": 32, "num_experts_per_tok": 2,
          "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "rms_norm_eps": 1e-05,
          "rope_theta": 1e6, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
          "vocab_size": 32000, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}
    with torch.device("meta"):
        model = MMMoE(MMMoEConfig.from_hf(hf))
    assert sum(p.numel() for p in model.parameters()) == 46_702_792_704


# --- bad input: one specific line, nothing half-written --------------------------------------------------

def expect_bad(path, *words):
    with pytest.raises(BadInput) as e:
        MMMoE.from_pretrained(path)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_missing_shard(tiny_ckpt):
    path, _, _ = tiny_ckpt(shards=3)
    (path / "model-00002-of-00003.safetensors").unlink()
    expect_bad(path, "missing shard", "model-00002-of-00003.safetensors")


def test_missing_and_unexpected_tensor(tiny_ckpt, tmp_path):
    from conftest import write_checkpoint
    path, cfg, sd = tiny_ckpt()
    gone = dict(sd)
    del gone["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    expect_bad(write_checkpoint(tmp_path / "a", cfg, gone), "missing tensor",
               "model.layers.1.block_sparse_moe.experts.2.w3.weight")
    extra = dict(sd, **{"model.layers.0.self_attn.rotary.weight": torch.zeros(3)})
    expect_bad(write_checkpoint(tmp_path / "b", cfg, extra), "unexpected tensor", "rotary")
    extra = dict(sd, **{"model.layers.0.block_sparse_moe.experts.9.w1.weight": torch.zeros(96, 64)})
    expect_bad(write_checkpoint(tmp_path / "c", cfg, extra), "unexpected tensor", "experts.9.w1")


def test_shape_mismatch_names_tensor_and_shapes(tiny_ckpt, tmp_path):
    from conftest import write_checkpoint
    path, cfg, sd = tiny_ckpt()
    sd["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(60, 64)
    expect_bad(write_checkpoint(tmp_path / "x", cfg, sd), "shape mismatch for model.layers.1.self_attn.q_proj.weight",
               "(60, 64)", "(64, 64)")


def test_unsupported_dtypes_and_architecture(tiny_ckpt, tmp_path):
    from conftest import write_checkpoint
    path, cfg, sd = tiny_ckpt()
    expect_bad(write_checkpoint(tmp_path / "a", cfg | {"torch_dtype": "int8", "dtype": "int8"}, sd), "dtype", "int8")
    sd8 = dict(sd, **{"model.norm.weight": sd["model.norm.weight"].to(torch.int8)})
    expect_bad(write_checkpoint(tmp_path / "b", cfg, sd8), "unsupported dtype I8", "model.norm.weight")
    expect_bad(write_checkpoint(tmp_path / "c", cfg | {"architectures": ["DeepseekV3ForCausalLM"]}, sd),
               "unsupported architecture DeepseekV3ForCausalLM")


def test_corrupt_header(tiny_ckpt):
    path, _, _ = tiny_ckpt()
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\x00garbage!!!!"
    f.write_bytes(bytes(data))
    expect_bad(path, "corrupt safetensors header")
    f.write_bytes(data[:4])  # truncated
    expect_bad(path, "corrupt safetensors header")


def test_failed_save_leaves_previous_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    path, _, _ = tiny_ckpt()
    model = MMMoE.from_pretrained(path)
    out = tmp_path / "out"
    model.save_pretrained(out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    calls = []

    def dying_save(*a, **k):  # the disk fills up on the second shard
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real_save(*a, **k)
    real_save = hf.save_file
    monkeypatch.setattr(hf, "save_file", dying_save)
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(OSError):
        model.save_pretrained(out, max_shard_bytes=40_000)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left behind


def test_cli_generates_and_reports_bad_input_in_one_line(tiny_ckpt, tmp_path):
    path, _, _ = tiny_ckpt()
    run = lambda *a: subprocess.run([sys.executable, str(ROOT / "mmmoe.py"), *a], capture_output=True, text=True)  # noqa
    ok = run(str(path), "w1 w2 w3", "--max-new-tokens", "5")
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr
    for args, words in [((str(tmp_path / "nope"), "w1"), "no config.json"), ((str(path), "  "), "empty prompt")]:
        bad = run(*args)
        assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and words in bad.stderr, bad.stderr


# --- a copy-upcycled base: identical experts stored once --------------------------------------------------

def test_identical_experts_are_kept_once_and_saved_as_mixtral(tiny_ckpt, tmp_path):
    path, cfg, sd = tiny_ckpt(copies=True)
    model = MMMoE.from_pretrained(path)
    for layer in model.model.layers:
        ex = layer.block_sparse_moe.experts
        assert ex.w1.shape[0] == ex.w2.shape[0] == ex.w3.shape[0] == 1  # one copy serves all four experts
    ids = torch.randint(0, cfg["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(1))
    assert (model(ids)[0][0].double() - reference_logits(sd, cfg, ids[0].tolist())).abs().max() < 1e-4
    model.save_pretrained(tmp_path / "saved")  # other loaders get the standard layout: one tensor per expert
    with safe_open(tmp_path / "saved" / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(sd) and all(torch.equal(f.get_tensor(k), sd[k]) for k in sd)
    assert MMMoE.from_pretrained(tmp_path / "saved").model.layers[1].block_sparse_moe.experts.w2.shape[0] == 1


def test_experts_that_differ_in_one_number_keep_their_own_weights(tiny_ckpt, tmp_path):
    from conftest import write_checkpoint
    path, cfg, sd = tiny_ckpt(copies=True)
    sd["model.layers.1.block_sparse_moe.experts.3.w2.weight"][5, 7] += 1e-3
    model = MMMoE.from_pretrained(write_checkpoint(tmp_path / "one_off", cfg, sd))
    assert [len(layer.block_sparse_moe.experts.w2) for layer in model.model.layers] == [1, 4]
    ids = torch.randint(0, cfg["vocab_size"], (1, 11), generator=torch.Generator().manual_seed(1))
    assert (model(ids)[0][0].double() - reference_logits(sd, cfg, ids[0].tolist())).abs().max() < 1e-4


def test_loader_refuses_what_safetensors_or_the_layout_forbids(tiny_ckpt, tmp_path):
    from conftest import write_checkpoint
    path, cfg, sd = tiny_ckpt(shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    twice = dict(index["weight_map"])
    save_file({"model.norm.weight": sd["model.norm.weight"]}, path / "extra.safetensors")
    twice["model.norm.weight"] = "extra.safetensors"  # the index names both files; each holds the tensor
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": twice}))
    expect_bad(path, "model.norm.weight is stored twice")
    outside = dict(index["weight_map"], **{"model.norm.weight": "../other/model.safetensors"})
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": outside}))
    expect_bad(path, "../other/model.safetensors", "must be files in the checkpoint directory")
    (path / "model.safetensors.index.json").write_text("[1, 2]")
    expect_bad(path, "is not a safetensors index")
    one = write_checkpoint(tmp_path / "one", cfg, sd)
    raw = bytearray((one / "model.safetensors").read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    header[second]["data_offsets"] = header[first]["data_offsets"]  # two tensors over the same bytes
    text = json.dumps(header).encode()
    (one / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])
    expect_bad(one, "corrupt safetensors header")


def test_config_mistakes_are_one_line(tiny_ckpt):
    path, cfg, _ = tiny_ckpt()
    for bad, words in [({k: v for k, v in cfg.items() if k != "hidden_size"}, "lacks a positive integer hidden_size"),
                       (cfg | {"num_experts_per_tok": 9}, "num_experts_per_tok 9 must be 1..num_local_experts (4)")]:
        (path / "config.json").write_text(json.dumps(bad))
        expect_bad(path, words)
    (path / "config.json").write_text("[1, 2]")
    expect_bad(path, "must hold a JSON object")
