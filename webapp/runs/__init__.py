"""Replies as runs: a reply being generated belongs to the server, not to the socket that asked.

- ``run.py``: one reply in this process (``Run``), the frames its watchers get, how it ends;
- ``service.py``: ``RunService``, which starts (one launch path for chat, regenerate, continue,
  compare and ``/v1``), watches and stops runs;
- ``keeper.py``: the thread that writes growing text to the rows, renews their leases, and
  marks ``interrupted`` the rows whose writer died.
"""
