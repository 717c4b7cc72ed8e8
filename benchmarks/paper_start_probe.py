"""Does the paper preset's Adam reach its own objective's minimum from the release's start?

    OMP_NUM_THREADS=1 python benchmarks/paper_start_probe.py ARCH BITS SEED START

START is ``rtn`` (the release's offset 0) or ``gram`` (the current preset: the fast solver's
integers). Runs ``PurifyConfig.paper(adam_start=START)`` through ``paper_solver_probe.py`` and
prints, per unit, the preset's objective D_a (after the activation and output quantizer, with
the calibrated scale) at round to nearest, at the Gram integers on the same cached inputs, and at
Adam's kept iterate (stderr, one JSON line each); then the model's BA / ASR line.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import qcb_ptq_plugin.methods.lac as lac  # noqa: E402
from qcb_ptq_plugin.config import PurifyConfig  # noqa: E402
from qcb_ptq_plugin.units import Gram  # noqa: E402


def main() -> None:
    start = sys.argv.pop(4)
    solve, paper = lac._solve_adam, PurifyConfig.paper.__func__

    def probed(inputs, targets, unit, cfg, start=None):
        g = Gram()
        g.add_batch(unit, inputs, targets)
        w = unit.weight.detach().float()
        q_gram = unit.op.ungrouped(lac._solve_gram(g, unit.op.grouped(w), unit.grid, PurifyConfig(progress=False)),
                                   w.shape)
        out = solve(inputs, targets, unit, cfg, start=start)
        obj = lac._UnitObjective(unit, targets)
        a0 = None if obj.fq is None else obj.fq.scale.detach().float().reshape(1)
        d = lambda q: obj.channels(inputs, unit.grid.dequantize(q), a0).sum().item()  # noqa: E731
        print(json.dumps(dict(unit=unit.name, rtn=d(unit.grid.quantize(w)), gram=d(q_gram), adam_kept=d(out[0]),
                              differ_from_gram=int((out[0] != q_gram).sum()))), file=sys.stderr)
        return out

    lac._solve_adam = probed
    PurifyConfig.paper = classmethod(lambda cls, **o: paper(cls, **{"adam_start": start, **o}))
    sys.argv = [str(HERE / "paper_solver_probe.py"), *sys.argv[1:4], "paper"]
    runpy.run_path(sys.argv[0], run_name="__main__")


if __name__ == "__main__":
    main()
