"""Files in the chat: upload and extraction (a PDF written here), limits and the quota, the
text a model is given, retrieval choosing the passage that holds a planted fact, export v3
and import (v2 still read), shares, and deletion with the conversation. A real app on real
sockets, real SQLite and PostgreSQL, the tiny model answering."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from helpers import HttpSession
from pdfs import make_pdf
from sqlalchemy import func, select

from webapp.attachments import budget, files_of, passages, read_passage
from webapp.models import Attachment, AttachmentPassage

pytestmark = pytest.mark.databases("sqlite", "postgresql")

GREEDY = {"temperature": 0, "max_tokens": 4}


def upload(session: HttpSession, name: str, data: bytes, mime: str = "application/octet-stream",
           headers: dict | None = None) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
            f"Content-Type: {mime}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    import urllib.error
    import urllib.request

    if not list(session.cookies):
        session.visit()
    req = urllib.request.Request(session.base_url + "/api/attachments", data=body, method="POST",
                                 headers={"Content-Type": f"multipart/form-data; boundary={boundary}",
                                          **(headers or {})})
    try:
        with session.opener.open(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def chat(session: HttpSession, content: str, conversation_id: str | None = None, **extra):
    ws = session.ws()
    ws.chat(content, conversation_id, options=GREEDY, **extra)
    first, _ = ws.until("started", "error")
    if first["type"] == "error":
        ws.close()
        return first, None
    done, _ = ws.until("done", "error")
    ws.close()
    return first, done


def stored(app):
    return app.extensions["bchat"].db


def test_upload_pdf_text_and_passages(live_server):
    me = live_server.session()
    pdf = make_pdf([["Quarterly report", "Sales grew in the north."],
                    ["Page two holds the appendix.", "Nothing else."]])
    status, info = upload(me, "report.pdf", pdf, "application/pdf")
    assert status == 201, info
    assert info["mime"] == "application/pdf" and info["pages"] == 2
    assert info["size"] == len(pdf) and len(info["sha256"]) == 64
    assert info["tokens"] > 0
    status, page = me.json("GET", f"/api/attachments/{info['id']}/text?page=2")
    assert status == 200 and "appendix" in page["text"] and "Quarterly" not in page["text"]
    status, lines = me.json("GET", f"/api/attachments/{info['id']}/text?page=1&lines=2-2")
    assert lines["text"] == "Sales grew in the north."
    assert me.json("GET", f"/api/attachments/{info['id']}/text?page=3")[0] == 400
    # another visitor cannot read it
    assert live_server.session().json("GET", f"/api/attachments/{info['id']}")[0] == 404

    # HTML comes as its text, code and CSV as they are
    status, html = upload(me, "page.html", b"<html><head><style>p{}</style></head><body><h1>Title"
                          b"</h1><p>Body &amp; text</p><script>alert(1)</script></body></html>",
                          "text/html")
    assert status == 201
    text = me.json("GET", f"/api/attachments/{html['id']}/text")[1]["text"]
    assert text == "Title\n\nBody & text" or text.split() == ["Title", "Body", "&", "text"]
    status, csv = upload(me, "data.csv", b"a,b\n1,2\n", "text/csv")
    assert status == 201 and csv["mime"] == "text/csv"


def test_refusals(make_app, make_live_server):
    # (the attachment limit, not the JSON bodies' BCHAT_MAX_UPLOAD_BYTES, bounds an upload)
    app = make_app(MAX_ATTACHMENT_BYTES=2000, ATTACHMENT_QUOTA_BYTES=3000, MAX_UPLOAD_BYTES=1000)
    server = make_live_server(app)
    me = server.session()
    status, body = upload(me, "big.txt", b"x" * 2500, "text/plain")
    assert status == 413 and body["error"]["code"] == "file_too_large"
    # (images: tests/test_images.py) an image type no model is sent is refused by its kind
    status, body = upload(me, "photo.heic", b"\0\0\0\x18ftypheic" + b"\0" * 50, "image/heic")
    assert status == 415 and body["error"]["code"] == "unsupported_file"
    assert "PNG, JPEG, WebP or GIF" in body["error"]["message"]
    status, body = upload(me, "blob.bin", b"\0\1\2\3" * 10)
    assert status == 415
    status, body = upload(me, "empty.txt", b"")
    assert status == 400 and body["error"]["code"] == "empty_file"
    status, body = upload(me, "bad.pdf", b"%PDF-1.4 not really")
    assert status == 400 and body["error"]["code"] == "bad_file"
    # the quota: two files of 1,800 bytes are over 3,000
    assert upload(me, "one.txt", b"y" * 1800)[0] == 201
    status, body = upload(me, "two.txt", b"z" * 1800)
    assert status == 413 and body["error"]["code"] == "storage_quota_exceeded"
    # another visitor has a quota of their own
    assert upload(server.session(), "two.txt", b"z" * 1800)[0] == 201
    # a page of another site cannot post a form here
    status, body = upload(me, "x.txt", b"hello", headers={"Origin": "https://evil.example"})
    assert status == 403
    with stored(app).read() as session:
        assert session.scalar(select(func.count()).select_from(Attachment)) == 2


def test_model_sees_the_file_and_deletion_cascades(app, live_server):
    me = live_server.session()
    status, info = upload(me, "notes.md", b"# Notes\n\nThe password is swordfish.\n", "text/markdown")
    assert status == 201
    started, done = chat(me, "What is the password?", attachments=[info["id"]])
    assert done["type"] == "done"
    conv = started["conversation_id"]
    status, data = me.json("GET", f"/api/conversations/{conv}")
    user = next(m for m in data["messages"] if m["role"] == "user")
    assert [a["filename"] for a in user["attachments"]] == ["notes.md"]
    reply = next(m for m in data["messages"] if m["role"] == "assistant")
    assert reply["meta"]["files"] == [{"file": "notes.md", "id": info["id"], "whole": True}]
    # the model saw the file's text before the question: its prompt is longer than the question's
    started2, done2 = chat(me, "What is the password?")
    alone = done2["message"]["usage"]["prompt_tokens"]
    assert done["message"]["usage"]["prompt_tokens"] > alone + 5
    # a regenerated reply is given the files again; the tool's reader sees them
    ws = me.ws()
    ws.send({"type": "regenerate", "message_id": reply["id"], "options": GREEDY})
    again, _ = ws.until("done", "error")
    ws.close()
    assert again["type"] == "done" and again["message"]["meta"]["files"] == reply["meta"]["files"]
    with stored(app).read() as session:
        row = session.scalar(select(Attachment))
        assert [f["id"] for f in files_of(session, row.owner_id, conv)] == [info["id"]]
        assert read_passage(session, row.owner_id, info["id"], lines=(3, 3))["text"] == \
            "The password is swordfish."
        assert files_of(session, "someone else", conv) == []
    # a file goes with one message only; an unknown id stores nothing
    # a file sent in this conversation goes again as a copy (an edit keeps its files); in
    # another conversation it is refused
    first, _ = chat(me, "again", None, attachments=[info["id"]])
    assert first["type"] == "error" and first["code"] == "already_sent"
    edited, done_edit = chat(me, "What is the password, really?", conv, attachments=[info["id"]],
                             parent_id=None)
    copy = edited["user_message"]["attachments"][0]
    assert copy["id"] != info["id"] and copy["sha256"] == info["sha256"]
    assert done_edit["message"]["meta"]["files"] == [{"file": "notes.md", "id": copy["id"],
                                                      "whole": True}]
    first, _ = chat(me, "again", conv, attachments=["nope"])
    assert first["type"] == "error" and first["code"] == "not_found"
    # an unsent upload can be taken back; a sent one cannot
    assert me.request("DELETE", f"/api/attachments/{info['id']}")[0] == 409
    status, spare = upload(me, "spare.txt", b"spare")
    assert me.request("DELETE", f"/api/attachments/{spare['id']}")[0] == 204
    # deleting the conversation deletes its files and their passages
    assert me.request("DELETE", f"/api/conversations/{conv}")[0] == 204
    with stored(app).read() as session:
        assert session.scalar(select(func.count()).select_from(Attachment)) == 0
        assert session.scalar(select(func.count()).select_from(AttachmentPassage)) == 0


def _haystack(fact_line: int, total: int = 400) -> bytes:
    filler = [f"Line {i}: the weather report for the harbour was calm and grey again." for i in
              range(1, total + 1)]
    filler[fact_line - 1] = "The vault combination is seven eleven thirteen, kept by Marguerite."
    return "\n".join(filler).encode()


def test_retrieval_chooses_the_planted_passage(make_app, make_live_server):
    app = make_app(N_CTX=1024)
    server = make_live_server(app)
    me = server.session()
    status, info = upload(me, "harbour.txt", _haystack(300))
    assert status == 201 and info["tokens"] > budget(1024, GREEDY["max_tokens"])
    _started, done = chat(me, "Who keeps the vault combination?", attachments=[info["id"]])
    assert done["type"] == "done", done
    files = done["message"]["meta"]["files"]
    assert files and all(f["file"] == "harbour.txt" and "lines" in f for f in files)
    assert any(f["lines"][0] <= 300 <= f["lines"][1] for f in files), files
    # only some of it was given: retrieval, not the whole file
    assert not any(f.get("whole") for f in files)
    covered = sum(f["lines"][1] - f["lines"][0] + 1 for f in files)
    assert covered < 400
    # the browser engine is given the same text for the same branch
    conv = _started["conversation_id"]
    user_id = _started["user_message"]["id"] if _started.get("user_message") else None
    data = me.json("GET", f"/api/conversations/{conv}")[1]
    user_id = next(m["id"] for m in data["messages"] if m["role"] == "user")
    status, page = me.json("GET", f"/api/conversations/{conv}/files?leaf={user_id}&context=1024"
                                  f"&max_tokens={GREEDY['max_tokens']}")
    assert status == 200 and page["files"] == files
    assert "Marguerite" in page["blocks"][user_id] and 'part="passages"' in page["blocks"][user_id]


def test_passages_cut_on_lines_and_pages():
    text = "\n".join(f"line {i} " + "x" * 100 for i in range(1, 41))
    cut = passages(text, paged=False)
    assert cut[0].line_start == 1 and cut[-1].line_end == 40
    assert all(len(p.text) <= 1200 for p in cut)
    assert [p.line_start for p in cut[1:]] == [p.line_end + 1 for p in cut[:-1]]
    paged = passages("one\ntwo\fthree", paged=True)
    assert [(p.page, p.line_start, p.line_end) for p in paged] == [(1, 1, 2), (2, 1, 1)]


def test_export_v3_import_and_share(live_server):
    me = live_server.session()
    pdf = make_pdf([["The lighthouse keeper is named Oskar."]])
    status, info = upload(me, "keeper.pdf", pdf)
    started, _ = chat(me, "Who keeps the lighthouse?", attachments=[info["id"]])
    conv = started["conversation_id"]
    status, _h, raw = me.request("GET", f"/api/conversations/{conv}/export")
    exported = json.loads(raw)
    assert exported["version"] == 3
    user = next(m for m in exported["messages"] if m["role"] == "user")
    assert user["attachments"][0]["text"].startswith("The lighthouse keeper")
    assert user["attachments"][0]["sha256"] == info["sha256"]

    other = live_server.session()
    other.visit()
    status, copy = other.json("POST", "/api/conversations/import", exported)
    assert status == 201, copy
    copied_user = next(m for m in copy["messages"] if m["role"] == "user")
    copied = copied_user["attachments"][0]
    assert copied["filename"] == "keeper.pdf" and copied["pages"] == 1 and copied["id"] != info["id"]
    assert "Oskar" in other.json("GET", f"/api/attachments/{copied['id']}/text")[1]["text"]
    # exported again: the same files
    again = json.loads(other.request("GET", f"/api/conversations/{copy['id']}/export")[2])
    assert [m.get("attachments", [{}])[0].get("text") for m in again["messages"]
            if m["role"] == "user"] == [user["attachments"][0]["text"]]
    # version 2 files still import
    v2 = {**exported, "version": 2,
          "messages": [{k: v for k, v in m.items() if k != "attachments"} for m in exported["messages"]]}
    assert other.json("POST", "/api/conversations/import", v2)[0] == 201
    # a broken file list is refused, nothing stored
    bad = json.loads(json.dumps(exported))
    next(m for m in bad["messages"] if m["role"] == "user")["attachments"][0]["sha256"] = "x"
    status, body = other.json("POST", "/api/conversations/import", bad)
    assert status == 400 and body["error"]["code"] == "bad_import"

    # a share shows the file, and continuing it copies the file
    status, share = me.json("POST", f"/api/conversations/{conv}/share", {})
    path = share["url"].replace(live_server.url, "")
    visitor = live_server.session()
    page = visitor.request("GET", path)[2].decode()
    assert 'data-testid="file-chip"' in page and "keeper.pdf" in page
    # the owner deletes the conversation: the share keeps its copy, and continuing it copies
    # the file to the visitor (a file of their own, with its passages for retrieval)
    assert me.request("DELETE", f"/api/conversations/{conv}")[0] == 204
    csrf = re.search(r'name="csrf" value="([^"]+)"', page).group(1)
    status, copy_id = visitor.continue_share(path, csrf)
    assert status == 303 and copy_id
    copy = visitor.json("GET", f"/api/conversations/{copy_id}")[1]
    mine = next(m for m in copy["messages"] if m["role"] == "user")["attachments"][0]
    assert mine["filename"] == "keeper.pdf" and mine["sha256"] == info["sha256"]
    assert "Oskar" in visitor.json("GET", f"/api/attachments/{mine['id']}/text?page=1")[1]["text"]
    assert me.json("GET", f"/api/attachments/{mine['id']}")[0] == 404


def test_the_read_attachment_tool_reads_a_page_or_lines_of_this_conversations_files(
        app, live_server):
    """The built-in tool the server's tool loop offers (webapp/tools/builtins.py): the file is
    found by the name its <file> block shows the model, only in this conversation, only the
    visitor's own."""
    from webapp.tools.registry import ToolContext

    me = live_server.session()
    pdf = make_pdf([["Quarterly report", "Sales grew in the north."],
                    ["Page two holds the appendix.", "Nothing else."]])
    status, info = upload(me, "report.pdf", pdf, "application/pdf")
    assert status == 201, info
    started, done = chat(me, "Summarise it.", attachments=[info["id"]])
    assert done is not None, started
    conversation = started["conversation_id"]
    services = app.extensions["bchat"]
    with services.db.read() as session:
        owner = session.scalar(select(Attachment.owner_id).where(Attachment.public_id == info["id"]))
    mine = ToolContext(owner, conversation_id=conversation, db=services.db)

    page = services.tools.call("read_attachment", {"file": "report.pdf", "page": 2}, mine)
    assert page.error is None and "appendix" in page.text and "Quarterly" not in page.text
    assert page.text.startswith("report.pdf (page 2 of 2")
    line = services.tools.call("read_attachment",
                               {"file": "report.pdf", "page": 1, "start_line": 2, "end_line": 2}, mine)
    assert line.error is None and line.text.endswith("Sales grew in the north.")
    missing = services.tools.call("read_attachment", {"file": "other.txt"}, mine)
    assert missing.error == "failed" and "report.pdf" in missing.text  # it names what there is
    bad_page = services.tools.call("read_attachment", {"file": "report.pdf", "page": 9}, mine)
    assert bad_page.error == "failed" and "pages 1 to 2" in bad_page.text
    # Another visitor, or another conversation of the same visitor, finds nothing there.
    other = services.tools.call("read_attachment", {"file": "report.pdf"},
                                ToolContext("someone-else", conversation_id=conversation, db=services.db))
    assert other.error == "failed" and "no file named" in other.text
    elsewhere = services.chats.add_user_message(owner, None, "a new chat")[0]["id"]
    moved = services.tools.call("read_attachment", {"file": "report.pdf"},
                                ToolContext(owner, conversation_id=elsewhere, db=services.db))
    assert moved.error == "failed" and "files: none" in moved.text
    listed = {t["name"] for t in me.json("GET", "/api/tools")[1]["tools"]}
    assert "read_attachment" in listed


