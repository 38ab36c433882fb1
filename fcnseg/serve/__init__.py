"""``fcnseg serve``: a segmentation service (JSON / HTTP API) and a web page, over one loaded model.

- :mod:`.segment`: one upload to masks, through ``predict``'s own reading, inference and writing (so a served mask is
  byte for byte the file ``fcnseg predict`` writes), and the model card; no web framework in it.
- :mod:`.pool`: the bounded inference pool (a fixed number of worker threads, a bounded queue, "busy" beyond it).
- :mod:`.middleware`: plain ASGI layers: the upload size limit (enforced while the body is read) and the one log line
  per request.
- :mod:`.app`: the FastAPI application (needs the ``serve`` extra: FastAPI, uvicorn, python-multipart), and the page
  under ``static/`` (plain HTML, JavaScript and CSS; no build step, nothing fetched from elsewhere).

Nothing here is imported by ``import fcnseg``; ``fcnseg serve`` imports it when it runs.
"""
