"""Typed configuration of :func:`qcb_ptq_plugin.purify`.

:class:`MethodConfig` holds what every method shares (batching, sampling, progress); each
method adds its own settings in a subclass. :class:`PurifyConfig` is the default method's,
LAC+PDA.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from enum import Enum

__all__ = ["MethodConfig", "PurifyConfig", "Solver", "PDAMode"]


class Solver(str, Enum):
    """How LAC searches the integer weights of a unit."""

    #: Fast default. Accumulates H = I·Iᵀ and C = T·Iᵀ over the calibration set, jumps to the
    #: least-squares optimum, rounds it with GPTQ error feedback and polishes the integers with
    #: exact coordinate descent on the same quadratic (early stop when no integer moves).
    GRAM = "gram"
    #: The paper's release: learn an additive offset on the weight with Adam through a
    #: straight-through rounding, one random cached minibatch per step.
    ADAM = "adam"


class PDAMode(str, Enum):
    """Poisoned distribution approximation before each unit's LAC."""

    AUTO = "auto"  #: where the unit feeds a BatchNorm; skipped with a logged reason elsewhere
    ON = "on"  #: like AUTO, but an error if no unit of the model has a BatchNorm
    OFF = "off"  #: LAC only


@dataclass
class MethodConfig:
    """Settings every method shares.

    Attributes:
        batch_size: samples per forward pass; bigger is faster on CPU.
        num_samples: use at most this many calibration samples (None: all of them).
        seed: seeds any random sampling a method does.
        progress: show a tqdm bar over units.
        skip_unsupported: leave quantized layers no method can handle at round-to-nearest, with
            a warning per layer and their names in the report. By default such a layer is an
            error naming it and the way out (exclude it from quantization).
    """

    batch_size: int = 128
    num_samples: int | None = None
    seed: int = 0
    progress: bool = True
    skip_unsupported: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be positive")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples={self.num_samples} must be positive or None")

    def replace(self, **overrides) -> MethodConfig:
        return replace(self, **overrides)

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, Enum) else v) for k, v in asdict(self).items()}


