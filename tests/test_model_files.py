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
