"""The web page at the telescope: an HTTP server inside ``nightstack watch``.

- ``server.py``: :class:`~nightstack.web.server.WebServer`, the aiohttp application on its own
  thread and event loop (the worker never waits for it);
- ``api.py``: the routes: JSON API, downloads, Server-Sent Events, the page; security checks;
- ``sessions.py``: sessions read from their files in the output folder, by session id only;
- ``events.py``: the journal and preview watched for Server-Sent Events while a client listens;
- ``render.py``: stretched JPEGs rendered from a session's ``live.fits``;
- ``address.py``: ``HOST:PORT`` parsing and loopback checks;
- ``static/``: the page (HTML, CSS, JavaScript; no outside resources).

Importing this package imports no web library: ``config.py`` uses ``address.py`` only.
"""
