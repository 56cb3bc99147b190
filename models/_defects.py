"""Known upstream defects that model pairs declare, each bounded to one stage, one check and a metric band,
with a minimal reproduction. A pair declares a defect with the band measured on it (`declared(...)`)."""

import dataclasses

from harness.pairs import ExpectedFailure

GELU_TANH_LOWERED_AS_ERF = ExpectedFailure(
    name="GELU_TANH_LOWERED_AS_ERF",
    reason=("litert-torch 0.10.0 lowers the body of the gelu(approximate='tanh') composite as the exact erf GELU "
            "(build_aten_composite_pass._aten_gelu drops approximate=); the TFLite converter builds its GELU from "
            "the composite's attribute, so the flatbuffers are right, and the harness runs StableHLO the same way"),
    stage="stablehlo",
    check="composite_body",
    band={"max_abs_err": (0.0, 0.0)},  # each pair declares its own measured band with declared()
    reproduction=r'''
import torch
from litert_torch import backend
from litert_torch._convert import core

class Gelu(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x, approximate="tanh")

ep = torch.export.export(Gelu(), (torch.zeros(1, 8),))
text = backend.export.exported_program_to_mlir(core._run_convert_passes(ep)).get_text()
assert r'\22approximate\22: \22tanh\22' in text  # the composite's attribute says tanh,
assert text.count("stablehlo.tanh") == 0  # but its body is the erf polynomial: 4.7e-4 off at x=2.7
# Passing approximate= in _aten_gelu (litert_torch/_convert/fx_passes/build_aten_composite_pass.py)
# makes the body agree with the attribute.
''',
)


def declared(defect: ExpectedFailure, **band: tuple[float, float]) -> ExpectedFailure:
    """The defect as one pair declares it: the band its metrics were measured in on that pair."""
    return dataclasses.replace(defect, band=band)
