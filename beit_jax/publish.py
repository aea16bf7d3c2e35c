"""A fine-tuned model as timm publishes one on the Hugging Face Hub, without torch.

`save_hub_folder(path, model, variables, label_names=...)` writes what timm's
`push_to_hf_hub` / `save_for_hf` upload: `config.json` (timm's `save_config_for_hf`: architecture,
num_classes, num_features, global_pool, label_names, model_args, pretrained_cfg),
`model.safetensors` (timm's state-dict keys and layouts, `to_timm_state_dict`) and a `README.md`
model card. timm loads the folder with `timm.create_model("local-dir:PATH", pretrained=True)`
(or `hf-hub:user/repo` once pushed), beit-jax with `create_model("local-dir:PATH")` or
`create_model(PATH)` (`read_hub_folder`). `push_folder` uploads one (`beit-jax push`).

The architecture written is the timm model with the same parameters (a registered architecture's
`timm_name`), its model_args the fields beit-jax built it with beyond that row, as
conversion/flax_to_timm builds the timm model. numpy, json and safetensors only: no torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ._io import atomic_write

HUB_FILES = ("config.json", "model.safetensors", "README.md")
LOCAL_DIR = "local-dir:"
# What timm's pretrained cfgs say for every BEiT / BEiT-3 tag (license: the source weights'), and
# timm's export constants (custom_load False: exports hold native timm state dicts).
_TIMM_CFG = dict(fixed_input_size=True, first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
# model_args keys beit-jax passes to create_model itself, not as architecture fields
_OWN_ARGS = ("num_classes", "img_size", "global_pool", "in_chans")


def timm_model_args(model) -> Tuple[str, Dict[str, Any]]:
    """(timm architecture, model_args as timm records them) of a beit-jax model: the timm model
    `timm.create_model(architecture, **model_args)` has the same parameters and data config."""
    from .models import ARCHITECTURES, architecture_overrides

    if model.pretrained_cfg is None:
        raise ValueError("the model has no pretrained_cfg (build it with beit_jax.create_model): its architecture is "
                         "unknown, so no timm config can be written")
    arch = ARCHITECTURES[model.pretrained_cfg.architecture]
    args = dict(arch.timm_kwargs, **architecture_overrides(model))
    args.update(num_classes=model.num_classes, in_chans=getattr(model, "in_chans", 3), global_pool=model.global_pool,
                img_size=[model.img_size, model.img_size])
    return arch.timm_name, json.loads(json.dumps(args))


def hub_config(model, label_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """config.json as timm's save_config_for_hf writes it for the same model (model_config
    {'label_names': label_names})."""
    from .transforms import resolve_data_config

    architecture, model_args = timm_model_args(model)
    data = resolve_data_config(model)
    pretrained_cfg = dict(
        tag=model.pretrained_cfg.tag, custom_load=False, input_size=list(data["input_size"]),
        fixed_input_size=_TIMM_CFG["fixed_input_size"], interpolation=data["interpolation"],
        crop_pct=data["crop_pct"], crop_mode=data["crop_mode"], mean=list(data["mean"]), std=list(data["std"]),
        num_classes=model.num_classes, pool_size=None, first_conv=_TIMM_CFG["first_conv"],
        classifier=_TIMM_CFG["classifier"], license=_TIMM_CFG["license"])
    cfg: Dict[str, Any] = {"architecture": architecture, "num_classes": model.num_classes,
                           "num_features": getattr(model, "num_features", model.embed_dim)}
    if model.global_pool:
        cfg["global_pool"] = model.global_pool
    if label_names:
        if len(label_names) != model.num_classes:
            raise ValueError(f"{len(label_names)} label names for a {model.num_classes}-class head")
        cfg["label_names"] = list(label_names)
    cfg["model_args"] = model_args
    cfg["pretrained_cfg"] = pretrained_cfg
    return cfg


def model_card(config: Dict[str, Any], *, weights: str, name: str, notes: Sequence[str] = ()) -> str:
    """README.md: timm's generate_readme front matter (tags, pipeline, library, license) and what
    the folder holds and how to load it."""
    lines = ["---", "tags:", "- image-classification", "- timm", "- beit-jax", "pipeline_tag: image-classification",
             "library_name: timm", f"license: {config['pretrained_cfg'].get('license', 'apache-2.0')}", "---",
             f"# Model card for {name}", "",
             f"A timm `{config['architecture']}` fine-tuned with beit-jax (JAX/Flax) from "
             f"`{config['architecture']}.{config['pretrained_cfg']['tag']}`; timm's layout: config.json "
             f"and model.safetensors as timm's push_to_hf_hub writes them.", "",
             "## Model Details",
             f"- **Classes:** {config['num_classes']}"
             + (f" ({', '.join(map(str, config.get('label_names', [])[:10]))}"
                f"{', ...' if len(config.get('label_names', [])) > 10 else ''})" if config.get("label_names") else ""),
             f"- **Weights:** {weights}",
             f"- **Input:** {config['pretrained_cfg']['input_size'][1]}x{config['pretrained_cfg']['input_size'][2]}, "
             f"mean {config['pretrained_cfg']['mean']}, std {config['pretrained_cfg']['std']}, "
             f"crop_pct {config['pretrained_cfg']['crop_pct']} ({config['pretrained_cfg']['interpolation']})",
             *[f"- {n}" for n in notes], "",
             "## Model Usage", "```python",
             "import timm",
             "model = timm.create_model('hf-hub:USER/REPO', pretrained=True).eval()   # or 'local-dir:PATH'",
             "cfg = timm.data.resolve_data_config({}, model=model)",
             "transform = timm.data.create_transform(**cfg)",
             "", "import beit_jax  # JAX/Flax: the same logits",
             "module, variables = beit_jax.create_model('local-dir:PATH')   # a folder of this repo's files",
             "```", ""]
    return "\n".join(lines)


def save_hub_folder(path: str | os.PathLike, model, variables, *, label_names: Optional[Sequence[str]] = None,
                    weights: str = "the final fine-tuned weights", notes: Sequence[str] = ()) -> str:
    """Write PATH/{config.json, model.safetensors, README.md} (each atomically). Returns PATH."""
    from .checkpoints import save_safetensors
    from .mapping import to_timm_state_dict

    path = os.fspath(path)
    config = hub_config(model, label_names)
    os.makedirs(path, exist_ok=True)
    save_safetensors(to_timm_state_dict(variables, model), os.path.join(path, "model.safetensors"))
    atomic_write(os.path.join(path, "config.json"), json.dumps(config, indent=2).encode())
    card = model_card(config, weights=weights, name=os.path.basename(os.path.abspath(path)), notes=notes)
    atomic_write(os.path.join(path, "README.md"), card.encode())
    return path


def hub_folder(name: str) -> Optional[str]:
    """The folder a model name points at: 'local-dir:PATH', or a plain PATH that is a folder with a
    config.json (None for a registered model name)."""
    if name.startswith(LOCAL_DIR):
        return name[len(LOCAL_DIR):]
    if os.path.isdir(name) and os.path.isfile(os.path.join(name, "config.json")):
        return name
    return None


def missing_files(folder: str) -> List[str]:
    return [n for n in HUB_FILES if not os.path.isfile(os.path.join(folder, n))]


def read_hub_folder(folder: str) -> Tuple[str, Dict[str, Any], str]:
    """(beit-jax model name, create_model keywords, weights file) for a timm Hub folder (ours, or
    one timm's save_for_hf wrote for a BEiT)."""
    from .models import ARCHITECTURES, PRETRAINED_CFGS, DEFAULT_TAGS, get_pretrained_cfg

    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"model folder not found: {folder}")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder} has no config.json: a model folder is what timm's save_for_hf / "
                                f"push_to_hf_hub (or beit-jax finetune's OUTPUT/hub) writes")
    weights = next((os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")
                    if os.path.isfile(os.path.join(folder, n))), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} has config.json but no model.safetensors (or pytorch_model.bin)")
    with open(cfg_path) as f:
        try:
            cfg = json.load(f)
        except ValueError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from e
    pretrained = dict(cfg.get("pretrained_cfg") or {})
    arch = cfg.get("architecture") or pretrained.get("architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"{cfg_path}: architecture {arch!r} is not a beit-jax architecture (known: "
                         f"{', '.join(sorted(a for a in DEFAULT_TAGS if not a.startswith('test_')))})")
    args = dict(cfg.get("model_args") or {})
    kwargs: Dict[str, Any] = {k: args.pop(k) for k in ("num_classes", "global_pool") if k in args}
    kwargs.setdefault("num_classes", cfg.get("num_classes", pretrained.get("num_classes")))
    if "global_pool" not in kwargs and cfg.get("global_pool"):
        kwargs["global_pool"] = cfg["global_pool"]
    size = args.pop("img_size", None) or pretrained.get("input_size", [None, None, None])[1:]
    size = [size, size] if isinstance(size, int) else list(size)
    if size[0] is not None:
        if size[0] != size[1]:
            raise ValueError(f"{cfg_path}: img_size {size} is not square; beit-jax models take square inputs")
        kwargs["img_size"] = int(size[0])
    if args.pop("in_chans", 3) != 3:
        raise ValueError(f"{cfg_path}: in_chans other than 3 is not supported")
    tag = pretrained.get("tag")
    name = f"{arch}.{tag}" if f"{arch}.{tag}" in PRETRAINED_CFGS else arch
    base = get_pretrained_cfg(name)
    data = {k: (tuple(pretrained[k]) if isinstance(pretrained[k], list) else pretrained[k])
            for k in ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std") if k in pretrained}
    kwargs["pretrained_cfg"] = dataclasses.replace(base, **data, num_classes=kwargs["num_classes"], hf_hub_id=None)
    kwargs.update(args)  # architecture fields beyond the row (depth=2, ...)
    return name, kwargs, weights


class PushError(RuntimeError):
    """The Hub refused or could not be reached."""


def push_folder(folder: str, repo_id: str, *, private: bool = False, revision: Optional[str] = None,
                commit_message: str = "Add model", token: Optional[str] = None):
    """Upload a complete hub folder as timm's push_to_hf_hub does: HfApi.create_repo(exist_ok=True),
    then upload_folder (a `revision` branch is created first when missing). Returns upload_folder's
    result (the commit info)."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder (give the OUTPUT/hub folder `beit-jax finetune` wrote)")
    missing = missing_files(folder)
    if missing:
        raise FileNotFoundError(f"{folder} is not a complete model export: {', '.join(missing)} missing (a finished "
                                f"`beit-jax finetune` writes OUTPUT/hub/ with {', '.join(HUB_FILES)})")
    with open(os.path.join(folder, "config.json")) as f:
        try:
            cfg = json.load(f)
        except ValueError as e:
            raise ValueError(f"{os.path.join(folder, 'config.json')}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict) or "architecture" not in cfg or "pretrained_cfg" not in cfg:
        raise ValueError(f"{os.path.join(folder, 'config.json')} is not a timm model config (no architecture / "
                         f"pretrained_cfg)")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        repo_id = getattr(repo, "repo_id", repo_id)
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message)
    except Exception as e:
        raise PushError(f"could not push {folder} to {repo_id}: {type(e).__name__}: {e} (log in with "
                        f"`huggingface-cli login` or set HF_TOKEN; the Hub must be reachable)") from e
