"""Issue 15: the processors take transformers' `ProcessingKwargs` as `CLIPProcessor` does, map model boxes back to
pixels with OWLv2's `target_sizes=` convention, and share one box rule; `import processing` stays light."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPProcessor, processing_utils
from transformers.utils import ModelOutput

from processing import CLOCProcessor, OCCLIPProcessor, bundled_clip_tokenizer
from processing.boxes import box_problem, check_box
from processing.vesl import select_regions
from training.data import BadSample, _check_metadata_row, check_regions

ROOT = Path(__file__).resolve().parents[2]
CAPTIONS = ["a red cube to the left of a blue sphere on a wooden table in a sunny room", "a small brown dog"]
GRAPHS = [
    {
        "objects": [{"name": "cube", "attributes": ["red"]}, {"name": "sphere", "attributes": ["blue"]}],
        "relations": [{"subject": 0, "predicate": "left of", "object": 1}],  # canonical: "to the left of"
    },
    {"objects": [{"name": "dog", "attributes": ["small", "brown"]}], "relations": []},
]

# The call-time kwargs of CLIPProcessor's own tests and docs; each must give CLIPProcessor's tensors.
CLIP_KWARGS = [
    {"padding": True},
    {"padding": "max_length", "max_length": 24},
    {"padding": "max_length", "max_length": 8, "truncation": True},
    {"padding": True, "truncation": True, "max_length": 6},
    {"text_kwargs": {"padding": "max_length", "max_length": 20}},
    {"padding": True, "images_kwargs": {"do_normalize": False}},
    {"padding": True, "truncation": True, "max_length": 16, "pad_to_multiple_of": 8},
]


def image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def clip_processor() -> CLIPProcessor:
    return CLIPProcessor(image_processor(), bundled_clip_tokenizer())


def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 60, 3), dtype=np.uint8)) for i in range(2)]


# ------------------------------------------------------------------------------------------- ProcessingKwargs


@pytest.mark.parametrize("kwargs", CLIP_KWARGS)
@pytest.mark.parametrize("return_tensors", ["pt", "np"])
def test_cloc_text_and_pixels_equal_clip_processor(kwargs, return_tensors):
    # Used to raise `TypeError: ImagesKwargs.__init__() got an unexpected keyword argument 'padding'`.
    ours = CLOCProcessor(image_processor())(images=images(), text=CAPTIONS, return_tensors=return_tensors, **kwargs)
    clip = clip_processor()(images=images(), text=CAPTIONS, return_tensors=return_tensors, **kwargs)
    assert set(ours) == set(clip) == {"input_ids", "attention_mask", "pixel_values"}
    for key in clip:
        assert type(ours[key]) is type(clip[key])
        np.testing.assert_array_equal(np.asarray(ours[key]), np.asarray(clip[key]), err_msg=key)


def test_cloc_known_lengths_and_text_only_call():
    processor = CLOCProcessor(image_processor())
    long = processor(text=CAPTIONS, padding="max_length", max_length=24)
    assert long["input_ids"].shape == (2, 24) and long["attention_mask"].sum(1).tolist() == [20, 6]
    short = processor(text=CAPTIONS, max_length=6)  # default truncation=True, as the trainer relies on
    assert short["input_ids"][0].tolist() == [49406, 320, 736, 11353, 531, 49407]


def test_cloc_region_captions_follow_the_text_kwargs():
    processor, tokenizer = CLOCProcessor(image_processor()), bundled_clip_tokenizer()
    boxes = [[[10, 5, 30, 25], [0, 0, 60, 40]], [[5, 10, 25, 30]]]
    captions = [["a white box", "the whole picture of the scene"], ["a box"]]
    out = processor(images=images(), input_boxes=boxes, region_captions=captions, padding="max_length", max_length=9)
    expected = tokenizer(["a white box", "the whole picture of the scene", "a box"], padding="max_length",
                         max_length=9, truncation=True, return_tensors="pt")  # fmt: skip
    assert out["region_input_ids"].shape == (2, 2, 9)
    torch.testing.assert_close(out["region_input_ids"][0], expected["input_ids"][:2], atol=0, rtol=0)
    torch.testing.assert_close(out["region_input_ids"][1, 0], expected["input_ids"][2], atol=0, rtol=0)
    assert out["region_attention_mask"][1, 1].sum() == 0  # the padded box slot
    # padding=False cannot hold a [images, boxes, tokens] table: region captions still pad to the longest.
    ragged = processor(images=images(), input_boxes=boxes, region_captions=captions, padding=False)
    assert ragged["region_input_ids"].shape == (2, 2, 8)


def test_cloc_refuses_call_time_geometry_since_boxes_follow_the_image_processor():
    with pytest.raises(ValueError, match="crop_size, size given at call time: boxes are normalised"):
        CLOCProcessor(image_processor())(images=images(), size={"shortest_edge": 64}, crop_size=64)


@pytest.mark.parametrize("kwargs", [kw for kw in CLIP_KWARGS if "images_kwargs" in kw] + [{"padding": True}])
def test_occlip_pixels_equal_clip_processor(kwargs):
    # Used to raise the same TypeError for `OCCLIPProcessor(images=..., text=..., padding=True)`.
    ours = OCCLIPProcessor(image_processor())(images=images(), text=CAPTIONS[1:], **kwargs, return_tensors="pt")
    clip = clip_processor()(images=images(), **kwargs, return_tensors="pt")
    torch.testing.assert_close(ours["pixel_values"], clip["pixel_values"], atol=0, rtol=0)


@pytest.mark.parametrize(
    "kwargs, width",
    [
        ({}, 6),  # default: longest phrase ("to the left of" = 4 words + 2 special tokens)
        ({"padding": True}, 6),
        ({"padding": "max_length", "max_length": 12}, 12),
        ({"text_kwargs": {"padding": "max_length", "max_length": 10}}, 10),
        ({"truncation": True, "max_length": 4}, 4),
        ({"padding": True, "max_length": 16, "pad_to_multiple_of": 8}, 8),
    ],
)
def test_occlip_phrase_tokens_follow_clip_padding_rules(kwargs, width):
    processor = OCCLIPProcessor(image_processor())
    out = processor(scene_graphs=GRAPHS, **kwargs)
    assert out["node_input_ids"].shape[-1] == out["relation_input_ids"].shape[-1] == width
    clip = clip_processor()
    phrases = {(0, 0): "red cube", (0, 1): "blue sphere", (1, 0): "small brown dog"}
    flat = kwargs.get("text_kwargs", kwargs)
    clip_kwargs = {"padding": True, "truncation": True, "max_length": processor.max_phrase_length, **flat}
    for (b, m), phrase in phrases.items():
        # Each phrase row is CLIPProcessor's tokens of that phrase with the same kwargs, padded to the table width.
        ids = clip(text=[phrase], **clip_kwargs, return_tensors="pt")["input_ids"][0]
        assert out["node_input_ids"][b, m, : len(ids)].tolist() == ids.tolist()
        assert out["node_attention_mask"][b, m].sum() == sum(i != 49407 for i in ids.tolist()) + 1
    relation = clip(text=["to the left of"], **clip_kwargs, return_tensors="pt")["input_ids"][0]
    assert out["relation_input_ids"][0, 0, : len(relation)].tolist() == relation.tolist()


def test_occlip_phrase_padding_false_is_refused_and_own_keywords_still_work():
    processor = OCCLIPProcessor(image_processor(), max_phrase_length=4)
    with pytest.raises(ValueError, match="padding=False: the node and predicate phrases form"):
        processor(scene_graphs=GRAPHS, padding=False)
    with pytest.raises(ValueError, match="got 2 images and 1 captions"):
        processor(images=images(), scene_graphs=GRAPHS[:1], paired=True, padding=True)
    out = processor(images=images(), scene_graphs=GRAPHS, paired=True, return_tensors="np")
    assert isinstance(out["node_input_ids"], np.ndarray) and out["node_input_ids"].shape == (2, 2, 4)  # max_phrase
    assert out["node_input_ids"][1, 0].tolist() == [49406, 2442, 2866, 49407]  # "small brown dog" cut to 4 tokens


@pytest.mark.parametrize("kwargs", CLIP_KWARGS[:5])
def test_occlip_caption_tokens_on_request_equal_clip_processor(kwargs):
    processor = OCCLIPProcessor(image_processor())
    out = processor(images=images(), text=CAPTIONS, return_caption_tokens=True, **kwargs)
    clip = clip_processor()(images=images(), text=CAPTIONS, return_tensors="pt", **kwargs)
    for key in clip:
        torch.testing.assert_close(out[key], clip[key], atol=0, rtol=0)
    graphs = processor(images=images(), text=CAPTIONS, **kwargs)
    assert "input_ids" not in graphs  # off by default: training needs only the graphs
    for key in graphs:
        torch.testing.assert_close(out[key], graphs[key], atol=0, rtol=0)
    with pytest.raises(ValueError, match="return_caption_tokens=True needs the captions as text="):
        processor(scene_graphs=GRAPHS, return_caption_tokens=True)


def test_unknown_keyword_is_reported_not_silently_used(monkeypatch):
    warnings = []
    monkeypatch.setattr(processing_utils.logger, "warning_once", warnings.append)
    CLOCProcessor(image_processor())(text=CAPTIONS, paddding=True)  # transformers' warning, as for CLIPProcessor
    assert any("Keyword argument `paddding` is not a valid argument" in w for w in warnings)


# ------------------------------------------------------------------------------------------- post-processing


def test_post_process_grounding_takes_target_sizes_as_owlv2():
    processor = CLOCProcessor(image_processor())
    # 60 x 40 image: shortest edge 40 -> 32 (scale 0.8), 48 x 32, crop 32 at left 8; 60 x 48 image: scale 2/3,
    # 40 x 32, crop at left 4, so the full frame is x 4..36 of 40, i.e. 6..54 of 60.
    predicted = torch.tensor([[[0.0, 0.125, 0.5, 0.625], [0.25, 0.25, 0.75, 0.75]], [[0.0, 0.0, 1.0, 1.0]] * 2])
    results = processor.post_process_grounding(predicted, target_sizes=[(40, 60), (48, 60)])
    torch.testing.assert_close(results[0]["boxes"], torch.tensor([[10.0, 5.0, 30.0, 25.0], [20.0, 10.0, 40.0, 30.0]]))
    torch.testing.assert_close(results[1]["boxes"], torch.tensor([[6.0, 0.0, 54.0, 48.0]] * 2))
    # A model output with a grounding mask keeps the grounded captions; target_sizes=None keeps normalised boxes.
    output = ModelOutput(predicted_boxes=predicted, grounding_mask=torch.tensor([[True, False], [True, True]]))
    masked = processor.post_process_grounding(output, target_sizes=torch.tensor([[40, 60], [48, 60]]))
    torch.testing.assert_close(masked[0]["boxes"], results[0]["boxes"][:1])
    torch.testing.assert_close(processor.post_process_grounding(predicted)[1]["boxes"], predicted[1])
    with pytest.raises(ValueError, match=r"one \(height, width\) per image: 1 for 2 images"):
        processor.post_process_grounding(predicted, target_sizes=[(40, 60)])
    with pytest.raises(ValueError, match=r"target_sizes\[1\] = \(48, 0\) is not a \(height, width\) pair"):
        processor.post_process_grounding(predicted, target_sizes=[(40, 60), (48, 0)])
    with pytest.raises(ValueError, match=r"target_sizes\[0\] = \('40', 60\) is not a \(height, width\) pair"):
        processor.post_process_grounding(predicted, target_sizes=[("40", 60), (48, 60)])
    in_numpy = processor.post_process_grounding(predicted, target_sizes=np.array([[40, 60], [48, 60]]))
    torch.testing.assert_close(in_numpy[1]["boxes"], results[1]["boxes"])


def test_boxes_round_trip_through_processor_and_post_processing():
    processor = CLOCProcessor(image_processor())
    boxes = [[[10, 5, 30, 25], [12.5, 7.5, 40, 30]], [[6, 8, 50, 44]]]
    inputs = processor(images=images(), input_boxes=boxes)
    sizes = [(image.height, image.width) for image in images()]
    back = processor.post_process_boxes(inputs["input_boxes"], sizes)
    torch.testing.assert_close(back[0], torch.tensor(boxes[0], dtype=torch.float32))
    torch.testing.assert_close(back[1, :1], torch.tensor(boxes[1], dtype=torch.float32))


# ------------------------------------------------------------------------------------------- one box rule


@pytest.mark.parametrize(
    "box, problem",
    [
        ([1, 2, 3, 4], None),
        ((1.5, 2, np.float32(3), 4), None),
        (torch.tensor([1.0, 2.0, 3.0, 4.0]), None),
        ([1, 2, 3], "box [1, 2, 3] is not 4 numbers [x0, y0, x1, y1]"),
        ("abcd", "box 'abcd' is not 4 numbers [x0, y0, x1, y1]"),
        ([1, 2, True, 4], "box [1, 2, True, 4] is not 4 numbers [x0, y0, x1, y1]"),
        ([1, 2, float("inf"), 4], "box [1, 2, inf, 4] holds NaN or infinity"),
        ([5, 2, 5, 4], "box [5, 2, 5, 4] needs x1 > x0 and y1 > y0"),
        ([1, 6, 5, 4], "box [1, 6, 5, 4] needs x1 > x0 and y1 > y0"),
    ],
)
def test_box_rule(box, problem):
    assert box_problem(box) == problem
    if problem is None:
        assert check_box(box, "here") == [float(v) for v in box]
    else:
        with pytest.raises(ValueError, match="^here: " + problem.replace("[", r"\[").replace("]", r"\]")):
            check_box(box, "here")


def test_processor_collator_reader_and_vesl_apply_the_same_rule(caplog):
    bad = [5, 5, 2, 8]
    with pytest.raises(ValueError, match=r"^image 0, box 0: box \[5, 5, 2, 8\] needs x1 > x0 and y1 > y0$"):
        CLOCProcessor(image_processor())(images=images()[:1], input_boxes=[[bad]])
    with pytest.raises(BadSample, match=r"^row 3, region 0: bbox \[5, 5, 2, 8\] needs x1 > x0 and y1 > y0$"):
        check_regions([{"bbox": bad, "text": "a"}], "row 3")
    with pytest.raises(ValueError, match=r"^region 0: bbox \[1, 2, 3\] is not 4 numbers"):
        _check_metadata_row({"file_name": "a.png", "regions": [{"bbox": [1, 2, 3]}]})
    # VESL writes only boxes the loader accepts: a NaN detection above the threshold is dropped.
    logits = torch.tensor([[4.0], [3.0]])
    detections = torch.tensor([[1.0, 1.0, float("nan"), 9.0], [2.0, 2.0, 8.0, 8.0]])
    regions = select_regions(logits, detections, ["a cat"], threshold=0.1, nms_iou=0.5)
    assert [r["bbox"] for r in regions] == [[2.0, 2.0, 8.0, 8.0]]
    assert check_regions(regions, "row 0") == ([[2.0, 2.0, 8.0, 8.0]], ["a cat"])


# ------------------------------------------------------------------------------------------- light import


def run_python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_processing_is_light_and_offline_tools_load_on_their_own():
    heavy = ["processing.vesl", "processing.vesl_data", "processing.llm_parser", "processing.dataset_parsing",
             "processing.open_clip_conversion", "spacy", "datasets"]  # fmt: skip
    out = run_python(f"import sys, processing; print([m for m in {heavy!r} if m in sys.modules])")
    assert out.strip() == "[]"  # before issue 15: VESL, the LLM parser and datasets were all imported
    out = run_python("import processing.vesl as v, processing.llm_parser as l; print(v.annotate.__name__, l.__name__)")
    assert out.split() == ["annotate", "processing.llm_parser"]
    out = run_python(
        "import processing; from processing import annotate, LLMSceneGraphParser, from_open_clip\n"
        "print(annotate.__module__, LLMSceneGraphParser.__module__, from_open_clip.__module__,"
        " sorted(set(processing.__all__) - set(dir(processing))))"
    )
    assert out.split() == ["processing.vesl", "processing.llm_parser", "processing.open_clip_conversion", "[]"]
