"""Real grpcio on both ends, for federation-controller/tests/grpc_proxyless.rs.

    grpc_proxyless.py serve NAME=IP ...   one plaintext gRPC server per NAME on IP,
                                          all on the same port; prints "port P",
                                          then serves until stdin closes
    grpc_proxyless.py client TARGET       a proxyless xDS client (GRPC_XDS_BOOTSTRAP)
                                          on one channel to TARGET, driven by stdin:
                                          "call N" -> {"answers": [...], "errors": [...]}
                                          "once TARGET SECONDS" -> {"answer"} or {"error"},
                                                      one call on a new channel
                                          "csds"   -> [{"type", "name", "status", "error",
                                                        "endpoints"}, ...] what it holds
                                          one JSON line each

A missing module is an import error and a non-zero exit: the test fails, it never skips.
"""

import json
import sys

import grpc
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.status.v3 import csds_pb2
from grpc._cython import cygrpc

SERVICE = "isthmus.test.Echo"
METHOD = f"/{SERVICE}/Who"


def serve(pairs):
    names = [p.split("=", 1) for p in pairs]
    for _attempt in range(20):
        servers, port = [], 0
        try:
            for name, ip in names:
                server = grpc.server(thread_pool())
                answer = name.encode()
                server.add_generic_rpc_handlers(
                    (
                        grpc.method_handlers_generic_handler(
                            SERVICE,
                            {"Who": grpc.unary_unary_rpc_method_handler(lambda _req, _ctx, a=answer: a)},
                        ),
                    )
                )
                port = server.add_insecure_port(f"{ip}:{port}")
                if port == 0:
                    raise RuntimeError(f"cannot bind {ip}")
                servers.append(server)
        except RuntimeError:
            # The first address's port was taken on another one: try another port.
            for s in servers:
                s.stop(None)
            continue
        for s in servers:
            s.start()
        print(f"port {port}", flush=True)
        sys.stdin.read()
        return
    sys.exit("no port free on every address")


def thread_pool():
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max_workers=4)


def csds():
    dump = csds_pb2.ClientStatusResponse.FromString(cygrpc.dump_xds_configs())
    def status(c):
        enum = c.DESCRIPTOR.fields_by_name["client_status"].enum_type
        return enum.values_by_number[c.client_status].name

    def endpoints(c):
        if not c.xds_config.Is(endpoint_pb2.ClusterLoadAssignment.DESCRIPTOR):
            return None
        cla = endpoint_pb2.ClusterLoadAssignment()
        c.xds_config.Unpack(cla)
        return sorted(
            f"{e.endpoint.address.socket_address.address}:{e.endpoint.address.socket_address.port_value}"
            for l in cla.endpoints
            for e in l.lb_endpoints
        )

    return [
        {
            "type": c.type_url,
            "name": c.name,
            "status": status(c),
            "error": c.error_state.details,
            "endpoints": endpoints(c),
        }
        for config in dump.config
        for c in config.generic_xds_configs
    ]


def client(target):
    channel = grpc.insecure_channel(target)
    who = channel.unary_unary(METHOD)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[:1] == ["once"]:
            # One call on a fresh channel to another target, failing fast.
            with grpc.insecure_channel(cmd[1]) as other:
                try:
                    out = {"answer": other.unary_unary(METHOD)(b"", timeout=float(cmd[2])).decode()}
                except grpc.RpcError as e:
                    out = {"error": f"{e.code().name}: {e.details()}"}
        elif cmd[:1] == ["call"]:
            answers, errors = [], []
            for _ in range(int(cmd[1])):
                try:
                    answers.append(who(b"", timeout=5, wait_for_ready=True).decode())
                except grpc.RpcError as e:
                    # One failure says why; the test polls again rather than wait out the rest.
                    errors.append(f"{e.code().name}: {e.details()}")
                    break
            out = {"answers": answers, "errors": errors}
        elif cmd[:1] == ["csds"]:
            out = csds()
        else:
            sys.exit(f"unknown command {line!r}")
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    {"serve": lambda: serve(sys.argv[2:]), "client": lambda: client(sys.argv[2])}[sys.argv[1]]()