def test_uploads_at_once_stay_within_the_quota(make_app, monkeypatch):
    """Eight uploads of one visitor at once, each a third of the quota: three are stored, the
    rest refused. On PostgreSQL (READ COMMITTED) each read the sum before the others' rows were
    there, and more than three were stored: one visitor's uploads now queue on a lock."""
    import threading

    app = make_app(MAX_ATTACHMENT_BYTES=2000, ATTACHMENT_QUOTA_BYTES=3000)
    service = app.extensions["bchat"].attachments
    together = threading.Barrier(8)
    sweep = service._sweep_unsent

    def sweep_then_wait(owner_id):  # every upload reaches its transaction at the same time
        sweep(owner_id)
        together.wait(30)

    monkeypatch.setattr(service, "_sweep_unsent", sweep_then_wait)
    outcomes = []

    def one(i: int) -> None:
        try:
            service.upload("visitor", f"part{i}.txt", b"%d" % i * 1000, "text/plain")
            outcomes.append("stored")
        except Exception as exc:  # noqa: BLE001 - the code is what is checked
            outcomes.append(getattr(exc, "code", repr(exc)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(outcomes) == ["storage_quota_exceeded"] * 5 + ["stored"] * 3, outcomes
    with stored(app).read() as session:
        assert session.scalar(select(func.sum(Attachment.size))
                              .where(Attachment.owner_id == "visitor")) == 3000
