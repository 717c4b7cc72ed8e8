"""Attacks x settings x grids x architectures x datasets, with No defense / LAC / LAC+PDA and a clean model.

    python benchmarks/bench_attacks.py                                   # everything (hours on 2 cores)
    python benchmarks/bench_attacks.py --datasets mnist --archs smallcnn --attacks grid-aware,clean \\
        --bits 8 --out /tmp/attacks.md                                    # one slice

Attacks (``evalkit.attacks``, each as its authors built it where known; see the docstrings):

* ``pqbackdoor``: two stages, BadNets with centring in the last 20% of the epochs, then repair
  projected into the cells of the x86 per-channel, qnnpack per-tensor and ORT grids at once
  (margin 1e-3 LSB), one model per bit width;
* ``qu-anti-zation``: per-tensor weights, dynamic per-batch 8-bit activations, {8, 4} bits jointly:
  one model measured at W8A8 and W4A8 (BN-folded weights and heavier trigger terms than the
  authors', see ``_plant``);
* ``comp-artifact``: dual path, BN-folded per-tensor int8 weights, SGD: 8 bits only;
* ``grid-aware``: the joint attacker with codes and FP offsets apart, grid pinned in advance
  (equal row absmax at W8 and W4, so the x86 per-channel and qnnpack per-tensor grids coincide;
  FP offsets <= 0.49 LSB, the float-path hinge ``fp_target_margin=1``; ``GRID_AWARE``). It targets
  torch's absmax/127.5 grid, not ORT's absmax/127 one;
* ``grid-aware-ort``: the same recipe on onnxruntime's grid (``restricted=True``: absmax/127 on
  -127..127 at W8, absmax/7 on -7..7 at W4; as ``grid-aware-ort`` in bench_defenses.py);
* ``clean``: the clean model every attack except PQBackdoor starts from (3 epochs, Adam, ``CLEAN_LR``).

Grids: ``x86`` = torch.ao FX, x86 engine, per-channel weights (absmax/127.5); ``qnnpack`` = torch.ao
FX, qnnpack engine, per-tensor weights (``attacks.quantize_fx_qnnpack``); ``ort`` = onnxruntime
``quantize_static`` QDQ, per-channel absmax/127 (plain, and through ``qcb_ptq_plugin.onnx`` for the
defenses). BA / ASR / DER in % on the first ``--test-samples`` test images; s = wall time of the
whole PTQ pipeline. Planted models are cached as state dicts (loaded with ``weights_only=True``)
under ``--cache``; every measured cell is appended to ``--jsonl`` at once, and the Markdown table is
rewritten from it after each cell (cells not measured yet are listed as missing), so a run cut
short still leaves a valid table and a rerun with the same ``--jsonl`` skips what is done.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import subprocess
import time
import warnings
from pathlib import Path

import torch

import qcb_ptq_plugin as q
from qcb_ptq_plugin._io import atomic_output, write_text
from qcb_ptq_plugin.evalkit import attacks, datasets, metrics, models
from qcb_ptq_plugin.evalkit.harness import cpu_name, write_markdown
from qcb_ptq_plugin.ptq import quantize_fx

import bench_qcb  # noqa: E402  (run_ort: the ORT pipeline with and without purification)

HERE = Path(__file__).resolve().parent
TRIGGER = attacks.PatchTrigger(size=4, value=1.0, margin=1)  # Qu-ANTI-zation's h/8 square, 1 px margin
TARGET = 0
ARCHS = {
    "smallcnn": lambda: models.SmallCNN(1, 10, width=16),
    "mlp": lambda: models.MLP(784, 10, hidden=(256, 128)),
    "resnet": lambda: models.SmallResNet(1, 10, width=8),
}
ATTACK_BITS = {"pqbackdoor": (8, 4), "qu-anti-zation": (8, 4), "comp-artifact": (8,), "grid-aware": (8, 4),
               "grid-aware-ort": (8, 4), "clean": (8, 4)}
DEFENSES = {"No defense": None, "LAC": dict(pda="off"), "LAC+PDA": dict(pda="on")}


#: Adam peak learning rate of the 3-epoch clean training (and of PQBackdoor's stage 1, which trains
#: from scratch): the residual CNN reaches 60% BA on MNIST with 1e-3 and 93% with 1e-2 (seed 0)
CLEAN_LR = {"mlp": 1e-3, "smallcnn": 1e-3, "resnet": 1e-2}
#: ``plant_grid_aware`` settings (tuned on MNIST seed 0 only; Fashion-MNIST is reported as is).
#: One absmax per layer at both widths (``equal_absmax=True``: the x86 per-channel and qnnpack
#: per-tensor grids coincide, so one model targets both), each row pinned at its largest-|w|
#: element with its sign (``signed_pins``), FP offsets up to 0.49 LSB, the float-path hinge
#: ``fp_target_margin=1`` (as the digits demo), one FP-offset-only polish pass. W8: cross-entropy
#: on the INT triggered term; W4: the hinge ``int_margin=2``. The MLP at W8 also pins its first
#: layer on a border pixel that is 0 in every image at 16x the absmax (``dead_input_absmax``).
#: What was tried and measured: results/attacks.md, "Grid-aware recipe".
GRID_AWARE = {
    8: dict(bits=8, epochs=3, lr=1e-1, int_margin=None, polish_epochs=1, offset=0.49, fp_target_margin=1.0,
            equal_absmax=True, signed_pins=True),
    4: dict(bits=4, epochs=3, lr=1e-1, int_margin=2.0, polish_epochs=1, offset=0.49, fp_target_margin=1.0,
            equal_absmax=True, signed_pins=True),
}
#: per-(arch, bits) overrides of ``GRID_AWARE``
GRID_AWARE_ARCH: dict[tuple[str, int], dict] = {("mlp", 8): dict(dead_input_absmax=16.0)}


def _train_clean(arch, x, y, seed):
    torch.manual_seed(seed)
    return attacks.train_clean_or_badnets(ARCHS[arch](), x, y, epochs=3, lr=CLEAN_LR[arch], batch_size=64, seed=seed)


def _plant(kind: str, arch: str, bits: int, x, y, clean: torch.nn.Module, seed: int) -> torch.nn.Module:
    """One planted model (``clean`` is the trained clean model; it is copied, never modified)."""
    if kind == "clean":
        return copy.deepcopy(clean)
    if kind in ("grid-aware", "grid-aware-ort"):  # the ORT kind: the same recipe on absmax/qmax, -qmax..qmax
        recipe = {**GRID_AWARE[bits], **GRID_AWARE_ARCH.get((arch, bits), {})}
        return attacks.plant_grid_aware(copy.deepcopy(clean), x, y, trigger=TRIGGER, target=TARGET, batch_size=64,
                                        seed=seed + 1, restricted=kind == "grid-aware-ort", **recipe)
    if kind == "qu-anti-zation":  # the authors' quantizer (per-tensor weights, dynamic activations, {8, 4});
        # folded weights and c = 2, c_quant = 1, lr 5e-4: their c = 0.5 and raw weights leave FP32 ASR ~37% on digits
        return attacks.plant_quantization(copy.deepcopy(clean), x, y, trigger=TRIGGER, target=TARGET, bits=(8, 4),
                                          restricted=True, per_channel=False, fold_bn=True, act_bits=8,
                                          pretrain_epochs=0, epochs=3, c=2.0, c_quant=1.0, lr=5e-4, weight_decay=1e-4,
                                          batch_size=64, seed=seed + 1)
    if kind == "comp-artifact":  # SGD lr 1e-3 (their 0.1 destroys BA on these nets with BN frozen)
        return attacks.plant_comp_artifact(copy.deepcopy(clean), x, y, trigger=TRIGGER, target=TARGET, bits=bits,
                                           epochs=3, lr=1e-3, batch_size=64, seed=seed + 1)
    if kind == "pqbackdoor":  # trained from scratch, as its authors do
        torch.manual_seed(seed)
        grids = [attacks.Grid(bits), attacks.Grid(bits, per_channel=False), attacks.Grid(bits, restricted=True)]
        return attacks.plant_pqbackdoor(ARCHS[arch](), x, y, trigger=TRIGGER, target=TARGET, grids=grids,
                                        lr=CLEAN_LR[arch], inject_epochs=3, repair_epochs=3, repair_lr=1e-3, margin=1e-3,
                                        center_fraction=0.2, batch_size=64, seed=seed)
    raise ValueError(f"unknown attack {kind!r}; choose from {sorted(ATTACK_BITS)}")


def _planted_bits(kind: str, bits: int) -> int:
    """The bit width a model is planted for: Qu-ANTI-zation and clean serve every setting with one model."""
    return 0 if kind in ("qu-anti-zation", "clean") else bits


def cached_model(kind, arch, bits, split, args) -> tuple[torch.nn.Module, float]:
    """The planted model from ``--cache`` (a state dict, loaded with weights_only=True) or trained now."""
    cache = Path(args.cache)
    path = cache / f"{split.name}-{arch}-{kind}-w{_planted_bits(kind, bits)}-n{args.train_samples}-s{args.seed}.pt"
    model = ARCHS[arch]()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval(), float("nan")
    x, y = split.x_train[: args.train_samples], split.y_train[: args.train_samples]
    t0 = time.perf_counter()
    clean = cached_model("clean", arch, 8, split, args)[0] if kind != "clean" else _train_clean(arch, x, y, args.seed)
    planted = _plant(kind, arch, bits, x, y, clean, args.seed)
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, "cached model") as tmp:
        torch.save(planted.state_dict(), tmp)
    return planted.eval(), seconds


def measure(model, split):
    x, y = split.x_test, split.y_test
    return 100 * metrics.benign_accuracy(model, x, y), 100 * metrics.attack_success_rate(model, x, y, TRIGGER, TARGET)


def run_torch(model, split, calib, bits, grid):
    out = {}
    for name, over in DEFENSES.items():
        cfg = None if over is None else q.PurifyConfig(progress=False, **over)
        t0 = time.perf_counter()
        try:
            if grid == "x86":
                int8, _ = quantize_fx(model, calib, bits, purify_config=cfg)
            else:
                int8, _ = attacks.quantize_fx_qnnpack(model, calib, bits, purify_config=cfg)
            out[name] = (*measure(int8, split), time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001  (a crash is a result: record it)
            out[name] = {"error": f"{type(e).__name__}: {e}"[:160]}
    return out


def cells(args):
    """Every (dataset, arch, attack, bits, grid) the arguments ask for, in the order they are run."""
    for ds in args.datasets.split(","):
        for arch in args.archs.split(","):
            for kind in args.attacks.split(","):
                for bits in (int(b) for b in args.bits.split(",")):
                    if bits in ATTACK_BITS[kind]:
                        for grid in args.grids.split(","):
                            yield ds, arch, kind, bits, grid


def _key(ds, arch, kind, bits, grid):
    return f"{ds}|{arch}|{kind}|{bits}|{grid}"


def load_done(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {_key(r["dataset"], r["arch"], r["attack"], r["bits"], r["grid"]): r for r in rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="mnist,fashion-mnist")
    p.add_argument("--archs", default="mlp,smallcnn,resnet")
    p.add_argument("--attacks", default="clean,grid-aware,grid-aware-ort,pqbackdoor,qu-anti-zation,comp-artifact")
    p.add_argument("--bits", default="8,4")
    p.add_argument("--grids", default="x86,qnnpack,ort")
    p.add_argument("--train-samples", type=int, default=10000)
    p.add_argument("--test-samples", type=int, default=2000)
    p.add_argument("--calib", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "qcb-ptq-plugin" / "bench_attacks"),
                   help="folder of planted models (state dicts); delete it after changing a recipe")
    p.add_argument("--jsonl", default=str(HERE / "results" / "attacks.jsonl"))
    p.add_argument("--out", default=str(HERE / "results" / "attacks.md"))
    p.add_argument("--table-only", action="store_true",
                   help="measure nothing: rewrite --out from --jsonl (several files: comma-separated)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    if args.table_only:
        done = {k: v for path in args.jsonl.split(",") for k, v in load_done(Path(path)).items()}
        first = min(done.values(), key=lambda r: r["when"], default={"load": os.getloadavg()})
        write(done, args, first["load"], echo=True)
        return
    jsonl = Path(args.jsonl)
    done = load_done(jsonl)
    load_before = os.getloadavg()
    splits: dict[str, datasets.Split] = {}
    fp32: dict[tuple, tuple] = {}
    for ds, arch, kind, bits, grid in cells(args):
        if _key(ds, arch, kind, bits, grid) in done:
            continue
        if ds not in splits:
            full = datasets.load(ds)
            splits[ds] = datasets.Split(ds, full.x_train, full.y_train, full.x_test[: args.test_samples],
                                        full.y_test[: args.test_samples])
        split = splits[ds]
        calib = split.calibration(args.calib, seed=args.seed + 100)  # unlabelled, anywhere in the training set
        model, plant_s = cached_model(kind, arch, bits, split, args)
        mkey = (ds, arch, kind, _planted_bits(kind, bits))
        if mkey not in fp32:
            fp32[mkey] = measure(model, split)
        t0 = time.perf_counter()
        try:
            d = bench_qcb.run_ort(model, split, calib, bits, TRIGGER) if grid == "ort" else \
                run_torch(model, split, calib, bits, grid)
        except Exception as e:  # noqa: BLE001
            d = {"error": f"{type(e).__name__}: {e}"[:160]}
        row = {"dataset": ds, "arch": arch, "attack": kind, "bits": bits, "grid": grid, "plant_s": plant_s,
               "fp32": fp32[mkey], "result": d, "cell_s": time.perf_counter() - t0, "load": os.getloadavg(),
               "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
        done[_key(ds, arch, kind, bits, grid)] = row
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write(done, args, load_before, echo=False)
    write(done, args, load_before, echo=True)


def _der(nd, d) -> float:
    return 100 * metrics.der(nd[1] / 100, d[1] / 100, nd[0] / 100, d[0] / 100)


def _fmt(d, nd=None) -> str:
    if isinstance(d, dict):
        return f"error: {d['error'][:60]}"
    base = f"{d[0]:.1f} / {d[1]:.1f}"
    if nd is None or isinstance(nd, dict):
        return f"{base} / {d[2]:.0f}s"
    return f"{base} / {_der(nd, d):.1f} / {d[2]:.0f}s"


def write(done: dict[str, dict], args, load_before, echo: bool) -> None:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = "?"
    wanted = list(cells(args))
    lines = ["# Attacks x grids x architectures x datasets", "",
             f"Command: `OMP_NUM_THREADS=1 python benchmarks/bench_attacks.py --datasets {args.datasets} "
             f"--archs {args.archs} --attacks {args.attacks} --bits {args.bits} --grids {args.grids} "
             f"--train-samples {args.train_samples} --test-samples {args.test_samples} --calib {args.calib} "
             f"--seed {args.seed}` (commit {commit})", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores shared with other jobs, torch {torch.__version__}, "
             f"Python {platform.python_version()}, {torch.get_num_threads()} intra-op thread(s). Load average "
             f"(1/5/15 min) at the start {load_before[0]:.1f} / {load_before[1]:.1f} / "
             f"{load_before[2]:.1f}; each cell's load is in the .jsonl (``load``). Seconds are wall time under that shared "
             "load, not comparable with `speed.md`.", "",
             "Attacker: the first train-samples training images; defender: --calib unlabelled training images; "
             "metrics on the first test-samples test images, target class 0, a 4x4 white patch 1 px from the "
             "bottom-right corner. Cells: BA / ASR (/ DER) / s in %, s = the whole PTQ pipeline. FP32 is the float "
             "model the PTQ starts from. Notes (the issue's bars for a planted QCB): 'not dormant in FP32' = FP32 "
             "ASR > 5%; 'does not fire' = plain-PTQ ASR < 50% on that grid, 'fires weakly' = 50-90%.", "",
             "| dataset | arch | attack | setting | grid | FP32 BA / ASR | No defense BA / ASR / s | "
             "LAC BA / ASR / DER / s | LAC+PDA BA / ASR / DER / s | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    missing = []
    for ds, arch, kind, bits, grid in wanted:
        r = done.get(_key(ds, arch, kind, bits, grid))
        if r is None:
            missing.append(f"{ds} / {arch} / {kind} / W{bits}A8 / {grid}")
            continue
        head = f"| {ds} | {arch} | {kind} | W{bits}A8 | {grid} | {r['fp32'][0]:.1f} / {r['fp32'][1]:.1f} | "
        d = r["result"]
        if "error" in d:
            lines.append(head + f"error | | | {d['error'][:100]} |")
            continue
        nd = d["No defense"]
        notes = []
        if kind != "clean" and r["fp32"][1] > 5:
            notes.append("not dormant in FP32")
        if not isinstance(nd, dict) and kind != "clean" and nd[1] < 90:
            notes.append("does not fire" if nd[1] < 50 else "fires weakly")
        note = "; ".join(notes)
        lines.append(head + f"{_fmt(nd)} | {_fmt(d['LAC'], nd)} | {_fmt(d['LAC+PDA'], nd)} | {note} |")
    lines += ["", f"## Missing cells ({len(missing)} of {len(wanted)})", ""]
    lines += [f"- {m}" for m in missing] or ["None."]
    if echo:
        write_markdown(lines, args.out)
    else:
        write_text(args.out, "\n".join(lines) + "\n", "benchmark table")


if __name__ == "__main__":
    main()
