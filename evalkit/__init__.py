"""The evaluation kit: everything needed to *show* that purification works, nothing it needs to run.

Installed as ``qcb_ptq_plugin.evalkit`` (the folder sits at the repository's top level). The pass
never imports it.

* :mod:`.attacks` - plant quantization-conditioned backdoors (PQBackdoor-, Qu-ANTI-zation-style), triggers;
* :mod:`.models` - SmallCNN, CIFAR-style ResNet-18, TinyTransformer;
* :mod:`.datasets` - offline data (sklearn digits, MNIST, Fashion-MNIST);
* :mod:`.metrics` - BA, ASR, DER;
* :mod:`.demo` - ``qcb-ptq demo``: plant, expose, purify, print the table;
* :mod:`.harness` - what the scripts in ``benchmarks/`` share.
"""
