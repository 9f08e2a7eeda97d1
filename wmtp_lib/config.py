"""Run configuration: recipe + environment + overrides → one validated, resolved dict.

Every key a file may set is declared in `SCHEMA`; an unknown key, a wrong type or a value outside its
choices is an error that names the key and the file it came from.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wmtp_lib.registry import PROJECT_ROOT

PARAMS_DIR = PROJECT_ROOT / "params"
RECIPES = ("mtp_baseline", "rho1", "rho1_tokenskip", "critic")


class ConfigError(ValueError):
    """A configuration file or override is invalid."""


@dataclass(frozen=True)
class F:
    """One configuration field: its type(s), default, allowed values and whether None is allowed."""

    types: tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] | None = None
    nullable: bool = False


SCHEMA: dict[str, Any] = {
    "recipe": F((str,), None, RECIPES, nullable=True),
    "run_name": F((str,), None, nullable=True),
    "seed": F((int,), 0),
    # run generated code (execution rewards) even where the sandbox has no filesystem/network isolation
    "allow_weak_sandbox": F((bool,), False),
    "models": {
        "base": F((str,), "tiny-mtp"),
        "reference": F((str,), None, nullable=True),
        "reward": F((str,), None, nullable=True),
        "n_future": F((int,), 4),
    },
    "data": {
        "dataset": F((str,), "synthetic"),
        "max_length": F((int,), 256),
        "pack": F((bool,), False),
        "prompt_masking": F((bool,), True),
        "n_train": F((int,), 2000),
        "n_test": F((int,), 200),
        "noise_fraction": F((float, int), 0.2),
        "data_seed": F((int,), 1234),
    },
    "train": {
        "steps": F((int,), 200),
        "micro_batch_size": F((int,), 8),
        "grad_accum": F((int,), 1),
        "lr": F((float, int), 1e-3),
        "weight_decay": F((float, int), 0.0),
        "warmup_steps": F((int,), 10),
        "min_lr_ratio": F((float, int), 0.1),
        "max_grad_norm": F((float, int), 1.0),
        "log_every": F((int,), 10),
        "save_every": F((int,), 100),
        "resume": F((str,), "auto", ("auto", "never")),
        "chunk_size": F((int,), 512),
        "gradient_checkpointing": F((bool,), False),
        "head_weights": F((list,), None, nullable=True),
        "mixed_precision": F((str,), "no", ("no", "bf16")),
        "trackers": F((list,), []),
        "stop_after": F((int,), None, nullable=True),
        "max_nonfinite_steps": F((int,), 3),
        # collectives wait this long (NCCL's default is 10 min) while rank 0 alone downloads models, scores the
        # reference or rewards, or exports final/
        "dist_timeout_minutes": F((int, float), 120),
    },
    "weights": {
        "scheme": F((str,), "uniform", ("uniform", "rho1", "critic")),
        "weight_group": F((str,), "micro_batch", ("micro_batch", "global")),  # DESIGN §4
        "mode": F((str,), "weighted", ("weighted", "tokenskip")),
        "temperature": F((float, int), 1.0),
        "keep_ratio": F((float, int), 0.7),
        "max_weight": F((float, int), 3.0),
        # soft weights: z-score the score per head (rho1) or keep its units, the temperature then in reward
        # units (critic): a z-scored score spreads weights as much with no signal as with one (DESIGN §4)
        "standardize": F((bool,), True),
    },
    "rho1": {
        "ref_cache": F((bool,), True),
        "ref_batch_size": F((int,), 16),
    },
    "critic": {
        "reward_source": F((str,), "model", ("model", "execution")),
        "gamma": F((float, int), 1.0),
        # the token score is the GAE advantage A_t = Σ (γ λ_w)^l δ_{t+l}; 0 = one-step TD error (v2)
        "score_lambda": F((float, int), 0.9),
        # what V reads: the MTP trunk output, or the reward model's decoder (needs the base's tokenizer)
        "value_trunk": F((str,), "base", ("base", "reward_model")),
        "value_coef": F((float, int), 0.5),
        "value_grad_to_trunk": F((bool,), False),
        # stage 1: fit V on Monte-Carlo returns until the held-out explained variance stops improving
        "stage1_max_steps": F((int,), 300),
        "stage1_eval_every": F((int,), 20),
        "stage1_patience": F((int,), 3),
        "stage1_heldout_rows": F((int,), 128),
        "stage1_lr": F((float, int), 1e-3),
        "rollouts": F((int,), 4),
        "rollout_max_new_tokens": F((int,), 96),
        "rollout_temperature": F((float, int), 0.8),
    },
    "paths": {
        "models_dir": F((str,), "models"),
        "datasets_dir": F((str,), "datasets"),
        "runs_dir": F((str,), "runs"),
    },
    "storage": {
        "kind": F((str,), "local", ("local", "s3")),
        "stage_tiny_if_missing": F((bool,), True),
    },
    "launch": {
        "num_processes": F((int,), 1),
        "accelerate_config": F((str,), "params/accelerate/cpu_1proc.yaml"),
        # an interrupt or preemption lets training finish its step and save a checkpoint for this long before
        # killing it (a 7B step and its FSDP2 checkpoint take minutes; accelerate's launcher waits as long)
        "stop_grace_s": F((int,), 60),
    },
}

ENV_ONLY_KEYS = {"name", "description"}
# Keys a resumed run may change: they decide where a run stops, how often it logs or saves, not what it computes.
RESUME_FREE_KEYS = ("train.stop_after", "train.resume", "train.log_every", "train.save_every", "train.trackers",
                    "train.dist_timeout_minutes", "launch.stop_grace_s")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, plus YAML 1.2 floats: ``1e-4`` (no dot) is a number, not the string "1e-4"."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def defaults(schema: dict[str, Any] = SCHEMA) -> dict[str, Any]:
    out = {}
    for key, spec in schema.items():
        out[key] = defaults(spec) if isinstance(spec, dict) else copy.deepcopy(spec.default)
    return out


def _check(values: dict[str, Any], schema: dict[str, Any], source: str, prefix: str = "") -> None:
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    for key, value in values.items():
        dotted = prefix + key
        if key not in schema:
            valid = ", ".join(sorted(schema))
            raise ConfigError(f"{source}: unknown key {dotted!r} (valid here: {valid})")
        spec = schema[key]
        if isinstance(spec, dict):
            _check(value, spec, source, dotted + ".")
            continue
        if value is None:
            if not spec.nullable:
                raise ConfigError(f"{source}: {dotted} may not be null")
            continue
        # bool is an int subclass: do not let True pass as an integer count
        if isinstance(value, bool) and bool not in spec.types:
            raise ConfigError(f"{source}: {dotted} must be {'/'.join(t.__name__ for t in spec.types)}, got {value!r}")
        if not isinstance(value, spec.types):
            raise ConfigError(f"{source}: {dotted} must be {'/'.join(t.__name__ for t in spec.types)}, "
                              f"got {type(value).__name__} {value!r}")
        if spec.choices is not None and value not in spec.choices:
            raise ConfigError(f"{source}: {dotted} must be one of {list(spec.choices)}, got {value!r}")
        if float in spec.types and isinstance(value, int):
            values[key] = float(value)  # an int where a float is meant (lr: 1) means that float


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def expand_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"train.steps": 5}`` → ``{"train": {"steps": 5}}`` (nested dicts pass through)."""
    out: dict[str, Any] = {}
    for key, value in (overrides or {}).items():
        parts = key.split(".")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
            node[parts[-1]] = _merge(node[parts[-1]], value)
        else:
            node[parts[-1]] = value
    return out


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path} not found")
    data = yaml.load(path.read_text(), Loader=_Loader) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def recipe_path(recipe: str) -> Path:
    if recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {recipe!r}; valid recipes: {', '.join(RECIPES)}")
    return PARAMS_DIR / "recipes" / f"{recipe}.yaml"


