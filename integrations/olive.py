"""Microsoft Olive: purification as a workflow pass after ``OnnxStaticQuantization``.

In a workflow JSON, ``QCBPurify`` follows the quantization pass and reads the same data config::

    "passes": {
        "quantize": {"type": "OnnxStaticQuantization", "data_config": "calibration"},
        "purify":   {"type": "QCBPurify", "data_config": "calibration", "float_model": "model.fp32.onnx"}
    }

Olive finds pass types in a *package config*, and a package config given to Olive replaces its
default one (``OnnxStaticQuantization`` would then be unknown). :func:`package_config` is Olive's
default package config with ``QCBPurify`` added; run the workflow with it::

    from qcb_ptq_plugin.integrations import olive as qcb_olive
    olive.workflows.run("workflow.json", package_config=qcb_olive.package_config())

or save it for the CLI: ``python -m qcb_ptq_plugin.integrations.olive olive_packages.json``, then
``olive run --config workflow.json --package-config olive_packages.json``.

The pass receives the QDQ model ORT wrote and purifies it with :mod:`qcb_ptq_plugin.adapters.ort`
(as :func:`qcb_ptq_plugin.onnx.quantize_static` does): each Conv/Gemm/MatMul is a unit on ORT's
own scales, I^fp comes from ``float_model`` (the FP32 ONNX model the quantization pass received,
matched by node name), and only the integer weight initializers change. The output model is a
folder with ``model.onnx`` and ``qcb_purify_report.json`` (and ``qcb_purify_codes.npz``, the chosen
integers per unit, with ``save_codes``).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Union

import numpy as np

from qcb_ptq_plugin.methods import DEFAULT_METHOD
from qcb_ptq_plugin.onnx._feeds import read_feeds

from ._qdq import purify_qdq

try:
    import onnx
    from olive.data.config import DataConfig
    from olive.hardware.accelerator import AcceleratorSpec
    from olive.model import ONNXModelHandler
    from olive.model.utils import resolve_onnx_path
    from olive.package_config import OlivePackageConfig
    from olive.passes import Pass
    from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
    from olive.passes.onnx.quantization import get_calibration_dataloader
    from olive.passes.pass_config import BasePassConfig, ParamCategory, PassConfigParam
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("the Olive integration needs olive-ai: pip install -c constraints.txt -e '.[olive]' "
                      f"({e})") from e

log = logging.getLogger(__name__)

__all__ = ["PASS_NAME", "QCBPurify", "package_config", "write_package_config", "REPORT_FILE", "CODES_FILE"]

#: the pass type to put in a workflow JSON
PASS_NAME = "QCBPurify"
REPORT_FILE = "qcb_purify_report.json"
CODES_FILE = "qcb_purify_codes.npz"


def package_config() -> dict:
    """Olive's default package config (every built-in pass) with ``QCBPurify`` added."""
    config = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    config["passes"][PASS_NAME] = {
        "module_path": f"qcb_ptq_plugin.integrations.olive.{PASS_NAME}",  # not __name__: "__main__" under -m
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": ["*"],
        "supported_algorithms": ["*"],
        "supported_quantization_encodings": ["qdq"],
        "dataset": "dataset_required",
    }
    return config


def write_package_config(path: str | Path) -> Path:
    """Save :func:`package_config` as JSON (for ``olive run --package-config``)."""
    path = Path(path)
    path.write_text(json.dumps(package_config(), indent=2))
    return path


