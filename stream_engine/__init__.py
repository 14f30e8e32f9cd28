"""stream-engine: streaming, batched, real-time Bark text-to-speech.

Importing the package is cheap: torch and transformers load with the engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "GenerationOptions", "Speech", "__version__"]

if TYPE_CHECKING:
    from .config import EngineConfig, GenerationOptions
    from .engine import Engine
    from .runtime.request import Speech


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name in ("EngineConfig", "GenerationOptions"):
        from . import config

        return getattr(config, name)
    if name == "Speech":
        from .runtime.request import Speech

        return Speech
    raise AttributeError(name)
