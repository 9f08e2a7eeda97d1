"""The feasibility report: can this machine run each recipe, and what exactly is missing.

Checks torch (≥ 2.6 for safe ``.bin`` loading), CUDA and GPU memory, disk, credentials (names only),
every registry id each recipe needs (local cache / S3 / Hub / buildable tiny), and estimates GPU memory
per device under FSDP. Writes ``preflight.json``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from wmtp_lib.config import RECIPES, project_path, resolve_config
from wmtp_lib.eval.execution import sandbox_record
from wmtp_lib.launch import required_models
from wmtp_lib.registry import load_registry

CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "HF_TOKEN")
GIB = 1024**3
ACTIVATION_BYTES_PER_TOKEN_PER_LAYER_FACTOR = 34  # fp16/bf16 transformer block without recomputation


def _version_tuple(v: str) -> tuple[int, int]:
    parts = v.split("+")[0].split(".")
    return int(parts[0]), int(parts[1])


def environment_report(models_dir: Path) -> dict[str, Any]:
    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            gpus.append({"index": i, "name": p.name, "memory_gib": round(p.total_memory / GIB, 1)})
    probe = models_dir if models_dir.exists() else models_dir.parent if models_dir.parent.exists() else Path.cwd()
    disk = shutil.disk_usage(probe)
    return {
        "torch": torch.__version__,
        "torch_ok": _version_tuple(torch.__version__) >= (2, 6),
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpus": gpus,
        "disk_free_gib": round(disk.free / GIB, 1),
        "disk_path": str(probe),
        # names only: values are never read into the report
        "credentials_present": [name for name in CREDENTIALS if os.environ.get(name)],
        # the isolation generated code gets here (evaluation, execution rewards)
        "sandbox": sandbox_record(),
    }


def model_params(model_id: str, models_dir: Path) -> tuple[float | None, dict[str, Any] | None]:
    """Parameter count (billions) from the local config when staged, else from the registry."""
    cfg_path = models_dir / model_id / "config.json"
    entry = load_registry().model(model_id)
    cfg = None
    if cfg_path.is_file():
        cfg = json.loads(cfg_path.read_text())
    elif entry.format == "tiny":
        from wmtp_lib.checkpoints.tiny import tiny_config_dict

        cfg = tiny_config_dict(model_id)
    if cfg is not None:
        D, L, V = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
        F = cfg["intermediate_size"]
        kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
        hd = D // cfg["num_attention_heads"]
        block = 2 * D * D + 2 * D * kv * hd + 3 * D * F + 2 * D
        n = L * block + 2 * V * D + D
        return n / 1e9, cfg
    return entry.params_billion, None


def locate_model(model_id: str, models_dir: Path, storage: str, check_s3: bool, check_hub: bool) -> dict[str, Any]:
    """Where a registry id is available: local cache, S3, Hub, or buildable (tiny)."""
    entry = load_registry().model(model_id)
    local = models_dir / model_id
    out: dict[str, Any] = {"id": model_id, "role": entry.role, "local": str(local), "s3": entry.s3,
                           "hub": entry.hf_repo, "found": None}
    if (local / "manifest.json").is_file():
        out["found"] = "local cache"
        return out
    if entry.format == "tiny" and storage == "local":
        out["found"] = "buildable (tiny)"
        return out
    if check_s3 and entry.s3:
        try:
            from wmtp_lib.checkpoints.storage import remote_manifest

            if remote_manifest(entry.s3) is not None:
                out["found"] = "s3"
                return out
            out["s3_error"] = "no manifest.json at this prefix"
        except Exception as exc:  # any client/network failure is reported in the verdict, not raised
            out["s3_error"] = f"{type(exc).__name__}: {exc}"[:200]
    if check_hub and entry.hf_repo:
        out["hub_reachable"] = _hub_reachable(entry.hf_repo)
    return out


def _hub_reachable(repo: str) -> bool | str:
    try:
        from huggingface_hub import HfApi

        HfApi(token=os.environ.get("HF_TOKEN") or None).model_info(repo, timeout=5)
        return True
    except Exception as exc:  # reported as text in the report
        return f"{type(exc).__name__}"


def base_load_peak_bytes(n_params: float, largest_tensor: float, n_devices: int) -> float:
    """Bytes rank 0 holds while the base loads (`wmtp_lib.train.run_models.load_base`, float32): its shards, the one
    tensor being read (``largest_tensor`` elements at most) and the copy the scatter stages from it (measured
    with gloo: about one tensor more); the other ranks receive each chunk straight into their shard."""
    return 4 * n_params / max(1, n_devices) + 2 * 4 * largest_tensor


def memory_estimate(cfg: dict[str, Any], models_dir: Path, n_gpus: int) -> dict[str, float | None]:
    """GiB per device under FSDP (fp32 master weights, bf16 compute) for one recipe config.

    weights 4P/N + grads 4P/N + AdamW 8P/N, one gathered bf16 block, activations of one micro-batch
    (trunk with or without checkpointing, one head at a time), one logits chunk, and the largest
    frozen model that is resident at the same time (online reference, or the reward/reference model
    during its one scoring pass, bf16, unsharded).

    Loading the base (`wmtp_lib.train.run_models.load_base`) peaks at the rank's float32 shards 4P/N plus, on
    rank 0, the one tensor it reads and scatters and the scatter's copy of it (the largest is the embedding
    or unembedding, 4VD): on the device ``load_gib``; on the host rank 0 holds that tensor as stored (at most float32) and the other
    ranks no weights (``host_load_gib``; before the meta-device load every rank held 4P on its host).
    """
    base_p, base_cfg = model_params(cfg["models"]["base"], models_dir)
    if base_p is None:
        return {"total_gib": None}
    N = max(1, n_gpus)
    P = base_p * 1e9
    weights, grads, adam = 4 * P / N, 4 * P / N, 8 * P / N
    D = (base_cfg or {}).get("hidden_size", 4096)
    V = (base_cfg or {}).get("vocab_size", 32000)
    L = (base_cfg or {}).get("num_hidden_layers", 32)
    H = cfg["models"]["n_future"]
    B, T = cfg["train"]["micro_batch_size"], cfg["data"]["max_length"]
    block_bytes = 2 * P / L
    act_per_layer = ACTIVATION_BYTES_PER_TOKEN_PER_LAYER_FACTOR * B * T * D
    trunk_layers = L - H
    if cfg["train"]["gradient_checkpointing"]:
        activations = 2 * B * T * D * trunk_layers + act_per_layer
    else:
        activations = act_per_layer * trunk_layers + act_per_layer
    logits = 2 * 4 * B * min(T, cfg["train"]["chunk_size"]) * V
    frozen = 0.0
    if cfg["weights"]["scheme"] == "rho1":
        ref_p, _ = model_params(cfg["models"]["reference"], models_dir)
        if ref_p is not None:
            frozen = max(frozen, 2 * ref_p * 1e9)
    if cfg["weights"]["scheme"] == "critic" and (cfg["critic"]["reward_source"] == "model"
                                                 or cfg["critic"]["value_trunk"] == "reward_model"):
        rm_p, _ = model_params(cfg["models"]["reward"], models_dir)
        if rm_p is not None:
            frozen = max(frozen, 2 * rm_p * 1e9)
    train_peak = weights + grads + adam + block_bytes + activations + logits
    F = (base_cfg or {}).get("intermediate_size", 11008)
    largest_tensor = 4 * max(V * D, D * F)
    load_peak = base_load_peak_bytes(P, largest_tensor / 4, N)
    # an online reference, or a reward model serving as the critic's value trunk, stays resident in training
    online = (cfg["weights"]["scheme"] == "rho1" and not cfg["rho1"]["ref_cache"]) or (
        cfg["weights"]["scheme"] == "critic" and cfg["critic"]["value_trunk"] == "reward_model")
    total = train_peak + frozen if online else max(train_peak, weights + frozen + act_per_layer)
    total = max(total, load_peak)
    return {
        "params_billion": round(base_p, 3),
        "weights_gib": weights / GIB, "grads_gib": grads / GIB, "adamw_gib": adam / GIB,
        "activations_gib": (activations + logits + block_bytes) / GIB, "frozen_model_gib": frozen / GIB,
        "load_gib": load_peak / GIB, "host_load_gib": largest_tensor / GIB,
        "total_gib": total / GIB,
    }


_TOKENIZER_NAMES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                    "chat_template.jinja")


def fetch_tokenizer_files(model_id: str, models_dir: Path, dst: Path, check_s3: bool, check_hub: bool) -> Path | None:
    """A directory holding ``model_id``'s tokenizer files only (no weights move): the local cache, else the
    tokenizer files of its staged S3 prefix, else of its Hub repo; ``None`` when none is reachable."""
    from wmtp_lib.checkpoints.tokenization import tokenizer_files_present

    local = models_dir / model_id
    if tokenizer_files_present(local):
        return local
    entry = load_registry().model(model_id)
    dst.mkdir(parents=True, exist_ok=True)
    if check_s3 and entry.s3:
        from wmtp_lib.checkpoints.storage import (
            parse_s3_uri,
            remote_manifest,
            s3_client,
        )

        client = s3_client()
        manifest = remote_manifest(entry.s3, client)
        if manifest is not None:
            loc = parse_s3_uri(entry.s3)
            for name in (n for n in _TOKENIZER_NAMES if n in manifest["files"]):
                client.download_file(loc.bucket, loc.key(name), str(dst / name))
            if tokenizer_files_present(dst):
                return dst
    if check_hub and entry.hf_repo:
        from huggingface_hub import HfApi, hf_hub_download

        from wmtp_lib.checkpoints.staging import select_repo_files, tokenizer_repo_files

        token = os.environ.get("HF_TOKEN") or None
        source = tokenizer_repo_files(entry, load_registry())
        repo = source[0] if source else entry.hf_repo
        small, _ = select_repo_files(HfApi(token=token).list_repo_files(repo), entry.hf_subfolder if not source
                                     else None, entry.hf_root_files if not source else source[1])
        for name in (f for f in small if Path(f).name in _TOKENIZER_NAMES):
            path = hf_hub_download(repo, name, token=token, local_dir=str(dst / ".hub"))
            shutil.copy(path, dst / Path(name).name)
        if tokenizer_files_present(dst):
            return dst
    return None


def tokenizer_check(cfg: dict[str, Any], models_dir: Path, check_s3: bool, check_hub: bool,
                    other: str = "reference") -> dict[str, Any]:
    """The base's tokenizer and that of ``models.<other>`` (Rho-1's reference, or the reward model that serves
    as the critic's value trunk) compared from their tokenizer files, before any weights move: special ids, the
    piece of every base id, identical ids on 256 of the recipe's training texts."""
    import tempfile

    from wmtp_lib.checkpoints.tokenization import (
        check_tokenizer_compat,
        compat_texts,
        load_tokenizer,
    )
    from wmtp_lib.data.sources import load_samples

    base_id, ref_id = cfg["models"]["base"], cfg["models"][other]
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {}
        for mid in (base_id, ref_id):
            try:
                dirs[mid] = fetch_tokenizer_files(mid, models_dir, Path(tmp) / mid, check_s3, check_hub)
            except Exception as exc:  # unreachable storage is reported in the verdict, not raised
                return {"status": "not run", "reason": f"{mid}: {type(exc).__name__}: {exc}"[:300]}
            if dirs[mid] is None:
                where = "local cache" + (", S3" if check_s3 else "") + (", Hub" if check_hub else "")
                return {"status": "not run", "reason": f"no tokenizer files of {mid} reachable ({where})"}
        try:
            samples = load_samples(cfg["data"], "train", project_path(cfg["paths"]["datasets_dir"]))
        except FileNotFoundError as exc:
            return {"status": "not run", "reason": str(exc)}
        texts = compat_texts(samples)
        try:
            base, ref = load_tokenizer(dirs[base_id]), load_tokenizer(dirs[ref_id])
            n = check_tokenizer_compat(base, ref, texts, base_id, ref_id)
        except ValueError as exc:  # TokenizerMismatchError, or a tokenizer that does not convert exactly
            return {"status": "mismatch", "reason": str(exc)}
    return {"status": "compatible", "texts": n, "base_vocab": int(base.vocab_size)}