def env_path(env: str) -> Path:
    path = PARAMS_DIR / "envs" / f"{env}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in (PARAMS_DIR / "envs").glob("*.yaml"))
        raise ConfigError(f"unknown environment {env!r}; valid environments: {', '.join(names)}")
    return path


def load_recipe(recipe: str) -> dict[str, Any]:
    path = recipe_path(recipe)
    data = read_yaml(path)
    _check(data, SCHEMA, str(path.relative_to(PROJECT_ROOT)))
    if data.get("recipe") != recipe:
        raise ConfigError(f"{path}: recipe must be {recipe!r}, got {data.get('recipe')!r}")
    return data


def load_env(env: str) -> dict[str, Any]:
    path = env_path(env)
    data = read_yaml(path)
    body = {k: v for k, v in data.items() if k not in ENV_ONLY_KEYS}
    _check(body, SCHEMA, str(path.relative_to(PROJECT_ROOT)))
    if "recipe" in body:
        raise ConfigError(f"{path}: an environment may not set 'recipe'")
    return data


def resolve_config(recipe: str, env: str = "local", overrides: dict[str, Any] | None = None,
                   run_name: str | None = None) -> dict[str, Any]:
    """Defaults ← recipe ← environment (← CI sizing under ``WMTP_CI=1``) ← overrides; validated and resolved."""
    recipe_cfg = load_recipe(recipe)
    env_cfg = load_env(env)
    over = expand_dotted(overrides or {})
    _check(over, SCHEMA, "overrides")
    cfg = _merge(defaults(), recipe_cfg)
    cfg = _merge(cfg, {k: v for k, v in env_cfg.items() if k not in ENV_ONLY_KEYS})
    ci = ci_sizing()
    if ci is not None:
        cfg = _merge(cfg, ci["config"])
    cfg = _merge(cfg, over)
    cfg["env"] = env_cfg.get("name", env)
    if run_name:
        cfg["run_name"] = run_name
    if not cfg.get("run_name"):
        cfg["run_name"] = f"{recipe}-{cfg['env']}-seed{cfg['seed']}"
    validate_resolved(cfg, "resolved config")
    return cfg


