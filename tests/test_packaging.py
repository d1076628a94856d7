"""Packaging promises: the runtime imports without torch, the hub download fails clearly offline."""

from __future__ import annotations

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
