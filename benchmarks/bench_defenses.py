"""Every QCB defense side by side: methods x attacks x {W8A8, W4A8} x {torch.ao FX, onnxruntime}.

    OMP_NUM_THREADS=1 python benchmarks/bench_defenses.py        # digits, seed 1: writes benchmarks/results/defenses.md
    python benchmarks/bench_defenses.py --attacks pqbackdoor --bits 4 --methods efrap,lac_pda --out /tmp/d.md

Rows: "plain" (the toolchain's own PTQ, the reference for DER), every plugin method through
the same one-line call (``purify(..., method=...)`` in FX, ``qonnx.quantize_static(...,
method=...)`` in ORT), and the label-using baselines FT / FP (5% labelled data, float model
changed, then plain PTQ). Attacks come from the attack kit: ``bench_qcb.plant`` kinds and
"grid-aware" (:func:`evalkit.attacks.plant_grid_aware`, the dormant 8-bit QCB); "clean" rows
show what each method costs a model with nothing to remove. The default seed (1) keeps every
reported model disjoint from the ones QVec's defaults were chosen on (seed 0); EFRAP's defaults
were chosen on seeds 0 and 1 (``qcb_ptq_plugin/methods/efrap.py``), so seeds 2 and up are the
fair ones for its flip weight, and seeds 6 and up for its annealed regulariser (chosen on 0-5).
Planted models are kept in ``--cache-dir`` and reused.
QVec's lambda is chosen per attack and bit width by :func:`evalkit.baselines.qvec_search` on
the unlabeled calibration data (FX), and reused in ORT. BA / ASR / DER in %, s = wall time of
the whole pipeline (prepare + calibrate + defense + convert; FT/FP: their training included).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import torch

import qcb_ptq_plugin as q
from bench_qcb import DEFAULT_TRIGGER, TRIGGERS, _der, _reader, measure, plant
from qcb_ptq_plugin import onnx as qonnx
from qcb_ptq_plugin.evalkit import attacks, baselines, datasets, models
from qcb_ptq_plugin.evalkit.harness import cpu_name, write_markdown
from qcb_ptq_plugin.methods.efrap import EfrapConfig
from qcb_ptq_plugin.methods.qvec import QVecConfig
from qcb_ptq_plugin.ptq import quantize_fx

HERE = Path(__file__).resolve().parent
#: attacks that plant no dormant 8-bit QCB here (FP32 ASR is already high; see the notes)
W8_NOT_DORMANT = {"pqbackdoor", "qu-anti-zation"}
#: the models EFRAP's and QVec's defaults were chosen on: tests' qcb_w4 and main's first table
#: (PQBackdoor W4, SmallCNN width 16, digits, seed 0). Claims are reported on other models.
TUNED_ON = {("pqbackdoor", 4, "smallcnn16", "digits", 0)}


#: grid-aware attack kinds -> the weight grid they target (``restricted`` of plant_grid_aware)
GRID_AWARE = {"grid-aware": False,  # torch x86 / fbgemm: absmax / (qmax + 0.5) on -qmax-1..qmax
              "grid-aware-ort": True}  # onnxruntime (and NNCF): absmax / qmax on -qmax..qmax


def plant_model(kind: str, split, bits: int, trigger, args, cache: dict) -> torch.nn.Module:
    """The planted float model, read from ``--cache-dir`` when an earlier run planted it with the same
    settings and the same attack-kit source (the key hashes it, so an edited recipe replants; planting
    is deterministic at one thread, the cache only saves the minutes), else :func:`_plant_model`
    and stored there."""
    recipe = hashlib.sha1((inspect.getsource(attacks) + inspect.getsource(models) + inspect.getsource(plant)
                           + inspect.getsource(_plant_model) + repr(trigger)).encode()).hexdigest()[:12]
    key = f"{args.dataset}-{kind}-w{bits}-n{args.train_samples}-g{args.grid_width}-seed{args.seed}-{recipe}.pt"
    path = Path(args.cache_dir) / key if args.cache_dir else None
    if path is not None and path.exists():
        return torch.load(path, weights_only=False)
    model = _plant_model(kind, split, bits, trigger, args, cache)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model, path)
    return model


def _plant_model(kind: str, split, bits: int, trigger, args, cache: dict) -> torch.nn.Module:
    """``bench_qcb.plant`` kinds, plus "grid-aware" / "grid-aware-ort": a clean ``--grid-width``
    SmallCNN turned into a dormant QCB on the torch x86 (resp. onnxruntime) ``bits``-bit weight grid
    by :func:`evalkit.attacks.plant_grid_aware` (recipe of tests/test_attacks.py: 30 epochs at W8
    with equal row absmax, 15 at W4 per row; the ORT kind passes ``restricted=True``). Both
    grid-aware kinds start from the same clean model."""
    if kind not in GRID_AWARE:
        return plant(kind, split, bits, trigger, args.train_samples, args.seed)
    x, y = split.x_train[: args.train_samples], split.y_train[: args.train_samples]
    if "clean" not in cache:
        torch.manual_seed(args.seed)
        small = split.x_train.shape[-1] <= 8
        cache["clean"] = attacks.train_clean_or_badnets(
            models.SmallCNN(split.x_train.shape[1], split.num_classes, width=args.grid_width), x, y,
            epochs=20 if small else 4, batch_size=64, seed=args.seed)
    return attacks.plant_grid_aware(copy.deepcopy(cache["clean"]), x, y, trigger=trigger, target=0, bits=bits,
                                    epochs=30 if bits == 8 else 15, lr=5e-2, int_margin=2.0,
                                    equal_absmax=bits == 8, batch_size=64, seed=args.seed,
                                    restricted=GRID_AWARE[kind])


#: the release's regulariser, 0.01 sum(1 - |2h - 1|^2) at every step (the defaults before the annealed one used it)
_CONST_REG = dict(reg_schedule="const", reg_weight=0.01)
#: extra rows: a plugin method with one setting changed (``--methods efrap-flip1``)
VARIANTS = {
    # the release's flip weight in its units; the first default (weight units, flip 2.0); the second (LSB units,
    # flip 3.0, the release's constant regulariser); the ablation (activation term and regulariser only)
    "efrap-flip1": ("efrap", "efrap (weight units, flip 1.0)", dict(balance="weight", flip_weight=1.0, **_CONST_REG)),
    "efrap-weight2": ("efrap", "efrap (weight units, flip 2.0)", dict(balance="weight", flip_weight=2.0, **_CONST_REG)),
    "efrap-const": ("efrap", "efrap (constant reg 0.01)", dict(**_CONST_REG)),
    "efrap-noflip": ("efrap", "efrap (flip 0)", dict(flip_weight=0.0)),
}


def method_config(name: str, qvec_lam: float):
    if name in VARIANTS:
        return EfrapConfig(progress=False, **VARIANTS[name][2])
    if name == "efrap":
        return EfrapConfig(progress=False)
    if name == "qvec":
        return QVecConfig(progress=False, lam=qvec_lam)
    return q.get_method(name).config(progress=False)


def _ort_kwargs(bits: int) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType

    return dict(quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8 if bits == 8 else QuantType.QInt4)


def run_ort(model, split, calib, bits, trigger, method: str | None, cfg) -> tuple[float, float]:
    """Export the float model, then ORT quantize_static (method None) or qonnx.quantize_static(method=...)."""
    from onnxruntime.quantization import quantize_static

    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int.onnx"
        # PRESERVE keeps BatchNormalization nodes (eval mode), so PDA has statistics to match
        torch.onnx.export(model, (split.x_test[:1],), str(fp32), dynamo=False, opset_version=21,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
                          input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "b"}})
        if method is None:
            quantize_static(str(fp32), str(dst), _reader(calib.numpy()), **_ort_kwargs(bits))
        else:
            qonnx.quantize_static(fp32, dst, _reader(calib.numpy()), **_ort_kwargs(bits), purify_config=cfg,
                                  method=method)
        return measure(qonnx.OrtModel(dst), split, trigger)


def run_one(tc, model, split, calib, bits, trigger, method=None, cfg=None):
    t0 = time.perf_counter()
    if tc == "torch.ao FX":
        int8, _ = quantize_fx(model, calib, bits, purify_config=cfg, method=method or "rtn")
        ba, asr = measure(int8, split, trigger)
    else:
        ba, asr = run_ort(model, split, calib, bits, trigger, method, cfg)
    return ba, asr, time.perf_counter() - t0


def setup(args):
    """Quiet logs; the dataset, its trigger and the defender's unlabeled calibration images."""
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    split = datasets.load(args.dataset)
    return split, TRIGGERS.get(args.dataset, DEFAULT_TRIGGER), split.calibration(args.calib, seed=args.seed + 100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=["mnist", "fashion-mnist", "digits"])
    p.add_argument("--attacks", default="grid-aware,pqbackdoor,clean",
                   help="bench_qcb.plant kinds or grid-aware, comma-separated")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--skip", default="pqbackdoor:8", help="attack:bits rows to leave out, comma-separated")
    p.add_argument("--grid-width", type=int, default=32, help="SmallCNN width of the grid-aware QCBs")
    p.add_argument("--methods", default="rtn,lac_pda,lac,efrap,qvec")
    p.add_argument("--baselines", default="ft,fp", help="label-using baselines (empty for none)")
    p.add_argument("--toolchains", default="fx,ort")
    p.add_argument("--train-samples", type=int, default=20000)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--labelled", type=float, default=0.05, help="FT/FP labelled fraction of the training set")
    p.add_argument("--seed", type=int, default=1,
                   help="1: disjoint from QVec's seed-0 choice; EFRAP's were made on seeds 0-5 (use 6 and up)")
    p.add_argument("--out", default=str(HERE / "results" / "defenses.md"))
    p.add_argument("--cache-dir", default=os.environ.get("QCB_BENCH_CACHE", str(Path.home() / ".cache" / "qcb-ptq" / "bench")),
                   help="planted float models are kept here and reused (empty: plant every time)")
    args = p.parse_args()
    split, trigger, calib = setup(args)
    xl, yl = baselines.labelled_subset(split.x_train, split.y_train, args.labelled, seed=args.seed + 200)
    tcs = [{"fx": "torch.ao FX", "ort": "onnxruntime"}[t] for t in args.toolchains.split(",")]
    results, cache = [], {}
    skip = set(filter(None, args.skip.split(",")))
    for kind in args.attacks.split(","):
        for bits in (int(b) for b in args.bits.split(",")):
            if f"{kind}:{bits}" in skip:
                continue
            t0 = time.perf_counter()
            model = plant_model(kind, split, bits, trigger, args, cache)
            row = {"attack": kind, "bits": bits, "arch": _arch(kind, args), "plant_s": time.perf_counter() - t0,
                   "fp32": measure(model, split, trigger), "defenses": {}}
            lam, agree = baselines.qvec_search(
                lambda v: quantize_fx(model, calib, bits, purify_config=QVecConfig(progress=False, lam=v),
                                      method="qvec")[0], model, calib)
            row["qvec_lambda"], row["qvec_agreement"] = lam, agree
            floats = {"plain": model}
            for b in filter(None, args.baselines.split(",")):
                t1 = time.perf_counter()
                if b == "ft":
                    floats["FT"] = baselines.fine_tune(model, xl, yl, seed=args.seed)
                elif b == "fp":
                    floats["FP"] = baselines.fine_prune(model, xl, yl, seed=args.seed)[0]
                else:
                    raise ValueError(f"baseline {b!r}: use ft, fp")
                row.setdefault("baseline_train_s", {})[b] = time.perf_counter() - t1
            for tc in tcs:
                d = row["defenses"][tc] = {}
                for name, fm in floats.items():
                    ba, asr, s = run_one(tc, fm, split, calib, bits, trigger)
                    d[name] = (ba, asr, s + row.get("baseline_train_s", {}).get(name.lower(), 0.0))
                for m in args.methods.split(","):
                    method, label = VARIANTS[m][:2] if m in VARIANTS else (m, m)
                    d[label] = run_one(tc, model, split, calib, bits, trigger, method, method_config(m, lam))
            results.append(row)
            print(json.dumps(row), flush=True)
            write(results, args)  # after every row, so a cut-off run still leaves its finished tables


