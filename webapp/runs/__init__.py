"""Replies as runs: a reply being generated belongs to the server, not to the socket that
asked. run.py: a run, its frames, how it ends; service.py: starting, watching, stopping;
keeper.py: its row kept in step; rows.py: that row's SQL."""
