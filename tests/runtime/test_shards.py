"""Sharded sampling and evaluation: `ddpm-run --shard` under torchrun (2 processes on the CPU) and as 3 plain
processes, merged with `ddpm-run merge`, equals one `ddpm-run --n N` bit for bit (arr_0 and samples), for a solver
and for DDPM; shards resume on their own; bad sets of shards are refused with one line and nothing written;
`ddpm-eval nll --shard` reports join into the single run's report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from runtime.errors import DDPMError
from runtime.run.cli import main as ddpm_run
from runtime.run.shards import Shard, local_gpu, parse_shard
from runtime.sampling.schedule import DiffusionConfig

torch = pytest.importorskip("torch")

from conftest import make_random_checkpoint  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
COMMON = ["-n", 10, "--batch-size", 2, "--steps", 4, "--seed", 7, "--threads", 1, "--quiet"]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny preset at 8 x 8, T = 40, random weights: 10 images of 4 steps cost a fraction of a second."""
    return make_random_checkpoint(tmp_path_factory.mktemp("shards") / "tiny8.pt", image_size=8,
                                  diffusion=DiffusionConfig(num_timesteps=40))


def run(*args: object) -> None:
    ddpm_run([str(a) for a in args])


def refused(capsys: pytest.CaptureFixture[str], *args: object) -> str:
    """A user error of ddpm-run: exit status 2 and exactly one `error:` line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        run(*args)
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {name: f[name] for name in f.files}


def assert_same_run(merged: Path, single: Path) -> None:
    got, want = arrays(merged), arrays(single)
    assert sorted(got) == sorted(want) == ["arr_0", "samples"]
    for name in want:
        assert got[name].dtype == want[name].dtype and np.array_equal(got[name], want[name]), name


@pytest.mark.parametrize("n,batch,world", [(10, 2, 2), (10, 2, 3), (23, 4, 3), (5, 1, 8), (64, 64, 4), (7, 3, 1)])
def test_shards_take_whole_batches_every_image_once(n: int, batch: int, world: int) -> None:
    ranges = [Shard(rank, world).indices(n, batch) for rank in range(world)]
    assert [i for r in ranges for i in r] == list(range(n))  # contiguous, in rank order, each image once
    batches = np.array_split(np.arange(-(-n // batch)), world)  # numpy's split of the run's batches
    for r, own in zip(ranges, batches):
        assert len(r) == 0 or (r.start % batch == 0 and (r.stop % batch == 0 or r.stop == n))
        assert list(r) == [i for b in own for i in range(b * batch, min(b * batch + batch, n))]


@pytest.mark.parametrize("environ,want", [
    ({"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, (1, 2)),  # torchrun inside Slurm
    ({"SLURM_PROCID": "3", "SLURM_NTASKS": "8"}, (3, 8)),
    ({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (2, 4)),
    ({"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "5",
      "SLURM_ARRAY_TASK_MAX": "8"}, (2, 4)),  # --array=5-8
    ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
      "SLURM_ARRAY_TASK_MAX": "7", "SLURM_ARRAY_TASK_STEP": "2"}, (2, 4)),  # --array=1-7:2
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},
     (3, 6)),  # array task 1 of 3, each split over 2 srun tasks
])
def test_auto_reads_the_launchers_environment(environ: dict[str, str], want: tuple[int, int]) -> None:
    shard = parse_shard("auto", environ)
    assert (shard.rank, shard.world) == want


@pytest.mark.parametrize("spec,environ,message", [
    ("auto", {"LOCAL_RANK": "0"}, "found no launcher"),
    ("auto", {"RANK": "0"}, "RANK is set but WORLD_SIZE is not"),
    ("auto", {"RANK": "2", "WORLD_SIZE": "2"}, "does not lie in 0..WORLD_SIZE-1"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1",
              "SLURM_ARRAY_TASK_MAX": "9"}, "not one of an evenly spaced range"),  # --array=1,3,9
    ("auto", {"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID='x' is not a number"),
    ("2/2", {}, "needs 0 <= R < W"),
    ("1of2", {}, "is neither R/W"),
])
def test_bad_shard_specs_are_one_line_errors(spec: str, environ: dict[str, str], message: str) -> None:
    with pytest.raises(DDPMError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_shard(spec, environ)


def test_each_local_process_gets_its_own_gpu() -> None:
    assert local_gpu({"LOCAL_RANK": "3"}) == "3"
    assert local_gpu({"LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}) == "5"
    assert local_gpu({"SLURM_LOCALID": "1", "CUDA_VISIBLE_DEVICES": "2"}) is None  # srun --gpus-per-task=1
    assert local_gpu({"RANK": "1"}) is None


def torchrun(args: list[object], timeout: float = 240) -> str:
    """`torchrun --standalone --nproc_per_node 2 ddpm-run ARGS` on the CPU, from the repository root."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "runtime.run.cli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize("sampler", ["dpm++2m", "ddpm"])