def _arch(kind: str, args) -> str:
    return f"smallcnn{args.grid_width if kind in GRID_AWARE else 16}"


#: plain-PTQ ASR (%) from which a planted model counts as a QCB *on that toolchain*; below it the
#: attack does not fire there (e.g. a torch-grid plant in onnxruntime, or an ORT-grid plant in FX)
FIRES_ASR = 50.0


def bars(r: dict) -> list[str]:
    """The issue's bars on one planted row, per toolchain: EFRAP ASR <= 5% with BA >= FP32 BA - 1;
    LAC+PDA's DER >= every other defense's. Judged only where the attack fires on that toolchain
    (plain PTQ ASR >= FIRES_ASR); elsewhere the row is no QCB there and says so instead of a miss."""
    out = []
    for tc, d in r["defenses"].items():
        plain = d["plain"]
        if plain[1] < FIRES_ASR:
            out.append(f"{tc}: plain PTQ ASR {plain[1]:.2f}% < {FIRES_ASR:g}%: the attack does not fire on this "
                       f"toolchain (not a QCB here), no bar judged")
            continue
        for name in [n for n in d if n == "efrap" or n.startswith("efrap (")]:
            ba, asr = d[name][:2]
            ok = asr <= 5 and ba >= r["fp32"][0] - 1
            out.append(f"{tc}: {name.replace('efrap', 'EFRAP', 1)} ASR {asr:.2f} (<= 5), BA {ba:.2f} "
                       f"(>= {r['fp32'][0] - 1:.2f}): {'met' if ok else '**not met**'}")
        if "lac_pda" in d:
            mine = _der(plain, d["lac_pda"])
            above = [f"{n} {_der(plain, v):.1f}" for n, v in d.items()
                     if n not in ("plain", "lac_pda") and _der(plain, v) > mine + 1e-9]
            out.append(f"{tc}: LAC+PDA DER {mine:.1f} >= every alternative: "
                       + ("met" if not above else "**not met** (" + ", ".join(above) + ")"))
    return out


