"""Tests of the model folders (modeling_occlip/, modeling_cloc/): forward, losses, init, save and remote code."""
