"""`varformer bench` end to end on CPU, on tiny shapes."""
import csv

from varformer import cli
from varformer.benchmarks import bench_mediator_attention as bench


def test_bench_prints_table_and_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("VARFORMER_BENCH_SMOKE", "1")      # one tiny case per op, once
    monkeypatch.setattr(bench, "SMOKE", [(1, 2, 256, 16, 32)])
    # a comma list of ops (the model's smoke run is in tests/test_bench_harness.py)
    assert cli.main(["bench", "--quick", "--device", "cpu", "--op", "mediator_attention, vq",
                     "--rounds", "2", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "- timing: one call per implementation (VARFORMER_BENCH_SMOKE=1" in out
    assert "--rounds 2 --out" in out      # the command line that reproduces the run
    assert "\n## vq\n" in out and "## window_attention" not in out and "## model" not in out
    lines = [ln for ln in out.splitlines() if ln.startswith("| mediator_attention")]
    # eager baseline, fused, two SDPA calls; forward and forward+backward
    assert len(lines) == 6
    assert all("nan" not in ln for ln in lines)
    rows = list(csv.DictReader(open(tmp_path / "mediator_attention_cpu.csv")))
    assert {r["provider"] for r in rows} == {"eager (official)", "fused", "sdpa x2"}
    assert all(float(r["ms"]) > 0 and float(r["peak_mb"]) >= 0 for r in rows)
    assert (tmp_path / "bench_cpu.md").read_text().count("| mediator_attention") == 6
    assert (tmp_path / "mediator_attention_cpu.png").stat().st_size > 0


def test_bench_rejects_unknown_op(capsys):
    assert cli.main(["bench", "--op", "nope", "--device", "cpu"]) == 2
    assert "unknown --op" in capsys.readouterr().err
    assert cli.main(["bench", "--op", "vq,nope", "--device", "cpu"]) == 2
    assert "unknown --op 'nope'" in capsys.readouterr().err

