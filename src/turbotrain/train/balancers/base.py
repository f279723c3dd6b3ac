"""Balancer contract and the gradient plumbing shared by every multi-task balancing method.

A balancer turns task losses into ``.grad`` of the parameters. It knows nothing about what the
tasks are: it sees named scalar losses, the shared (trunk) parameters and, per task, that task's own
(head) parameters. Two families exist:

* :class:`LossWeightingBalancer` — the update is ``sum_i w_i * grad(L_i)``; one backward pass.
* :class:`GradientCombinationBalancer` — per-task gradients of the shared parameters are combined
  by a rule that looks at their geometry (PCGrad, CAGrad, TurboTrain); heads keep their own task's
  plain gradient.

Both accumulate into ``.grad`` exactly like ``loss.backward()`` so gradient accumulation works.

A balancer that combines gradients of the shared REPRESENTATION instead of the shared parameters
(TurboTrain with ``space="features"``) sets ``needs_features``; the engine then also hands it the
shared tensors the heads read, which the step function returns under ``"features"``.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from turbotrain.utils.errors import ConfigError

# Where per-task gradients are taken and combined: the shared parameters or the shared features.
SPACES = ("parameters", "features")


class Balancer(nn.Module, ABC):
    """Base class: fills ``.grad`` from a dict of task losses and returns diagnostics.

    ``diagnostics`` is a public attribute: the training engine switches it on every N steps to get
    per-task gradient norms and cosines from methods that do not compute per-task gradients anyway.
    ``needs_features`` tells the engine to pass the step's shared feature tensors to ``backward``.
    """

    needs_features: bool = False

    def __init__(self, task_names: Sequence[str], diagnostics: bool = False):
        super().__init__()
        names = list(task_names)
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"balancer task_names must be non-empty and unique, got {names}")
        self.task_names = names
        self.diagnostics = diagnostics

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @abstractmethod
    def backward(
        self,
        losses: dict[str, Tensor],
        shared_params: list[Tensor],
        task_params: dict[str, list[Tensor]] | None = None,
        step: int = 0,
        features: list[Tensor] | None = None,
    ) -> dict[str, float]:
        """Accumulate the balanced gradient into ``.grad``; return scalar diagnostics.

        ``step`` is the global optimisation step, passed for methods with schedules; the built-in
        methods do not depend on it. ``features`` are the shared tensors the task heads read,
        listed from the heads' side inwards; only balancers with ``needs_features`` use them.
        """

    def end_epoch(self, epoch_losses: dict[str, float]) -> None:
        """Receive the epoch's mean task losses (used by DWA); default: nothing to do."""

    def update(self, losses_after: dict[str, Tensor]) -> None:
        """Receive the losses recomputed after the optimiser step (used by FAMO); default: nothing."""

    def stack_losses(self, losses: dict[str, Tensor]) -> Tensor:
        """Losses as a ``(K,)`` tensor in ``task_names`` order, checking that names match."""
        if set(losses) != set(self.task_names):
            raise KeyError(f"balancer expects losses for {self.task_names}, got {sorted(losses)}")
        return torch.stack([losses[name].reshape(()) for name in self.task_names])

    def heads_per_task(self, task_params: dict[str, list[Tensor]] | None) -> list[list[Tensor]]:
        """Each task's own parameters in ``task_names`` order (unknown task names rejected)."""
        task_params = task_params or {}
        unknown = set(task_params) - set(self.task_names)
        if unknown:
            raise KeyError(f"task_params for unknown tasks {sorted(unknown)}; tasks are {self.task_names}")
        return [list(task_params.get(name, [])) for name in self.task_names]

    def head_params(self, task_params: dict[str, list[Tensor]] | None) -> list[Tensor]:
        """All task-specific parameters, flattened in task order."""
        return [p for params in self.heads_per_task(task_params) for p in params]

    def weight_diagnostics(self, weights: Tensor) -> dict[str, float]:
        return {f"weight/{name}": w for name, w in zip(self.task_names, weights.tolist())}

    def gramian_diagnostics(self, gramian: Tensor) -> dict[str, float]:
        """Per-task gradient norms, pairwise cosines and the conflict flag from a ``(K, K)`` gramian."""
        norms = gramian.diagonal().clamp_min(0).sqrt()
        cosines = gramian / (norms[:, None] * norms[None, :]).clamp_min(1e-12)
        out = {f"gradnorm/{name}": n for name, n in zip(self.task_names, norms.tolist())}
        pair_cosines = []
        for i in range(self.num_tasks):
            for j in range(i + 1, self.num_tasks):
                value = cosines[i, j].item()
                out[f"cosine/{self.task_names[i]}-{self.task_names[j]}"] = value
                pair_cosines.append(value)
        if self.num_tasks == 2:
            out["cosine"] = pair_cosines[0]
        out["conflict"] = float(any(c < 0 for c in pair_cosines))
        return out


