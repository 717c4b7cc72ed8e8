"""The CLI and the example scripts, run as users run them."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from qcb_ptq_plugin import cli
from qcb_ptq_plugin.evalkit import metrics
from qcb_ptq_plugin import onnx as qonnx

from .conftest import TARGET, TRIGGER

ROOT = Path(__file__).resolve().parents[1]


def test_demo_json_rows(tmp_path):
    """`qcb-ptq demo` on the bundled digits (its default dataset), W4A8 only (the default adds W8A8)."""
    out = tmp_path / "demo.json"
    assert cli.main(["demo", "--dataset", "digits", "--settings", "W4A8", "--json", str(out), "--no-progress"]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["setting"] for r in rows] == ["W4A8"]
    keys = {"setting", "fp32_ba", "fp32_asr", "no_defense_ba", "no_defense_asr", "purified_ba", "purified_asr",
            "der", "seconds"}
    r = rows[0]
    assert set(r) == keys
    assert r["fp32_asr"] <= 5 and r["no_defense_asr"] >= 90 and r["purified_asr"] <= 2
    assert r["purified_ba"] >= r["fp32_ba"] - 1 and r["der"] > 90


def test_onnx_subcommand_with_npz_and_npy_folder(qcb_w4, digits, tmp_path):
    fp32 = tmp_path / "fp32.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(qcb_w4, (digits.x_test[:1],), str(fp32), dynamo=False, opset_version=21,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "b"}})
    calib = digits.calibration(256, seed=1).numpy()
    np.savez(tmp_path / "calib.npz", input=calib)
    folder = tmp_path / "npy"
    folder.mkdir()
    for i, x in enumerate(calib[:64]):
        np.save(folder / f"{i:03d}.npy", x)
    common = ["--weight-type", "int4", "--no-progress"]
    assert cli.main(["onnx", str(fp32), "--calib", str(tmp_path / "calib.npz"), "-o", str(tmp_path / "a.onnx"),
                     *common]) == 0
    report = json.loads((tmp_path / "a.report.json").read_text())
    assert report["mode"] == "onnxruntime" and len(report["units"]) == 4
    asr = metrics.attack_success_rate(qonnx.OrtModel(tmp_path / "a.onnx"), digits.x_test, digits.y_test,
                                      TRIGGER, TARGET)
    assert asr <= 0.02
    assert cli.main(["onnx", str(fp32), "--calib", str(folder), "-o", str(tmp_path / "b.onnx"), *common]) == 0
    assert (tmp_path / "b.onnx").exists()


def test_cli_errors_exit_non_zero(tmp_path, capsys):
    assert cli.main(["onnx", str(tmp_path / "nope.onnx"), "--calib", str(tmp_path), "-o", "x.onnx"]) == 2
    assert "no such ONNX file" in capsys.readouterr().err


@pytest.mark.parametrize("sub", ["demo", "onnx", "purify"])
def test_help_documents_every_option(sub, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([sub, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    parser = cli.build_parser()
    action = next(a for a in parser._subparsers._group_actions[0].choices[sub]._actions if a.dest == "help")
    sub_parser = parser._subparsers._group_actions[0].choices[sub]
    for a in sub_parser._actions:
        if a is not action:
            assert a.help, f"{sub} option {a.option_strings or a.dest} has no help"
            for flag in a.option_strings:
                assert flag in text


def test_example_script_runs():
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "fx_one_line.py")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    lines = {line.split(":")[0].strip(): line for line in res.stdout.splitlines() if "ASR" in line}
    asr = {k: float(v.split("ASR")[1].strip(" %")) for k, v in lines.items()}
    assert asr["plain W4A8"] >= 90 and asr["purified W4A8"] <= 2


def test_purify_subcommand_pickled_module_and_exported_program(qcb_w4, digits, tmp_path):
    calib = tmp_path / "calib.npy"
    np.save(calib, digits.calibration(256, seed=1).numpy())
    x, y = digits.x_test, digits.y_test

    torch.save(qcb_w4, tmp_path / "model.pt")
    out = tmp_path / "int8_fx.pt"
    assert cli.main(["purify", str(tmp_path / "model.pt"), "--trust-model-code", "--calib", str(calib), "-o", str(out), "--bits", "4",
                     "--onnx", str(tmp_path / "int8.onnx"), "--no-progress"]) == 0
    int8 = torch.jit.load(str(out))
    assert metrics.attack_success_rate(int8, x, y, TRIGGER, TARGET) <= 0.02
    assert metrics.attack_success_rate(qonnx.OrtModel(tmp_path / "int8.onnx"), x, y, TRIGGER, TARGET) <= 0.02
    assert json.loads((tmp_path / "int8_fx.report.json").read_text())["mode"] == "fx"

    ep = torch.export.export(qcb_w4, (x[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(ep, tmp_path / "model.pt2")
    out2 = tmp_path / "int8.pt2"
    assert cli.main(["purify", str(tmp_path / "model.pt2"), "--calib", str(calib), "-o", str(out2), "--bits", "4",
                     "--no-progress"]) == 0
    loaded = torch.export.load(str(out2)).module()
    assert metrics.attack_success_rate(loaded, x, y, TRIGGER, TARGET) <= 0.02
    report = json.loads((tmp_path / "int8.report.json").read_text())
    assert report["mode"] == "pt2e" and [u["pda"] for u in report["units"][:3]] == ["applied"] * 3


def test_purify_subcommand_refuses_torchscript(qcb_w4, digits, tmp_path, capsys):
    torch.jit.save(torch.jit.trace(qcb_w4, digits.x_test[:2]), str(tmp_path / "ts.pt"))
    np.save(tmp_path / "c.npy", digits.calibration(8).numpy())
    assert cli.main(["purify", str(tmp_path / "ts.pt"), "--calib", str(tmp_path / "c.npy"), "-o",
                     str(tmp_path / "o.pt")]) == 2
    assert "TorchScript" in capsys.readouterr().err


def test_report_plot(qcb_w4, digits, tmp_path):
    pytest.importorskip("matplotlib")
    from qcb_ptq_plugin.ptq import quantize_fx
    import qcb_ptq_plugin

    import matplotlib

    backend = matplotlib.get_backend()
    _, report = quantize_fx(qcb_w4, digits.calibration(64), 4, qcb_ptq_plugin.PurifyConfig(progress=False))
    path = report.plot(tmp_path / "drift.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert matplotlib.get_backend() == backend  # the caller's backend is left alone
