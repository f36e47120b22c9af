"""Differentiable feature gathering across processes for contrastive losses (open_clip's `gather_with_grad`).

`accelerator.gather` is not differentiable; `FeatureGatherer.gather_all` is: its backward sums every process's
gradient for a slice and hands each process the gradient of its own rows. The loss modules
(`training.losses`) take any `Gatherer`, so tests can pass their own.
"""

from typing import Protocol

import torch
import torch.distributed as dist


class Gatherer(Protocol):
    """What the loss modules need to join the processes' features."""

    rank: int
    world_size: int

    def gather_all(self, tensors: list[torch.Tensor], pad_values: list | None = None) -> list[torch.Tensor]:
        """All processes' tensors concatenated on dim 0 in rank order (padded to the largest), with gradients."""
        ...

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes, without gradient."""
        ...


def pad_to_shape(tensor: torch.Tensor, shape, pad_value=0) -> torch.Tensor:
    """`tensor` padded at the end of each dim up to `shape` with `pad_value` (bool tensors too)."""
    padding = []
    for have, want in zip(reversed(tensor.shape), reversed(list(shape))):
        padding += [0, want - have]
    if not any(padding):
        return tensor
    if tensor.dtype == torch.bool:
        return torch.nn.functional.pad(tensor.to(torch.uint8), padding, value=int(pad_value)).bool()
    return torch.nn.functional.pad(tensor, padding, value=pad_value)


class _AllGather(torch.autograd.Function):
    """Tensors `[n_i, ...]` per process -> `[world * n_i, ...]` on every process, gradients summed to the owner.

    One autograd node for all of a loss's tensors: its backward issues the collectives in a fixed order, whereas
    separate nodes could run their backward in a different order on different processes.
    """

    @staticmethod
    def forward(ctx, group, *tensors: torch.Tensor):
        ctx.group, ctx.rank = group, dist.get_rank(group)
        ctx.rows = [t.shape[0] for t in tensors]
        gathered = []
        for tensor in tensors:
            parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            gathered.append(torch.cat(parts, dim=0))
        return tuple(gathered)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        # Every process computed a loss over the whole gathered batch: the owner's rows need the sum of all of them.
        owned = []
        for grad, rows in zip(grads, ctx.rows):
            grad = grad.contiguous()
            dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
            owned.append(grad[ctx.rank * rows : (ctx.rank + 1) * rows])
        return (None, *owned)


_GROUPS = {}


def _feature_group():
    """A process group of its own for feature collectives, created once (collectively) per default group.

    DDP all-reduces gradient buckets on the default group from inside backward, while the gather's backward
    all-reduces feature gradients; on one group the two streams of collectives could pair up in a different
    order on different processes (gloo matches collectives by order) and mix unrelated tensors.
    """
    key = id(dist.group.WORLD)
    if key not in _GROUPS:
        _GROUPS[key] = dist.new_group(backend=dist.get_backend())
    return _GROUPS[key]


class FeatureGatherer:
    """The `Gatherer` of `torch.distributed`: gathers per-process features (padding ragged dims) with gradients;
    identity on a single process.

    Construct it on every process at the same point (it may create a process group collectively).
    """

    def __init__(self):
        self.world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world_size > 1 else 0
        self.group = _feature_group() if self.world_size > 1 else None

    def _all_max(self, sizes: list[int], device) -> list[int]:
        sizes = torch.tensor(sizes, dtype=torch.long, device=device)  # NCCL reduces device tensors only
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX, group=self.group)
        return sizes.tolist()

    def _pad_to_global(self, tensor: torch.Tensor, pad_value) -> torch.Tensor:
        return pad_to_shape(tensor, self._all_max(list(tensor.shape), tensor.device), pad_value)

    def gather_all(self, tensors: list[torch.Tensor], pad_values: list | None = None) -> list[torch.Tensor]:
        """All processes' tensors concatenated on dim 0 (rank order), each padded on every dim (dim 0 too) to the
        largest with its pad value (default 0; check a gathered mask to know which rows are real). Tensors that
        require grad are gathered by one differentiable node."""
        if self.world_size == 1:
            return list(tensors)
        pad_values = pad_values or [0] * len(tensors)
        padded = [self._pad_to_global(t, v) for t, v in zip(tensors, pad_values)]
        with_grad = [i for i, t in enumerate(padded) if t.requires_grad]
        gathered = [None] * len(padded)
        if with_grad:
            for i, t in zip(with_grad, _AllGather.apply(self.group, *[padded[i] for i in with_grad])):
                gathered[i] = t
        for i, tensor in enumerate(padded):
            if gathered[i] is None:
                parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
                dist.all_gather(parts, tensor.contiguous(), group=self.group)
                gathered[i] = torch.cat(parts, dim=0)
        return gathered

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over processes, without gradient (counts, normalisers)."""
        if self.world_size == 1:
            return tensor
        tensor = tensor.detach().clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor
