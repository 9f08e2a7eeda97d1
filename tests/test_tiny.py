"""The embedded default's base: pretrained with the multi-token objective on clean training-split text of
another corpus seed (never a test-split constant), deterministically, and then converted from Meta's layout."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from test_layers import package_imports

from wmtp_lib.checkpoints import tiny, tiny_builds
from wmtp_lib.data.synthetic import (
    _FAMILIES,
    CONST_RANGE,
    is_test_constant,
    synthetic_tasks,
)


def test_pretraining_corpus_is_clean_train_split_text_of_its_own_seed():
    corpus = tiny.pretraining_corpus(0)
    assert len(corpus) == tiny.PRETRAIN["n_tasks"] and not any(s.noisy for s in corpus)
    # no task statement of the test split (its constants are the multiples of 7) occurs in the corpus
    test_statements = {fam[0].format(c=c) for fam in _FAMILIES for c in CONST_RANGE if is_test_constant(c)}
    assert not [s.id for s in corpus if any(t in s.prompt for t in test_statements)]
    assert all(s.id.startswith("synthetic/train/") for s in corpus)
    # another seed than the tokenizer's (seed), the reference's (seed + 1) and the reward model's (seed + 2)
    for other in (0, 1, 2):
        assert [s.prompt for s in corpus] != [s.prompt for s in synthetic_tasks(len(corpus), "train", other)]


def test_the_base_is_pretrained_deterministically_and_staged_through_the_converter(tmp_path):
    logs: list[str] = []
    # "a" builds the base in a second process beside the reward model (as a first run does), "b" alone
    a = tiny.stage_tiny(tmp_path / "a", ids=("tiny-mtp", "tiny-rm"), log=logs.append, base_steps=3,
                        rm_steps=6)["tiny-mtp"]
    b = tiny.stage_tiny(tmp_path / "b", ids=("tiny-mtp",), log=lambda m: None, base_steps=3)["tiny-mtp"]
    # the reward model built alone on two threads equals the one built on one thread beside the base
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rm_alone = tiny.stage_tiny(tmp_path / "b", ids=("tiny-rm",), log=lambda m: None, rm_steps=6)["tiny-rm"]
    finally:
        torch.set_num_threads(threads)
    ra, rb = (load_file(str(d / "model.safetensors")) for d in (tmp_path / "a" / "tiny-rm", rm_alone))
    assert ra.keys() == rb.keys() and all(torch.equal(ra[k], rb[k]) for k in ra)
    r = tiny.stage_tiny(tmp_path / "r", ids=("tiny-mtp",), log=lambda m: None, base_steps=0)["tiny-mtp"]
    wa, wb, wr = (load_file(str(d / "model.safetensors")) for d in (a, b, r))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any(not torch.equal(wa[k], wr[k]) for k in wa), "pretraining left the weights random"
    assert any("pretraining step 2" in m for m in logs) and any("second process" in m for m in logs)
    manifest = json.loads((a / "manifest.json").read_text())
    assert manifest["source_format"] == "meta", manifest  # converted from Meta's layout every time


def test_the_build_id_covers_every_module_the_builder_imports():
    """A tiny model is rebuilt when any code that computes it changes: every package module the builder imports,
    directly or not, is hashed into its build id (the import graph is read from the source)."""
    graph = package_imports()
    seen, todo = set(), ["wmtp_lib.checkpoints.tiny"]
    while todo:
        module = todo.pop()
        if module not in seen:
            seen.add(module)
            todo.extend(graph.get(module, ()))
    assert seen == {"wmtp_lib." + m for m in tiny_builds.BUILD_MODULES}


def test_the_staged_models_are_current_and_a_changed_build_makes_one_stale(tiny_models, tmp_path, monkeypatch):
    assert tiny_builds.stale_or_missing(tiny_models, tiny_builds.TINY_IDS) == []
    before = tiny_builds.tiny_build_id("tiny-ref", 0, tiny_builds.REF_STEPS)
    monkeypatch.setattr(tiny_builds, "BUILD_LIBRARIES", tiny_builds.BUILD_LIBRARIES[:-1])
    assert tiny_builds.tiny_build_id("tiny-ref", 0, tiny_builds.REF_STEPS) != before, "library versions hashed"
