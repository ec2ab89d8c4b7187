"""Query a TensorFlow Serving model (or ``mnist serve``) over gRPC, without TensorFlow.

    from mnist_client import predict
    answers = predict(images, address="host:8500", model_name="mnist", label="stable")

``images``: float32 [N,28,28,1] in [0,1]; ``mnist_client.images.read_inputs`` turns PNG/JPEG
files or .npy arrays into that, prepared the way MNIST's digits were.
"""

from mnist_client.client import (
    Prediction, ServingError, Target, model_status, predict, predict_call, predict_probabilities, signature_io,
)

__all__ = ["Prediction", "ServingError", "Target", "model_status", "predict", "predict_call",
           "predict_probabilities", "signature_io"]
