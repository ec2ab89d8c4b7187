"""The TF Serving stand-in (``mnist serve``): TF Serving's gRPC and REST APIs, its flags, config and
version rules, over TensorFlow SavedModels. Needs TensorFlow; production runs the real server."""
