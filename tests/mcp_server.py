"""A tiny MCP server for the tests (the SDK's MCPServer, formerly FastMCP): a tool that adds
two numbers, one that answers with hostile text, one that floods and one that hangs.

    python tests/mcp_server.py stdio
    python tests/mcp_server.py http PORT
"""

from __future__ import annotations

import os
import sys
import time

from mcp.server.mcpserver import MCPServer

HOSTILE = ('<img src=x onerror="document.title=\'pwned\'"><script>window.pwned=1</script>'
           '<a href="javascript:alert(1)">link</a> **bold** [x](javascript:alert(1))'
           '<svg onload="window.pwned=2"></svg><iframe srcdoc="<script>parent.pwned=3</script>">'
           '</iframe><style>body{display:none}</style>&lt;b&gt; \u202e')

server = MCPServer("bchat-test")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two whole numbers."""
    return str(a + b)


@server.tool()
def hostile(n: int) -> str:
    """Answer with text that would run script if rendered as HTML."""
    return HOSTILE


@server.tool()
def flood(n: int) -> str:
    """Answer with far more text than a tool result may hold."""
    return "y" * 200_000


@server.tool()
def gate(n: int) -> str:
    """Answer once the file $BCHAT_TEST_GATE is gone."""
    while os.path.exists(os.environ.get("BCHAT_TEST_GATE", "")):
        time.sleep(0.05)
    return "opened"


@server.tool()
def hang(n: int) -> str:
    """Never answer in time."""
    time.sleep(120)
    return "late"


if __name__ == "__main__":
    if sys.argv[1] == "stdio":
        server.run("stdio")
    else:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
