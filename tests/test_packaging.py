"""Packaging promises: the runtime imports without torch, the hub download fails clearly offline."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from facemoe.errors import FaceMoEError


def test_runtime_imports_without_torch():
    # A meta-path finder that refuses torch stands in for an edge box without it.
    script = textwrap.dedent(
        """
        import sys
        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is not installed on this edge box")
        sys.meta_path.insert(0, NoTorch())
        import facemoe.bundle, facemoe.preprocess, facemoe.runtime.backends
        from facemoe.runtime.backends.onnxruntime_backend import OnnxRuntimeBackend
        import facemoe.export.graph_check
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_hub_download_offline_message(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    from facemoe import hub as facemoe_hub

    def offline(**_kwargs):
        raise OSError("Temporary failure in name resolution")

    monkeypatch.setattr(hub, "hf_hub_download", offline)
    with pytest.raises(FaceMoEError, match=r"cannot reach the Hugging Face hub .* pass it with --checkpoint"):
        facemoe_hub.download_official("tinyface", tmp_path)


def test_hub_download_requests_official_file(monkeypatch, tmp_path):
    hub = pytest.importorskip("huggingface_hub")
    from facemoe import hub as facemoe_hub

    calls = {}

    def fake(**kwargs):
        calls.update(kwargs)
        return str(tmp_path / kwargs["filename"])

    monkeypatch.setattr(hub, "hf_hub_download", fake)
    path = facemoe_hub.download_official("briar", tmp_path)
    assert calls["repo_id"] == "kartiknarayan/FaceMoE"
    assert calls["filename"] == "swin4m_exp_3_k_2_briar_full/model.pt"
    assert path.name == "model.pt"
    with pytest.raises(FaceMoEError, match="unknown variant"):
        facemoe_hub.download_official("webface", tmp_path)


def _cli(prelude: str, module: str, args: list[str], tmp_path) -> subprocess.CompletedProcess[str]:
    script = prelude + f"\nimport sys\nsys.argv = ['facemoe', *{args!r}]\nfrom {module} import main\nmain()\n"
    env = dict(os.environ, COLUMNS="200")
    return subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_command_whose_module_fails_stays_listed(tmp_path):
    # A broken OpenCV takes enroll's module down; the command is still listed and says why when run.
    block = "import sys\nsys.modules['cv2'] = None"
    listing = _cli(block, "facemoe.cli.main", ["--help"], tmp_path)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[1]: line for line in listing.stdout.splitlines() if line.startswith("│ ") and line.split()[1:]}
    assert "unavailable here" in rows["enroll"]
    assert {"download", "parity", "info", "export", "run", "bench", "build-engine"} <= rows.keys()
    result = _cli(block, "facemoe.cli.main", ["enroll", "--images", "people", "--out", "g.npz"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: facemoe enroll is unavailable: facemoe.cli.enroll_cmd: import of cv2 halted; None in sys.modules"
    ]


def test_broken_torch_install_is_one_line(tmp_path):
    # Installed but unloadable (a missing CUDA library): the hint names the extra and the import error.
    prelude = textwrap.dedent(
        """
        import sys
        class BrokenTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise ImportError("libcudnn.so.9: cannot open shared object file")
        sys.modules.pop("torch", None)
        sys.meta_path.insert(0, BrokenTorch())
        """
    )
    result = _cli(prelude, "facemoe.cli.export_cmd", ["--random-weights", "--out", "b"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: facemoe-export needs PyTorch: pip install 'facemoe-edge[export]' (torch failed to import: "
        "libcudnn.so.9: cannot open shared object file)"
    ]
    assert not (tmp_path / "b").exists()


def test_download_over_https_without_huggingface_hub(monkeypatch, tmp_path):
    # The plain-HTTPS path against a local server laid out like the hub; huggingface_hub made unimportable.
    from facemoe import hub as facemoe_hub

    from runtime_only import fake_hub, hub_file

    payload = os.urandom(2_500_000)
    hub_file(tmp_path / "hub", "swin4m_exp_3_k_2_briar_full/model.pt", payload)
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    seen: list[tuple[int, int | None]] = []
    with fake_hub(tmp_path / "hub") as endpoint:
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        path = facemoe_hub.download_official("briar", tmp_path / "w", progress=lambda d, t: seen.append((d, t)))
        assert path == tmp_path / "w" / "swin4m_exp_3_k_2_briar_full" / "model.pt"
        assert path.read_bytes() == payload
        assert seen[-1] == (len(payload), len(payload)) and len(seen) >= 3, "progress is reported per chunk"
        assert list(path.parent.iterdir()) == [path], "no temporary file left behind"
        with pytest.raises(FaceMoEError, match=r"download failed: HTTP 404"):
            facemoe_hub.download_official("tinyface", tmp_path / "w")
    with pytest.raises(FaceMoEError, match=r"cannot reach the Hugging Face hub .* pass it with --checkpoint"):
        facemoe_hub.download_official("tinyface", tmp_path / "w")
