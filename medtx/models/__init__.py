"""Models: the Medical Transformer and its pre-training (pretext) losses."""

from medtx.models.slice_transformer import (
    PLANES,
    PRESETS,
    MedicalTransformer,
    PlaneEncoder,
    PlaneFeatures,
    SliceTransformer,
    build_model,
    count_parameters,
    inflate_stem,
    params_table,
)

__all__ = [
    "PLANES",
    "PRESETS",
    "MedicalTransformer",
    "PlaneEncoder",
    "PlaneFeatures",
    "SliceTransformer",
    "build_model",
    "count_parameters",
    "inflate_stem",
    "params_table",
]
