"""Pairs as data: the registry that finds them, the names a pair file uses for litert-torch's code, and the
description that keys their artifacts."""

from pathlib import Path

import pytest

from harness.errors import HarnessError
from harness.pairs import ModelPair, describe, discover, fingerprint, resolve, scan, select

TINY = Path(__file__).resolve().parents[1] / "models" / "tiny_llama.py"


def test_every_pair_file_declares_one_pair_under_its_own_name():
    pairs = discover()
    assert {"tiny_llama", "gemma2", "phi2", "gemma3_270m_real"} <= set(pairs)
    assert all(isinstance(p, ModelPair) and name == p.name for name, p in pairs.items())


def test_a_folder_of_pair_files_is_checked(tmp_path):
    (tmp_path / "extra.py").write_text(TINY.read_text())
    with pytest.raises(HarnessError, match="two model files declare the pair name 'tiny_llama'"):
        discover((tmp_path,))


@pytest.mark.parametrize("text, fragment", [
    ("X = 1\n", "defines no PAIR = ModelPair(...)"),
    ("def broken(:\n", "SyntaxError"),
    ("import no_such_module_here\n", "ModuleNotFoundError"),
])
def test_a_broken_pair_file_is_reported_and_hides_no_other(tmp_path, text, fragment):
    (tmp_path / "extra.py").write_text(text)
    pairs, broken = scan((tmp_path,))
    assert "tiny_llama" in pairs and set(broken) == {"extra"}
    assert fragment in broken["extra"].message() and str(tmp_path / "extra.py") in broken["extra"].message()
    assert select(pairs, ["extra", "tiny_llama"], broken=broken) == ([pairs["tiny_llama"]], ["extra"])
    assert "extra" in select(pairs, None, broken=broken)[1]  # a suite run cannot tell it was not meant to be in it


def test_litert_torch_is_named_in_pair_files_and_imported_when_needed():
    import json

    assert resolve(json) is json  # an object is itself
    assert resolve("json:dumps") is json.dumps and resolve("json") is json
    config_fn, tensor_names, model_class = discover()["tiny_llama"].reauthored.args
    assert tensor_names.endswith(":TENSOR_NAMES") and model_class.endswith(":TinyLlama")
    assert resolve(model_class).__name__ == "TinyLlama"


def test_a_pair_is_described_by_what_its_builders_read(pairs):
    pair = pairs["tiny_llama"]
    assert fingerprint(pair) == fingerprint(pair)
    text = str(describe(pair.reauthored))
    assert "shrink_config" in text and "rope_theta" in text  # project code by its source, values it reads


def test_conversion_key_follows_what_the_builder_reads(tmp_path):
    """Prose and unrelated code leave a cached flatbuffer valid; a config value the builder reads does not."""
    from harness.convert import artifact_key
    from models import tiny_llama

    source = Path(tiny_llama.__file__).read_text().replace('name="tiny_llama"', 'name="copy"')
    edits = {
        "same": source,
        "prose": source.replace('"""TinyLlama architecture', '"""Reworded. TinyLlama architecture')
                       .replace("features=(", 'features=("extra",') + "\n\ndef unrelated():\n    return 1\n",
        "rope": source.replace("rope_theta=10000.0", "rope_theta=20000.0"),
    }
    keys = {}
    for edit, text in edits.items():
        (tmp_path / edit).mkdir()
        (tmp_path / edit / "copy.py").write_text(text)
        pair = discover((tmp_path / edit,))["copy"]
        keys[edit] = artifact_key(pair, tmp_path, "none", libraries={})
    assert edits["rope"] != source and edits["prose"] != source
    assert keys["prose"] == keys["same"]
    assert keys["rope"] != keys["same"]
