"""The browser engine's tool loop, served: the model runs in the page, but what it is told
and held to, the tools it calls and the steps it stores are the server's, as in the server
engines' loop (runs/service.py).

The page asks ``setup`` what its next reply is held to: bchat's tool instructions for the
system prompt and the GBNF grammar the embedded engine holds a reply to (engines/structured.py:
one call of an enabled tool in ``<tool_call>`` JSON, or with tool_choice "auto" free text),
which wllama's llama.cpp takes as its ``grammar`` parameter. A reply that is a call is posted
to ``step``: the calls are read back with the server's own parser, run through
``ToolRegistry.call`` (its time and size limits), and stored with ``store_tool_step``, the
same rows and the same ``step`` frame as a server step; its answer also says what the next
reply is held to. Only the built-ins run here: an MCP server's tools are the admin's, run for
the server engines alone.
"""

from __future__ import annotations

from typing import Any

from ..chats import ChatService
from ..engines.structured import (
    TOOL_OPEN,
    SchemaError,
    answer_grammar,
    build_grammar,
    call_parts,
    split_reply,
    tool_instructions,
)
from ..errors import AppError, Invalid, NotFound
from ..models import Provenance
from ..runs.run import step_frame, tool_call_frame, tool_result_frame
from .registry import MAX_CALLS_PER_STEP, Tool, ToolContext, ToolRegistry, result_message

PAGE_SOURCES = ("builtin",)  # what the browser engine may call: no server secret, no server


class PageTools:
    """The browser engine's tool steps, for one app instance."""

    def __init__(self, chats: ChatService, tools: ToolRegistry | None, config: Any) -> None:
        self.chats = chats
        self.tools = tools
        self.max_steps = int(config.get("TOOL_STEPS", 5))

    def setup(self, owner: str, conversation_id: str, parent_id: Any = None) -> dict[str, Any]:
        """What the page's next reply (under ``parent_id``: a user message, or the last tool
        result of a step) is told and held to. Refused when a tool the conversation has on
        runs only on the server: the page says so before anything is stored."""
        settings, steps = self.chats.page_tool_turn(owner, conversation_id, parent_id)
        return self._setup(settings, steps)

    def step(self, owner: str, conversation_id: str, message_id: Any, content: str,
             provenance: Provenance) -> dict[str, Any]:
        """Run and store the calls of reply ``message_id``, whose whole text is ``content``.
        Every check comes before any tool runs. Returns a ``step`` frame (as the socket
        sends it), the ``tool_call``/``tool_result`` frames of its calls, and ``next``: what
        the following reply is held to."""
        settings, steps = self.chats.page_tool_turn(owner, conversation_id, message_id,
                                                    reply=True)
        if steps >= self.max_steps:
            raise AppError("too_many_tool_steps", f"this reply comes after {steps} tool steps "
                           f"(BCHAT_TOOL_STEPS): it must answer in text")
        enabled = {t.name: t for t in self._page_tools(settings)}
        if not enabled:
            raise Invalid("tools_off", "this conversation has no tools on")
        text, _, calls = split_reply(content, tools=True)
        if not calls:
            raise Invalid("no_tool_calls", "the reply holds no tool call: "
                          f'{TOOL_OPEN}{{"name": …, "arguments": {{…}}}}</tool_call>')
        if len(calls) > MAX_CALLS_PER_STEP:
            raise Invalid("too_many_calls", f"at most {MAX_CALLS_PER_STEP} tool calls a step")
        for call in calls:
            name, arguments = call_parts(call)
            if name not in enabled:
                raise Invalid("tool_not_enabled", f"the tool {str(name)[:64]!r} is not on in "
                              "this conversation")
            if not isinstance(arguments, dict):
                raise Invalid("bad_arguments", f"the arguments of {name} must be a JSON object")
        following_setup = self._setup(settings, steps + 1)  # its refusals, too, before any tool runs
        context = ToolContext(owner=owner, conversation_id=conversation_id, db=self.chats.db)
        frames, results = [], []
        for index, call in enumerate(calls):
            name, arguments = call_parts(call)
            outcome = self.tools.call(name, arguments, context)
            result = result_message(call, index, name, outcome.text, outcome.meta())
            results.append(result)
            frames += [tool_call_frame(message_id, index, call),
                       tool_result_frame(message_id, index, call, result)]
        following = Provenance(engine="browser", backend=provenance.backend, model=provenance.model)
        stored = self.chats.store_tool_step(message_id, text, provenance, calls, results,
                                            following, run_owner="browser", only_streaming=True)
        if stored is None:
            raise NotFound()  # deleted while the tools ran
        message, tools, reply, _ = stored
        return {**step_frame(message_id, message, tools, reply), "tool_frames": frames,
                "next": following_setup}

    def _page_tools(self, settings: dict[str, Any]) -> list[Tool]:
        enabled = self.tools.enabled(settings.get("chat_tools")) if self.tools is not None else []
        server_only = [t.name for t in enabled if t.source not in PAGE_SOURCES]
        if server_only:
            raise Invalid("tool_not_in_browser", f"{', '.join(server_only)} runs only with the "
                          "server engine: pick it, or turn the tool off in this conversation's "
                          "settings")
        return enabled

    def _setup(self, settings: dict[str, Any], steps: int) -> dict[str, Any]:
        """As the server's loop holds its replies: the conversation's tool_choice first, then
        "auto", and "none" (text only) once BCHAT_TOOL_STEPS steps are taken."""
        specs = self.tools.specs(self._page_tools(settings)) if self.tools is not None else []
        if not specs:
            return {"tools": [], "tool_choice": None, "instructions": "", "grammar": None,
                    "steps": steps, "max_steps": self.max_steps, "call_opening": TOOL_OPEN}
        if steps >= self.max_steps:
            choice = "none"
        else:
            choice = (settings.get("chat_tool_choice") or "auto") if steps == 0 else "auto"
        try:
            grammar = answer_grammar(None) if choice == "none" else build_grammar(None, specs, choice)
        except SchemaError as exc:
            raise Invalid("bad_tools", f"the tools cannot be held to a grammar: {exc}") from None
        return {"tools": [s["function"]["name"] for s in specs], "tool_choice": choice,
                "instructions": tool_instructions(specs, choice) if choice != "none" else "",
                "grammar": grammar, "steps": steps, "max_steps": self.max_steps,
                "call_opening": TOOL_OPEN}
