"""Every ``MNIST_*`` setting, with its default and meaning: the one place that answers which exist.

Each group is a pydantic-settings class read from the environment (prefix ``MNIST_``), built where
it is used and passed on from there. ``docs/operations.md``'s table of settings is rendered from
these classes (``python -m storage.settings``), and a test keeps it so.

Settings of other tools this project reads (``PREFECT_API_URL``, ``PREFECT_HOME``,
``TF_ENABLE_ONEDNN_OPTS``) are read here too, by the functions at the end, so no other module
reads the environment.

It lives in ``storage``, the lowest of the project's packages, so that every package may import it.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "mnist"


def setting(default: Any = None, meaning: str = "", shown: str | None = None, **bounds: Any) -> Any:
    """A field with its meaning and, where the default needs words, how the table shows it."""
    extra: dict[str, Any] | None = {"shown": shown} if shown is not None else None
    return Field(default, description=meaning, json_schema_extra=extra, **bounds)


def beside_checkout() -> Path | None:
    """``../shared/datasets/mnist`` next to this checkout, when it holds MNIST (what make uses)."""
    return SHARED_MNIST if (SHARED_MNIST / "train-images-idx3-ubyte.gz").is_file() else None


class MnistSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MNIST_", extra="ignore")


class S3Settings(MnistSettings):
    """Where the bucket is. Credentials come the standard boto3 way
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE / AWS_REGION), never from here."""

    s3_endpoint: str | None = setting(None, "S3 endpoint URL (AWS, MinIO, SeaweedFS, ...)",
                                      "unset: the embedded store from the CLI, AWS S3 elsewhere")
    s3_bucket: str = setting("mnist-models", "bucket, created if missing and allowed", min_length=3, max_length=63)
    s3_prefix: str = setting("models", "key prefix inside the bucket")
    retry_seconds: float = setting(60.0, "how long transient S3 faults are retried (an interactive command: "
                                         "10 s unless set)", ge=0, le=3600)


class StoreSettings(S3Settings):
    """The model registry's settings: the bucket's, plus which model and how long a
    publish may take before its leftovers are collected."""

    model_name: str = setting("mnist", "model name in the store, the SavedModel layout and the logs",
                              pattern=NAME_PATTERN)
    gc_grace_seconds: float = setting(3600.0, "age after which an unfinished publish counts as a leftover", ge=0)


class DatasetSettings(S3Settings):
    dataset_name: str = setting("mnist", "dataset name in the store", pattern=NAME_PATTERN)


class TrafficSettings(S3Settings):
    model_name: str = setting("mnist", "model name in the store, the SavedModel layout and the logs",
                              pattern=NAME_PATTERN)
    # Checked in storage/live_check.py: an error from the field would show the secret.
    live_check_key: SecretStr | None = setting(
        None, "secret (16 characters or more) the live check's request id is signed with, shared by the "
              "publisher, the drift flow and the gateway ([model store](model-store.md#live-check-after-publish))",
        "unset: derived from the S3 secret access key (none with temporary credentials)")


class SigningSettings(MnistSettings):
    signing_key: Path | None = setting(None, "PEM private key (elliptic curve) that signs every publish",
                                       "unset: unsigned")
    verify_key: Path | None = setting(None, "PEM public key: the sync and `registry verify` refuse versions it "
                                            "does not verify", "unset: no check")


class StateSettings(MnistSettings):
    """The state folder alone: the CLI reads it at its start, before any other setting is checked."""

    state_dir: Path = setting(Path(".state"), "embedded store's data, credentials and pid; the local Prefect "
                                              "home (`<MNIST_STATE_DIR>/prefect`)", "`./.state`")


class ServingSettings(MnistSettings):
    """Where the served model answers: read apart, for the commands' ``--server`` default."""

    serving_address: str | None = setting(None, "HOST:PORT of the serving gRPC API: enables the live check after "
                                                "publish; default `--server` of `mnist predict` and `mnist check`",
                                          "unset: the `make serve` stack's gateway, if one runs; "
                                          "`localhost:8500` for `--server`")


class DataSettings(MnistSettings):
    """Where MNIST is: read apart, for a command that checks the folder before it starts a run."""

    data_dir: Path | None = Field(default_factory=beside_checkout, description=(
        "folder with `train-images-idx3-ubyte(.gz)` and the three other IDX files"), json_schema_extra={
        "shown": "`../shared/datasets/mnist` beside the checkout, if there; else Keras downloads MNIST "
                 "(needs internet)"})


class PipelineSettings(ServingSettings, StateSettings, DataSettings):
    """Where the pipeline reads and writes on this machine, and what it checks after a publish."""
    output_dir: Path = setting(Path("outputs"), "output folder when `--output` is not given", "`./outputs`")
    cache_dir: Path = setting(Path.home() / ".cache" / "mnist-pipeline",
                              "cache of verified, split data, keyed on the data and the split",
                              "`~/.cache/mnist-pipeline`")
    live_check_timeout: float = setting(120.0, "seconds the live check waits for the new version")
    dask_address: str | None = setting(None, "a Dask scheduler for `--candidates` > 1",
                                       "unset: a local Dask cluster sized to the machine")
    dask_slice_examples: int = setting(1_000_000, "test-slice examples from which a run scores them on Dask "
                                                  "(`flows/slices.py`), not in its own process", ge=1)
    local_prefect_api: str = setting(
        "http://127.0.0.1:4200/api", "the Prefect API a label moved by `mnist registry` is shown in (registry "
        "artifact, `mnist_labels`, `serving:<label>` tags) when `PREFECT_API_URL` is unset; empty for none",
        "`http://127.0.0.1:4200/api` (`make prefect`)")


