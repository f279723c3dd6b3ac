"""Per-task gradients w.r.t. the shared representation, and the single backward that follows.

The shared-representation trick of MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective
Optimization", NeurIPS 2018): instead of per-task gradients of all shared PARAMETERS (K backward
passes through the trunk), take per-task gradients of the shared FEATURES the heads read (K passes
through the heads only), combine them there, and send the combined feature gradient through the
trunk once. A balancer using it sees:

* ``features``: the shared tensors the heads read, listed from the heads' side inwards — a feature
  may be computed from features listed AFTER it, never from one listed before it. For
  ``CooperativePnP`` that is ``[bev, step_bev]``: ``bev = temporal(step_bev)``.
* every shared parameter must reach the losses only through ``features`` (checked each step), or
  part of its gradient would be lost silently.

Gradients here are TOTAL derivatives (what ``autograd.grad`` returns for a non-leaf tensor): the
gradient of ``step_bev`` includes the path through ``bev``. That is the gradient the layers below
``step_bev`` actually receive, so conflicts are judged where they act, and no small difference of
two large numbers is fed to the (non-linear) conflict rule. :func:`backward_from_totals` then picks
the backward seeds that make every feature receive exactly its combined total gradient.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from turbotrain.utils.errors import ConfigError

from .base import accumulate_grads, flatten

FEATURE_GRANULARITIES = ("cell", "sample")


def check_features(features: Sequence[Tensor] | None) -> list[Tensor]:
    """The features as a list, rejecting a missing list or features that carry no gradient."""
    if not features:
        raise ConfigError(
            "balancer works on the shared features but got none: the step function must return the "
            "shared tensors the heads read under the 'features' key"
        )
    if not all(f.requires_grad for f in features):
        raise ConfigError("every shared feature must require grad (is the whole trunk frozen?)")
    return list(features)


def check_feature_order(features: list[Tensor]) -> None:
    """Reject a ``features`` list where a feature is computed from one listed before it.

    ``autograd.grad`` with ``allow_unused`` only walks the graph (in C++) when nothing connects,
    which is the normal case, so this costs no backward computation.
    """
    for k in range(len(features) - 1):
        later = features[k + 1 :]
        through = torch.autograd.grad(
            later, features[k], grad_outputs=[torch.zeros_like(f) for f in later],
            retain_graph=True, allow_unused=True,
        )[0]
        if through is not None:
            raise ConfigError(
                f"shared feature {k} is computed from a feature listed after it; list the features "
                "from the heads' side inwards (e.g. [bev, step_bev])"
            )


def leaves_reached_around(roots: Sequence[Tensor], stops: Sequence[Tensor]) -> set[int]:
    """``id`` of every leaf tensor the graph of ``roots`` reaches without passing through ``stops``.

    A plain walk over ``grad_fn.next_functions``: autograd has no query for "paths avoiding these
    tensors". It only covers the heads' side of the graph (it stops at the features), so it is short.
    """
    stop_edges = {(f.grad_fn, f.output_nr) for f in stops}
    pending = [(r.grad_fn, r.output_nr) for r in roots if r.grad_fn is not None]
    seen, leaves = set(), set()
    while pending:
        edge = pending.pop()
        node = edge[0]
        if node is None or edge in stop_edges or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # set on AccumulateGrad nodes: a leaf tensor
        if variable is not None:
            leaves.add(id(variable))
        pending.extend(next_edge for next_edge in node.next_functions if next_edge[0] is not None)
    return leaves


def check_no_bypass(loss_vector: Tensor, features: list[Tensor], shared_params: list[Tensor]) -> None:
    """Reject shared parameters that the losses reach other than through ``features``."""
    reached = leaves_reached_around([loss_vector], features)
    bypassing = [tuple(p.shape) for p in shared_params if id(p) in reached]
    if bypassing:
        raise ConfigError(
            f"{len(bypassing)} shared parameters (shapes {bypassing[:3]}...) reach the task losses without "
            "passing through the shared features; list them as task parameters or add the tensor they "
            "feed to the features"
        )


def representation_jacobian(
    loss_vector: Tensor, features: list[Tensor], heads: list[list[Tensor]]
) -> Tensor:
    """``(K, N)`` total gradients of each task loss w.r.t. all features, flattened and joined.

    Task i's pass is ``grad(L_i, features + heads[i])``: it only runs through the heads (and between
    the features), and its head gradients are accumulated into ``heads[i]`` on the way. Rows are at
    least float32 so that the gramians of half-precision features neither round nor overflow.
    """
    num_features = len(features)
    work_dtype = torch.promote_types(features[0].dtype, torch.float32)
    rows = []
    for loss, own_head in zip(loss_vector, heads):
        grads = torch.autograd.grad(
            loss, features + own_head, retain_graph=True, allow_unused=True, materialize_grads=True
        )
        rows.append(flatten(grads[:num_features]).to(work_dtype))
        accumulate_grads(own_head, grads[num_features:])
    return torch.stack(rows)


def features_jacobian(
    loss_vector: Tensor, features: Sequence[Tensor] | None, shared_params: list[Tensor], heads: list[list[Tensor]]
) -> tuple[list[Tensor], Tensor]:
    """The checked features and the ``(K, N)`` per-task total gradients w.r.t. them (heads filled)."""
    features = check_features(features)
    check_feature_order(features)
    check_no_bypass(loss_vector, features, shared_params)
    return features, representation_jacobian(loss_vector, features, heads)


def unflatten_like(flat: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into pieces shaped (and typed) like ``tensors``."""
    pieces = torch.split(flat, [t.numel() for t in tensors])
    return [piece.view_as(t).to(t.dtype) for piece, t in zip(pieces, tensors)]


