"""Tuned tables (``flash_softmax.attention.table``), ``flash-softmax tune`` and what ``info`` says about them.

On a CPU the tuning itself cannot run (it times kernels on a GPU); what is tested here is everything
around it: the file format and its validation, the lookup, the selection reading the table, the plan of
``tune --dry-run``, the choice of a winner, the compile workers' crash handling, and the accuracy check
run in the interpreter. One test (``gpu``) tunes a single key for real.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from rich.console import Console

from flash_softmax import cli, info, tune
from flash_softmax.attention import configs
from flash_softmax.attention import table as tables
from flash_softmax.attention.configs import ConfigKey, KernelConfig

SMALL = KernelConfig(64, 64, 4, 2)
OTHER = KernelConfig(128, 64, 8, 3, tma=True)


def key(kernel="forward", dtype="bfloat16", head_dim=64, causal=False, seqlen=4096) -> ConfigKey:
    return ConfigKey(kernel, dtype, head_dim, causal, seqlen)


def make_table(*entries: tuple[ConfigKey, KernelConfig]) -> tables.Table:
    return tables.Table.from_entries(
        [tables.Entry(k, config, 1.0 + index, OTHER, 2.0 + index) for index, (k, config) in enumerate(entries)],
        {"device": "Test GPU", "torch": torch.__version__, "command": "flash-softmax tune --test"},
    )


@pytest.fixture
def clean_selection(monkeypatch):
    """No table from the environment, and no cached choices or parsed tables leaking between tests."""
    monkeypatch.delenv(tables.ENV_VAR, raising=False)
    configs.clear_cache()
    tables.clear_cache()
    yield
    configs.clear_cache()
    tables.clear_cache()


# ------------------------------------------------------------------------------------- the file


def test_table_round_trips_through_its_file(tmp_path):
    table = make_table((key(), SMALL), (key("backward_dq", "float16", 128, True, 1024), OTHER))
    path = tables.write_table(table, tmp_path / "sub" / "gpu.json")
    loaded = tables.load_table(path)
    assert loaded.entries == table.entries
    assert loaded.meta["device"] == "Test GPU" and loaded.meta["command"] == "flash-softmax tune --test"
    assert loaded.path == path
    data = json.loads(path.read_text())
    assert data["format"] == tables.FORMAT_VERSION
    first = data["entries"][0]  # sorted: forward before backward_dq
    assert (first["kernel"], first["seqlen_bucket"], first["config"]["block_m"], first["ms"]) == ("forward", 4096, 64, 1.0)
    assert first["runner_up"] == OTHER.to_dict() and first["runner_up_ms"] == 2.0
    assert not (tmp_path / "sub" / "gpu.json.partial").exists()


def _valid_data() -> dict:
    return make_table((key(), SMALL), (key(seqlen=1024), OTHER)).to_dict()


def _set(path: tuple, value):
    def corrupt(data):
        target = data
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value
    return corrupt


def _delete(path: tuple):
    def corrupt(data):
        target = data
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]
    return corrupt


def _duplicate(data):
    data["entries"].append(dict(data["entries"][0]))


@pytest.mark.parametrize("corrupt,field,expected", [
    (_set(("format",), 2), "format", "expected 1"),
    (_delete(("device",)), "device", "GPU's name"),
    (_set(("entries",), {}), "entries", "a list"),
    (_set(("entries", 0, "kernel"), "backward"), "entries[0].kernel", "one of forward"),
    (_set(("entries", 0, "dtype"), "float64"), "entries[0].dtype", "one of float16"),
    (_set(("entries", 1, "head_dim_bucket"), 96), "entries[1].head_dim_bucket", "power of two from 64"),
    (_set(("entries", 0, "causal"), "yes"), "entries[0].causal", "true or false"),
    (_set(("entries", 0, "seqlen_bucket"), 64), "entries[0].seqlen_bucket", "power of two >= 128"),
    (_set(("entries", 0, "ms"), -1.0), "entries[0].ms", "positive number"),
    (_set(("entries", 0, "ms"), True), "entries[0].ms", "positive number"),
    (_delete(("entries", 0, "config")), "entries[0]", "missing field(s) config"),
    (_set(("entries", 0, "extra"), 1), "entries[0]", "unknown field(s) extra"),
    (_set(("entries", 0, "config", "colour"), "red"), "entries[0].config", "unknown KernelConfig fields"),
    (_delete(("entries", 0, "config", "num_warps")), "entries[0].config", "num_warps"),
    (_set(("entries", 0, "config", "block_m"), 0), "entries[0].config.block_m", "positive integer"),
    (_set(("entries", 0, "config", "block_n"), 48), "entries[0].config.block_n", "power of two"),
    (_set(("entries", 0, "config", "tma"), 1), "entries[0].config.tma", "true or false"),
    (_set(("entries", 0, "runner_up_ms"), "fast"), "entries[0].runner_up_ms", "or null"),
    (_duplicate, "entries[2]", "same kernel, dtype"),
])
def test_invalid_tables_name_the_file_and_the_field(tmp_path, corrupt, field, expected):
    data = _valid_data()
    corrupt(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        tables.load_table(path)
    message = str(error.value)
    assert str(path) in message and field in message and expected in message, message


def test_a_file_that_is_not_json_is_a_value_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"format": 1, ')
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        tables.load_table(path)


# ------------------------------------------------------------------------------------- lookup


def test_lookup_exact_nearest_bucket_and_miss():
    table = make_table((key(seqlen=1024), SMALL), (key(seqlen=4096), OTHER),
                       (key(causal=True, seqlen=16384), KernelConfig(128, 128, 8, 3)))
    assert table.lookup(key(seqlen=1024)) == SMALL
    assert table.lookup(key(seqlen=4096)) == OTHER
    assert table.lookup(key(seqlen=8192)) == OTHER           # one octave above 4k
    assert table.lookup(key(seqlen=65536)) == OTHER          # far above: the longest bucket there is
    assert table.lookup(key(seqlen=128)) == SMALL            # below everything: the shortest
    assert table.lookup(key(seqlen=2048)) == SMALL           # one octave from 1k and from 4k: the smaller
    assert table.lookup(key(causal=True, seqlen=1024)) == KernelConfig(128, 128, 8, 3)  # only causal entry
    assert table.lookup(key(dtype="float16")) is None        # nothing for this dtype
    assert table.lookup(key(head_dim=128)) is None
    assert table.lookup(key(kernel="backward_dkdv")) is None


# ------------------------------------------------------------------------------------- selection


def _select(kernel="forward", dtype="bfloat16", head_dim=64, causal=False, seqlen=4000):
    element_size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    return configs._select_uncached(kernel, dtype, element_size, head_dim, head_dim, causal, seqlen, seqlen)


def test_selection_uses_the_table_the_environment_names(tmp_path, monkeypatch, clean_selection):
    path = tables.write_table(make_table((key(seqlen=4096), SMALL), (key(head_dim=256), KernelConfig(128, 128, 8, 4))),
                              tmp_path / "gpu.json")
    default = configs.default_config("forward", 64, 64, 2)
    assert default != SMALL  # otherwise "table" and "default" could not be told apart below
    assert _select() == (default, "default")  # no GPU and no variable: no table

    monkeypatch.setenv(tables.ENV_VAR, str(path))
    assert _select() == (SMALL, "table")                        # bucket 4096, exact
    assert _select(seqlen=20000) == (SMALL, "table")            # bucket 32768, nearest
    assert _select(dtype="float16") == (default, "default")     # not in the table
    # 128 x 512 resident plus 4 x 128 x 512 streamed 16-bit values are far beyond any GPU's shared memory.
    assert not configs.fits("forward", KernelConfig(128, 128, 8, 4), 256, 256, 2, configs._shared_memory_limit())
    assert _select(head_dim=256) == (configs.default_config("forward", 256, 256, 2), "default")
    assert _select(dtype="float32")[1] == "default"

    monkeypatch.setenv(tables.ENV_VAR, "none")
    assert tables.current_table() is None and _select() == (default, "default")


def test_an_entry_that_does_not_fit_the_devices_shared_memory_is_ignored(tmp_path, monkeypatch, clean_selection):
    path = tables.write_table(make_table((key(seqlen=4096), SMALL)), tmp_path / "gpu.json")
    monkeypatch.setenv(tables.ENV_VAR, str(path))
    needed = configs.estimated_shared_memory("forward", SMALL, 64, 64, 2)
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda: needed)
    assert _select() == (SMALL, "table")
    monkeypatch.setattr(configs, "_shared_memory_limit", lambda: needed - 1)
    config, source = _select()
    assert source == "default" and config != SMALL


def test_current_table_reads_a_rewritten_file_and_refuses_a_missing_one(tmp_path, monkeypatch, clean_selection):
    path = tmp_path / "gpu.json"
    tables.write_table(make_table((key(), SMALL)), path)
    monkeypatch.setenv(tables.ENV_VAR, str(path))
    assert tables.current_table().lookup(key()) == SMALL
    assert tables.current_table() is tables.current_table()  # parsed once
    tables.write_table(make_table((key(), OTHER), (key(seqlen=1024), SMALL)), path)
    assert tables.current_table().lookup(key()) == OTHER
    monkeypatch.setenv(tables.ENV_VAR, str(tmp_path / "missing.json"))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        tables.current_table()
    if not torch.cuda.is_available():
        monkeypatch.delenv(tables.ENV_VAR)
        assert tables.table_path() is None and tables.current_table() is None


def test_default_table_path_is_the_packaged_folder():
    path = tables.default_table_path("nvidia-h200")
    assert path.name == "nvidia-h200.json" and path.parent.name == "configs"
    assert (path.parent / "README.md").is_file() and path.parent.parent.name == "flash_softmax"


# ------------------------------------------------------------------------------------- info


def test_info_reports_the_table_and_each_kernels_source(tmp_path, monkeypatch, capsys, clean_selection):
    assert cli.main(["info"]) == 0
    output = capsys.readouterr().out
    assert "config table" in output and "FLASH_SOFTMAX_AUTOTUNE" in output
    for kernel in configs.KERNEL_NAMES:
        assert kernel in output
    if not torch.cuda.is_available():
        assert "none: default configurations" in output and "interpreter" in output

    path = tables.write_table(make_table((key(head_dim=128, causal=True, seqlen=4096), SMALL)), tmp_path / "gpu.json")
    monkeypatch.setenv(tables.ENV_VAR, str(path))
    # What a compiled-GPU process would choose: the interpreter's short-circuit switched off.
    monkeypatch.setattr(configs, "INTERPRETED", False)
    monkeypatch.setattr(configs, "AUTOTUNE", False)
    assert str(path) in info.config_table() and "1 entries" in info.config_table()
    rows = {(row["head_dim"], row["causal"], row["kernel"]): row for row in info.attention_configs()}
    assert len(rows) == 4 * 3
    assert (rows[128, True, "forward"]["config"], rows[128, True, "forward"]["source"]) == (SMALL.label, "table")
    assert rows[128, False, "forward"]["source"] == "default"
    assert rows[128, True, "backward_dq"]["source"] == "default"
    with configs.override(backward_dq=OTHER):
        assert {row["source"] for row in info.attention_configs() if row["kernel"] == "backward_dq"} == {"override"}
    assert info.environment()["config_table"] == info.config_table()


# ------------------------------------------------------------------------------------- tune --dry-run


def test_tune_dry_run_lists_every_key_and_candidate(capsys):
    argv = ["tune", "--dry-run", "--dtypes", "bfloat16", "--head-dims", "64", "256", "--seqlens", "1024", "5000",
            "--causal", "true", "--arch", "sm_90a", "--shared-memory", "232448"]
    assert cli.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = [line for line in lines if line.split()[:1] and line.split()[0] in configs.KERNEL_NAMES]
    expected = [(kernel, head_dim, seqlen, config.label)
                for head_dim in (64, 256) for seqlen in (1024, 8192) for kernel in configs.KERNEL_NAMES
                for config in configs.prune(kernel, head_dim, head_dim, 2, 232448, "sm_90a")]
    assert len(listed) == len(expected)
    for line, (kernel, head_dim, seqlen, label) in zip(listed, expected):
        assert line.startswith(kernel) and f"D={head_dim} " in line and f"S={seqlen} " in line and label in line
        assert "causal=true" in line
    assert f"{len(expected)} candidates" in lines[-1]
    assert any("(default)" in line for line in listed)


@pytest.mark.parametrize("argv,message", [
    (["tune", "--head-dims", "96", "128", "--dry-run"], "--head-dims: expected values in distinct buckets"),
    (["tune", "--seqlens", "3000", "4096", "--dry-run"], "--seqlens: expected values in distinct buckets"),
    (["tune", "--arch", "sm_80"], "--arch and --shared-memory only apply with --dry-run"),
])
def test_tune_rejects_bad_arguments(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_tune_flags_are_checked_by_the_parser(capsys):
    for argv, flag in ((["tune", "--budget-seconds", "0"], "--budget-seconds"),
                       (["tune", "--kernels", "backward"], "--kernels"),
                       (["tune", "--dtypes", "float64"], "--dtypes")):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv)
        assert flag in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU tune runs")
def test_tune_without_a_gpu_says_so(capsys):
    assert cli.main(["tune", "--kernels", "forward"]) == 2
    assert "--dry-run lists the plan" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- choosing


def _outcome(*timings):
    problem = tune.Problem("bfloat16", 64, False, 1024)
    candidates = [tune.Candidate(config, ms, "ok" if ms is not None else "error: OutOfResources")
                  for config, ms in timings]
    return tune.Outcome(problem, "forward", candidates)


def test_the_fastest_candidate_that_passes_the_check_wins(monkeypatch):
    fast, middle, slow, broken = (KernelConfig(128, 128, 8, 3), KernelConfig(128, 64, 8, 3),
                                  KernelConfig(64, 64, 4, 3), KernelConfig(64, 32, 4, 2))
    wrong = {fast}

    def check(kernel, problem, overrides, device, seed):
        from flash_softmax.testing import Comparison

        passed = overrides[kernel] not in wrong
        return [Comparison("out", 0.0 if passed else 1.0, 0.0, 0.0, 0.5, (), passed)]

    monkeypatch.setattr(tune, "accuracy_check", check)
    outcome = _outcome((slow, 3.0), (broken, None), (fast, 1.0), (middle, 2.0))
    tune._choose(outcome, "cpu", 0, 232448, "sm_90a", console=_Quiet())
    assert outcome.winner.config == middle and outcome.runner_up.config == slow
    assert len(outcome.rejected) == 1 and fast.label in outcome.rejected[0]
    entry = tune._entry(outcome)
    assert (entry.config, entry.ms, entry.runner_up, entry.runner_up_ms) == (middle, 2.0, slow, 3.0)

    wrong = {fast, middle, slow}
    outcome = _outcome((slow, 3.0), (fast, 1.0), (middle, 2.0))
    tune._choose(outcome, "cpu", 0, 232448, "sm_90a", console=_Quiet())
    assert outcome.winner is None and len(outcome.rejected) == 3


class _Quiet:
    def print(self, *args, **kwargs):
        pass


def test_the_accuracy_check_runs_the_kernels_against_the_reference(monkeypatch):
    """In the interpreter at a tiny size: the real kernels pass, a perturbed output fails."""
    import flash_softmax as fs

    monkeypatch.setattr(tune, "CHECK_MAX_SEQLEN", 40)
    problem = tune.Problem("float16", 32, True, 1024)
    forced = {name: configs.interpreter_config(name) for name in configs.KERNEL_NAMES}
    assert all(c.passed for c in tune.accuracy_check("forward", problem, forced, "cpu", 0))
    grads = tune.accuracy_check("backward_dkdv", problem, forced, "cpu", 0)
    assert [c.name for c in grads] == ["dk", "dv"] and all(c.passed for c in grads)

    real = fs.flash_attention

    def off_by_a_little(*args, **kwargs):
        out, lse = real(*args, **kwargs)
        return out * 1.01, lse

    monkeypatch.setattr(fs, "flash_attention", off_by_a_little)
    assert not all(c.passed for c in tune.accuracy_check("forward", problem, forced, "cpu", 0))


def test_merging_keeps_entries_not_measured_again_and_refuses_another_device(tmp_path):
    path = tables.write_table(make_table((key(seqlen=1024), SMALL), (key(seqlen=4096), SMALL)), tmp_path / "t.json")
    previous = tune._previous_table(path, "Test GPU", fresh=False)
    merged = tune._merged(previous, [tables.Entry(key(seqlen=4096), OTHER, 0.5)], {"device": "Test GPU"})
    assert merged.lookup(key(seqlen=1024)) == SMALL and merged.lookup(key(seqlen=4096)) == OTHER
    assert tune._previous_table(path, "Test GPU", fresh=True) is None
    with pytest.raises(ValueError, match="measured on 'Test GPU'; pass --fresh"):
        tune._previous_table(path, "Other GPU", fresh=False)


# ------------------------------------------------------------------------------------- compile workers


FAKE_WORKER = textwrap.dedent("""
    import json, os, sys, time
    for index, line in enumerate(sys.stdin):
        task = json.loads(line)
        print(f"start {index}", flush=True)
        if task["kernel"] == "crash":
            print("compiler: LLVM ERROR: boom", file=sys.stderr, flush=True)
            os.abort()
        if task["kernel"] == "slow":
            if "pidfile" in task:
                open(task["pidfile"], "w").write(str(os.getpid()))
            time.sleep(60)
        print(f"done {index} " + json.dumps("ok" if task["kernel"] == "good" else "error: OutOfResources"), flush=True)
