"""Regenerate ``mnist_client/_generated`` from TF Serving 2.21's protos with grpcio-tools.

    python clients/python/generate_protos.py [OUT_DIR]

The .proto sources are taken as TF Serving 2.21 compiled them: the file descriptors
inside the pinned ``tensorflow-serving-api==2.21.0`` wheel (which carries no .proto files),
so the generated messages have exactly TF Serving's packages, names and field numbers.
grpcio-tools' protoc compiles them (``--descriptor_set_in``) into Python messages and gRPC
stubs, which are then moved under ``mnist_client._generated`` and given a descriptor pool
of their own, so they import without TensorFlow and live beside it in one process.

Committed rather than built at install time: installing the client then needs neither
grpcio-tools nor TensorFlow, and tests/clients/test_light_client.py checks that the committed
files are what this script generates.
"""

from __future__ import annotations

import re
import shutil
import sys
import tempfile
from pathlib import Path

SERVICES = ("tensorflow_serving/apis/prediction_service.proto", "tensorflow_serving/apis/model_service.proto")
# PredictionLog too: the logging gateway writes, and the drift and feedback readers read, TF Serving's own records.
ROOTS = (*SERVICES, "tensorflow_serving/apis/prediction_log.proto")
PACKAGE = "mnist_client._generated"
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "mnist_client" / "_generated"


def descriptor_set() -> bytes:
    """Every file the two services and PredictionLog need, in dependency order, from the installed wheel."""
    from google.protobuf import descriptor_pb2
    from tensorflow_serving.apis import model_service_pb2, prediction_log_pb2, prediction_service_pb2

    files, seen = descriptor_pb2.FileDescriptorSet(), set()

    def add(descriptor) -> None:
        if descriptor.name in seen:
            return
        seen.add(descriptor.name)
        for dependency in descriptor.dependencies:
            add(dependency)
        descriptor.CopyToProto(files.file.add())

    add(prediction_service_pb2.DESCRIPTOR)
    add(model_service_pb2.DESCRIPTOR)
    add(prediction_log_pb2.DESCRIPTOR)
    return files.SerializeToString()


def relocate(source: str, packages: set[str]) -> str:
    """Imports of the generated modules (top-level ``packages``: tensorflow, tensorflow_serving,
    xla, ...) point into our package; descriptors go to our own pool."""
    alternatives = "|".join(sorted(packages))
    source = re.sub(rf"^from ((?:{alternatives})(?:\.\w+)*) import ", lambda m: f"from {PACKAGE}.{m[1]} import ",
                    source, flags=re.M)
    source = re.sub(rf"^import ((?:{alternatives})(?:\.\w+)*)_pb2 as ", lambda m: f"import {PACKAGE}.{m[1]}_pb2 as ",
                    source, flags=re.M)
    source = source.replace("_descriptor_pool.Default()", "_private_pool.POOL")
    source = source.replace("from google.protobuf import descriptor_pool as _descriptor_pool\n",
                            f"from google.protobuf import descriptor_pool as _descriptor_pool\n"
                            f"from {PACKAGE} import _pool as _private_pool\n")
    return source


POOL_MODULE = '''"""The generated messages' own descriptor pool: TF Serving's names, apart from TensorFlow's,
with the well-known types they use (Any, wrappers) added first."""

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, wrappers_pb2

POOL = descriptor_pool.DescriptorPool()
for _module in (any_pb2, wrappers_pb2):
    _file = descriptor_pb2.FileDescriptorProto()
    _module.DESCRIPTOR.CopyToProto(_file)
    POOL.Add(_file)
'''


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as scratch:
        descriptors = Path(scratch) / "descriptors.pb"
        descriptors.write_bytes(descriptor_set())
        build = Path(scratch) / "build"
        build.mkdir()
        from google.protobuf import descriptor_pb2

        names = [f.name for f in descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes()).file]
        code = protoc.main(["protoc", f"--descriptor_set_in={descriptors}", f"--python_out={build}",
                            f"--grpc_python_out={build}", *names])
        if code != 0:
            raise SystemExit(f"protoc failed with exit code {code}")
        if out.exists():
            shutil.rmtree(out)
        written = []
        # protobuf's own well-known types (google/protobuf/*) come from the protobuf package
        packages = {path.name for path in build.iterdir() if path.is_dir() and path.name != "google"}
        for path in sorted(build.rglob("*.py")):
            if path.relative_to(build).parts[0] == "google":
                continue
            if path.name.endswith("_pb2_grpc.py") and path.name.removesuffix("_pb2_grpc.py") + ".proto" not in {
                    Path(r).name for r in SERVICES}:
                continue  # only the two services have stubs worth keeping
            target = out / path.relative_to(build)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(relocate(path.read_text(), packages))
            written.append(target)
        for directory in [out, *(p for p in out.rglob("*") if p.is_dir())]:
            (directory / "__init__.py").touch()
        (out / "_pool.py").write_text(POOL_MODULE)
    return written


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    print(f"generated {len(generate(target))} modules into {target}")
