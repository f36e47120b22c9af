"""One optimisation step's forward/backward: plain, or open_clip-style cached-feature accumulation.

With several micro-batches, pass 1 computes every micro-batch's features without gradients; pass 2 recomputes
one micro-batch at a time with gradients, splices it into the cache and backpropagates the loss of the whole
(effective) batch, so each micro-batch sees all the others as negatives. The loss's own parameters (logit scale,
OC-CLIP's binding module in the scoring, CLOC's heads) would collect their direct gradient once per micro-batch;
only the last pass lets it through, the others backpropagate through the fresh features alone. Dropout draws
are replayed from the RNG state saved in pass 1.
"""

import contextlib

import torch
from torch import nn

from .distributed import Gatherer
from .objectives import splice_features


def _rng_state():
    return torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None


def _set_rng_state(state) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _differentiable(features: dict) -> list[torch.Tensor]:
    return [t for t in features.values() if isinstance(t, torch.Tensor) and t.requires_grad]


class ContrastiveTrainingModule(nn.Module):
    """The model plus its objective's loss module (`training.losses`), so that the loss is computed inside `forward`.

    DDP (`find_unused_parameters=True`) then sees every parameter the loss uses, including those used only by
    the loss (logit scales, OC-CLIP's scoring head) and those a batch leaves out (CLOC without regions, OC-CLIP's
    unused global projection). `trusted_inputs=True` is for batches made by the family's processor only.
    """

    def __init__(
        self,
        model: nn.Module,
        objective,
        gatherer: Gatherer | None = None,
        local_loss: bool = False,
        trusted_inputs: bool = False,
    ):
        super().__init__()
        self.model = model
        self.objective = objective
        self.loss = objective.build_loss(gatherer, local_loss)
        # True only where every batch comes from the family's processor (the trainer's `TrainingCollator`):
        # the model then skips the input checks that need host syncs. Hand-made batches keep them.
        self.trusted_inputs = trusted_inputs

    def features(self, batch: dict) -> dict:
        """The objective's features of one batch."""
        outputs = self.model(**batch, **self.objective.forward_kwargs(trusted_inputs=self.trusted_inputs))
        return self.objective.features(outputs, batch)

    def forward(self, batch: dict, cache=None, index: int | None = None):
        """`(loss, parts, fresh features)`; with `cache`, micro-batch `index`'s features are spliced into it."""
        fresh = self.features(batch)
        features = fresh if cache is None else splice_features(cache, index, fresh)
        loss, parts = self.objective.loss(self.model, features, self.loss)
        return loss, parts, fresh


def forward_backward(
    module,
    micro_batches: list[dict],
    backward=None,
    no_sync=None,
    autocast=None,
) -> tuple[torch.Tensor, dict]:
    """Run forward and backward for one optimisation step; returns the (detached) loss and its parts.

    `module` is a `ContrastiveTrainingModule`, possibly wrapped (DDP). `backward(loss)` defaults to
    `loss.backward()` (pass `accelerator.backward` for mixed precision); `no_sync(module)` is a context manager
    that skips gradient synchronisation (`accelerator.no_sync`) for all but the last backward; `autocast()`
    (`accelerator.autocast`) puts the no-grad caching pass under the same mixed precision as the module's forward.
    """
    backward = backward or (lambda loss: loss.backward())
    no_sync = no_sync or (lambda _: contextlib.nullcontext())
    if len(micro_batches) == 1:
        loss, parts, _ = module(micro_batches[0])
        backward(loss)
        return loss.detach(), parts

    inner = getattr(module, "module", module)
    cache, states = [], []
    with torch.no_grad(), (autocast or contextlib.nullcontext)():
        for batch in micro_batches:
            states.append(_rng_state())
            cache.append(inner.features(batch))
    end_state = _rng_state()
    last = len(micro_batches) - 1
    for index, batch in enumerate(micro_batches):
        _set_rng_state(states[index])
        with no_sync(module) if index < last else contextlib.nullcontext():
            loss, parts, fresh = module(batch, cache, index)
            if index < last:
                tensors = _differentiable(fresh)
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                pairs = [(t, g) for t, g in zip(tensors, grads) if g is not None]
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            else:
                backward(loss)
    _set_rng_state(end_state)
    return loss.detach(), parts


__all__ = ["ContrastiveTrainingModule", "forward_backward"]
