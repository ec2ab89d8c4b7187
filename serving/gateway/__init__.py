"""The logging gateway sidecar in front of the model server: relays gRPC frame by frame, answers
TF Serving's REST API, logs sampled calls as PredictionLogs and takes feedback. No TensorFlow, no
Prefect."""