def seeds_for_totals(features: list[Tensor], totals: list[Tensor]) -> list[Tensor]:
    """Backward seeds ``s`` such that ``backward(features, s)`` makes feature k receive ``totals[k]``.

    Feature k receives its own seed plus what flows in from the features listed before it
    (downstream of it), so ``s_k = totals[k] - VJP_k(s_0..s_{k-1})``, solved front to back. The VJP
    runs only between features (for CooperativePnP: through the temporal fusion).
    """
    seeds = [totals[0]]
    for k in range(1, len(features)):
        inflow = torch.autograd.grad(
            features[:k], features[k], grad_outputs=seeds, retain_graph=True, allow_unused=True
        )[0]
        seeds.append(totals[k] if inflow is None else totals[k] - inflow)
    return seeds


def backward_from_totals(features: list[Tensor], combined: Tensor, shared_params: list[Tensor]) -> None:
    """One backward through the trunk that accumulates into ``shared_params`` the gradient implied by
    the combined total feature gradient ``combined`` (flat, joined in ``features`` order)."""
    totals = unflatten_like(combined, features)
    if shared_params:
        seeds = seeds_for_totals(features, totals)
        torch.autograd.backward(features, grad_tensors=seeds, inputs=shared_params)


def feature_block_ids(
    shapes: Sequence[torch.Size], granularity: str, device: torch.device
) -> tuple[Tensor, Tensor]:
    """Block index of every flat feature-gradient element, and the number of elements per block.

    Features are ``(B, ..., H, W)``; blocks never span two features. ``"cell"``: one block per
    feature, sample and BEV cell (all channels, and all steps of a ``(B, T, C, H, W)`` map, at that
    cell); ``"sample"``: one block per feature and sample.
    """
    id_pieces, sizes, offset = [], [], 0
    for shape in shapes:
        if granularity == "cell" and len(shape) < 3:
            raise ConfigError(f"'cell' blocks need (B, ..., H, W) features, got shape {tuple(shape)}")
        batch = shape[0]
        cell_shape = tuple(shape[-2:]) if granularity == "cell" else ()
        per_sample = int(torch.Size(cell_shape).numel())
        layout = (batch,) + (1,) * (len(shape) - 1 - len(cell_shape)) + cell_shape
        ids = torch.arange(batch * per_sample, device=device).view(layout).expand(shape)
        id_pieces.append(ids.reshape(-1) + offset)
        block_numel = shape.numel() // (batch * per_sample)
        sizes.extend([block_numel] * (batch * per_sample))
        offset += batch * per_sample
    return torch.cat(id_pieces), torch.tensor(sizes, device=device)
