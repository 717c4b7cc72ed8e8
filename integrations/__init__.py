"""Pipeline glue: purification inside the model-compression pipelines teams already run.

Installed as ``qcb_ptq_plugin.integrations`` (the folder sits at the repository's top level).
One module per pipeline, each thin over :mod:`qcb_ptq_plugin.adapters` and
:func:`qcb_ptq_plugin.purify`, importing its pipeline only when used:

* NVIDIA ModelOpt - our pass as a calibration algorithm of ``mtq.quantize``;
* OpenVINO NNCF - one helper call after ``nncf.quantize`` (torch FX and ONNX backends);
* Microsoft Olive - a ``Pass`` after ``OnnxStaticQuantization`` in a workflow;
* Intel Neural Compressor 3.x - ``prepare`` -> calibrate -> ``purify`` -> ``convert`` (torchao PT2E).

No module is here yet: each arrives with its tests under ``tests/integrations/``.
"""
