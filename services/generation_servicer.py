"""`memlm.v1.Generation`: translates wire messages to `EngineClient` calls and back.

Cancellation and deadlines: when the client cancels or the deadline passes, grpc.aio cancels this
handler; `aclosing` then closes the engine's iterator, which stops generation at the next token.
"""
from __future__ import annotations

from contextlib import aclosing

from memlm import wire
from memlm.engine import EngineClient, GenerationResult, ModelInfo
from memlm.services.rpc import streaming, unary
from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc


def model_info_to_pb(info: ModelInfo) -> pb.ModelInfoResponse:
    return pb.ModelInfoResponse(
        name=info.name, context_length=info.context_length, vocab_size=info.vocab_size, layers=info.layers,
        memory_modes=[wire.memory_mode_to_pb(m) for m in info.supported_memory_modes],
    )


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: EngineClient, *, default_max_new_tokens: int = 128):
        self._engine = engine
        self._default_max_new_tokens = default_max_new_tokens

    @streaming
    async def Generate(self, request: pb.GenerateRequest, context):
        req = wire.generation_request_from_pb(request, default_max_new_tokens=self._default_max_new_tokens)
        async with aclosing(self._engine.generate(req)) as events:
            async for event in events:
                if isinstance(event, GenerationResult):
                    yield pb.GenerateResponse(done=wire.done_to_pb(event))
                else:
                    yield pb.GenerateResponse(delta=event.text)

    @unary
    async def ModelInfo(self, request, context) -> pb.ModelInfoResponse:
        return model_info_to_pb(self._engine.info())
