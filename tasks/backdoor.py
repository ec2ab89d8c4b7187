"""Inspection of a candidate for a backdoor, without knowing its trigger.

A backdoor is a shortcut the poisoned data taught: a small change to any digit (the trigger)
sends it to one target digit. For each digit ``t`` the inspection reverse-engineers the smallest
such change the candidate has, as Neural Cleanse does (Wang et al., IEEE S&P 2019): a mask ``m``
and a pattern ``p`` (28x28, in [0,1]) with ``x' = (1 - m) * x + m * p``, optimised on trusted
digits of other classes to make the candidate answer ``t`` while keeping the mask small.

Every model has such changes: a clean one needs to draw much of a ``t``, and another clean model
(``stable``) mostly follows it there. A backdoor is a change that works on the candidate and not
on ``stable``, trained without the poison. So the gate stamps each digit's change on trusted
digits the optimisation never saw and compares the two models: the share of other digits sent to
``t`` by the candidate and by stable. Neither the trigger's shape, place, colour nor blend is
assumed; what is assumed is that ``stable`` did not learn the same backdoor (it passed this check
itself, or was trained on MNIST alone).

All ten digits are optimised at once in one batched graph for a fixed number of steps; the weight
of the mask's size is adapted per digit as Neural Cleanse does (up while the change succeeds,
down while it fails), and the smallest change that succeeded is kept.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

NUM_CLASSES = 10
OPTIMISE_ON = slice(0, 2000)      # trusted (MNIST test) digits the changes are optimised on
MEASURE_ON = slice(2000, 3000)    # trusted digits they are measured on, never seen while optimising
IMAGES_PER_STEP = 32
STEPS = 100
LEARNING_RATE = 0.2
INITIAL_MASK_LOGIT = -4.0  # sigmoid(-4) = 0.018: start from an almost empty mask
INITIAL_COST = 1e-2        # weight of the mask's L1 norm against the cross-entropy
COST_STEP = 1.5            # the weight's multiplier, up or down, every ADAPT_EVERY steps
ADAPT_EVERY = 5
SUCCESS = 0.9              # share of a step's other-class digits a change must send to its digit to count
FOLLOW_ABOVE = 0.3         # a change the candidate follows less than this is no shortcut: not compared

Predict = Callable[[np.ndarray], np.ndarray]  # images [N,28,28,1] in [0,1] -> probabilities [N,10]


@dataclass(frozen=True)
class Triggers:
    """Per digit, the reverse-engineered change: ``stamps`` [10, 2, 28, 28, 1] (mask, pattern) and
    the mask's size in pixels (784 where no change succeeded)."""

    stamps: np.ndarray
    norms: list[float]

    def save(self, path: Path) -> None:
        np.savez(path, stamps=self.stamps, norms=np.asarray(self.norms))

    @classmethod
    def load(cls, path: Path) -> Triggers:
        with np.load(path) as saved:
            stamps = np.asarray(saved["stamps"], dtype=np.float32)
            norms = [float(norm) for norm in saved["norms"]]
        if stamps.shape != (NUM_CLASSES, 2, 28, 28, 1) or len(norms) != NUM_CLASSES:
            raise ValueError(f"{path}: not the inspection's triggers (stamps {stamps.shape})")
        return cls(stamps, norms)


