"""A SavedModel with predict, classify and regress signatures, built as TF Serving's
testdata ``saved_model_half_plus_two.py`` builds its own: y = 0.5 * x + 2."""

from __future__ import annotations

from pathlib import Path


def export_half_plus_two(directory: Path, as_tf_serving_testdata: bool = False) -> Path:
    """``as_tf_serving_testdata``: also the shapes and method names of TF Serving's own testdata that
    its tests rely on: ``x_column`` takes x as [-1, 1] (saved_model_half_plus_two_cpu's), and
    ``classify_tf2`` / ``regress_tf2`` are example signatures named tensorflow/serving/predict, as a
    TF2 export names every signature (saved_model_half_plus_two_tf2_cpu's)."""
    import tensorflow as tf

    v1 = tf.compat.v1
    with tf.Graph().as_default(), v1.Session() as session:
        serialized = v1.placeholder(tf.string, [None], name="tf_example")
        parsed = v1.io.parse_example(serialized, {"x": tf.io.FixedLenFeature([1], tf.float32)})
        a, b = tf.Variable(0.5, name="a"), tf.Variable(2.0, name="b")
        y_examples = tf.identity(a * parsed["x"] + b, name="y_examples")
        x = v1.placeholder(tf.float32, [None], name="x")
        y = tf.identity(a * x + b, name="y")
        info = v1.saved_model.utils.build_tensor_info
        build = v1.saved_model.signature_def_utils.build_signature_def
        constants = v1.saved_model.signature_constants
        signatures = {
            "serving_default": build({"x": info(x)}, {"y": info(y)}, constants.PREDICT_METHOD_NAME),
            "classify_x_to_y": build({constants.CLASSIFY_INPUTS: info(serialized)},
                                     {constants.CLASSIFY_OUTPUT_SCORES: info(y_examples)},
                                     constants.CLASSIFY_METHOD_NAME),
            "regress_x_to_y": build({constants.REGRESS_INPUTS: info(serialized)},
                                    {constants.REGRESS_OUTPUTS: info(y_examples)}, constants.REGRESS_METHOD_NAME),
        }
        if as_tf_serving_testdata:
            column = v1.placeholder(tf.float32, [None, 1], name="x_column")
            signatures["x_column"] = build({"x": info(column)}, {"y": info(tf.identity(a * column + b))},
                                           constants.PREDICT_METHOD_NAME)
            signatures["classify_tf2"] = build({constants.CLASSIFY_INPUTS: info(serialized)},
                                               {constants.CLASSIFY_OUTPUT_SCORES: info(y_examples)},
                                               constants.PREDICT_METHOD_NAME)
            signatures["regress_tf2"] = build({constants.REGRESS_INPUTS: info(serialized)},
                                              {constants.REGRESS_OUTPUTS: info(y_examples)},
                                              constants.PREDICT_METHOD_NAME)
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(directory))
        builder.add_meta_graph_and_variables(session, [v1.saved_model.tag_constants.SERVING],
                                             signature_def_map=signatures)
        builder.save()
    return directory


def export_half_plus_three_as_tf_1_0(directory: Path) -> Path:
    """y = 0.5 * x + 3 with a predict signature (x) and a regress one (tf_example), as TensorFlow
    1.0 wrote TF Serving's testdata saved_model_half_plus_three: graph producer version 21,
    ParseExample's first version, the examples' placeholder with an empty shape attribute (an
    unknown shape at producer 21), no recorded output shapes, and signatures whose TensorInfos
    record no shape: tf.saved_model.load builds each signature's inputs from its TensorInfo, a
    scalar, which ParseExample refuses; a Session feeds the graph's own placeholder."""
    import tensorflow as tf
    from tensorflow.core.framework import tensor_shape_pb2
    from tensorflow.core.protobuf import saved_model_pb2

    v1 = tf.compat.v1
    with tf.Graph().as_default(), v1.Session() as session:
        serialized = v1.placeholder(tf.string, [None], name="tf_example")
        [parsed] = tf.raw_ops.ParseExample(serialized=serialized, names=tf.constant([], tf.string), sparse_keys=[],
                                           dense_keys=[tf.constant("x")], dense_defaults=[tf.constant([], tf.float32)],
                                           sparse_types=[], dense_shapes=[[1]]).dense_values
        a, b = tf.Variable(0.5, name="a"), tf.Variable(3.0, name="b")
        x = v1.placeholder(tf.float32, [None, 1], name="x")
        info = v1.saved_model.utils.build_tensor_info
        build = v1.saved_model.signature_def_utils.build_signature_def
        constants = v1.saved_model.signature_constants
        signatures = {
            "serving_default": build({"x": info(x)}, {"y": info(tf.identity(a * x + b, name="y"))},
                                     constants.PREDICT_METHOD_NAME),
            "regress_x_to_y": build({constants.REGRESS_INPUTS: info(serialized)},
                                    {constants.REGRESS_OUTPUTS: info(tf.identity(a * parsed + b))},
                                    constants.REGRESS_METHOD_NAME),
        }
        session.run(v1.global_variables_initializer())
        builder = v1.saved_model.Builder(str(directory))
        builder.add_meta_graph_and_variables(session, [v1.saved_model.tag_constants.SERVING],
                                             signature_def_map=signatures)
        builder.save()
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((directory / "saved_model.pb").read_bytes())
    graph = saved_model.meta_graphs[0].graph_def
    graph.versions.producer = 21  # TF 1.0's: to it, an empty placeholder shape means an unknown one
    for node in graph.node:
        node.attr.pop("_output_shapes", None)
        if node.name == "tf_example":
            node.attr["shape"].shape.CopyFrom(tensor_shape_pb2.TensorShapeProto())
    for signature in saved_model.meta_graphs[0].signature_def.values():
        for tensor in [*signature.inputs.values(), *signature.outputs.values()]:
            tensor.ClearField("tensor_shape")  # TF 1.0's TensorInfo recorded no shape
    (directory / "saved_model.pb").write_bytes(saved_model.SerializeToString())
    return directory