def _weight_range(qmodel: onnx.ModelProto) -> tuple[int, int]:
    """ORT's range for the weight integers it wrote. Unsigned types: the full range. Signed types:
    symmetric narrow (its ``WeightSymmetric`` default, -127..127 at 8 bits), unless the model shows
    asymmetric weights (``WeightSymmetric=False``: a nonzero weight zero point, or the type's
    minimum among the integers), then the full range (-128..127)."""
    from onnx import numpy_helper

    inits = {i.name: i for i in qmodel.graph.initializer}
    weights = [n for n in qmodel.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
               and inits[n.input[0]].data_type in _INT_TYPES]
    if not weights:
        raise ValueError("the model has no integer weight initializer: place QCBPurify after OnnxStaticQuantization "
                         "(quant_format QDQ)")
    bits, signed = _INT_TYPES[inits[weights[0].input[0]].data_type]
    if not signed:
        return 0, 2**bits - 1
    for n in weights:
        zp = numpy_helper.to_array(inits[n.input[2]]) if len(n.input) > 2 and n.input[2] in inits else 0
        if np.any(zp != 0) or numpy_helper.to_array(inits[n.input[0]]).min() == -(2 ** (bits - 1)):
            return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1


_INT_TYPES = {onnx.TensorProto.INT8: (8, True), onnx.TensorProto.UINT8: (8, False), onnx.TensorProto.INT4: (4, True),
              onnx.TensorProto.UINT4: (4, False), onnx.TensorProto.INT16: (16, True),
              onnx.TensorProto.UINT16: (16, False)}


class QCBPurify(Pass):
    """Purify the QDQ model of ``OnnxStaticQuantization`` (default LAC+PDA) on ORT's weight grid."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        return {
            "float_model": PassConfigParam(
                type_=Union[str, Path], required=True, category=ParamCategory.PATH,
                description="The FP32 .onnx model OnnxStaticQuantization received (node names must match)."),
            "data_config": PassConfigParam(
                type_=Union[DataConfig, dict], required=True,
                description="Calibration data: the data config OnnxStaticQuantization used."),
            "method": PassConfigParam(type_=str, default_value=DEFAULT_METHOD,
                                      description="A registered qcb_ptq_plugin method (lac_pda, lac)."),
            "options": PassConfigParam(type_=dict, default_value=None,
                                       description="Fields of the method's config, e.g. {'num_samples': 512}."),
            "weight_range": PassConfigParam(
                type_=list, default_value=None,
                description="[qmin, qmax] of the weight integers; default: ORT's for the integer type it wrote "
                            "(-127..127 for int8 with WeightSymmetric)."),
            "save_codes": PassConfigParam(type_=bool, default_value=False,
                                          description=f"Also write the chosen integers per unit ({CODES_FILE})."),
            **get_external_data_config(),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: type[BasePassConfig],
                        output_model_path: str) -> ONNXModelHandler:
        qmodel = onnx.load(model.model_path)
        fp = onnx.load(str(config.float_model))
        feeds = read_feeds(get_calibration_dataloader(config, model.model_path, model.io_config), fp)
        weight_range = tuple(config.weight_range) if config.weight_range else _weight_range(qmodel)
        options = {"progress": False, **(config.options or {})}
        report = purify_qdq(fp, qmodel, feeds, weight_range, None, config.method, options, "olive",
                            "float_model must be the FP32 model OnnxStaticQuantization received, and QCBPurify "
                            "must follow it")
        output_model_path = resolve_onnx_path(output_model_path, Path(model.model_path).name)
        out = model_proto_to_olive_model(qmodel, output_model_path, config, force_model_dir=True)
        folder = Path(output_model_path).parent
        files = [folder / REPORT_FILE]
        report.save_json(files[0])
        if config.save_codes:
            files.append(folder / CODES_FILE)
            np.savez(files[-1], **{name: q.numpy() for name, q in report.codes.items()})
        attributes = dict(model.model_attributes or {})
        attributes["additional_files"] = [*attributes.get("additional_files", []), *map(str, files)]
        out.model_attributes = attributes
        log.info("QCBPurify: %d units purified in %.1fs", len(report.units), report.seconds)
        return out


if __name__ == "__main__":  # python -m qcb_ptq_plugin.integrations.olive PATH
    if len(sys.argv) != 2:
        sys.exit("usage: python -m qcb_ptq_plugin.integrations.olive olive_packages.json")
    print(write_package_config(sys.argv[1]))
