"""Flow parameters: one pydantic model with bounds, shown as a form in the Prefect UI."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tasks.recipes import PRESETS, ModelConfig, TrainConfig

PresetName = Literal["default", "seed", "best", "smoke"]
MODEL_FIELDS = tuple(ModelConfig.model_fields)


class TrainingParams(BaseModel):
    """A preset, optional overrides of single settings, the gate and where things go."""

    model_config = ConfigDict(extra="forbid")

    preset: PresetName = Field("default", description="training recipe: default (fast), seed (reference), best "
                                                      "(top accuracy, minutes), smoke")
    epochs: int | None = Field(None, ge=1, le=200, description="override the preset's epochs")
    batch_size: int | None = Field(None, ge=1, le=8192, description="override the preset's batch size")
    learning_rate: float | None = Field(None, gt=0.0, le=1.0, description="Adam rate (peak rate for one_cycle)")
    schedule: Literal["constant", "one_cycle"] | None = Field(None, description="learning-rate schedule")
    early_stopping_patience: int | None = Field(None, ge=0, le=100, description="epochs without val_loss gain; 0 off")
    validation_size: int | None = Field(None, ge=0, le=30000, description="images held out of training for validation")
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="seed for weights, shuffling and the split")
    train_limit: int | None = Field(None, ge=100, le=60000, description="train on only N images (quick runs)")
    precision: Literal["auto", "float32", "mixed_bfloat16"] | None = Field(
        None, description="training arithmetic: auto (bfloat16 where the CPU has it), float32, mixed_bfloat16")
    filters_1: int | None = Field(None, ge=1, le=512, description="filters in the first Conv2D")
    filters_2: int | None = Field(None, ge=1, le=512, description="filters in the second Conv2D")
    kernel_size: int | None = Field(None, ge=1, le=7, description="Conv2D kernel size")
    dense_units: int | None = Field(None, ge=1, le=4096, description="hidden Dense units")
    dropout: float | None = Field(None, ge=0.0, lt=1.0, description="dropout rate")
    l2: float | None = Field(None, ge=0.0, le=1.0, description="L2 penalty on the hidden Dense kernel")
    batch_norm: bool | None = Field(None, description="batch normalisation after each convolution and the hidden Dense")
    label_smoothing: float | None = Field(None, ge=0.0, lt=1.0, description="share of each target spread over all "
                                                                            "classes")
    augment: bool | None = Field(None, description="random shifts, rotations and zoom of training digits")
    epoch_examples: int | None = Field(None, ge=1, le=100_000_000,
                                       description="examples an epoch samples from MNIST plus a dataset version "
                                                   "(default: all, each new one new_data_weight times)")
    candidates: int = Field(1, ge=1, le=16, description="models trained at once on Dask (seeds seed, seed+1, ...); "
                                                       "the best by validation accuracy goes to the gate")
    threshold: float = Field(0.99, ge=0.0, le=1.0, description="gate: minimum test accuracy")
    accuracy_margin: float = Field(0.001, ge=0.0, le=1.0,
                                   description="gate: largest allowed test-accuracy drop against stable, "
                                               "beyond the paired noise of two seeds")
    class_margin: float = Field(0.01, ge=0.0, le=1.0,
                                description="gate: largest allowed drop of any digit's accuracy against stable")
    slice_threshold: float = Field(0.95, ge=0.0, le=1.0,
                                   description="gate: minimum accuracy on each new source's test slice")
    slice_margin: float = Field(0.02, ge=0.0, le=1.0,
                                description="gate: largest allowed drop on a source's slice against stable")
    min_slice_size: int = Field(100, ge=1, le=100000,
                                description="gate: test examples a slice needs to be gated (smaller: reported)")
    moved_margin: float = Field(0.003, ge=0.0, le=1.0,
                                description="gate: largest share of MNIST test digits stable gets right that may "
                                            "newly be answered as one digit")
    shortcut_follow: float = Field(0.1, ge=0.0, le=1.0,
                                   description="gate: least share of what each shortcut reverse-engineered from "
                                               "the candidate does to it that stable must follow too (the backdoor "
                                               "inspection; 0 turns it off)")
    dataset_version: int | None = Field(None, ge=1, description="dataset version to train on (default: latest)")
    new_data_weight: int = Field(4, ge=1, le=50, description="times each new training example is seen per epoch, "
                                                            "in expectation (sampled, not copied)")
    force: bool = Field(False, description="retrain even when data, code and recipe match stable's")
    min_new_examples: int = Field(0, ge=0, le=10_000_000,
                                  description="skip unless this many new examples arrived since stable (0: any change)")
    ingest_feedback: bool = Field(False, description="first turn the feedback on logged predictions into a "
                                                     "dataset batch (the retrain-on-drift automation sets it)")
    publish: bool = Field(True, description="publish a passing model to the S3 model store")
    publish_label: Literal["stable", "canary"] = Field("stable", description="label a new version gets")
    output_dir: str | None = Field(None, description="plots, reports, SavedModel (default MNIST_OUTPUT_DIR)")
    data_dir: str | None = Field(None, description="MNIST IDX files (default MNIST_DATA_DIR)")

    @model_validator(mode="after")
    def candidates_need_validation(self) -> "TrainingParams":
        if self.candidates > 1 and self.train_config().validation_size == 0:
            raise ValueError("candidates > 1 are chosen by validation accuracy: give validation_size > 0")
        return self

    def train_config(self) -> TrainConfig:
        """The preset with every given override applied, validated as a whole."""
        base = PRESETS[self.preset]
        overrides = {name: value for name, value in self.model_dump().items()
                     if value is not None and name in TrainConfig.model_fields}
        model_overrides = {name: value for name, value in self.model_dump().items()
                           if value is not None and name in MODEL_FIELDS}
        merged = base.model_dump() | overrides
        merged["model"] = base.model.model_dump() | model_overrides
        return TrainConfig.model_validate(merged)


class DriftParams(BaseModel):
    """The window of served traffic to look at, and what counts as drift."""

    model_config = ConfigDict(extra="forbid")

    window_hours: float = Field(24.0, gt=0, le=24 * 31, description="how far back logged requests are read")
    min_requests: int = Field(200, ge=10, le=10_000_000,
                              description="logged images a version needs for a verdict (fewer: not enough data)")
    alpha: float = Field(0.01, gt=0, lt=1, description="significance level of each two-sample test")
    min_effect: float = Field(0.1, gt=0, le=1,
                              description="KS statistic or class-share distance that counts as drift")
