"""README.md as a script: its `bash` blocks, in order, in a fresh copy of the repository's
tracked files, and the API snippet. A block fails the test if it exits non-zero or prints a
traceback. Blocks preceded by `<!-- readme-test: skip (reason) -->` are not run; exactly the
set-up, the test-suite and the GPU/dataset blocks may carry that mark.

The installed environment running this test is the one the commands use (its `varformer`
package, whose kernels and benchmarks subpackages map to this repository's folders); the copy
gives them a fresh working folder with only the tracked files (configs, README). With
`VARFORMER_BENCH_SMOKE=1`, `varformer bench --quick` runs one tiny case per op, once."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<why>[^)]*)\)\s*-->")
EXPECTED_SKIPS = 3     # set-up, the test suite, the paper's multi-GPU runs


def blocks(text: str, lang: str):
    """[(code, skip_reason or None)] of the ```lang fenced blocks of ``text``, in order."""
    out = []
    for m in re.finditer(rf"^```{lang}\n(.*?)^```", text, re.S | re.M):
        before = text[:m.start()].rstrip().splitlines()
        skip = SKIP.fullmatch(before[-1].strip()) if before else None
        out.append((m.group(1), skip.group("why") if skip else None))
    return out


def test_readme_parsing_and_skips():
    bash = blocks(README.read_text(encoding="utf-8"), "bash")
    skipped = [(code, why) for code, why in bash if why is not None]
    assert len(skipped) == EXPECTED_SKIPS, [why for _, why in skipped]
    assert "pip install" in skipped[0][0] and "set-up" in skipped[0][1]
    assert any("pytest" in code and "tests" in code for code, _ in skipped)
    run = [code for code, why in bash if why is None]
    assert any("varformer train" in c for c in run) and any("varformer bench" in c for c in run)
    assert blocks("x\n<!-- readme-test: skip (why) -->\n```bash\nls\n```\n", "bash") == \
        [("ls\n", "why")]


def _copy_tracked(dst: Path) -> None:
    try:
        names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                               capture_output=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.fail(f"git ls-files failed in {ROOT}: {e}")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def _run(script: str, cwd: Path, env: dict, what: str, timeout: int = 1200) -> str:
    res = subprocess.run(["bash", "-eo", "pipefail", "-c", script], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=timeout)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"{what} exited {res.returncode}:\n{script}\n{out[-4000:]}"
    assert "Traceback" not in out, f"{what} printed a traceback:\n{script}\n{out[-4000:]}"
    return out


def test_readme_commands_run_in_order(tmp_path):
    repo = tmp_path / "repo"
    _copy_tracked(repo)
    env = dict(os.environ, VARFORMER_BENCH_SMOKE="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env.pop("TRITON_INTERPRET", None)          # a user's shell does not set it
    env.pop("VARFORMER_BACKEND", None)
    text = (repo / "README.md").read_text(encoding="utf-8")
    run = [code for code, why in blocks(text, "bash") if why is None]
    assert run
    outputs = [_run(code, repo, env, f"README bash block {i + 1}") for i, code in enumerate(run)]
    # what the commands promise
    assert (repo / "runs" / "restored" / "sample_0.png").is_file()
    assert "PSNR" in (repo / "runs" / "eval" / "results.md").read_text()
    assert any("varformer train: done at step 2" in o for o in outputs)


def test_readme_api_snippet_runs(tmp_path):
    text = README.read_text(encoding="utf-8")
    api = text[text.index("\n## API\n"):]
    code = blocks(api, "python")[0][0]
    assert "vo.backends()" in code
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TRITON_INTERPRET", None)
    script = tmp_path / "snippet.py"
    script.write_text(code)
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "reference" in res.stdout and "available" in res.stdout
