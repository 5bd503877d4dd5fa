"""evalkit: evaluation harness for cross-attention attribution in diffusers Stable Diffusion pipelines."""

__version__ = "0.1.0"