def validate_resolved(cfg: dict[str, Any], source: str) -> None:
    """Cross-field checks that a single file cannot make."""
    body = {k: v for k, v in cfg.items() if k != "env"}
    _check(body, SCHEMA, source)
    scheme = cfg["weights"]["scheme"]
    if scheme == "rho1" and not cfg["models"]["reference"]:
        raise ConfigError(f"{source}: weights.scheme rho1 needs models.reference")
    if scheme == "critic" and cfg["critic"]["reward_source"] == "model" and not cfg["models"]["reward"]:
        raise ConfigError(f"{source}: critic with reward_source 'model' needs models.reward")
    hw = cfg["train"]["head_weights"]
    if hw is not None and len(hw) != cfg["models"]["n_future"]:
        raise ConfigError(f"{source}: train.head_weights has {len(hw)} entries but models.n_future is "
                          f"{cfg['models']['n_future']}")
    if not cfg["launch"]["stop_grace_s"] >= 1:
        raise ConfigError(f"{source}: launch.stop_grace_s must be >= 1 (seconds to finish a step and save), got "
                          f"{cfg['launch']['stop_grace_s']}")
    if not 0 < cfg["weights"]["keep_ratio"] <= 1:
        raise ConfigError(f"{source}: weights.keep_ratio must be in (0, 1]")
    if not cfg["weights"]["temperature"] > 0:
        raise ConfigError(f"{source}: weights.temperature must be > 0")
    if not cfg["weights"]["max_weight"] >= 1:
        raise ConfigError(f"{source}: weights.max_weight must be >= 1 (weights have mean 1; the cap redistributes "
                          f"the mass above it), got {cfg['weights']['max_weight']}")
    ccfg = cfg["critic"]
    if not 0 < ccfg["gamma"] <= 1:
        raise ConfigError(f"{source}: critic.gamma must be in (0, 1]")
    if not 0 <= ccfg["score_lambda"] <= 1:
        raise ConfigError(f"{source}: critic.score_lambda must be in [0, 1] (0: one-step TD error, 1: Monte-Carlo)")
    for key in ("stage1_max_steps", "stage1_eval_every", "stage1_patience", "stage1_heldout_rows"):
        if ccfg[key] < 1:
            raise ConfigError(f"{source}: critic.{key} must be >= 1")
    if scheme == "critic" and ccfg["value_trunk"] == "reward_model":
        if not cfg["models"]["reward"]:
            raise ConfigError(f"{source}: critic.value_trunk reward_model needs models.reward (a reward model with "
                              "the base's tokenizer)")
        if ccfg["value_grad_to_trunk"]:
            raise ConfigError(f"{source}: critic.value_grad_to_trunk needs critic.value_trunk base (the reward "
                              "model's decoder is frozen)")
    for key in ("steps", "micro_batch_size", "grad_accum", "log_every", "save_every", "chunk_size"):
        if cfg["train"][key] < 1:
            raise ConfigError(f"{source}: train.{key} must be >= 1")
    if not cfg["train"]["dist_timeout_minutes"] > 0:
        raise ConfigError(f"{source}: train.dist_timeout_minutes must be > 0 (minutes a process waits for the "
                          "others, e.g. 120)")
    if cfg["data"]["max_length"] < 8:
        raise ConfigError(f"{source}: data.max_length must be >= 8")


