"""A checkpoint read one decoder layer at a time scores exactly as the loaded model does, and never holds
more than one layer of it."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import compress
from compress.errors import CompressError
from compress.eval.perplexity import perplexity
from compress.eval.streamed import streamed_perplexity
from compress.streaming import StreamedModel
from tests.recipes.test_shipped_recipes import tiny_gemma3
from tests.tiny import kill_after_layers, make_tiny_llama

LOWRANK = {"method": "lowrank", "reduction": 0.4, "backend": "whiten"}


def _windows(n=6, length=20, vocab=256, seed=0):
    return torch.randint(3, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _save(model, folder):
    compress.save(model, folder)
    return folder


def _in_memory(folder, windows, batch_size=4):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return perplexity(model, windows, batch_size=batch_size, progress=False)["perplexity"]


@pytest.mark.parametrize("tie", [True, False])
def test_a_dense_checkpoint_streams_to_the_same_perplexity(tmp_path, tie):
    folder = _save(make_tiny_llama(layers=3, tie=tie), tmp_path / "m")
    windows = _windows()
    streamed = streamed_perplexity(folder, windows, batch_size=4, progress=False)
    assert streamed["path"] == "streamed" and streamed["tokens"] == 6 * 19
    assert streamed["perplexity"] == _in_memory(folder, windows)


def test_a_compressed_checkpoint_streams_to_the_same_perplexity(tmp_path):
    model = compress.compress(make_tiny_llama(layers=3), [LOWRANK], calibration=_windows(8, 24), progress=False)
    folder = _save(model, tmp_path / "c")
    windows = _windows(5)
    assert streamed_perplexity(folder, windows, progress=False)["perplexity"] == _in_memory(folder, windows)


def test_gemma3_layer_kinds_and_soft_capping_stream_alike(tmp_path):
    model = tiny_gemma3(256, 64)
    model.config.final_logit_softcapping = 30.0
    folder = _save(model, tmp_path / "g")
    windows = _windows(3, 40)  # longer than the sliding window
    assert streamed_perplexity(folder, windows, batch_size=2, progress=False)["perplexity"] == pytest.approx(
        _in_memory(folder, windows, batch_size=2), rel=1e-6
    )


def test_shards_holding_layers_out_of_order(tmp_path):
    folder = _save(make_tiny_llama(layers=3, tie=False), tmp_path / "m")
    windows = _windows()
    expected = _in_memory(folder, windows)
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors, reverse=True)  # layer 2 first, the embedding last, three shards
    weight_map = {}
    for i, chunk in enumerate((names[0::3], names[1::3], names[2::3])):
        file = f"model-0000{i + 1}-of-00003.safetensors"
        save_file({n: tensors[n] for n in chunk}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(chunk, file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "compress_manifest.json").unlink(missing_ok=True)  # the files changed on purpose
    assert streamed_perplexity(folder, windows, batch_size=4, progress=False)["perplexity"] == expected


def test_only_the_parts_outside_the_layers_and_one_layer_are_ever_in_memory(tmp_path):
    folder = _save(make_tiny_llama(layers=3, tie=False), tmp_path / "m")
    stream = StreamedModel(folder)
    on_meta = lambda: {n for n, p in stream.model.named_parameters() if p.device.type == "meta"}  # noqa: E731
    every = {n for n, _ in stream.model.named_parameters()}
    assert on_meta() == every  # nothing read yet
    stream.materialise(skip_layers=True)
    assert on_meta() == {n for n in every if n.startswith("model.layers.")}
    stream.materialise("model.layers.1")
    assert on_meta() == {n for n in every if n.startswith(("model.layers.0.", "model.layers.2."))}
    stream.release("model.layers.1")
    assert on_meta() == {n for n in every if n.startswith("model.layers.")}


def test_a_missing_tensor_is_named(tmp_path):
    folder = _save(make_tiny_llama(layers=2, tie=False), tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CompressError, match="model.layers.1.mlp.down_proj.weight is not in its shards"):
        streamed_perplexity(folder, _windows(), progress=False)


def test_compress_eval_streamed_matches_the_in_memory_run(tmp_path, smol_tokenizer):
    from compress.cli import main
    from compress.models import save_folder

    folder = tmp_path / "m"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer), layers=3), smol_tokenizer, folder)
    args = ["eval", str(folder), "--tasks", "--windows", "2", "--seq-len", "64", "--quiet"]
    assert main([*args, "--json", str(tmp_path / "a.json")]) == 0
    assert main([*args, "--streamed", "--json", str(tmp_path / "b.json")]) == 0
    loaded, streamed = (json.loads((tmp_path / f).read_text())["perplexity"] for f in ("a.json", "b.json"))
    assert (loaded["path"], streamed["path"]) == ("in memory", "streamed")
    assert streamed["perplexity"] == loaded["perplexity"]

    # lm-eval tasks on the checkpoint placed by accelerate: 5 MiB of its 13 MB in memory, the rest read from disk
    tasks = ["--tasks", "wikipedia_lastword", "--limit", "6", "--windows", "1", "--seq-len", "64", "--quiet"]
    assert main(["eval", str(folder), *tasks, "--json", str(tmp_path / "c.json")]) == 0
    offloaded = [*tasks, "--streamed", "--max-memory", str(5 / 1024), "--json", str(tmp_path / "d.json")]
    assert main(["eval", str(folder), *offloaded]) == 0
    loaded, streamed = (json.loads((tmp_path / f).read_text()) for f in ("c.json", "d.json"))
    assert streamed["lm_eval"] == loaded["lm_eval"] and "placement" not in loaded
    assert streamed["placement"].get("disk", 0) > 0


STREAMED_STAGES = {
    "whitening, sub-layer": {
        "method": "lowrank",
        "reduction": 0.3,
        "backend": "whiten_dense_target",
        "sequential": True,
        "sublayer": True,
    },
    "layer 0 only": {
        "method": "lowrank",
        "targets": [r"re:.*layers\.0\..*_proj$"],
        "reduction": 0.3,
        "backend": "whiten",
    },
    "data-free": {"method": "lowrank", "reduction": 0.3, "backend": "svd"},
    "sensitivity, elastic": {
        "method": "lowrank",
        "reduction": 0.3,
        "backend": "whiten_dense_target",
        "sublayer": True,
        "allocation": "sensitivity",
        "sensitivity_windows": 4,
        "calibration_batch_size": 2,
        "elastic": {"min_reduction": 0.1, "max_reduction": 0.5},
    },
}


@pytest.mark.parametrize("stage", list(STREAMED_STAGES))
def test_compress_run_streams_a_streamable_recipe_to_the_in_memory_checkpoint(tmp_path, smol_tokenizer, stage):
    import yaml

    from compress.cli import main
    from compress.models import save_folder

    source = tmp_path / "src"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer), layers=3, tie=True), smol_tokenizer, source)
    recipe = {
        "name": "streamed",
        "stages": [STREAMED_STAGES[stage]],
        "calibration": {"samples": 6, "seq_len": 32},
        "eval": {"tasks": [], "perplexity_windows": 2, "seq_len": 64},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml"), str(source), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["path"] == "streamed"
    assert report["eval_compressed"]["perplexity"]["path"] == report["eval_dense"]["perplexity"]["path"] == "streamed"

    in_memory = compress.compress(str(source), recipe, progress=False)
    compress.save(in_memory, tmp_path / "mem")
    streamed = {}
    for shard in (tmp_path / "run" / "model").glob("*.safetensors"):
        streamed.update(load_file(shard))
    expected = load_file(tmp_path / "mem" / "model.safetensors")
    assert streamed.keys() == expected.keys()
    assert all(torch.equal(streamed[k], expected[k]) for k in expected)  # bit-identical checkpoints
    if stage == "layer 0 only":  # the CLI's opt-out loads the model whole, to the same checkpoint
        run = ["run", str(tmp_path / "r.yaml"), str(source), "--out", str(tmp_path / "whole"), "--in-memory"]
        assert main([*run, "--quiet"]) == 0
        assert json.loads((tmp_path / "whole" / "report.json").read_text())["path"] == "in memory"
        whole = load_file(tmp_path / "whole" / "model" / "model.safetensors")
        assert all(torch.equal(streamed[k], whole[k]) for k in whole) and whole.keys() == streamed.keys()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    ids = _windows(2, 16, vocab=len(smol_tokenizer))
    assert torch.equal(reloaded(ids).logits, in_memory(ids).logits)


def _streamed_and_whole(tmp_path, tie: bool):
    """A tiny model saved, opened streamed (nothing of its layers read) and loaded whole; the module names whose
    sensitivities are compared, and 5 windows of 24 tokens."""
    folder = _save(make_tiny_llama(layers=3, tie=tie), tmp_path / "m")
    stream = StreamedModel(folder)
    stream.materialise(skip_layers=True)
    whole = AutoModelForCausalLM.from_pretrained(folder).eval()
    names = [n for n, m in whole.named_modules() if n.endswith(("q_proj", "o_proj", "down_proj"))]
    return stream, whole, names, _windows(5, 24)


@pytest.mark.parametrize("chunk", [None, 7], ids=["one-chunk", "chunked-tail"])
def test_streamed_output_sensitivities_equal_the_whole_model_ones(tmp_path, monkeypatch, chunk):
    from compress import activations
    from compress.activations import output_fisher, sensitivity_walk
    from compress.streaming import ReadLayers

    if chunk is not None:  # the head's loss over 7 tokens at a time instead of a batch's 46
        monkeypatch.setattr(activations, "TAIL_CHUNK_TOKENS", chunk)

    stream, whole, names, windows = _streamed_and_whole(tmp_path, tie=True)
    expected = output_fisher(whole, {n: whole.get_submodule(n) for n in names}, windows, batch_size=2)
    modules = {n: stream.model.get_submodule(n) for n in names}
    streamed = {}
    sensitivity_walk(stream.model, modules, windows, ReadLayers(stream), lambda i, local, stats, f: streamed.update(f))
    if chunk is None:
        assert all(torch.equal(streamed[n], expected[n]) for n in names)
    else:  # other matrix shapes in the head: equal up to rounding
        assert all(torch.allclose(streamed[n], expected[n], rtol=1e-5, atol=0) for n in names)
    assert all(p.device.type == "meta" for n, p in stream.model.named_parameters() if ".layers." in n)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_under_autocast_a_streamed_tail_holds_its_head_in_that_dtype_and_no_embedding(tmp_path, tie):
    """The tail of a streamed model's sensitivity pass holds its head in the autocast dtype and no embedding (the
    copy autocast would make of a float32 head): the sensitivities of the model held whole, bit for bit."""
    from compress.activations import ResidentLayers, sensitivity_walk
    from compress.streaming import ReadLayers

    stream, whole, names, windows = _streamed_and_whole(tmp_path, tie)
    seen = []
    embedding, head = stream.model.get_input_embeddings(), stream.model.get_output_embeddings()
    head.register_forward_pre_hook(lambda m, a: seen.append((m.weight.dtype, embedding.weight.device.type)))
    results = {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for key, model, store in (("whole", whole, ResidentLayers()), ("streamed", stream.model, ReadLayers(stream))):
            modules = {n: model.get_submodule(n) for n in names}
            sensitivity_walk(
                model, modules, windows, store, lambda i, local, s, f, key=key: results.setdefault(key, {}).update(f)
            )
    assert all(torch.equal(results["streamed"][n], results["whole"][n]) for n in names)
    assert seen and all(dtype == torch.bfloat16 and place == "meta" for dtype, place in seen)
    assert head.weight.dtype == torch.float32 and head.weight.device.type == "cpu"  # read again whole after
    assert (head.weight is embedding.weight) == tie


def test_the_sensitivity_walk_measures_input_statistics_and_sensitivities_in_one_pass(tmp_path):
    from compress.activations import ResidentLayers, calibrate_sequentially, output_fisher, sensitivity_walk

    model = make_tiny_llama(layers=3, tie=True).eval()
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "k_proj", "o_proj", "down_proj"))]
    names = [n for n in names if ".layers.0." not in n or n.endswith("down_proj")]
    modules = {n: model.get_submodule(n) for n in names}
    windows = _windows(5, 24)
    walked, fishers, order = {}, {}, []

    def on_walk(index, local, stats, fisher):
        order.append(index)
        walked.update(stats)
        fishers.update(fisher)

    sensitivity_walk(model, modules, windows, ResidentLayers(), on_walk, batch_size=2, statistics=True)
    assert order == [2, 1, 0]  # from the top, down to the lowest layer with a targeted module
    expected = {}
    calibrate_sequentially(
        model, modules, windows, lambda i, local, stats: expected.update(stats), sequential=False, batch_size=2
    )
    assert walked.keys() == expected.keys() == fishers.keys() == set(names)
    for name in names:  # the same inputs, the same batches: the same statistics
        assert torch.equal(walked[name]["cov"], expected[name]["cov"])
        assert torch.equal(walked[name]["abs_mean"], expected[name]["abs_mean"])
        assert walked[name]["tokens"] == expected[name]["tokens"] == 5 * 24
    assert walked[names[1]] is walked[names[2]]  # q and k share one input: one accumulator
    whole = output_fisher(model, modules, windows, batch_size=2)
    assert all(torch.equal(fishers[n], whole[n]) for n in names)


def test_a_killed_streamed_run_resumes_to_the_same_checkpoint(tmp_path, smol_tokenizer):
    import os
    import subprocess
    import sys

    import yaml

    from compress.cli import main
    from compress.models import save_folder

    source = tmp_path / "src"
    model = make_tiny_llama(vocab_size=len(smol_tokenizer), hidden=256, intermediate=768, layers=8, tie=True)
    save_folder(model, smol_tokenizer, source)
    recipe = {
        "name": "resumable",
        "stages": [STREAMED_STAGES["whitening, sub-layer"]],
        "calibration": {"samples": 16, "seq_len": 64},
        "eval": {"tasks": [], "perplexity_windows": 1, "seq_len": 64},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    # the killed run holds its hidden states on disk (the whole run: in memory): its saved streams come back
    # into files, and the result is the same either way
    on_disk = {**recipe, "calibration": {**recipe["calibration"], "activation_storage": "disk"}}
    (tmp_path / "disk.yaml").write_text(yaml.safe_dump(on_disk))
    # Every run is a process with the same thread count: a float sum split over another number of threads
    # rounds differently, and the checkpoints are compared bit for bit.
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TMPDIR=str(tmp_path))
    cli = [sys.executable, "-m", "compress", "run", str(tmp_path / "r.yaml"), str(source), "--quiet"]
    subprocess.run([*cli, "--out", str(tmp_path / "whole")], env=env, check=True)

    out = tmp_path / "killed"
    cli[4] = str(tmp_path / "disk.yaml")
    done = kill_after_layers(cli, out, 2, env=env)
    assert 2 <= done < 8 and not out.exists()

    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**on_disk, "calibration": {"samples": 12, "seq_len": 64}}))
    assert main(["run", str(other), str(source), "--quiet", "--out", str(out), "--resume"]) == 2  # another recipe

    subprocess.run([*cli, "--out", str(out), "--resume"], env=env, check=True)
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["summary"]["calibration"]["layers"] == 8 - done  # only the unfinished layers ran
    assert report["stages"][0]["summary"]["calibration"]["activations"] == "disk"
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert [r["rank"] for r in report["stages"][0]["rows"]] == [r["rank"] for r in whole["stages"][0]["rows"]]
    tensors = {}
    for name in ("whole", "killed"):
        tensors[name] = {}
        for shard in (tmp_path / name / "model").glob("*.safetensors"):
            tensors[name].update(load_file(shard))
    assert tensors["killed"].keys() == tensors["whole"].keys()
    assert all(torch.equal(tensors["killed"][k], tensors["whole"][k]) for k in tensors["whole"])
    assert not (tmp_path / ".killed.partial").exists()


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_a_saved_stream_is_read_back_as_each_process_share_in_its_batches(tmp_path, monkeypatch, processes):
    from compress import distributed
    from compress.streaming import _share_in_batches

    windows = torch.arange(11.0)[:, None, None].expand(11, 4, 3).contiguous()  # window i holds i
    chunks = []
    for b, chunk in enumerate(windows.split([4, 4, 3])):  # consecutive windows, as a run with batches of 4 saved
        torch.save(chunk.clone(), tmp_path / f"{b}.pt")
        chunks.append(f"{b}.pt")
    monkeypatch.setattr(distributed, "world_size", lambda: processes)
    for rank in range(processes):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        share = list(range(rank, 11, processes))  # shard(): every processes-th window from the rank
        sizes = [len(part) for part in torch.tensor(share).split(2)]
        like = torch.zeros(1, dtype=torch.bfloat16)
        batches = list(_share_in_batches(tmp_path, chunks, sizes, like))
        assert [len(batch) for batch in batches] == sizes and all(b.dtype == torch.bfloat16 for b in batches)
        assert torch.cat(batches)[:, 0, 0].tolist() == share
