"""The error a checkpoint this server cannot run raises (its own module: the registry and the config readers both
raise it, and neither may import the other's dependents)."""


class UnsupportedModelError(ValueError):
    """The checkpoint asks for something this server does not implement."""


class Cancelled(Exception):
    """A forward stopped at a block boundary because its `should_stop` said so (nobody waits for its outputs)."""
