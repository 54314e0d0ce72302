#!/usr/bin/env bash
# Mutation testing of vlmeff's core (pruners, engine, api, patching) with mutmut 3; see docs/mutation.md.
# Not part of CI's default run (a full run takes hours on a small machine).
#
#   tools/mutation.sh                              # every mutant of [tool.mutmut] only_mutate in pyproject.toml
#   tools/mutation.sh 'vlmeff.pruners.select.*'    # a slice: mutant-name globs (module.x_function__mutmut_N)
#
# Env: PYTHON (default .venv/bin/python), MUTMUT_JOBS (parallel mutants, default: the number of cores).
# Results stay in mutants/ (git-ignored); a second run re-tests only mutants of functions that changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
unset PYTHONPATH   # the tests must import the mutated copy in mutants/, never this checkout
"$PY" -m mutmut run --max-children "${MUTMUT_JOBS:-$(nproc)}" "$@"
# one line per mutant that was not killed (survived, timeout, no tests, ...); a slice leaves the rest not checked
"$PY" -m mutmut results | { grep -v ': not checked$' || true; }
