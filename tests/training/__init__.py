"""Tests of training/: trainer, families, losses, data, evaluation, the synthetic benchmark and the commands."""
