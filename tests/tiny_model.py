"""Writes a tiny random-weight llama GGUF for fast tests of the real llama.cpp path.

2 layers, 64 dims, ~800 tokens (the 256 byte tokens included, so any text tokenizes), a
ChatML chat template whose end token is the EOS. ~750 KB, loads in milliseconds. Its replies
are gibberish, but they are produced by real llama.cpp code: tokenize, decode, sample, detokenize.
Rows of the output matrix for control and byte tokens are zero, so greedy decoding picks
ordinary word pieces and never ends early by itself.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Hermes/Qwen-style template with a tools section (Qwen2.5-Instruct's shape, shortened): the
# tool list in <tools>, calls as <tool_call> JSON blocks, results as <tool_response> in a user turn.
HERMES_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\n\n# Tools\n\nYou may call one or more functions to assist with the user query.'"
    " + '\n\nYou are provided with function signatures within <tools></tools> XML tags:"
    "\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": "
    "<function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first)"
    " or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}"
    "{%- endif %}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Llama 3.1 Instruct's chat template, the real text: llama.cpp's
# models/templates/meta-llama-Llama-3.1-8B-Instruct.jinja (commit 0c1e57098bba, as vendored in
# llama-cpp-python 0.3.36), copied unchanged. Tools in the first user message as indented JSON,
# a call written back as a bare {"name", "parameters"} object, results as "ipython" turns.
LLAMA31_TEMPLATE = (Path(__file__).parent / "templates"
                    / "meta-llama-Llama-3.1-8B-Instruct.jinja").read_text()

WORDS = (
    "the a an and or of to in on is are was be it this that with for as at by from we you they "
    "he she hello world chat model token llama server browser reply stop test small tiny fast "
    "slow good bad yes no one two three four five six seven eight nine ten red green blue cat "
    "dog sun moon tree water fire code data file line word text time day night"
).split()


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    import gguf

    normal, control, unknown, byte = (
        gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.UNKNOWN, gguf.TokenType.BYTE,
    )
    tokens: list[str] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types: list[int] = [unknown, control, control, control, control]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [byte] * 256
    pieces: list[str] = ["▁"]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    pieces += [f"▁{c}" for c in string.ascii_letters]
    pieces += [f"▁{w}" for w in WORDS] + WORDS
    letters = "etaoinshrdlucmfw"
    pieces += [a + b for a in letters for b in letters]
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(normal)
    scores = [0.0] * 261 + [-float(i) for i in range(len(tokens) - 261)]
    return tokens, scores, [int(t) for t in types]


def write_tiny_model(
    path: Path,
    *,
    context_length: int = 4096,
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    ff: int = 128,
    seed: int = 1234,
    chat_template: str | list[dict[str, str]] | None = CHATML_TEMPLATE,  # or named templates
    name: str = "bchat-tiny-test",
) -> Path:
    import gguf

    tokens, scores, types = vocabulary()
    n_vocab = len(tokens)
    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_rope_dimension_count(dim // heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(n_vocab)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(False)
    if chat_template:
        writer.add_chat_template(chat_template)

    output = weight(n_vocab, dim, scale=1.0)
    output[:261] = 0.0  # never prefer control or byte tokens: readable pieces, no early end
    writer.add_tensor("token_embd.weight", weight(n_vocab, dim, scale=1.0))
    writer.add_tensor("output_norm.weight", np.ones(dim, dtype=np.float32))
    writer.add_tensor("output.weight", output)
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(dim, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(dim, dim))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(dim, dtype=np.float32))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ff, dim))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ff, dim))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(dim, ff))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_projector(
    path: Path, *, text_dim: int = 64, dim: int = 32, layers: int = 2, heads: int = 4,
    ff: int = 64, image_size: int = 32, patch: int = 8, seed: int = 99,
) -> Path:
    """A tiny random-weight image projector (llama.cpp's ``mmproj`` GGUF) for the tiny model:
    LLaVA's shape, the simplest libmtmd runs (projector type "mlp": a CLIP ViT, then two
    linear layers into the text model's ``text_dim`` embeddings). Every image becomes
    (image_size / patch)² = 16 embeddings. ~120 KB; keys and tensor names as llama.cpp's
    tools/mtmd/clip.cpp reads them (clip.vision.*, v.blk.N.*, mm.0 / mm.2)."""
    import gguf

    rng = np.random.default_rng(seed)

    def weight(*shape: int, scale: float = 0.1) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def zeros(n: int) -> np.ndarray:
        return np.zeros(n, dtype=np.float32)

    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_bool("clip.has_vision_encoder", True)
    writer.add_bool("clip.has_llava_projector", True)
    writer.add_string("clip.projector_type", "mlp")
    writer.add_bool("clip.use_gelu", True)
    for key, value in (("image_size", image_size), ("patch_size", patch),
                       ("embedding_length", dim), ("feed_forward_length", ff),
                       ("projection_dim", text_dim), ("block_count", layers),
                       ("attention.head_count", heads)):
        writer.add_uint32(f"clip.vision.{key}", value)
    writer.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    writer.add_array("clip.vision.image_mean", [0.5, 0.5, 0.5])
    writer.add_array("clip.vision.image_std", [0.5, 0.5, 0.5])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tensor("v.class_embd", weight(dim))
    writer.add_tensor("v.patch_embd.weight", weight(dim, 3, patch, patch))
    writer.add_tensor("v.position_embd.weight", weight((image_size // patch) ** 2 + 1, dim))
    writer.add_tensor("v.pre_ln.weight", ones(dim))
    writer.add_tensor("v.pre_ln.bias", zeros(dim))
    for i in range(layers):
        for name in ("attn_q", "attn_k", "attn_v", "attn_out"):
            writer.add_tensor(f"v.blk.{i}.{name}.weight", weight(dim, dim))
            writer.add_tensor(f"v.blk.{i}.{name}.bias", zeros(dim))
        for name in ("ln1", "ln2"):
            writer.add_tensor(f"v.blk.{i}.{name}.weight", ones(dim))
            writer.add_tensor(f"v.blk.{i}.{name}.bias", zeros(dim))
        writer.add_tensor(f"v.blk.{i}.ffn_up.weight", weight(ff, dim))
        writer.add_tensor(f"v.blk.{i}.ffn_up.bias", zeros(ff))
        writer.add_tensor(f"v.blk.{i}.ffn_down.weight", weight(dim, ff))
        writer.add_tensor(f"v.blk.{i}.ffn_down.bias", zeros(dim))
    writer.add_tensor("mm.0.weight", weight(text_dim, dim))
    writer.add_tensor("mm.0.bias", zeros(text_dim))
    writer.add_tensor("mm.2.weight", weight(text_dim, text_dim))
    writer.add_tensor("mm.2.bias", zeros(text_dim))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_imatrix(path: Path, model: Path, *, seed: int = 7) -> Path:
    """An importance matrix for ``model`` in llama-imatrix's GGUF layout: per 2-D weight fed by
    activations, ``NAME.in_sum2`` (sums of squared activations per input column) and
    ``NAME.counts`` (how many rows were summed). Random but positive, like a real one."""
    import gguf

    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "imatrix")
    writer.add_type("imatrix")
    for tensor in gguf.GGUFReader(str(model)).tensors:
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            columns = int(tensor.shape[0])
            writer.add_tensor(f"{tensor.name}.in_sum2",
                              (rng.random((1, columns)) * 100 + 1).astype(np.float32))
            writer.add_tensor(f"{tensor.name}.counts", np.array([[100.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


if __name__ == "__main__":
    import sys

    print(write_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
