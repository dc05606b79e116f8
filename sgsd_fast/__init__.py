"""sgsd_fast: Skill-Conditioned Gated Self-Distillation on one GPU."""

__version__ = "0.1.0"
