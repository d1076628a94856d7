"""Loading official checkpoints: layouts that must load, and every bad file that must be refused clearly."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from facemoe.errors import CheckpointError  # noqa: E402
from facemoe.model import infer_config, load_checkpoint  # noqa: E402
from facemoe.model.config import PRESETS  # noqa: E402


def _forward(model, golden):
    with torch.no_grad():
        return model(golden["inputs"][:2])


def test_model_pt_round_trip(tmp_path, golden):
    path = tmp_path / "model.pt"
    torch.save(golden["state_dict"], path)
    model = load_checkpoint(path, config="tiny")
    assert not model.training
    assert (_forward(model, golden) - golden["outputs"][:2]).abs().max().item() <= 1e-5


def test_checkpoint_gpu_with_module_prefix(tmp_path, golden):
    path = tmp_path / "checkpoint_gpu_0.pt"
    wrapped = {f"module.{k}": v for k, v in golden["state_dict"].items()}
    torch.save({"epoch": 3, "global_step": 100, "state_dict_backbone": wrapped, "state_dict_softmax_fc": {}}, path)
    model = load_checkpoint(path, config="infer")
    assert (_forward(model, golden) - golden["outputs"][:2]).abs().max().item() <= 1e-5


def test_infer_config_from_shapes(golden):
    cfg = infer_config(golden["state_dict"], k=2)
    assert cfg == PRESETS["tiny"]
    assert infer_config(golden["state_dict"], k=1).k == 1


def _expect(state, match, config="tiny"):
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(state, config=config)


def test_wrong_expert_count_is_named(golden):
    # A 2-expert checkpoint: drop expert 2 everywhere and cut router rows.
    state = {k: v for k, v in golden["state_dict"].items() if ".experts.2." not in k}
    for key in [k for k in state if k.endswith("router.gate.weight")]:
        state[key] = state[key][:2]
    _expect(state, "checkpoint has 2 experts per block, config says 3 experts per block")


def test_wrong_depth_is_named(golden):
    state = {k: v for k, v in golden["state_dict"].items() if not k.startswith("layers.1.blocks.1.")}
    _expect(state, r"checkpoint has depths \[2, 1, 2\], config says depths \[2, 2, 2\]")


def test_full_config_against_tiny_checkpoint(golden):
    _expect(golden["state_dict"], "checkpoint has embed dim 32, config says embed dim 384", config="full")


def test_missing_key(golden):
    state = dict(golden["state_dict"])
    del state["layers.0.blocks.0.attn.proj.bias"]
    _expect(state, r"1 missing keys: layers\.0\.blocks\.0\.attn\.proj\.bias")


def test_unexpected_key(golden):
    state = dict(golden["state_dict"])
    state["head.weight"] = torch.zeros(3)
    _expect(state, r"1 unexpected keys: head\.weight")


def test_misshaped_key(golden):
    state = dict(golden["state_dict"])
    state["layers.0.blocks.0.attn.proj.bias"] = torch.zeros(33)
    _expect(state, r"wrong shape: layers\.0\.blocks\.0\.attn\.proj\.bias \(33,\) vs \(32,\)")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_values_refused(golden, bad):
    state = dict(golden["state_dict"])
    weight = state["layers.1.blocks.0.mlp.experts.1.fc2.weight"].clone()
    weight[0, 0] = bad
    state["layers.1.blocks.0.mlp.experts.1.fc2.weight"] = weight
    _expect(state, r"NaN or Inf values in layers\.1\.blocks\.0\.mlp\.experts\.1\.fc2\.weight")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"model\.pt: checkpoint file not found"):
        load_checkpoint(tmp_path / "model.pt")


def test_garbage_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_pickled_objects_are_not_executed(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save({"x": _Payload()}, path)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(path)
    assert "code ran" not in capsys.readouterr().out


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="expected a state dict, found a Tensor"):
        load_checkpoint(path)
