"""``hierarchy serve``: a pipeline as an HTTP service (FastAPI + uvicorn) with an upload page.

:mod:`~hierarchy.serve.service` loads and warms the pipeline and classifies uploads,
:mod:`~hierarchy.serve.batcher` merges concurrent requests into router batches,
:mod:`~hierarchy.serve.limits` refuses what is too big or too much, :mod:`~hierarchy.serve.metrics`
counts for Prometheus, :mod:`~hierarchy.serve.app` is the FastAPI app and ``static/`` the page.
Needs the ``serve`` extra: ``pip install 'hierarchy-cascade[serve]'``.
"""
