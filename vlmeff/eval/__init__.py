"""Evaluation for `vlmeff eval`: `vlmeff.eval.metrics` scores predictions the way each benchmark's reference
implementation does, so that numbers compare with published ones."""
