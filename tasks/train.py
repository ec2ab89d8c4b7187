"""Training stage: the one-cycle schedule and a seeded Keras fit."""

from __future__ import annotations

import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from storage.errors import MnistError
from storage.settings import onednn_enabled
from tasks.data import NUM_CLASSES, PreparedData
from tasks.model import build_model, save_model
from tasks.recipes import TrainConfig
from tasks.results import TrainedModel


@keras.saving.register_keras_serializable(package="mnist")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak`` over the first ``warmup`` fraction, then cosine to ~0."""

    def __init__(self, peak: float, total_steps: int, warmup: float = 0.25,
                 start_divisor: float = 10.0, final_divisor: float = 1000.0):
        self.peak = peak
        self.total_steps = total_steps
        self.warmup = warmup
        self.start_divisor = start_divisor
        self.final_divisor = final_divisor

    def __call__(self, step: Any) -> Any:
        ops = keras.ops
        step = ops.cast(step, "float32")
        warmup_steps = max(1.0, self.warmup * self.total_steps)
        decay_steps = max(1.0, self.total_steps - warmup_steps)
        start, end = self.peak / self.start_divisor, self.peak / self.final_divisor
        rising = start + (self.peak - start) * step / warmup_steps
        progress = ops.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
        falling = end + 0.5 * (self.peak - end) * (1.0 + ops.cos(math.pi * progress))
        return ops.where(step < warmup_steps, rising, falling)

    def get_config(self) -> dict[str, Any]:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup,
                "start_divisor": self.start_divisor, "final_divisor": self.final_divisor}


def learning_rate_for(config: TrainConfig, train_size: int) -> float | OneCycle:
    if config.schedule == "constant":
        return config.learning_rate
    steps = math.ceil(train_size / config.batch_size) * config.epochs
    return OneCycle(peak=config.learning_rate, total_steps=steps)


def library_versions() -> dict[str, str]:
    import prefect
    import tensorflow as tf

    return {"python": platform.python_version(), "tensorflow": tf.__version__,
            "keras": keras.__version__, "numpy": np.__version__, "prefect": prefect.__version__}


def code_version() -> str:
    """The installed package version, plus the git commit when run from a checkout."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    try:
        package = version("mnist-pipeline")
    except PackageNotFoundError:
        package = "unknown"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{package}+{commit}" if commit else package


def fit_callbacks(config: TrainConfig, has_validation: bool) -> list[keras.callbacks.Callback]:
    if config.early_stopping_patience and has_validation:
        return [keras.callbacks.EarlyStopping(monitor="val_loss", patience=config.early_stopping_patience,
                                              restore_best_weights=True)]
    return []


def cpu_has_native_bfloat16() -> bool:
    """AVX512-BF16 or AMX: there bfloat16 convolutions run markedly faster than float32."""
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    return "avx512_bf16" in flags or "amx_bf16" in flags


def training_dtype(config: TrainConfig) -> str:
    if config.precision == "auto":
        return "mixed_bfloat16" if cpu_has_native_bfloat16() and onednn_enabled() else "float32"
    return config.precision


def float32_copy(model: keras.Model, config: TrainConfig) -> keras.Model:
    """The same weights in a float32 model: mixed precision keeps its variables in
    float32, so this is exact, and what gets evaluated, exported and served is
    plain float32 that runs anywhere."""
    copy = build_model(config.model, NUM_CLASSES)
    copy.set_weights(model.get_weights())
    return copy


@dataclass(frozen=True)
class FitInputs:
    """What ``model.fit`` reads: arrays with their batch size, or a stream of batches with the
    number of steps an epoch is; ``examples`` is how many an epoch sees (the schedule's length)."""

    x: Any
    y: Any = None
    batch_size: int | None = None
    shuffle: bool = False
    steps_per_epoch: int | None = None
    validation: Any = None
    examples: int = 0


def in_memory_inputs(data: PreparedData, config: TrainConfig) -> FitInputs:
    """MNIST alone: the prepared arrays, held in memory (the fastest for 55,000 digits)."""
    targets = keras.utils.to_categorical(data.y_train, NUM_CLASSES)
    validation = ((data.x_val, keras.utils.to_categorical(data.y_val, NUM_CLASSES)) if len(data.y_val) else None)
    if config.augment:
        return FitInputs(augmented_batches(data.x_train, targets, config), validation=validation,
                         examples=len(data.y_train))
    return FitInputs(data.x_train, targets, config.batch_size, True, validation=validation,
                     examples=len(data.y_train))


def streamed_inputs(plan: Any, config: TrainConfig) -> FitInputs:
    """MNIST plus a dataset version: MNIST's records held in memory, the new ones read from the
    shard cache through tf.data, sampled at their weighted share, decoded (and augmented) a batch
    at a time. Memory does not grow with the number of new examples."""
    import tensorflow as tf

    from tasks.shards import base_records, decode_batch, training_stream, validation_stream

    examples = config.epoch_examples or base_records(plan, "train")[1] + plan.weight * plan.count("train")

    def to_input(records):
        images, labels = decode_batch(records)
        return images, tf.one_hot(labels, NUM_CLASSES)

    batches = training_stream(plan, config.seed).batch(config.batch_size).map(
        to_input, num_parallel_calls=tf.data.AUTOTUNE)
    if config.augment:
        batches = augmented(batches, config.seed)
    validation = validation_stream(plan)
    has_validation = int(validation.cardinality()) > 0  # validation_size 0 and no new validation examples
    validation = validation.batch(1024).map(to_input).prefetch(2) if has_validation else None
    return FitInputs(batches.prefetch(tf.data.AUTOTUNE), steps_per_epoch=math.ceil(examples / config.batch_size),
                     validation=validation, examples=examples)


