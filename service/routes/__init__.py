"""Every route, one APIRouter per family. A new endpoint is a function in the family's module (or a new module
listed here); its router's route class meters it and its dependencies check the API key and readiness."""

from . import docs, labels, openai, operations, playground, scoring, tokenizer

ROUTERS = [scoring.router, labels.router, openai.router, tokenizer.router, operations.router, playground.router,
           docs.router]
