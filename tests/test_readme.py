"""Every ```python block of README.md runs as written, each in a fresh interpreter (offline, from the repository
root's `vlmeff`, in a scratch folder so that files a snippet writes never land in the checkout), so a snippet
that a user would copy cannot silently rot."""
import ast
import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"^```python\n(.*?)^```$", README, flags=re.S | re.M)


def heading_above(snippet):
    """The README section a snippet sits in, to name its test."""
    before = README[:README.index(snippet)]
    return re.findall(r"^#+ (.*)$", before, flags=re.M)[-1]


@functools.cache
def run_snippet(code, timeout=600):
    """Runs `code` as a script in a new interpreter -> CompletedProcess; offline, one torch thread, Triton kernels
    interpreted on CPU machines (as tests/conftest.py sets them for the suite). Cached: each snippet runs once."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if os.environ.get("TRITON_INTERPRET"):
        env["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"]
    return subprocess.run([sys.executable, "-c", code], cwd=tempfile.mkdtemp(prefix="readme-"), env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_every_python_block_is_found():
    assert len(SNIPPETS) == README.count("```python") >= 2
    for code in SNIPPETS:
        ast.parse(code)


@pytest.mark.parametrize("code", SNIPPETS, ids=[f"{i}-{heading_above(c)}" for i, c in enumerate(SNIPPETS)])
def test_snippet_runs_as_written(code):
    if "easyvqa" in code:
        pytest.importorskip("easy_vqa")
    done = run_snippet(code)
    assert done.returncode == 0, f"README snippet failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"
    assert done.stdout.strip(), "a README snippet should show its result"


def test_lvlm_snippet_prints_one_answer_word_per_question():
    """The LVLM example prints the answers it generates (each one of easy-VQA's answer words), then the stats."""
    pytest.importorskip("easy_vqa")
    from vlmeff.data import easyvqa
    code = next(c for c in SNIPPETS if "model.generate" in c)
    done = run_snippet(code)
    assert done.returncode == 0, done.stderr[-4000:]
    answers = ast.literal_eval(done.stdout.splitlines()[0])
    assert len(answers) == 2 and set(answers) <= set(easyvqa.answers())


def test_a_broken_snippet_fails():
    """The runner reports a failing snippet (a raised error is a non-zero exit status with the traceback)."""
    done = run_snippet("import vlmeff\nvlmeff.patch(None, method='cls', keep=0.25)")
    assert done.returncode != 0 and "Traceback" in done.stderr
