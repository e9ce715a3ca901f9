"""memlm: a retrieval- and memory-augmented language-model service."""
__version__ = "0.1.0"


def __getattr__(name: str):
    # The client pulls in grpc; import it lazily so `import memlm.index` stays light.
    if name == "Client":
        from memlm.client import Client

        return Client
    if name == "AsyncClient":
        from memlm.async_client import AsyncClient

        return AsyncClient
    raise AttributeError(name)
