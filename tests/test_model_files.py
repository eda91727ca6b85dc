"""The model-file route browsers download GGUF files from: ranges, ETag, caching, no traversal."""

from __future__ import annotations


def model_url(client) -> str:
    (model,) = client.get("/api/models").get_json()["models"]
    return model["browser"]["url"]


def test_full_download_with_length_etag_and_immutable_cache(client, tiny_model):
    url = model_url(client)
    assert url.endswith("/tiny-chat.gguf")
    response = client.get(url)
    assert response.status_code == 200
    assert response.data == tiny_model.read_bytes()
    assert int(response.headers["Content-Length"]) == tiny_model.stat().st_size
    assert response.headers["Accept-Ranges"] == "bytes"
    assert response.headers["ETag"]
    assert "immutable" in response.headers["Cache-Control"]
    assert "max-age=31536000" in response.headers["Cache-Control"]
    # same-origin only, and usable by a cross-origin isolated page
    assert response.headers["Cross-Origin-Resource-Policy"] == "same-origin"


def test_head_gives_the_size_without_the_body(client, tiny_model):
    response = client.head(model_url(client))
    assert response.status_code == 200
    assert int(response.headers["Content-Length"]) == tiny_model.stat().st_size
    assert response.data == b""


def test_range_requests(client, tiny_model):
    url = model_url(client)
    data = tiny_model.read_bytes()
    response = client.get(url, headers={"Range": "bytes=0-3"})
    assert response.status_code == 206
    assert response.data == b"GGUF" == data[:4]
    assert response.headers["Content-Range"] == f"bytes 0-3/{len(data)}"
    tail = client.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.data == data[-10:]
    beyond = client.get(url, headers={"Range": f"bytes={len(data) + 5}-"})
    assert beyond.status_code == 416


def test_etag_revalidation_gives_304(client):
    url = model_url(client)
    etag = client.get(url).headers["ETag"]
    again = client.get(url, headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b""


def test_unknown_models_versions_and_traversal_are_404(client):
    url = model_url(client)
    _, _models, model_id, version, filename = url.split("/")
    for bad in [
        f"/models/nope/{version}/{filename}",
        f"/models/{model_id}/0000000000000000/{filename}",  # stale or made-up version
        f"/models/{model_id}/{version}/other.gguf",
        f"/models/{model_id}/{version}/..%2F..%2Fwebapp%2F__init__.py",
        f"/models/{model_id}/{version}/%2Fetc%2Fpasswd",
        "/models/..%2F..%2F/x/y",
        f"/models/{model_id}/../../webapp/__init__.py",
    ]:
        assert client.get(bad).status_code == 404, bad


def test_url_changes_when_the_file_changes(make_app, tmp_path, tiny_model):
    import shutil

    path = tmp_path / "m.gguf"
    shutil.copyfile(tiny_model, path)
    first = model_url(make_app(MODEL_PATH=str(path)).test_client())
    with path.open("ab") as fh:
        fh.write(b"\0" * 32)  # a different file at the same path
    second = model_url(make_app(MODEL_PATH=str(path)).test_client())
    assert first != second


def test_models_without_a_chat_template_are_server_listed_but_not_offered_to_browsers(
    make_app, tmp_path
):
    from tiny_model import write_tiny_model

    write_tiny_model(tmp_path / "base.gguf", chat_template=None)
    client = make_app(MODEL_PATH=str(tmp_path)).test_client()
    (model,) = client.get("/api/models").get_json()["models"]
    assert model["engines"] == ["server"] and "browser" not in model
    assert model["facts"]["has_chat_template"] is False


def test_browsers_get_the_derived_format_and_the_server_keeps_the_original(make_app, tmp_path,
                                                                          bundled_model):
    """The bundled Q4_1 is re-quantised once to the format measured fastest in WASM (Q8_0),
    cached under BROWSER_MODELS_DIR by the original's version; both files stay downloadable."""
    from gguf import GGUFReader

    folder = tmp_path / "browser-models"
    client = make_app(MODEL_PATH=str(bundled_model), BROWSER_MODELS_DIR=str(folder)).test_client()
    (model,) = client.get("/api/models").get_json()["models"]
    assert model["server"]["format"] == "Q4_1" and model["browser"]["format"] == "Q8_0"
    (derived,) = folder.rglob("*.gguf")
    assert derived.name == "SmolLM2-135M-Instruct.Q4_1.Q8_0.gguf"
    assert derived.parent.name == model["facts"]["version"], "keyed by the original's version"
    assert int(GGUFReader(str(derived)).fields["general.file_type"].contents()) == 7  # Q8_0
    url = model["browser"]["url"]
    assert url.endswith("/" + derived.name) and model["browser"]["size"] == derived.stat().st_size
    assert client.head(url).status_code == 200
    assert int(client.head(url).headers["Content-Length"]) == derived.stat().st_size
    # A second start reuses the file: same bytes, same URL.
    mtime = derived.stat().st_mtime_ns
    again = make_app(MODEL_PATH=str(bundled_model), BROWSER_MODELS_DIR=str(folder)).test_client()
    assert again.get("/api/models").get_json()["models"][0]["browser"]["url"] == url
    assert derived.stat().st_mtime_ns == mtime
    # The original's URL (another version) is not served under the derived name, nor vice versa.
    version = url.split("/")[3]
    assert client.get(f"/models/{model['id']}/{version}/SmolLM2-135M-Instruct.Q4_1.gguf").status_code == 404


def test_small_files_and_original_are_served_as_is(make_app, tmp_path, tiny_model):
    folder = tmp_path / "browser-models"
    client = make_app(BROWSER_MODELS_DIR=str(folder)).test_client()
    (model,) = client.get("/api/models").get_json()["models"]
    assert model["browser"]["url"].endswith("/tiny-chat.gguf")
    assert "served as is" in model["browser"]["reason"]
    assert not folder.exists(), "nothing derived for a test-sized model"
    client = make_app(BROWSER_FORMAT="original", BROWSER_MODELS_DIR=str(folder)).test_client()
    (model,) = client.get("/api/models").get_json()["models"]
    assert "BCHAT_BROWSER_FORMAT=original" in model["browser"]["reason"]
