"""Training checkpoints that resume bit for bit, without pickle.

A checkpoint is a folder `checkpoints/step-000400/`, written atomically:
    trainable.safetensors   the parameters that require grad (an adapter's few, or all of them)
    optimizer.safetensors   each parameter's optimizer tensors (`state.<index>.exp_avg`, …)
    rng.safetensors         torch's CPU and CUDA generator states (uint8 tensors)
    state.json              step, data-loader position, optimizer hyper-parameters and scalar
                            state, Python's and NumPy's generator states, the training config
Frozen weights are not saved: resuming reloads the base model and lays these on top. Tensors
go to safetensors and everything else to JSON, so loading a checkpoint runs no code.

Data-parallel runs write the same consolidated checkpoint: DDP's replicas are whole already (the
"module." prefix of the wrapper is dropped), and FSDP2's sharded parameters and optimizer states
are gathered into whole tensors (every rank takes part), then rank 0 writes. Loading lays whole
tensors back and each rank keeps its own shard, so a checkpoint resumes on any number of processes.
"""

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from llmlab.atomic import atomic_dir
from llmlab.errors import LlmlabError
from llmlab.train.distributed import is_main

PREFIX = "step-"


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {_plain(name): _whole(p).detach().contiguous().cpu() for name, p in model.named_parameters()
            if p.requires_grad}


def _plain(name: str) -> str:
    """A parameter's name without DDP's wrapper prefix."""
    return name[len("module."):] if name.startswith("module.") else name


def _whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (a collective: every rank must call it), or `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def save_checkpoint(folder: str | Path, model, optimizer, state: dict) -> Path:
    """Write `model`'s trainable parameters, `optimizer`, the RNG states and `state` (JSON) to `folder`."""
    folder = Path(folder)
    params = trainable_state(model)  # gathered on every rank, written by rank 0 only
    opt_tensors, opt_json = _split_optimizer(optimizer.state_dict())
    rng_tensors, rng_json = _rng_state()
    if not is_main():
        return folder
    with atomic_dir(folder) as tmp:
        save_file(params, tmp / "trainable.safetensors")
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file(rng_tensors, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps(
            {**state, "optimizer": opt_json, "rng": rng_json}, indent=1), encoding="utf-8")
    return folder


def load_checkpoint(folder: str | Path, model, optimizer) -> dict:
    """Lay a checkpoint's parameters onto `model` and its state into `optimizer`; return its JSON state.

    The RNG states are not restored here: call `restore_rng(state, folder)` at the point in the loop
    where they were saved, after any setup that draws random numbers.
    """
    folder = Path(folder)
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        params = load_file(folder / "trainable.safetensors")
        opt_tensors = load_file(folder / "optimizer.safetensors")
    except (OSError, ValueError) as e:
        raise LlmlabError(f"could not read checkpoint {folder}: {e}") from None
    _load_trainable(model, params, folder)
    optimizer.load_state_dict(_shard_like_params(optimizer, _join_optimizer(opt_tensors, state["optimizer"])))
    return state


def _load_trainable(model, params: dict, folder: Path):
    own = {_plain(name): p for name, p in model.named_parameters() if p.requires_grad}
    if own.keys() != params.keys():
        missing, extra = sorted(own.keys() - params.keys()), sorted(params.keys() - own.keys())
        raise LlmlabError(f"checkpoint {folder} does not match the model's trainable parameters "
                          f"(missing {missing[:3]}, unexpected {extra[:3]}); resume with the same "
                          "--model and --method as the run that wrote it")
    with torch.no_grad():
        for name, p in own.items():
            p.copy_(_shard_like(params[name].to(p.device), p))


def _shard_like(whole: torch.Tensor, param) -> torch.Tensor:
    """`whole` cut the way an FSDP2 parameter is (each rank keeps its own piece), or as it is."""
    if not isinstance(param, DTensor) or whole.shape != param.shape:
        return whole
    return distribute_tensor(whole.to(param.device), param.device_mesh, param.placements, src_data_rank=None)


def _shard_like_params(optimizer, sd: dict) -> dict:
    """Optimizer states (whole tensors) cut like their FSDP2 parameters; index i is the i-th parameter."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                entries[name] = _shard_like(value, params[index])
    return sd


def _split_optimizer(sd: dict) -> tuple[dict, dict]:
    """torch's optimizer state_dict -> (tensors keyed `state.<index>.<name>`, the JSON rest)."""
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{name}"] = _whole(value).detach().contiguous().cpu()
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict, rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = value
    for index, entries in rest["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": rest["param_groups"]}


def _rng_state() -> tuple[dict, dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(keys), gauss],
                     "numpy": [name, np_keys.tolist(), pos, has_gauss, cached]}


def restore_rng(state: dict, folder: str | Path):
    """Put torch's, Python's and NumPy's generators back where the checkpoint found them."""
    tensors = load_file(Path(folder) / "rng.safetensors")
    torch.set_rng_state(tensors["torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, keys, gauss = state["rng"]["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["rng"]["numpy"]
    np.random.set_state((name, np.array(np_keys, dtype=np.uint32), pos, has_gauss, cached))


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (atomic writes leave no partial ones)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest checkpoint under `root`, or `root` itself when it is one."""
    root = Path(root)
    if (root / "state.json").is_file():
        return root
    found = list_checkpoints(root)
    return found[-1] if found else None


def resume_source(out: str | None, resume: bool, resume_from: str | None = None) -> Path | None:
    """The checkpoint folder a stage resumes from (`--resume-from DIR`, or `--resume`: the checkpoints of the run
    in `--out`), checked before any model is loaded; None when the run starts afresh."""
    if resume_from:
        source = Path(resume_from)
    elif resume:
        if not out:
            raise LlmlabError("--resume continues the run in --out DIR; give the run folder with --out")
        source = Path(out) / "checkpoints"
    else:
        return None
    if latest_checkpoint(source) is None:
        raise LlmlabError(f"no checkpoint to resume from in {source}; runs write them every --train.save-every steps")
    return source


def prune_checkpoints(root: str | Path, keep: int):
    """Delete all but the newest `keep` checkpoints (keep <= 0 keeps them all)."""
    if keep > 0 and is_main():
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
