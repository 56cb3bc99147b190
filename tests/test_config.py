"""RunConfig: built from the command line once, validated once, the same object in every child."""

import pytest

from harness import cli
from harness.config import RunConfig, default_cache_dir
from harness.errors import HarnessError


def from_cli(*argv: str, command: str = "verify") -> RunConfig:
    return RunConfig.from_cli(cli.build_parser().parse_args([command, *argv]), command)


def test_the_configuration_a_child_receives_is_the_parents():
    config = from_cli("--models", "tiny_llama,phi2", "--quant", "all", "--stages", "hf,stablehlo", "--threads", "1",
                      "--no-cache", "--against", "golden", "--in-process")
    again = RunConfig.from_json(config.to_json())
    assert again == config
    assert config.models == ("tiny_llama", "phi2") and config.threads == (1,) and not config.shared_cache
    assert config.quant == ("dynamic_int8", "weight_only_int8", "fp16", "dynamic_int4_block32",
                            "dynamic_int4_block128")
    assert not config.isolate and config.against == "golden"


def test_flags_mean_the_same_in_every_command():
    assert from_cli("--threads", "1,2", command="bench").threads == (1, 2)
    assert from_cli("--threads", "2").threads == (2,)
    with pytest.raises(HarnessError, match="--threads takes one count for verify"):
        from_cli("--threads", "1,2")


@pytest.mark.parametrize("argv, fragment", [
    (["--threads", "0"], "--threads 0: give positive integers"),
    (["--quant", "int3"], "unknown quant recipe(s) int3"),
    (["--stages", "tflite_magic"], "unknown stage(s) tflite_magic"),
    (["--models-dir", "/nonexistent/models"], "models directory /nonexistent/models does not exist"),
])
def test_a_bad_setting_is_one_error_before_any_work(argv, fragment):
    with pytest.raises(HarnessError) as error:
        from_cli(*argv)
    assert fragment in str(error.value)


def test_an_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(HarnessError, match="is a file; pass a directory"):
        from_cli("--out", str(tmp_path / "taken"))
    assert from_cli("--out", str(tmp_path / "new" / "dir")).out.endswith("dir")


def test_the_cache_directory_is_read_when_a_configuration_is_made(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGE_PARITY_CACHE", str(tmp_path))
    assert default_cache_dir() == str(tmp_path) == RunConfig().cache_dir
    monkeypatch.delenv("EDGE_PARITY_CACHE")
    assert RunConfig().cache_dir.endswith(".cache/edge-parity")
