"""Evaluation metrics against hand-computed values, and the scorer against direct model computations."""

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from processing import CLOCProcessor, OCCLIPProcessor
from processing.clip_tokenizer import bundled_clip_tokenizer
from tests.factories import clip_vocab_text_config, tiny_vision_config
from training.evaluation import (
    ImageTextScorer,
    box_iou,
    evaluate_synthetic,
    grounding_accuracy,
    pairwise_accuracy,
    retrieval_recall,
    topk_accuracy,
    winoground_scores,
    zero_shot_scores,
)
from training.synthetic import make_synthetic_dataset


def test_retrieval_recall_by_hand():
    # 3 images, 4 captions (image 0 owns captions 0 and 3).
    similarity = torch.tensor(
        [
            [0.1, 0.9, 0.0, 0.8],  # image 0: best caption 1 (wrong), then 3 (right) -> R@1 miss, R@5 hit
            [0.2, 0.1, 0.3, 0.0],  # image 1: best caption 2 (wrong), then 0, then 1 (right) -> hit at rank 3
            [0.0, 0.0, 0.7, 0.1],  # image 2: caption 2 first -> hit
        ]
    )
    owner = torch.tensor([0, 1, 2, 0])
    metrics = retrieval_recall(similarity, owner, ks=(1, 2, 3))
    assert metrics["image_to_text_R@1"] == pytest.approx(1 / 3)
    assert metrics["image_to_text_R@2"] == pytest.approx(2 / 3)
    assert metrics["image_to_text_R@3"] == pytest.approx(1.0)
    # captions: 0 -> column [0.1, 0.2, 0.0] best image 1 (wrong, rank 2); 1 -> image 0 (wrong, owner 1 rank 2);
    # 2 -> image 2 (right); 3 -> image 0 (right).
    assert metrics["text_to_image_R@1"] == pytest.approx(2 / 4)
    assert metrics["text_to_image_R@2"] == pytest.approx(1.0)


def test_pairwise_winoground_topk_and_boxes_by_hand():
    assert pairwise_accuracy(torch.tensor([1.0, 0.2, 0.5]), torch.tensor([0.5, 0.3, 0.5])) == pytest.approx(1 / 3)
    scores = torch.tensor(
        [
            [[0.9, 0.1], [0.2, 0.8]],  # all right
            [[0.9, 0.1], [0.95, 0.8]],  # text right (0.9>0.1, 0.8>0.95? no) -> text wrong; image: 0.9>0.95 no
            [[0.6, 0.5], [0.4, 0.7]],  # text: .6>.5 & .7>.4 yes; image: .6>.4 & .7>.5 yes
            [[0.6, 0.5], [0.1, 0.4]],  # text: .6>.5 & .4>.1 yes; image: .6>.1 & .4>.5 no
        ]
    )
    assert winoground_scores(scores) == pytest.approx({"text_score": 0.75, "image_score": 0.5, "group_score": 0.5})
    logits = torch.tensor([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05]])
    assert topk_accuracy(logits, torch.tensor([2, 0]), ks=(1, 2)) == {"top1": 0.5, "top2": 1.0}
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 1.0, 1.0]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([1 / 7, 1.0]))
    assert grounding_accuracy(a, b) == 0.5


def processors():
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    tokenizer = bundled_clip_tokenizer()
    return image_processor, tokenizer


@torch.no_grad()
def test_scorer_matches_the_models_own_computations(tmp_path):
    from modeling_cloc import CLOCConfig, CLOCModel
    from modeling_occlip import OCCLIPConfig, OCCLIPModel
    from tests.factories import tiny_binding_config

    image_processor, tokenizer = processors()
    counts = make_synthetic_dataset(tmp_path, num_images=5, seed=0)
    assert counts["test_unseen"] == 1
    images = [Image.new("RGB", (40, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 30, 200))]
    texts = ["a red circle", "a blue square to the left of a green cross"]
    common = dict(text_config=clip_vocab_text_config(), vision_config=tiny_vision_config(), projection_dim=24)
    torch.manual_seed(0)
    cloc = CLOCModel(CLOCConfig(**common, prompter_config={"initializer_range": 0.2})).eval()
    scorer = ImageTextScorer(cloc, CLOCProcessor(image_processor, tokenizer), "cloc")
    pixels = image_processor(images, return_tensors="pt")["pixel_values"]
    ids = tokenizer(texts, padding=True, return_tensors="pt")
    expected = cloc(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
    torch.testing.assert_close(scorer.similarity(images, texts), expected.image_embeds @ expected.text_embeds.t())
    torch.testing.assert_close(
        scorer.pair_scores(images, texts), (expected.image_embeds * expected.text_embeds).sum(-1)
    )
    templates = ("a {}.", "a photo of a {}.")
    classes = ["red circle", "blue square", "green cross"]
    by_template = []
    for template in templates:
        ids = tokenizer([template.format(c) for c in classes], padding=True, return_tensors="pt")
        out = cloc(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"], pixel_values=pixels)
        by_template.append(out.image_embeds @ out.text_embeds.t())
    torch.testing.assert_close(zero_shot_scores(scorer, images, classes, templates), sum(by_template) / 2)
    metrics = evaluate_synthetic(scorer, tmp_path / "test_seen", region_mode="model")
    assert set(metrics) >= {"region_classification", "grounding_acc50", "shape_replace"}
    assert all(0.0 <= v <= 1.0 for v in metrics.values())

    occlip = OCCLIPModel(OCCLIPConfig(**common, binding_config=tiny_binding_config())).eval()
    processor = OCCLIPProcessor(image_processor, tokenizer)
    scorer = ImageTextScorer(occlip, processor, "occlip")
    inputs = processor(images=images, text=texts)
    direct = occlip.score(
        occlip.get_image_features(inputs["pixel_values"]),
        occlip.get_graph_features(**{k: v for k, v in inputs.items() if k != "pixel_values"}),
        scale=False,
    )
    torch.testing.assert_close(scorer.similarity(images, texts), direct)
    torch.testing.assert_close(scorer.pair_scores(images, texts), direct.diagonal())
    with pytest.raises(ValueError, match="region_scores needs a CLOC model"):
        scorer.region_scores(images, [[[0, 0, 5, 5]], [[1, 1, 9, 9]]], texts)


class TemplateScorer:
    """Scores that depend on the template: image i likes class i under "a {}." but class 0 under "big {}."."""

    def encode_images(self, images):
        return torch.tensor(images, dtype=torch.float)

    def encode_texts(self, texts):
        return texts

    def score(self, image_ids, texts):
        columns = []
        for text in texts:
            name = text.split()[-1].rstrip(".")
            cls = int(name[1:])
            columns.append(
                torch.full_like(image_ids, 3.0 if cls == 0 else 0.0)
                if text.startswith("big")
                else (image_ids == cls).float() * 2.0
            )
        return torch.stack(columns, dim=1)


def test_zero_shot_scores_average_templates():
    scorer = TemplateScorer()
    scores = zero_shot_scores(scorer, [0, 1, 2], ["c0", "c1", "c2"], templates=("a {}.", "big {}."))
    # class 0: (2*[i==0] + 3) / 2; others: 2*[i==c] / 2
    expected = torch.tensor([[2.5, 0.0, 0.0], [1.5, 1.0, 0.0], [1.5, 0.0, 1.0]])
    torch.testing.assert_close(scores, expected)
    assert topk_accuracy(scores, torch.tensor([0, 1, 2]), ks=(1,))["top1"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot_scores(scorer, [0], ["c0"], templates=("no slot",))
    with pytest.raises(ValueError, match="at least one class"):
        zero_shot_scores(scorer, [0], [])
