"""Cross-attention tracing: processors that record attn2 statistics, layer metadata, token alignment."""

from .joint import READINGS, find_joint_attention_layers, is_mmdit, pipeline_tokenizer
from .layers import LayerInfo, find_cross_attention_layers, model_head_names, unet_head_names
from .processor import STAT_DOCS, LayerEdit, LayerRecorder, TracingAttnProcessor
from .record import Trace
from .tokens import (
    JointTokenizer,
    JointTokens,
    PromptTokens,
    PromptTooLongError,
    Word,
    WordNotFoundError,
    tokenize_prompt,
)
from .tracer import Generation, Tracer, default_image_hw, denoiser_of, generate

__all__ = [
    "READINGS",
    "STAT_DOCS",
    "Generation",
    "JointTokenizer",
    "JointTokens",
    "LayerEdit",
    "LayerInfo",
    "LayerRecorder",
    "PromptTokens",
    "PromptTooLongError",
    "Trace",
    "Tracer",
    "TracingAttnProcessor",
    "Word",
    "WordNotFoundError",
    "default_image_hw",
    "denoiser_of",
    "find_cross_attention_layers",
    "find_joint_attention_layers",
    "generate",
    "is_mmdit",
    "model_head_names",
    "pipeline_tokenizer",
    "tokenize_prompt",
    "unet_head_names",
]
