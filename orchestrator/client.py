"""A small synchronous client of afd's gRPC API, for `afd client`, `afd demo` and benchmarks."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from afd.protos import afd_v1_pb2 as pb
from afd.protos import afd_v1_pb2_grpc as pb_grpc


def channel(target: str, tls_ca: str | None = None) -> grpc.Channel:
    if tls_ca is None:
        return grpc.insecure_channel(target)
    with open(tls_ca, "rb") as f:
        return grpc.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=f.read()))


def request(
    text: str | None = None, ids: list[int] | None = None, **sampling: Any
) -> pb.GenerateRequest:
    """`sampling` takes the fields of afd.v1.SamplingParams by name."""
    params = pb.SamplingParams(**sampling)
    if ids is not None:
        return pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), sampling=params)
    return pb.GenerateRequest(text=text, sampling=params)


def generate(
    ch: grpc.Channel,
    req: pb.GenerateRequest,
    token: str | None = None,
    timeout_s: float | None = None,
) -> Iterator[pb.GenerateResponse]:
    metadata = [("authorization", f"Bearer {token}")] if token else None
    return pb_grpc.AfdStub(ch).Generate(req, timeout=timeout_s, metadata=metadata)
