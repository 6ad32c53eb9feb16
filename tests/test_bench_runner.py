"""The benchmark runner (`fastcore5 bench`, `python -m bench`): JSON with the expected fields, the table, the plots,
the H200 anchors, ops without a benchmark file and cases that fail."""
from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from fastcore5 import backends
from fastcore5.bench import common, runner, table
from fastcore5.bench.common import Case

REPO_ROOT = Path(__file__).resolve().parent.parent

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUN_FIELDS = {"card", "torch", "triton", "commit", "date", "device", "quick", "ceilings", "results", "skipped_ops", "notes"}


def assert_git_ignores_as_results(written: list[Path]) -> None:
    """Files a run wrote (to a scratch --out) would be ignored by git under bench-results/, the
    default --out, so a benchmark run from the checkout's root leaves `git status` clean."""
    if not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing for .gitignore to keep clean")
    names = sorted(f"bench-results/{path.name}" for path in written)
    assert names
    done = subprocess.run(["git", "check-ignore", *names], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    assert done.stdout.split() == names, f"not ignored by git: {sorted(set(names) - set(done.stdout.split()))}"


def _only_json(directory: Path) -> dict:
    files = list(directory.glob("*.json"))
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_quick_run_on_this_device_writes_json_table_and_plots(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(runner, "ANCHORS_FILE", tmp_path / "absent" / "anchors.json")
    assert runner.main(["--quick", "--op", "linear_relu", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "anchor" not in printed  # a missing anchors file drops the column, silently

    report = _only_json(tmp_path)
    assert RUN_FIELDS <= report.keys()
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert report["torch"] == torch.__version__
    assert report["date"].endswith("Z") and report["anchors_file"] is None
    assert all(value > 0 for value in report["ceilings"].values()) and len(report["ceilings"]) == 2
    assert report["ops"] == ["linear_relu"]
    assert report["results"]
    for row in report["results"]:
        assert row["op"] == "linear_relu" and row["mode"] in ("fwd", "fwdbwd")
        assert row["ms"]["fastcore5"] > 0 and {"eager", "torch.compile"} <= row["speedup"].keys()
        assert 0 < row["fraction_of_matmul_ceiling"]
    if not torch.cuda.is_available():
        # the C++ CPU kernel where there is one, else the reference: never the interpreter
        native = backends.unavailable_reason("cpu", "linear_relu", torch.device("cpu")) is None
        assert report["fastcore5_backend"] == {"linear_relu": "cpu" if native else "torch"}
        assert any("need a GPU" in note for note in report["notes"])
    assert "ours ms" in printed and "torch.compile" in printed
    plots = sorted(tmp_path.glob("*.png"))
    assert [p.name.rsplit("-", 1)[1] for p in plots] == ["ceiling.png", "speedup.png"]
    assert all(p.read_bytes()[:8] == PNG_SIGNATURE for p in plots)
    assert_git_ignores_as_results(list(tmp_path.iterdir()))


def _fake_cases(device, quick):
    def fails():
        raise RuntimeError("kernel exploded")

    return [
        Case("linear_relu", "8x8x8", "fp32", "fwd", {"fastcore5": lambda: None, "eager": lambda: None},
             flops=1024.0, anchor_keys={"eager": "linrelu.bf16.1024x1024x1024.eager_fwd_ms"}),
        Case("linear_relu", "9x9x9", "fp32", "fwd", {"fastcore5": fails, "eager": lambda: None}),
    ]


def test_anchors_missing_ops_and_failing_cases_are_reported(tmp_path, capsys, monkeypatch):
    anchors = tmp_path / "anchors.json"
    anchors.write_text(json.dumps({"linrelu.bf16.1024x1024x1024.eager_fwd_ms": 0.0611}))
    monkeypatch.setattr(runner, "ANCHORS_FILE", anchors)
    modules = {"linear_relu": types.SimpleNamespace(cases=_fake_cases), "embedding_dot_bias": None, "sgd": None}
    monkeypatch.setattr(runner, "load_cases_module", modules.get)

    assert runner.main(["--quick", "--out", str(tmp_path / "out"), "--no-plots"]) == 1
    captured = capsys.readouterr()

    report = _only_json(tmp_path / "out")
    assert report["anchors_file"] == str(anchors)
    assert set(report["skipped_ops"]) == {"embedding_dot_bias", "sgd"}
    good, bad = report["results"]
    assert good["h200_anchor_ms"] == {"eager": 0.0611}
    assert bad["error"] == "RuntimeError: kernel exploded" and "ms" not in bad
    assert "0.0611" in captured.out and "H200 anchor ms" in captured.out and "kernel exploded" in captured.out
    assert "1 case(s) failed" in captured.err
    assert not list((tmp_path / "out").glob("*.png"))


def _sgd_row(**extra) -> dict:
    return {
        "op": "sgd", "shape": "64M", "dtype": "fp32", "mode": "step", "ours": "fastcore5",
        "ms": {"fastcore5": 0.5, "foreach": 1.0, "fused": 0.25},
        "ms_quartiles": {"fastcore5": [0.45, 0.5, 0.55], "foreach": [0.9, 1.0, 1.1], "fused": [0.24, 0.25, 0.26]},
        "speedup": {"foreach": 2.0, "fused": 0.5},
        "speedup_quartiles": {"foreach": [1.9, 2.0, 2.1], "fused": [0.48, 0.5, 0.52]},
        "spread": 0.1,
        "fraction_of_copy_ceiling": 0.8,
        **extra,
    }


def test_cpu_turns_start_one_callable_later_each_repetition(monkeypatch):
    """No callable always runs right after the same other one (its predecessor's memory traffic
    decides how warm its caches are): over the repetitions each callable leads equally often."""
    monkeypatch.setattr(common, "_CPU_WARMUP_S", 0.0)
    monkeypatch.setattr(common, "_CPU_MEASURE_S", 0.0)
    calls = []
    fns = {label: (lambda label=label: calls.append(label)) for label in ("a", "b", "c")}
    samples = common._cpu_samples_ms(fns, quick=False)
    repetitions = common._cpu_repetitions(False)
    assert all(len(times) == repetitions for times in samples.values())
    turns = [calls[3 + 3 * k: 6 + 3 * k] for k in range(repetitions)]  # after one warm-up call each
    assert turns[:4] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    leaders = [turn[0] for turn in turns[: repetitions - repetitions % 3]]
    assert leaders.count("a") == leaders.count("b") == leaders.count("c")


def test_table_has_one_line_per_comparison_with_its_spread_and_says_which_way_a_ratio_points():
    lines = table.format_table([_sgd_row(h200_anchor_ms={"fused": 0.409})]).splitlines()
    assert "above 1 = fastcore5 faster" in lines[0]
    assert lines[1].split()[-4:] == ["H200", "anchor", "ms", "note"]
    assert lines[3].split() == ["sgd", "64M", "fp32", "step", "0.5", "0.45-0.55", "foreach", "1", "2.00x", "1.9-2.1x",
                                "80%", "copy"]
    assert lines[4].split() == ["fused", "0.25", "0.50x", "0.48-0.52x", "0.409"]
    assert lines[5].startswith("ms: median of the repeats")  # the legend follows the rows
    header, rule = lines[1], lines[2]
    # aligned: every column starts where its header does
    starts = [i for i, c in enumerate(rule) if c == "-" and (i == 0 or rule[i - 1] == " ")]
    assert lines[3][starts[4]:].lstrip().startswith("0.5") and header[starts[4]:].startswith("ours ms")
    assert "anchor" not in table.format_table([_sgd_row()])
    assert "noisy" not in table.format_table([_sgd_row()])


def test_a_row_too_noisy_to_trust_is_marked_and_the_legend_says_why():
    text = table.format_table([_sgd_row(spread=0.9)])
    [row_line] = [line for line in text.splitlines() if line.startswith("sgd")]
    assert row_line.endswith("noisy ~")
    assert "noisy ~: a ratio IQR wider than 20%" in text


def test_a_missed_target_is_marked_and_fails_the_run_only_with_check(tmp_path, capsys, monkeypatch):
    def cases(device, quick):
        slow = lambda: sum(range(20000))  # noqa: E731 - much slower than an empty call: ratio far below 1
        return [Case("sgd", "tiny", "fp32", "step", {"fastcore5": slow, "eager": lambda: None}, targets={"eager": 1.0})]

    monkeypatch.setattr(runner, "load_cases_module", lambda op: types.SimpleNamespace(cases=cases))
    argv = ["--quick", "--op", "sgd", "--out", str(tmp_path), "--no-plots"]
    assert runner.main(argv) == 0
    printed = capsys.readouterr().out
    assert ">=1x" in printed and "MISS" in printed and "--check would exit 1" in printed
    assert "target: the least ratio" in printed
    assert runner.main(argv + ["--check"]) == 1
    assert "1 case(s) missed a target" in capsys.readouterr().err


def test_results_go_to_the_current_folder_and_the_run_says_where(tmp_path, capsys, monkeypatch):
    def cases(device, quick):
        return [Case("sgd", "tiny", "fp32", "step", {"fastcore5": lambda: None, "eager": lambda: None})]

    monkeypatch.setattr(runner, "load_cases_module", lambda op: types.SimpleNamespace(cases=cases))
    monkeypatch.chdir(tmp_path)
    assert runner.main(["--quick", "--op", "sgd", "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert f"results will be written to {tmp_path / 'bench-results'}" in printed
    [written] = (tmp_path / "bench-results").glob("bench-*.json")
    assert f"JSON: {written}" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line(capsys, monkeypatch):
    monkeypatch.setattr(runner, "measure_ceilings", lambda *a: pytest.fail("started measuring"))
    assert runner.main(["--device", "cuda"]) == 2
    assert_one_error_line(capsys, "python -m bench: error: --device cuda: no CUDA device here")


def test_the_shipped_anchors_file_is_found_and_matches_the_cases():
    anchors, path = runner.load_anchors()
    assert path is not None and path.is_relative_to(REPO_ROOT / "fastcore5" / "bench")
    assert anchors["device"] == "NVIDIA H200"
    assert anchors["linrelu.bf16.1024x1024x1024.eager_fwd_ms"] > 0


def test_a_fraction_above_the_ceiling_is_marked_and_explained(tmp_path, capsys, monkeypatch):
    def cases(device, quick):
        return [Case("linear_relu", "8x8x8", "fp32", "fwd", {"fastcore5": lambda: None, "eager": lambda: None}, flops=1e15)]

    monkeypatch.setattr(runner, "load_cases_module", lambda op: types.SimpleNamespace(cases=cases))
    assert runner.main(["--quick", "--op", "linear_relu", "--out", str(tmp_path), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    fraction = _only_json(tmp_path)["results"][0]["fraction_of_matmul_ceiling"]
    assert fraction > 1
    assert f"{fraction:.0%} matmul*" in printed
    assert "1 case(s) ran faster than the ceiling measured" in printed
    assert "faster than the ceiling" in " ".join(_only_json(tmp_path)["notes"])


def assert_one_error_line(capsys, start: str) -> str:
    """What the runner printed to stderr is one line, beginning with ``start``; that line."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(start), err
    return err[0]


@pytest.mark.parametrize("problem", ["file", "under_a_file"])
def test_bad_out_folder_fails_before_any_measurement(tmp_path, capsys, monkeypatch, problem):
    monkeypatch.setattr(runner, "measure_ceilings", lambda *a: pytest.fail("measured before checking --out"))
    blocker = tmp_path / "taken"
    blocker.write_text("")
    out = blocker if problem == "file" else blocker / "results"
    assert runner.main(["--quick", "--out", str(out)]) == 2
    assert_one_error_line(capsys, f"python -m bench: error: --out {out}:")


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--host", "--train"], "--host and --train"),
        (["--json", "x.json"], "--json is for --host"),
        (["--train", "--json", "x.json"], "--json is for --host"),
        (["--host", "--op", "sgd"], "--op picks kernel benchmarks; --host"),
        (["--train", "--op", "sgd"], "--op picks kernel benchmarks; --train"),
        (["--host", "--device", "cpu"], "--device picks where the kernel benchmarks run; --host"),
    ],
)
def test_options_a_run_would_ignore_are_refused_in_one_line(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("started the host benchmark"))
    monkeypatch.setattr(runner, "measure_ceilings", lambda *a: pytest.fail("started measuring"))
    assert runner.main(argv) == 2
    assert_one_error_line(capsys, f"python -m bench: error: {named}")


@pytest.mark.parametrize("problem", ["folder", "under_a_file"])
def test_bad_host_json_path_fails_before_the_host_benchmark_starts(tmp_path, capsys, monkeypatch, problem):
    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("started the host benchmark before checking --json"))
    blocker = tmp_path / "taken"
    blocker.write_text("")
    json_path = tmp_path if problem == "folder" else blocker / "host.json"
    assert runner.main(["--host", "--json", str(json_path)]) == 2
    assert_one_error_line(capsys, f"python -m bench: error: --json {json_path}:")


def test_bad_backend_variable_is_one_line(capsys, monkeypatch):
    monkeypatch.setenv("FASTCORE5_BACKEND", "bogus")
    monkeypatch.setattr(runner, "measure_ceilings", lambda *a: pytest.fail("measured with a bad FASTCORE5_BACKEND"))
    assert runner.main(["--quick"]) == 2
    line = assert_one_error_line(capsys, "python -m bench: error: FASTCORE5_BACKEND='bogus'")
    assert all(name in line for name in ("triton", "cuda", "torch", "auto"))


_COMPILING_BENCH_RUN = """
import sys, types, torch
from fastcore5 import backends
from fastcore5.bench import runner
from fastcore5.bench.common import Case

def cases(device, quick):
    x = torch.ones(4)
    compiled = torch.compile(lambda t: t + 1)  # as the real cases do: inductor, imported on first use
    return [Case("linear_relu", "4", "fp32", "fwd", {"fastcore5": lambda: x + 1, "torch.compile": lambda: compiled(x)})]

runner.load_cases_module = lambda op: types.SimpleNamespace(cases=cases)
sys.exit(runner.main(["--quick", "--op", "linear_relu", "--no-plots", "--out", sys.argv[1]]))
"""


def test_bench_runs_under_python_w_error_deprecation_warning(tmp_path):
    """`python -W error::DeprecationWarning -m bench` finds deprecations in our code only: torch's
    own, from importing inductor for torch.compile, does not end the run."""
    done = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", _COMPILING_BENCH_RUN, str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "torch.compile" in done.stdout and "DeprecationWarning" not in done.stderr


def test_cli_bench_subcommand_reaches_the_runner(capsys):
    from fastcore5.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--help"])
    assert exit_info.value.code == 0
    assert "usage: fastcore5 bench" in capsys.readouterr().out


@pytest.mark.slow
def test_host_benchmark_starts_in_a_process_that_runs_on_this_device(tmp_path, monkeypatch):
    """--host runs fastcore5.bench.host in a fresh process; without a GPU that process needs Triton's
    interpreter on from its start (importing fastcore5 imports triton). The runner's own command
    and environment, with a few calls instead of thousands. The parent's -W options reach the
    child: here a deprecation in our code fails it, as under `python -W error::DeprecationWarning`."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as in a user's shell (conftest sets it for the tests)
    monkeypatch.setattr(sys, "warnoptions", ["error::DeprecationWarning"])
    real_call, commands = subprocess.call, []

    def call_with_few_calls(command, **kwargs):
        commands.append(command)
        return real_call(command + ["--calls", "5", "--rounds", "1"], timeout=300, **kwargs)

    monkeypatch.setattr(subprocess, "call", call_with_few_calls)
    report_path = tmp_path / "host.json"
    assert runner.main(["--host", "--json", str(report_path)]) == 0
    assert commands[0][1:3] == ["-Werror::DeprecationWarning", "-m"]
    report = json.loads(report_path.read_text())
    assert {row["op"] for row in report["cases"]} == {"linear_relu", "embedding_dot_bias", "sgd"}
    assert all(row["fastcore5_us"] > 0 and row["eager_us"] > 0 for row in report["cases"])
    if not torch.cuda.is_available():
        # the C++ CPU kernel where there is one (real work on tiny tensors), else the interpreter
        # with its launch stubbed: the hot path measured either way
        native = backends.unavailable_reason("cpu", "linear_relu", torch.device("cpu")) is None
        assert report["backend"] == ("cpu" if native else "triton")


def test_host_table_says_which_way_its_ratio_points_and_marks_misses_and_noise():
    def case(entry, ratio, quartiles, target):
        return {"op": "linear_relu", "entry": entry, "fastcore5_us": 6.0, "eager_us": 4.0, "eager": "F.relu(F.linear)",
                "ratio": ratio, "ratio_quartiles": quartiles, "target_ratio": target,
                "meets_target": None if target is None else ratio <= target}

    report = {"device": "cpu", "backend": "triton", "launches": "stubbed",
              "cases": [case("forward", 1.6, [1.58, 1.6, 1.62], 1.5), case("fwd+bwd", 1.0, [0.5, 1.0, 1.5], None)]}
    text = table.host_table(report)
    assert "below 1 = fastcore5 costs the host less" in text
    forward, noisy = [line for line in text.splitlines() if line.startswith("linear_relu")]
    assert forward.split()[2:7] == ["6.0", "4.0", "1.6", "1.58-1.62", "<=1.5"] and " MISS " in forward
    assert "noisy ~" in noisy and "MISS" not in noisy
    assert "MISS: above it" in text and "noisy ~: a ratio IQR wider" in text
