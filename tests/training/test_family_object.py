"""A model family is one object: the model card text, the hard-negative and equal-batch rules live on the
`ModelFamily`, so a new family (here a CLIP variant) needs no table edited elsewhere."""

import pytest

from tests.factories import tiny_clip_model
from training.families import FAMILIES, CLIPFamily, OCCLIPFamily
from training.model_card import ModelCardInfo, build_model_card, load_snippet
from training.trainer import ContrastiveTrainingArguments, _check_run


class VariantFamily(CLIPFamily):
    """A new family written as one object, as a SigLIP-based variant would be."""

    name = "variant"
    supports_hard_negatives = False
    card = ModelCardInfo(
        title="Variant",
        description="a variant model",
        tags=("variant",),
        pipeline_tag=None,
        usage="print(model)",
        remote_code=False,
    )


def test_a_new_family_gets_its_card_from_its_own_object(tmp_path):
    family = VariantFamily()
    args = ContrastiveTrainingArguments(output_dir=str(tmp_path / "variant_run"), train_data=str(tmp_path))
    card = build_model_card(tiny_clip_model(), family, args, {"loss": 1.5})
    assert card.data.tags == ["variant"] and card.data.pipeline_tag is None
    assert card.data.model_name == "Variant (variant_run)"
    assert "# Variant model" in card.text and "This folder holds a variant model, with" in card.text
    assert "trust_remote_code" not in card.text and "import modeling_cloc" not in card.text
    assert load_snippet(family).endswith("print(model)")
    assert "import modeling_cloc, modeling_occlip, processing" in load_snippet("occlip")  # remote-code families


def test_every_registered_family_says_what_its_card_needs():
    for name, family in FAMILIES.items():
        assert isinstance(family.card, ModelCardInfo), name
        assert family.card.remote_code == (name != "clip")
    assert [name for name, family in FAMILIES.items() if family.supports_hard_negatives] == ["clip"]
    assert [name for name, family in FAMILIES.items() if family.needs_equal_batches] == ["occlip"]


def test_the_trainer_reads_the_rules_from_the_family(tmp_path, monkeypatch):
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path / "out"), train_data=str(tmp_path), hard_negatives=True
    )
    with pytest.raises(ValueError, match="--hard_negatives is the CLIP baseline's option; variant trains without"):
        _check_run(args, VariantFamily())
    (tmp_path / "data").mkdir()
    args = ContrastiveTrainingArguments(
        output_dir=str(tmp_path / "out"), train_data=str(tmp_path / "data"), on_bad_sample="skip"
    )
    monkeypatch.setattr("training.trainer.accelerator_processes", lambda: 2)
    with pytest.raises(ValueError, match="--on_bad_sample skip is not supported for OC-CLIP with several processes"):
        _check_run(args, OCCLIPFamily())
