"""logitserve's HTTP service: FastAPI front end, token-budget batcher and a pool of model worker processes."""

__version__ = "0.1.0"