def test_torchrun_shards_merge_into_the_single_run(model: Path, tmp_path: Path, capsys, sampler: str) -> None:
    run(model, *COMMON, "--sampler", sampler, "--out", tmp_path / "single.npz")
    log = torchrun([model, *COMMON, "--sampler", sampler, "--shard", "auto", "--out", tmp_path / "s.npz"])
    assert "shard 0/2: images 0..5 of 10" in log and "shard 1/2: images 6..9 of 10" in log
    shards = sorted(tmp_path.glob("s.shard*-of-2.npz"))
    with np.load(shards[1]) as f:
        assert f["indices"].tolist() == [6, 7, 8, 9] and json.loads(str(f["run_key"]))["rank"] == 1
    capsys.readouterr()
    run("merge", *shards, "--out", tmp_path / "merged.npz")
    assert "2 shards, 10 images of" in capsys.readouterr().out
    assert_same_run(tmp_path / "merged.npz", tmp_path / "single.npz")


def test_three_plain_processes_merge_into_the_single_run(model: Path, tmp_path: Path, capsys) -> None:
    args = [*COMMON, "--sampler", "sde-dpm++2m", "--out"]
    run(model, *args, tmp_path / "single.npz")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-m", "runtime.run.cli", str(model), *map(str, args),
                               str(tmp_path / "s.npz"), "--shard", f"{rank}/3"], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-2000:]
    shards = [tmp_path / f"s.shard{rank}-of-3.npz" for rank in (2, 0, 1)]  # any order
    run("merge", *shards, "--out", tmp_path / "merged.npz")
    assert_same_run(tmp_path / "merged.npz", tmp_path / "single.npz")


