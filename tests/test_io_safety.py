"""Hostile model files, broken paths and interrupted writes (qcb_ptq_plugin._io and the CLI).

Each malicious file's payload creates a marker directory when unpickled / evaluated. Every
case first shows the payload is live (the unguarded torch/numpy loader creates the marker),
then that the CLI refuses the file with exit code 2 and one line, and the marker stays absent.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from qcb_ptq_plugin import _io, cli
from qcb_ptq_plugin import onnx as qonnx


class _Mkdir:
    """Unpickling this creates ``path`` (a directory): the side effect the tests look for."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


class BiasCNN(nn.Module):
    """conv(1->8, bias) - relu - conv(8->8, bias) - relu - mean - linear(8->10): two weights with the
    same channel count (their per-channel zero points are equal) and conv biases."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).mean((2, 3)))


class FixedView(nn.Module):
    """A graph that itself fixes the batch size (x.view(2, -1))."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)

    def forward(self, x):
        return self.fc(x.view(2, -1))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small float CNN with conv bias as a dynamic-batch .pt2, a fixed-batch .pt2, calibration."""
    d = tmp_path_factory.mktemp("io")
    torch.manual_seed(0)
    model = BiasCNN().eval()
    calib = torch.randn(48, 1, 8, 8)
    np.save(d / "calib.npy", calib.numpy())
    torch.export.save(torch.export.export(model, (calib[:2],), dynamic_shapes=({0: torch.export.Dim("batch")},)),
                      d / "model.pt2")
    torch.export.save(torch.export.export(model, (calib[:4],)), d / "fixed.pt2")
    return {"dir": d, "model": model, "calib": calib, "pt2": d / "model.pt2", "fixed": d / "fixed.pt2",
            "npy": d / "calib.npy"}


def _rewrite_pt2(src: Path, dst: Path, edit) -> None:
    """Copy a .pt2 archive, passing {relative name: bytes} through ``edit``."""
    with zipfile.ZipFile(src) as z:
        root = z.namelist()[0].split("/")[0] + "/"
        members = {n[len(root):]: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in members.items():
            z.writestr(root + name, data)


def _edit_json(members, name, fn):
    members[name] = json.dumps(fn(json.loads(members[name]))).encode()


def _craft_pickled_weight(src, dst, marker):
    def edit(m):
        def cfg(c):
            first = next(iter(c["config"].values()))
            first["use_pickle"] = True
            m["data/weights/" + first["path_name"]] = pickle.dumps(_Mkdir(marker))
            return c
        _edit_json(m, "data/weights/model_weights_config.json", cfg)
    _rewrite_pt2(src, dst, edit)
    return lambda: torch.export.load(str(dst))


def _craft_sample_inputs(src, dst, marker):
    def edit(m):
        buf = io.BytesIO()
        torch.save(((_Mkdir(marker),), {}), buf)  # weights_only=True fails, torch falls back to a full unpickle
        m["data/sample_inputs/model.pt"] = buf.getvalue()
    _rewrite_pt2(src, dst, edit)
    return lambda: torch.export.load(str(dst))


def _craft_shape_expression(src, dst, marker):
    payload = f"sympify.__globals__['__builtins__']['__import__']('os').mkdir('{marker}')"

    def edit(m):
        text = m["models/model.json"].decode()
        m["models/model.json"] = re.sub(r'"expr_str": "[^"]*"', lambda _: json.dumps({"expr_str": payload})[1:-1],
                                        text, count=1).encode()
    _rewrite_pt2(src, dst, edit)
    return lambda: torch.export.load(str(dst))


def _craft_guard(src, dst, marker):
    def edit(m):
        _edit_json(m, "models/model.json",
                   lambda p: {**p, "guards_code": [f"__import__('os').mkdir('{marker}') is None"]})
    _rewrite_pt2(src, dst, edit)
    return lambda: torch.export.load(str(dst)).module()(torch.randn(2, 1, 8, 8))


def _craft_target(src, dst, marker):
    def edit(m):
        m["models/model.json"] = m["models/model.json"].replace(b'"torch.ops.aten.relu.default"', b'"torch.os.mkdir"', 1)
    _rewrite_pt2(src, dst, edit)
    return None  # called with a tensor it fails before doing anything; the refusal is what we test


@pytest.mark.parametrize("craft", [_craft_pickled_weight, _craft_sample_inputs, _craft_shape_expression, _craft_guard,
                                   _craft_target])
def test_malicious_pt2_is_refused_without_side_effect(craft, files, tmp_path, capsys):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.pt2"
    control = craft(files["pt2"], bad, marker)
    if control is not None:  # the payload is live: torch's own loader runs it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                control()
            except Exception:  # noqa: BLE001 - the payload ran before torch noticed anything
                pass
        assert marker.exists()
        marker.rmdir()
    capsys.readouterr()
    for sub in (["purify", str(bad), "-o", str(tmp_path / "o.pt2")], ["audit", str(bad)]):
        assert cli.main([*sub, "--calib", str(files["npy"])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "torch.export.save" in err[0], err
        assert not marker.exists()
    assert not (tmp_path / "o.pt2").exists()


def test_pickled_module_needs_trust_and_runs_nothing_without_it(files, tmp_path):
    """`.pt` pickles: refused by the real command (subprocess), the risk named in --help."""
    marker = tmp_path / "pwned"
    torch.save(_Mkdir(marker), tmp_path / "model.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.load(tmp_path / "model.pt", weights_only=False)  # control: the payload is live
    assert marker.exists()
    marker.rmdir()
    res = subprocess.run([sys.executable, "-m", "qcb_ptq_plugin.cli", "purify", str(tmp_path / "model.pt"), "--calib",
                          str(files["npy"]), "-o", str(tmp_path / "o.pt")], capture_output=True, text=True, timeout=300)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(err) == 1, res.stderr
    assert "--trust-model-code" in err[0] and "torch.export.save" in err[0]
    assert not marker.exists() and not (tmp_path / "o.pt").exists()
    # a state_dict is read safely and refused with the same advice
    torch.save(files["model"].state_dict(), tmp_path / "sd.pt")
    with pytest.raises(_io.FileError, match=r"holds a OrderedDict, not a model \(a state_dict\?\)"):
        _io.load_module_file(tmp_path / "sd.pt")
    helptext = cli.build_parser()._subparsers._group_actions[0].choices["purify"].format_help()
    assert "RISK: unpickling runs any code" in " ".join(helptext.split())


def test_pickled_npy_calibration_is_refused(files, tmp_path, capsys):
    marker = tmp_path / "pwned"
    np.save(tmp_path / "calib.npy", np.array([_Mkdir(marker)], dtype=object), allow_pickle=True)
    np.load(tmp_path / "calib.npy", allow_pickle=True)  # control
    assert marker.exists()
    marker.rmdir()
    assert cli.main(["purify", str(files["pt2"]), "--calib", str(tmp_path / "calib.npy"), "-o",
                     str(tmp_path / "o.pt2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "np.save" in err[0] and not marker.exists()


def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    return dst


def test_bad_files_and_paths_are_one_line_errors(files, tmp_path, capsys):
    """Corrupt/truncated inputs, missing files, outputs that are directories or not writable: exit 2,
    one line naming the problem and the fix, nothing written."""
    npy, pt2 = str(files["npy"]), str(files["pt2"])
    torch.save(files["model"], tmp_path / "full.pt")
    np.savez(tmp_path / "c.npz", input=files["calib"].numpy())
    (tmp_path / "file").write_text("x")
    out = str(tmp_path / "o.pt2")
    cases = {
        "truncated .pt2": (["purify", str(_truncated(files["pt2"], tmp_path / "t.pt2")), "--calib", npy, "-o", out],
                           "corrupt or truncated"),
        "truncated .pt": (["purify", str(_truncated(tmp_path / "full.pt", tmp_path / "t.pt")), "--trust-model-code",
                           "--calib", npy, "-o", out], "corrupt or truncated"),
        "truncated .npz": (["purify", pt2, "--calib", str(_truncated(tmp_path / "c.npz", tmp_path / "t.npz")), "-o",
                            out], "corrupt or truncated"),
        "missing model": (["purify", str(tmp_path / "nope.pt2"), "--calib", npy, "-o", out], "does not exist"),
        "missing calib": (["audit", pt2, "--calib", str(tmp_path / "nope.npy")], "does not exist"),
        # outputs are checked first: the (missing) model is never reached
        "output is a directory": (["purify", str(tmp_path / "nope.pt2"), "--calib", npy, "-o", str(tmp_path)],
                                  "is a directory"),
        "output folder is a file": (["purify", pt2, "--calib", npy, "-o", str(tmp_path / "file" / "o.pt2")],
                                    "cannot create the folder"),
        "onnx output is a directory": (["purify", str(tmp_path / "nope.pt2"), "--calib", npy, "-o", out, "--onnx",
                                        str(tmp_path)], "ONNX output"),
        "audit json folder is a file": (["audit", str(tmp_path / "nope.pt2"), "--calib", npy, "--json",
                                         str(tmp_path / "file" / "a.json")], "cannot create the folder"),
    }
    (tmp_path / "garbage.pt2").write_bytes(b"not a zip archive at all")
    cases["garbage .pt2"] = (["audit", str(tmp_path / "garbage.pt2"), "--calib", npy], "not a torch.export archive")
    capsys.readouterr()
    for name, (argv, expected) in cases.items():
        assert cli.main(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (name, err)
    assert not Path(out).exists()


def test_atomic_output_keeps_the_old_file_on_any_failure(tmp_path):
    target = tmp_path / "model.onnx"
    target.write_bytes(b"old and valid")
    for exc in (RuntimeError("serializer failed"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with _io.atomic_output(target) as tmp:
                tmp.write_bytes(b"half a fi")
                raise exc
        assert target.read_bytes() == b"old and valid"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temp file left
    _io.write_text(target, "new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_purify_killed_at_the_first_write_leaves_the_previous_output(files, tmp_path):
    """SIGKILL (no cleanup possible) right after the serializer's first write of the output."""
    out = tmp_path / "int8.pt2"
    out.write_bytes(b"previous good file")
    script = f"""
import os, signal, torch
from qcb_ptq_plugin import cli
real = torch.export.save
def save(ep, f, **kw):
    with open(f, "wb") as fh:
        fh.write(b"PK partial")
        fh.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.export.save = save
cli.main(["purify", {str(files['pt2'])!r}, "--calib", {str(files['npy'])!r}, "-o", {str(out)!r}, "--no-progress"])
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == -9, res.stderr[-2000:]
    assert out.read_bytes() == b"previous good file"
    assert not (tmp_path / "int8.report.json").exists()  # outputs of one run land together or not at all


def test_failed_onnx_validation_keeps_the_previous_file(files, tmp_path, monkeypatch):
    from qcb_ptq_plugin.onnx import _export
    from qcb_ptq_plugin.ptq import quantize_fx

    int8, _ = quantize_fx(files["model"], files["calib"], 8)
    out = tmp_path / "int8.onnx"
    out.write_bytes(b"previous good file")

    def fail(*a, **k):
        raise qonnx.ExportMismatchError("disagrees")

    monkeypatch.setattr(_export, "_validate", fail)
    with pytest.raises(qonnx.ExportMismatchError):
        qonnx.export(int8, files["calib"][:8], out)
    assert out.read_bytes() == b"previous good file" and sorted(p.name for p in tmp_path.iterdir()) == ["int8.onnx"]


def test_pt2_with_conv_bias_to_onnx_and_fresh_process_load(files, tmp_path):
    """Item 5: a conv-bias CNN through `purify x.pt2 --onnx`; the purified .pt2 and a pinned
    observer load in a fresh process with the README's steps."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    import qcb_ptq_plugin
    from qcb_ptq_plugin.ptq import prepare_pt2e_calibrated

    out, onnx_out = tmp_path / "int8.pt2", tmp_path / "int8.onnx"
    assert cli.main(["purify", str(files["pt2"]), "--calib", str(files["npy"]), "-o", str(out), "--onnx",
                     str(onnx_out), "--no-progress"]) == 0
    x = files["calib"][:5]
    onnx_logits = qonnx.OrtModel(onnx_out)(x)
    # a pinned observer of the same flow, pickled
    prepared = prepare_pt2e_calibrated(files["model"], files["calib"])
    qcb_ptq_plugin.purify(prepared, files["model"], files["calib"], progress=False)
    pinned = [m for m in prepared.modules() if type(m).__name__.startswith("Pinned")]
    assert len(pinned) == 3
    (tmp_path / "observer.pkl").write_bytes(pickle.dumps(pinned[0]))
    expected = convert_pt2e(prepared)(x)
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import pickle, torch
import torchao  # README: registers the quantized_decomposed ops the INT8 program calls
prog = torch.export.load({str(out)!r})
x = torch.load({str(tmp_path / 'x.pt')!r})
torch.save(prog.module()(x), {str(tmp_path / 'y.pt')!r})
obs = pickle.loads(open({str(tmp_path / 'observer.pkl')!r}, "rb").read())
print(type(obs).__module__, type(obs).__name__, float(obs.min_val.min()))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    module, name, min_val = res.stdout.split()[-3:]
    assert (module, name) == ("qcb_ptq_plugin.adapters._pt2e_pinned", "PinnedPerChannelMinMaxObserver")
    assert float(min_val) == pytest.approx(float(pinned[0].min_val.min()))
    y = torch.load(tmp_path / "y.pt")
    assert y.shape == (5, 10)
    assert torch.allclose(y, expected, atol=1e-5)  # the file holds the purified integers
    assert (y.argmax(1) == onnx_logits.argmax(1)).float().mean() >= 0.8


