"""Diagnostics (`training/diagnostics.py`) against values computed by hand on tiny inputs.

On a 2x2 grid the patch centres are: 0 (0.25, 0.25), 1 (0.75, 0.25), 2 (0.25, 0.75), 3 (0.75, 0.75).
"""

import math

import pytest
import torch

from training.diagnostics import (
    binding_box_mass,
    chance_relation_loss,
    patch_box_mask,
    prompter_box_mass,
    ridge_classification_accuracy,
    ridge_regression_r2,
)

LEFT = [0.0, 0.0, 0.5, 1.0]  # patches 0, 2
TOP_RIGHT = [0.5, 0.0, 1.0, 0.5]  # patch 1
BOTTOM_RIGHT = [0.5, 0.5, 1.0, 1.0]  # patch 3
WHOLE = [0.0, 0.0, 1.0, 1.0]  # all patches
TINY = [0.6, 0.1, 0.7, 0.2]  # no patch centre inside; its centre (0.65, 0.15) lies in patch 1


def test_patch_box_mask_hand_values():
    boxes = torch.tensor([LEFT, TOP_RIGHT, BOTTOM_RIGHT, WHOLE])
    expected = torch.tensor(
        [[True, False, True, False], [False, True, False, False], [False, False, False, True], [True] * 4]
    )
    assert torch.equal(patch_box_mask(boxes, 2), expected)


def test_patch_box_mask_half_open_and_row_major():
    # x0 <= cx < x1: the centre (0.25, 0.25) is on the lower edge (in), (0.75, *) on the upper edge (out).
    assert patch_box_mask(torch.tensor([0.25, 0.25, 0.75, 0.75]), 2).tolist() == [True, False, False, False]
    # Row-major on a 4x4 grid: top row, right half -> patches (0, 2) and (0, 3) = indices 2 and 3.
    mask = patch_box_mask(torch.tensor([0.5, 0.0, 1.0, 0.25]), 4)
    assert mask.nonzero().flatten().tolist() == [2, 3]


def test_patch_box_mask_fallback_for_tiny_box():
    assert patch_box_mask(torch.tensor(TINY), 2).tolist() == [False, True, False, False]
    # A degenerate box at the far corner: its centre (1, 1) is clamped into the last patch.
    assert patch_box_mask(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2).tolist() == [False, False, False, True]


def test_patch_box_mask_keeps_leading_shape():
    boxes = torch.tensor([[LEFT, TINY, WHOLE]] * 2)  # [2, 3, 4]
    mask = patch_box_mask(boxes, 2)
    assert mask.shape == (2, 3, 4) and mask.dtype == torch.bool
    assert (mask.sum(-1) >= 1).all()


def _image0():
    attention = torch.tensor(
        [
            [0.4, 0.2, 0.3, 0.1],  # own (LEFT: 0, 2) 0.7, other (TOP_RIGHT: 1) 0.2
            [0.2, 1.2, 0.4, 0.2],  # sums to 2: normalised [0.1, 0.6, 0.2, 0.1] -> own 0.6, other 0.3
            [9.0, 9.0, 9.0, 9.0],  # invalid node: ignored
        ]
    )
    return attention, torch.tensor([LEFT, TOP_RIGHT, WHOLE]), torch.tensor([True, True, False])


def test_binding_box_mass_single_node_exact():
    attention, boxes, _ = _image0()
    # Only node 0 valid: node 1's box is not an "other" box, so nothing lies in other boxes.
    out = binding_box_mass(attention[None], boxes[None], torch.tensor([[True, False, False]]), grid=2)
    assert out["own_box"] == pytest.approx(0.7)
    assert out["other_boxes"] == pytest.approx(0.0)
    assert out["own_area"] == pytest.approx(0.5)


def test_binding_box_mass_two_images():
    attention0, boxes0, mask0 = _image0()
    attention1 = torch.tensor(
        [
            [0.25, 0.25, 0.25, 0.25],  # own WHOLE: 1.0; other (BOTTOM_RIGHT) overlaps own -> counts for own only: 0
            [0.5, 0.0, 0.0, 0.5],  # own BOTTOM_RIGHT 0.5; other = WHOLE minus own = patches 0, 1, 2 -> 0.5
            [0.0, 0.0, 0.0, 1.0],  # invalid
        ]
    )
    boxes1 = torch.tensor([WHOLE, BOTTOM_RIGHT, LEFT])
    attention = torch.stack([attention0, attention1])
    boxes = torch.stack([boxes0, boxes1])
    mask = torch.stack([mask0, torch.tensor([True, True, False])])

    first = binding_box_mass(attention[:1], boxes[:1], mask[:1], grid=2)
    assert first == pytest.approx({"own_box": 0.65, "other_boxes": 0.25, "own_area": 0.375})

    both = binding_box_mass(attention, boxes, mask, grid=2)
    # own (0.7 + 0.6 + 1.0 + 0.5) / 4, other (0.2 + 0.3 + 0 + 0.5) / 4, area (0.5 + 0.25 + 1 + 0.25) / 4.
    assert both == pytest.approx({"own_box": 0.7, "other_boxes": 0.25, "own_area": 0.5})
    assert all(isinstance(value, float) for value in both.values())


