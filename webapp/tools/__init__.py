"""Tools a model may call in the chat page's conversations: the built-ins and the admin's MCP
servers, behind one registry (registry.py). The server-run loop that calls them is in
runs/service.py; ``/v1`` never runs tools (its clients run their own)."""

from __future__ import annotations

from typing import Any

from .builtins import BUILTINS
from .registry import ToolRegistry


def build_tools(config: Any) -> ToolRegistry:
    """The tools of one app instance: the built-ins, and the MCP servers of BCHAT_MCP_FILE."""
    hub = None
    if config.get("MCP_FILE"):
        from .mcp import McpHub, load_servers

        hub = McpHub(load_servers(config["MCP_FILE"]))
    return ToolRegistry(list(BUILTINS), hub)


__all__ = ["ToolRegistry", "build_tools"]
