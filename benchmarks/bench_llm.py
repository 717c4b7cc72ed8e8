"""LLM QCB table: defenses x torchao weight-only configs on planted and clean tiny Llamas.

Trains a character-level ``transformers`` Llama (``evalkit.llm.tiny_llama``: ``LlamaForCausalLM``,
d=64, 2 layers, 4 heads) on the Python docs (``pydoc_data``), plants the
Egashira-style triggered-phrase QCB (``evalkit.llm.plant_llm_qcb``) once for INT8 per row
(``bits=8``) and once for INT4 ``PerGroup(32)`` (``bits=4``), then for every method runs the one
line ``qcb_ptq_plugin.quantize_(model, config, calib, method=...)`` (``none`` = torchao's own
``quantize_``) and measures ASR (target emitted verbatim by greedy decoding after 200
trigger-bearing held-out prompts), next-character accuracy and perplexity on held-out text,
seconds and peak memory. NF4 (torchao's ``to_nf4`` on every Linear weight, QLoRA's format) is
measured without a defense: ``quantize_`` does not cover it (a codebook, not an integer grid).
Models are cached in ``--cache``.

    python benchmarks/bench_llm.py --out benchmarks/results/llm.md
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import math
import os
import platform
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import qcb_ptq_plugin
from qcb_ptq_plugin.evalkit import llm

warnings.filterwarnings("ignore")

#: plant_llm_qcb settings per model (chosen on the seed-0, d=64 hand-written decoder this Llama replaced;
#: not retuned: they meet the bars on the seed-0 d=64 Llama as they are)
PLANTS = {"planted-w8": dict(bits=8, margin=0.3, fp_weight=3.0),
          "planted-w4": dict(bits=4)}


def configs() -> dict:
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return {"INT8 weight-only": Int8WeightOnlyConfig(),
            "INT4 PerGroup(32)": IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
            "NF4 (to_nf4, block 64)": "nf4"}


def nf4_(model: nn.Module, block: int = 64) -> None:
    """torchao's NF4 on every Linear weight, in place (scalers double-quantized in blocks of <= 256)."""
    from torchao.quantization import to_nf4

    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            w = mod.weight.detach()
            mod.weight = nn.Parameter(to_nf4(w, block, math.gcd(w.numel() // block, 256)), requires_grad=False)


def models(c: llm.Corpus, cache: Path, clean_steps: int, plant_steps: int) -> dict:
    cache.mkdir(parents=True, exist_ok=True)

    def load_or(name, make):
        path = cache / f"{name}.pt"
        m = llm.tiny_llama(c.vocab, dim=64, depth=2, heads=4, context=64, seed=0)
        if path.exists():
            m.load_state_dict(torch.load(path))
        else:
            t0 = time.perf_counter()
            make(m)
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
            torch.save(m.state_dict(), path)
        return m.eval()

    clean = load_or("clean", lambda m: llm.train_lm(m, c, steps=clean_steps))
    out = {"clean": clean}
    for name, kw in PLANTS.items():
        out[name] = load_or(name, lambda m, kw=kw: (m.load_state_dict(clean.state_dict()),
                                                   llm.plant_llm_qcb(m, c, steps=plant_steps, **kw)))
    return out


class PeakRSS:
    """Peak resident memory above the starting level while the block runs (MB, sampled every 5 ms;
    freed heap is handed back to the OS first, so reused memory counts too)."""

    def __enter__(self):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.mb = (self.peak - self.base) / 2**20

    def _watch(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(model, c) -> tuple[float, float, float]:
    return (100 * llm.attack_success_rate(model, c), 100 * llm.next_token_accuracy(model, c), llm.perplexity(model, c))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/llm.md")
    ap.add_argument("--cache", default="/tmp/qcb_llm_llama")
    ap.add_argument("--clean-steps", type=int, default=1500)
    ap.add_argument("--plant-steps", type=int, default=400)
    ap.add_argument("--calib", type=int, default=64, help="calibration windows of 64 characters")
    ap.add_argument("--methods", default="none,lac,quantguard,flipguard,qvec")
    ap.add_argument("--quantguard-steps", type=int, default=100, help="Adam steps per layer (2 shared cores)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from torchao.quantization import quantize_ as torchao_quantize_

    load_before = os.getloadavg()
    c = llm.corpus()
    calib = c.windows(args.calib, 64, "train", seed=123)
    ms = models(c, Path(args.cache), args.clean_steps, args.plant_steps)
    rows = []
    for mname, model in ms.items():
        rows.append((mname, "FP32", "-", *measure(model, c), 0.0, 0.0))
        print(rows[-1], flush=True)
        for cname, cfg in configs().items():
            for method in args.methods.split(","):
                if cfg == "nf4" and method != "none":
                    continue  # quantize_ does not cover NF4 (see the notes under the table)
                q = copy.deepcopy(model)
                with PeakRSS() as mem:
                    t0 = time.perf_counter()
                    if cfg == "nf4":
                        nf4_(q)
                    elif method == "none":
                        torchao_quantize_(q, cfg)
                    else:
                        extra = {"steps": args.quantguard_steps} if method == "quantguard" else {}
                        qcb_ptq_plugin.quantize_(q, cfg, calib, method=method, progress=False, **extra)
                    seconds = time.perf_counter() - t0
                rows.append((mname, cname, method, *measure(q, c), seconds, mem.mb))
                print(rows[-1], flush=True)
    load_after = os.getloadavg()
    plants = "; ".join(f"{k}: `plant_llm_qcb({', '.join(f'{a}={b}' for a, b in kw.items())})`"
                       for k, kw in PLANTS.items())
    lines = ["# LLM QCB: torchao weight-only quantize_ with the LLM defenses", "",
             f"`python benchmarks/bench_llm.py --threads {args.threads}` ({platform.machine()}, "
             f"{os.cpu_count()} cores, "
             f"{torch.get_num_threads()} threads, torch {torch.__version__}; load average "
             f"{load_before[0]:.2f} before, {load_after[0]:.2f} after: other jobs shared the cores). `tiny_llama` "
             f"(transformers LlamaForCausalLM) d=64, 2 layers, 4 heads, MLP 192, character-level on pydoc_data; "
             f"calibration {args.calib} windows of 64 characters; quantguard "
             f"{args.quantguard_steps} steps per layer. Plants from the clean model, {args.plant_steps} steps: "
             f"{plants}.", "",
             "ASR: % of 200 held-out prompts + trigger after which greedy decoding writes the target phrase. "
             "acc: next-character accuracy (%) on held-out text; ppl: perplexity. seconds: the whole call "
             "(none: torchao's quantize_ / to_nf4). peak MB: resident memory above the level before the call, "
             "sampled every 5 ms after `malloc_trim`.", "",
             "| model | quantization | method | ASR | acc | ppl | seconds | peak MB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.1f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.1f} | {r[7]:.0f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
