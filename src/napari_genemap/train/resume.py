"""What a resumable run saves beside its weights, and restores: the optimiser's state, the random generators,
and a readable duration for progress lines. Shared by the training loops that resume (DiffBulk stage 1,
Diff-ST), so a resumed run continues exactly where it stopped."""

from __future__ import annotations

from typing import Any


def optimiser_state_tensors(optimiser, generator) -> dict[str, Any]:
    import torch

    tensors = {"rng.generator": generator.get_state(), "rng.torch": torch.get_rng_state()}
    for index, values in optimiser.state_dict()["state"].items():
        for key, value in values.items():
            tensors[f"optimizer.{index}.{key}"] = torch.as_tensor(value)
    return tensors


def optimiser_groups(optimiser) -> dict:
    return {"param_groups": optimiser.state_dict()["param_groups"]}


def restore_optimiser(optimiser, generator, rng, tensors: dict, state: dict) -> None:
    import torch

    per_parameter: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            per_parameter.setdefault(int(index), {})[name] = value
    groups = [{**g, "betas": tuple(g["betas"])} for g in state["param_groups"]]
    optimiser.load_state_dict({"state": per_parameter, "param_groups": groups})
    generator.set_state(tensors["rng.generator"])
    torch.set_rng_state(tensors["rng.torch"])
    rng.bit_generator.state = state["numpy_rng"]


def duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
