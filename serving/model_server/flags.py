"""``tensorflow_model_server``'s command line, as ``mnist serve`` takes it: TF Serving's flag
spelling and bools, and the flags it has no counterpart for, so production's command line runs
here whatever it sets (names and defaults from ``model_servers/main.cc`` and ``server.h``).

- Flags that only tune how TF Serving's C++ runs (threads, caches, GPU, TPU, XLA, TF Lite
  pools) are taken and have no effect; a value other than TF Serving's default is said once
  at start, so nobody takes it for honoured.
- Flags that would change what is served or how it is reached, and that this server cannot
  honour (TF Lite models, ALTS, platform or session configs), are refused unless at their
  default, in one line.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any

CPUS = os.cpu_count() or 1


def true_or_false(value: str) -> bool:
    if value not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")
    return value == "true"


def tf_serving_bool(default: bool) -> dict:
    """A bool flag as tensorflow_model_server parses one (tensorflow/core/util/command_line_flags.cc):
    ``--flag`` or ``--flag=true`` sets it, ``--flag=false`` clears it."""
    return {"nargs": "?", "const": True, "default": default, "type": true_or_false, "metavar": "true|false"}


def tf_serving_spellings(name: str) -> tuple[str, str]:
    """``--flag-name`` and ``--flag_name``: the CLI's spelling and TF Serving's."""
    return f"--{name.replace('_', '-')}", f"--{name}"


@dataclass(frozen=True)
class ForeignFlag:
    kind: type
    default: Any
    why: str  # what this server lacks


# TF Serving's flags that only tune its C++ runtime: taken, no effect.
NO_EFFECT = {
    "num_load_threads": ForeignFlag(int, 0, "versions load one at a time, off the request path"),
    "num_unload_threads": ForeignFlag(int, 0, "versions unload one at a time, off the request path"),
    "flush_filesystem_caches": ForeignFlag(bool, True, "no file system caches to flush"),
    "per_process_gpu_memory_fraction": ForeignFlag(float, 0.0, "no GPU"),
    "xla_cpu_compilation_enabled": ForeignFlag(bool, False, "SavedModels run as exported"),
    "xla_gpu_compilation_enabled": ForeignFlag(bool, False, "no GPU"),
    "enable_profiler": ForeignFlag(bool, True, "no profiler service"),
    "skip_initialize_tpu": ForeignFlag(bool, False, "no TPU"),
    "remove_unused_fields_from_bundle_metagraph": ForeignFlag(bool, True, "the MetaGraph is not kept"),
    "num_tflite_pools": ForeignFlag(int, CPUS, "no TensorFlow Lite"),
    "num_tflite_interpreters_per_pool": ForeignFlag(int, 1, "no TensorFlow Lite"),
    "rest_api_timeout_in_ms": ForeignFlag(int, 30000, "a REST call runs to its end"),
}

# TF Serving's flags that change what is served or how: refused unless at their default.
UNSUPPORTED = {
    "prefer_tflite_model": ForeignFlag(bool, False, "TensorFlow Lite models"),
    "use_alts_credentials": ForeignFlag(bool, False, "ALTS credentials (--ssl_config_file is)"),
    "platform_config_file": ForeignFlag(str, "", "platform configs"),
    "thread_pool_factory_config_file": ForeignFlag(str, "", "thread pool factories"),
    "tensorflow_session_config_file": ForeignFlag(str, "", "session configs (the parallelism flags are)"),
    "mixed_precision": ForeignFlag(str, "", "mixed precision"),
    "enable_per_model_batching_parameters": ForeignFlag(bool, False, "per-model batching parameters"),
}


def add_foreign_flags(parser: argparse.ArgumentParser) -> None:
    for name, flag in {**NO_EFFECT, **UNSUPPORTED}.items():
        kind = tf_serving_bool(flag.default) if flag.kind is bool else {"type": flag.kind, "default": flag.default}
        parser.add_argument(*tf_serving_spellings(name), dest=name, **kind,
                            help=f"TF Serving's flag; {'no effect' if name in NO_EFFECT else 'refused'} here: "
                                 f"{flag.why}")


def foreign_flag_notes(args: argparse.Namespace) -> list[str]:
    """What the start says about TF Serving flags set away from their default; raises
    ValueError for one this server cannot honour."""
    for name, flag in UNSUPPORTED.items():
        if getattr(args, name) != flag.default:
            raise ValueError(f"--{name}={shown(getattr(args, name))} is not supported here (no {flag.why})")
    return [f"--{name}={shown(getattr(args, name))} has no effect here ({flag.why})"
            for name, flag in NO_EFFECT.items() if getattr(args, name) != flag.default]


def shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def grpc_channel_arguments(text: str) -> list[tuple[str, int | str]]:
    """``--grpc_channel_arguments``: ``key=value`` pairs split on commas, each value an int when it
    reads as one, else a string, as server.cc's parseGrpcChannelArgs and BuildAndStart."""
    arguments: list[tuple[str, int | str]] = []
    for pair in filter(None, text.split(",")):
        key, equals, value = pair.partition("=")
        if not key or not equals:
            raise argparse.ArgumentTypeError(f"expected key=value pairs separated by commas, got {pair!r}")
        arguments.append((key, int(value) if is_int32(value) else value))
    return arguments


def is_int32(value: str) -> bool:
    """As absl::SimpleAtoi into an int32 reads it: digits with an optional sign, nothing else."""
    return re.fullmatch(r"[+-]?[0-9]+", value.strip()) is not None and -2**31 <= int(value) < 2**31
