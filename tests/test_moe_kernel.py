"""Triton sparse-MoE kernel against the PyTorch sparse reference (Triton's interpreter when there is no GPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    if "triton" in sys.modules:
        # triton.language decorates its own helpers when imported: interpret mode cannot be turned on later.
        pytest.skip(
            "triton was imported before TRITON_INTERPRET could be set; run with TRITON_INTERPRET=1",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from facemoe.gating import triton as smt  # noqa: E402
from facemoe.model.moe import MoE  # noqa: E402


def _moe(dim: int, hidden: int, num_experts: int, k: int, seed: int) -> MoE:
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(dim, hidden, num_experts, k, routing="sparse")
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * p.shape[-1] ** -0.5)
    return moe.eval()


def _run(moe: MoE, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(kernel output in fp32, fp32 sparse reference on the same dtype-rounded inputs and weights)."""
    x = x.to(dtype).float()
    with torch.no_grad():
        if dtype != torch.float32:  # the reference sees the same rounded expert weights; the router stays fp32
            for p in moe.experts.parameters():
                p.copy_(p.to(dtype).float())
        want = moe(x)
        router, w1, b1, w2, b2 = moe.stacked_weights()
        dev = [t.to(DEVICE) for t in (router, w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype))]
        got = smt.sparse_moe(x.to(dtype).to(DEVICE), *dev, k=moe.k)
    return got.float().cpu(), want


@pytest.mark.parametrize(
    ("tokens", "dim", "hidden", "num_experts", "k", "dtype"),
    [
        (1, 32, 64, 3, 2, torch.float32),  # a single token
        (25, 128, 512, 3, 2, torch.float32),  # tiny preset, stage 3, batch 1
        (400, 32, 128, 3, 2, torch.float32),  # tiny preset, stage 1, batch 1
        (97, 64, 256, 3, 2, torch.float16),
        (61, 48, 96, 5, 1, torch.float32),
        (40, 32, 64, 8, 2, torch.float16),
    ],
)
def test_kernel_matches_sparse_reference(tokens, dim, hidden, num_experts, k, dtype):
    moe = _moe(dim, hidden, num_experts, k, seed=tokens + dim)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(tokens))
    got, want = _run(moe, x, dtype)
    scale = want.abs().max().item()
    tolerance = 2e-6 * scale if dtype == torch.float32 else 2e-3 * scale
    assert (got - want).abs().max().item() <= tolerance


def test_uneven_loads_and_an_empty_expert():
    moe = _moe(32, 64, 4, 2, seed=3)
    x = torch.randn(70, 32, generator=torch.Generator().manual_seed(1))
    x[:, 0] = 5.0
    with torch.no_grad():
        moe.router.gate.weight[:, 0] = torch.tensor([10.0, 0.0, 0.0, -10.0])
    with moe.recording_routing() as calls:
        got, want = _run(moe, x, torch.float32)
    load = torch.bincount(calls[0].flatten(), minlength=4).tolist()
    assert load[0] == 70 and load[3] == 0
    assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item()


def test_ties_go_to_the_lower_index():
    moe = _moe(16, 32, 3, 2, seed=4)
    with torch.no_grad():
        moe.router.gate.weight[2] = moe.router.gate.weight[1]  # experts 1 and 2 always tie
        moe.router.gate.weight[0] = -moe.router.gate.weight[1]  # ... and sometimes both beat expert 0
    x = torch.randn(33, 16, generator=torch.Generator().manual_seed(2))
    idx, _ = smt.router_topk(x.to(DEVICE), moe.router.gate.weight.detach().to(DEVICE), 2)
    want = torch.topk(x @ moe.router.gate.weight.detach().T, 2, dim=-1).indices
    assert torch.equal(idx.long().cpu(), want)
    got, ref = _run(moe, x, torch.float32)
    assert (got - ref).abs().max().item() <= 2e-6 * ref.abs().max().item()


def test_grouping_covers_every_assignment_once():
    idx = torch.tensor([[0, 2], [2, 0], [0, 1], [0, 2], [1, 0]], dtype=torch.int32)
    sorted_ids, block_expert = smt.group_by_expert(idx, 4, block_m=4)
    flat = idx.flatten()
    real = sorted_ids[sorted_ids < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))
    for tile, expert in enumerate(block_expert.tolist()):
        rows = sorted_ids[tile * 4 : (tile + 1) * 4]
        rows = rows[rows < flat.numel()]
        if expert >= 4:
            assert rows.numel() == 0
        else:
            assert (flat[rows.long()] == expert).all()


