"""A conversation's messages as a tree: paths, leaves, the branch on screen, what a model sees.

Siblings (messages with the same parent) are alternatives: an edited prompt, a regenerated
reply, a comparison's replies. The page shows one branch: the path from the root to the
conversation's current leaf. static/js/tree.js mirrors ``model_history`` for the browser engine.
"""

from __future__ import annotations

import re
from typing import Any

from .models import Conversation, Message

THINK = re.compile(r"<think>.*?</think>\s*", re.S)  # a reasoning model's thoughts


class Tree:
    """A conversation's messages as a tree: paths, leaves, siblings."""

    def __init__(self, messages: list[Message]) -> None:
        self.messages = messages
        self.by_id = {m.id: m for m in messages}
        self.children: dict[int | None, list[Message]] = {}
        for m in messages:  # ordered by id: children oldest first
            self.children.setdefault(m.parent_id, []).append(m)

    def path(self, message_id: int | None) -> list[Message]:
        """From the root to ``message_id``, inclusive."""
        path: list[Message] = []
        seen: set[int] = set()
        node = self.by_id.get(message_id) if message_id is not None else None
        while node is not None and node.id not in seen:
            seen.add(node.id)
            path.append(node)
            node = self.by_id.get(node.parent_id) if node.parent_id is not None else None
        path.reverse()
        return path

    def leaf_from(self, message_id: int) -> int:
        """The newest leaf below ``message_id``: where its branch continues."""
        node = message_id
        while self.children.get(node):
            node = self.children[node][-1].id
        return node

    def current(self, conv: Conversation) -> int | None:
        if conv.current_message_id in self.by_id:
            return conv.current_message_id
        return self.leaf_from(self.messages[-1].id) if self.messages else None

    def public_ids(self) -> dict[int, str]:
        return {m.id: m.public_id for m in self.messages}


def current_branch(conv: Conversation) -> list[Message]:
    """The messages on screen: the path from the root to the current leaf."""
    tree = Tree(conv.messages)
    return tree.path(tree.current(conv))


def model_history(messages: list[Message]) -> list[dict[str, Any]]:
    """The turns a model sees, from a path of the tree: role and content, oldest first.

    Failed replies with no text are left out; partial (stopped/failed/interrupted) replies stay
    in, as the user saw them; a reasoning model's ``<think>`` text is not sent back. Many chat
    templates (Mistral, Gemma) refuse anything but strict alternation, so when a message
    follows one of its own role (a user message after a reply that failed empty), the later
    one stands for both: the earlier one never got an answer, and keeping it would fail again
    in the same way (too long, or a template that raises).
    """
    turns: list[dict[str, str]] = []
    for m in messages:
        if m.status == "streaming" or not (m.content or m.status == "complete"):
            continue
        content = THINK.sub("", m.content) if m.role == "assistant" else m.content
        turn = {"role": m.role, "content": content}
        meta = m.meta or {}
        # A tool step (runs/service.py's loop): the calls and their results, as OpenAI's
        # messages carry them; each engine renders them its own way (engines/structured.py).
        if m.role == "assistant" and meta.get("tool_calls") and m.status == "complete":
            turn["tool_calls"] = meta["tool_calls"]
        elif m.role == "tool":
            turn.update(tool_call_id=str(meta.get("tool_call_id") or ""),
                        name=str(meta.get("name") or ""))
        steps = m.role == "tool" or "tool_calls" in turn or (turns and "tool_calls" in turns[-1])
        if turns and turns[-1]["role"] == m.role and m.role != "system" and not steps:
            turns[-1] = turn
        else:
            turns.append(turn)
    return turns
