"""Short OC-CLIP smoke run on CPU: train a tiny model on four drawn scenes and print its scores.

Each image holds two coloured squares side by side; its caption is a scene graph such as
"red square" -left of-> "blue square". The image whose colours are swapped is the hard negative that a
bag-of-words CLIP cannot tell apart. Run: `python examples/occlip_smoke.py [--steps 150]`.
"""

import argparse
import time

import torch

from modeling_occlip import OCCLIPConfig, OCCLIPModel

WORDS = ["<pad>", "red", "green", "blue", "yellow", "square", "left", "of"]
BOS, EOS = len(WORDS), len(WORDS) + 1
COLOURS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0), "yellow": (1.0, 1.0, -1.0)}
SCENES = [("red", "blue"), ("blue", "red"), ("green", "yellow"), ("yellow", "green")]


def tokens(text: str, length: int = 6) -> list[int]:
    """Word-level toy tokenizer: bos + words + eos, padded with 0."""
    ids = [BOS, *(WORDS.index(w) for w in text.split()), EOS]
    return ids + [0] * (length - len(ids))


def draw(left: str, right: str, size: int = 32) -> torch.Tensor:
    """A grey image with a `left`-coloured square on the left and a `right`-coloured one on the right."""
    image = torch.zeros(3, size, size)
    image[:, 10:22, 2:14] = torch.tensor(COLOURS[left])[:, None, None]
    image[:, 10:22, 18:30] = torch.tensor(COLOURS[right])[:, None, None]
    return image


def graphs(scenes):
    """Padded graph tensors: two nodes ("red square", "blue square") and one relation "left of" per scene."""
    nodes = torch.tensor([[tokens(f"{a} square"), tokens(f"{b} square")] for a, b in scenes])
    relations = torch.tensor([[tokens("left of")] for _ in scenes])
    return dict(
        node_input_ids=nodes,
        node_attention_mask=(nodes != 0).long(),
        relation_input_ids=relations,
        relation_attention_mask=(relations != 0).long(),
        relation_subject_index=torch.zeros(len(scenes), 1, dtype=torch.long),
        relation_object_index=torch.ones(len(scenes), 1, dtype=torch.long),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    text = dict(
        vocab_size=EOS + 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=8,
        projection_dim=64,
        pad_token_id=0,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=64,
    )
    binding = dict(
        hidden_size=64, num_default_queries=2, object_score_dim=32, relation_score_dim=32, initializer_range=0.1
    )
    model = OCCLIPModel(
        OCCLIPConfig(text_config=text, vision_config=vision, binding_config=binding, projection_dim=64)
    )
    pixels = torch.stack([draw(a, b) for a, b in SCENES])
    inputs = dict(pixel_values=pixels, **graphs(SCENES))
    print(f"OC-CLIP smoke run: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {args.steps} steps")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    model.train()
    for step in range(args.steps):
        out = model(**inputs, return_loss=True)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(
                f"step {step:4d}  loss {out.loss.item():.4f}  itc {out.loss_itc.item():.4f}  rel {out.loss_rel.item():.4f}"
            )
    model.eval()
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    captions = [f"{a} square left of {b} square" for a, b in SCENES]
    print(f"trained in {time.perf_counter() - start:.1f}s; structured logits (rows: images, columns: captions):")
    for i, (a, b) in enumerate(SCENES):
        row = "  ".join(f"{v:7.2f}" for v in logits[i].tolist())
        print(f"  image {a}|{b:<7} {row}")
    correct = sum(int(logits[i].argmax()) == i for i in range(len(SCENES)))
    print(f"image->caption top-1: {correct}/{len(SCENES)} (captions: {captions})")


if __name__ == "__main__":
    main()
