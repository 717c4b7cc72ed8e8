"""Reading unit inputs from torch models: forward hooks, a paused graph run, a float-side cache.

The torch adapters' ``capture(unit, batch) -> (I, I^fp)``: I from the *simulator* (a copy of the
calibrated model whose observers are frozen into fake-quantizers, so its forward computes what
the INT8 model will), I^fp from the float model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from ..units import Unit

__all__ = ["ModuleCapture", "StopForward"]


class StopForward(Exception):
    """Raised by an input tap to end a forward pass once the unit's input is read (BRECQ)."""


@contextmanager
def _input_tap(module: nn.Module, stop_after: int = 1):
    box: list[torch.Tensor] = []

    def hook(_m, args):
        box.append(args[0].detach())
        if len(box) >= stop_after:
            raise StopForward

    handle = module.register_forward_pre_hook(hook)
    try:
        yield box
    finally:
        handle.remove()


class ModuleCapture:
    """Capture for torch models: I at ``unit.layer`` of the simulator, I^fp at ``unit.fp_layer``.

    The float model never changes, so one forward per batch records the inputs of all remaining
    units (as float16, up to ``cache_mb``; each entry is freed when its unit is done) instead
    of one partial forward per unit. The quantized side changes after every unit: a graph
    simulator (FX, PT2E) is stepped node by node and paused in front of each unit, so the whole
    pass costs one forward per batch; other modules are re-run up to the unit each time.
    """

    def __init__(self, simulator: nn.Module, float_model: nn.Module, units: Sequence[Unit] = (),
                 cache_mb: float = 512, fp_points: dict[str, nn.Module] | None = None) -> None:
        self.simulator, self.float_model = simulator, float_model
        self.units = list(units)
        self.fp_points = fp_points or {}  # where I^fp is read, when not at unit.fp_layer itself
        self.cache_bytes = cache_mb * 2**20
        self._cache: dict[tuple[int, int], list[torch.Tensor]] = {}  # one entry per call site
        self._bytes = 0
        self._stepper = _GraphStepper(simulator) if isinstance(simulator, torch.fx.GraphModule) else None
        self._ncalls: dict[int, int] | None = None

    def __call__(self, unit: Unit, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(I, I^fp) at every call site of the unit (a shared module), joined into one batch."""
        point = self._fp_point(unit)
        key = (id(point), id(x))
        if key not in self._cache and unit in self.units:
            self._fill(x, self.units[self.units.index(unit):])
        calls = self._calls(unit, x)  # counted by the first fill, which sees every unit
        i_q = None if self._stepper is None else self._stepper.input_of(unit.layer, x)
        if i_q is None:
            i_q = _unit_inputs(self.simulator, unit.layer, x, calls)
        cached = self._cache.pop(key, None)
        if cached is None:
            i_fp = _unit_inputs(self.float_model, point, x, calls)
        else:
            self._bytes -= sum(t.numel() * t.element_size() for t in cached)
            i_fp = [t.float() for t in cached]
        if len(i_q) != len(i_fp):
            raise RuntimeError(f"'{unit.name}' is called {len(i_fp)} times in the float model but {len(i_q)} times "
                               "in the quantized one; exclude it from quantization")
        return _join(unit, i_q), _join(unit, i_fp)

    def _fp_point(self, unit: Unit) -> nn.Module:
        return self.fp_points.get(unit.name, unit.fp_layer)

    def _calls(self, unit: Unit, x: torch.Tensor) -> int:
        """How often one forward calls the unit's layer (shared modules: more than once)."""
        if self._ncalls is None:
            counts: dict[int, int] = {}
            hook = lambda m, _a: counts.__setitem__(id(m), counts.get(id(m), 0) + 1)  # noqa: E731
            handles = [self._fp_point(u).register_forward_pre_hook(hook) for u in self.units]
            try:
                with torch.no_grad():
                    self.float_model(x)
            finally:
                for h in handles:
                    h.remove()
            self._ncalls = counts
        return max(self._ncalls.get(id(self._fp_point(unit)), 1), 1)

    @torch.no_grad()
    def _fill(self, x: torch.Tensor, units: Sequence[Unit]) -> None:
        counts: dict[int, int] = {}

        def hook(m, args):
            counts[id(m)] = counts.get(id(m), 0) + 1
            key = (id(m), id(x))
            t = args[0].detach()
            t = t.dequantize() if t.is_quantized else t
            if key in full or self._bytes + t.numel() * 2 > self.cache_bytes:
                if key not in full:  # all calls of a layer or none of them
                    self._bytes -= sum(c.numel() * c.element_size() for c in self._cache.pop(key, []))
                full.add(key)
                return
            small = t.half() if t.abs().max() < 6e4 else t.float()
            self._cache.setdefault(key, []).append(small)
            self._bytes += small.numel() * small.element_size()

        full: set = set(self._cache)  # entries of earlier batches' fills stay as they are
        handles = [self._fp_point(u).register_forward_pre_hook(hook) for u in units]
        try:
            self.float_model(x)
        finally:
            for h in handles:
                h.remove()
        if self._ncalls is None and len(units) == len(self.units):  # a forward over every unit: its call counts
            self._ncalls = counts


def _join(unit: Unit, parts: list[torch.Tensor]) -> torch.Tensor:
    """Inputs of a layer's call sites as one batch: rows of (-1, K) for Linear, stacked maps for convs."""
    if len(parts) == 1:
        return parts[0]
    if unit.op.kind == "linear":
        return torch.cat([p.reshape(-1, p.shape[-1]) for p in parts])  # (sum of N*..., K)
    if any(p.shape[1:] != parts[0].shape[1:] for p in parts):
        raise NotImplementedError(f"'{unit.name}' is shared by call sites with different input shapes "
                                  f"{[tuple(p.shape) for p in parts]}; exclude it from quantization")
    return torch.cat(parts)


class _GraphStepper:
    """Runs a GraphModule forward node by node, one paused run per batch.

    ``input_of(layer, x)`` advances the batch's run to the node that calls ``layer`` and reads
    its input there; the node itself runs later, after the unit's new weight is written, so a
    sequential pass over all units costs one forward. Nodes that depend on parameters only
    (get_attr, weight fake-quantizers) are recomputed at each use, so weight writes are seen.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.interp = torch.fx.Interpreter(gm, garbage_collect_values=False)
        self.nodes = list(gm.graph.nodes)
        self.sites: dict[int, list[int]] = {}  # id(module) -> indices of the nodes that call it
        for i, n in enumerate(self.nodes):
            if n.op == "call_module":
                for m in gm.get_submodule(n.target).modules():
                    self.sites.setdefault(id(m), []).append(i)
        self.static: set = set()
        for n in self.nodes:
            if n.op == "get_attr" or (n.op.startswith("call_") and all(a in self.static for a in n.all_input_nodes)):
                self.static.add(n)
        self.last_use: dict = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                self.last_use[a] = i
        self.runs: dict[int, tuple[torch.Tensor, int, dict]] = {}  # id(x) -> (x kept alive, next node, env)

    def _static_value(self, node, memo: dict):
        if node not in memo:
            for a in node.all_input_nodes:
                self._static_value(a, memo)
            self.interp.env = memo
            memo[node] = self.interp.run_node(node)
        return memo[node]

    @contextmanager
    def _inputs_ready(self, node, env: dict):
        """env with fresh values of the node's parameter-only inputs, as the interpreter's env."""
        memo: dict = {}
        fresh = [a for a in node.all_input_nodes if a in self.static]
        for a in fresh:
            self._static_value(a, memo)
        env.update({a: memo[a] for a in fresh})
        self.interp.env = env
        try:
            yield
        finally:
            for a in fresh:
                env.pop(a, None)

    @torch.no_grad()
    def input_of(self, layer: nn.Module, x: torch.Tensor) -> list[torch.Tensor] | None:
        """The layer's input at each node that calls it; the run stays paused at the first one.

        Later call sites of a shared layer are read by running on from the first (the layer
        itself still with its old weight), then the run goes back to the first site.
        """
        sites = self.sites.get(id(layer))
        if not sites:
            return None
        inputs = [self._read(layer, x, sites[0])]
        if len(sites) > 1:
            _, pos, env = self.runs[id(x)]
            paused = (x, pos, dict(env))
            inputs += [self._read(layer, x, i) for i in sites[1:]]
            self.runs[id(x)] = paused
        return inputs

    def _read(self, layer: nn.Module, x: torch.Tensor, target: int) -> torch.Tensor:
        _, pos, env = self.runs.get(id(x), (x, 0, {}))
        if pos > target:  # asked for an earlier layer: start this batch again
            pos, env = 0, {}
        self.interp.args_iter = iter(self.interp.graph.process_inputs(x) if pos == 0 else ())
        for i in range(pos, target):
            node = self.nodes[i]
            if node in self.static or node.op == "output":
                continue
            with self._inputs_ready(node, env):
                env[node] = self.interp.run_node(node)
            for a in node.all_input_nodes:
                if self.last_use.get(a) == i and a in env:
                    del env[a]
        self.runs[id(x)] = (x, target, env)
        node = self.nodes[target]
        with self._inputs_ready(node, env):
            call_args, call_kwargs = self.interp.fetch_args_kwargs_from_env(node)
        inp = _tapped_input(layer, lambda: self.interp.fetch_attr(node.target)(*call_args, **call_kwargs))
        if inp is None:
            raise RuntimeError(f"node {node.name} did not call {type(layer).__name__}")
        return inp


def _tapped_input(module: nn.Module, forward: Callable[[], object]) -> torch.Tensor | None:
    """The (dequantized) input ``module`` receives when ``forward()`` runs, which stops there; None if never."""
    inputs = _tapped_inputs(module, forward, 1)
    return inputs[0] if inputs else None


def _tapped_inputs(module: nn.Module, forward: Callable[[], object], calls: int) -> list[torch.Tensor]:
    """The (dequantized) inputs of ``module``'s first ``calls`` calls when ``forward()`` runs."""
    with _input_tap(module, calls) as box:
        try:
            forward()
        except StopForward:
            pass
    return [inp.dequantize() if inp.is_quantized else inp.float() for inp in box]


@torch.no_grad()
def _unit_inputs(model: nn.Module, module: nn.Module, x: torch.Tensor, calls: int = 1) -> list[torch.Tensor]:
    inputs = _tapped_inputs(module, lambda: model(x), calls)
    if not inputs:
        raise RuntimeError(f"the forward pass never reached {type(module).__name__}; is the layer used in forward()?")
    return inputs
