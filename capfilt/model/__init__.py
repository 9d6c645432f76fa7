"""MED (BLIP's image-text model): configs, the model, and conversion to and from published formats.

``capfilt.model.config`` imports without torch; the rest loads transformers on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from capfilt.model.config import MedConfig, get_config, list_configs

if TYPE_CHECKING:
    from capfilt.model.med import Med

__all__ = ["Med", "MedConfig", "create_med", "get_config", "list_configs"]


def create_med(name_or_config: str | MedConfig) -> Med:
    """A freshly initialised Med for a registry name (``"med-tiny"``), a JSON path, or a MedConfig."""
    from capfilt.model.med import Med

    config = name_or_config if isinstance(name_or_config, MedConfig) else get_config(name_or_config)
    return Med(config)


def __getattr__(name: str) -> Any:
    if name == "Med":
        from capfilt.model.med import Med

        return Med
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
