"""The three parts stay apart: the pass imports no toolchain, kit or pipeline; methods share one call."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import qcb_ptq_plugin
from qcb_ptq_plugin import PurifyConfig

from .conftest import prepare_calibrated

PACKAGE = Path(qcb_ptq_plugin.__file__).parent
#: the algorithm files: toolchain-free, importing only torch, numpy, tqdm and each other
CORE = ["units.py", "grid.py", "config.py", "report.py", "_pass.py", "_data.py", "api.py", "audit.py",
        *(f"methods/{p.name}" for p in (PACKAGE / "methods").glob("*.py"))]


def test_import_loads_no_kit_toolchain_or_pipeline():
    code = ("import sys, qcb_ptq_plugin; print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torchao', 'onnx', 'onnxruntime', 'sklearn', 'matplotlib') or m.startswith(('qcb_ptq_plugin.evalkit', "
            "'qcb_ptq_plugin.integrations', 'qcb_ptq_plugin.onnx', 'qcb_ptq_plugin.adapters.ort'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def _imports(nodes) -> list[str]:
    names = [a.name for n in nodes if isinstance(n, ast.Import) for a in n.names]
    return names + [n.module for n in nodes if isinstance(n, ast.ImportFrom) and n.level == 0 and n.module]


@pytest.mark.parametrize("path", CORE)
def test_core_files_import_only_torch_numpy_tqdm(path):
    tree = ast.parse((PACKAGE / path).read_text())
    allowed = {"torch", "numpy", "tqdm", "__future__", *sys.stdlib_module_names}
    outside = [m for m in _imports(tree.body) if m.split(".")[0] not in allowed]
    assert not outside, f"{path} imports {outside} at module level"
    anywhere = _imports(ast.walk(tree))  # optional extras (matplotlib for plots) may load lazily, toolchains never
    assert not [m for m in anywhere if m.startswith(("torch.fx", "torch.ao", "torchao", "onnx", "sklearn"))], path
    assert "torch.fx" not in (PACKAGE / path).read_text(), f"{path} refers to torch.fx"


def test_kit_and_integrations_are_installed_with_the_package():
    from qcb_ptq_plugin import evalkit, integrations

    assert Path(evalkit.__file__).parent.name == "evalkit"
    assert Path(integrations.__file__).parent.name == "integrations"


def test_registry_names_methods_and_refuses_unknown_ones(clean_cnn, digits):
    assert qcb_ptq_plugin.available_methods()[:2] == ["lac_pda", "lac"]
    calib = digits.calibration(32)
    with pytest.raises(ValueError, match=r"method='nope' is unknown; use one of \['lac_pda', 'lac'"):
        qcb_ptq_plugin.purify(prepare_calibrated(clean_cnn, calib), clean_cnn, calib, method="nope")
    with pytest.raises(TypeError, match="takes a PurifyConfig"):
        qcb_ptq_plugin.purify(prepare_calibrated(clean_cnn, calib), clean_cnn, calib,
                              qcb_ptq_plugin.MethodConfig(), method="lac")


def test_lac_is_lac_pda_without_pda(qcb_w4, digits):
    calib = digits.calibration(64)
    lac = qcb_ptq_plugin.purify(prepare_calibrated(qcb_w4, calib, 4), qcb_w4, calib, method="lac", progress=False)
    full = qcb_ptq_plugin.purify(prepare_calibrated(qcb_w4, calib, 4), qcb_w4, calib, progress=False)
    off = qcb_ptq_plugin.purify(prepare_calibrated(qcb_w4, calib, 4), qcb_w4, calib, PurifyConfig(pda="off"),
                                progress=False)
    assert (lac.method, full.method) == ("lac", "lac_pda")
    assert {u.pda for u in lac.units} == {"skipped: pda='off'"}
    assert [u.pda for u in full.units[:3]] == ["applied"] * 3
    assert all(torch.equal(lac.codes[k], off.codes[k]) for k in lac.codes)
    # one meaning of error_*: absolute per unit, relative only under rel_error_*
    u = full.units[0]
    assert u.rel_error_before == pytest.approx(u.error_before / u.target_energy)
    assert full.rel_error_before == pytest.approx(sum(v.rel_error_before for v in full.units) / len(full.units))


def test_steps_have_one_meaning_per_solver():
    cfg = PurifyConfig(solver="adam")
    assert cfg.adam_steps == 10000 and cfg.cd_passes == PurifyConfig().cd_passes  # adam runs its own number of steps
    assert PurifyConfig.paper().adam_steps == 10000
    with pytest.raises(TypeError):
        PurifyConfig(steps=4)
