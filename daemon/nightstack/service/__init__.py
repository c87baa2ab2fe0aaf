"""The live daemon: its threads, sessions on disk, the session folder's format, retries, the
watcher, systemd and the journal."""
