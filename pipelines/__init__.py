"""DALI graph definitions and the batch colour step (import ``nvidia.dali``, torch and numpy, never
``pillsnap_dali``).

``pipelines.colour`` (the colour step and the layout of the per-sample augmentation vector) needs torch and
numpy only: it is imported here at once, so the ``pil`` backend uses it where DALI is not installed. The
graph names import DALI when first used.
"""
import importlib

from .colour import AUG_FIELDS, AUG_INDEX, JITTER_FIELDS, BatchColour

_DALI_NAMES = {
    "classify": ("AUG", "ENCODED", "ROWS", "EvalSpec", "OutputSpec", "TrainSpec", "classify_pipeline",
                 "decode_graph", "eval_graph", "eval_resize_shorter", "train_graph"),
    "common": ("IMAGENET_MEAN", "IMAGENET_STD", "Input", "PipelineOptions", "build_pipeline"),
}
_MODULE_OF = {name: module for module, names in _DALI_NAMES.items() for name in names}

__all__ = ["AUG_FIELDS", "AUG_INDEX", "JITTER_FIELDS", "BatchColour", *_MODULE_OF]


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