class GatewaySettings(MnistSettings):
    """``mnist gateway``'s files; each is also a flag, which wins."""

    # strings, not paths: "" is a value here (no spool), which a Path would turn into "."
    gateway_spool: str | None = setting(None, "where `mnist gateway` keeps log batches the store did not take "
                                              "until it does ([feedback loop](feedback-loop.md)); `--log-spool`; "
                                              "empty: none (an outage drops logs)",
                                         "`<MNIST_STATE_DIR>/gateway/log-spool`")
    gateway_ledger: str | None = setting(None, "file where `mnist gateway` counts what a kill lost; "
                                                "`--log-ledger`", "unset: not counted")
    feedback_tokens: str | None = setting(None, "file of feedback callers' tokens, reloaded when it changes; "
                                                 "`--feedback-tokens`", "unset: no feedback taken")


class AutomationSettings(MnistSettings):
    """What `make deploy` registers beside the deployments."""

    retrain_min_new: int = setting(500, "new examples since `stable` that make the retrain-on-new-data "
                                        "automation train", ge=1)
    notify_block: str | None = setting(None, "notification block for the automations, `<type-slug>/<name>`",
                                       "unset")


GROUPS: tuple[type[MnistSettings], ...] = (PipelineSettings, S3Settings, StoreSettings, DatasetSettings,
                                           TrafficSettings, SigningSettings, GatewaySettings, AutomationSettings)


def shown_default(field: Any) -> str:
    extra = field.json_schema_extra or {}
    if "shown" in extra:
        return str(extra["shown"])
    return "unset" if field.default is None else f"`{field.default:g}`" if isinstance(field.default, float) \
        else f"`{field.default}`"


def settings_rows() -> list[tuple[str, str, str]]:
    """(variable, meaning, default) of every setting, each once, in the groups' order."""
    rows: dict[str, tuple[str, str, str]] = {}
    for group in GROUPS:
        for name, field in group.model_fields.items():
            variable = f"MNIST_{name.upper()}"
            rows.setdefault(variable, (f"`{variable}`", field.description or "", shown_default(field)))
    return list(rows.values())


TABLE_START = "<!-- settings: rendered from storage/settings.py by `python -m storage.settings` -->\n"
TABLE_END = "<!-- end of settings -->\n"


def settings_table() -> str:
    lines = ["| variable | meaning | default |", "|---|---|---|"]
    return "\n".join(lines + [f"| {variable} | {meaning} | {default} |"
                              for variable, meaning, default in settings_rows()]) + "\n"


# --- other tools' settings, read here so no other module reads the environment ---------------------
def prefect_api_url() -> str | None:
    """``PREFECT_API_URL``: a Prefect server every command and flow reports to."""
    return os.environ.get("PREFECT_API_URL") or None


def prefect_home() -> Path | None:
    """``PREFECT_HOME``, where Prefect keeps its local database and profiles, when set."""
    return Path(os.environ["PREFECT_HOME"]).expanduser() if os.environ.get("PREFECT_HOME") else None


def onednn_enabled() -> bool:
    """TensorFlow's oneDNN kernels are on unless ``TF_ENABLE_ONEDNN_OPTS`` turns them off."""
    return os.environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower() not in {"0", "false", "off", "no"}


def prefect_home_or_api_chosen() -> bool:
    """Whether the user chose where Prefect keeps its state or which server it reports to."""
    return bool(os.environ.get("PREFECT_HOME") or os.environ.get("PREFECT_API_URL"))


def environment_values(names: tuple[str, ...]) -> dict[str, str]:
    """The set ones of ``names`` (what a command tells a person to export in another shell)."""
    return {name: os.environ[name] for name in names if os.environ.get(name)}


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment with ``extra`` on top, for a process it starts."""
    return {**os.environ, **extra}


def take_variable(name: str) -> str:
    """Read and clear an internal variable a parent set for this process alone (not for its children)."""
    return os.environ.pop(name, "")


@contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """``values`` in the environment for the block, what was there before back after it (for the
    processes and libraries that read the environment themselves: boto3, Prefect, children)."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def data_dir_set() -> Path | None:
    """``MNIST_DATA_DIR`` when it is set (a folder a command checks), not its default."""
    given = DataSettings()
    return given.data_dir if "data_dir" in given.model_fields_set else None


def retry_seconds_set() -> bool:
    """Whether ``MNIST_RETRY_SECONDS`` is set (then a command keeps it, rather than its short default)."""
    return "retry_seconds" in S3Settings().model_fields_set


def with_table(document: str) -> str:
    """``document`` with the text between the table's markers rendered anew."""
    start, end = document.index(TABLE_START) + len(TABLE_START), document.index(TABLE_END)
    return document[:start] + settings_table() + document[end:]


if __name__ == "__main__":  # python -m storage.settings [FILE]: print the table, or render it into FILE
    if len(sys.argv) > 1:
        target = Path(sys.argv[1])
        target.write_text(with_table(target.read_text()))
    else:
        sys.stdout.write(settings_table())
