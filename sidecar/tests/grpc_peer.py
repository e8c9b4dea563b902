"""Real grpcio at both ends of a sidecar pair, for sidecar/tests/grpc_peer.rs.

    grpc_peer.py serve              a plaintext gRPC server on 127.0.0.1; prints "port P",
                                    then serves until stdin closes
    grpc_peer.py call TARGET AUTH   calls it through TARGET (plaintext, `:authority` AUTH)
                                    once per kind of RPC; prints one JSON object

The service (generic handlers, bytes in and out, so no generated code):
    Who    unary          -> the x-forwarded-client-cert it saw (grpcio shows a server
                              no :authority; tests/app_protocol.rs checks that)
    Count  server stream  -> N messages "0".."N-1" for a request "N"
    Sum    client stream  -> the total length of what it was sent
    Fail   unary          -> status NOT_FOUND with details and trailing metadata

A missing module is an import error and a non-zero exit: the test fails, it never skips.
"""

import json
import sys
from concurrent import futures

import grpc

SERVICE = "isthmus.test.Peer"


def metadata(ctx, key):
    return next((v for k, v in ctx.invocation_metadata() if k == key), "-")


def who(_req, ctx):
    return metadata(ctx, "x-forwarded-client-cert").encode()


def count(req, _ctx):
    for i in range(int(req)):
        yield str(i).encode()


def total(requests, _ctx):
    return str(sum(len(r) for r in requests)).encode()


def fail(_req, ctx):
    ctx.set_trailing_metadata((("x-review", "none"),))
    ctx.abort(grpc.StatusCode.NOT_FOUND, "no such review")


def serve():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE,
                {
                    "Who": grpc.unary_unary_rpc_method_handler(who),
                    "Count": grpc.unary_stream_rpc_method_handler(count),
                    "Sum": grpc.stream_unary_rpc_method_handler(total),
                    "Fail": grpc.unary_unary_rpc_method_handler(fail),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"port {port}", flush=True)
    sys.stdin.read()
    server.stop(None)


def call(target, authority):
    channel = grpc.insecure_channel(target, options=(("grpc.default_authority", authority),))
    grpc.channel_ready_future(channel).result(timeout=10)
    method = lambda name: f"/{SERVICE}/{name}"  # noqa: E731
    out = {}
    out["who"] = channel.unary_unary(method("Who"))(b"", timeout=10).decode()
    out["count"] = [m.decode() for m in channel.unary_stream(method("Count"))(b"5", timeout=10)]
    # 1 MiB in 64 KiB messages: flow control across both sidecars.
    chunks = (b"x" * 65536 for _ in range(16))
    out["sum"] = channel.stream_unary(method("Sum"))(chunks, timeout=10).decode()
    try:
        channel.unary_unary(method("Fail"))(b"", timeout=10)
        out["fail"] = "no error"
    except grpc.RpcError as e:
        out["fail"] = {
            "code": e.code().name,
            "details": e.details(),
            "trailing": dict(e.trailing_metadata() or ()),
        }
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve()
    elif sys.argv[1] == "call":
        call(sys.argv[2], sys.argv[3])
    else:
        sys.exit(f"unknown mode {sys.argv[1]}")
