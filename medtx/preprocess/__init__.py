"""Preprocessing of T1 scans: bet -> flirt -> n4 -> pool -> normalize.

One module per step; each step function reads and writes files, records its
provenance, and is what a Snakemake rule (through ``medtx step``) calls.
"""

STEPS = ("bet", "flirt", "n4", "pool", "normalize")
