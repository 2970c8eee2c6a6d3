"""Library versions and the device, recorded in every manifest."""

from __future__ import annotations

import platform
from importlib import metadata

import torch

from qconv.errors import UsageError
from qconv.files import WORKING_DTYPES
from qconv.version import __version__


def resolve_device(name: str) -> torch.device:
    """``auto`` = the first GPU when there is one, else the CPU; ``cpu``; ``cuda`` / ``cuda:N``."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(
            "{option} {value!r} is not a device; use auto, cpu, cuda or cuda:N", option="device", value=name
        ) from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("{option} {value}: no CUDA GPU is available here", option="device", value=name)
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"{{option}} {{value}}: only {torch.cuda.device_count()} GPU(s) here",
                option="device",
                value=name,
            )
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise UsageError(
            "{option} {value}: only cpu and cuda devices are supported", option="device", value=name
        )
    return device


def resolve_dtype(
    name: str | None, auto: torch.dtype | None = None, allow_auto: bool = True
) -> torch.dtype | None:
    """The dtype a user named, one of :data:`qconv.files.WORKING_DTYPES`; ``auto`` and None give ``auto`` (the
    caller's default, e.g. the source's dtype). The one validator of ``--dtype``; ``allow_auto``
    False for callers whose only default is None."""
    if name is None or (allow_auto and name == "auto"):
        return auto
    if name not in WORKING_DTYPES:
        choices = ", ".join((["auto"] if allow_auto else []) + list(WORKING_DTYPES))
        raise UsageError("{option} {value!r}: choose " + choices, option="dtype", value=name)
    return WORKING_DTYPES[name]


def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device, libraries: tuple[str, ...] = ()) -> dict[str, str | None]:
    env = {
        "qconv": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": version_of("transformers"),
        "safetensors": version_of("safetensors"),
    }
    for lib in libraries:
        env[lib] = version_of(lib)
    env["device"] = str(device)
    env["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return env


def peak_rss_bytes() -> int:
    """This process's peak resident memory. Linux's VmHWM starts afresh at exec, unlike
    ru_maxrss, which a child inherits from the process that forked it."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
