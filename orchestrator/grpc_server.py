"""The `afd.v1.Afd` gRPC service, with the standard health service and server reflection.

Status codes: INVALID_ARGUMENT names the field (`sampling.top_p: is 1.5; must be in (0, 1]`),
RESOURCE_EXHAUSTED when the server is full, UNAVAILABLE while draining or when the cluster
failed the request, UNAUTHENTICATED without the configured bearer token. A cancelled call or an
expired deadline aborts the request on its attention node, which frees its KV blocks.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
from afd.orchestrator.service import Finished, InvalidRequest, Overloaded, Service, Unavailable
from afd.protos import afd_v1_pb2 as pb
from afd.protos import afd_v1_pb2_grpc as pb_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Afd"].full_name
_PROMPT_FIELDS = {"prompt"}


class AfdServicer(pb_grpc.AfdServicer):
    def __init__(self, service: Service) -> None:
        self.service = service

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            prompt = self._parse(request)
        except InvalidRequest as err:
            field = err.field if err.field in _PROMPT_FIELDS else f"sampling.{err.field}"
            self.service.metrics.failed("INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {err.detail}")
        want_logprobs = request.sampling.logprobs
        last = None
        try:
            async for item in self.service.stream(prompt):
                if isinstance(item, Finished):
                    usage = pb.Usage(
                        prompt_tokens=item.prompt_tokens, completion_tokens=item.completion_tokens
                    )
                    yield _response(last, want_logprobs, usage)
                elif item.finish_reason is None:
                    yield _response(item, want_logprobs)
                else:
                    last = item  # sent with the usage, one message later
        except Overloaded as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except Unavailable as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(err))

    async def ModelInfo(
        self, request: pb.ModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfoResponse:
        c, d = self.service.config, self.service.deployment
        return pb.ModelInfoResponse(
            model_type=c.arch,
            model_path=self.service.model_name,
            dtype=d.model.dtype,
            vocab_size=c.vocab_size,
            max_context=c.max_position_embeddings,
            num_layers=c.num_layers,
            num_experts=c.num_experts,
            experts_per_token=c.top_k,
        )

    async def ClusterStatus(
        self, request: pb.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatusResponse:
        s = self.service.cluster.status()
        return pb.ClusterStatusResponse(
            nodes=[
                pb.NodeStatus(
                    name=n.name,
                    pool=n.pool,
                    healthy=n.healthy,
                    running=n.running,
                    waiting=n.waiting,
                    free_kv_blocks=n.free_kv_blocks,
                    total_kv_blocks=n.total_kv_blocks,
                    expert_ids=n.expert_ids,
                    tokens=n.tokens,
                    layers=[
                        pb.NodeLayerLoad(layer=layer, expert_ids=ids, tokens=tokens)
                        for layer, ids, tokens in n.layer_tokens
                    ],
                )
                for n in s.nodes
            ],
            running=self.service.in_flight,
            waiting=s.queued,
            steps=s.steps,
            experts=[
                pb.ExpertLoad(expert_id=e, tokens=t) for e, t in sorted(s.expert_tokens.items())
            ],
            layers=[
                pb.LayerLoad(
                    layer=x.layer,
                    expert_tokens=x.expert_tokens,
                    node_tokens=x.node_tokens,
                    imbalance=x.imbalance,
                )
                for x in s.layer_loads
            ],
            load_window_steps=s.load_window_steps,
            expert_rebalances=s.expert_rebalances,
        )

    def _parse(self, request: pb.GenerateRequest):
        s = request.sampling
        which = request.WhichOneof("prompt")
        return self.service.parse(
            text=request.text if which == "text" else None,
            ids=list(request.token_ids.ids) if which == "token_ids" else None,
            max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
            temperature=s.temperature if s.HasField("temperature") else None,
            top_p=s.top_p if s.HasField("top_p") else None,
            top_k=s.top_k if s.HasField("top_k") else None,
            seed=s.seed if s.HasField("seed") else None,
            stop=list(s.stop),
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs,
        )


def _response(item, want_logprobs: bool, usage: pb.Usage | None = None) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=item.request_id,
        text=item.text_delta,
        token_ids=[item.token_id],
        logprobs=[item.logprob] if want_logprobs else [],
        finish_reason=item.finish_reason or "",
        usage=usage,
    )


class BearerAuth(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on afd's own methods; health and reflection
    stay open so that probes and stock tools work without the secret."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(f"/{SERVICE_NAME}/"):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(sent.encode(), self._expected):
            return handler

        async def deny(request, context: grpc.aio.ServicerContext):
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED, "missing or wrong 'authorization: Bearer' token"
            )

        kind = (
            grpc.unary_stream_rpc_method_handler
            if handler.response_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return kind(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def start_grpc(
    service: Service, host: str, port: int
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Starts the server; returns it, the port it bound and its health servicer."""
    serve = service.deployment.serve
    token = _auth_token(serve)
    limit = serve.max_message_bytes
    server = grpc.aio.server(
        interceptors=[BearerAuth(token)] if token else [],
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ],
    )
    pb_grpc.add_AfdServicer_to_server(AfdServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{host}:{port}"
    if serve.tls_cert:
        key, cert = _read(serve.tls_key or ""), _read(serve.tls_cert)
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([(key, cert)]))
    else:
        bound = server.add_insecure_port(address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


def _auth_token(serve) -> str | None:
    import os

    if serve.auth_token_env:
        token = os.environ.get(serve.auth_token_env)
        if not token:
            raise ValueError(
                f"serve.auth_token_env names ${serve.auth_token_env}, which is not set"
            )
        return token
    return serve.auth_token


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
