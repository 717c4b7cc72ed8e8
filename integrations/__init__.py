"""Pipeline glue: purification inside the model-compression pipelines teams already run.

Installed as ``qcb_ptq_plugin.integrations`` (the folder sits at the repository's top level).
One module per pipeline, each thin over :mod:`qcb_ptq_plugin.adapters` and
:func:`qcb_ptq_plugin.purify`, importing its pipeline only when used:

* :mod:`.modelopt` - NVIDIA ModelOpt: our pass as the calibration algorithm ``"qcb_purify"`` of ``mtq.quantize``;
* :mod:`.nncf` - OpenVINO NNCF: one helper call after ``nncf.quantize`` (ONNX and torch FX backends);
* :mod:`.inc` - Intel Neural Compressor 3.x: ``prepare`` -> calibrate -> ``purify`` -> ``convert`` (torchao PT2E);
* :mod:`.olive` - Microsoft Olive: the workflow pass ``QCBPurify`` after ``OnnxStaticQuantization``.

Each is installed with its extra (``pip install -c constraints.txt -e ".[modelopt]"``) and tested
under ``tests/integrations/``. Qualcomm AIMET is left out: ``aimet-torch`` asks for torch 2.15 (a CUDA
build) unless constrained, and does not import here.
"""
