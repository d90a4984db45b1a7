"""Gate simulation: replay KL-anchored policy-gradient updates on real pretrained weights
and switch each gate on or off in isolation (see README, "Gate simulation").

* :mod:`~gatesim.sim.config`: :class:`CellConfig` (one run), :class:`SweepConfig`
  (a factorial), :func:`demo_sweep`, :func:`load_sweep`.
* :mod:`~gatesim.sim.task`: the softmax policy on a real matrix, and the Gate II geometries.
* :mod:`~gatesim.sim.policies`: the Gate III precision policies.
* :mod:`~gatesim.sim.run`: :func:`run_cell`, one cell as a pure function of its config.
* :mod:`~gatesim.sim.stream`: update streams on disk and :func:`replay`.
* :mod:`~gatesim.sim.sweep`: :func:`ablate` (the executor-driven, resumable sweep) and
  its outputs (results.json, table.md, figures).
"""
from gatesim.sim.config import CellConfig, SweepConfig, demo_sweep, load_sweep, mini_sweep
from gatesim.sim.policies import DEFAULT_POLICIES, sim_policy
from gatesim.sim.run import run_cell
from gatesim.sim.stream import Stream, StreamWriter, replay

__all__ = ["CellConfig", "SweepConfig", "demo_sweep", "load_sweep", "mini_sweep",
           "DEFAULT_POLICIES", "sim_policy", "run_cell", "Stream", "StreamWriter", "replay"]
