"""PFJet-SSD inference gateway: validates events, rasterizes them and routes them to a backend.

* :mod:`jetssd_service.app` — the FastAPI app (``create_app``): /v1/detect, /v1/models, /healthz, /readyz, /metrics.
* :mod:`jetssd_service.gateway` — the request pipeline (parse → validate → rasterize → backend → jets) and metrics.
* :mod:`jetssd_service.backends` — ``local`` (in-process ONNX Runtime), ``triton`` (the ensembles), ``dsp``.
* :mod:`jetssd_service.settings` — ``JETSSD_*`` settings; :mod:`jetssd_service.cli` — ``jetssd-service``.
* :mod:`jetssd_service.triton_server` — launches the real Triton server from the nvidia-pytriton wheel.
"""