def test_model_runs_its_moe_blocks_through_the_kernel(tiny_model):
    x = torch.randn(1, 3, 120, 120, generator=torch.Generator().manual_seed(0))
    model = tiny_model
    blocks = [moe for _, moe in model.moe_layers()]
    with torch.no_grad():
        with model.using_routing("sparse"):
            want = model(x)
        try:
            with model.using_kernel("triton"):
                assert model.kernel == "triton"
                got = model.to(DEVICE)(x.to(DEVICE)).cpu()
                # Only the kernel path builds the stacked weights: every block ran through it.
                assert all(moe._kernel_weights is not None for moe in blocks)
        finally:
            model.cpu()
    assert (got - want).abs().max().item() <= 1e-4
    assert model.kernel == "torch" and all(moe._kernel_weights is None for moe in blocks)
    assert "forward" not in blocks[0].__dict__, "no monkeypatching"


def test_kernel_as_a_construction_choice():
    moe = _moe(32, 64, 3, 2, seed=9)
    built = MoE(32, 64, 3, 2, kernel="triton")
    built.load_state_dict(moe.state_dict())
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = moe(x)
        got = built.to(DEVICE)(x.to(DEVICE)).cpu()
    assert (got - want).abs().max().item() <= 2e-6 * want.abs().max().item()
    with pytest.raises(RuntimeError, match="torch kernel only"), built.recording_routing():
        pass
    with pytest.raises(ValueError, match=r"cannot use the sparse MoE kernel: k=3"):
        MoE(32, 64, 3, 3, kernel="triton")


@pytest.mark.parametrize(
    ("tokens", "dim", "hidden", "num_experts", "k", "dtype"),
    [(1, 32, 64, 3, 2, torch.float32), (45, 64, 128, 3, 2, torch.float16), (33, 48, 96, 4, 1, torch.float32)],
)
def test_single_launch_kernel_matches_sparse_reference(tokens, dim, hidden, num_experts, k, dtype):
    """The kernel the TensorRT AOT plugin embeds."""
    moe = _moe(dim, hidden, num_experts, k, seed=tokens)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(tokens)).to(dtype)
    with torch.no_grad():
        weights = [t.to(dtype) for t in moe.stacked_weights()]
        moe.router.gate.weight.copy_(weights[0].float())  # the kernel sees the router in the input dtype
        for p in moe.experts.parameters():
            p.copy_(p.to(dtype).float())
        want = moe(x.float())
        got = smt.fused_sparse_moe(x.to(DEVICE), *(w.to(DEVICE) for w in weights), k=k).float().cpu()
    tolerance = 2e-6 if dtype == torch.float32 else 2e-3
    assert (got - want).abs().max().item() <= tolerance * want.abs().max().item()


def test_aot_kernel_compiles_to_hopper_ptx():
    """The TensorRT AOT path: PTX for sm_90 without a GPU (a fresh process: the interpreter is off there)."""
    pytest.importorskip("triton.backends.nvidia")
    code = (
        "from triton.backends.compiler import GPUTarget\n"
        "from facemoe.export.trt_plugin import compile_fused_kernel\n"
        "k = compile_fused_kernel('fp16', 384, 1536, 3, 2, target=GPUTarget('cuda', 90, 32))\n"
        "entry = k.ptx[k.ptx.index('.entry'):].split(')')[0]\n"
        "print(k.name, entry.count('.param'), k.threads, k.shared)\n"
    )
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    name, params, threads, shared = result.stdout.split()
    # 6 inputs, the token count, the output: Triton's hidden scratch pointers must be gone.
    assert name == "_fused_token_tile_kernel" and int(params) == 8
    assert int(threads) % 32 == 0 and int(shared) <= 48 * 1024


@pytest.mark.parametrize(
    ("tokens", "dim", "hidden", "num_experts", "k", "dtype"),
    [(1, 32, 64, 3, 2, torch.float32), (97, 64, 256, 3, 2, torch.float16), (61, 48, 96, 5, 1, torch.float32)],
)
def test_fc2_epilogue_adds_into_the_output(tokens, dim, hidden, num_experts, k, dtype):
    """The top-k sum fused into fc2 (atomic adds into the output): same tolerances as the two-step sum."""
    moe = _moe(dim, hidden, num_experts, k, seed=tokens + dim)
    x = torch.randn(tokens, dim, generator=torch.Generator().manual_seed(tokens))
    _, want = _run(moe, x, dtype)
    router, w1, b1, w2, b2 = moe.stacked_weights()
    dev = [t.detach().to(DEVICE) for t in (router, w1.to(dtype), b1.to(dtype), w2.to(dtype), b2.to(dtype))]
    got = smt.sparse_moe(x.to(dtype).to(DEVICE), *dev, k=k, add_into_output=True)
    assert got.dtype == dtype
    tolerance = 2e-6 if dtype == torch.float32 else 2e-3
    assert (got.float().cpu() - want).abs().max().item() <= tolerance * want.abs().max().item()
