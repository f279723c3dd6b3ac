"""Multi-task balancers: pick one by name with :func:`build_balancer`.

Every balancer is an ``nn.Module`` with ``backward(losses, shared_params, task_params, step,
features)`` (fills ``.grad``, accumulating), ``end_epoch(epoch_losses)`` and
``update(losses_after)``, and says with ``needs_features`` whether it uses ``features``; see
:class:`~turbotrain.train.balancers.base.Balancer`.
"""
from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from turbotrain.models.registry import Registry
from turbotrain.utils.errors import ConfigError

from .aggregators import AGGREGATORS, AggregatorBalancer, aggregator_balancer
from .base import Balancer, GradientCombinationBalancer, LossWeightingBalancer
from .famo import FAMOBalancer
from .gradnorm import GradNormScalingBalancer
from .scalarizers import SCALARIZERS, ScalarizerBalancer, scalarizer_balancer
from .surgery import CAGradBalancer, PCGradBalancer
from .turbotrain import TurboTrainBalancer
from .weighting import DWABalancer, FixedBalancer, SumBalancer, UncertaintyBalancer

BALANCERS = Registry("balancer")
for _name, _cls in {
    "sum": SumBalancer,
    "fixed": FixedBalancer,
    "uncertainty": UncertaintyBalancer,
    "dwa": DWABalancer,
    "pcgrad": PCGradBalancer,
    "cagrad": CAGradBalancer,
    "famo": FAMOBalancer,
    "turbotrain": TurboTrainBalancer,
    "gradnorm_scaling": GradNormScalingBalancer,
    **{name: aggregator_balancer(name) for name in AGGREGATORS},
    **{name: scalarizer_balancer(name) for name in SCALARIZERS},
}.items():
    BALANCERS.register(_name)(_cls)


def build_balancer(name: str, task_names: Sequence[str], **options: Any) -> Balancer:
    """Balancer ``name`` for ``task_names``; ``options`` are the method's keyword arguments
    (e.g. ``weights`` for fixed, ``c`` for cagrad, ``seed`` for pcgrad, ``space`` for every
    gradient-combining method, ``diagnostics`` for all); torchjd aggregators and scalarizers take
    torchjd's own keyword arguments."""
    cls = BALANCERS.get(name)
    try:
        inspect.signature(cls).bind(list(task_names), **options)
    except TypeError as err:  # report bad config keys before training starts, naming the method
        raise ConfigError(f"balancer '{name}': {err}") from err
    return cls(list(task_names), **options)


__all__ = [
    "AGGREGATORS",
    "AggregatorBalancer",
    "BALANCERS",
    "GradNormScalingBalancer",
    "SCALARIZERS",
    "ScalarizerBalancer",
    "Balancer",
    "CAGradBalancer",
    "DWABalancer",
    "FAMOBalancer",
    "FixedBalancer",
    "GradientCombinationBalancer",
    "LossWeightingBalancer",
    "PCGradBalancer",
    "SumBalancer",
    "TurboTrainBalancer",
    "UncertaintyBalancer",
    "build_balancer",
]
