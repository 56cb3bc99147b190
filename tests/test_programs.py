"""The exported stage's programs through the cache (harness/programs.py): a program read back from its entry is the
program that was exported, down to what the later stages and localisation read from it."""

import json
import re
import zipfile

import pytest
import torch

from harness.cache import cache_key
from harness.checkpoint import build_reauthored, reference_checkpoint
from harness.convert import export_key
from harness.errors import HarnessError
from harness.lowering import converter_signatures, export_programs, lower_programs
from harness.programs import _SchemaDecoders, load_programs, save_programs


def test_a_program_read_back_is_the_exported_one_and_lowers_to_the_same_stablehlo(pairs, cache, tmp_path):
    from torch._export.serde import schema, serialize
    from torch.utils import _pytree as pytree

    pair = pairs["gemma3"]  # composites with attributes (GELU's approximate), QK norms, two attention kinds
    checkpoint = reference_checkpoint(pair, cache)
    model, _ = build_reauthored(pair, checkpoint, pair.export.kv_cache_max)
    signatures = converter_signatures(model, pair.export.prefill_lens, pair.export.kv_cache_max)
    exported = export_programs(signatures)
    modules = {sig.name: sig.module for sig in signatures}
    save_programs(tmp_path, exported, modules)
    for archive in tmp_path.glob("*.pt2"):  # the weights stay out of the entry: their files are empty
        weights = [i for i in zipfile.ZipFile(archive).infolist() if re.search(r"/data/weights/weight_\d+$", i.filename)]
        assert weights and all(i.file_size == 0 for i in weights), archive.name
    real_decoder = serialize._dict_to_dataclass
    loaded = load_programs(tmp_path, modules)
    assert serialize._dict_to_dataclass is real_decoder  # the loader's decoder stood in for torch's during the load only
    for archive in tmp_path.glob("*.pt2"):  # and it decodes each program's JSON into what torch's own does
        program = json.loads(zipfile.ZipFile(archive).read(f"{archive.stem}/models/model.json"))
        assert _SchemaDecoders(serialize)(schema.ExportedProgram, program) == real_decoder(schema.ExportedProgram, program)
    with pytest.raises(HarnessError, match="program prefill_8 reads weight module.final_norm.weight .*delete the entry"):
        load_programs(tmp_path, {name: torch.nn.Module() for name in modules})  # a model without those weights
    assert list(loaded) == list(exported)
    for sig in signatures:
        ours, theirs = loaded[sig.name], exported[sig.name]
        assert ours.graph_module.code == theirs.graph_module.code
        assert [(n.format_node(), n.meta.get("nn_module_stack")) for n in ours.graph.nodes] == [
            (n.format_node(), n.meta.get("nn_module_stack")) for n in theirs.graph.nodes]
        assert str(ours.graph_signature) == str(theirs.graph_signature)
        assert [(e.fqn, e.signature and (e.signature.in_spec, e.signature.out_spec)) for e in ours.module_call_graph] \
            == [(e.fqn, e.signature and (e.signature.in_spec, e.signature.out_spec)) for e in theirs.module_call_graph]
        for key, tensor in ours.state_dict.items():  # the model's own weights, as an export reads them
            assert tensor.data_ptr() == theirs.state_dict[key].data_ptr()
        for key, tensor in ours.constants.items():  # and one copy of each constant for the programs of one export
            assert tensor.data_ptr() == loaded[signatures[0].name].constants[key].data_ptr()
        outputs = [pytree.tree_leaves(p.module()(*(sig.args or ()), **(sig.kwargs or {}))) for p in (ours, theirs)]
        assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))
    # Only a stablehlo cache miss lowers, and it lowers the programs as read back: the same modules to the text,
    # but for the random suffix the lowering gives each private function's name (_aten_embedding_1_43dcf79f).
    probe = signatures[0].name
    ours, theirs = (lower_programs({probe: programs[probe]}, bodies_of=(probe,)) for programs in (loaded, exported))
    assert ours[1] == theirs[1]
    for group in (0, 2):
        assert {n: _unsuffixed(m.get_text()) for n, m in ours[group].items()} == {
            n: _unsuffixed(m.get_text()) for n, m in theirs[group].items()}


def _unsuffixed(mlir: str) -> str:
    return re.sub(r"(@\w+?_\d+)_[0-9a-f]{8}\b", r"\1", mlir)


def test_the_export_key_covers_how_programs_are_saved_and_read(tiny_llama, cache, monkeypatch):
    from harness import programs

    checkpoint = reference_checkpoint(tiny_llama, cache)
    before = cache_key(export_key(tiny_llama, checkpoint, cache.code_digests()))

    def load_programs(entry, modules):  # other code under the same name
        return {}

    monkeypatch.setattr(programs, "load_programs", load_programs)
    assert cache_key(export_key(tiny_llama, checkpoint, cache.code_digests())) != before
