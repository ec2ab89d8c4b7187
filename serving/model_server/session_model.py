"""A TF1 SavedModel run the way TF Serving runs every SavedModel: loaded into a Session, each
signature a Session.run feeding and fetching its SignatureDef's tensor names.

``tf.saved_model.load`` turns a TF1 MetaGraph into functions whose inputs take the shapes the
SignatureDef records, and it refuses a graph whose recorded shapes its ops reject at import (TF
Serving's own ``saved_model_half_plus_three``: a scalar ``tf_example`` feeding ParseExample).
A Session imports the graph as TF Serving's does, without those checks; the server falls back to
it only when ``tf.saved_model.load`` refuses a model that has no TF2 object graph.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2


class SessionSignature:
    """One SignatureDef as a call, as a loaded TF2 signature is called: keyword tensors (or arrays)
    in, a dict of tensors out (Session.run between them)."""

    def __init__(self, session: Any, signature: meta_graph_pb2.SignatureDef):
        graph = session.graph
        self.session = session
        self.feeds = {name: graph.get_tensor_by_name(info.name) for name, info in signature.inputs.items()}
        self.fetches = {name: graph.get_tensor_by_name(info.name) for name, info in signature.outputs.items()}

    def __call__(self, **inputs: Any) -> dict[str, tf.Tensor]:
        unknown = set(inputs) - set(self.feeds)
        if unknown:
            raise ValueError(f"unknown inputs {sorted(unknown)}; the signature takes {sorted(self.feeds)}")
        # Session.run's Python wrapper refuses a feed whose shape differs from the placeholder's
        # recorded one ([1] for (None, 1)); TF Serving's C++ Session::Run feeds it, and the graph's
        # ops judge it. The wrapper's own lower call does the same as C++.
        feed = {self.feeds[name]._as_tf_output(): np.asarray(value, dtype=self.feeds[name].dtype.as_numpy_dtype)
                for name, value in inputs.items()}  # eager tensors read as arrays, without a copy
        names = list(self.fetches)
        values = self.session._call_tf_sessionrun(None, feed, [self.fetches[n]._as_tf_output() for n in names], [],
                                                  None)
        return {name: tf.constant(value) for name, value in zip(names, values)}


class SessionModel:
    """A SavedModel loaded into its own graph and Session; ``signatures`` as a loaded TF2 module has."""

    def __init__(self, path: Path, tags: list[str]):
        graph = tf.Graph()
        self.session = tf.compat.v1.Session(graph=graph)
        with graph.as_default():
            meta_graph = tf.compat.v1.saved_model.loader.load(self.session, tags, str(path))
        self.signatures = {name: SessionSignature(self.session, signature)
                           for name, signature in meta_graph.signature_def.items()}

    def close(self) -> None:
        self.session.close()


def meta_graph_with_tags(path: Path, tags) -> meta_graph_pb2.MetaGraphDef | None:
    """The SavedModel's MetaGraph whose tags are exactly ``tags``, read from its saved_model.pb."""
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    return next((meta for meta in saved_model.meta_graphs if set(meta.meta_info_def.tags) == set(tags)), None)


def is_tf1_saved_model(path: Path, tags: list[str]) -> bool:
    """Whether a MetaGraph with exactly these tags exists and has no TF2 object graph (a TF1 export)."""
    meta_graph = meta_graph_with_tags(path, tags)
    return meta_graph is not None and not meta_graph.object_graph_def.nodes


def load_saved_model(path: Path, tags: list[str]) -> Any:
    """``tf.saved_model.load``; for a TF1 SavedModel it refuses, a Session as TF Serving's. Any
    other refusal (tags that name no MetaGraph, a broken TF2 export) stands."""
    try:
        return tf.saved_model.load(str(path), tags=tags)
    except ValueError:
        if not is_tf1_saved_model(path, tags):
            raise
        return SessionModel(path, tags)
