"""The one place that turns a device setting (auto, cpu, cuda, cuda:N) into a torch.device.

Why in ml: prediction needs it and ml is the lowest room that runs a network; training (the loop, the
process group) and the registry resolve their --device here too, so `auto` and a missing GPU mean the same
everywhere.
"""

from __future__ import annotations

import torch

from chromobatch.errors import ConfigError


def resolve_device(setting: str = "auto", local_rank: int | None = None) -> torch.device:
    """`auto` -> cuda when a CUDA device is available, else cpu; `cuda`/`cuda:N` need one (ConfigError).

    `local_rank` (a torchrun process's GPU) picks the index of a plain `cuda`; None leaves it to CUDA's
    current device.
    """
    name = setting.strip()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name} but no CUDA device is available", hint="Use --device cpu or auto.")
        if name == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
        return torch.device(name)
    raise ConfigError(f"--device must be auto, cpu or cuda[:N], not {setting!r}")
