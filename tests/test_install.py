"""The distribution and its commands: what the wheel holds, and the ``vlm-grpo-ma`` dispatcher.

The full installed-product check (wheel -> fresh venv -> the trainer under the deepspeed launcher
and a benchmark run, from another folder) is ``scripts/check_install.sh``, a step of ``.ci/run``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from vlm_grpo_ma import cli

ROOT = Path(__file__).resolve().parents[1]
#: repository folder -> where the wheel installs it
MAPPING = {
    "vlm_grpo_ma": "vlm_grpo_ma",
    "tasks": "vlm_grpo_ma/tasks",
    "prompts": "vlm_grpo_ma/prompts",
    "configs": "vlm_grpo_ma/configs",
    "benchmarks/suites": "vlm_grpo_ma/suites",
}


def _repo_files() -> list[str]:
    """The repository's files (tracked and new, nothing git ignores)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout")
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    return [f for f in out.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the repository's files (so no build/ folder is left here)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for f in _repo_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "-q", "-w", str(tmp / "dist"), str(src)],
                   check=True, capture_output=True, text=True)
    (whl,) = (tmp / "dist").glob("vlm_grpo_ma-*.whl")
    return zipfile.ZipFile(whl)


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    (path,) = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_wheel_claims_only_vlm_grpo_ma(wheel):
    assert _dist_info(wheel, "top_level.txt").split() == ["vlm_grpo_ma"]
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"vlm_grpo_ma"}


def test_wheel_ships_every_file_of_the_mapped_folders(wheel):
    """Configs (task and DeepSpeed), prompt templates, suites and their prompt files, task code:
    every file of those folders, at its installed path; nothing is left behind."""
    names = set(wheel.namelist())
    missing, shipped = [], 0
    for f in _repo_files():
        for src, dst in MAPPING.items():
            if f.startswith(src + "/") and "__pycache__" not in f:
                shipped += 1
                if dst + f[len(src):] not in names:
                    missing.append(f)
    assert not missing, f"not in the wheel: {missing}"
    assert shipped > 100  # the mapping matched the real folders
    for f in ("vlm_grpo_ma/configs/deepspeed/zero3.json", "vlm_grpo_ma/configs/affordance.tiny.yaml",
              "vlm_grpo_ma/suites/synthetic-affordance.yaml", "vlm_grpo_ma/suites/prompts/coco.txt",
              "vlm_grpo_ma/prompts/affordance.txt", "vlm_grpo_ma/__main__.py"):
        assert f in names


def test_wheel_entry_points(wheel):
    text = _dist_info(wheel, "entry_points.txt")
    assert "vlm-grpo-ma = vlm_grpo_ma.cli:main" in text
    assert "vlm-grpo-ma-train = vlm_grpo_ma.cli:train_main" in text
    for task in ("detection", "affordance", "trajectory", "vqa", "math", "code"):
        assert f"{task} = vlm_grpo_ma.tasks.{task}:" in text


def test_launcher_args_are_moved_after_the_subcommand():
    assert cli._launcher_args(["--local_rank=1", "train", "--task", "math"]) == (
        ["--local_rank=1"], ["train", "--task", "math"])
    assert cli._launcher_args(["--local_rank", "0", "bench", "list"]) == (["--local_rank", "0"], ["bench", "list"])
    assert cli._launcher_args(["train", "--local_rank=0"]) == ([], ["train", "--local_rank=0"])


def test_dispatch(monkeypatch, capsys):
    seen = []
    import vlm_grpo_ma.training.cli as train_cli

    monkeypatch.setattr(train_cli, "main", lambda argv=None: seen.append(argv) or {"evals": {}})
    assert cli.main(["--local_rank=0", "train", "--task", "math"]) == 0  # exit status 0, not the summary
    assert seen == [["--local_rank=0", "--task", "math"]]
    assert cli.train_main(["--task", "code"]) == 0 and seen[-1] == ["--task", "code"]

    assert cli.main(["--local_rank=0", "bench", "list"]) == 0
    out = capsys.readouterr().out
    assert "synthetic-affordance" in out and "where2place" in out
    assert cli.main(["--help"]) == 0 and "vlm-grpo-ma bench" in capsys.readouterr().out
    assert cli.main([]) == 2
    assert cli.main(["evaluate"]) == 2 and "unknown command 'evaluate'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "run"])  # argparse: --suite and --model are required
    assert e.value.code == 2


def test_python_dash_m(tmp_path):
    """``python -m vlm_grpo_ma`` (what ``deepspeed --module vlm_grpo_ma`` runs), from another folder."""
    r = subprocess.run([sys.executable, "-m", "vlm_grpo_ma", "bench", "list"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "synthetic-detection" in r.stdout


def test_train_config_path_resolves_to_the_shipped_file_unless_the_user_has_one(tmp_path, monkeypatch):
    from vlm_grpo_ma.training.cli import parse_train_config

    monkeypatch.chdir(tmp_path)  # no configs/ folder here: the shipped one is read
    assert parse_train_config(["--config", "configs/detection.tiny.yaml"]).data.task == "detection"
    assert parse_train_config(["--config=trajectory.tiny.yaml"]).data.task == "trajectory"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "detection.tiny.yaml").write_text("task: math\n")
    assert parse_train_config(["--config", "configs/detection.tiny.yaml"]).data.task == "math"
