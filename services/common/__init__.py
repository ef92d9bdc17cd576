"""Helpers every Tandem service shares: server bootstrap, status mapping, engine thread, worker messages."""
