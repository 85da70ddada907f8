"""`reelforge serve`: the registered model over HTTP (infra/serve/cli.py is the command).

    store.py    jobs in a folder or bucket: request, status, video, result
    engine.py   the loaded model, the bounded queue, one generation at a time, estimates
    job.py      one job generated and written to the store (the engine's worker and a Ray replica)
    app.py      the FastAPI app: MLflow's /ping /health /version /invocations + /v1/videos jobs
    on_ray.py   the same app on Ray Serve: an ingress over autoscaled generator replicas (--ray)
    cli.py      argument parsing and uvicorn
"""

from infra.serve.cli import main

__all__ = ["main"]
