"""A Hugging Face model id is fetched into the Hub cache and streamed from there like a
local directory (pipeline/run.py ``fetch_model``): same checkpoint, same memory formula.

No hub is reachable from the tests, so the cache is laid out by hand, as
``huggingface_hub`` writes it (``models--org--name/refs/main`` and ``snapshots/<commit>``),
and the library runs offline against it.
"""

from __future__ import annotations

import shutil

import huggingface_hub.constants as hub
import pytest

from gptq_worker.cli import main
from tests.worker.test_cli import _base

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, model_dir):
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    shutil.copytree(model_dir("llama"), repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return cache


def _quantize(model: str, out, calibration, capsys, *extra: str) -> tuple[int, str]:
    code = main(["quantize", "--no-progress-bar", *_base(model, out, calibration), *extra])
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def test_a_hub_id_quantizes_to_the_same_bytes_as_its_local_directory(
    hub_cache, tmp_path, model_dir, calibration_file, capsys
):
    code, text = _quantize("acme/tiny-llama", tmp_path / "from-hub", calibration_file, capsys)
    assert code == 0, text
    code, text = _quantize(str(model_dir("llama")), tmp_path / "from-dir", calibration_file, capsys)
    assert code == 0, text
    hub_files = sorted(p.name for p in (tmp_path / "from-hub").glob("*.safetensors"))
    assert hub_files and hub_files == sorted(
        p.name for p in (tmp_path / "from-dir").glob("*.safetensors")
    )
    for name in hub_files:
        assert (tmp_path / "from-hub" / name).read_bytes() == (
            tmp_path / "from-dir" / name
        ).read_bytes()


def test_a_hub_id_missing_offline_is_one_clear_line(hub_cache, tmp_path, calibration_file, capsys):
    code, text = _quantize("acme/not-there", tmp_path / "out", calibration_file, capsys)
    assert code == 2
    assert "acme/not-there is not in the Hugging Face cache" in text
    assert "Traceback" not in text and not (tmp_path / "out").exists()


def test_a_revision_with_a_local_directory_is_refused(
    tmp_path, model_dir, calibration_file, capsys
):
    code, text = _quantize(
        str(model_dir("llama")), tmp_path / "out", calibration_file, capsys, "--revision", "v2"
    )
    assert code == 2 and "applies to Hugging Face model ids" in text
