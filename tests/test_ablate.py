"""The ablation runner: every (arm, seed) runs once in its own directory, a killed grid continues without redoing
finished runs, shards split a grid across processes, and the summary is the mean and standard error over seeds."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from experiments import ablate

REPO = Path(__file__).resolve().parents[1]

# A study whose measurement is a pure function of (arm, seed): noisy curves with a known mean per arm.
TOY_STUDY = textwrap.dedent('''
    import numpy as np
    from experiments.ablate import Study

    OFFSET = {"low": 0.0, "high": 1.0, "higher": 2.0}

    def measure(run):
        rng = np.random.default_rng(run.seed)
        level = OFFSET[run.overrides[0].partition("=")[2]]
        return [{"step": step, "score": level + step / 100 + float(rng.normal(0, 0.1))} for step in (100, 200)]

    def get_study():
        return Study(name="toy", arms={name: (f"level={name}",) for name in OFFSET}, seeds=(0, 1, 2),
                     run=measure, x="step", metrics=("score",))
''')


class Killed(Exception):
    pass


@pytest.fixture
def study_file(tmp_path) -> Path:
    path = tmp_path / "toy_study.py"
    path.write_text(TOY_STUDY)
    return path


def test_summary_is_the_mean_and_standard_error_over_seeds(study_file, tmp_path):
    study = ablate.load_study(study_file)
    ablate.run_grid(study, tmp_path / "grid", log=lambda text: None)
    summary = ablate.write_summary(study, tmp_path / "grid")
    seeds = [study.run(ablate.Run("high", s, ("level=high",), tmp_path))[1]["score"] for s in study.seeds]
    point = summary["arms"]["high"]["score"][1]
    assert point["step"] == 200 and point["seeds"] == 3
    assert point["mean"] == pytest.approx(np.mean(seeds))
    assert point["error"] == pytest.approx(np.std(seeds, ddof=1) / np.sqrt(3))
    assert summary["runs_finished"] == summary["runs"] == 9
    table = (tmp_path / "grid" / "summary.md").read_text()
    assert "| high | " in table and f"{np.mean(seeds):.4g} ± " in table
    assert (tmp_path / "grid" / "summary.png").stat().st_size > 0
    run = json.loads((tmp_path / "grid" / "low" / "seed_2" / "run.json").read_text())
    assert run["overrides"] == ["level=low"] and run["seed"] == 2 and run["git_revision"]


def test_a_killed_grid_continues_without_redoing_finished_runs(study_file, tmp_path):
    study = ablate.load_study(study_file)
    calls, deaths = [], []

    def dies_on_the_fourth_run(run):
        calls.append((run.arm, run.seed))
        if len(calls) == 4 and not deaths:
            deaths.append(run)
            raise Killed  # as if the process died mid-run
        return study.run(run)

    killed = ablate.Study(**{**vars(study), "run": dies_on_the_fourth_run})
    with pytest.raises(Killed):
        ablate.run_grid(killed, tmp_path / "grid", log=lambda text: None)
    assert not (tmp_path / "grid" / "high" / "seed_0" / "result.json").exists()  # the interrupted run
    calls.clear()
    ablate.run_grid(killed, tmp_path / "grid", log=lambda text: None)
    assert calls == [(arm, seed) for arm, seed in study.pairs()][3:]
    assert ablate.summarise(study, tmp_path / "grid") == _single_process_summary(study, tmp_path)


def _single_process_summary(study, tmp_path):
    ablate.run_grid(study, tmp_path / "single", log=lambda text: None)
    return ablate.summarise(study, tmp_path / "single")


def test_two_shard_processes_give_the_single_process_summary(study_file, tmp_path):
    command = [sys.executable, "-m", "experiments.ablate", str(study_file), "--out", str(tmp_path / "sharded")]
    shards = [subprocess.Popen([*command, "--shard", f"{i}/2"], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = [shard.communicate(timeout=300)[0] for shard in shards]
    assert [shard.returncode for shard in shards] == [0, 0], outputs
    ran = [{line.split(":")[0] for line in out.splitlines() if "running in" in line} for out in outputs]
    assert ran[0].isdisjoint(ran[1]) and len(ran[0] | ran[1]) == 9
    assert ablate.main([str(study_file), "--out", str(tmp_path / "sharded"), "--summarise"]) == 0
    study = ablate.load_study(study_file)
    merged = json.loads((tmp_path / "sharded" / "summary.json").read_text())
    assert merged == json.loads(json.dumps(_single_process_summary(study, tmp_path)))


def test_bad_shard_and_study_files_are_refused_with_the_reason(tmp_path):
    with pytest.raises(Exception, match="i must be in 0..n-1"):
        ablate.parse_shard("2/2")
    with pytest.raises(SystemExit, match="does not exist"):
        ablate.load_study(tmp_path / "missing.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(SystemExit, match="defines no get_study"):
        ablate.load_study(tmp_path / "empty.py")