def flatten(grads: Sequence[Tensor]) -> Tensor:
    """Gradients of several parameters joined into one flat vector."""
    return torch.cat([g.reshape(-1) for g in grads])


def task_jacobian(loss_vector: Tensor, shared_params: list[Tensor]) -> Tensor:
    """``(K, N)`` matrix whose row i is grad(L_i) over all shared parameters, flattened and joined.

    One ``autograd.grad`` per task restricted to the shared parameters: it works with any op
    (spconv's sparse-conv backward fails under torch's batched ``is_grads_batched``/vmap Jacobian,
    measured on CooperativePnP) and the graph is retained for the head backward that follows.
    """
    rows = []
    for loss in loss_vector:
        grads = torch.autograd.grad(
            loss, shared_params, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        rows.append(flatten(grads))
    return torch.stack(rows)


def accumulate_flat_grad(params: list[Tensor], flat: Tensor) -> None:
    """Add the flat vector ``flat`` (joined in ``params`` order) into each parameter's ``.grad``."""
    offset = 0
    for p in params:
        chunk = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = chunk.clone()
        else:
            p.grad.add_(chunk)


def accumulate_grads(params: list[Tensor], grads: Sequence[Tensor]) -> None:
    """Add ``grads`` into ``.grad`` of ``params`` (as ``loss.backward()`` would)."""
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.detach().clone()
        else:
            p.grad.add_(g)


def split_backward(
    loss_vector: Tensor, balanced: list[Tensor], heads: list[list[Tensor]], plain: list[Tensor]
) -> Tensor:
    """Per-task gradients ``(K, N)`` of the ``balanced`` parameters, in as few passes as possible.

    As by-products it accumulates each task's plain gradient into its own ``heads[i]`` and the plain
    sum of task gradients into ``plain``. Task i's pass is ``grad(L_i, balanced + heads[i])``, so
    each head is traversed once. When ``plain`` parameters exist, a full pass of ``sum_i L_i`` is
    needed for them anyway; it replaces the last task's pass, whose balanced gradient is then the
    sum minus the other tasks' (a subtraction instead of one more backward through the trunk).
    """
    num_tasks, num_balanced = len(loss_vector), len(balanced)
    rows = []
    own_passes = num_tasks - 1 if plain else num_tasks
    for i in range(own_passes):
        grads = torch.autograd.grad(
            loss_vector[i], balanced + heads[i], retain_graph=bool(plain) or i < num_tasks - 1,
            allow_unused=True, materialize_grads=True,
        )
        rows.append(flatten(grads[:num_balanced]))
        accumulate_grads(heads[i], grads[num_balanced:])
    if plain:
        grads = torch.autograd.grad(
            loss_vector.sum(), plain + balanced + heads[-1], allow_unused=True, materialize_grads=True
        )
        accumulate_grads(plain, grads[: len(plain)])
        summed = flatten(grads[len(plain) : len(plain) + num_balanced])
        rows.append(summed - sum(rows) if rows else summed)
        accumulate_grads(heads[-1], grads[len(plain) + num_balanced :])
    return torch.stack(rows)


def backward_into(objective: Tensor, inputs: list[Tensor]) -> None:
    """``objective.backward`` restricted to ``inputs`` (accumulating); a no-op when there are none."""
    if inputs:
        torch.autograd.backward(objective, inputs=inputs)


class LossWeightingBalancer(Balancer):
    """Methods whose update is a weighted sum of task gradients: one backward pass per step.

    Subclasses give ``loss_weights`` (the multiplier of each task's gradient, detached) and may
    override ``objective`` when it has extra terms with their own learnable parameters.
    """

    @abstractmethod
    def loss_weights(self, loss_vector: Tensor) -> Tensor:
        """Multiplier of each task's gradient, ``(K,)``, for the current losses."""

    def objective(self, loss_vector: Tensor, weights: Tensor) -> Tensor:
        return (weights * loss_vector).sum()

    def backward(
        self,
        losses: dict[str, Tensor],
        shared_params: list[Tensor],
        task_params: dict[str, list[Tensor]] | None = None,
        step: int = 0,
        features: list[Tensor] | None = None,
    ) -> dict[str, float]:
        loss_vector = self.stack_losses(losses)
        weights = self.loss_weights(loss_vector).detach()
        objective = self.objective(loss_vector, weights)
        own_params = [p for p in self.parameters() if p.requires_grad]
        heads = self.head_params(task_params)
        diagnostics = self.weight_diagnostics(weights)
        if not self.diagnostics:
            backward_into(objective, list(shared_params) + heads + own_params)
            return diagnostics
        # Per-task gradients are needed for the diagnostics; reuse them for the shared update so the
        # step costs K trunk backwards instead of K + 1.
        jacobian = task_jacobian(loss_vector, shared_params)
        accumulate_flat_grad(shared_params, weights.to(jacobian.dtype) @ jacobian)
        backward_into(objective, heads + own_params)
        diagnostics.update(self.gramian_diagnostics(jacobian @ jacobian.T))
        return diagnostics


class GradientCombinationBalancer(Balancer):
    """Methods that combine per-task shared gradients by their geometry; heads keep plain gradients.

    Subclasses implement :meth:`combine` and may restrict it to part of the shared parameters with
    :meth:`split_shared`. ``space="features"`` combines the per-task gradients of the shared
    features instead and sends the result through the trunk in one backward (:mod:`.features`).
    """

    def __init__(self, task_names: Sequence[str], space: str = "parameters", diagnostics: bool = False):
        super().__init__(task_names, diagnostics)
        if space not in SPACES:
            raise ConfigError(f"balancer space must be one of {SPACES}, got {space!r}")
        self.space = space
        self.needs_features = space == "features"

    def split_shared(self, shared_params: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """``(plain, balanced)``: shared parameters that get the plain sum vs the combination rule."""
        return [], shared_params

    @abstractmethod
    def combine(
        self, jacobian: Tensor, gramian: Tensor, layout: tuple
    ) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Flat shared gradient from the ``(K, N)`` task Jacobian and its ``(K, K)`` gramian,
        plus per-task (effective) weights and method-specific diagnostics. ``layout`` says how the
        columns of ``jacobian`` are joined: the numels of the shared parameters (parameters space)
        or the shapes of the features (features space)."""

    def backward(
        self,
        losses: dict[str, Tensor],
        shared_params: list[Tensor],
        task_params: dict[str, list[Tensor]] | None = None,
        step: int = 0,
        features: list[Tensor] | None = None,
    ) -> dict[str, float]:
        loss_vector = self.stack_losses(losses)
        heads = self.heads_per_task(task_params)
        if self.space == "features":
            from .features import features_jacobian, backward_from_totals  # features imports base

            features, jacobian = features_jacobian(loss_vector, features, list(shared_params), heads)
            balanced, layout = list(shared_params), tuple(f.shape for f in features)
        else:
            plain, balanced = self.split_shared(list(shared_params))
            jacobian = split_backward(loss_vector, balanced, heads, plain)
            layout = tuple(p.numel() for p in balanced)
        gramian = jacobian @ jacobian.T
        combined, weights, extra = self.combine(jacobian, gramian, layout)
        if self.space == "features":
            backward_from_totals(features, combined, balanced)
        else:
            accumulate_flat_grad(balanced, combined)
        diagnostics = self.weight_diagnostics(weights)
        diagnostics.update(self.gramian_diagnostics(gramian))
        diagnostics.update(extra)
        return diagnostics
