"""The generated messages' own descriptor pool: TF Serving's names, apart from TensorFlow's,
with the well-known types they use (Any, wrappers) added first."""

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, wrappers_pb2

POOL = descriptor_pool.DescriptorPool()
for _module in (any_pb2, wrappers_pb2):
    _file = descriptor_pb2.FileDescriptorProto()
    _module.DESCRIPTOR.CopyToProto(_file)
    POOL.Add(_file)
