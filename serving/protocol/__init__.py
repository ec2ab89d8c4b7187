"""What the model server and the gateway both speak: HTTP/1.1 framing, TF Serving's JSON tensors,
REST paths, Prometheus metrics and TF Serving's text-format configs. No TensorFlow, no Prefect."""