def test_a_killed_shard_resumes_on_its_own(model: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from runtime.run import store

    run(model, *COMMON, "--out", tmp_path / "single.npz")
    run(model, *COMMON, "--out", tmp_path / "s.npz", "--shard", "0/2")
    write, calls = store.SampleStore.write, []

    def dies_after_one_batch(self, start, batch):  # type: ignore[no-untyped-def]
        if calls:
            raise RuntimeError("killed")
        calls.append(start)
        write(self, start, batch)

    monkeypatch.setattr(store.SampleStore, "write", dies_after_one_batch)
    with pytest.raises(RuntimeError, match="killed"):
        run(model, *COMMON, "--out", tmp_path / "s.npz", "--shard", "1/2")
    monkeypatch.undo()
    assert calls == [6] and (tmp_path / "s.shard1-of-2.npz.partial").is_dir()
    capsys.readouterr()
    run(model, *COMMON, "--out", tmp_path / "s.npz", "--shard", "1/2")
    assert "resuming" in capsys.readouterr().out
    run("merge", tmp_path / "s.shard0-of-2.npz", tmp_path / "s.shard1-of-2.npz", "--out", tmp_path / "merged.npz")
    assert_same_run(tmp_path / "merged.npz", tmp_path / "single.npz")


def test_bad_sets_of_shards_are_refused_and_nothing_is_written(model: Path, tmp_path: Path, capsys) -> None:
    def shards(name: str, world: int, *extra: object) -> list[Path]:
        for rank in range(world):
            run(model, *COMMON, *extra, "--out", tmp_path / f"{name}.npz", "--shard", f"{rank}/{world}")
        return [tmp_path / f"{name}.shard{rank}-of-{world}.npz" for rank in range(world)]

    a, other_seed, three = shards("a", 2), shards("b", 2, "--seed", 8), shards("c", 3)
    other_model = make_random_checkpoint(tmp_path / "other.pt", image_size=8, seed=1,
                                         diffusion=DiffusionConfig(num_timesteps=40))
    run(other_model, *COMMON, "--out", tmp_path / "d.npz", "--shard", "1/2")
    run(model, *COMMON, "--out", tmp_path / "plain.npz")
    out = tmp_path / "merged.npz"
    cases = [
        ([a[0]], "1 of 2 shards are missing: 1/2 (images 6..9); pass all 2 shard files"),
        ([a[0], a[0], a[1]], "shard 0/2 is given twice (the same file twice)"),
        ([a[0], other_seed[1]], "come from different seeds: 7 vs 8"),
        ([a[0], tmp_path / "d.shard1-of-2.npz"], "come from different models (sha256)"),
        ([a[0], a[1], three[2]], "come from different shard counts (W): 2 vs 3"),
        ([a[0], tmp_path / "plain.npz"], "plain.npz is not a shard (it has no run_key); pass the files ddpm-run "
                                         "--shard wrote"),
        ([a[0], tmp_path / "nope.npz"], "samples file"),
    ]
    for files, message in cases:
        assert message in refused(capsys, "merge", *files, "--out", out)
        assert not out.exists() and not list(tmp_path.glob("merged*"))
    assert "is one of the shards" in refused(capsys, "merge", *a, "--out", a[0], "--force")
    assert "found no launcher" in refused(capsys, model, *COMMON, "--out", out, "--shard", "auto")
    assert "make them with a single ddpm-run" in refused(capsys, model, *COMMON, "--out", out, "--shard", "0/2",
                                                          "--grid", tmp_path / "g.png")
    (tmp_path / "merged.npz").write_bytes(b"mine")
    assert "already exists" in refused(capsys, "merge", *a, "--out", out)
    assert out.read_bytes() == b"mine"


def test_more_shards_than_batches_leaves_empty_shards_that_still_merge(model: Path, tmp_path: Path, capsys) -> None:
    args = ["-n", 3, "--batch-size", 2, "--steps", 3, "--threads", 1, "--quiet", "--out"]
    run(model, *args, tmp_path / "single.npz")
    for rank in range(3):
        run(model, *args, tmp_path / "s.npz", "--shard", f"{rank}/3")
    assert "shard 2/3: none of the 3 images (2 batches of 2 for 3 shards)" in capsys.readouterr().out
    run("merge", *tmp_path.glob("s.shard*"), "--out", tmp_path / "merged.npz")
    assert_same_run(tmp_path / "merged.npz", tmp_path / "single.npz")


def test_nll_shards_join_into_the_single_evaluation(model: Path, tmp_path: Path, capsys) -> None:
    from evaluation.cli import main as ddpm_eval

    def evaluate(*args: object) -> None:
        ddpm_eval([str(a) for a in (
            "nll", model, "--data", data, "--steps", 5, "--seed", 3, "--batch-size", 2, "--threads", 1, *args)])

    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, arr_0=rng.integers(0, 256, (9, 8, 8, 1), dtype=np.uint8))
    evaluate("--first", 1, "--json", tmp_path / "single.json")
    for rank in range(3):
        evaluate("--first", 1, "--shard", f"{rank}/3", "--json", tmp_path / "nll.json")
    parts = [tmp_path / f"nll.shard{rank}-of-3.json" for rank in range(3)]
    capsys.readouterr()
    ddpm_eval(["nll-merge", *map(str, parts[::-1]), "--json", str(tmp_path / "joined.json")])
    line = capsys.readouterr().out
    single, joined = (json.loads((tmp_path / f).read_text()) for f in ("single.json", "joined.json"))
    assert joined["total_per_image"] == single["total_per_image"] and joined["n"] == 8 and joined["first"] == 1
    for name in ("bits_per_dim", "stderr", "prior", "kl_sum", "decoder"):
        assert joined[name] == pytest.approx(single[name], rel=1e-12), name
    np.testing.assert_allclose(joined["vb_mean_per_step"], single["vb_mean_per_step"], rtol=1e-12)
    assert f"3 reports: {single['bits_per_dim']:.4f} +- {single['stderr']:.4f} bits/dim on 8 images" in line

    def merge_refused(*files: Path) -> str:
        with pytest.raises(SystemExit) as exc:
            ddpm_eval(["nll-merge", *map(str, files)])
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1, err
        return err[0]

    assert "images 5..6 are in none of the reports" in merge_refused(parts[0], parts[2])
    assert "images 7..8 are in none of the reports" in merge_refused(parts[0], parts[1])
    assert "overlaps images" in merge_refused(*parts, parts[1])
    assert "different evaluations (selection differ)" in merge_refused(parts[0], tmp_path / "single.json")
    evaluate("--first", 1, "--seed", 4, "--shard", "1/3", "--json", tmp_path / "other.json")
    assert "(seed differ)" in merge_refused(parts[0], tmp_path / "other.shard1-of-3.json", parts[2])
