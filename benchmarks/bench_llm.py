"""LLM QCB table: defenses x torchao weight-only configs on a planted and a clean TinyDecoder.

Trains a character-level TinyDecoder on the Python docs (``pydoc_data``), plants the
Egashira-style triggered-phrase QCB (``evalkit.llm.plant_llm_qcb``) for each setting, then for
every method runs the one line ``qcb_ptq_plugin.quantize_(model, config, calib, method=...)``
(``none`` = torchao's own ``quantize_``) and measures ASR (target emitted verbatim by greedy
decoding after 200 trigger-bearing held-out prompts), next-character accuracy and perplexity on
held-out text, seconds and peak RSS. Models are cached in ``--cache``.

    python benchmarks/bench_llm.py --out benchmarks/results/llm.md
"""

from __future__ import annotations

import argparse
import copy
import platform
import resource
import time
import warnings
from pathlib import Path

import torch

import qcb_ptq_plugin
from qcb_ptq_plugin.evalkit import llm

warnings.filterwarnings("ignore")


def configs():
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return {"INT8 weight-only": Int8WeightOnlyConfig(),
            "INT4 PerGroup(32)": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32))}


def models(c: llm.Corpus, cache: Path, clean_steps: int, plant_steps: int) -> dict:
    cache.mkdir(parents=True, exist_ok=True)

    def load_or(name, make):
        path = cache / f"{name}.pt"
        m = llm.TinyDecoder(c.vocab, dim=64, depth=2)
        if path.exists():
            m.load_state_dict(torch.load(path))
        else:
            make(m)
            torch.save(m.state_dict(), path)
        return m.eval()

    clean = load_or("clean", lambda m: llm.train_lm(m, c, steps=clean_steps))
    out = {"clean": clean}
    for bits in (8, 4):
        kw = dict(bits=bits) if bits == 4 else dict(bits=8, margin=0.3, fp_weight=5.0)
        out[f"planted-w{bits}"] = load_or(f"planted_w{bits}", lambda m, kw=kw: (m.load_state_dict(clean.state_dict()),
                                                                          llm.plant_llm_qcb(m, c, steps=plant_steps, **kw)))
    return out


def measure(model, c) -> tuple[float, float, float]:
    return (100 * llm.attack_success_rate(model, c), 100 * llm.next_token_accuracy(model, c), llm.perplexity(model, c))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/llm.md")
    ap.add_argument("--cache", default="/tmp/qcb_llm_models")
    ap.add_argument("--clean-steps", type=int, default=1500)
    ap.add_argument("--plant-steps", type=int, default=400)
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of 64 characters")
    ap.add_argument("--methods", default="none,lac,quantguard,flipguard")
    ap.add_argument("--quantguard-steps", type=int, default=100, help="Adam steps per layer (2 shared cores)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    from torchao.quantization import quantize_ as torchao_quantize_

    c = llm.corpus()
    calib = c.windows(args.calib, 64, "train", seed=123)
    ms = models(c, Path(args.cache), args.clean_steps, args.plant_steps)
    rows = []
    for mname, model in ms.items():
        fp_asr, fp_acc, fp_ppl = measure(model, c)
        rows.append((mname, "FP32", "-", fp_asr, fp_acc, fp_ppl, 0.0, 0.0))
        print(rows[-1], flush=True)
        for cname, cfg in configs().items():
            for method in args.methods.split(","):
                q = copy.deepcopy(model)
                t0 = time.perf_counter()
                if method == "none":
                    torchao_quantize_(q, cfg)
                    seconds = time.perf_counter() - t0
                else:
                    extra = {"steps": args.quantguard_steps} if method == "quantguard" else {}
                    rep = qcb_ptq_plugin.quantize_(q, cfg, calib, method=method, progress=False, **extra)
                    seconds = rep.seconds
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                rows.append((mname, cname, method, *measure(q, c), seconds, rss))
                print(rows[-1], flush=True)
    lines = ["# LLM QCB: torchao weight-only quantize_ with the LLM defenses", "",
             f"`python benchmarks/bench_llm.py` ({platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}); TinyDecoder d=64, 2 blocks, "
             f"character-level on pydoc_data; calibration {args.calib} windows of 64 characters; quantguard "
             f"{args.quantguard_steps} steps per layer. planted-w4: `plant_llm_qcb(bits=4)` (float weight anywhere in "
             "the INT4 box); planted-w8: `bits=8` (float weight within 0.45 INT8 LSB of the INT8 model, also "
             "inside the INT4 box).", "",
             "ASR: % of 200 held-out prompts + trigger after which greedy decoding writes the target phrase. "
             "acc: next-character accuracy (%) on held-out text; ppl: perplexity. seconds: the purification "
             "pass (none: torchao's quantize_). RSS: process peak so far (MB; monotonic, an upper bound).", "",
             "| model | quantization | method | ASR | acc | ppl | seconds | peak RSS MB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.1f} | {r[7]:.0f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