def flat_config(cfg: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` → ``{"train.lr": 1e-3}``."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_view(cfg: dict[str, Any]) -> dict[str, Any]:
    """The flat config a checkpoint is bound to: everything but `RESUME_FREE_KEYS`."""
    # paths say where things live, not what the run is (a relative and an absolute runs_dir are one run)
    return {k: v for k, v in flat_config(cfg).items() if k not in RESUME_FREE_KEYS and not k.startswith("paths.")}


def config_hash(cfg: dict[str, Any]) -> str:
    """sha256 of `resume_view` (stored with every checkpoint; a resume needs the same hash)."""
    return hashlib.sha256(json.dumps(resume_view(cfg), sort_keys=True, default=str).encode()).hexdigest()


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every key of two `resume_view`s that differs."""
    keys = sorted(set(old) | set(new))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def check_same_run(old_cfg: dict[str, Any], new_cfg: dict[str, Any], where: str | Path) -> None:
    """Refuse to continue a run under another resolved config; the message names the changed keys."""
    changes = changed_keys(resume_view(old_cfg), resume_view(new_cfg))
    if changes:
        raise ConfigError(f"{where} belongs to a run with another config ({'; '.join(changes)}); "
                          f"start a new run with another run_name (e.g. -p run_name {new_cfg['run_name']}-2) "
                          "or remove that run directory")


def load_resolved(path: str | Path) -> dict[str, Any]:
    """Read a resolved config written by `write_config` (validated again)."""
    path = Path(path)
    cfg = read_yaml(path)
    if "env" not in cfg:
        raise ConfigError(f"{path}: not a resolved config (no 'env' key); build one with resolve_config")
    # a config written before a key that leaves what a run computes alone existed: that key's default
    base = defaults()
    for dotted in RESUME_FREE_KEYS:
        section, key = dotted.split(".")
        if isinstance(cfg.get(section), dict) and key not in cfg[section]:
            cfg[section][key] = base[section][key]
    validate_resolved(cfg, str(path))
    return cfg


def write_config(cfg: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(cfg, sort_keys=False))
    tmp.replace(path)
    return path


def project_path(p: str | Path) -> Path:
    """Relative paths in configs are relative to the project root."""
    p = Path(p).expanduser()
    return p if p.is_absolute() else PROJECT_ROOT / p


def as_list(value: Any, name: str) -> list[Any]:
    """A notebook list parameter: a list, one scalar (``-p k 1``), or the JSON / comma-separated text of ``-p``."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"parameter {name}: not a JSON list: {value!r} ({exc.msg})") from exc
            return list(parsed)
        return [part.strip() for part in text.split(",") if part.strip()]
    raise ConfigError(f"parameter {name} must be a list, got {type(value).__name__} {value!r}")


def as_dict(value: Any, name: str) -> dict[str, Any]:
    """A notebook dict parameter: a dict, or its JSON text (what ``-p name '{...}'`` passes)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            parsed = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(f"parameter {name}: not a JSON object: {value!r} ({exc.msg})") from exc
        if isinstance(parsed, dict):
            return parsed
    raise ConfigError(f"parameter {name} must be a dict, got {type(value).__name__} {value!r}")


CI_FILE = PARAMS_DIR / "ci.yaml"


def ci_active() -> bool:
    """True when ``WMTP_CI`` asks for CI-sized runs (any value but empty or ``0``)."""
    return os.environ.get("WMTP_CI", "") not in ("", "0")


def ci_sizing() -> dict[str, Any] | None:
    """``params/ci.yaml`` (validated) when `ci_active`, else None."""
    if not ci_active():
        return None
    data = read_yaml(CI_FILE)
    if set(data) != {"config", "evaluate"}:
        raise ConfigError(f"{CI_FILE}: top level must have exactly the keys 'config' and 'evaluate'")
    _check(data["config"], SCHEMA, f"{CI_FILE.relative_to(PROJECT_ROOT)} config")
    return data


def default_runs_dir() -> Path:
    """Where runs live: the local environment's ``paths.runs_dir`` (``runs/ci`` under ``WMTP_CI=1``)."""
    paths = _merge(defaults()["paths"], load_env("local").get("paths", {}))
    ci = ci_sizing()
    if ci is not None:
        paths = _merge(paths, ci["config"].get("paths", {}))
    return project_path(paths["runs_dir"])