def header(title: str, script: str, args) -> list[str]:
    """A result file's title, the exact command that wrote it and the machine."""
    cmd = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in ("out", "cache_dir"))
    return [f"# {title}", "", f"Command: `OMP_NUM_THREADS=1 python benchmarks/{script} {cmd}`", "",
            f"Machine: {cpu_name()}, {os.cpu_count()} cores (shared with other jobs: seconds are indicative), "
            f"torch {torch.__version__}, Python {platform.python_version()}.", ""]


def write(results, args) -> None:
    lines = header("Every QCB defense side by side", "bench_defenses.py", args) + [
             "Models: grid-aware = a clean SmallCNN (width `--grid-width`) turned into a dormant QCB on the torch "
             "x86 grid of that bit width by `evalkit.attacks.plant_grid_aware` (the 8-bit QCB fires after torch.ao "
             "x86 INT8 PTQ; it does not target onnxruntime's absmax/127 grid); grid-aware-ort = the same clean model "
             "planted on onnxruntime's grid instead (`restricted=True`: absmax/127 on -127..127 at W8, absmax/7 on "
             "-7..7 at W4); pqbackdoor / clean = SmallCNN "
             "(width 16) from `bench_qcb.plant` (W8 attacks there target the torch x86 and ORT 8-bit grids at once). "
             "Defender: `--calib` unlabeled training images; FT / FP also get `--labelled` of the training set with "
             "labels. Metrics on the test set by the real INT8 torch model (fbgemm) or the real onnxruntime "
             "session. plain = the toolchain's own PTQ, the reference for DER (DER = 50 means no change). "
             "BA / ASR / DER in %.", "",
             "QVec's defaults were chosen on PQBackdoor W4, SmallCNN width 16, digits, seed 0 (the tests' "
             "`qcb_w4` and the first version of this table); rows marked *tuned-on* are that setting. EFRAP's "
             "(per-row LSB units, flip weight 3.0) were chosen on every model of seeds 0 and 1, its annealed "
             "regulariser on seeds 0-5; seeds 6 and up are disjoint from every choice. Bars are judged only "
             "where plain PTQ fires (ASR >= "
             f"{FIRES_ASR:g}%).", ""]
    for r in results:
        tuned = (r["attack"], r["bits"], r.get("arch", _arch(r["attack"], args)), args.dataset, args.seed) in TUNED_ON
        note = " (not a dormant 8-bit QCB: FP32 ASR is already high)" if (
            r["bits"] == 8 and r["attack"] in W8_NOT_DORMANT) else ""
        agree = ", ".join(f"{float(k):g}: {100 * v:.1f}" for k, v in r["qvec_agreement"].items())
        lines += [f"## {r['attack']}, W{r['bits']}A8, {r.get('arch', _arch(r['attack'], args))}"
                  f"{', tuned-on' if tuned else ''}{note}", "",
                  f"FP32 BA / ASR: {r['fp32'][0]:.2f} / {r['fp32'][1]:.2f}. Planted in {r['plant_s']:.0f} s. "
                  f"QVec lambda = {r['qvec_lambda']:g} (calibration top-1 agreement with FP32 per lambda, %: {agree}).",
                  "", "| defense | " + " | ".join(f"{tc} BA / ASR / DER / s" for tc in r["defenses"]) + " |",
                  "|---|" + "---|" * len(r["defenses"])]
        names = list(next(iter(r["defenses"].values())))
        for name in names:
            cells = []
            for d in r["defenses"].values():
                nd, v = d["plain"], d[name]
                cells.append(f"{v[0]:.2f} / {v[1]:.2f} / {_der(nd, v):.1f} / {v[2]:.1f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        if r["attack"] != "clean":
            lines += ["", "Bars: " + "; ".join(bars(r)) + "."]
        lines.append("")
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
