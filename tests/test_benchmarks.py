"""benchmarks.decisions: every measurement runs end to end at tiny sizes and reports what it says.

The report comes from the real command, ``python -m benchmarks --tiny --json PATH`` (the real
measurements at tiny sizes). No timing is asserted (rates on a shared machine mean nothing at
these sizes): only that each section is there, its figures are finite and its rates positive, the
organism's size was what the section claims, and the table prints."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import decisions

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """``python -m benchmarks --tiny --json PATH`` as a user runs it: (its stdout, the JSON file)."""
    path = tmp_path_factory.mktemp("benchmarks") / "out.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks", "--tiny", "--json", str(path)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout, json.loads(path.read_text())


@pytest.fixture(scope="module")
def report(cli):
    return cli[1]


def positive(rate: dict) -> bool:
    return rate["median"] > 0 and rate["low"] > 0 and rate["high"] >= rate["low"] and rate["repeats"] >= 1


def test_sections_present(report):
    for key in ("dense_matmul", "organism_eval", "env_step", "naive_reference", "organism_learning",
                "pruning", "memory", "ratios", "min_cpu_share", "seconds"):
        assert key in report
    json.dumps(report)  # the report is plain JSON


def test_learning_rates(report):
    settings = decisions.Settings.tiny()
    rows = report["organism_learning"]
    assert [(r["hidden"], r["batch"]) for r in rows] == [(32, 4)]
    row = rows[0]
    assert positive(row["eval_full_loop"])
    assert set(row["rules"]) == set(settings.learning_rules) == {"reinforce", "rstdp"}
    for measured in row["rules"].values():
        assert positive(measured["decisions_per_s"])
        assert measured["updates"] >= 1  # the update is inside the measured loop
        assert measured["learning_over_eval"] > 0
        assert sum(measured["time_shares"].values()) == pytest.approx(1.0)
        assert "target_learning_over_eval" not in measured  # targets are stated at H = 512 only


def test_pruning_really_grew_and_pruned(report):
    p = report["pruning"]
    assert p["pruned_from"] == 96 and p["pruned_to"] == 48
    assert p["before_pruning"]["hidden"] == 96 and p["after_pruning"]["hidden"] == 48
    assert p["grown"]["grow_events"] >= 1 and p["neurons_removed"] == 48
    for side in (p["before_pruning"], p["after_pruning"]):
        assert positive(side["full_loop"]) and positive(side["organism_only"])
        assert positive(side["learning"]["decisions_per_s"])
    assert set(p["speedup"]) == {"full_loop", "organism_only", "learning"}
    assert isinstance(p["meets_target"], bool)


def test_memory_subprocess(report):
    (m,) = report["memory"]
    assert m["rule"] == "rstdp" and m["hidden"] == 64 and m["hidden_at_end"] == 64
    assert m["updates"] >= 1
    assert m["peak_source"] in ("VmHWM", "ru_maxrss")
    assert (m["peak_rss_bytes"] >= m["peak_rss_after_learning_bytes"] >= m["peak_rss_after_organism_bytes"]
            >= m["rss_after_imports_bytes"] > 0)
    assert m["parameter_and_adam_bytes"] > 0
    assert "target_bytes" not in m  # the target is stated at H = 1024 only


def test_table_prints(report):
    text = decisions.table(report)
    for heading in ("organism_eval", "organism_learning", "pruning", "memory"):
        assert heading in text


def numbers(value, path=""):
    """(path, number) for every number in a JSON value."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from numbers(item, f"{path}.{key}")
    elif isinstance(value, list):
        for k, item in enumerate(value):
            yield from numbers(item, f"{path}[{k}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def test_cli_writes_json(cli):
    """The command prints the table, then the report, and writes the same report to PATH: the
    tiny settings' sections, every figure finite and every measured one positive (the settings
    may hold zeros; so may counts of skipped non-finite updates)."""
    stdout, report = cli
    assert json.loads(stdout[stdout.index("\n{") + 1:]) == report
    assert stdout.index("organism_learning") < stdout.index("\n{")  # the table comes first
    assert report["settings"]["hidden_sizes"] == list(decisions.Settings.tiny().hidden_sizes)
    assert [(r["hidden"], r["batch"]) for r in report["organism_eval"]] == [(32, 8)]
    figures = list(numbers({k: v for k, v in report.items() if k != "settings"}))
    assert len(figures) > 50
    for path, value in figures:
        assert math.isfinite(value), path
        if not path.endswith("_skipped"):
            assert value > 0, (path, value)


def test_learning_cli_measures_the_sizes_asked_for_each_time(tmp_path, capsys):
    from benchmarks.learning import main as learning_main

    out = tmp_path / "learning.json"
    assert learning_main(["--hidden", "32", "--batch", "4", "--rule", "rstdp", "--repeats", "2",
                          "--repeat-seconds", "0.01", "--times", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["organism_learning"]
    assert [(r["hidden"], r["batch"], list(r["rules"])) for r in rows] == [(32, 4, ["rstdp"])] * 2
    for row in rows:
        assert positive(row["eval_full_loop"]) and positive(row["rules"]["rstdp"]["decisions_per_s"])
        assert row["rules"]["rstdp"]["learning_over_eval"] > 0 and row["rules"]["rstdp"]["updates"] >= 1
    assert capsys.readouterr().out.count("H=32 B=4: learning/eval rstdp ") == 2


def test_learning_cli_refuses_a_bad_size_in_one_line(capsys):
    from benchmarks.learning import main as learning_main

    with pytest.raises(SystemExit) as exit_:
        learning_main(["--batch", "0"])
    assert exit_.value.code == 2
    assert "argument --batch: must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("setting, message", [
    ("organism.bogus=3", "--set organism.bogus: no such organism setting"),
    ("organism.init_hidden=1024", "init_hidden: must lie in [min_hidden, max_hidden] = [32, 256], got 1024"),
])
def test_population_benchmark_refuses_a_bad_organism_setting_before_running(setting, message, capsys):
    """benchmarks.population applies organism.* settings to its own organisms as well as the
    run's, so it checks them first: one line, exit status 2, nothing measured."""
    from benchmarks import population

    with pytest.raises(SystemExit) as stop:
        population.main(["--pop", "2", "--generations", "1", "--set", setting])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "sequential:" not in err


def test_population_benchmark_refuses_a_population_too_small_to_split(capsys):
    """Half of the organisms run on each side of every Ray run: --pop 1 is one line, exit 2."""
    from benchmarks import population

    with pytest.raises(SystemExit) as stop:
        population.main(["--pop", "1", "--generations", "1"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "--pop: must be at least 2" in err and "sequential:" not in err


def test_resident_reads_the_rss_and_its_peak_of_live_processes_only():
    """benchmarks.run_memory.resident: a child that touched 200 MB and gave it back shows the
    200 MB in its peak and not in its RSS; a finished process is left out."""
    import subprocess
    import sys

    from benchmarks.run_memory import resident

    child = subprocess.Popen(
        [sys.executable, "-c", "import sys\nb = bytearray(200 * 2**20)\nb[::4096] = b'x' * len(b[::4096])\n"
         "del b\nprint('ok', flush=True)\nsys.stdin.readline()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        (measured,) = resident([child.pid])
        assert measured["pid"] == child.pid and not measured["actor"]
        assert measured["rss_peak"] >= 200 * 2**20 > measured["rss"] > 0
    finally:
        child.communicate("\n", timeout=30)
    assert resident([child.pid]) == []
