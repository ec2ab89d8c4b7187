"""Query a TensorFlow Serving model (or ``mnist serve``) over gRPC, without TensorFlow.

    from mnist_client import predict
    answers = predict(images, address="host:8500", model_name="mnist", label="stable")

``images``: [N,28,28,1] in [0,1], a numpy array (``pip install 'mnist-client[numpy]'``) or, with
grpcio and protobuf alone, nested lists; ``mnist_client.images.read_inputs`` (the ``[images]`` extra)
turns PNG/JPEG files or .npy arrays into that, prepared the way MNIST's digits were.
"""

from mnist_client.client import (
    Prediction,
    ServingError,
    Target,
    model_status,
    predict,
    predict_call,
    predict_probabilities,
    signature_io,
)

__all__ = ["Prediction", "ServingError", "Target", "model_status", "predict", "predict_call",
           "predict_probabilities", "signature_io"]
