"""One `ModelFamily` object per model: the collator, the scorer and the trainer's choices come from it, so a new
family is one object."""

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPProcessor

from processing.clip_tokenizer import bundled_clip_tokenizer
from tests.factories import clip_vocab_text_config, tiny_vision_config
from training.data import TrainingCollator
from training.evaluation import ImageTextScorer
from training.families import FAMILIES, CLIPFamily, get_family
from training.trainer import default_processor


def test_each_family_owns_its_classes_and_trainer_settings():
    assert sorted(FAMILIES) == ["clip", "cloc", "occlip"]
    assert get_family("cloc").logit_scale_names == ("logit_scale", "region_logit_scale")
    assert get_family("occlip").new_module_prefixes == ("binding.", "similarity.")
    assert get_family("clip").objective(hard_negatives=True).hard_negatives
    with pytest.raises(ValueError, match="hard negatives are a CLIP baseline; cloc"):
        get_family("cloc").objective(hard_negatives=True)
    with pytest.raises(ValueError, match=r"family must be one of \['clip', 'cloc', 'occlip'\], got 'siglip'"):
        get_family("siglip")
    assert type(default_processor("occlip", 32)).__name__ == "OCCLIPProcessor"


class CaptionUpperFamily(CLIPFamily):
    """A family differing from CLIP only in its collation and scoring, as a new model family would."""

    name = "clip_upper"

    def model_inputs(self, processor, prepared):
        for row in prepared:
            row["caption"] = row["caption"].upper()
        return super().model_inputs(processor, prepared)

    def score(self, model, image_features, text_features):
        return -super().score(model, image_features, text_features)


def test_a_new_family_is_one_object_used_by_the_collator_and_the_scorer():
    from transformers import CLIPConfig, CLIPModel

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=bundled_clip_tokenizer())
    rows = [{"image": Image.new("RGB", (40, 32), colour), "caption": text} for colour, text in [("red", "a cube")]]
    rows.append({"image": Image.new("RGB", (40, 32), "blue"), "caption": "a sphere"})
    batch = TrainingCollator(processor, CaptionUpperFamily())(rows)
    expected = processor.tokenizer(["A CUBE", "A SPHERE"], padding=True, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(batch["input_ids"], expected)
    torch.manual_seed(0)
    config = CLIPConfig(text_config=clip_vocab_text_config(), vision_config=tiny_vision_config(), projection_dim=24)
    model = CLIPModel(config)
    images, texts = [r["image"] for r in rows], ["a cube", "a sphere"]
    plain = ImageTextScorer(model, processor, "clip").similarity(images, texts)
    upper = ImageTextScorer(model, processor, CaptionUpperFamily())
    assert upper.family == "clip_upper"
    torch.testing.assert_close(upper.similarity(images, texts), -plain)
    with torch.no_grad():
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        tokens = processor.tokenizer(texts, padding=True, return_tensors="pt")
        image = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
        text = torch.nn.functional.normalize(model.get_text_features(**tokens).pooler_output, dim=-1)
    torch.testing.assert_close(plain, image @ text.t(), atol=1e-5, rtol=1e-5)
