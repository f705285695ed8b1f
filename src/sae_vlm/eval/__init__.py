"""Scoring SAEs: monosemanticity, reconstruction, top images, hierarchy; `run.py` chains them for evaluate."""

from sae_vlm.eval.ms import monosemanticity_score

__all__ = ["monosemanticity_score"]
