"""``fcnseg serve``: a segmentation service (JSON / HTTP API) and a web page, over one loaded model.

- :mod:`.segment`: one upload to masks, through ``predict``'s own reading, inference and writing (so a served mask is
  byte for byte the file ``fcnseg predict`` writes), and the model card; no web framework in it.
- :mod:`.limits`: what an image costs the model: the padded area it computes on, from the model's own geometry.
- :mod:`.pool`: the bounded inference pool (a fixed number of worker threads, a bounded queue, "busy" beyond it; a
  request's deadline, and skipping the work of a request given up).
- :mod:`.middleware`: plain ASGI layers: the request body, read in full within its size and time limits before a
  request takes a place, and the one log line per request (control characters escaped).
- :mod:`.guard`: the Host names answered to, the cross-origin policy and the optional API key.
- :mod:`.protocol`: connections under uvicorn: a cap, a deadline for request headers, and a listening socket that
  survives running out of file descriptors.
- :mod:`.app`: the FastAPI application (needs the ``serve`` extra: FastAPI, uvicorn, python-multipart), and the page
  under ``static/`` (plain HTML, JavaScript and CSS; no build step, nothing fetched from elsewhere).

Nothing here is imported by ``import fcnseg``; ``fcnseg serve`` imports it when it runs.
"""
