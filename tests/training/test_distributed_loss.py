"""Two CPU processes (gloo, DDP) give the loss and gradients of one process on the concatenated batch, for the
CLIP, OC-CLIP and CLOC losses, with global and local loss; cached-feature accumulation gives the full-batch
gradient."""

import socket

import pytest
import torch
import torch.multiprocessing as mp

from tests.distributed_cases import CASES, build, full_batch, hard_negative_batch, objective, worker
from training.features import FeatureBatch
from training.step import ContrastiveTrainingModule, forward_backward


def single_process(case: str, micro_batches: list[dict]) -> tuple[torch.Tensor, dict]:
    model = build(case)
    loss, _ = forward_backward(ContrastiveTrainingModule(model, objective(case)), micro_batches)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(got, expected, what: str) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, expected
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, msg=f"{what}: loss")
    assert grads.keys() == ref_grads.keys(), what
    for name in ref_grads:
        # 1e-5 relative to the tensor's largest gradient: float32 sums in another order differ by ~1e-6 of it.
        scale = max(1.0, ref_grads[name].abs().max().item())
        difference = (grads[name] - ref_grads[name]).abs().max().item()
        assert difference <= 1e-5 * scale, f"{what}: {name} differs by {difference:.2e} (largest {scale:.2e})"


@pytest.mark.slow
@pytest.mark.parametrize("local_loss", [False, True])
def test_two_processes_match_one_process_on_the_concatenated_batch(tmp_path, local_loss):
    out = tmp_path / "results.pt"
    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    mp.start_processes(worker, args=(2, address, str(out), local_loss), nprocs=2, start_method="spawn")
    results = torch.load(out)
    for case in CASES:
        expected = single_process(case, [full_batch(case)])
        assert_same(results[case], expected, f"{case} (local_loss={local_loss})")
        if case == "cloc":
            assert expected[1]["box_head.fc2.weight"].abs().sum() > 0  # grounding took part


def test_model_forward_loss_is_the_objective_loss():
    """One process, no gatherer: the trainer's loss is exactly `model(..., return_loss=True).loss`."""
    for case in ("occlip", "cloc"):
        batch = full_batch(case)
        model = build(case)
        loss, _ = forward_backward(ContrastiveTrainingModule(model, objective(case)), [batch])
        torch.testing.assert_close(loss, model(**batch, return_loss=True).loss.detach(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_cached_feature_accumulation_gives_the_full_batch_gradient(case):
    batch = full_batch(case)
    micro = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(4)]
    if case == "occlip":  # each micro-batch padded on its own, as a data loader would
        micro = [FeatureBatch.concat([{k: v[i : i + 1] for k, v in batch.items()}]) for i in range(4)]
    if case == "clip_hard_negatives":
        micro = [hard_negative_batch(range(i, i + 1)) for i in range(4)]
    assert_same(single_process(case, micro), single_process(case, [batch]), f"{case} accumulation")


def test_hard_negative_loss_is_negclip():
    """Image-to-text softmax over all captions and all negatives; text-to-image over the images only."""
    batch = hard_negative_batch(range(4))
    model = build("clip_hard_negatives")
    loss, _ = forward_backward(ContrastiveTrainingModule(model, objective("clip_hard_negatives")), [batch])
    with torch.no_grad():
        out = model(**batch)
        images, texts = out.image_embeds, out.text_embeds
        logits = model.logit_scale.exp() * images @ texts.t()  # [4, 8]: captions then negatives
        targets = torch.arange(4)
        expected = 0.5 * (
            torch.nn.functional.cross_entropy(logits, targets)
            + torch.nn.functional.cross_entropy(logits[:, :4].t(), targets)
        )
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    plain = torch.nn.functional.cross_entropy(logits[:, :4], targets)
    assert torch.nn.functional.cross_entropy(logits, targets) > plain  # the negatives did enter the softmax


def test_hard_negatives_need_one_negative_per_image():
    batch = hard_negative_batch(range(4))
    batch["input_ids"] = batch["input_ids"][:6]
    with pytest.raises(ValueError, match="one negative caption per image"):
        forward_backward(ContrastiveTrainingModule(build("clip"), objective("clip_hard_negatives")), [batch])
