"""Where the layer walk holds its hidden states (compress.offload): the same model whatever the place."""

import json

import pytest
import torch
from safetensors.torch import load_file

import compress
from compress.offload import Activations, OffloadedList, choose_place
from tests.core.test_streaming import STREAMED_STAGES
from tests.tiny import make_tiny_llama

# every kind of per-batch list the walk keeps: two streams (dense target), sub-layer passes (kept inputs,
# recorded block outputs), elastic variants' streams, and layer-local training's targets
STAGES = {
    "sub-layer, elastic": STREAMED_STAGES["sensitivity, elastic"],
    "layer training": {
        "method": "lowrank",
        "reduction": 0.3,
        "backend": "whiten",
        "calibration_batch_size": 2,
        "train": {"steps": 3, "scope": "layer", "lr": 1e-3, "batch_size": 2},
    },
}


def stage_recipe(stage: dict, **calibration) -> dict:
    """One stage on 6 windows of 32 tokens, no evaluation; ``calibration``: further calibration fields."""
    return {
        "name": "offload",
        "stages": [stage],
        "calibration": {"samples": 6, "seq_len": 32, **calibration},
        "eval": {"tasks": []},
    }


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_placement_gives_the_same_model(stage, smol_tokenizer):
    vocab = len(smol_tokenizer)
    results = {}
    for storage in ("device", "cpu", "disk"):
        torch.manual_seed(0)
        model = make_tiny_llama(vocab_size=vocab, layers=3, tie=True)
        compressed = compress.compress(
            model, stage_recipe(STAGES[stage], activation_storage=storage), tokenizer=smol_tokenizer, progress=False
        )
        summary = compressed.compression.stages[0].summary
        assert summary["calibration"]["activations"] == storage
        results[storage] = compressed.state_dict()
    for storage in ("cpu", "disk"):
        assert results[storage].keys() == results["device"].keys()
        assert all(torch.equal(results[storage][k], results["device"][k]) for k in results["device"]), storage


def test_compress_run_on_disk_streams_to_the_in_memory_checkpoint(tmp_path, smol_tokenizer, monkeypatch):
    """Through the CLI, streamed: the walk's lists live in files under TMPDIR while it runs, and are gone after."""
    import tempfile

    import yaml

    from compress import offload
    from compress.cli import main
    from compress.models import save_folder

    source = tmp_path / "src"
    save_folder(make_tiny_llama(vocab_size=len(smol_tokenizer), layers=3, tie=True), smol_tokenizer, source)
    spill = tmp_path / "tmp"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    seen = []
    save = offload._File.__init__

    def counting(self, pool, tensor):  # the files that exist while the walk writes one more
        seen.append(len(list(pool.folder.iterdir())))
        save(self, pool, tensor)

    monkeypatch.setattr(offload._File, "__init__", counting)
    recipe = stage_recipe(STAGES["sub-layer, elastic"], activation_storage="disk")
    recipe["eval"] = {"tasks": [], "perplexity_windows": 2, "seq_len": 64}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml"), str(source), "--out", str(tmp_path / "run"), "--quiet"]) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["path"] == "streamed"
    assert report["stages"][0]["summary"]["calibration"]["activations"] == "disk"
    assert report["timing"]["large_allocations_mapped"]  # memory is what the walk saves: freed blocks leave
    assert seen and max(seen) > 0  # held in files ...
    assert not any(spill.iterdir())  # ... and none left behind

    in_memory = compress.compress(str(source), {**recipe, "calibration": {"samples": 6, "seq_len": 32}}, progress=False)
    assert in_memory.compression.stages[0].summary["calibration"]["activations"] == "device"  # auto, small
    expected = in_memory.state_dict()
    written = {}
    for shard in (tmp_path / "run" / "model").glob("*.safetensors"):
        written.update(load_file(shard))
    assert all(torch.equal(written[k], expected[k].to(written[k].dtype)) for k in written)


def test_an_offloaded_list_keeps_its_items_in_files_and_reuses_a_freed_items_file(tmp_path):
    items = [torch.randn(2, 3, 4) for _ in range(3)]
    with Activations("disk", folder=tmp_path) as held:
        stream = held.new(items)
        assert isinstance(stream, OffloadedList) and len(stream) == 3
        (folder,) = tmp_path.iterdir()
        assert len(list(folder.iterdir())) == 3
        assert all(torch.equal(a, b) for a, b in zip(stream, items))
        copy = held.new(stream)  # shares the files
        assert len(list(folder.iterdir())) == 3
        stream[1] = None  # as record_from_inputs drops an input once used
        assert stream[1] is None and torch.equal(copy[1], items[1])
        del copy  # items[1]'s file is free now: the next item is written over it
        smaller = torch.arange(5, dtype=torch.bfloat16)  # another size and dtype: the file is cut to its bytes
        stream[1] = smaller
        assert len(list(folder.iterdir())) == 3 and torch.equal(stream[1], smaller)
        assert stream[1].dtype == torch.bfloat16 and torch.equal(stream[0], items[0])
        other = held.new(items)
        stream[:] = other  # a list of the same placement shares its files, written once
        assert len(stream) == 3 and len(list(folder.iterdir())) == 6
        assert all(torch.equal(a, b) for a, b in zip(stream, items))
        del other
        held_tuple = held.hold((items[2], None))  # written over a freed file: no seventh
        assert torch.equal(held.load(held_tuple)[0], items[2]) and held.load(held_tuple)[1] is None
        assert len(list(folder.iterdir())) == 6
        scalar = held.hold(torch.tensor(3.5))
        assert held.load(scalar).shape == () and held.load(scalar).item() == 3.5
    assert not any(tmp_path.iterdir())


def test_auto_placement_follows_free_memory(monkeypatch):
    from compress import offload

    monkeypatch.setattr(offload, "_free_host_bytes", lambda: 16 * 2**30)
    cpu = torch.device("cpu")
    assert choose_place("auto", 2**30, cpu) == "device"  # 8 GiB of lists in half of 16 GiB
    assert choose_place("auto", 2**30 + 1, cpu) == "disk"
    assert choose_place("cpu", 2**40, cpu) == "cpu"
    with pytest.raises(ValueError, match="unknown activation placement"):
        Activations("gpu")
