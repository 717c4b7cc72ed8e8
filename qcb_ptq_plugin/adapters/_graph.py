"""What the aten-graph adapters share (PT2E, NNCF's torch.fx backend, exported float models):
the layer ops they recognise, reading get_attr constants, and taps in front of layer inputs."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.fx import GraphModule

from ..units import Unit
from ._common import execution_order

__all__ = ["CONV_OPS", "LINEAR_OP", "Tap", "attr_value", "get_attr", "in_execution_order", "tap_inputs"]

#: aten conv ops -> the float module that rebuilds them; every overload: ``.padding`` takes
#: padding="same"/"valid" (nn.Conv2d(padding="same") exports to it)
CONV_OPS = {torch.ops.aten.conv1d.default: nn.Conv1d, torch.ops.aten.conv1d.padding: nn.Conv1d,
            torch.ops.aten.conv2d.default: nn.Conv2d, torch.ops.aten.conv2d.padding: nn.Conv2d}
LINEAR_OP = torch.ops.aten.linear.default


class Tap(nn.Identity):
    """Marks a quantized layer's input in a simulator graph (the capture hooks it)."""


def get_attr(gm: nn.Module, target: str) -> torch.Tensor:
    """A get_attr target (dotted path to a parameter, buffer or constant)."""
    return functools.reduce(getattr, target.split("."), gm)


def attr_value(gm: GraphModule, node):
    """The constant a get_attr node reads, or None for any other argument."""
    return get_attr(gm, node.target) if getattr(node, "op", None) == "get_attr" else None


def tap_inputs(gm: GraphModule, tap_name: str, nodes) -> Tap:
    """Put the :class:`Tap` called ``tap_name`` (added to ``gm`` the first time) in front of the first
    input of every node in ``nodes`` (a module called at several sites: one tap, every call).
    Recompile ``gm`` afterwards."""
    tap = getattr(gm, tap_name, None)
    if tap is None:
        tap = Tap()
        gm.add_module(tap_name, tap)
    for node in nodes:
        with gm.graph.inserting_before(node):
            node.update_arg(0, gm.graph.call_module(tap_name, (node.args[0],)))
    return tap


def in_execution_order(units: list[Unit], simulator: nn.Module, example: torch.Tensor) -> list[int]:
    """Indices that sort ``units`` by when their layer (tap) runs in ``simulator`` on ``example``."""
    rank = {id(m): i for i, m in enumerate(execution_order(simulator, example))}
    return sorted(range(len(units)), key=lambda i: rank.get(id(units[i].layer), 1 << 30))