def train_model(data: PreparedData | FitInputs, config: TrainConfig,
                extra_callbacks: list[keras.callbacks.Callback] | None = None
                ) -> tuple[keras.Model, dict[str, list[float]]]:
    """Seeded Keras fit on the training split, validating on the held-out split.
    Returns a float32 model whatever the training arithmetic was."""
    keras.utils.set_random_seed(config.seed)
    inputs = data if isinstance(data, FitInputs) else in_memory_inputs(data, config)
    dtype = training_dtype(config)
    model = build_model(config.model, NUM_CLASSES, dtype=dtype)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate_for(config, inputs.examples)),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=config.steps_per_execution,
    )
    history = model.fit(
        inputs.x,
        inputs.y,
        batch_size=inputs.batch_size,
        shuffle=inputs.shuffle,
        steps_per_epoch=inputs.steps_per_epoch,
        epochs=config.epochs,
        validation_data=inputs.validation,
        callbacks=fit_callbacks(config, inputs.validation is not None) + (extra_callbacks or []),
        verbose=0,
    )
    history_lists = {name: [float(v) for v in values] for name, values in history.history.items()}
    return (model if dtype == "float32" else float32_copy(model, config)), history_lists


def augmented(batches, seed: int):
    """Batches of (images, targets) with each digit shifted (up to 2 px), rotated (up to 10
    degrees) and zoomed (up to 10%) afresh every epoch, with Keras' own preprocessing layers; the
    model that is trained, exported and served has no augmentation in it."""
    import tensorflow as tf

    augment = keras.Sequential([
        keras.layers.RandomTranslation(2 / 28, 2 / 28, fill_mode="constant", seed=seed),
        keras.layers.RandomRotation(10 / 360, fill_mode="constant", seed=seed + 1),
        keras.layers.RandomZoom(0.1, fill_mode="constant", seed=seed + 2),
    ])
    return batches.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)


def augmented_batches(images: np.ndarray, targets: np.ndarray, config: TrainConfig):
    """Shuffled, augmented training batches of in-memory digits."""
    import tensorflow as tf

    batches = (tf.data.Dataset.from_tensor_slices((images, targets))
               .shuffle(len(images), seed=config.seed, reshuffle_each_iteration=True)
               .batch(config.batch_size))
    return augmented(batches, config.seed).prefetch(tf.data.AUTOTUNE)


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))
    return path


# --- Prefect task -------------------------------------------------------------
from prefect import get_run_logger, task  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402

from tasks.run_queue import name_the_slot_holder  # noqa: E402


class RunEnded(MnistError, RuntimeError):
    """The flow run was ended on the server (Crashed, Cancelled) while this process trained."""

    status = "ABORTED"


class PrefectProgress(keras.callbacks.Callback):
    """Per-epoch progress to the Prefect log and a progress artifact in the UI; and, each epoch, a
    look at the run's state on the server: a process paused past the heartbeat window (a VM
    pause, a partition) was Crashed there and its slot given to the next run, so on waking it
    stops instead of training beside that run."""

    def __init__(self, epochs: int):
        super().__init__()
        self.epochs = epochs
        self.logger = get_run_logger()
        self.artifact_id = create_progress_artifact(
            progress=0.0, key="mnist-training-progress", description="Training epochs completed (%)")

    def on_epoch_end(self, epoch: int, logs: dict[str, float] | None = None) -> None:
        shown = ", ".join(f"{name} {value:.4f}" for name, value in (logs or {}).items()
                          if name != "learning_rate")
        self.logger.info("epoch %d/%d: %s", epoch + 1, self.epochs, shown)
        update_progress_artifact(self.artifact_id, progress=100.0 * (epoch + 1) / self.epochs)  # type: ignore[arg-type]  # called synchronously: a UUID, not a coroutine
        ended = run_ended_on_server()
        if ended:
            raise RunEnded(f"the run was ended on the server while it trained ({ended}): training stopped")
        name_the_slot_holder()  # runs queued since the last epoch say whom they wait for


def run_ended_on_server() -> str | None:
    """The run's final state on the server ("Crashed: ...") if it has one, else None."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return None
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(run_id)).state
    if state is None or not state.is_final():
        return None
    return f"{state.name}: {state.message}" if state.message else state.name


def training_inputs(prepared_path: Path, config: TrainConfig) -> FitInputs:
    """MNIST alone from its prepared arrays; with a dataset version, streamed from its plan."""
    from tasks.data import load_prepared
    from tasks.shards import is_plan, read_plan

    if is_plan(prepared_path):
        return streamed_inputs(read_plan(prepared_path), config)
    return in_memory_inputs(load_prepared(prepared_path), config)


@task(name="train", timeout_seconds=3600)
def train(prepared_path: str, config: TrainConfig, run_dir: str) -> TrainedModel:
    """Fit the CNN; save the Keras model and its history; return their paths."""
    data = training_inputs(Path(prepared_path), config)
    started = time.perf_counter()
    model, history = train_model(data, config, [PrefectProgress(config.epochs)])
    fit_seconds = time.perf_counter() - started
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    model_path = Path(run_dir) / "model.keras"
    save_model(model, model_path)
    write_json(Path(run_dir) / "history.json", history)
    write_json(Path(run_dir) / "training.json",
               {"config": config.model_dump(), "library_versions": library_versions(),
                "epochs_run": len(history["loss"]), "examples_per_epoch": data.examples,
                "fit_seconds": round(fit_seconds, 3)})
    return TrainedModel(model_path=str(model_path), history_path=str(Path(run_dir) / "history.json"),
                        seed=config.seed,
                        val_accuracy=history["val_accuracy"][-1] if history.get("val_accuracy") else None)