def test_binding_box_mass_rejects_wrong_patch_count():
    with pytest.raises(ValueError):
        binding_box_mass(torch.ones(1, 1, 5), torch.tensor([[WHOLE]]), torch.tensor([[True]]), grid=2)


def test_prompter_box_mass_hand_values():
    attention = torch.tensor(
        [
            [
                [0.2, 0.4, 0.2, 0.1, 0.1],  # CLS 0.2; LEFT patches 0, 2: (0.4 + 0.1) / 0.8 = 0.625
                [1.0, 0.2, 0.6, 0.1, 0.1],  # sums to 2: CLS 0.5; TINY falls back to patch 1: 0.6 / 1.0 = 0.6
                [0.0, 1.0, 1.0, 1.0, 1.0],  # invalid
            ]
        ]
    )
    boxes = torch.tensor([[LEFT, TINY, WHOLE]])
    mask = torch.tensor([[True, True, False]])
    out = prompter_box_mass(attention, boxes, mask, grid=2)
    # cls (0.2 + 0.5) / 2, inside (0.625 + 0.6) / 2, area (0.5 + 0.25) / 2.
    assert out == pytest.approx({"cls": 0.35, "inside_box": 0.6125, "box_area": 0.375})


def test_ridge_r2_exact_linear_target():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=generator) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 5.0]) + 7.0
    weights = torch.randn(6, 3, generator=generator)
    y = x @ weights + torch.tensor([1.0, -2.0, 0.5])
    r2 = ridge_regression_r2(x[:300], y[:300], x[300:], y[300:], alpha=1e-8)
    assert r2 == pytest.approx(1.0, abs=1e-9)
    # The default alpha shrinks only slightly with 300 samples; a 1-D target works too.
    assert ridge_regression_r2(x[:300], y[:300, 0], x[300:], y[300:, 0]) == pytest.approx(1.0, abs=1e-3)


def test_ridge_r2_independent_target_is_about_zero():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 5, generator=generator)
    y = torch.randn(20000, 2, generator=generator)
    r2 = ridge_regression_r2(x[:10000], y[:10000], x[10000:], y[10000:])
    assert abs(r2) < 0.01


def test_ridge_handles_constant_feature():
    x = torch.stack([torch.arange(10.0), torch.ones(10)], dim=1)
    y = 2 * x[:, 0] + 1
    assert ridge_regression_r2(x, y, x, y, alpha=1e-10) == pytest.approx(1.0, abs=1e-9)


def test_ridge_classification_separable_clusters():
    generator = torch.Generator().manual_seed(2)
    centres = torch.tensor([[0.0, 0.0], [20.0, 0.0], [0.0, 20.0], [20.0, 20.0]])
    labels = torch.arange(4).repeat(100)
    x = centres[labels] + torch.randn(400, 2, generator=generator)
    accuracy = ridge_classification_accuracy(x[:200], labels[:200], x[200:], labels[200:])
    assert accuracy == 1.0


def test_ridge_classification_label_ids_need_not_be_contiguous():
    labels = torch.tensor([3, 7] * 50)
    x = torch.where(labels == 3, -1.0, 1.0)[:, None] + 0.01 * torch.randn(100, 1)
    assert ridge_classification_accuracy(x, labels, x, labels) == 1.0


def test_ridge_classification_random_labels_at_chance():
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(12000, 8, generator=generator)
    labels = torch.randint(0, 4, (12000,), generator=generator)
    accuracy = ridge_classification_accuracy(x[:6000], labels[:6000], x[6000:], labels[6000:])
    assert accuracy == pytest.approx(0.25, abs=0.03)


def test_chance_relation_loss():
    assert chance_relation_loss(3) == pytest.approx(math.log(4))
    assert chance_relation_loss(0) == 0.0
    with pytest.raises(ValueError):
        chance_relation_loss(-1)
