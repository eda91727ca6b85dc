"""Pick your quant: `bchat models quantize` and `bchat models eval` on a tiny F32 model, checked
against the files themselves and against a direct computation with llama-cpp-python's logits."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tiny_model import write_imatrix, write_tiny_model

from webapp.catalogue import discover, read_model_file
from webapp.quant import EVAL_TEXT, QuantError, evaluate, evaluate_family, families, quality_report, quantize

ROOT = Path(__file__).resolve().parent.parent
BCHAT = [sys.executable, "-m", "webapp.cli"]


def bchat(*args: str, models: Path, instance: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BCHAT_")}
    env.update(PYTHONPATH=str(ROOT), BCHAT_MODEL_PATH=str(models), BCHAT_INSTANCE_PATH=str(instance),
               BCHAT_N_THREADS="1")
    return subprocess.run(BCHAT + list(args), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    """A folder with a tiny F32 model (256 wide: the K- and i-quants' 256-weight blocks fit its
    rows) and its Q8_0 and Q4_0 variants, made by the command."""
    folder = tmp_path_factory.mktemp("family")
    write_tiny_model(folder / "tiny-F32.gguf", dim=256, ff=512)
    made = bchat("models", "quantize", "tiny-F32", "Q8_0", "q4_0", models=folder,
                 instance=tmp_path_factory.mktemp("instance"))
    assert made.returncode == 0, made.stderr
    assert "tiny-Q8_0.gguf (Q8_0" in made.stdout and "tiny-Q4_0.gguf (Q4_0" in made.stdout
    assert "[##############################]" in made.stderr  # the progress bar, drawn to the end
    return folder


def test_variants_are_files_of_their_family_that_load_and_generate(family):
    from llama_cpp import Llama

    assert sorted(p.name for p in family.iterdir()) == [
        "tiny-F32.gguf", "tiny-Q4_0.gguf", "tiny-Q4_0.gguf.quant.json", "tiny-Q8_0.gguf",
        "tiny-Q8_0.gguf.quant.json"]  # nothing half-written is left beside them
    grouped = families(discover(family))
    assert [m.id for m in grouped["tiny"]] == ["tiny-F32", "tiny-Q8_0", "tiny-Q4_0"]
    listed = bchat("models", "list", models=family, instance=family.parent)
    assert listed.stdout.splitlines()[0].split()[-1] == "family"
    assert [line.split()[-1] for line in listed.stdout.splitlines()[1:]] == ["tiny"] * 3
    for name in ("tiny-Q8_0.gguf", "tiny-Q4_0.gguf"):
        llm = Llama(model_path=str(family / name), n_ctx=128, n_threads=1, verbose=False)
        out = llm.create_completion("the cat and the dog", max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] == 8 and out["choices"][0]["text"]


def test_recorded_bits_per_weight_match_the_files(family):
    from gguf import GGUFReader

    for qtype in ("Q8_0", "Q4_0"):
        path = family / f"tiny-{qtype}.gguf"
        record = json.loads((family / f"tiny-{qtype}.gguf.quant.json").read_text())
        reader = GGUFReader(str(path))
        tensor_bytes = sum(int(t.n_bytes) for t in reader.tensors)
        params = sum(int(t.n_elements) for t in reader.tensors)
        assert record["family"] == "tiny" and record["source"] == "tiny-F32.gguf"
        assert record["quantization"] == qtype == read_model_file(path).quantization
        assert record["bits_per_weight"] == pytest.approx(tensor_bytes * 8 / params, abs=1e-3)
        assert record["file_size"] == path.stat().st_size and record["parameters"] == params
    q8 = json.loads((family / "tiny-Q8_0.gguf.quant.json").read_text())["bits_per_weight"]
    q4 = json.loads((family / "tiny-Q4_0.gguf.quant.json").read_text())["bits_per_weight"]
    # Q8_0 stores 34 bytes per 32 weights; Q4_0 18 (the F32 norms add a little to both)
    assert 8.5 <= q8 < 9 and 4.5 <= q4 < 5


def test_eval_ranks_q8_above_q4_on_the_shipped_text_and_serves_it(family, tmp_path, make_app):
    ran = bchat("models", "eval", "tiny", models=family, instance=tmp_path)
    assert ran.returncode == 0, ran.stderr
    assert "tiny-Q4_0" in ran.stdout and "KLD" in ran.stdout
    stored = json.loads((family / "tiny.quality.json").read_text())
    assert stored["reference"] == "tiny-F32" and stored["text"]["name"] == EVAL_TEXT.name
    rows = {r["model"]: r for r in stored["variants"]}
    assert rows["tiny-F32"]["kld"] == 0 and rows["tiny-F32"]["top1"] == 1
    assert 0 < rows["tiny-Q8_0"]["kld"] < rows["tiny-Q4_0"]["kld"]
    assert rows["tiny-Q8_0"]["top1"] > rows["tiny-Q4_0"]["top1"]
    assert all(r["prompt_tps"] > 0 and r["decode_tps"] > 0 for r in rows.values())
    assert stored["chunks"] >= 3 and stored["scored_tokens"] == stored["chunks"] * 255

    body = make_app(MODEL_PATH=str(family)).test_client().get("/api/models/quality").get_json()
    (tiny,) = body["families"]
    assert [m["model"] for m in tiny["members"]] == ["tiny-F32", "tiny-Q8_0", "tiny-Q4_0"]
    served = {m["model"]: m for m in tiny["members"]}
    assert served["tiny-Q4_0"]["quality"]["kld"] == rows["tiny-Q4_0"]["kld"]
    assert served["tiny-Q4_0"]["quality"]["stale"] is False
    assert served["tiny-F32"]["reference"] and served["tiny-Q8_0"]["made_from"] == "tiny-F32.gguf"
    assert served["tiny-Q8_0"]["fits_server"]["memory_needed"] > 0
    assert tiny["parameters"] == tiny["active_parameters"] and tiny["experts"] is None


def direct_figures(reference: Path, variant: Path, text: str, n_ctx: int):
    """Perplexity of the variant and its mean KLD from the reference, the plain way: every
    logit of every chunk from llama-cpp-python, softmax in float64, second half scored."""
    from llama_cpp import Llama

    def logits(path: Path) -> tuple[list[int], list[np.ndarray]]:
        llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1,
                    verbose=False)
        tokens = llm.tokenize(text.encode(), add_bos=False)
        out = []
        for start in range(0, len(tokens) - n_ctx + 1, n_ctx):
            llm.reset()
            llm.eval(tokens[start:start + n_ctx])
            out.append(np.array(llm.scores[:n_ctx], dtype=np.float64))
        return tokens, out

    tokens, ref = logits(reference)
    _, var = logits(variant)
    nll, kld, n = 0.0, 0.0, 0
    for c, (r, v) in enumerate(zip(ref, var, strict=True)):
        for j in range(n_ctx // 2, n_ctx - 1):
            p = np.exp(r[j] - r[j].max())
            p /= p.sum()
            q = np.exp(v[j] - v[j].max())
            q /= q.sum()
            nll -= math.log(q[tokens[c * n_ctx + j + 1]])
            kld += float(np.sum(p * (np.log(p) - np.log(q))))
            n += 1
    return math.exp(nll / n), kld / n


def test_perplexity_and_kld_match_a_direct_computation(family):
    text = EVAL_TEXT.read_text()[:3000]
    models = {m.id: m for m in discover(family)}
    result = evaluate(models["tiny-F32"], [models["tiny-Q4_0"]], text, n_ctx=128, n_threads=1, speed=False)
    assert result["chunks"] >= 3
    row = result["variants"][1]
    ppl, kld = direct_figures(family / "tiny-F32.gguf", family / "tiny-Q4_0.gguf", text, 128)
    assert row["ppl"] == pytest.approx(ppl, rel=1e-4)
    assert row["kld"] == pytest.approx(kld, rel=1e-4)


def test_the_bundled_model_is_not_requantized_without_the_flag(bundled_model, tmp_path):
    ran = bchat("models", "quantize", str(bundled_model), "Q4_0", "--dir", str(tmp_path),
                models=bundled_model, instance=tmp_path)
    assert ran.returncode == 1
    assert "already quantized (Q4_1)" in ran.stderr and "--allow-requantize" in ran.stderr
    assert list(tmp_path.glob("*.gguf")) == []


def test_types_and_importance_matrices(family, tmp_path):
    ran = bchat("models", "quantize", "tiny-F32", "Q3_XYZ", models=family, instance=tmp_path)
    assert ran.returncode == 2 and "unknown type 'Q3_XYZ'" in ran.stderr and "IQ4_XS" in ran.stderr
    source = read_model_file(family / "tiny-F32.gguf")
    with pytest.raises(QuantError, match="needs an importance matrix"):
        quantize(source, "IQ2_XS", tmp_path)
    imatrix = write_imatrix(tmp_path / "tiny.imatrix.gguf", source.path)
    variant = quantize(source, "IQ2_XS", tmp_path, imatrix=imatrix, nthread=1)
    assert variant.model.quantization == "IQ2_XS" and variant.record["imatrix"] == "tiny.imatrix.gguf"
    assert 2.3 <= variant.record["bits_per_weight"] < 3.5
    with pytest.raises(QuantError, match="already exists"):
        quantize(source, "IQ2_XS", tmp_path, imatrix=imatrix)


def test_a_mixture_of_experts_says_its_active_parameters(tmp_path):
    """Experts and the parameters each token runs come from the GGUF header and tensor table."""
    import gguf

    dim, ff, experts = 64, 128, 8
    path = tmp_path / "moe-F32.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(dim)
    writer.add_head_count(4)
    writer.add_expert_count(experts)
    writer.add_expert_used_count(2)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    shared = {"token_embd.weight": (100, dim), "blk.0.attn_q.weight": (dim, dim),
              "blk.0.ffn_gate_inp.weight": (experts, dim)}
    routed = {f"blk.0.ffn_{kind}_exps.weight": (experts, ff, dim) for kind in ("gate", "up", "down")}
    for name, shape in {**shared, **routed}.items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model = read_model_file(path)
    shared_count = sum(math.prod(s) for s in shared.values())
    expert_count = sum(math.prod(s) for s in routed.values())
    assert model.parameters == shared_count + expert_count
    assert (model.experts, model.experts_used, model.expert_parameters) == (8, 2, expert_count)
    assert model.active_parameters == shared_count + expert_count * 2 // 8
    assert model.weights_bits_per_weight == 32.0


def test_a_folder_of_links_keeps_its_own_evaluation(family, tmp_path):
    """Models are read through symlinks to their files: the evaluation of a folder of links
    goes into that folder, not beside the files another folder evaluates."""
    links = tmp_path / "links"
    links.mkdir()
    for name in ("tiny-F32.gguf", "tiny-Q4_0.gguf"):
        (links / name).symlink_to(family / name)
    text = tmp_path / "short.txt"
    text.write_text(EVAL_TEXT.read_text()[:1500])
    before = (family / "tiny.quality.json").read_bytes() if (family / "tiny.quality.json").exists() else None
    evaluate_family(discover(links), "tiny", text_path=text, n_ctx=128, n_threads=1, folder=links)
    stored = json.loads((links / "tiny.quality.json").read_text())
    assert [r["model"] for r in stored["variants"]] == ["tiny-F32", "tiny-Q4_0"]
    after = (family / "tiny.quality.json").read_bytes() if (family / "tiny.quality.json").exists() else None
    assert after == before
    (report,) = quality_report(discover(links), links)
    assert [m["quality"]["stale"] for m in report["members"]] == [False, False]
    # a file replaced after its evaluation: its figures are flagged, not passed off as its own
    (links / "tiny-Q4_0.gguf").unlink()
    (links / "tiny-Q4_0.gguf").symlink_to(family / "tiny-Q8_0.gguf")
    (report,) = quality_report(discover(links), links)
    assert [m["quality"]["stale"] for m in report["members"]] == [False, True]


def test_an_importance_matrix_in_the_older_dat_format(family, tmp_path):
    """llama-imatrix's .dat: int32 count, then per tensor its name, calls and summed values."""
    import struct

    from gguf import GGUFReader

    source = read_model_file(family / "tiny-F32.gguf")
    data = bytearray()
    tensors = [t for t in GGUFReader(str(source.path)).tensors
               if t.name.startswith("blk.") and len(t.shape) == 2]
    data += struct.pack("<i", len(tensors))
    for tensor in tensors:
        name = tensor.name.encode()
        columns = int(tensor.shape[0])
        data += struct.pack("<i", len(name)) + name + struct.pack("<ii", 10, columns)
        data += np.full(columns, 20.0, dtype=np.float32).tobytes()
    dat = tmp_path / "imatrix.dat"
    dat.write_bytes(bytes(data))
    variant = quantize(source, "IQ2_XXS", tmp_path, imatrix=dat, nthread=1)
    assert variant.model.quantization == "IQ2_XXS" and variant.record["imatrix"] == "imatrix.dat"
    (tmp_path / "broken.dat").write_bytes(b"\x05\x00\x00\x00\xff")
    with pytest.raises(QuantError, match="not an importance matrix|no entries"):
        quantize(source, "IQ2_XXS", tmp_path / "other", imatrix=tmp_path / "broken.dat")
