"""A fedflow client from another gRPC implementation (Python grpcio), for the interop test.

Generates Python stubs from fedflow's own .proto files with grpc_tools.protoc (into a
temporary directory, at every run, so they can never be stale), then, against the
coordinator at ADDRESS (host:port, plaintext):

  1. grpc.health.v1.Health/Check for the whole server ("") and for fedflow.v1.Admin and
     fedflow.v1.Federation: each must answer SERVING; an unknown service must be NOT_FOUND;
  2. fedflow.v1.Admin/GetStatus and ListRounds;
  3. with --enrol SITE: fedflow.v1.Federation/Enrol as SITE, then Admin/ListSites.

Prints one JSON object on stdout (what it read, see `summary` below) and exits 0; on any
failure it prints what failed on stderr and exits non-zero.

Needs the packages of tests/python/requirements.txt (tests/python/setup-venv.sh installs
them). Usage: interop_client.py ADDRESS [--enrol SITE] [--proto-dir DIR]
"""

import argparse
import importlib
import importlib.resources
import json
import os
import sys
import tempfile

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_tools import protoc

PROTOS = ["fedflow/v1/federation.proto", "fedflow/v1/admin.proto"]
TIMEOUT_S = 10.0


class Failure(Exception):
    pass


def generate_stubs(proto_dir, out_dir):
    """Compiles fedflow's protos into out_dir and imports the generated modules."""
    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise Failure(f"grpc_tools.protoc failed on {PROTOS} in {proto_dir}")
    sys.path.insert(0, out_dir)
    return {
        name: importlib.import_module(f"fedflow.v1.{name}")
        for name in ["admin_pb2", "admin_pb2_grpc", "federation_pb2", "federation_pb2_grpc"]
    }


def call(what, rpc, request):
    try:
        return rpc(request, timeout=TIMEOUT_S)
    except grpc.RpcError as e:
        raise Failure(f"{what}: {e.code().name}: {e.details()}") from None


def run(address, proto_dir, enrol):
    with tempfile.TemporaryDirectory(prefix="fedflow-pystubs-") as out:
        pb = generate_stubs(proto_dir, out)
        admin_pb2, federation_pb2 = pb["admin_pb2"], pb["federation_pb2"]
        with grpc.insecure_channel(address) as channel:
            try:
                grpc.channel_ready_future(channel).result(timeout=TIMEOUT_S)
            except grpc.FutureTimeoutError:
                raise Failure(f"no gRPC server answered at {address} within {TIMEOUT_S} s") from None

            # 1. Standard health checking.
            health = health_pb2_grpc.HealthStub(channel)
            serving = health_pb2.HealthCheckResponse.SERVING
            health_seen = {}
            for service in ["", "fedflow.v1.Admin", "fedflow.v1.Federation"]:
                r = call(f"Health/Check({service!r})", health.Check,
                         health_pb2.HealthCheckRequest(service=service))
                name = health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)
                health_seen[service] = name
                if r.status != serving:
                    raise Failure(f"Health/Check({service!r}) answered {name}, not SERVING")
            try:
                health.Check(health_pb2.HealthCheckRequest(service="fedflow.v1.NoSuchService"),
                             timeout=TIMEOUT_S)
                raise Failure("Health/Check of an unknown service answered instead of NOT_FOUND")
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.NOT_FOUND:
                    raise Failure(f"Health/Check of an unknown service: {e.code().name}, "
                                  f"not NOT_FOUND: {e.details()}") from None

            # 2. The admin view.
            admin = pb["admin_pb2_grpc"].AdminStub(channel)
            status = call("Admin/GetStatus", admin.GetStatus, admin_pb2.GetStatusRequest())
            rounds = call("Admin/ListRounds", admin.ListRounds, admin_pb2.ListRoundsRequest())
            summary = {
                "grpcio": grpc.__version__,
                "health": health_seen,
                "run_id": status.run_id,
                "phase": admin_pb2.RunPhase.Name(status.phase),
                "committed_round": status.committed_round,
                "current_round": status.current_round,
                "total_rounds": status.total_rounds,
                "global_model_sha256": status.global_model_sha256,
                "status_sites": sorted(s.site_id for s in status.sites),
                "rounds_run_id": rounds.run_id,
                "rounds_listed": len(rounds.rounds),
                "rounds": [{"round": r.round, "status": r.status} for r in rounds.rounds],
            }

            # 3. The partner sites' service.
            if enrol is not None:
                federation = pb["federation_pb2_grpc"].FederationStub(channel)
                e = call(f"Federation/Enrol({enrol!r})", federation.Enrol,
                         federation_pb2.EnrolRequest(site_id=enrol,
                                                     client_version="python-interop"))
                sites = call("Admin/ListSites", admin.ListSites, admin_pb2.ListSitesRequest())
                summary["enrol"] = {
                    "site_id": enrol,
                    "coordinator_version": e.coordinator_version,
                    "heartbeat_interval_ms": e.heartbeat_interval_ms,
                    "max_chunk_bytes": e.max_chunk_bytes,
                }
                summary["sites"] = sorted(s.site_id for s in sites.sites)
                if enrol not in summary["sites"]:
                    raise Failure(f"Admin/ListSites does not list {enrol!r} after it enrolled: "
                                  f"{summary['sites']}")
            return summary


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("address", help="the coordinator, host:port (plaintext gRPC)")
    p.add_argument("--enrol", metavar="SITE", help="also enrol as SITE through Federation/Enrol")
    p.add_argument("--proto-dir", default=os.path.join(here, "..", "..", "proto"),
                   help="root of the fedflow .proto files (default: the repository's proto/)")
    a = p.parse_args()
    try:
        summary = run(a.address, os.path.abspath(a.proto_dir), a.enrol)
    except Failure as e:
        print(f"interop_client: FAILED: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