def test_fixed_batch_pt2_is_re_exported_or_refused(files, tmp_path, capsys):
    out = tmp_path / "int8.pt2"
    assert cli.main(["purify", str(files["fixed"]), "--calib", str(files["npy"]), "-o", str(out),
                     "--no-progress"]) == 0
    assert _io.load_exported_program(out).module()(files["calib"][:7]).shape == (7, 10)  # dynamic batch now
    torch.export.save(torch.export.export(FixedView().eval(), (torch.randn(2, 1, 8, 8),)), tmp_path / "view.pt2")
    capsys.readouterr()
    assert cli.main(["purify", str(tmp_path / "view.pt2"), "--calib", str(files["npy"]), "-o",
                     str(tmp_path / "v.pt2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exported for batch size 2 only" in err[0] and "Dim('batch')" in err[0]
    assert not (tmp_path / "v.pt2").exists()


@pytest.mark.parametrize("target,ok", [
    ("torch.ops.aten.conv2d.default", True), ("torch.ops.quantized_decomposed.dequantize_per_channel.default", True),
    ("_operator.getitem", True), ("torch.sym_max", True),
    ("torch.os.system", False), ("_operator.methodcaller", False), ("_operator.call", False),
    ("torch.ops.aten.save.default", False), ("torch.ops.aten.from_file.default", False),
    ("torch.ops.debugprims.load_tensor.default", False), ("torch.ops.import_module.a.b", False),
    ("torch.hub.load", False)])
def test_graph_targets_are_operators_only(target, ok):
    """torch resolves a node's target by getattr from `torch`: only operators may pass."""
    if ok:
        _io._check_target(target, Path("m.pt2"))
    else:
        with pytest.raises(_io.UnsafeFileError, match="not an allowed torch operator"):
            _io._check_target(target, Path("m.pt2"))
