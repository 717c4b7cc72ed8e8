"""Quantization Blindspots, redone: five backdoor defenses on FP32, static INT8 and INT4 models.

    OMP_NUM_THREADS=1 python benchmarks/bench_blindspots.py            # writes benchmarks/results/blindspots.md
    python benchmarks/bench_blindspots.py --models badnets --nc-steps 100 --out /tmp/b.md   # quick look

Models (SmallCNN, sklearn digits, trigger = 2x2 white patch in the corner, target 0):

* ``badnets``: ordinary BadNets (10% poisoned training, width 16): the backdoor is in the float model;
* ``qcb-w8``: a clean width-32 model turned into a dormant 8-bit QCB by the grid-aware attacker
  (:func:`evalkit.attacks.plant_grid_aware`, bits 8: fires after torch.ao x86 INT8 PTQ);
* ``qcb-w4``: the same clean model turned into a 4-bit QCB (bits 4, per-row absmax).

Each model is measured at FP32, INT8 and INT4 (static torch.ao FX PTQ of every layer, real
quantized kernels), and every defense of :mod:`qcb_ptq_plugin.evalkit.blindspots` runs on the
model at that precision. See that module for each defense's protocol and detection rule.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from bench_defenses import header, setup
from bench_qcb import measure
from qcb_ptq_plugin.evalkit import attacks, baselines, blindspots as bs, metrics, models
from qcb_ptq_plugin.evalkit.harness import write_markdown
from qcb_ptq_plugin.ptq import quantize_fx

HERE = Path(__file__).resolve().parent
TARGET = 0


def plant(kind: str, split, trigger, seed: int, clean_cache: dict) -> torch.nn.Module:
    x, y = split.x_train, split.y_train
    if kind == "badnets":
        torch.manual_seed(seed)
        return attacks.train_clean_or_badnets(models.SmallCNN(1, split.num_classes, width=16), x, y, epochs=20,
                                              batch_size=64, trigger=trigger, target=TARGET, poison_rate=0.1,
                                              seed=seed)
    if "clean" not in clean_cache:  # the grid-aware attacker starts from a clean, trained model
        torch.manual_seed(seed)
        clean_cache["clean"] = attacks.train_clean_or_badnets(models.SmallCNN(1, split.num_classes, width=32), x, y,
                                                              epochs=20, batch_size=64, seed=seed)
    clean = copy.deepcopy(clean_cache["clean"])
    if kind == "qcb-w8":
        return attacks.plant_grid_aware(clean, x, y, trigger=trigger, target=TARGET, bits=8, epochs=30, lr=5e-2,
                                        int_margin=2.0, batch_size=64, seed=seed)
    if kind == "qcb-w4":
        return attacks.plant_grid_aware(clean, x, y, trigger=trigger, target=TARGET, bits=4, epochs=15, lr=5e-2,
                                        int_margin=2.0, equal_absmax=False, batch_size=64, seed=seed)
    raise ValueError(f"model {kind!r}: use badnets, qcb-w8, qcb-w4")


def study(model, split, trigger, calib, suspect, labelled, args) -> list[dict]:
    """Every defense on every precision of ``model``; one dict per precision."""
    xs, ys, is_poison = suspect
    xl, yl = labelled
    keep = split.y_test != TARGET
    clean, triggered = split.x_test[: args.strip_n], trigger(split.x_test[keep][: args.strip_n])
    t0 = time.perf_counter()
    fine_pruned = baselines.fine_prune(model, xl, yl, seed=args.seed)[0]  # the whole defense: float, then PTQ
    fp_seconds = time.perf_counter() - t0
    rows = []
    for prec in bs.precisions(model, calib, bits=(8, 4)):
        t0 = time.perf_counter()
        ba, asr = measure(prec.model, split, trigger)
        nc = bs.neural_cleanse(prec, calib, split.num_classes, steps=args.nc_steps, seed=args.seed)
        st = bs.strip(prec.model, clean, triggered, calib, seed=args.seed)
        feats = bs.penultimate(prec.model, xs, layer="features.11")  # the last conv map, before pooling
        ac = bs.activation_clustering(feats, ys, is_poison, TARGET, seed=args.seed)
        ss = bs.spectral_signatures(feats, ys, is_poison, TARGET)
        pred = metrics.predict(prec.model, xs)  # the model's own grouping: where the poison *lands*
        ac_p = bs.activation_clustering(feats, pred, is_poison, TARGET, seed=args.seed)
        ss_p = bs.spectral_signatures(feats, pred, is_poison, TARGET)
        pruned, ratio = bs.prune(prec.model, xl, yl, layer="features.11")
        p_ba, p_asr = measure(pruned, split, trigger)
        fp_model = fine_pruned if prec.name == "FP32" else quantize_fx(fine_pruned, calib, int(prec.name[3:]))[0]
        f_ba, f_asr = measure(fp_model, split, trigger)
        rows.append({"precision": prec.name, "ba": ba, "asr": asr,
                     "nc": {"index": nc.anomaly_index, "flagged": nc.flagged, "detected": nc.detected(),
                            "reversed_asr": 100 * nc.reversed_asr, "norms": nc.norms},
                     "strip": {"caught": 100 * st.caught, "auroc": st.auroc, "detected": st.detected()},
                     "ac": {"target_size": ac.target_stat, "flagged": ac.flagged, "recall": 100 * ac.recall,
                            "precision": 100 * ac.precision, "detected": ac.detected(TARGET)},
                     "ss": {"recall": 100 * ss.recall, "random_recall": 100 * ss.target_stat,
                            "detected": ss.detected(TARGET)},
                     "ac_pred": {"target_size": ac_p.target_stat, "recall": 100 * ac_p.recall,
                                 "detected": ac_p.detected(TARGET)},
                     "ss_pred": {"recall": 100 * ss_p.recall, "detected": ss_p.detected(TARGET)},
                     "prune": {"ratio": ratio, "ba": p_ba, "asr": p_asr, "removed": p_asr <= args.removed_asr},
                     "fine_prune": {"ba": f_ba, "asr": f_asr, "removed": f_asr <= args.removed_asr,
                                    "float_seconds": fp_seconds},
                     "seconds": time.perf_counter() - t0})
        print(json.dumps({"precision": prec.name, **{k: rows[-1][k] for k in ("ba", "asr", "seconds")}}), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="digits", choices=["digits", "mnist", "fashion-mnist"])
    p.add_argument("--models", default="badnets,qcb-w8,qcb-w4")
    p.add_argument("--calib", type=int, default=256, help="unlabeled clean images: PTQ calibration, NC, STRIP overlays")
    p.add_argument("--labelled", type=float, default=0.05, help="labelled fraction for (fine-)pruning")
    p.add_argument("--poison", type=float, default=0.03, help="poisoned fraction of the AC/SS suspect set")
    p.add_argument("--nc-steps", type=int, default=300)
    p.add_argument("--strip-n", type=int, default=200)
    p.add_argument("--removed-asr", type=float, default=20.0, help="(fine-)pruning removes the backdoor if ASR <= this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(HERE / "results" / "blindspots.md"))
    args = p.parse_args()
    split, trigger, calib = setup(args)
    suspect = bs.poisoned_set(split.x_train, split.y_train, trigger, TARGET, args.poison, seed=args.seed + 300)
    labelled = baselines.labelled_subset(split.x_train, split.y_train, args.labelled, seed=args.seed + 200)
    results, cache = [], {}
    for kind in args.models.split(","):
        t0 = time.perf_counter()
        model = plant(kind, split, trigger, args.seed, cache)
        results.append({"model": kind, "plant_s": time.perf_counter() - t0,
                        "rows": study(model, split, trigger, calib, suspect, labelled, args)})
        write(results, args)  # after every model, so a cut-off run still leaves its finished tables


def _yes(flag: bool) -> str:
    return "**yes**" if flag else "no"


def write(results, args) -> None:
    lines = header("Quantization Blindspots, redone: backdoor defenses on FP32, static INT8 and INT4",
                   "bench_blindspots.py", args) + [
             "INT8 / INT4 = static torch.ao FX PTQ of every Conv/Linear layer (x86 per-channel symmetric 8 / 4-bit "
             "weights, 8-bit activations), run by torch's quantized kernels. BA / ASR on the digits test set, in %. "
             "Detection rules: NC anomaly index > 2 (flagged class in brackets; gradients from the weight-exact "
             "dequantized surrogate, `rev` = the flagged class's reversed trigger on the real model); STRIP: share "
             "of triggered inputs caught at 5% clean false rejections >= 50%; AC: target label flagged (smaller "
             "cluster <= 35%) and poison recall >= 50%; SS: poison recall >= 50% (random removal: `rnd`). AC and SS "
             "group the suspect set by its labels (the papers); \"by prediction\" groups it by the model's own "
             "top-1 at that precision, so the poison reaches the target group only where the backdoor fires. Pruning "
             f"(on the model at that precision, no retraining) and fine-pruning (float, then PTQ): ASR <= "
             f"{args.removed_asr:g}%.", ""]
    for r in results:
        lines += [f"## {r['model']} (planted in {r['plant_s']:.0f} s)", "",
                  "| precision | BA / ASR | NC index [class] (rev ASR) | STRIP caught / AUROC | "
                  "AC target size / recall | SS recall (rnd) | AC / SS by prediction: recall | "
                  "prune ratio -> BA / ASR | fine-prune -> BA / ASR | s |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            nc, st, ac, ss, pr, fp = (row[k] for k in ("nc", "strip", "ac", "ss", "prune", "fine_prune"))
            acp, ssp = row["ac_pred"], row["ss_pred"]
            lines.append(
                f"| {row['precision']} | {row['ba']:.1f} / {row['asr']:.1f} | "
                f"{nc['index']:.2f} [{nc['flagged']}] ({nc['reversed_asr']:.0f}) {_yes(nc['detected'])} | "
                f"{st['caught']:.1f} / {st['auroc']:.3f} {_yes(st['detected'])} | "
                f"{ac['target_size']:.2f} / {ac['recall']:.1f} {_yes(ac['detected'])} | "
                f"{ss['recall']:.1f} ({ss['random_recall']:.0f}) {_yes(ss['detected'])} | "
                f"{acp['recall']:.1f} {_yes(acp['detected'])} / {ssp['recall']:.1f} {_yes(ssp['detected'])} | "
                f"{pr['ratio']:.2f} -> {pr['ba']:.1f} / {pr['asr']:.1f} {_yes(pr['removed'])} | "
                f"{fp['ba']:.1f} / {fp['asr']:.1f} {_yes(fp['removed'])} | {row['seconds']:.0f} |")
        lines.append("")
    write_markdown(lines, args.out)


if __name__ == "__main__":
    main()
