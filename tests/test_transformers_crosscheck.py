"""The four layouts against transformers itself, where it happens to be installed (it is not a dependency: in CI
this module is skipped). Run in a scratch environment with transformers to check that the tests' fixtures are
really each layout, that our model computes what transformers computes, and that each reads the other's save."""
import pytest
import torch
from conftest import tiny_hf_state_dict, tiny_layout_config, write_checkpoint

from mmmoe import MMMoE

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("copies", [False, True])
@pytest.mark.parametrize("layout", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_transformers_reads_the_fixture_and_computes_the_same(tmp_path, layout, copies):
    cfg = tiny_layout_config(layout)
    path = write_checkpoint(tmp_path / "ckpt", cfg, tiny_hf_state_dict(cfg, copies=copies))
    theirs, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert type(theirs).__name__ == cfg["architectures"][0] and not any(info.values()), info  # no missing or unexpected tensor
    ours = MMMoE.from_pretrained(path)
    ids = torch.randint(0, cfg["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(ids).logits
    assert (ours(ids)[0] - expected).abs().max() < 1e-4
    ours.save_pretrained(tmp_path / "ours")  # our save, read by transformers
    again, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        assert not any(info.values()) and torch.equal(again(ids).logits, expected)
    theirs.save_pretrained(tmp_path / "theirs")  # transformers' save, read by us
    assert torch.equal(MMMoE.from_pretrained(tmp_path / "theirs")(ids)[0], ours(ids)[0])
