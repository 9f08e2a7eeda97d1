"""The model and dataset registry (``params/models.yaml``), validated on load."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REGISTRY_PATH = PROJECT_ROOT / "params" / "models.yaml"

MODEL_ROLES = ("base", "reference", "reward")
MODEL_FORMATS = ("meta", "hf", "tiny")
REWARD_LAYOUTS = ("sequence_classification", "starling")
# How a reward model reads control-token strings (``</s>``, ``<|eot_id|>``) written literally in a prompt or
# response, as its reference code does (DESIGN §5): kept as text; read as the control tokens; read as control
# tokens after deleting the BOS string (FsfairX's card removes ``<|begin_of_text|>`` from its text).
LITERAL_CONTROL_TOKENS = ("text", "control", "control_bos_deleted")
DATASET_FORMATS = ("mbpp", "codecontests", "humaneval", "jsonl", "synthetic")

_MODEL_KEYS = {"role", "format", "hf_repo", "hf_subfolder", "hf_root_files", "gated", "s3", "params_billion",
               "n_future", "reward_layout", "tokenizer_source", "input_template", "truncation_side",
               "literal_control_tokens", "value_trunk_for", "note"}
_DATASET_KEYS = {"format", "hf_repo", "hf_config", "s3", "path"}


class RegistryError(ValueError):
    """The registry file is malformed, or an id is not in it."""


@dataclass(frozen=True)
class ModelEntry:
    id: str
    role: str
    format: str
    s3: str | None = None
    hf_repo: str | None = None
    hf_subfolder: str | None = None
    hf_root_files: tuple[str, ...] = ()
    gated: bool = False
    params_billion: float | None = None
    n_future: int | None = None
    reward_layout: str | None = None
    # where the tokenizer comes from: "own" (the repo's) or another registry id whose repo holds it
    tokenizer_source: str = "own"
    # reward models: "{prompt}"/"{response}" text template, or "chat_template" (the tokenizer's own)
    input_template: str | None = None
    truncation_side: str = "right"
    # reward models: how literal control-token strings in the text are read (one of LITERAL_CONTROL_TOKENS)
    literal_control_tokens: str | None = None
    # reward models: the bases whose token ids this model reads as its own (same tokenizer), so its decoder can
    # be the critic's value trunk (critic.value_trunk: reward_model); training and preflight check the files
    value_trunk_for: tuple[str, ...] = ()
    note: str | None = None


@dataclass(frozen=True)
class DatasetEntry:
    id: str
    format: str
    hf_repo: str | None = None
    hf_config: str | None = None
    s3: str | None = None
    path: str | None = None


@dataclass
class Registry:
    bucket: str
    region: str
    models: dict[str, ModelEntry] = field(default_factory=dict)
    datasets: dict[str, DatasetEntry] = field(default_factory=dict)

    def model(self, model_id: str) -> ModelEntry:
        if model_id not in self.models:
            raise RegistryError(f"unknown model id {model_id!r}; params/models.yaml has: {', '.join(self.models)}")
        return self.models[model_id]

    def dataset(self, dataset_id: str) -> DatasetEntry:
        if dataset_id not in self.datasets:
            raise RegistryError(
                f"unknown dataset id {dataset_id!r}; params/models.yaml has: {', '.join(self.datasets)}")
        return self.datasets[dataset_id]


def _fail(path: Path, msg: str) -> None:
    raise RegistryError(f"{path}: {msg}")


def _check_entry(path: Path, section: str, name: str, spec: Any, allowed: set[str], formats: tuple[str, ...]) -> None:
    """An entry is a mapping of known keys with a known format."""
    if not isinstance(spec, dict):
        _fail(path, f"{section}.{name} must be a mapping")
    bad = set(spec) - allowed
    if bad:
        _fail(path, f"{section}.{name}: unknown key(s) {sorted(bad)} (valid: {sorted(allowed)})")
    if spec.get("format") not in formats:
        _fail(path, f"{section}.{name}.format must be one of {formats}, got {spec.get('format')!r}")


def _check_reward(path: Path, mid: str, spec: dict[str, Any]) -> None:
    """A reward model says how it reads text: layout, input template, truncation side."""
    if spec.get("reward_layout") not in REWARD_LAYOUTS:
        _fail(path, f"models.{mid}.reward_layout must be one of {REWARD_LAYOUTS}")
    template = spec.get("input_template")
    if not isinstance(template, str) or (template != "chat_template" and
                                         ("{prompt}" not in template or "{response}" not in template)):
        _fail(path, f"models.{mid}.input_template must be 'chat_template' or a text with {{prompt}} and "
                    f"{{response}}, got {template!r}")
    if spec.get("truncation_side", "right") not in ("left", "right"):
        _fail(path, f"models.{mid}.truncation_side must be 'left' or 'right'")
    literal = spec.get("literal_control_tokens")
    if literal not in LITERAL_CONTROL_TOKENS:
        _fail(path, f"models.{mid}.literal_control_tokens must be one of {LITERAL_CONTROL_TOKENS} (how the model's "
                    f"reference code reads a literal control-token string in a prompt or response), got {literal!r}")
    if template == "chat_template" and literal == "text":
        _fail(path, f"models.{mid}: a chat template is read by the tokenizer's own control-token matching; "
                    f"literal_control_tokens 'text' is only for text templates")


def load_registry(path: str | Path = REGISTRY_PATH) -> Registry:
    """Read and validate the registry; errors name the file and the bad key."""
    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        _fail(path, "top level must be a mapping")
    unknown = set(raw) - {"bucket", "region", "models", "datasets"}
    if unknown:
        _fail(path, f"unknown top-level key(s) {sorted(unknown)}")
    reg = Registry(bucket=str(raw.get("bucket", "wmtp")), region=str(raw.get("region", "eu-north-1")))
    for mid, spec in (raw.get("models") or {}).items():
        _check_entry(path, "models", mid, spec, _MODEL_KEYS, MODEL_FORMATS)
        if spec.get("role") not in MODEL_ROLES:
            _fail(path, f"models.{mid}.role must be one of {MODEL_ROLES}, got {spec.get('role')!r}")
        if spec["format"] in ("meta", "hf") and not spec.get("hf_repo") and not spec.get("s3"):
            _fail(path, f"models.{mid}: needs hf_repo or s3")
        if spec.get("role") == "reward":
            _check_reward(path, mid, spec)
        elif "literal_control_tokens" in spec:
            _fail(path, f"models.{mid}.literal_control_tokens is for reward models only (role {spec.get('role')!r})")
        s3 = spec.get("s3")
        if s3 is not None and not str(s3).startswith(f"s3://{reg.bucket}/models/{mid}/"):
            _fail(path, f"models.{mid}.s3 must be s3://{reg.bucket}/models/{mid}/ (one id, one path), got {s3!r}")
        if "value_trunk_for" in spec and spec.get("role") != "reward":
            _fail(path, f"models.{mid}.value_trunk_for is for reward models only (role {spec.get('role')!r})")
        reg.models[mid] = ModelEntry(id=mid, **{**spec, "hf_root_files": tuple(spec.get("hf_root_files") or ()),
                                                "value_trunk_for": tuple(spec.get("value_trunk_for") or ())})
    for mid, entry in reg.models.items():
        if entry.tokenizer_source != "own" and entry.tokenizer_source not in reg.models:
            _fail(path, f"models.{mid}.tokenizer_source must be 'own' or a model id of this file, "
                        f"got {entry.tokenizer_source!r}")
        for base in entry.value_trunk_for:
            if base not in reg.models or reg.models[base].role != "base":
                _fail(path, f"models.{mid}.value_trunk_for lists {base!r}, which is not a base model of this file")
    for did, spec in (raw.get("datasets") or {}).items():
        _check_entry(path, "datasets", did, spec, _DATASET_KEYS, DATASET_FORMATS)
        reg.datasets[did] = DatasetEntry(id=did, **spec)
    return reg


def dump_registry_table(reg: Registry) -> list[dict[str, Any]]:
    """Rows for display: id, role, format, Hub source, S3 path."""
    rows = []
    for entry in reg.models.values():
        hub = entry.hf_repo + (f"/{entry.hf_subfolder}" if entry.hf_subfolder else "") if entry.hf_repo else "-"
        rows.append({"id": entry.id, "role": entry.role, "format": entry.format, "hub": hub, "s3": entry.s3 or "-"})
    return rows
