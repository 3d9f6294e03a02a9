"""medtx: the Medical Transformer study as a Snakemake workflow and a library.

Raw T1 MRI -> brain extraction -> affine to ICBM 2009c -> N4 -> 2x pooling ->
min-max, with per-step provenance; then folds, pre-training, fine-tuning and
evaluation (see docs/architecture.md).
"""

__version__ = "0.1.0"
