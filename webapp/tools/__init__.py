"""Tools a model may call in the chat page's conversations: the built-ins and the admin's MCP
servers, behind one registry (registry.py). The server-run loop that calls them is in
runs/tools_loop.py; ``/v1`` never runs tools (its clients run their own)."""
