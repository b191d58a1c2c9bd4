"""`compress run` reports every kind of row a stage can produce: matrices left dense, grouped k/v
factorisations, dense-sparse and low-rank+sparse modules, MoE FFNs and a factorised embedding, through
report.json, report.md, the plots and the model card (`compress push --dry-run`)."""

import json

import yaml

from compress.cli import main
from compress.models import save_folder
from tests.tiny import make_tiny_llama

MIXED = {
    "name": "tiny-every-row-kind",
    "stages": [
        # o_proj is not listed: its rows stay dense (rank None); k/v are factorised per group of KV heads
        {"method": "lowrank_attention", "per_projection": {"q": 0.5, "k": 0.5, "v": 0.5}, "kv_groups": 2},
        {"method": "dsformer", "targets": [r"re:.*layers\.0\.mlp\.gate_proj$"], "reduction": 0.3, "iters": 2},
        {"method": "lost", "targets": [r"re:.*layers\.0\.mlp\.up_proj$"], "reduction": 0.3},
        {
            "method": "factorllm",
            "targets": [r"re:.*layers\.1\.mlp$"],
            "experts": 4,
            "top_k": 2,
            "partition": "contiguous",
            "router_fit": "none",
        },
        {"method": "ofa_embedding", "dim": 16},
        {"method": "finetune", "steps": 2, "batch_size": 2},
    ],
    "calibration": {"samples": 4, "seq_len": 32},
    "eval": {"tasks": ["wikipedia_ppl"], "perplexity_windows": 1, "limit": 1, "seq_len": 64, "lm_eval_max_length": 128},
}


def test_every_row_kind_reaches_the_report_plots_and_card(tmp_path, smol_tokenizer, capsys):
    folder = tmp_path / "tiny-model"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer)), smol_tokenizer, folder)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(MIXED))
    out = tmp_path / "run"
    assert main(["run", str(recipe), str(folder), "--out", str(out), "--quiet"]) == 0, capsys.readouterr().err

    report = json.loads((out / "report.json").read_text())
    rows = report["stages"][0]["rows"]
    assert {r["rank"] is None for r in rows} == {True, False}  # dense o_proj next to factorised q/k/v
    assert any(r.get("groups") == 2 for r in rows)
    assert report["figures"][0] == "ranks_stage0.png" and (out / "ranks_stage0.png").is_file()
    markdown = (out / "report.md").read_text()
    for stage in report["stages"]:
        assert f": {stage['method']}" in markdown
    assert "None" not in markdown  # missing values show as '-'

    assert main(["push", str(out), "you/tiny-mixed", "--dry-run"]) == 0
    card = capsys.readouterr().out
    for method in ("lowrank_attention", "dsformer", "lost", "factorllm", "ofa_embedding", "finetune"):
        assert f"`{method}`" in card
