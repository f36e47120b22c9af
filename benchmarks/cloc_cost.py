"""CLOC cost on CPU at ViT-B/16 dimensions: region embeddings for 16 boxes per image from cached image tokens vs
one image-encoder forward (target <= 10%), and the Prompter's parameter count as a fraction of the vision tower.

Usage: `python benchmarks/cloc_cost.py [--images 8] [--boxes 16] [--repeats 3]`.
"""

import argparse
import time

import torch

from modeling_cloc import CLOCConfig, CLOCModel


def median_time(fn, repeats: int) -> float:
    """Median seconds of `fn()` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


@torch.no_grad()
def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--boxes", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = CLOCModel(CLOCConfig()).eval()
    size = model.config.vision_config.image_size
    pixels = torch.randn(args.images, 3, size, size)
    corners = torch.rand(args.images, args.boxes, 2, 2).sort(dim=2).values * 0.9
    boxes = torch.cat([corners[:, :, 0], corners[:, :, 1] + 0.05], dim=-1)  # x0 < x1, y0 < y1
    tokens = model.get_image_tokens(pixels)
    encoder = median_time(lambda: model.get_image_features(pixels), args.repeats)
    regions = median_time(lambda: model.get_region_features(image_tokens=tokens, input_boxes=boxes), args.repeats)
    tower = sum(p.numel() for p in model.vision_model.parameters())
    prompter = sum(p.numel() for p in model.prompter.parameters())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ViT-B/16 @ {size} px, fp32")
    print(f"  image encoder: {1000 * encoder / args.images:.1f} ms/image ({args.images} images)")
    print(
        f"  {args.boxes} region embeddings from cached tokens: {1000 * regions / args.images:.2f} ms/image "
        f"= {100 * regions / encoder:.1f}% of the encoder   target <= 10%"
    )
    print(
        f"  Prompter parameters: {prompter / 1e6:.2f} M = {100 * prompter / tower:.1f}% of the vision tower "
        f"({tower / 1e6:.1f} M)"
    )


if __name__ == "__main__":
    main()
