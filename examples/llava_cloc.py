"""Put a trained CLOC image tower into a LLaVA model built around any causal language model, then generate (the
image path and the Ferret-style region-token path), and optionally save a LLaVA folder stock transformers loads.

    python examples/llava_cloc.py --cloc_model CLOC_DIR --language_model LM_DIR \
        [--image photo.jpg] [--box 10 20 120 90] [--output_dir llava_cloc]

A thin wrapper: the script and its helpers (`build_llava`, `export_llava`, `load_llava_with_prompter`,
`region_inputs_embeds`) are `training/llava_cloc.py`, installed as the console script `occlip-cloc-llava-cloc`.
"""

from training.llava_cloc import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