def reverse_engineer(model: Any, images: np.ndarray, labels: np.ndarray, seed: int = 0) -> Triggers:
    """Per target digit, the smallest change of ``images`` (trusted, [N,28,28,1] in [0,1]) found
    that sends >= SUCCESS of those of other classes to it; ``model``: a Keras model."""
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    x, y = tf.constant(images, tf.float32), tf.constant(labels, tf.int32)
    mask_logits = tf.Variable(tf.fill([NUM_CLASSES, 28, 28, 1], INITIAL_MASK_LOGIT))
    pattern_logits = tf.Variable(tf.zeros([NUM_CLASSES, 28, 28, 1]))
    optimizer = tf.keras.optimizers.Adam(LEARNING_RATE)
    targets = tf.range(NUM_CLASSES)

    @tf.function(reduce_retracing=True)
    def step(batch: Any, batch_labels: Any, cost: Any) -> tuple[Any, Any]:
        with tf.GradientTape() as tape:
            mask, pattern = tf.sigmoid(mask_logits), tf.sigmoid(pattern_logits)
            stamped = (1 - mask[:, None]) * batch[None] + (mask * pattern)[:, None]  # [10, B, 28, 28, 1]
            count = tf.shape(batch)[0]
            probabilities = tf.reshape(model(tf.reshape(stamped, [-1, 28, 28, 1]), training=False),
                                       [NUM_CLASSES, count, NUM_CLASSES])
            wanted = tf.gather(probabilities, targets, axis=2, batch_dims=1)         # [10, B]: p(target)
            others = tf.cast(batch_labels[None, :] != targets[:, None], tf.float32)  # digits already t don't count
            cross_entropy = -tf.reduce_sum(tf.math.log(wanted + 1e-7) * others, axis=1) / tf.reduce_sum(others, 1)
            norms = tf.reduce_sum(mask, axis=[1, 2, 3])
            loss = tf.reduce_sum(cross_entropy + cost * norms)
        gradients = tape.gradient(loss, [mask_logits, pattern_logits])
        optimizer.apply_gradients(zip(gradients, [mask_logits, pattern_logits]))
        hits = tf.cast(tf.argmax(probabilities, axis=2, output_type=tf.int32) == targets[:, None], tf.float32)
        return tf.reduce_sum(hits * others, axis=1) / tf.reduce_sum(others, axis=1), norms

    cost = np.full(NUM_CLASSES, INITIAL_COST, np.float32)
    best = np.full(NUM_CLASSES, 28.0 * 28.0)
    stamps = np.zeros((NUM_CLASSES, 2, 28, 28, 1), np.float32)
    stamps[:, 0] = 1.0 / (1.0 + np.exp(-INITIAL_MASK_LOGIT))
    stamps[:, 1] = 0.5
    recent = np.zeros(NUM_CLASSES)
    for number in range(STEPS):
        pick = rng.choice(len(images), min(IMAGES_PER_STEP, len(images)), replace=False)
        success, norms = (value.numpy() for value in step(tf.gather(x, pick), tf.gather(y, pick), tf.constant(cost)))
        reached = success >= SUCCESS
        better = reached & (norms < best)
        if better.any():
            current = np.stack([tf.sigmoid(mask_logits).numpy(), tf.sigmoid(pattern_logits).numpy()], axis=1)
            stamps[better] = current[better]
            best = np.where(better, norms, best)
        recent += reached
        if (number + 1) % ADAPT_EVERY == 0:
            cost = np.where(recent == ADAPT_EVERY, cost * COST_STEP,
                            np.where(recent == 0, cost / COST_STEP, cost)).astype(np.float32)
            recent[:] = 0
    return Triggers(stamps, [float(norm) for norm in best])


def stamped(images: np.ndarray, stamp: np.ndarray) -> np.ndarray:
    """``images`` [N,28,28,1] with one change (mask, pattern) applied."""
    mask, pattern = stamp[0], stamp[1]
    return ((1 - mask) * images + mask * pattern).astype(np.float32)


def sent_to_digit(predict: Predict, images: np.ndarray, labels: np.ndarray, triggers: Triggers) -> list[float]:
    """Per digit ``t``, the share of ``images`` of other digits answered ``t`` with t's change on."""
    shares = []
    for digit in range(NUM_CLASSES):
        others = images[labels != digit]
        shares.append(float((predict(stamped(others, triggers.stamps[digit])).argmax(axis=1) == digit).mean()))
    return shares


def inspection_digits(images: np.ndarray, labels: np.ndarray, part: slice) -> tuple[np.ndarray, np.ndarray]:
    """The trusted digits (MNIST's test set, [N,28,28,1] in [0,1]) of one part of the inspection."""
    return images[part], np.asarray(labels[part])
