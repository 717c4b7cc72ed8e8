"""The registry of purification methods: a method is a typed config plus a per-unit function.

Every method runs inside the same pass (:mod:`qcb_ptq_plugin._pass`): units in execution
order, each unit's inputs read from the partly purified quantized model, the chosen integers
written back before the next unit, one report. A method only decides a unit's integers::

    @register_method("rtn", MethodConfig, summary="round to nearest (no defense)")
    def rtn(unit: Unit, data: UnitData, cfg: MethodConfig) -> UnitResult:
        ...

and ``purify(prepared, float_model, calib, method="rtn")`` runs it through every adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..config import MethodConfig
from ..units import Gram, Unit, UnitData

__all__ = ["Method", "UnitResult", "register_method", "get_method", "available_methods", "DEFAULT_METHOD"]


@dataclass
class UnitResult:
    """What a method returns for one unit.

    Attributes:
        codes: the chosen integers, shaped like the unit's weight.
        gram: statistics of the unit's inputs the report measures errors on (before = round
            to nearest, after = ``codes``); may stay empty where ``errors`` is given.
        pda: "applied", "applied (<variant>)" (e.g. BatchNorm1d batch statistics) or "skipped: <reason>".
        pda_seconds, solve_seconds: where the unit's time went.
        act_scale: a learned scale for ``unit.out_quant`` (written to the simulator before the
            next unit, pinned for convert by the adapter's commit), or None to keep it.
        errors: per-channel (before, after, target energy) of the method's own objective, when
            it is not the Gram's D before the activation; the report then shows these.
    """

    codes: torch.Tensor
    gram: Gram
    pda: str = "skipped: not part of this method"
    pda_seconds: float = 0.0
    solve_seconds: float = 0.0
    act_scale: torch.Tensor | None = None
    errors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


UnitFn = Callable[[Unit, UnitData, MethodConfig], UnitResult]


@dataclass(frozen=True)
class Method:
    """A registered method: its name, config type, per-unit function and implied settings."""

    name: str
    config_type: type[MethodConfig]
    purify_unit: UnitFn
    summary: str = ""
    defaults: Mapping[str, object] = field(default_factory=dict)  # settings this name implies
    check: Callable[[Sequence[Unit], MethodConfig], None] | None = None  # whole-model checks before the pass

    def config(self, config: MethodConfig | None = None, **overrides) -> MethodConfig:
        """``config`` (or a default one) with the settings this method's name implies, then
        ``overrides``; type-checked (``method="lac"`` always means ``pda="off"`` unless overridden)."""
        if config is None:
            return self.config_type(**{**self.defaults, **overrides})
        if not isinstance(config, self.config_type):
            raise TypeError(f"method {self.name!r} takes a {self.config_type.__name__}, got a "
                            f"{type(config).__name__}; pass the method's config or none")
        changes = {**self.defaults, **overrides}
        return config.replace(**changes) if changes else config


_METHODS: dict[str, Method] = {}
DEFAULT_METHOD = "lac_pda"


def register_method(name: str, config_type: type[MethodConfig], *, summary: str = "",
                    check: Callable[[Sequence[Unit], MethodConfig], None] | None = None,
                    **defaults) -> Callable[[UnitFn], UnitFn]:
    """Decorator: register ``fn(unit, data, cfg) -> UnitResult`` under ``name``."""

    def wrap(fn: UnitFn) -> UnitFn:
        if name in _METHODS:
            raise ValueError(f"a method named {name!r} is already registered")
        _METHODS[name] = Method(name, config_type, fn, summary, dict(defaults), check)
        return fn

    return wrap


def get_method(name: str) -> Method:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method={name!r} is unknown; use one of {available_methods()}") from None


def available_methods() -> list[str]:
    return list(_METHODS)


from . import lac, efrap, qvec, rtn  # noqa: E402,F401,I001  (registers "lac_pda", "lac" first, then "rtn", "efrap", "qvec")
from . import flipguard, quantguard  # noqa: E402,F401  (LLM defenses: "flipguard", "quantguard")
