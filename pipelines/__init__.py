"""DALI graph definitions and the batch colour step (import ``nvidia.dali``, torch and numpy, never
``pillsnap_dali``)."""
from .classify import (AUG, AUG_FIELDS, ENCODED, ROWS, EvalSpec, OutputSpec, TrainSpec, classify_pipeline, decode_graph,
                       eval_graph, eval_resize_shorter, train_graph)
from .colour import BatchColour
from .common import IMAGENET_MEAN, IMAGENET_STD, Input, PipelineOptions, build_pipeline

__all__ = ["AUG", "AUG_FIELDS", "BatchColour", "ENCODED", "ROWS", "EvalSpec", "Input", "OutputSpec", "TrainSpec",
           "build_pipeline", "classify_pipeline", "decode_graph", "eval_graph", "eval_resize_shorter", "train_graph",
           "IMAGENET_MEAN", "IMAGENET_STD", "PipelineOptions"]
