"""What people see a model called, and the figures of the file each engine really runs.

Display names: the admin's (BCHAT_MODELS_FILE), else the GGUF's general.name when it says no
more than the file name, else the file name, with the quantisation; the API's ids never change.
A browser run's benchmark and /api/models' browser entry give the derived copy's figures.
"""

from __future__ import annotations

import json

import pytest

from webapp.catalogue import display_name, load_model_names


@pytest.mark.parametrize(("general", "stem", "quant", "expected"), [
    # a training run's name says more than the file: the file name is the better one
    ("Smollm2 135M 8k Lc100K Mix1 Ep2", "SmolLM2-135M-Instruct.Q4_1", "Q4_1", "SmolLM2 135M Instruct · Q4_1"),
    ("Llama 3.2 1B Instruct", "Llama-3.2-1B-Instruct-Q4_K_M", "Q4_K_M", "Llama 3.2 1B Instruct · Q4_K_M"),
    ("Qwen2.5 0.5B Instruct", "qwen2.5-0.5b-instruct-q8_0", "Q8_0", "Qwen2.5 0.5B Instruct · Q8_0"),
    # a file name that says nothing: general.name, whatever it is
    ("Mistral 7B", "ggml-model-q4_0", "Q4_0", "Mistral 7B · Q4_0"),
    ("gemma", "model", "F16", "gemma · F16"),
    (None, "phi-2.Q5_K_M", "Q5_K_M", "phi 2 · Q5_K_M"),
    # the quantisation is not said twice
    ("Tiny Q8_0", "tiny-q8_0", "Q8_0", "Tiny Q8_0"),
])
def test_a_display_name_is_made_from_the_header_or_the_file(general, stem, quant, expected):
    assert display_name(general, stem, quant) == expected


def test_the_models_file_names_models_and_a_bad_one_says_what_is_wrong(tmp_path):
    toml = tmp_path / "models.toml"
    toml.write_text('"tiny-chat.gguf" = "Tiny   test model"\nupstream-x = "Remote X"\n')
    assert load_model_names(toml) == {"tiny-chat": "Tiny test model", "upstream-x": "Remote X"}
    as_json = tmp_path / "models.json"
    as_json.write_text(json.dumps({"names": {"tiny-chat": "Tiny"}}))
    assert load_model_names(as_json) == {"tiny-chat": "Tiny"}
    assert load_model_names(None) == {}
    bad = tmp_path / "bad.toml"
    bad.write_text('"tiny-chat.gguf" = 3\n')
    with pytest.raises(ValueError, match="bad.toml: expected a table"):
        load_model_names(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        load_model_names(broken)


def test_models_list_display_names_and_keeps_the_ids(make_app, tmp_path):
    listing = make_app().test_client().get("/api/models").get_json()
    model = listing["models"][0]
    assert model["id"] == "tiny-chat" and listing["default"] == "tiny-chat"
    assert model["display_name"] == "tiny chat · F32"  # general.name "bchat-tiny-test" says more
    assert model["facts"]["file_name"] == "tiny-chat.gguf"

    names = tmp_path / "models.toml"
    names.write_text('"tiny-chat.gguf" = "The tiny one"\n')
    client = make_app(MODELS_FILE=str(names)).test_client()
    model = client.get("/api/models").get_json()["models"][0]
    assert model["id"] == "tiny-chat" and model["display_name"] == "The tiny one"


def test_the_browser_entry_and_a_browser_benchmark_give_the_copy_pages_run(make_app, tmp_path, bundled_model):
    """The bundled Q4_1 is served to pages as a derived Q8_0: its size and bits per weight are
    the copy's, and a browser benchmark stores those (not the server file's Q4_1)."""
    client = make_app(MODEL_PATH=str(bundled_model), BROWSER_MODELS_DIR=str(tmp_path / "bm"),
                      RATE_LIMIT="1000/minute").test_client()
    model = client.get("/api/models").get_json()["models"][0]
    facts, browser = model["facts"], model["browser"]
    assert model["display_name"] == "SmolLM2 135M Instruct · Q4_1"
    assert facts["quantization"] == "Q4_1" and browser["format"] == "Q8_0"
    assert browser["size"] > facts["file_size"]
    assert browser["bits_per_weight"] == round(browser["size"] * 8 / facts["parameters"], 2)
    assert 8 < browser["bits_per_weight"] < 9.5 and facts["bits_per_weight"] < 6

    result = {"prompt": "short", "prompt_tokens": 10, "prompt_tps": 50.0, "decode_tps": 20.0}
    stored = client.post("/api/benchmarks", json={"backend": "wasm-st", "model": model["id"],
                                                   "results": [result]})
    assert stored.status_code == 201, stored.get_json()
    run_facts = stored.get_json()["model_facts"]
    assert run_facts["quantization"] == "Q8_0"
    assert run_facts["file_size"] == browser["size"]
    assert run_facts["bits_per_weight"] == browser["bits_per_weight"]
    assert run_facts["parameters"] == facts["parameters"]
