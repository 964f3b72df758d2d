"""The HTTP server: AUTOMATIC1111's ``/sdapi/v1`` API, OpenAI's ``/v1/images`` API and a web page.

    app.py         the FastAPI application: authentication, size limits, error responses, routes
    a1111.py       ``/sdapi/v1/*`` (txt2img, img2img, options, progress, interrupt, png-info, …)
    openai_api.py  ``/v1/images/generations`` and ``/v1/models``
    schema.py      JSON <-> ``GenerationRequest``, PNG encoding, safe image decoding: the one mapping
    jobs.py        what a generation job does on the worker (batches, interrupt, skip, partial images)
    worker.py      one worker thread and a bounded queue; progress, interrupt and skip of the running job
    registry.py    the models in ``--models-dir`` (names never reach outside it), LoRAs, embeddings
    config.py      ``ServerConfig``: host, port, key and every limit
    cli.py         ``torchsd serve``
    static/        the web page (plain HTML and JavaScript, no build step)

FastAPI and uvicorn are optional dependencies (``pip install torchsd[server]``), imported only here.
"""
