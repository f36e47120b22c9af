"""`FeatureBatch` pads by name and dtype (masks False, ids and keys -1, else 0) when it concatenates and gathers."""

import torch

from training.distributed import pad_to_shape
from training.features import FeatureBatch


def parts():
    first = FeatureBatch(
        node_embeds=torch.ones(1, 2, 3),
        node_mask=torch.tensor([[True, True]]),
        relation_predicate_id=torch.tensor([[4]]),
        region_caption_keys=torch.tensor([[7, 8]]),
        box_mask=None,
    )
    second = FeatureBatch(
        node_embeds=torch.full((1, 1, 3), 2.0),
        node_mask=torch.tensor([[True]]),
        relation_predicate_id=torch.tensor([[5, 6]]),
        region_caption_keys=torch.tensor([[9]]),
        box_mask=None,
    )
    return first, second


def test_concat_pads_each_tensor_with_its_own_value():
    joined = FeatureBatch.concat(list(parts()))
    torch.testing.assert_close(joined["node_embeds"][1], torch.tensor([[2.0, 2.0, 2.0], [0.0, 0.0, 0.0]]))
    assert joined["node_mask"].tolist() == [[True, True], [True, False]]
    assert joined["relation_predicate_id"].tolist() == [[4, -1], [5, 6]]
    assert joined["region_caption_keys"].tolist() == [[7, 8], [9, -1]]
    assert joined["box_mask"] is None


class TwoProcesses:
    """A `Gatherer` as rank 0 of two processes whose other process holds `other` (padded as FeatureGatherer does:
    every dim, dim 0 too, to the largest)."""

    rank, world_size = 0, 2

    def __init__(self, other: FeatureBatch):
        self.other = [tensor for tensor in other.values() if tensor is not None]
        self.pads = None

    def gather_all(self, tensors, pad_values=None):
        self.pads = pad_values
        out = []
        for own, theirs, pad in zip(tensors, self.other, pad_values):
            shape = [max(a, b) for a, b in zip(own.shape, theirs.shape)]
            out.append(torch.cat([pad_to_shape(own, shape, pad), pad_to_shape(theirs, shape, pad)]))
        return out

    def all_reduce_sum(self, tensor):
        return tensor


def test_gather_lines_pad_values_up_by_name():
    first, second = parts()
    gatherer = TwoProcesses(second)
    gathered = first.gather(gatherer)
    assert gatherer.pads == [0, False, -1, -1]
    for name, tensor in FeatureBatch.concat([first, second]).items():
        if tensor is None:
            assert gathered[name] is None
        else:
            torch.testing.assert_close(gathered[name], tensor)
    assert first.gather(None) == first  # one process: itself