@dataclass
class PurifyConfig(MethodConfig):
    """Settings of LAC+PDA. Defaults are the fast CPU solver; :meth:`paper` reproduces the paper.

    Attributes:
        solver: :class:`Solver`; ``"gram"`` (default, seconds per layer) or ``"adam"`` (paper).
        cd_passes: gram only: coordinate-descent passes after the GPTQ rounding (stops early
            once no integer changes). Default 1: 4 passes gave the same defense quality
            (benchmarks/results/approx.md).
        adam_steps: adam only: optimisation steps per unit (paper: 10000).
        lr: adam only: learning rate of the weight offset, in grid steps (LSBs) per step,
            cosine-annealed to 0 over ``adam_steps``. The release's 1e-3 is in weight units
            (constant): about 0.01-0.1 LSB at W4 but about one LSB at W8; the default and the
            paper preset use 1e-3 LSB at every bit width (0.01 LSB made the iterate wander above round to nearest
            within 100 steps on a W4 SmallCNN; benchmarks/results/paper_vs_fast.md).
        adam_batch_size: adam only: random minibatch of cached unit inputs (paper: 32).
        adam_start: adam only: where the integers start. ``"gram"`` (default): the fast
            solver's integers on the same inputs (closed form, seconds), scored as a candidate
            like every checkpoint. ``"rtn"``: round to nearest (the release's offset 0). From
            round to nearest, 10000 steps end 1.2-3.7x above the Gram integers on the adam
            objective itself and leave about 1 point more W4 ASR
            (benchmarks/results/paper_vs_fast.md).
        act_lr: adam only: Adam learning rate of the per-tensor scale of the activation quantizer
            at each unit's output (LSQ gradient, cosine-annealed to 0 over ``adam_steps``), in
            scale units as released (4e-5); 0 (default) keeps the calibrated scale. A learned
            scale replaces the user's observer for convert (a ``FixedQParamsObserver``).
        damp: gram only: ridge added to H as a fraction of its mean diagonal; pulls directions
            the calibration data never excites towards the float weight. Must be > 0: with 0 an
            input column that is never excited (H_kk = 0) leaves its integers undetermined.
        gram_positions: gram only: use at most this many output positions (samples x spatial
            locations) per batch for the statistics H, C, drawn at random (seeded by ``seed``);
            None: all of them. The default 32768 only bites on early, high-resolution convs
            (a quarter of ResNet-18's first stage at batch 128, CIFAR size); a quarter of the
            positions kept defense quality within noise (benchmarks/results/approx.md).
        pda: :class:`PDAMode`; ``"auto"`` (default), ``"on"`` or ``"off"``.
        gamma: l_inf bound of the PDA input perturbation (paper: 1e-3; 1e-4..1e-2 all work).
        pda_steps: signed-gradient PGD steps of PDA; the step halves half-way (paper: 500).
            Default 1: one signed step of size gamma, within noise of 5 and of 500 on planted
            models (benchmarks/results/approx.md, paper_vs_fast.md).
        pda_step_size: PGD step (paper and default: 1e-3 = gamma).

    Shared settings (``batch_size``, ``num_samples``, ``seed``, ``progress``): :class:`MethodConfig`.
    """

    solver: Solver = Solver.GRAM
    cd_passes: int = 1
    adam_steps: int = 10000
    lr: float = 1e-3
    adam_batch_size: int = 32
    adam_start: str = "gram"
    act_lr: float = 0.0
    damp: float = 0.01
    gram_positions: int | None = 32768
    pda: PDAMode = PDAMode.AUTO
    gamma: float = 1e-3
    pda_steps: int = 1
    pda_step_size: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            self.solver = Solver(self.solver)
        except ValueError:
            raise ValueError(f"solver={self.solver!r} is unknown; use one of {[s.value for s in Solver]}") from None
        try:
            self.pda = PDAMode(self.pda)
        except ValueError:
            raise ValueError(f"pda={self.pda!r} is unknown; use one of {[m.value for m in PDAMode]}") from None
        if self.adam_start not in ("gram", "rtn"):
            raise ValueError(f"adam_start={self.adam_start!r} is unknown; use 'gram' (the fast solver's integers) or "
                             "'rtn' (round to nearest, as released)")
        if self.adam_batch_size < 1:
            raise ValueError(f"adam_batch_size={self.adam_batch_size} must be positive")
        for name in ("pda_steps", "cd_passes", "adam_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("lr", "act_lr", "gamma", "pda_step_size", "damp"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.gram_positions is not None and self.gram_positions < 1:
            raise ValueError(f"gram_positions={self.gram_positions} must be positive or None")
        if not self.damp > 0:
            raise ValueError(f"damp={self.damp} must be > 0 (e.g. 0.01): input columns the calibration data never "
                             "excites (H_kk = 0) would get arbitrary integers; damp pulls them towards the float weight")

    @classmethod
    def paper(cls, **overrides) -> PurifyConfig:
        """The release's schedule (GPU-scale: 10000 Adam steps per unit, PDA 500 PGD steps).

        As released (AntigoneRandy/QCB-LACPDA, see ``DEFENSES.md``): Adam on an additive weight
        offset through straight-through rounding, 10000 steps of one random cached batch of 32;
        the activation quantizer at each unit's output learns its scale (LSQ, Adam 4e-5, cosine);
        the loss is the unit's output reconstruction after the activation and that quantizer
        (optimised and reported: one objective); PDA with gamma = 1e-3, 500 signed steps of
        gamma, halved at step 250. Differences, on purpose: lr is in grid steps (1e-3 LSB; the
        release's 1e-3 is in weight units, about one LSB per step at W8) and cosine-annealed like
        the scale's (the release keeps it constant); Adam starts from the fast solver's integers
        (``adam_start="gram"``), not from round to nearest (``"rtn"``, the release's start, from
        which 10000 steps did not reach the objective's minimum: they ended 1.2-3.7x above the
        Gram integers on this same objective, on every unit of two W4 models); the best scored
        iterate is kept (never worse than round-to-nearest or the start). Learned activation scales replace
        the calibrated observers at convert; weight scales stay as calibrated, as released.
        """
        base = dict(solver=Solver.ADAM, adam_steps=10000, lr=1e-3, adam_batch_size=32, adam_start="gram",
                    act_lr=4e-5, gamma=1e-3, pda_steps=500, pda_step_size=1e-3)
        return cls(**{**base, **overrides})
