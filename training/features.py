"""`FeatureBatch`: named batch-first feature tensors that pad, concatenate and gather themselves.

Micro-batches (cached-feature accumulation) and processes (the gathered losses) pad their ragged dims differently;
joining them needs a pad value per tensor. Each tensor's pad value follows from its name and dtype (masks False,
ids that mean "no such item" -1, everything else 0), so callers never line pad values up by position.
"""

import torch

from .distributed import Gatherer, pad_to_shape

# Tensors whose padding must not collide with a real value: predicate ids and caption keys compare for equality.
PAD_BY_NAME = {"relation_predicate_id": -1, "region_caption_keys": -1}


class FeatureBatch(dict):
    """`{name: tensor [batch, ...] or None}`; `None` entries stay `None` through every operation."""

    @staticmethod
    def pad_value(name: str, tensor: torch.Tensor):
        """What pads `tensor` (named `name`) on a ragged dim: False for masks, -1 for ids and keys, else 0."""
        if tensor.dtype == torch.bool:
            return False
        return PAD_BY_NAME.get(name, 0)

    @classmethod
    def concat(cls, parts: list[dict]) -> "FeatureBatch":
        """The parts joined on dim 0, other dims padded to the largest with each tensor's pad value."""
        joined = cls()
        for name in parts[0]:
            tensors = [part[name] for part in parts]
            if tensors[0] is None:
                joined[name] = None
                continue
            shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
            value = cls.pad_value(name, tensors[0])
            joined[name] = torch.cat([pad_to_shape(t, [t.shape[0], *shape[1:]], value) for t in tensors], dim=0)
        return joined

    def gather(self, gatherer: Gatherer | None) -> "FeatureBatch":
        """Every process's tensors concatenated on dim 0 in rank order, with gradients (`Gatherer.gather_all`),
        each padded on every dim to the largest with its pad value; itself on one process."""
        names = [name for name, tensor in self.items() if tensor is not None]
        if gatherer is None or gatherer.world_size == 1 or not names:
            return FeatureBatch(self)
        pads = [self.pad_value(name, self[name]) for name in names]
        gathered = gatherer.gather_all([self[name] for name in names], pads)
        return FeatureBatch({**self, **dict(zip(names, gathered))})


__all__ = ["FeatureBatch", "PAD_BY_NAME"]
