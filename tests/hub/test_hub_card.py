"""The model card: metadata built with huggingface_hub, checked offline, round-tripped, readable body."""

from __future__ import annotations

import copy
import json
import math
import re

import pytest
from huggingface_hub import ModelCard, ModelCardData, metadata_load

from compress.errors import CompressError
from compress.model_card import HUB_RELATIONS, card_problems, check_card, main, read_run, render_card
from compress.report import protocol
from tests.hub.conftest import BASE_MODEL

REPO = "tester/tiny-welore"


def test_card_metadata_validates_and_round_trips(intact_run, tmp_path):
    text = render_card(intact_run, REPO)
    path = tmp_path / "README.md"
    path.write_text(text)
    meta = metadata_load(path)
    report = json.loads((intact_run / "report.json").read_text())

    assert meta["base_model"] == BASE_MODEL and meta["base_model_relation"] == "finetune" in HUB_RELATIONS
    assert meta["library_name"] == "transformers" and meta["license"] == "mit"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"compress", "welore"} <= set(meta["tags"])

    # model-index holds the compressed model's lm-eval scores (and the token perplexity), as huggingface_hub parses them
    data = ModelCardData(**meta)
    assert data.model_name == "tiny-welore"
    by_name = {(r.dataset_config, r.metric_type): r.metric_value for r in data.eval_results}
    for metric, value in report["eval_compressed"]["lm_eval"]["wikipedia_ppl"].items():
        assert math.isclose(by_name[("wikipedia_ppl", metric)], value, rel_tol=0, abs_tol=0)
    assert by_name[("token_perplexity", "perplexity")] == report["eval_compressed"]["perplexity"]["perplexity"]
    assert all(r.task_type == "text-generation" for r in data.eval_results)

    # round trip through huggingface_hub's own loader: same data, same text
    card = ModelCard.load(path)
    assert card.data.to_dict() == meta
    assert str(card) == text
    assert card_problems(text) == []


def test_card_body_has_tables_protocol_loading_code_and_exact_recipe(intact_run):
    text = render_card(intact_run, REPO, revision="exp")
    body = ModelCard(text).text
    report = json.loads((intact_run / "report.json").read_text())
    size = report["size"]
    assert body.lstrip().startswith("# tiny-welore")
    assert f"{size['params_before']:,} | {size['params_after']:,}" in body  # compression table
    assert f"{size['bytes_before']:,} | {size['bytes_after']:,}" in body
    assert "| 0 | `welore` |" in body and "reduction: 0.3" in body  # per-method settings
    assert r"(q\|k\|v\|o\|gate\|up\|down)" in body  # pipes escaped in tables
    assert "| wikipedia_ppl word_perplexity (lm-eval) |" in body  # dense vs compressed
    assert protocol(report) in body and "held-out split of the bundled wikipedia corpus" in body
    code = re.search(r"```python\n(.*?)```", body, re.S).group(1)
    assert code.startswith("import compress")
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}", revision="exp")' in code
    recipe = re.search(r"```yaml\n(.*?)```", body, re.S).group(1)
    assert recipe == (intact_run / "recipe.yaml").read_text()  # the exact recipe
    assert "![ranks_stage0](ranks_stage0.png)" in body
    # each table row has as many cells as its header (escaped pipes do not split cells)
    for block in re.findall(r"((?:^\|.*\|\n)+)", body, re.M):
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in block.splitlines()}
        assert len(widths) == 1, block


def test_card_without_hub_base_model_or_scores(intact_run):
    run = read_run(intact_run)
    run.report = copy.deepcopy(run.report)
    run.manifest = {**run.manifest, "base_model": str(intact_run)}
    run.report["source"] = {"id": str(intact_run), "kind": "folder", "base_model": str(intact_run)}
    run.report["eval_compressed"] = {"perplexity": {"perplexity": float("nan"), "windows": 1, "seq_len": 64}}
    run.report["eval_dense"] = None
    text = render_card(run, REPO)
    meta = ModelCard(text).data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta  # a local path is not a hub id
    assert "model-index" not in meta  # NaN is not reported as a score
    assert "not a Hugging Face Hub model" in text and card_problems(text) == []


@pytest.mark.parametrize(
    "edit, problem",
    [
        (("base_model_relation: finetune", "base_model_relation: pruned"), "base_model_relation 'pruned'"),
        ((f"base_model: {BASE_MODEL}", "base_model: /home/me/model"), "not a hub model id"),
        (("library_name: transformers", "library_name: compress"), "library_name"),
        (("license: mit", "license: My License"), "license"),
        (("      value: ", "      value: .nan #"), "not a finite number"),
        (("  results:", "  resultz:"), "huggingface_hub rejects the metadata"),
    ],
)
def test_offline_checks_catch_bad_metadata(intact_run, edit, problem):
    text = render_card(intact_run, REPO).replace(*edit, 1)
    problems = card_problems(text)
    assert any(problem in p for p in problems), problems
    with pytest.raises(CompressError, match="model card is invalid"):
        check_card(text)


def test_render_card_script_writes_file(intact_run, tmp_path, capsys):
    out = tmp_path / "bench" / "example_model_card.md"
    assert main([str(intact_run), "--repo-id", REPO, "-o", str(out)]) == 0
    assert out.read_text() == render_card(intact_run, REPO)
    assert main([str(tmp_path / "missing-run"), "-o", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: ")
