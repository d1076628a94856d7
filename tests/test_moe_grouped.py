"""The grouped-GEMM expert path (PyTorch's grouped GEMM) against the sparse reference, on the CPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from facemoe.gating.grouped_mm import (  # noqa: E402
    expert_weights,
    group_assignments,
    grouped_experts,
    grouped_mm_function,
    grouped_sparse_moe,
    per_group_mm,
)
from facemoe.gating.torch_op import reference_sparse_moe  # noqa: E402
from facemoe.model.moe import MoE  # noqa: E402

needs_grouped_mm = pytest.mark.skipif(grouped_mm_function() is None, reason="this torch has no grouped GEMM")


def _weights(dim: int, hidden: int, num_experts: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [(num_experts, dim), (num_experts, hidden, dim), (num_experts, hidden), (num_experts, dim, hidden)]
    shapes.append((num_experts, dim))
    return [torch.randn(s, generator=gen) * s[-1] ** -0.5 for s in shapes]


def test_groups_are_contiguous_stable_and_cover_every_assignment_once():
    idx = torch.tensor([[0, 2], [2, 0], [0, 2], [2, 0], [0, 2]])  # expert 1 is chosen by nobody
    groups = group_assignments(idx, 3)
    assert sorted(groups.order.tolist()) == list(range(10))
    assert groups.offsets.dtype == torch.int32 and groups.offsets.tolist() == [5, 5, 10]
    assert torch.equal(groups.expert, idx.flatten()[groups.order])
    assert groups.expert.tolist() == [0] * 5 + [2] * 5
    assert groups.token.tolist() == [0, 1, 2, 3, 4] * 2  # ascending tokens inside each group (stable)


@needs_grouped_mm
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_grouped_mm_equals_one_matmul_per_group(dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(23, 32, generator=gen).to(dtype)
    w = expert_weights(*_weights(32, 64, 4, seed=1)[1:], dtype)[0]  # (N, C, H) transposed view
    offsets = torch.tensor([7, 7, 20, 23], dtype=torch.int32)  # an empty group
    got = grouped_mm_function()(a, w, offs=offsets)  # type: ignore[misc]
    want = per_group_mm(a, w, offsets)
    assert (got.float() - want.float()).abs().max().item() <= 1e-2 * want.float().abs().max().item()
    if dtype == torch.float32:
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("tokens", "dim", "hidden", "num_experts", "k", "dtype"),
    [
        (1, 32, 64, 3, 2, torch.float32),
        (400, 32, 128, 3, 2, torch.float32),
        (97, 64, 256, 3, 2, torch.float16),
        (61, 48, 96, 5, 1, torch.float32),
        (40, 32, 64, 8, 2, torch.float16),
    ],
)
@pytest.mark.parametrize("mm", ["torch", "per_group"])
def test_grouped_path_matches_sparse_reference(tokens, dim, hidden, num_experts, k, dtype, mm):
    """The kernel tests' tolerances: 2e-6 (fp32) and 2e-3 (fp16) of the output's scale."""
    if mm == "torch" and grouped_mm_function() is None:
        pytest.skip("this torch has no grouped GEMM")
    router, w1, b1, w2, b2 = _weights(dim, hidden, num_experts, seed=tokens)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    rounded = [w.to(dtype).float() for w in (w1, b1, w2, b2)]
    want = reference_sparse_moe(x.float(), router.to(dtype).float(), *rounded, k=k)
    top_val, top_idx = torch.topk(torch.nn.functional.linear(x, router.to(dtype)), k, dim=-1)
    weights = expert_weights(w1, b1, w2, b2, dtype)
    got = grouped_experts(x, top_val, top_idx, *weights, mm=per_group_mm if mm == "per_group" else None)
    assert got.dtype == dtype and got.shape == x.shape
    tolerance = (2e-6 if dtype == torch.float32 else 2e-3) * want.abs().max().item()
    assert (got.float() - want).abs().max().item() <= tolerance
    if mm == "torch" and dtype == torch.float32:
        assert torch.equal(grouped_sparse_moe(x, router, w1, b1, w2, b2, k=k), got)


def _moe(seed: int, **kwargs: object) -> MoE:
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(32, 128, 3, 2, routing="sparse", **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return moe.eval()


@needs_grouped_mm
def test_block_routes_bit_for_bit_like_the_reference():
    moe = _moe(5)
    x = torch.randn(3, 41, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with moe.recording_routing() as ref_calls:
            want = moe(x)
        with moe.using_kernel("grouped"), moe.recording_routing() as calls:
            got = moe(x)
            assert moe._kernel_weights is not None and moe._kernel_weights[0].dtype == torch.float32
        with moe.using_kernel("grouped_bf16"), moe.recording_routing() as bf16_calls:
            got_bf16 = moe(x)
            assert moe._kernel_weights is not None and moe._kernel_weights[0].dtype == torch.bfloat16
    assert moe.kernel == "torch" and moe._kernel_weights is None
    assert torch.equal(calls[0], ref_calls[0]) and torch.equal(bf16_calls[0], ref_calls[0])
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 2e-6 * scale
    assert got_bf16.dtype == torch.float32
    assert 1e-4 * scale < (got_bf16 - want).abs().max().item() <= 2e-2 * scale  # bf16 experts, really


@needs_grouped_mm
def test_grouped_as_a_construction_choice_and_its_limits():
    built = _moe(6, kernel="grouped")
    assert built.kernel == "grouped"
    with pytest.raises(ValueError, match=r"cannot use the sparse MoE kernel: k=3"):
        MoE(32, 64, 3, 3, kernel="grouped")
    with pytest.raises(ValueError, match="at most 2 terms"):
        grouped_experts(torch.zeros(2, 4), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.long), *[None] * 4)  # type: ignore[arg-type]


@needs_grouped_mm
def test_whole_model_through_the_grouped_path(tiny_model):
    x = torch.randn(2, 3, 120, 120, generator=torch.Generator().manual_seed(0))
    model = tiny_model
    with torch.no_grad(), model.using_routing("sparse"):
        with model.recording_routing() as ref_calls:
            want = model(x)
        with model.using_kernel("grouped"), model.recording_routing() as calls:
            got = model(x)
    assert all(torch.equal(calls[name][0], ref_calls[name][0]) for name in ref_calls)
    assert (got - want).abs().max().item() <= 1e-4
