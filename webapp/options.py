"""Generation options as the page sees them: each option's default and range, served to the
page (the root element's ``data-options``) so no default is written in JavaScript or HTML."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def page_options(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"default", "min", "max", "step"}}`` for the settings the page offers."""
    return {
        "temperature": {"default": 0.7, "min": 0.0, "max": 2.0, "step": 0.1},
        "top_p": {"default": 0.95, "min": 0.0, "max": 1.0, "step": 0.05},
        "max_tokens": {"default": config["MAX_TOKENS"], "min": 1, "max": config["MAX_TOKENS_LIMIT"],
                       "step": 1},
        "seed": {"default": None, "min": 0, "max": 2**32 - 1, "step": 1},
        "system": {"default": None, "max_length": config["MAX_MESSAGE_CHARS"]},
    }
