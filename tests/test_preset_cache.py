"""Issue 13: a fresh preset cache built by several ranks at once holds every weight, whichever rank builds it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from peftlab.errors import PeftlabError
from peftlab.models import presets

# Two ranks of one gloo process group on a fresh cache. Rank 1 builds first, alone (under a process group,
# transformers writes weights on global rank 0 only: this built a folder without weights that every rank then
# reused); then both ranks call at once. Each prints the sum of the weights it loaded from the cache.
RANK = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from peftlab.models.presets import preset_checkpoint
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if rank == 1:
        preset_checkpoint("tiny-gemma2", torch.float32)
    dist.barrier()
    folder = preset_checkpoint("tiny-gemma2", torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True)
    print("SUM", rank, float(sum(p.detach().double().sum() for p in model.parameters())))
""")


def test_a_preset_built_by_rank_1_of_a_process_group_holds_its_weights(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    env = {**os.environ, "PEFTLAB_CACHE": str(cache), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK], env={**env, "RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    sums = {line.split()[1]: float(line.split()[2]) for o in outputs for line in o.splitlines() if line.startswith("SUM")}
    assert set(sums) == {"0", "1"} and sums["0"] == sums["1"]
    # the same weights as a preset built with no process group at all
    os.environ["PEFTLAB_CACHE"], saved = str(tmp_path / "alone"), os.environ.get("PEFTLAB_CACHE")
    try:
        import torch
        from transformers import AutoModelForCausalLM

        alone = AutoModelForCausalLM.from_pretrained(presets.preset_checkpoint("tiny-gemma2", torch.float32))
        assert float(sum(p.detach().double().sum() for p in alone.parameters())) == pytest.approx(sums["0"], rel=1e-12)
    finally:
        os.environ.pop("PEFTLAB_CACHE") if saved is None else os.environ.__setitem__("PEFTLAB_CACHE", saved)
    built = sorted(p.name for p in (cache / "presets").iterdir() if not p.name.endswith(".lock"))
    assert len(built) == 1 and not built[0].startswith("."), built  # no temporary folder left behind


# Two processes building one folder at the same moment: one writes (slowly), the other waits and reuses it.
BUILDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from peftlab.models.presets import build_once
    folder, go = Path(sys.argv[1]), Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.001)
    def write(tmp):
        (tmp / "config.json").write_text(str(os.getpid()))
        time.sleep(0.5)  # a slow save: the other builder must wait, not see half a folder
        (tmp / "model.safetensors").write_text("w")
        with open(folder.parent / "writers.txt", "a") as fh:
            fh.write(f"{os.getpid()}\\n")
    print(build_once(folder, write, complete=("config.json", "model.safetensors")))
    print("READ", (folder / "config.json").read_text(), sorted(p.name for p in folder.iterdir()))
""")


def test_two_processes_building_one_preset_at_once_write_it_once(tmp_path: Path) -> None:
    folder, go = tmp_path / "cache" / "p", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(folder), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    go.touch()
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    writers = (folder.parent / "writers.txt").read_text().split()
    assert len(writers) == 1  # the second builder waited for the lock and reused the first one's folder
    reads = [line for o in outputs for line in o.splitlines() if line.startswith("READ")]
    assert reads == [f"READ {writers[0]} ['config.json', 'model.safetensors']"] * 2


def test_an_incomplete_cached_folder_is_rebuilt_and_an_incomplete_write_refused(tmp_path: Path) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "config.json").write_text("{}")  # what the race left: a config without weights

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_text("w")

    assert presets.build_once(folder, write, ("config.json", "model*.safetensors")) == folder
    assert (folder / "config.json").read_text() == "new" and (folder / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".p.lock", "p"]  # the stale copy is gone

    with pytest.raises(PeftlabError, match=r"not all written.*model\*\.safetensors"):
        presets.build_once(tmp_path / "q", lambda tmp: (tmp / "config.json").write_text("{}"),
                           ("config.json", "model*.safetensors"))
    assert not (tmp_path / "q").exists()
