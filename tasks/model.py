"""Model stage: the reference CNN, with the knobs its tuning section lists."""

from __future__ import annotations

from pathlib import Path

import keras

from tasks.recipes import ModelConfig

INPUT_NAME = "image"


def build_model(config: ModelConfig, num_classes: int = 10, dtype: str = "float32") -> keras.Model:
    """Conv-Pool-Conv-Pool-Dense-Dropout-Softmax, as in the reference recipe.

    The input layer is named so the exported signature's input is ``image``.
    ``dtype`` is a Keras dtype policy; the softmax always runs in float32.
    """
    regularizer = keras.regularizers.L2(config.l2) if config.l2 > 0 else None

    def with_relu(layer: type, *args, **kwargs):
        """The layer with ReLU, as in the reference; with batch normalisation between them (and no
        bias, which the normalisation makes redundant) when the config asks for it."""
        def apply(x):
            if not config.batch_norm:
                return layer(*args, activation="relu", dtype=dtype, **kwargs)(x)
            x = layer(*args, use_bias=False, dtype=dtype, **kwargs)(x)
            return keras.layers.Activation("relu", dtype=dtype)(keras.layers.BatchNormalization(dtype=dtype)(x))
        return apply

    inputs = keras.Input(shape=(28, 28, 1), name=INPUT_NAME)
    x = with_relu(keras.layers.Conv2D, config.filters_1, config.kernel_size)(inputs)
    x = keras.layers.MaxPooling2D(2, dtype=dtype)(x)
    x = with_relu(keras.layers.Conv2D, config.filters_2, config.kernel_size)(x)
    x = keras.layers.MaxPooling2D(2, dtype=dtype)(x)
    x = keras.layers.Flatten(dtype=dtype)(x)
    x = with_relu(keras.layers.Dense, config.dense_units, kernel_regularizer=regularizer)(x)
    x = keras.layers.Dropout(config.dropout, dtype=dtype)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities", dtype="float32")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


# The model a run's stages share in one process: train saves it and hands it on, so evaluate and
# export do not load the file again (Prefect passes paths between tasks; the file stays the record).
_SAVED: dict[tuple[str, int], keras.Model] = {}


def save_model(model: keras.Model, path: Path) -> None:
    model.save(path)
    _SAVED.clear()
    _SAVED[(str(path), path.stat().st_mtime_ns)] = model


def load_saved_model(path: str | Path) -> keras.Model:
    """The model saved at ``path``: the one in memory when this process saved it, else loaded."""
    key = (str(path), Path(path).stat().st_mtime_ns)
    return _SAVED[key] if key in _SAVED else keras.models.load_model(path)
