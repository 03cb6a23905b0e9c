"""main_distributed.py without a cluster: flags, presets, one-line errors, dry run, requeue bookkeeping."""

from __future__ import annotations

import json
import pickle
import stat
import subprocess

import pytest
import yaml

from ijepa_scale.launchers import slurm
from ijepa_scale.commands import slurm as slurm_command
from tests.integration.common import ROOT, tiny_config, write_config


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """`sinfo` that knows partitions debug and gpu; `sbatch` that records being called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "sbatch-called"
    for name, body in (("sinfo", "printf 'debug\\ngpu\\n'"), ("sbatch", f"touch {marker}; exit 1"),
                       ("srun", "exit 1")):
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    return marker


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path / "tiny.yaml", tiny_config("/data/train-{000000..000004}.tar", tmp_path / "run"))


def run(capsys, *argv):
    code = slurm_command.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


BASE = ("--preset", "local-cpu", "--tasks-per-node", "2")


def test_missing_config_is_one_line(capsys, fake_slurm, tmp_path):
    line = one_line_error(*run(capsys, "--fname", str(tmp_path / "nope.yaml"), *BASE)[::2])
    assert "config file not found" in line and "nope.yaml" in line
    assert not fake_slurm.exists()


@pytest.mark.parametrize("flags, expected", [
    (("--nodes", "0"), "--nodes 0: must be at least 1"),
    (("--tasks-per-node", "0"), "--tasks-per-node 0: must be at least 1"),
    (("--time", "1", "--signal-delay", "60"), "--signal-delay 60 s leaves no time"),
    (("--gpus-per-node", "4"), "one task per GPU"),
    (("--mem", "lots"), "--mem 'lots'"),
    (("--mem-per-gpu", "10G"), "CPU job"),
    (("--partition", "nosuch"), "--partition nosuch: sinfo does not know it (partitions: debug, gpu)"),
])
def test_bad_flags_are_one_line_before_submission(capsys, fake_slurm, config, flags, expected):
    code, _, err = run(capsys, "--fname", str(config), *BASE, *flags)
    assert expected in one_line_error(code, err)
    assert not fake_slurm.exists()


def test_unknown_preset_lists_the_known_ones(capsys, fake_slurm, config):
    line = one_line_error(*run(capsys, "--fname", str(config), "--preset", "nosuch")[::2])
    assert "--preset nosuch: unknown preset" in line and "local-cpu" in line and "example" in line


def test_preset_with_unknown_key(capsys, fake_slurm, config, tmp_path):
    preset = tmp_path / "mine.yaml"
    preset.write_text("partition: debug\ncpus_per_tsk: 4\n")
    line = one_line_error(*run(capsys, "--fname", str(config), "--preset", str(preset))[::2])
    assert "unknown key 'cpus_per_tsk'" in line and "cpus_per_task" in line


def test_override_that_does_not_validate(capsys, fake_slurm, config):
    line = one_line_error(*run(capsys, "--fname", str(config), *BASE, "data.batchsize=4")[::2])
    assert "override data.batchsize=4" in line and "did you mean 'batch_size'" in line
    line = one_line_error(*run(capsys, "--fname", str(config), *BASE, "optimization.epochs=zero")[::2])
    assert "optimization.epochs" in line
    assert not fake_slurm.exists()


def test_preset_values_and_flags_over_them():
    options = slurm.resolve_options(slurm_command.parse_args(["--preset", "local-cpu", "--cpus-per-task", "2"]))
    assert (options.partition, options.gpus_per_node, options.cpus_per_task, options.time) == ("debug", 0, 2, 10)
    options = slurm.resolve_options(slurm_command.parse_args(["--preset", "example", "--tasks-per-node", "8",
                                                              "--nodes", "2"]))
    assert (options.partition, options.mem_per_gpu, options.gpus_per_node, options.nodes) == ("learnlab", "55G", 8, 2)
    # Official defaults without a preset: one GPU per task.
    options = slurm.resolve_options(slurm_command.parse_args(["--tasks-per-node", "4"]))
    assert (options.gpus_per_node, options.cpus_per_task, options.time, options.max_requeues) == (4, 10, 4300, 20)


def test_dry_run_prints_script_and_config_and_submits_nothing(capsys, fake_slurm, config, tmp_path):
    folder = tmp_path / "submitit"
    code, out, err = run(capsys, "--fname", str(config), *BASE, "--folder", str(folder), "--dry-run",
                         "optimization.epochs=3", "--job-name", "tiny")
    assert code == 0, err
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --cpus-per-task=1", "#SBATCH --partition=debug",
                 "#SBATCH --signal=USR2@30", "#SBATCH --time=10", "#SBATCH --job-name=tiny", "#SBATCH --nodes=1",
                 f"#SBATCH --output={folder}/job_%j/%j_0_log.out", "-m submitit.core._submit"):
        assert line in out
    assert "gpus-per-node" not in out
    resolved = yaml.safe_load(out.split("logging.folder gets the CSVs and checkpoints):\n", 1)[1])
    assert resolved["optimization"]["epochs"] == 3
    assert resolved["logging"]["folder"] == str(tmp_path / "run")
    assert not fake_slurm.exists() and not folder.exists()


def test_dry_run_gpu_job(capsys, fake_slurm, config):
    code, out, err = run(capsys, "--fname", str(config), "--preset", "example", "--partition", "gpu",
                         "--nodes", "2", "--tasks-per-node", "8", "--dry-run")
    assert code == 0, err
    for line in ("#SBATCH --gpus-per-node=8", "#SBATCH --mem-per-gpu=55G", "#SBATCH --account=my-project",
                 "#SBATCH --constraint=volta32gb", "#SBATCH --nodes=2", "#SBATCH --signal=USR2@120"):
        assert line in out


def test_batch_launch_dry_run_and_list_errors(capsys, fake_slurm, tmp_path):
    shards = "/data/train-{000000..000004}.tar"
    write_config(tmp_path / "a.yaml", tiny_config(shards, tmp_path / "run_a"))
    write_config(tmp_path / "b.yaml", tiny_config(shards, tmp_path / "run_b"))
    listing = tmp_path / "batch.yaml"
    listing.write_text("- a.yaml\n- b.yaml\n")
    code, out, err = run(capsys, "--fname", str(listing), "--batch-launch", *BASE, "--dry-run")
    assert code == 0, err
    assert "#SBATCH --array=0-1%2" in out and str(tmp_path / "run_a") in out and str(tmp_path / "run_b") in out

    listing.write_text("- a.yaml\n- missing.yaml\n")
    assert "lists missing.yaml" in one_line_error(*run(capsys, "--fname", str(listing), "--batch-launch",
                                                       *BASE)[::2])
    write_config(tmp_path / "c.yaml", tiny_config(shards, tmp_path / "run_a"))
    listing.write_text("- a.yaml\n- c.yaml\n")
    assert "same logging.folder" in one_line_error(*run(capsys, "--fname", str(listing), "--batch-launch",
                                                        *BASE)[::2])
    listing.write_text("configs: [a.yaml]\n")
    assert "must be a YAML list" in one_line_error(*run(capsys, "--fname", str(listing), "--batch-launch",
                                                        *BASE)[::2])
    assert not fake_slurm.exists()


# ---------------------------------------------------------------- requeue bookkeeping

POLICY = dict(time_min=60, signal_delay_s=120, max_requeues=2)


def test_classify_signal_by_time_left():
    # Warning at 60 min - 120 s (SLURM may send it up to 60 s early): a time limit.
    assert slurm.classify_signal(60 * 60 - 120 - 60, 60, 120) == "time-limit"
    assert slurm.classify_signal(30 * 60, 60, 120) == "preemption"
    # A short --time (submitit would call every signal a time-out here): early signals are preemptions.
    assert slurm.classify_signal(20, 10, 30) == "preemption"
    assert slurm.classify_signal(520, 10, 30) == "time-limit"


def test_preemptions_do_not_count_time_limits_do():
    history = {}
    for step in (10, 20, 30):  # preempted three times: always requeued
        decision = slurm.decide_requeue(history, signals=("SIGUSR2",), step=step, elapsed_s=60, **POLICY)
        assert decision["requeue"] and decision["kind"] == "preemption"
        history = decision["history"]
    assert history == {"preemption_requeues": 3, "last_requeue_step": 30}
    for step in (40, 50):
        decision = slurm.decide_requeue(history, signals=("SIGUSR2",), step=step, elapsed_s=3500, **POLICY)
        assert decision["requeue"] and decision["kind"] == "time-limit"
        history = decision["history"]
    assert history["time_limit_requeues"] == 2
    decision = slurm.decide_requeue(history, signals=("SIGUSR2",), step=60, elapsed_s=3500, **POLICY)
    assert not decision["requeue"] and "--max-requeues exhausted" in decision["reason"]
    # A preemption is still requeued after the time-limit budget is spent.
    assert slurm.decide_requeue(history, signals=("SIGUSR2",), step=60, elapsed_s=60, **POLICY)["requeue"]


def test_no_progress_since_the_last_requeue_stops():
    decision = slurm.decide_requeue({}, signals=("SIGUSR2",), step=0, elapsed_s=1, **POLICY)
    assert decision["requeue"]
    again = slurm.decide_requeue(decision["history"], signals=("SIGUSR2",), step=0, elapsed_s=1, **POLICY)
    assert not again["requeue"] and "no step completed since the previous requeue" in again["reason"]


def test_sigterm_alone_is_not_requeued_by_the_job():
    decision = slurm.decide_requeue({}, signals=("SIGTERM",), step=7, elapsed_s=1, **POLICY)
    assert not decision["requeue"] and decision["kind"] == "stopped"


def test_checkpoint_hands_submitit_the_next_job_without_a_resume_path(tmp_path):
    cfg = slurm.load_config(write_config(tmp_path / "t.yaml", tiny_config("/d/x-{0..1}.tar", tmp_path / "run")))
    options = slurm.resolve_options(slurm_command.parse_args(["--preset", "local-cpu", "--tasks-per-node", "2"]))
    job = slurm.SlurmTrainingJob(cfg, options)
    job._decision = slurm.decide_requeue({}, signals=("SIGUSR2",), step=7, elapsed_s=5, time_min=10,
                                         signal_delay_s=30, max_requeues=3)
    delayed = job.checkpoint()
    nxt = delayed.function
    assert isinstance(nxt, slurm.SlurmTrainingJob) and nxt is not job
    assert nxt.history == {"preemption_requeues": 1, "last_requeue_step": 7}
    # The next job finds the newest checkpoint when it starts: nothing about files is pickled.
    assert nxt.cfg.meta.read_checkpoint == cfg.meta.read_checkpoint and nxt.cfg.meta.load_checkpoint is False
    assert b"pth.tar" not in pickle.dumps(nxt)
    assert pickle.loads(pickle.dumps(job))._decision is None
    job._decision = {"requeue": False, "kind": "time-limit", "reason": "x", "history": {}}
    assert job.checkpoint() is None


def test_checkpoint_outside_training_requeues_once_then_stops():
    job = slurm.SlurmTrainingJob(slurm.Config.__new__(slurm.Config), slurm.SlurmOptions(time=10, signal_delay=30))
    first = job.checkpoint()
    assert first is not None
    assert first.function.checkpoint() is None


def test_master_port_changes_with_each_restart():
    ports = {slurm.master_port("1234", restart) for restart in range(5)}
    assert len(ports) == 5 and all(20000 <= p <= 60000 for p in ports)


def test_main_distributed_is_thin():
    assert len((ROOT / "main_distributed.py").read_text().splitlines()) < 60


def test_argparse_mistakes_are_one_line(capsys, fake_slurm, config):
    with pytest.raises(SystemExit) as exit_info:
        slurm_command.main(["--fname", str(config), "--nodes", "two"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--nodes: invalid int value: 'two'" in err


def test_unwritable_logging_folder_is_refused_before_sbatch(capsys, fake_slurm, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    config = write_config(tmp_path / "c.yaml", tiny_config("/d/x-{0..1}.tar", blocker / "run"))
    code, _, err = run(capsys, "--fname", str(config), *BASE, "--folder", str(tmp_path / "s"))
    assert "cannot be created" in one_line_error(code, err) and not fake_slurm.exists()


def test_unreachable_controller_refuses_submission_but_not_a_dry_run(capsys, fake_slurm, config, tmp_path):
    (fake_slurm.parent / "bin" / "sinfo").write_text(
        "#!/bin/sh\necho 'slurm_load_partitions: Unable to contact slurm controller' >&2\nexit 1\n")
    folder = tmp_path / "submitit"
    code, out, err = run(capsys, "--fname", str(config), *BASE, "--folder", str(folder))
    assert one_line_error(code, err) == ("error: cannot check --partition debug: sinfo failed: "
                                         "slurm_load_partitions: Unable to contact slurm controller")
    assert not fake_slurm.exists()
    code, out, err = run(capsys, "--fname", str(config), *BASE, "--folder", str(folder), "--dry-run")
    assert code == 0, err
    assert err.startswith("warning: --partition debug not checked: sinfo failed")
    assert "#SBATCH --partition=debug" in out and not fake_slurm.exists()


def test_presets_ship_with_the_package_and_git_comes_from_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no source checkout here: the packaged presets still resolve
    assert slurm.preset_path("local-cpu").parent.name == "presets"
    assert slurm.load_preset("local-cpu")["partition"] == "debug"
    mine = tmp_path / "launch" / "slurm" / "local-cpu.yaml"
    mine.parent.mkdir(parents=True)
    mine.write_text("partition: mine\n")
    assert slurm.load_preset("local-cpu")["partition"] == "mine"  # the folder's own presets come first
    assert slurm.git_state(tmp_path) == (f"not a git checkout: {tmp_path}\n", "")
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    record, _ = slurm.git_state(tmp_path / "launch")
    assert f"repository {tmp_path}" in record


# ---------------------------------------------------------------- sweeps, mail, dependency


@pytest.fixture
def sbatch_ok(fake_slurm, tmp_path):
    """`sbatch` that accepts: keeps the script it was given and answers job 4242."""
    kept = tmp_path / "submitted.sh"
    (fake_slurm.parent / "bin" / "sbatch").write_text(
        f"#!/bin/sh\ncp \"$1\" {kept}\necho 'Submitted batch job 4242'\n")
    return kept


def test_sweep_values_split_at_top_level_commas_only():
    assert slurm.split_values("5e-4,1e-3") == ["5e-4", "1e-3"]
    assert slurm.split_values("[0.99,1.0],[0.996, 1.0]") == ["[0.99,1.0]", "[0.996, 1.0]"]
    assert slurm.split_values("/d/x-{000..003}.tar,'a,b'") == ["/d/x-{000..003}.tar", "'a,b'"]
    assert slurm.split_values("7") == ["7"]


def test_sweep_values_around_spaces(capsys, fake_slurm, config):
    code, out, err = run(capsys, "--fname", str(config), *BASE, "--dry-run", "--sweep", "optimization.lr=5e-4, 1e-3")
    assert code == 0 and "optimization.lr=1e-3  " + str(config.parent / "run" / "lr=1e-3") in out, err
    # `--sweep optimization.lr=5e-4 1e-3`: the shell made 1e-3 a plain override.
    line = one_line_error(*run(capsys, "--fname", str(config), *BASE, "--sweep", "optimization.lr=5e-4", "1e-3")[::2])
    assert "override 1e-3 must look like section.key=value; the values of a --sweep are separated by commas" in line


def test_sweep_folder_names_are_readable_safe_and_distinct():
    assert slurm.run_name(["optimization.lr", "data.batch_size"], ("5e-4", "64")) == "lr=5e-4,batch_size=64"
    # Two swept keys with the same last part are named in full.
    assert slurm.run_name(["data.crop_size", "evaluation.crop_size"], ("32", "64")) == \
        "data.crop_size=32,evaluation.crop_size=64"
    names = {slurm.run_name(["data.shards"], (value,)) for value in ("/a/b-{0..3}.tar", "/a_b-{0..3}.tar",
                                                                     "_a_b-_0..3_.tar", "x" * 300)}
    assert len(names) == 4
    for name in names:
        assert "/" not in name and len(name) <= 200 and name.startswith("shards=")
    assert slurm.run_name(["data.shards"], ("/a/b-{0..3}.tar",)).startswith("shards=_a_b-_0..3_.tar-")


def test_sweep_dry_run_shows_the_product_and_submits_nothing(capsys, fake_slurm, config, tmp_path):
    code, out, err = run(capsys, "--fname", str(config), *BASE, "--folder", str(tmp_path / "s"), "--dry-run",
                         "--sweep", "optimization.lr=5e-4,1e-3", "--sweep", "data.batch_size=2,4",
                         "--array-parallelism", "3", "optimization.epochs=1")
    assert code == 0, err
    assert "#SBATCH --array=0-3%3" in out and f"# sweep: 4 run(s), manifest {tmp_path / 'run' / 'sweep.json'}" in out
    rows = [line.split() for line in out.split("# sweep: 4 run(s)", 1)[1].splitlines()[2:6]]
    assert [row[2:4] for row in rows] == [["optimization.lr=5e-4", "data.batch_size=2"],
                                          ["optimization.lr=5e-4", "data.batch_size=4"],
                                          ["optimization.lr=1e-3", "data.batch_size=2"],
                                          ["optimization.lr=1e-3", "data.batch_size=4"]]
    assert rows[3][4] == str(tmp_path / "run" / "lr=1e-3,batch_size=4")
    resolved = yaml.safe_load(out.split("logging.folder):\n", 1)[1])
    assert resolved["optimization"]["lr"] == 5e-4 and resolved["optimization"]["epochs"] == 1
    assert not fake_slurm.exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("sweeps, extra, expected", [
    (["optimization.lr=5e-4,abc"], [], "--sweep optimization.lr=5e-4,abc: override optimization.lr=abc: "
                                        "optimization.lr must be"),
    (["optimization.lrr=5e-4,1e-3"], [], "did you mean 'lr'"),
    (["optimization.lr=5e-4,1e-3"], ["optimization.lr=1e-3"],
     "--sweep optimization.lr=5e-4,1e-3 and the override optimization.lr=1e-3 both set optimization.lr: drop one"),
    (["optimization.lr=5e-4", "optimization.lr=1e-3"], [], "give its values in one --sweep"),
    (["optimization.lr=5e-4,0.0005"], [], "give the same config: drop the repeated value"),
    (["optimization.lr=5e-4,,1e-3"], [], "value 2 is empty"),
    (["logging.folder=a,b"], [], "plain override logging.folder=DIR"),
    (["lr=5e-4"], [], "must look like section.key=value1,value2"),
    # Each value is fine alone; one combination is not.
    (["data.crop_size=32,40", "mask.patch_size=8,16"], [], "is not a multiple of mask.patch_size=16 (every "
                                                           "combination of the --sweep values runs: sweep"),
])
def test_bad_sweep_is_one_line_before_submission(capsys, fake_slurm, config, sweeps, extra, expected):
    flags = [item for sweep in sweeps for item in ("--sweep", sweep)]
    code, _, err = run(capsys, "--fname", str(config), *BASE, *flags, *extra)
    assert expected in one_line_error(code, err)
    assert not fake_slurm.exists()


@pytest.mark.parametrize("flags, expected", [
    (("--mail-type", "END,FINISH"), "'FINISH' is not a SLURM mail type"),
    (("--mail-user", "me@example.org"), "without --mail-type sends no mail"),
    (("--dependency", "after_ok:12"), "--dependency 'after_ok:12': use SLURM's form"),
    (("--dependency", "afterok:12,afterany:13?afterok:14"), "use SLURM's form"),
    (("--array-parallelism", "0"), "--array-parallelism 0: must be at least 1"),
])
def test_bad_mail_and_dependency_are_one_line(capsys, fake_slurm, config, flags, expected):
    assert expected in one_line_error(*run(capsys, "--fname", str(config), *BASE, *flags)[::2])
    assert not fake_slurm.exists()


def test_sweep_submission_script_table_and_manifest(capsys, sbatch_ok, config, tmp_path):
    argv = ["--fname", str(config), *BASE, "--folder", str(tmp_path / "s"), "--sweep", "optimization.lr=5e-4,1e-3",
            "--sweep", "meta.seed=1,2", "--mail-type", "end,array_tasks", "--mail-user", "me@example.org",
            "--dependency", "afterok:12:13_1", "--array-parallelism", "2", "optimization.epochs=1"]
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    script = sbatch_ok.read_text()
    for line in ("#SBATCH --array=0-3%2", "#SBATCH --mail-type=END,ARRAY_TASKS", "#SBATCH --mail-user=me@example.org",
                 "#SBATCH --dependency=afterok:12:13_1", f"#SBATCH --output={tmp_path}/s/job_%A_%a/%A_%a_0_log.out"):
        assert line in script
    assert out.startswith("submitted sweep as array job 4242 (ijepa-tiny): 4 run(s), 2 at a time")
    assert "4242_3  optimization.lr=1e-3 meta.seed=2  " + str(tmp_path / "run" / "lr=1e-3,seed=2") in out
    manifest = json.loads((tmp_path / "run" / "sweep.json").read_text())
    assert manifest["sweep"] == {"optimization.lr": ["5e-4", "1e-3"], "meta.seed": ["1", "2"]}
    assert manifest["overrides"] == ["optimization.epochs=1"] and manifest["config"] == str(config)
    assert manifest["runs"][1] == {"task": 1, "name": "lr=5e-4,seed=2", "overrides": ["optimization.lr=5e-4",
                                   "meta.seed=2"], "folder": str(tmp_path / "run" / "lr=5e-4,seed=2")}
    assert [s["jobs"] for s in manifest["submissions"]] == [["4242_0", "4242_1", "4242_2", "4242_3"]]
    for run_ in manifest["runs"]:
        assert (tmp_path / "run" / run_["name"]).is_dir()
    record = yaml.safe_load((tmp_path / "s" / "job_4242_1" / "config.yaml").read_text())
    assert record["meta"]["seed"] == 2 and record["logging"]["folder"] == str(tmp_path / "run" / "lr=5e-4,seed=2")
    assert record["ijepa_scale"]["version"]  # which code submitted it

    # The same sweep again (e.g. after a failure) resumes every run: the manifest records both submissions.
    assert run(capsys, *argv)[0] == 0
    assert len(json.loads((tmp_path / "run" / "sweep.json").read_text())["submissions"]) == 2
    # Another sweep into the same folder is refused.
    code, _, err = run(capsys, *argv[:-1], "optimization.epochs=2")
    assert f"{tmp_path / 'run'} holds another sweep" in one_line_error(code, err)


def test_sweep_and_batch_launch_do_not_mix(capsys, fake_slurm, config, tmp_path):
    listing = tmp_path / "batch.yaml"
    listing.write_text(f"- {config}\n")
    line = one_line_error(*run(capsys, "--fname", str(listing), "--batch-launch", *BASE,
                               "--sweep", "optimization.lr=1e-3,2e-3")[::2])
    assert "--sweep with --batch-launch" in line
