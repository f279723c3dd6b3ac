"""The model-agnostic training loop shared by pretraining and fine-tuning.

:func:`fit` trains any ``nn.Module`` given a ``step_fn(model, batch) -> {task: loss, "log": {...}}``
(plus ``"features": [...]``, the shared tensors the heads read, for balancers that set
``needs_features``) and a multi-task balancer (``turbotrain.train.balancers``), which turns the
task losses into ``.grad``. The engine owns everything around that: data order, accumulation,
AdamW + warmup/cosine, clipping, mixed precision, data parallelism, checkpoints, resumption and
logging.

Reproducibility contract:

* The samples of optimizer step ``s`` are ``perm[s*B*A : (s+1)*B*A]`` of a per-epoch permutation
  drawn from ``(seed, epoch)`` (``B`` = global micro-batch, ``A`` = accumulation steps). Each of the
  ``A`` micro-batches is split evenly over the ranks, so the same global batch gives the same update
  on 1 or N processes. A final partial global batch of each epoch is dropped (it cannot be split
  evenly and would change the update size).
* Gradients are averaged over micro-batches and ranks after the balancer filled them, so every
  update is the gradient of the global-batch mean of per-sample losses, provided ``step_fn`` returns
  means over its (local) micro-batch.
* A checkpoint holds the model, optimizer, scheduler, balancer, grad scaler, every RNG state and the
  data position; resuming from it replays the uninterrupted run exactly on CPU. Datasets that draw
  random augmentations must derive them from the sample index (and epoch), not from a global RNG
  shared with worker processes, for that to hold with ``num_workers > 0``.

Known limits, by design: BatchNorm statistics are per rank (convert to ``SyncBatchNorm`` for exact
1-vs-N equality); with fp16 loss scaling, gradient-norm diagnostics reported by the balancer are in
scaled units; FAMO-style balancers adapt from each rank's own batch and then average their state.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from turbotrain.train.accounting import TrunkBackwardCounter, seen_indices
from turbotrain.train.balancers.base import Balancer
from turbotrain.train.checkpoint import CheckpointFiles, capture_rng_state, restore_rng_state
from turbotrain.train.distributed import (
    DistContext,
    all_reduce_gradients,
    all_reduce_mean,
    average_floating_buffers,
    barrier,
    distributed_context,
    no_gradient_sync,
    unwrap_model,
    wrap_model,
)
from turbotrain.train.sampling import epoch_permutation, mixed_seed
from turbotrain.train.scalars import ScalarLogger, progress_bar
from turbotrain.train.schedule import build_warmup_cosine, linear_weight_decay
from turbotrain.utils.errors import ConfigError
from turbotrain.utils.seed import seed_everything, seed_worker

StepFn = Callable[[nn.Module, Any], Mapping[str, Any]]
CheckpointHook = Callable[[int, nn.Module], None]
LOG_KEY = "log"
FEATURES_KEY = "features"  # shared tensors the heads read; for balancers with ``needs_features``
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
WORKER_SEED_STREAM = 1  # separates the worker seeds from the permutation drawn from (seed, epoch)


# --------------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Everything that shapes one training run. ``batch_size`` is GLOBAL (summed over ranks) and per
    forward; one optimizer step sees ``batch_size * grad_accum_steps`` samples."""

    epochs: int | None = None
    max_steps: int | None = None  # wins over epochs when both are set
    batch_size: int = 4
    grad_accum_steps: int = 1
    lr: float = 2e-3
    min_lr: float = 0.0
    weight_decay: float = 0.01
    weight_decay_start: float | None = None  # None: constant; else rises linearly to weight_decay
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    optimizer: str = "adamw"  # "adamw" (decoupled weight decay) | "adam" (L2 weight decay, CooPre)
    warmup_steps: int = 0
    warmup_start_ratio: float | None = None  # first warm-up rate / lr; None: 1 / warmup_steps
    grad_clip: float | None = None  # max global L2 norm; None or 0 disables clipping
    amp: str = "none"  # "none" | "bf16" | "fp16"; CUDA only, ignored on CPU
    seed: int = 0
    checkpoint_every: int = 1000  # optimizer steps
    log_every: int = 1
    diagnostics_every: int = 100  # steps on which the balancer computes its diagnostics
    num_workers: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    freeze_prefixes: tuple[str, ...] = ()  # parameter-name prefixes excluded from training
    final_name: str = "final.pt"

    # Fields that do not change the sequence of updates, so a resume may change them.
    RESUMABLE_CHANGES = ("checkpoint_every", "log_every", "diagnostics_every", "num_workers", "device",
                         "final_name")

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        if self.epochs is None and self.max_steps is None:
            raise ConfigError("TrainConfig: set epochs or max_steps")
        positive = {"batch_size": self.batch_size, "grad_accum_steps": self.grad_accum_steps,
                    "lr": self.lr, "checkpoint_every": self.checkpoint_every,
                    "log_every": self.log_every, "diagnostics_every": self.diagnostics_every}
        if self.epochs is not None:
            positive["epochs"] = self.epochs
        if self.max_steps is not None:
            positive["max_steps"] = self.max_steps
        for name, value in positive.items():
            if value <= 0:
                raise ConfigError(f"TrainConfig.{name} must be > 0, got {value!r}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"TrainConfig.min_lr must lie in [0, lr={self.lr}], got {self.min_lr!r}")
        if self.weight_decay_start is not None and self.weight_decay_start < 0:
            raise ConfigError(f"TrainConfig.weight_decay_start must be >= 0 or None, got {self.weight_decay_start!r}")
        if self.warmup_steps < 0 or self.num_workers < 0 or self.weight_decay < 0:
            raise ConfigError("TrainConfig.warmup_steps, num_workers and weight_decay must be >= 0")
        if self.optimizer not in ("adamw", "adam"):
            raise ConfigError(f"TrainConfig.optimizer must be 'adamw' or 'adam', got {self.optimizer!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"TrainConfig.amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.grad_clip is not None and self.grad_clip < 0:
            raise ConfigError(f"TrainConfig.grad_clip must be >= 0 or None, got {self.grad_clip!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        """Build from a config mapping; unknown keys are an error (they are usually typos)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"TrainConfig: unknown keys {unknown}; expected some of {sorted(known)}")
        values = dict(values)
        for name in ("betas", "freeze_prefixes"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------- errors
class NonFiniteLossError(FloatingPointError):
    """A task loss became NaN/inf; raised before the poisoned step touches weights or checkpoints."""

    def __init__(self, step: int, task: str, value: float):
        self.step, self.task, self.value = step, task, value
        super().__init__(f"non-finite loss for task '{task}' at step {step} (value {value}); "
                         f"weights were not updated and the last checkpoint is kept")


class NonFiniteGradientError(FloatingPointError):
    """Finite losses but a NaN/inf gradient (without fp16 loss scaling, which skips such steps)."""

    def __init__(self, step: int, grad_norm: float):
        self.step, self.grad_norm = step, grad_norm
        super().__init__(f"non-finite gradient norm ({grad_norm}) at step {step}; "
                         f"weights were not updated and the last checkpoint is kept")


# --------------------------------------------------------------------------------------- data order
class GlobalBatchSampler(Sampler[list[int]]):
    """This rank's share of each micro-batch of one epoch, starting at optimizer step ``start_step``."""

    def __init__(self, num_samples: int, batch_size: int, accum_steps: int, ctx: DistContext,
                 seed: int, epoch: int, start_step: int = 0, epoch_keyed: bool = False):
        self.num_samples, self.batch_size, self.accum_steps = num_samples, batch_size, accum_steps
        self.rank, self.local_size = ctx.rank, batch_size // ctx.world_size
        self.seed, self.epoch, self.start_step = seed, epoch, start_step
        # an epoch-keyed dataset (per-epoch augmentation draws) reads index epoch * N + i
        self.key_offset = epoch * num_samples if epoch_keyed else 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // (self.batch_size * self.accum_steps)

    def __len__(self) -> int:
        return max(self.steps_per_epoch - self.start_step, 0) * self.accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        first = self.start_step * self.accum_steps
        for micro in range(first, self.steps_per_epoch * self.accum_steps):
            start = micro * self.batch_size + self.rank * self.local_size
            yield (order[start:start + self.local_size] + self.key_offset).tolist()


def _grouped(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    group: list[Any] = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move a batch (anything with ``.to``, or dicts/lists/tuples of such) to ``device``."""
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


# --------------------------------------------------------------------------------------- parameters
def freeze_by_prefix(model: nn.Module, prefixes: Sequence[str]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose name starts with a prefix; returns their names.

    A prefix matching nothing is an error: it is almost always a typo that would train everything.
    """
    frozen = []
    for prefix in prefixes:
        matched = [n for n, _ in model.named_parameters() if n.startswith(prefix)]
        if not matched:
            raise ConfigError(f"freeze prefix '{prefix}' matches no parameter of {type(model).__name__}")
        frozen.extend(matched)
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    return frozen


def build_optimizer(model: nn.Module, extra_params: Sequence[nn.Parameter],
                    cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (or Adam with L2 weight decay, ``cfg.optimizer``) over trainable parameters; biases, norm
    scales and balancer weights get no decay (decaying them towards 0 shifts activations / task
    weights rather than regularising)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2] + [p for p in extra_params if p.requires_grad]
    start = cfg.weight_decay if cfg.weight_decay_start is None else cfg.weight_decay_start
    groups = [{"params": decay, "weight_decay": start, "decayed": True},
              {"params": no_decay, "weight_decay": 0.0, "decayed": False}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ConfigError("no trainable parameters left (check freeze_prefixes)")
    optimizer = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
    return optimizer(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def needs_losses_after(balancer: Any) -> bool:
    """Whether ``balancer.update`` must get post-step losses (costs one extra forward per step).

    An explicit ``needs_losses_after`` attribute wins; otherwise any ``update`` other than the
    no-op inherited from the balancer base class counts (FAMO overrides it).
    """
    explicit = getattr(balancer, "needs_losses_after", None)
    if explicit is not None:
        return bool(explicit)
    update = getattr(type(balancer), "update", None)
    return update is not None and update is not Balancer.update


def _trainable(params: Iterable[torch.Tensor] | None) -> list[torch.Tensor] | None:
    return None if params is None else [p for p in params if p.requires_grad]


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, value: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scale)
        return value.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (scale,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None


def scale_gradients(losses: Mapping[str, torch.Tensor],
                    scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """fp16 loss scaling that leaves the loss VALUES intact: only gradients flowing back through
    the losses into the model are multiplied by ``scale``.

    ``GradScaler.scale(loss)`` would hand the balancer scaled values, which breaks balancers that
    are not linear in the losses (uncertainty weighting's ``+ s/2`` term, FAMO's log-losses).
    Gradients the balancer gives its own parameters do not pass through the losses and stay unscaled.
    """
    return {k: _ScaleGradient.apply(v, scale) for k, v in losses.items()}


# --------------------------------------------------------------------------------------- state
@dataclass
class Progress:
    """Where the run stands; saved in every checkpoint."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0
    step_in_epoch: int = 0
    wall_s: float = 0.0  # training time, without evaluation callbacks
    epoch_loss_sums: dict[str, float] = field(default_factory=dict)
    last_losses: dict[str, float] = field(default_factory=dict)
    # budget accounting (accounting.py): global samples read, and passes through the trunk
    samples_seen: int = 0
    trunk_forwards: int = 0
    trunk_backwards: int = 0


@dataclass
class StepResult:
    losses: dict[str, float]  # global means over the step's micro-batches
    details: dict[str, float]
    diagnostics: dict[str, float]
    grad_norm: float
    lr: float


# --------------------------------------------------------------------------------------- trainer
class Trainer:
    """One run of :func:`fit` (see the module docstring for the contract)."""

    def __init__(self, model: nn.Module, step_fn: StepFn, balancer: Any, dataset: Dataset,
                 collate_fn: Callable | None, cfg: TrainConfig, run_dir: Path, ctx: DistContext,
                 shared_params: Sequence[torch.Tensor] | None,
                 task_params: Mapping[str, Sequence[torch.Tensor]] | None,
                 on_checkpoint: CheckpointHook | None):
        self.cfg, self.ctx, self.run_dir = cfg, ctx, run_dir
        self.step_fn, self.balancer, self.on_checkpoint = step_fn, balancer, on_checkpoint
        self.dataset, self.collate_fn = dataset, collate_fn
        freeze_by_prefix(model, cfg.freeze_prefixes)
        model.to(ctx.device)
        if isinstance(balancer, nn.Module):
            balancer.to(ctx.device)
        self.model = wrap_model(model, ctx)
        self.shared_params = (_trainable(model.parameters()) if shared_params is None
                              else _trainable(shared_params))
        self.task_params = (None if task_params is None
                            else {k: _trainable(v) for k, v in task_params.items()})
        self.balancer_params = list(balancer.parameters()) if hasattr(balancer, "parameters") else []
        self.optimizer = build_optimizer(model, self.balancer_params, cfg)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.steps_per_epoch = len(dataset) // (cfg.batch_size * cfg.grad_accum_steps)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.scheduler = build_warmup_cosine(self.optimizer, cfg.lr, cfg.min_lr, cfg.warmup_steps,
                                             self.total_steps, cfg.warmup_start_ratio)
        # Mixed precision is a CUDA feature here; on CPU the setting is ignored (see TrainConfig.amp).
        self.amp_dtype = AMP_DTYPES.get(cfg.amp) if ctx.device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.amp_dtype == torch.float16)
        self.balancer_needs_losses_after = needs_losses_after(balancer)
        self.balancer_needs_features = bool(getattr(balancer, "needs_features", False))
        self.files = CheckpointFiles(run_dir, cfg.final_name)
        self.progress = Progress()
        self.resumed_from = 0
        self._callback_s = 0.0  # time spent in on_checkpoint, excluded from wall_s
        self._session_start = self._wall_at_start = 0.0  # set when run() starts its clock

    # ---- checkpoints
    def state_payload(self) -> dict[str, Any]:
        p = self.progress
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "balancer": self.balancer.state_dict() if hasattr(self.balancer, "state_dict") else {},
            "rng": capture_rng_state(),
            "progress": dataclasses.asdict(p),
            # The data position: the epoch's permutation is a pure function of (seed, epoch).
            "data": {"seed": self.cfg.seed, "epoch": p.epoch,
                     "batches_consumed": p.step_in_epoch * self.cfg.grad_accum_steps},
            "config": self.cfg.to_dict(),
            "world_size": self.ctx.world_size,
        }

    def restore(self, payload: Mapping[str, Any]) -> None:
        """Continue from ``payload``; refuses a checkpoint whose config changes the update sequence."""
        self._check_resumable(payload["config"])
        unwrap_model(self.model).load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        self.scaler.load_state_dict(payload["scaler"])
        if hasattr(self.balancer, "load_state_dict"):
            self.balancer.load_state_dict(payload["balancer"])
        self.progress = Progress(**payload["progress"])
        restore_rng_state(payload["rng"])
        self.resumed_from = self.progress.step

    def _check_resumable(self, saved: Mapping[str, Any]) -> None:
        current = self.cfg.to_dict()
        changed = sorted(k for k in current if k not in TrainConfig.RESUMABLE_CHANGES
                         and saved.get(k) != current[k])
        if changed:
            raise ConfigError(f"{self.files.last}: cannot resume, config changed in {changed} "
                              f"(saved {[saved.get(k) for k in changed]}, "
                              f"now {[current[k] for k in changed]}); use a new run directory")

    def _train_mode(self) -> None:
        """Training mode, except for fully frozen sub-modules: a frozen encoder must not keep moving
        its BatchNorm statistics under the heads that were trained on it."""
        self.model.train()
        for module in unwrap_model(self.model).modules():
            params = list(module.parameters())
            if params and not any(p.requires_grad for p in params):
                module.eval()

    def save(self, final: bool = False) -> None:
        """Rank 0 writes ``last.pt`` (and the final checkpoint), then runs the evaluation hook."""
        if not self.ctx.is_main:
            return
        payload = self.state_payload()
        self.files.save_last(payload)
        if final:
            self.files.save_final(payload)
        if self.on_checkpoint is not None:
            started = time.perf_counter()
            self.on_checkpoint(self.progress.step, unwrap_model(self.model))
            self._train_mode()
            self._callback_s += time.perf_counter() - started

    # ---- one optimizer step
    def _forward(self, batch: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[torch.Tensor] | None]:
        """Task losses, logged details and the shared features (None when not returned)."""
        autocast = (contextlib.nullcontext() if self.amp_dtype is None
                    else torch.autocast(self.ctx.device.type, dtype=self.amp_dtype))
        with autocast:
            out = dict(self.step_fn(self.model, batch))
        self.progress.trunk_forwards += 1
        details = dict(out.pop(LOG_KEY, {}) or {})
        features = out.pop(FEATURES_KEY, None)
        if not out:
            raise ConfigError("step_fn returned no task losses")
        return out, details, features

    def _global_values(self, losses: Mapping[str, torch.Tensor],
                       details: Mapping[str, Any]) -> tuple[dict[str, float], dict[str, float]]:
        """Rank-mean of task losses and detail scalars (one collective); stops on a non-finite loss."""
        values = [losses[k].detach().float().reshape(()) for k in losses]
        values += [torch.as_tensor(v, dtype=torch.float32, device=self.ctx.device).detach().reshape(())
                   for v in details.values()]
        reduced = all_reduce_mean(torch.stack(values).to(self.ctx.device), self.ctx).tolist()
        task_values = dict(zip(losses, reduced[:len(losses)]))
        for task, value in task_values.items():
            if not math.isfinite(value):
                raise NonFiniteLossError(self.progress.step + 1, task, value)
        return task_values, dict(zip(details, reduced[len(losses):]))

    def _set_balancer_diagnostics(self, enabled: bool) -> None:
        # Balancers that compute per-task-gradient diagnostics only on request expose this flag.
        if hasattr(self.balancer, "diagnostics"):
            self.balancer.diagnostics = enabled

    def _balanced_backward(self, losses: dict[str, torch.Tensor], diagnostics_step: bool,
                           features: list[torch.Tensor] | None) -> dict[str, float]:
        self._set_balancer_diagnostics(diagnostics_step)
        if self.scaler.is_enabled():
            losses = scale_gradients(losses, self._loss_scale())
        # Only balancers that declare needs_features get the keyword, so others keep the 4-argument API.
        extra = {"features": features} if self.balancer_needs_features else {}
        diag = self.balancer.backward(losses, self.shared_params, self.task_params, step=self.progress.step,
                                      **extra)
        return {k: float(v) for k, v in (diag or {}).items()}

    def _loss_scale(self) -> torch.Tensor:
        # scaler.scale() (not get_scale()) initialises the scaler lazily and avoids a host sync.
        return self.scaler.scale(torch.ones((), device=self.ctx.device))

    def _unscale(self) -> None:
        """Undo fp16 loss scaling: balancer parameters got unscaled gradients (see
        :func:`scale_gradients`), so scale them up first and let GradScaler unscale everything."""
        scale = self._loss_scale()
        for p in self.balancer_params:
            if p.grad is not None:
                p.grad.mul_(scale)
        self.scaler.unscale_(self.optimizer)

    def _apply_update(self) -> float:
        """Average, unscale, clip and apply the accumulated gradients; returns the pre-clip norm."""
        all_reduce_gradients(self.params, self.ctx,
                             divisor=self.cfg.grad_accum_steps * self.ctx.world_size)
        if self.scaler.is_enabled():
            self._unscale()
        max_norm = self.cfg.grad_clip or math.inf
        grads = [p for p in self.params if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(grads, max_norm)) if grads else 0.0
        if not math.isfinite(grad_norm) and not self.scaler.is_enabled():
            raise NonFiniteGradientError(self.progress.step + 1, grad_norm)
        if self.cfg.weight_decay_start is not None:
            decay = linear_weight_decay(self.progress.step, self.total_steps, self.cfg.weight_decay_start,
                                        self.cfg.weight_decay)
            for group in self.optimizer.param_groups:
                if group.get("decayed"):
                    group["weight_decay"] = decay
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return grad_norm

    def _losses_after_update(self, batch: Any) -> None:
        """Post-step losses on the last micro-batch, for balancers that adapt from them (FAMO).

        Each rank updates from its own batch (matching the local losses its ``backward`` saw), then
        the ranks average the balancer's buffers so they keep applying identical task weights.
        """
        if not self.balancer_needs_losses_after:
            return
        with torch.no_grad(), no_gradient_sync(self.model):
            losses, _, _ = self._forward(batch)
        self.balancer.update({k: v.detach() for k, v in losses.items()})
        average_floating_buffers(self.balancer, self.ctx)

    def _is_diagnostics_step(self) -> bool:
        """The first step and every ``diagnostics_every``-th one (1-based step numbers)."""
        step = self.progress.step + 1
        return step == 1 or step % self.cfg.diagnostics_every == 0

    def train_step(self, micro_batches: list[Any]) -> StepResult:
        """One optimizer update from ``grad_accum_steps`` micro-batches of this rank."""
        self.optimizer.zero_grad(set_to_none=True)
        lr = self.optimizer.param_groups[0]["lr"]
        diagnostics_step = self._is_diagnostics_step()
        sums: dict[str, float] = {}
        details: dict[str, float] = {}
        diagnostics: dict[str, float] = {}
        for i, batch in enumerate(micro_batches):
            batch = move_to_device(batch, self.ctx.device)
            with no_gradient_sync(self.model):
                losses, local_details, features = self._forward(batch)
                task_values, details = self._global_values(losses, local_details)
                last_micro_batch = i == len(micro_batches) - 1
                diagnostics = self._balanced_backward(losses, diagnostics_step and last_micro_batch, features)
            for k, v in task_values.items():
                sums[k] = sums.get(k, 0.0) + v
        grad_norm = self._apply_update()
        self._losses_after_update(batch)
        losses_mean = {k: v / len(micro_batches) for k, v in sums.items()}
        return StepResult(losses_mean, details, diagnostics, grad_norm, lr)

    # ---- bookkeeping after a step
    def _advance(self, result: StepResult) -> None:
        p = self.progress
        p.step += 1
        p.step_in_epoch += 1
        p.samples_seen += self.cfg.batch_size * self.cfg.grad_accum_steps
        p.trunk_backwards += self._trunk_backwards.count
        self._trunk_backwards.count = 0
        p.last_losses = result.losses
        for k, v in result.losses.items():
            p.epoch_loss_sums[k] = p.epoch_loss_sums.get(k, 0.0) + v
        if p.step_in_epoch == self.steps_per_epoch:
            self.balancer.end_epoch({k: v / p.step_in_epoch for k, v in p.epoch_loss_sums.items()})
            p.epoch += 1
            p.step_in_epoch = 0
            p.epoch_loss_sums = {}

    def _row(self, result: StepResult, epoch: int, step_s: float) -> dict[str, float | int]:
        row: dict[str, float | int] = {"step": self.progress.step, "epoch": epoch,
                                       "wall_s": round(self.progress.wall_s, 4), "lr": result.lr}
        row.update({f"loss/{k}": v for k, v in result.losses.items()})
        row["grad_norm"] = result.grad_norm
        row["samples_per_s"] = self.cfg.batch_size * self.cfg.grad_accum_steps / max(step_s, 1e-9)
        row.update({f"log/{k}": v for k, v in result.details.items()})
        row.update({f"balancer/{k}": v for k, v in result.diagnostics.items()})
        return row

    def _loader(self) -> DataLoader:
        p = self.progress
        sampler = GlobalBatchSampler(len(self.dataset), self.cfg.batch_size, self.cfg.grad_accum_steps,
                                     self.ctx, self.cfg.seed, p.epoch, p.step_in_epoch,
                                     epoch_keyed=getattr(self.dataset, "epoch_keyed", False))
        # An explicit generator keeps DataLoader from drawing worker seeds from the global torch RNG.
        generator = torch.Generator().manual_seed(mixed_seed(self.cfg.seed, p.epoch, WORKER_SEED_STREAM))
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collate_fn,
                          num_workers=self.cfg.num_workers, worker_init_fn=seed_worker,
                          generator=generator, pin_memory=self.ctx.device.type == "cuda")

    def run(self) -> dict[str, Any]:
        """Train until ``total_steps``, checkpointing on the way; returns the run summary."""
        if self.steps_per_epoch == 0:
            raise ConfigError(f"dataset of {len(self.dataset)} samples is smaller than one optimizer step "
                              f"(batch_size {self.cfg.batch_size} x grad_accum_steps "
                              f"{self.cfg.grad_accum_steps})")
        logger = ScalarLogger(self.run_dir, self.ctx.is_main, self.resumed_from)
        bar = progress_bar(self.total_steps, self.progress.step, self.ctx.is_main)
        self._train_mode()
        self._session_start, self._wall_at_start = time.perf_counter(), self.progress.wall_s
        self._trunk_backwards = TrunkBackwardCounter(self.shared_params)
        try:
            while self.progress.step < self.total_steps:
                self._run_epoch(logger, bar)
            if not self.files.final.exists() or self.resumed_from < self.total_steps:
                self.save(final=True)
        finally:
            self._trunk_backwards.close()
            bar.close()
            logger.close()
        barrier(self.ctx)
        return self.summary()

    def _run_epoch(self, logger: ScalarLogger, bar) -> None:
        """The rest of the current epoch (or up to ``total_steps``), checkpointing every N steps."""
        for micro_batches in _grouped(self._loader(), self.cfg.grad_accum_steps):
            started, epoch = time.perf_counter(), self.progress.epoch
            result = self.train_step(micro_batches)
            step_s = time.perf_counter() - started
            # Wall time counts training only: evaluation hooks are subtracted, and time lost to a
            # kill after the last checkpoint is not (the resumed run redoes that work).
            self.progress.wall_s = (self._wall_at_start + time.perf_counter() - self._session_start
                                    - self._callback_s)
            self._advance(result)
            if self.progress.step % self.cfg.log_every == 0:
                logger.log(self._row(result, epoch, step_s))
                bar.set_postfix({k: f"{v:.4g}" for k, v in result.losses.items()}, refresh=False)
            bar.update(1)
            if self.progress.step >= self.total_steps:
                return
            if self.progress.step % self.cfg.checkpoint_every == 0:
                self.save()

    def summary(self) -> dict[str, Any]:
        return {"steps": self.progress.step,
                "epochs": self.progress.step / self.steps_per_epoch,
                "wall_s": self.progress.wall_s,
                "samples_seen": self.progress.samples_seen,
                "unique_samples_seen": len(seen_indices(len(self.dataset), self.cfg.batch_size * self.cfg.grad_accum_steps,
                                                        self.cfg.seed, self.progress.step)),
                # per micro-batch of the global batch (ranks run theirs side by side)
                "trunk_forwards": self.progress.trunk_forwards,
                "trunk_backwards": self.progress.trunk_backwards,
                "final_losses": dict(self.progress.last_losses),
                "device": str(self.ctx.device),
                "world_size": self.ctx.world_size,
                "resumed_from_step": self.resumed_from,
                "checkpoint": str(self.files.final)}


def fit(model: nn.Module, step_fn: StepFn, balancer: Any, dataset: Dataset, config: TrainConfig,
        run_dir: str | Path, *, collate_fn: Callable | None = None,
        shared_params: Sequence[torch.Tensor] | None = None,
        task_params: Mapping[str, Sequence[torch.Tensor]] | None = None,
        on_checkpoint: CheckpointHook | None = None) -> dict[str, Any]:
    """Train ``model`` and return a summary (steps, epochs, wall_s, final_losses, device, world_size).

    ``step_fn(model, batch)`` returns ``{task: scalar loss (mean over its micro-batch), ...}`` and
    optionally ``"log": {name: scalar}`` and ``"features": [tensor, ...]`` (passed to balancers with
    ``needs_features``, never treated as a loss); under torchrun ``model`` is the DDP wrapper, so call
    ``model(...)`` and reach attributes through ``distributed.unwrap_model(model)``.
    ``balancer.backward(losses, shared_params, task_params, step[, features])`` fills ``.grad``;
    ``shared_params`` defaults to every trainable parameter. A run directory holding ``last.pt``
    is resumed from it. ``on_checkpoint(step, model)`` runs on rank 0 after each checkpoint; its
    time is excluded from ``wall_s``.
    """
    config.validate()
    run_dir = Path(run_dir)
    with distributed_context(config.device) as ctx:
        if config.batch_size % ctx.world_size:
            raise ConfigError(f"batch_size {config.batch_size} is not divisible by world size "
                              f"{ctx.world_size}")
        seed_everything(config.seed)
        trainer = Trainer(model, step_fn, balancer, dataset, collate_fn, config, run_dir, ctx,
                          shared_params, task_params, on_checkpoint)
        payload = trainer.files.resume_payload()
        if payload is not None:
            trainer.restore(payload)
        return trainer.run()
