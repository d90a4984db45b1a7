"""What-if policies: storage a tracker replays next to the real parameters.

A what-if is a :class:`gatesim.policy.PrecisionPolicy` with a label (its canonical name, or
the key of a dict of policies). Its storage of each parameter is a
:class:`gatesim.shadow.ShadowWeights`: it starts as a copy of the real weights (rounded to the
policy's format, to nearest) and receives, at every tracked step, the intended update ``u``
through :func:`gatesim.apply_update` with the policy's rounding mode and sum mode; its record
is that call's UpdateStats. The gradients stay those of the real run (the what-if weights
never feed the model), so a what-if answers "what would this storage have kept of the updates
this run intended", not "how would training have gone". Stochastic rounding uses the policy's
seed; parameter ``i`` (in the order the tracker first saw them) uses stream positions from
the total size of the ones before it, and step ``s`` streams ``2s`` / ``2s+1``, so results do
not depend on torch's RNG.
"""
from __future__ import annotations

import torch

from gatesim.policy import PrecisionPolicy
from gatesim.shadow import ShadowWeights

__all__ = ["parse_what_ifs", "what_if_storage", "WhatIf"]

#: The name older code imports for a what-if policy: the one policy type.
WhatIf = PrecisionPolicy


def parse_what_ifs(what_if) -> dict[str, PrecisionPolicy]:
    """Label -> policy from :attr:`TrackOptions.what_if` (a name, a policy, a list of them, a
    dict label -> name or policy, or None). Labels are unique and never ``"own"`` (the real
    parameter's records)."""
    if what_if is None:
        return {}
    if isinstance(what_if, (str, PrecisionPolicy)):
        what_if = [what_if]
    if isinstance(what_if, dict):
        pairs = [(label, PrecisionPolicy.parse(v)) for label, v in what_if.items()]
    else:
        pairs = [(p.name, p) for p in map(PrecisionPolicy.parse, what_if)]
    labels = [label for label, _ in pairs]
    if len(set(labels)) != len(labels) or "own" in labels:
        raise ValueError(f"what-if names must be unique and not 'own', got {labels}")
    return dict(pairs)


def what_if_storage(what_ifs: dict, p: torch.Tensor, offset: int) -> dict[str, ShadowWeights]:
    """Fresh storage of every what-if for parameter ``p`` (stream positions from ``offset``)."""
    return {label: ShadowWeights(pol, p, offset=offset, sum_stats=False)
            for label, pol in what_ifs.items()}
