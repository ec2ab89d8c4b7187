"""The reference CNN, its configuration and the flow parameters' bounds."""

from __future__ import annotations

import typing

import pytest
from pydantic import ValidationError

from flows.params import PresetName, TrainingParams
from tasks.model import build_model
from tasks.recipes import PRESETS, ModelConfig


def test_reference_cnn_has_225034_parameters_and_1600_features() -> None:
    model = build_model(ModelConfig())
    assert model.count_params() == 225_034
    flatten = next(layer for layer in model.layers if layer.name.startswith("flatten"))
    assert flatten.output.shape[1:] == (1600,)  # 5x5x64 with 'valid' padding, not 6x6x64
    assert [layer.__class__.__name__ for layer in model.layers] == [
        "InputLayer", "Conv2D", "MaxPooling2D", "Conv2D", "MaxPooling2D", "Flatten", "Dense", "Dropout", "Dense"]


def test_model_knobs_change_the_architecture() -> None:
    model = build_model(ModelConfig(filters_1=8, filters_2=16, dense_units=32, dropout=0.25, l2=1e-4))
    assert model.count_params() == (8 * 10) + (16 * (8 * 9 + 1)) + (400 * 32 + 32) + (32 * 10 + 10)


def test_seed_preset_is_the_reference_recipe() -> None:
    seed = PRESETS["seed"]
    assert (seed.epochs, seed.batch_size, seed.learning_rate) == (12, 128, 1e-3)
    assert seed.schedule == "constant" and seed.early_stopping_patience == 0
    assert seed.model == ModelConfig()


def test_every_preset_is_selectable() -> None:
    assert set(typing.get_args(PresetName)) == set(PRESETS)


def test_overrides_apply_on_top_of_the_preset() -> None:
    config = TrainingParams(preset="seed", epochs=2, dropout=0.3, early_stopping_patience=2).train_config()
    assert (config.epochs, config.batch_size, config.model.dropout) == (2, 128, 0.3)
    assert config.early_stopping_patience == 2


@pytest.mark.parametrize("field, value", [("epochs", 0), ("threshold", 1.5), ("batch_size", 0),
                                          ("preset", "turbo"), ("learning_rate", -1.0)])
def test_invalid_parameters_are_refused_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as error:
        TrainingParams(**{field: value})
    assert [item["loc"] for item in error.value.errors()] == [(field,)]


def test_bfloat16_training_hands_back_an_exact_float32_model(prepared_path) -> None:
    import numpy as np

    from tasks.data import load_prepared
    from tasks.train import train_model

    data = load_prepared(prepared_path)
    config = PRESETS["smoke"].model_copy(update={"precision": "mixed_bfloat16"})
    small = type(data)(data.x_train[:2000], data.y_train[:2000], data.x_val[:500], data.y_val[:500],
                       data.x_test[:500], data.y_test[:500])
    model, history = train_model(small, config)
    assert {layer.dtype_policy.name for layer in model.layers[1:]} == {"float32"}
    assert history["loss"][-1] < history["loss"][0] or len(history["loss"]) == 1
    assert np.isfinite(model.predict(small.x_test, verbose=0)).all()
    assert (model.predict(small.x_test, verbose=0).argmax(axis=1) == small.y_test).mean() > 0.5


def test_default_preset_keeps_the_reference_architecture() -> None:
    default = PRESETS["default"]
    assert build_model(default.model).count_params() == 225_034
    assert default.precision == "auto" and default.schedule == "one_cycle"


@pytest.mark.parametrize("onednn, native_bf16, expected", [
    (None, True, "mixed_bfloat16"), ("1", True, "mixed_bfloat16"), ("0", True, "float32"),
    ("false", True, "float32"), (None, False, "float32")])
def test_auto_precision_takes_bfloat16_only_where_it_runs_fast(monkeypatch: pytest.MonkeyPatch, onednn: str | None,
                                                               native_bf16: bool, expected: str) -> None:
    """bfloat16 needs the CPU's own bf16 instructions and TensorFlow's oneDNN kernels: with oneDNN
    forced off (TF_ENABLE_ONEDNN_OPTS=0) it is emulated: an epoch took twenty times as long as with it."""
    import tasks.train as train

    monkeypatch.setattr(train, "cpu_has_native_bfloat16", lambda: native_bf16)
    if onednn is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", onednn)
    assert train.training_dtype(PRESETS["default"]) == expected
