"""Inference: segment NIfTI scans with a trained checkpoint, label maps in the scans' own space.

Use from Python with :func:`infer_files`, or from the shell with ``python -m app.infer``
(``stochprop-infer``); see ``python -m app.infer --help``.
"""

from app.infer.engine import InferenceOptions, Result, Segmenter, infer_files

__all__ = ["InferenceOptions", "Result", "Segmenter", "infer_files"]
