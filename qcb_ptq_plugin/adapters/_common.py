"""Pieces every PyTorch adapter shares: frozen observers, float-model matching, BN lookup."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.ao.quantization.observer import ObserverBase, PlaceholderObserver

from ..units import Capture, Unit, Unsupported
from ._capture import StopForward

log = logging.getLogger(__name__)

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


@dataclass
class Plan:
    """What an adapter hands to the algorithm, and how to write the result back."""

    units: list[Unit]
    capture: Capture
    commit: Callable[[list[torch.Tensor]], None]
    unsupported: list[Unsupported] = field(default_factory=list)  # quantized layers no method can purify
    input_range: tuple[float, float] | None = None  # what the observer at the model input recorded


class FrozenQuant(nn.Module):
    """An observer turned into a fixed fake-quantizer with the qparams convert will use."""

    def __init__(self, observer: nn.Module, name: str = "") -> None:
        super().__init__()
        self.identity = (observer.dtype in (torch.float, torch.float16, torch.bfloat16)
                         or isinstance(observer, PlaceholderObserver) or getattr(observer, "is_dynamic", False))
        if not self.identity:
            mn, mx = getattr(observer, "min_val", None), getattr(observer, "max_val", None)
            if mn is not None and (mn.numel() == 0 or not torch.isfinite(mn).all() or not torch.isfinite(mx).all()):
                raise RuntimeError(
                    f"observer {name or type(observer).__name__} has not seen any data: run calibration "
                    "(`for x in calib: prepared(x)`) before purify")
            scale, zp = observer.calculate_qparams()
            self.register_buffer("scale", scale.detach().float())
            self.register_buffer("zero_point", zp.detach().to(torch.int32))
            self.qmin, self.qmax = int(observer.quant_min), int(observer.quant_max)
            self.axis = getattr(observer, "ch_axis", -1) if self.scale.numel() > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        if self.axis is None:
            return torch.fake_quantize_per_tensor_affine(x, self.scale.reshape(()), self.zero_point.reshape(()),
                                                         self.qmin, self.qmax)
        return torch.fake_quantize_per_channel_affine(x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)


def weight_writer(param: torch.Tensor) -> Callable[[torch.Tensor], None]:
    """A unit's ``write``: copy the chosen (fake-quantized) weight into ``param`` in place."""

    def write(w: torch.Tensor) -> None:
        with torch.no_grad():
            param.copy_(w)

    return write


def torchao_observer_base() -> type | None:
    """torchao's observer base class (PT2E has its own copy of torch.ao's), or None without torchao.

    Imported only when asked: ``import qcb_ptq_plugin`` must not load torchao.
    """
    try:
        from torchao.quantization.pt2e.observer import ObserverBase as TorchaoObserverBase
    except ImportError:
        return None
    return TorchaoObserverBase


def observer_types() -> tuple[type, ...]:
    """torch.ao's observer base and, when installed, torchao's."""
    base = torchao_observer_base()
    return (ObserverBase,) if base is None else (ObserverBase, base)


def is_aten_graph(model: nn.Module) -> bool:
    """A GraphModule of aten ops: what torch.export produces (and PT2E prepares)."""
    return isinstance(model, torch.fx.GraphModule) and any(
        n.op == "call_function" and getattr(n.target, "namespace", None) == "aten" for n in model.graph.nodes)


def freeze_observers(model: nn.Module) -> int:
    """Replace every observer submodule by a FrozenQuant (in place); returns how many."""
    kinds = observer_types()
    found = [(n, m) for n, m in model.named_modules(remove_duplicate=False) if isinstance(m, kinds)]
    frozen: dict[int, FrozenQuant] = {}  # an observer shared under several names stays shared
    for name, obs in found:
        parent, _, attr = name.rpartition(".")
        if id(obs) not in frozen:
            frozen[id(obs)] = FrozenQuant(obs, name)
        setattr(model.get_submodule(parent) if parent else model, attr, frozen[id(obs)])
    return len(frozen)


def execution_order(model: nn.Module, x: torch.Tensor, leaves_only: bool = True) -> list[nn.Module]:
    """Modules (by default only leaves) in the order a forward pass first calls them."""
    order: list[nn.Module] = []
    seen: set[int] = set()

    def hook(m, _args):
        if id(m) not in seen:
            seen.add(id(m))
            order.append(m)

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if not leaves_only or not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    except StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return order


def following_bn(fp_layer: nn.Module, order: list[nn.Module]) -> nn.Module | None:
    """The BatchNorm a float Conv/Linear feeds: the next module called, if it is a BN of its width."""
    try:
        nxt = order[order.index(fp_layer) + 1]
    except (ValueError, IndexError):
        return None
    out = fp_layer.out_channels if isinstance(fp_layer, nn.modules.conv._ConvNd) else fp_layer.weight.shape[0]
    return nxt if isinstance(nxt, _BN) and nxt.num_features == out and nxt.track_running_stats else None


def bn_fold_factor(bn: nn.Module) -> torch.Tensor:
    """f with folded W = f * W per output channel: gamma / sqrt(running_var + eps)."""
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    return bn.weight.detach() * inv_std if bn.affine else inv_std


