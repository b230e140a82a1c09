"""tools/gpu_protocol.sh, the one script a GPU machine runs, on the CPU with a tiny real subset."""

import json
import os
import subprocess
import sys
import tarfile

from helpers import REPO, copy_real_images

TINY = {"PROTOCOL_PROFILE": "quick", "PROTOCOL_DEVICE": "cpu", "PROTOCOL_JOBS": "2", "PYTHON": sys.executable,
        "PROTOCOL_VARIANTS": "msa_net msa_net_no_se",
        "THROUGHPUT_ARGS": "--models resnet18 --batch 8 --size 64 --steps 2 --warmup 1 --concurrency 2"}
"""Two of the nine variants: tests/test_protocol.py runs them all; this test is about the script."""


def run_script(tmp_path, data, minutes="5") -> subprocess.CompletedProcess:
    (tmp_path / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, **TINY, "PROTOCOL_DATA": str(data), "TMPDIR": str(tmp_path / "tmp")}
    return subprocess.run([str(REPO / "tools" / "gpu_protocol.sh"), str(tmp_path / "out"), minutes], env=env,
                          capture_output=True, text=True, timeout=900)


def test_gpu_protocol_script_writes_throughput_and_the_whole_report_to_few_files(kneekl224, tmp_path):
    copy_real_images(kneekl224, tmp_path / "data" / "train", 12, split="train")
    copy_real_images(kneekl224, tmp_path / "data" / "val", 4, split="val")
    result = run_script(tmp_path, tmp_path / "data")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == ["machine.txt", "protocol.log", "protocol.tar.gz", "report.md", "results.json", "throughput.json",
                     "throughput.txt"]  # the device tool returns at most 8 files
    throughput = json.loads((out / "throughput.json").read_text())["models"]["resnet18"]
    assert throughput["klgrade"] > 0 and throughput["bare"] > 0 and throughput["concurrent"]["2"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["unfinished"] == [] and list(results["variants"]) == ["msa_net", "msa_net -se"]
    assert results["jobs"] == 2 and all(v["train_s"] > 0 for v in results["variants"].values())
    assert "2 fold training(s) at once" in (out / "report.md").read_text()
    with tarfile.open(out / "protocol.tar.gz") as archive:
        names = archive.getnames()
    assert "figures/folds.png" in names and "runs/msa_net_no_se/fold1/timing.json" in names
    assert "differences.csv" in names and "results.csv" in names  # the ablation against msa_net, with its interval
    assert not any(name.startswith("runs/resnet18/") for name in names)
    assert not list((tmp_path / "tmp").iterdir())  # the work folder (checkpoints, image cache) is gone


def test_gpu_protocol_script_names_missing_data(tmp_path):
    result = run_script(tmp_path, tmp_path / "nowhere")
    assert result.returncode == 2 and "nowhere: no such data folder" in result.stderr