""")


def _tasks(*kernels):
    return [{"kernel": kernel, "n": index} for index, kernel in enumerate(kernels)]


def test_a_crashing_compile_is_pinned_on_its_task_and_the_rest_still_compile(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(tune, "WORKER_COMMAND", [sys.executable, str(script)])
    tasks = _tasks("good", "crash", "good", "bad", "crash", "good")
    results = tune.precompile(tasks, jobs=1, deadline=tune.time.monotonic() + 60)
    statuses = [results.get(tune._task_id(task)) for task in tasks]
    assert statuses[0] == statuses[2] == statuses[5] == "ok"
    assert statuses[3] == "error: OutOfResources"
    assert statuses[1].startswith("crashed") and "LLVM ERROR: boom" in statuses[1]
    assert statuses[4].startswith("crashed")

    results = tune.precompile(_tasks("good", "good", "good", "good"), jobs=3, deadline=tune.time.monotonic() + 60)
    assert list(results.values()) == ["ok"] * 4

    # The lengths of one binary go to one worker; when it crashes, its other lengths are not tried again.
    same_binary = [{"kernel": "crash", "config": "x", "seqlen": seqlen} for seqlen in (1024, 2048, 4096)]
    tasks = [{"kernel": "good", "config": "y", "seqlen": 1024}, *same_binary,
             {"kernel": "good", "config": "z", "seqlen": 1024}]
    results = tune.precompile(tasks, jobs=2, deadline=tune.time.monotonic() + 60)
    assert [results[tune._task_id(task)][:7] for task in tasks] == ["ok", "crashed", "crashed", "crashed", "ok"]


def test_compile_workers_stop_at_the_deadline(tmp_path, monkeypatch):
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(tune, "WORKER_COMMAND", [sys.executable, str(script)])
    tasks = _tasks("good", "slow", "good")
    started = tune.time.monotonic()
    results = tune.precompile(tasks, jobs=1, deadline=started + 2)
    assert tune.time.monotonic() - started < 20
    assert results == {tune._task_id(tasks[0]): "ok"}  # the slow one and the one after it are left to the timing


def test_an_interrupted_compile_leaves_no_worker_behind(tmp_path, monkeypatch):
    """Ctrl-C or `timeout -s INT` during the parallel compile: the workers are killed, not orphaned."""
    import os
    import signal
    import threading

    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(tune, "WORKER_COMMAND", [sys.executable, str(script)])
    pidfile = tmp_path / "pid"
    # A process started in the background by a non-interactive shell (as CI may start the suite) inherits
    # SIGINT ignored, and Python then keeps ignoring it: give it Python's own handler for this test.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))  # what `timeout -s INT` sends
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        try:
            tune.precompile([{"kernel": "slow", "pidfile": str(pidfile)}], jobs=1,
                            deadline=tune.time.monotonic() + 60)
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)
    pid = int(pidfile.read_text())
    for _ in range(50):  # the kill is sent; give the kernel a moment to reap it
        try:
            os.waitpid(pid, os.WNOHANG)
            os.kill(pid, 0)
        except (ChildProcessError, ProcessLookupError):
            break
        tune.time.sleep(0.1)
    else:
        raise AssertionError(f"worker {pid} still runs")


# ------------------------------------------------------------------------------------- on a GPU


@pytest.mark.gpu
def test_tune_writes_a_table_that_launches_then_use(tmp_path, monkeypatch, clean_selection):
    out = tmp_path / "table.json"
    argv = ["tune", "--kernels", "forward", "backward_dq", "--dtypes", "bfloat16", "--head-dims", "64",
            "--seqlens", "1024", "--causal", "true", "--budget-seconds", "120", "--compile-jobs", "2",
            "--out", str(out), "--candidates-csv", str(tmp_path / "candidates.csv")]
    assert cli.main(argv) == 0
    written = tables.load_table(out)
    assert {k.kernel for k in written.entries} == {"forward", "backward_dq"}
    assert written.meta["device"] == info.device_name() and written.meta["complete"] is True
    monkeypatch.setenv(tables.ENV_VAR, str(out))
    configs.clear_cache()
    chosen = written.lookup(key("forward", "bfloat16", 64, True, 1024))
    assert configs.select_config("forward", "bfloat16", 2, 64, 64, True, 1000, 1000) == (chosen, "table")
    assert (tmp_path / "candidates.csv").read_text().count("\n") > 2


# ------------------------------------------------------------------------------------- the pipeline


def test_the_tuning_pipeline_end_to_end_in_the_interpreter(tmp_path, monkeypatch, clean_selection):
    """``tune`` from plan to table on a tiny problem: the timed calls and the accuracy checks run the real
    kernels in the interpreter; only the GPU timer is replaced, by one that makes later candidates faster
    and one candidate fail, so that the winner is neither the default nor the fastest listed."""
    monkeypatch.setattr(tune, "TOKENS", 64)
    monkeypatch.setattr(tune, "HIDDEN", 64)  # batch 1, 2 heads of 32 at length 64
    monkeypatch.setattr(tune, "CHECK_MAX_SEQLEN", 40)
    broken = {}

    def fake_measure(call, config, overrides, warmup_ms, rep_ms):
        assert overrides[kernel_of[id(call)]] == config
        with configs.override(**overrides):
            call()  # the call do_bench would time, on the real kernels
        if broken.get(kernel_of[id(call)]) == config:
            return tune.Candidate(config, None, "error: OutOfResources: out of resource: shared memory")
        return tune.Candidate(config, 10.0 - space[kernel_of[id(call)]].index(config), "ok")

    kernel_of = {}
    real_timed_call = tune._timed_call

    def timed_call(kernel, *args):
        call = real_timed_call(kernel, *args)
        kernel_of[id(call)] = kernel
        return call

    monkeypatch.setattr(tune, "measure", fake_measure)
    monkeypatch.setattr(tune, "_timed_call", timed_call)
    out, candidates_csv = tmp_path / "table.json", tmp_path / "candidates.csv"

    def tune_once(*flags):
        args = cli.build_parser().parse_args(
            ["tune", "--dtypes", "float16", "--head-dims", "32", "--seqlens", "64", "--causal", "true",
             "--compile-jobs", "0", "--out", str(out), "--candidates-csv", str(candidates_csv), *flags])
        axes = tune._resolve(args)
        steps = tune.plan(axes["kernels"], tune.problems(axes["dtypes"], axes["head_dims"], axes["causal"],
                                                         axes["seqlens"]), 232448, "sm_90a")
        return tune._tune(Console(width=200), args, steps, 0, "sm_90a", 232448, "flash-softmax tune --test",
                          torch.device("cpu"))

    space = {kernel: configs.prune(kernel, 32, 32, 2, 232448, "sm_90a") for kernel in configs.KERNEL_NAMES}
    broken["forward"] = space["forward"][-1]  # the fastest by the fake timer: it must not win
    assert tune_once("--kernels", "forward", "backward_dq") == 0
    written = tables.load_table(out)
    forward_key, dq_key = key("forward", "float16", 64, True, 128), key("backward_dq", "float16", 64, True, 128)
    assert set(written.entries) == {forward_key, dq_key}
    forward = written.entries[forward_key]
    assert (forward.config, forward.ms) == (space["forward"][-2], 10.0 - (len(space["forward"]) - 2))
    assert (forward.runner_up, forward.runner_up_ms) == (space["forward"][-3], 10.0 - (len(space["forward"]) - 3))
    assert written.entries[dq_key].config == space["backward_dq"][-1]
    assert written.meta["complete"] is True and written.meta["command"] == "flash-softmax tune --test"
    rows = candidates_csv.read_text().splitlines()
    assert len(rows) == 1 + len(space["forward"]) + len(space["backward_dq"])
    assert sum("OutOfResources" in row for row in rows) == 1 and sum(row.endswith(",true") for row in rows) == 2

    # A second run of another kernel keeps the first run's entries.
    assert tune_once("--kernels", "backward_dkdv") == 0
    assert set(tables.load_table(out).entries) == {forward_key, dq_key, key("backward_dkdv", "float16", 64, True, 128)}

    # Out of budget before the first measurement: nothing measured, nothing written, the table untouched.
    before = out.read_text()
    assert tune_once("--kernels", "forward", "--budget-seconds", "0.000001") == 1
    assert out.read_text() == before


def test_the_compile_worker_runs_candidates_and_reports_each(monkeypatch):
    """In-process, in the interpreter at a tiny size: a forward and a backward candidate run, a broken
    task is reported, not raised."""
    monkeypatch.setattr(tune, "TOKENS", 64)
    monkeypatch.setattr(tune, "HIDDEN", 64)
    problem = tune.Problem("float16", 32, True, 64)
    for kernel in ("forward", "backward_dkdv"):
        config = configs.prune(kernel, 32, 32, 2, 232448, "sm_90a")[1]
        assert tune.run_compile_task(tune.compile_task(problem, kernel, config, 232448, "sm_90a"), "cpu") == "ok"
    broken = {**tune.compile_task(problem, "forward", SMALL, 232448, "sm_90a"), "config": {"block_m": 64}}
    assert tune.run_compile_task(broken, "cpu").startswith("error: TypeError")


def test_the_compile_worker_process_speaks_the_chains_protocol(tmp_path):
    """The real worker (``python -m flash_softmax.tune --compile-worker``) on a task that fails at once."""
    problem = tune.Problem("float16", 32, True, 64)
    task = {**tune.compile_task(problem, "forward", SMALL, 232448, "sm_90a"), "config": {"colour": "red"}}
    results = tune.precompile([task], jobs=1, deadline=tune.time.monotonic() + 120)
    assert "unknown KernelConfig fields ['colour']" in results[tune._task_id(task)]


def test_the_command_lines_defaults_are_tunes():
    """cli.py cannot import tune (it must not load triton before choosing the interpreter): same numbers."""
    args = cli.build_parser().parse_args(["tune"])
    assert (args.budget_seconds, args.warmup_ms, args.rep_ms) == (
        tune.DEFAULT_BUDGET_SECONDS, tune.DEFAULT_WARMUP_MS, tune.DEFAULT_REP_MS)
    assert tuple(cli.build_parser().parse_args(["tune", "--kernels", *configs.KERNEL_NAMES]).kernels) == configs.KERNEL_NAMES


def test_the_tables_are_package_data():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from flash_softmax.attention.table import TABLE_DIR

    with open(TABLE_DIR.parent.parent / "pyproject.toml", "rb") as handle:
        package_data = tomllib.load(handle)["tool"]["setuptools"]["package-data"]["flash_softmax"]
    assert "configs/*.json" in package_data
    assert TABLE_DIR.relative_to(TABLE_DIR.parent.parent).as_posix() == "flash_softmax/configs"
