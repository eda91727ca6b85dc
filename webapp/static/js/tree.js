// A conversation is a tree of messages (each with parent_id); the page shows one branch.

// The messages from the root to `messageId`, inclusive.
export function pathTo(messages, messageId) {
  const byId = new Map(messages.map((m) => [m.id, m]));
  const path = [];
  for (let node = byId.get(messageId); node && path.length <= messages.length; node = byId.get(node.parent_id)) {
    path.push(node);
  }
  return path.reverse();
}

// items in a Map by keyOf(item), each group in the items' order (Map.groupBy, which older
// browsers lack): messages by parent are siblings (edits, regenerations, compared replies).
export function groupBy(items, keyOf) {
  const groups = new Map();
  for (const item of items) {
    const key = keyOf(item);
    if (!groups.has(key)) groups.set(key, []);
    groups.get(key).push(item);
  }
  return groups;
}

// The turns the model sees, by the server's rule (chats.model_history): failed empty replies
// are left out, reasoning (<think>) is not sent back, and a message after one of its own role
// (a user message after a reply that failed empty) stands for both, since many chat templates
// insist on alternation.
export function modelHistory(messages) {
  const turns = [];
  for (const m of messages) {
    if (m.status === "streaming" || !(m.content || m.status === "complete")) continue;
    let content = m.role === "assistant" ? m.content.replace(/<think>[\s\S]*?<\/think>\s*/g, "") : m.content;
    let role = m.role;
    // A tool step the server ran: as text any chat template takes (engines/structured.py's
    // render_messages): the calls in <tool_call> blocks, each result a <tool_response>.
    if (role === "assistant" && m.meta?.tool_calls?.length && m.status === "complete") {
      const calls = m.meta.tool_calls.map((call) => {
        let args = call.function?.arguments;
        try { args = JSON.parse(args); } catch { /* kept as written */ }
        return `<tool_call>\n${JSON.stringify({ name: call.function?.name, arguments: args })}\n</tool_call>`;
      }).join("\n");
      content = content ? `${content}\n${calls}` : calls;
    } else if (role === "tool") {
      role = "user";
      content = `<tool_response>\n${content}\n</tool_response>`;
      const last = turns.at(-1);
      if (last?.role === "user" && last.content.endsWith("</tool_response>")) {
        last.content += `\n${content}`;
        continue;
      }
    }
    const turn = { role, content };
    if (turns.length && turns.at(-1).role === role && role !== "system") turns[turns.length - 1] = turn;
    else turns.push(turn);
  }
  return turns;
}
