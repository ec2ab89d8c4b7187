"""TF Serving's messages and service stubs, generated without TensorFlow: the public name for what
``_generated`` holds, for code that builds or reads requests itself (the gateway, the sync, the
tasks that read prediction logs). ``_generated`` is the generator's output and may be laid out anew
when TF Serving's protos change; these names stay."""

from mnist_client._generated.tensorflow.core.framework import tensor_pb2, types_pb2
from mnist_client._generated.tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    logging_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_log_pb2,
    prediction_service_pb2_grpc,
)
from mnist_client._generated.tensorflow_serving.config import model_server_config_pb2

__all__ = ["classification_pb2", "get_model_metadata_pb2", "get_model_status_pb2", "logging_pb2", "model_pb2",
           "model_server_config_pb2", "model_service_pb2_grpc", "predict_pb2", "prediction_log_pb2",
           "prediction_service_pb2_grpc", "tensor_pb2", "types_pb2"]
