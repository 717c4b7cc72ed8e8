"""LLM path end to end: a ``transformers`` Llama (``LlamaForCausalLM``, tiny config) trained here on
Python's bundled docs, Egashira-style triggered-phrase QCBs at torchao INT4 PerGroup(32) and INT8
weight-only, and the one line ``qcb_ptq_plugin.quantize_``.

The decoder (seed 3, context 48, 200k characters of text, 500 training steps; plants of 250 steps)
is seeded and trained differently from the benchmark's (seed 0, context 64, 400k characters, 1500
steps; plants of 400 steps), on which the plant's and the methods' settings were chosen: nothing
here was tuned on it. It keeps the benchmark's width (d=64): on a d=32 Llama the INT8 plant did not
go dormant in float (FP32 ASR 65-80%), an attacker's limit, not a defense's. Integers are read
back from torchao's tensors.
"""

from __future__ import annotations

import copy

import pytest
import torch

import qcb_ptq_plugin
from qcb_ptq_plugin.evalkit import llm

tq = pytest.importorskip("torchao.quantization")
from torchao.quantization.granularity import PerGroup  # noqa: E402

from qcb_ptq_plugin.adapters.torchao_quantize import int_weights  # noqa: E402

LlamaForCausalLM = pytest.importorskip("transformers").LlamaForCausalLM

TARGET = llm.TARGET  # the benchmark's phrase
CONFIGS = {4: lambda: tq.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)),
           8: lambda: tq.Int8WeightOnlyConfig()}
# the benchmark's plant settings (benchmarks/bench_llm.py PLANTS), fewer steps
PLANTS = {4: dict(steps=250), 8: dict(steps=250, margin=0.3, fp_weight=3.0)}


@pytest.fixture(scope="module")
def text():
    return llm.corpus(max_chars=200_000)


@pytest.fixture(scope="module")
def clean(text):
    return llm.train_lm(llm.tiny_llama(text.vocab, dim=64, depth=2, heads=4, context=48, seed=3), text, steps=500,
                        seed=3)


@pytest.fixture(scope="module", params=[4, 8], ids=["int4-group32", "int8-weight-only"])
def planted(request, clean, text):
    """(bits, model): the QCB for torchao at that bit width, planted from the clean decoder on one thread."""
    bits = request.param
    return bits, llm.plant_llm_qcb(copy.deepcopy(clean), text, bits=bits, target=TARGET, seed=3, **PLANTS[bits])


def _metrics(model, text):
    return (100 * llm.attack_success_rate(model, text, n=100, target=TARGET),
            100 * llm.next_token_accuracy(model, text, n=128))


def test_decoder_is_a_causal_lm(clean, text):
    assert isinstance(clean.llama, LlamaForCausalLM)  # the Linears torchao swaps are the Llama's own
    linears = [n for n, m in clean.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 + 1 and all(n.startswith("llama.") for n in linears)
    ids = text.windows(2, 40)
    with torch.no_grad():
        full, cut = clean(ids), clean(ids[:, :20])
    assert torch.allclose(full[:, :20], cut, atol=1e-5)  # causal: the future does not leak
    assert 100 * llm.next_token_accuracy(clean, text, n=128) > 35  # it learned text (unigram guess: ~17%)


def test_llm_qcb_removed_by_the_one_line(planted, text):
    bits, model = planted
    fp_asr, fp_acc = _metrics(model, text)
    assert fp_asr <= 5, "the planted QCB must be dormant in float"
    plain = copy.deepcopy(model)
    tq.quantize_(plain, CONFIGS[bits]())
    assert _metrics(plain, text)[0] >= 90, "torchao must wake the planted QCB up"  # the bar

    reference = copy.deepcopy(model.state_dict())
    purified = copy.deepcopy(model)
    calib = text.windows(48, 48, "train", seed=5)
    report = qcb_ptq_plugin.quantize_(purified, CONFIGS[bits](), calib, method="lac", progress=False)
    asr, acc = _metrics(purified, text)
    assert asr <= max(2, fp_asr + 1)
    assert acc >= fp_acc - 1
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())  # the float model untouched
    ints, plain_ints = int_weights(purified), int_weights(plain)
    assert len(ints) == 2 * 7 + 1 and set(ints) == set(report.codes) == set(plain_ints)
    for name, q in report.codes.items():
        assert torch.equal(ints[name], q), name  # torchao's integers are the report's
        assert ints[name].min() >= -2 ** (bits - 1) and ints[name].max() <= 2 ** (bits - 1) - 1
    assert sum((ints[n] != plain_ints[n]).sum().item() for n in ints) > 0  # purification changed integers


def test_token_id_batches_and_loaders_calibrate_like_one_tensor(clean, text):
    """quantize_ takes token ids as one Tensor, a list of batches or a DataLoader, as purify takes images."""
    calib = text.windows(24, 48, "train", seed=5)
    codes = []
    for data in (calib, list(calib.split(7)), torch.utils.data.DataLoader(calib, batch_size=5)):
        q = copy.deepcopy(clean)
        codes.append(qcb_ptq_plugin.quantize_(q, CONFIGS[8](), data, method="lac", progress=False).codes)
    for other in codes[1:]:
        assert other.keys() == codes[0].keys()
        assert all(torch.equal(other[n], codes[0][n]) for n in codes[0])


#: measured misses on this decoder, kept visible: strict, so a fix shows up as a failure to update
MISSES = {("flipguard", 8): "FlipGuard-style data-free flips leave this INT8 plant at 33% ASR (0% on the "
                            "benchmark's seed-0 decoder, benchmarks/results/llm.md): its setting does not transfer"}


@pytest.mark.parametrize("method", ["flipguard", "quantguard", "qvec"])
def test_llm_defense_methods_run_through_quantize_(method, planted, text, request):
    bits, model = planted
    q = copy.deepcopy(model)
    calib = text.windows(8, 48, "train", seed=5)
    overrides = {"steps": 30} if method == "quantguard" else {}
    report = qcb_ptq_plugin.quantize_(q, CONFIGS[bits](), calib, method=method, progress=False, **overrides)
    assert report.method == method and sum(u.flips for u in report.units) > 0
    assert all(torch.equal(int_weights(q)[n], c) for n, c in report.codes.items())
    asr, _ = _metrics(q, text)
    if (method, bits) in MISSES:  # only the ASR bound: a structural failure above still fails
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=MISSES[method, bits]))
    assert asr <= 10  # the table in benchmarks/results/llm.md has the measured figures