def fold_bn(w: torch.Tensor, b: torch.Tensor | None, bn: nn.Module,
            transposed_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv/Linear + eval BN -> one layer (what FX/PT2E prepare does). ``transposed_groups``: the
    groups of a ConvTranspose, whose weight (Cin, Cout/groups, k...) has output channels on axis 1."""
    f = bn_fold_factor(bn)
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(f)
    b0 = torch.zeros_like(bn.running_mean) if b is None else b.detach()
    if transposed_groups is None:
        w = w.detach() * f.reshape(-1, *([1] * (w.dim() - 1)))
    else:
        g = transposed_groups
        fw = f.reshape(g, 1, -1, *([1] * (w.dim() - 2)))
        w = (w.detach().reshape(g, w.shape[0] // g, *w.shape[1:]) * fw).reshape(w.shape)
    return w, (b0 - bn.running_mean) * f + shift


def match_float_layer(name: str, prepared_weight: torch.Tensor, fp_layer: nn.Module,
                      bn: nn.Module | None) -> nn.Module | None:
    """Check the float layer (+BN) really is the prepared layer; returns the BN if it was folded.

    Raises a ValueError naming the unit when the float model does not match the prepared one.
    """
    w_fp = getattr(fp_layer, "weight", None)
    if not isinstance(w_fp, torch.Tensor) or w_fp.shape != prepared_weight.shape:
        raise ValueError(
            f"float model does not match the prepared model at '{name}': prepared weight "
            f"{tuple(prepared_weight.shape)}, float layer {type(fp_layer).__name__} "
            f"{tuple(w_fp.shape) if isinstance(w_fp, torch.Tensor) else 'without weight'}. Pass the float model "
            "you prepared (before fusion), not another one")

    def close(a, b):
        return (a - b).norm() <= 1e-4 * b.norm() + 1e-12

    if close(prepared_weight, w_fp.detach()):
        return bn  # BN not folded (or absent); PDA can still read it if it follows
    groups_t = fp_layer.groups if isinstance(fp_layer, nn.modules.conv._ConvTransposeNd) else None
    if bn is not None and close(prepared_weight, fold_bn(w_fp, getattr(fp_layer, "bias", None), bn, groups_t)[0]):
        return bn
    raise ValueError(
        f"float model does not match the prepared model at '{name}': its weights differ "
        f"{'from the float layer and from the layer with its BatchNorm folded' if bn is not None else 'from the float layer'}. "
        "Pass the same float model (same weights, eval-mode BN) that was given to prepare")


def input_observer_range(prepared: nn.Module) -> tuple[float, float] | None:
    """(min, max) recorded by the observer that quantizes the model input, or None if not found.

    Graphs (FX, PT2E): the observer called on the first placeholder; eager: the QuantStub's.
    """
    kinds = observer_types()
    obs = None
    if isinstance(prepared, torch.fx.GraphModule):
        for node in prepared.graph.nodes:
            if node.op == "placeholder":
                users = [u for u in node.users if u.op == "call_module"
                         and isinstance(prepared.get_submodule(u.target), kinds)]
                obs = prepared.get_submodule(users[0].target) if users else None
                break
    else:
        obs = next((m.activation_post_process for m in prepared.modules()
                    if type(m).__name__ == "QuantStub" and isinstance(getattr(m, "activation_post_process", None), kinds)),
                   None)
    mn, mx = getattr(obs, "min_val", None), getattr(obs, "max_val", None)
    if not isinstance(mn, torch.Tensor) or mn.numel() == 0 or not torch.isfinite(mn).all():
        return None
    return float(mn.min()), float(mx.max())


def output_observer(prepared: nn.Module, node_name: str) -> tuple[str | None, bool]:
    """(submodule path of the observer that quantizes the output of node ``node_name``, whether a
    ReLU sits between them); (None, False) if no observer directly follows the layer or its ReLU.
    Eager models (no graph): ``<node_name>.activation_post_process``, the module's output observer."""
    kinds = observer_types()
    if not isinstance(prepared, torch.fx.GraphModule):
        path = f"{node_name}.activation_post_process"
        try:
            return (path if isinstance(prepared.get_submodule(path), kinds) else None), False
        except AttributeError:
            return None, False
    node = next((n for n in prepared.graph.nodes if n.name == node_name or (n.op == "call_module"
                                                                             and n.target == node_name)), None)
    relu_fns = (torch.relu, torch.nn.functional.relu, torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
    relu = False
    while node is not None and len(node.users) == 1:
        (node,) = node.users
        if not relu and ((node.op == "call_function" and node.target in relu_fns)
                         or (node.op == "call_module" and type(prepared.get_submodule(node.target)) is nn.ReLU)):
            relu = True  # FX quantizes Linear + ReLU as one LinearReLU at convert
            continue
        if node.op == "call_module" and isinstance(prepared.get_submodule(node.target), kinds):
            return node.target, relu
        break
    return None, False


def pin_activation_scales(prepared: nn.Module, pins: dict[str, nn.Module]) -> int:
    """Replace each observer ``prepared.<path>`` whose calibrated scale differs from that of its
    simulator twin (a :class:`FrozenQuant` in ``pins``, scale learned by a method) by a
    ``FixedQParamsObserver`` holding the learned scale and the calibrated zero point, so convert
    quantizes that activation with it. Returns how many were pinned."""
    pinned = 0
    for path, frozen in pins.items():
        if frozen.identity:
            continue
        obs = prepared.get_submodule(path)
        if torch.equal(obs.calculate_qparams()[0].float().reshape(-1), frozen.scale.reshape(-1)):
            continue
        base = torchao_observer_base()
        if base is not None and isinstance(obs, base):
            from torchao.quantization.pt2e.observer import FixedQParamsObserver
        else:
            from torch.ao.quantization.observer import FixedQParamsObserver
        new = FixedQParamsObserver(scale=float(frozen.scale.reshape(())), zero_point=int(frozen.zero_point.reshape(())),
                                   dtype=obs.dtype, qscheme=obs.qscheme, quant_min=obs.quant_min,
                                   quant_max=obs.quant_max)
        parent, _, attr = path.rpartition(".")
        setattr(prepared.get_submodule(parent) if parent else prepared, attr, new)
        pinned += 1
    if pinned:
        log.info("pinned %d learned activation scale(s) for convert", pinned)
    return pinned
