"""Window attention modes (docs/COMPILED.md#attention-modes): the same function as the explicit matmul form."""

from __future__ import annotations

import warnings

import pytest

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def model():
    from facemoe.model import build_model
    from facemoe.model.random_weights import randomize

    return randomize(build_model("tiny"), seed=0).eval()


@pytest.mark.parametrize("mode", ["sdpa", "flex"])
def test_attention_mode_matches_matmul_fp32(model, mode):
    x = torch.randn(3, 3, 120, 120, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = model(x)
        with model.using_attention(mode), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # flex without torch.compile warns that it is unfused
            out = model(x)
    assert model.attention == "matmul"
    assert (out - reference).abs().max().item() < 1e-5 * max(1.0, reference.abs().max().item())
    assert not torch.equal(reference, torch.zeros_like(reference))


@pytest.mark.parametrize("shifted", [False, True])
def test_sdpa_block_matches_matmul_fp16_tolerance(model, shifted):
    block = model.layers[0].blocks[1 if shifted else 0]
    assert (block.attn_mask is not None) == shifted
    attn = block.attn
    x = torch.randn(2 * 16, 25, attn.dim, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        reference = attn(x, block.attn_mask)
        attn.set_mode("sdpa")
        try:
            out = attn(x, block.attn_mask)
            half = attn.half()(x.half(), block.attn_mask)
        finally:
            attn.float().set_mode("matmul")
    assert (out - reference).abs().max().item() < 1e-5
    assert (half.float() - reference).abs().max().item() < 5e-3


def test_tracing_forces_matmul_and_bad_mode_refused(model):
    with model.using_attention("sdpa"):
        with model.tracing():
            assert model.attention == "matmul"
        assert model.attention == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        model.set_attention("fast")  # type: ignore[arg-type]
