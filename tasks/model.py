"""Model stage: the reference CNN, with the knobs its tuning section lists."""

from __future__ import annotations

import keras
from pydantic import BaseModel, Field

INPUT_NAME = "image"


class ModelConfig(BaseModel):
    """Architecture settings; the defaults are the reference CNN."""

    filters_1: int = Field(32, ge=1, le=512, description="filters in the first Conv2D")
    filters_2: int = Field(64, ge=1, le=512, description="filters in the second Conv2D")
    kernel_size: int = Field(3, ge=1, le=7, description="square Conv2D kernel size")
    dense_units: int = Field(128, ge=1, le=4096, description="units of the hidden Dense layer")
    dropout: float = Field(0.5, ge=0.0, lt=1.0, description="dropout before the output layer")
    l2: float = Field(0.0, ge=0.0, le=1.0, description="L2 penalty on the hidden Dense kernel")


def build_model(config: ModelConfig, num_classes: int = 10) -> keras.Model:
    """Conv-Pool-Conv-Pool-Dense-Dropout-Softmax, as in the reference recipe.

    The input layer is named so the exported signature's input is ``image``.
    """
    regularizer = keras.regularizers.L2(config.l2) if config.l2 > 0 else None
    inputs = keras.Input(shape=(28, 28, 1), name=INPUT_NAME)
    x = keras.layers.Conv2D(config.filters_1, config.kernel_size, activation="relu")(inputs)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(config.filters_2, config.kernel_size, activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(config.dense_units, activation="relu", kernel_regularizer=regularizer)(x)
    x = keras.layers.Dropout(config.dropout)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")
