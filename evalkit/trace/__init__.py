"""Cross-attention tracing: processors that record attn2 statistics, layer metadata, token alignment."""

from .layers import LayerInfo, find_cross_attention_layers, model_head_names, unet_head_names
from .processor import STAT_DOCS, LayerEdit, LayerRecorder, TracingAttnProcessor
from .tokens import PromptTokens, PromptTooLongError, Word, WordNotFoundError, tokenize_prompt
from .tracer import Generation, Trace, Tracer, generate

__all__ = [
    "STAT_DOCS",
    "Generation",
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
    "find_cross_attention_layers",
    "generate",
    "model_head_names",
    "tokenize_prompt",
    "unet_head_names",
]
