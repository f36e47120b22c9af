"""Batches and a worker for the two-process (gloo, CPU) loss tests: each process holds half of a batch."""

import datetime
import os

import torch
import torch.distributed as dist

from tests.factories import (
    EOS_ID,
    encode_graphs,
    example_graphs,
    random_pixels,
    tiny_clip_model,
    tiny_cloc_model,
    tiny_occlip_model,
)

CASES = ("clip", "clip_hard_negatives", "occlip", "cloc")


def captions(batch: int, seed: int, length: int = 6) -> torch.Tensor:
    """Random token ids ending in EOS (CLIP pools at the EOS position)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 90, (batch, length), generator=generator)
    ids[:, -1] = EOS_ID
    return ids


def build(case: str):
    """A seeded tiny model of the case's family (identical on every process)."""
    factory = {"clip": tiny_clip_model, "occlip": tiny_occlip_model, "cloc": tiny_cloc_model}[case.split("_")[0]]
    return factory(seed=11).train()


def objective(case: str):
    """The trainer's objective of the case (`clip_hard_negatives`: NegCLIP)."""
    from training.families import get_family

    return get_family(case.split("_")[0]).objective(hard_negatives=case == "clip_hard_negatives")


def hard_negative_batch(indices: range) -> dict:
    """Images `indices` of the 4-example batch; their captions, then one negative caption each."""
    ids, negatives = captions(4, seed=1), captions(4, seed=5)
    rows = list(indices)
    return dict(pixel_values=random_pixels(4, seed=21)[rows], input_ids=torch.cat([ids[rows], negatives[rows]]))


def rank_batches(case: str) -> list[dict]:
    """Two halves of a 4-example batch, each padded on its own (ragged dims differ between processes)."""
    pixels = random_pixels(4, seed=21)
    if case == "clip_hard_negatives":
        return [hard_negative_batch(range(i, i + 2)) for i in (0, 2)]
    if case == "clip":
        ids = captions(4, seed=1)
        return [dict(pixel_values=pixels[i : i + 2], input_ids=ids[i : i + 2]) for i in (0, 2)]
    if case == "occlip":
        graphs = example_graphs()
        return [dict(pixel_values=pixels[i : i + 2], **encode_graphs(graphs[i : i + 2])) for i in (0, 2)]
    ids = captions(4, seed=2)
    region_ids = captions(12, seed=3, length=4).view(4, 3, 4)
    region_ids[1, 2] = region_ids[0, 0]  # a duplicate caption across processes: masked as a negative
    boxes = torch.tensor(
        [
            [[0.1, 0.1, 0.5, 0.5], [0.2, 0.3, 0.9, 0.8], [0.0, 0.0, 1.0, 1.0]],
            [[0.5, 0.5, 0.9, 0.9], [0.0, 0.0, 0.25, 0.25], [0.4, 0.1, 0.6, 0.3]],
            [[0.3, 0.3, 0.7, 0.7], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
            [[0.1, 0.6, 0.4, 0.9], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]],
        ]
    )
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False], [False, False, False]])
    halves = []
    for i, regions in ((0, 3), (2, 1)):  # the second process pads to one box only
        halves.append(
            dict(
                pixel_values=pixels[i : i + 2],
                input_ids=ids[i : i + 2],
                input_boxes=boxes[i : i + 2, :regions],
                box_mask=mask[i : i + 2, :regions],
                region_input_ids=region_ids[i : i + 2, :regions],
            )
        )
    return halves


def full_batch(case: str) -> dict:
    """The concatenated batch as one process would see it."""
    from training.features import FeatureBatch

    halves = rank_batches(case)
    if case == "occlip":
        return dict(pixel_values=random_pixels(4, seed=21), **encode_graphs(example_graphs()))
    if case == "clip_hard_negatives":  # negatives follow all captions, not each half's
        return hard_negative_batch(range(4))
    return FeatureBatch.concat(halves)


def worker(rank: int, world: int, address: str, out: str, local_loss: bool) -> None:
    """Each process: DDP-wrapped model on its half; saves the averaged loss and the (DDP-averaged) gradients."""
    from torch.nn.parallel import DistributedDataParallel

    from training.distributed import FeatureGatherer
    from training.step import ContrastiveTrainingModule, forward_backward

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    # TCP store (as torchrun uses) and a collective timeout: a stuck process fails the test instead of hanging CI.
    dist.init_process_group(
        "gloo", init_method=address, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
    )
    results = {}
    for case in CASES:
        model = build(case)
        module = DistributedDataParallel(
            ContrastiveTrainingModule(model, objective(case), FeatureGatherer(), local_loss),
            find_unused_parameters=True,
        )
        loss, _ = forward_backward(module, [rank_batches(case)[rank]])
        dist.all_reduce(loss)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[case] = (loss / world, grads)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()
