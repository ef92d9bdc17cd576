"""resolve_model: what each kind of --model becomes, the GGUF conversion cache (reuse, staleness,
concurrent starts, no half-written folders) and clear errors."""

import json
import threading
import time

import pytest

from common.model import registry
from common.model.config import ModelConfig
from common.model.registry import (
    EMBEDDED_MODEL_NAME, SOURCE_MARKER, converted_gguf_folder, is_complete, publish, resolve_model,
)
from tests.helpers.tiny_gguf import write_tiny_gguf
from tests.helpers.tiny_models import make_tiny_hf_model


@pytest.fixture
def tiny_gguf(tmp_path):
    folder = make_tiny_hf_model(tmp_path / "hf")
    return write_tiny_gguf(folder, tmp_path / "tiny.gguf")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TANDEM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


@pytest.fixture
def conversion_count(monkeypatch):
    """Counts real conversions (and slows them, so concurrent callers overlap)."""
    calls = []
    real_convert = registry.convert_gguf

    def counting_convert(*args, **kwargs):
        calls.append(args[0])
        time.sleep(0.3)
        return real_convert(*args, **kwargs)

    monkeypatch.setattr(registry, "convert_gguf", counting_convert)
    return calls


def test_embedded_model_is_reused_without_reconverting(smollm2_folder, monkeypatch):
    marker_mtime = (smollm2_folder / SOURCE_MARKER).stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("the cached folder should have been reused")

    monkeypatch.setattr(registry, "convert_gguf", refuse)
    resolved = resolve_model(None, "auto")
    assert resolved.folder == smollm2_folder and resolved.name == EMBEDDED_MODEL_NAME
    assert resolved.load_format == "safetensors"
    assert (smollm2_folder / SOURCE_MARKER).stat().st_mtime_ns == marker_mtime
    assert resolve_model(None, "safetensors") == resolved
    assert resolve_model(None, "dummy").load_format == "dummy"


def test_gguf_path_is_converted_once_into_the_cache(tiny_gguf, cache_dir, conversion_count):
    first = resolve_model(str(tiny_gguf))
    again = resolve_model(str(tiny_gguf))
    assert first == again and len(conversion_count) == 1
    assert first.folder.parent == cache_dir and first.folder.name.startswith("tiny-")
    assert first.name == "tiny" and ModelConfig.from_folder(first.folder).vocab_size == 512


def test_changed_gguf_is_reconverted(tiny_gguf, cache_dir, conversion_count):
    first = resolve_model(str(tiny_gguf), "gguf").folder
    data = bytearray(tiny_gguf.read_bytes())
    data[-1] ^= 0xFF  # same size, other tensor data
    tiny_gguf.write_bytes(bytes(data))
    second = resolve_model(str(tiny_gguf), "gguf").folder
    assert len(conversion_count) == 2 and first != second


def test_stale_folder_of_same_name_is_replaced(tiny_gguf, cache_dir, conversion_count):
    folder = converted_gguf_folder(tiny_gguf, folder_name="fixed")
    (folder / SOURCE_MARKER).write_text('{"converter_version": 0}')  # as left by an older release
    assert converted_gguf_folder(tiny_gguf, folder_name="fixed") == folder
    assert len(conversion_count) == 2 and is_complete(folder, registry._source_key(tiny_gguf))


def test_concurrent_starts_convert_once_and_see_a_complete_folder(tiny_gguf, cache_dir, conversion_count):
    results, errors = [], []

    def start():
        try:
            folder = converted_gguf_folder(tiny_gguf)
            results.append((folder, (folder / "model.safetensors").is_file(), (folder / SOURCE_MARKER).is_file()))
        except Exception as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(conversion_count) == 1
    assert len({folder for folder, _, _ in results}) == 1 and all(a and b for _, a, b in results)
    assert [p.name for p in cache_dir.iterdir() if p.name.startswith(".tmp-")] == []


def test_losing_the_rename_race_keeps_the_winner(tmp_path):
    key = {"file_name": "x.gguf", "size": 1, "sample_sha256": "0" * 64, "converter_version": 1}
    winner, loser = tmp_path / "final", tmp_path / ".tmp-final-2"
    for folder, content in ((winner, "winner"), (loser, "loser")):
        folder.mkdir()
        (folder / "config.json").write_text(content)
        (folder / SOURCE_MARKER).write_text(json.dumps(key))
    assert publish(loser, winner, key) == winner
    assert (winner / "config.json").read_text() == "winner" and not loser.exists()
    incomplete = tmp_path / ".tmp-other"
    incomplete.mkdir()
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "junk").write_text("x")
    with pytest.raises(OSError):  # a non-empty final folder that is not complete is never trusted
        publish(incomplete, tmp_path / "half", key)


def test_failed_conversion_leaves_nothing_behind(tiny_gguf, cache_dir, monkeypatch):
    def broken_convert(gguf_path, out_dir):
        out_dir.mkdir(parents=True)
        (out_dir / "model.safetensors").write_text("partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(registry, "convert_gguf", broken_convert)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model(str(tiny_gguf))
    assert [p for p in cache_dir.iterdir() if p.is_dir()] == []


def test_hf_folder_dummy_preset_and_dummy_folder(tmp_path):
    folder = make_tiny_hf_model(tmp_path)
    assert resolve_model(str(folder)) == registry.ResolvedModel(folder.resolve(), folder.name, "safetensors")
    assert resolve_model(str(folder), "dummy").load_format == "dummy"
    preset = resolve_model("dummy:llama-3-8b")
    assert preset.folder is None and preset.load_format == "dummy"
    assert preset.model_config == ModelConfig.llama_shape("llama-3-8b")


@pytest.mark.parametrize(
    "model, load_format, error, message",
    [
        ("/no/such/model", "auto", FileNotFoundError, "neither a local folder"),
        ("dummy:nope", "auto", ValueError, "unknown model preset"),
        ("dummy:tiny", "safetensors", ValueError, "dummy weights only"),
        (None, "pickle", ValueError, "load_format"),
    ],
)
def test_bad_models_are_reported(model, load_format, error, message):
    with pytest.raises(error, match=message):
        resolve_model(model, load_format)


def test_folder_and_file_mistakes_are_reported(tmp_path, tiny_gguf):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    (tmp_path / "weights.bin").write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ValueError, match="cannot load the GGUF"):
        resolve_model(str(tiny_gguf), "safetensors")
    with pytest.raises(ValueError, match="needs a .gguf"):
        resolve_model(str(make_tiny_hf_model(tmp_path)), "gguf")
