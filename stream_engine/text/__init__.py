"""Text handling: cutting streamed text into segments Bark can say in one generation."""

from __future__ import annotations

from .segmenter import (
    DEFAULT_ABBREVIATIONS,
    Segmenter,
    SegmenterConfig,
    estimate_tokens,
    normalize_text,
)

__all__ = [
    "DEFAULT_ABBREVIATIONS",
    "Segmenter",
    "SegmenterConfig",
    "estimate_tokens",
    "normalize_text",
]
