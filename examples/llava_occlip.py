"""Put a trained OC-CLIP image tower (exported as a stock CLIP tower) into a LLaVA model built around any causal
language model, generate, and optionally save a LLaVA folder stock transformers loads.

    python examples/llava_occlip.py --occlip_model OCCLIP_DIR --language_model LM_DIR \
        [--image photo.jpg] [--output_dir llava_occlip]

A thin wrapper: the script is `training/llava_occlip.py`, installed as the console script `occlip-cloc-llava-occlip`.
"""

from training.llava_occlip import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
