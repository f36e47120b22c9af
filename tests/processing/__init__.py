"""Tests of processing/: processors, tokenizer, scene-graph parsers, region tasks, VESL, input checks."""