def fix_command(model_id: str, entry_s3: str | None, storage: str) -> str:
    if storage == "s3":
        return f"papermill notebooks/stage_models.ipynb runs/stage.ipynb -p models '[\"{model_id}\"]' -p source hf -p dest s3"
    return f"papermill notebooks/stage_models.ipynb runs/stage.ipynb -p models '[\"{model_id}\"]' -p source s3"


def recipe_report(recipe: str, env: str, env_info: dict[str, Any], check_s3: bool, check_hub: bool,
                  n_gpus: int | None = None) -> dict[str, Any]:
    cfg = resolve_config(recipe, env)
    models_dir = project_path(cfg["paths"]["models_dir"])
    storage = cfg["storage"]["kind"]
    blockers, fixes = [], []
    models = []
    reg = load_registry()
    for mid in required_models(cfg):
        loc = locate_model(mid, models_dir, storage, check_s3, check_hub)
        models.append(loc)
        if loc["found"] is None:
            where = f"{loc['local']}" + (f" and {loc['s3']}" if storage == "s3" else "")
            blockers.append(f"{mid} not found at {where}")
            fixes.append(fix_command(mid, reg.model(mid).s3, storage))
        elif storage == "s3" and loc["found"] == "local cache":
            loc["note"] = "local cache present; training verifies it against S3"
    if not env_info["torch_ok"]:
        blockers.append(f"torch {env_info['torch']} < 2.6 cannot load .bin checkpoints safely")
        fixes.append('pip install "torch>=2.6"')
    tokenizers = None
    if cfg["weights"]["scheme"] == "rho1":
        tokenizers = tokenizer_check(cfg, models_dir, check_s3, check_hub)
        if tokenizers["status"] == "mismatch":
            blockers.append(tokenizers["reason"])
            fixes.append("choose a reference that shares the base model's tokenizer (models.reference)")
    value_trunk = cfg["weights"]["scheme"] == "critic" and cfg["critic"]["value_trunk"] == "reward_model"
    if value_trunk:
        tokenizers = tokenizer_check(cfg, models_dir, check_s3, check_hub, other="reward")
        if tokenizers["status"] == "mismatch":
            blockers.append(f"{cfg['models']['reward']} cannot be the value trunk of {cfg['models']['base']} "
                            f"(critic.value_trunk: reward_model reads the base's token ids): {tokenizers['reason']}")
            fixes.append("set critic.value_trunk: base, or a reward model with the base's tokenizer "
                         "(params/models.yaml says which: value_trunk_for)")
    n = n_gpus if n_gpus is not None else cfg["launch"]["num_processes"]
    mem = memory_estimate(cfg, models_dir, n)
    uses_gpu = cfg["train"]["mixed_precision"] == "bf16" or "fsdp" in cfg["launch"]["accelerate_config"]
    if uses_gpu:
        gpus = env_info["gpus"]
        if len(gpus) < cfg["launch"]["num_processes"]:
            blockers.append(f"needs {cfg['launch']['num_processes']} GPUs, found {len(gpus)}")
            fixes.append("run on the cluster (docker/vessl.yaml) or lower launch.num_processes")
        elif mem["total_gib"] is not None and mem["total_gib"] > 0.9 * min(g["memory_gib"] for g in gpus):
            blockers.append(f"estimated {mem['total_gib']:.1f} GiB per GPU exceeds 90% of "
                            f"{min(g['memory_gib'] for g in gpus)} GiB")
            fixes.append("enable train.gradient_checkpointing, lower train.micro_batch_size or data.max_length")
    if storage == "s3" and not {"AWS_ACCESS_KEY_ID", "AWS_PROFILE"} & set(env_info["credentials_present"]):
        blockers.append("no AWS credentials in the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
        fixes.append("export the AWS credentials (on VESSL: the secrets named in docker/vessl.yaml)")
    runs_code = cfg["weights"]["scheme"] == "critic" and cfg["critic"]["reward_source"] == "execution"
    if runs_code and not env_info["sandbox"]["strong"] and not cfg["allow_weak_sandbox"]:
        blockers.append(f"execution rewards need a sandbox with filesystem and network isolation; this machine "
                        f"offers {env_info['sandbox']['level']!r}")
        fixes.append("run on a node with Landlock and seccomp (docs/cluster.md) or set allow_weak_sandbox: true")
    return {"recipe": recipe, "env": env, "models": models, "tokenizers": tokenizers, "memory_per_device": mem,
            "num_devices": n, "runnable": not blockers, "blockers": blockers, "fixes": fixes}


def run_preflight(env: str = "local", recipes: tuple[str, ...] = RECIPES, check_s3: bool | None = None,
                  check_hub: bool = False, out: str | Path | None = None, write: bool = True) -> dict[str, Any]:
    """The whole report for one environment, written as JSON (unless ``write=False``) to ``out``.

    ``out`` defaults to ``<the environment's runs_dir>/preflight.json``; a relative ``out`` is taken from the
    project root like every path in ``params/``, so the file does not land wherever the kernel was started.
    The path written is ``report["written_to"]``.
    """
    from wmtp_lib.config import as_list

    recipes = tuple(as_list(recipes, "recipes"))
    cfg0 = resolve_config(recipes[0], env)
    models_dir = project_path(cfg0["paths"]["models_dir"])
    env_info = environment_report(models_dir)
    if check_s3 is None:
        check_s3 = cfg0["storage"]["kind"] == "s3"
    report = {"env": env, "environment": env_info,
              "recipes": [recipe_report(r, env, env_info, check_s3, check_hub) for r in recipes]}
    if write:
        path = project_path(out) if out is not None else project_path(cfg0["paths"]["runs_dir"]) / "preflight.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        report["written_to"] = str(path)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


def _tokenizer_verdict(check: dict[str, Any] | None) -> str:
    if check is None:
        return "-"
    if check["status"] == "compatible":
        return f"compatible ({check['texts']} texts)"
    return f"{check['status']}: {check['reason']}"[:160]


def verdict_rows(report: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for r in report["recipes"]:
        mem = r["memory_per_device"].get("total_gib")
        rows.append({
            "recipe": r["recipe"],
            "verdict": "runnable" if r["runnable"] else "blocked",
            "models": ", ".join(f"{m['id']} ({m['found'] or 'missing'})" for m in r["models"]),
            "tokenizers": _tokenizer_verdict(r.get("tokenizers")),
            "GiB/device": f"{mem:.2f}" if mem is not None else "?",
            "fix": " ; ".join(r["fixes"]),
        })
    return rows
