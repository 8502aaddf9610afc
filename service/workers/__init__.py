"""The model workers: the process main (process.py), the front end's contract with it (protocol.py), the result
segment's layout (wire.py) and the supervision of replicas (supervisor.py)."""

from .protocol import Batch, RequestSpan
from .supervisor import Replica, Requeue, WorkerPool
from .wire import MappedBatch, RequestOutputs

__all__ = ["Batch", "MappedBatch", "Replica", "RequestOutputs", "RequestSpan", "Requeue", "WorkerPool"]
