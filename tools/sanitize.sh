#!/usr/bin/env bash
# Build fastnorm with AddressSanitizer + UndefinedBehaviorSanitizer (and Cython's
# bounds checks) in a scratch copy of the tracked files, then run the tests under it.
#
#   bash tools/sanitize.sh                 # the whole suite except slow and mpi tests
#   bash tools/sanitize.sh tests/test_lrn.py -k backward   # any pytest arguments
#
# The working tree is never built into: the scratch copy is removed at the end
# (set FASTNORM_SANITIZE_KEEP=1 to keep it). Any ASan report or UBSan error ends
# the run with a non-zero exit (halt_on_error), so a clean exit means a clean run.
# Leak detection is off: CPython itself keeps allocations alive until exit.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
scratch="$(mktemp -d)"
if [[ "${FASTNORM_SANITIZE_KEEP:-}" != "1" ]]; then
    trap 'rm -rf "$scratch"' EXIT
fi

echo "== scratch copy: $scratch"
(cd "$repo" && git ls-files -z | xargs -0 cp --parents -t "$scratch")
# (the working versions of tracked files: uncommitted edits are included)
cd "$scratch"

echo "== sanitizer build (FASTNORM_SANITIZE=1)"
start=$SECONDS
FASTNORM_SANITIZE=1 "$python" setup.py build_ext --inplace > build.log 2>&1 \
    || { cat build.log; exit 1; }
echo "   built in $((SECONDS - start)) s"

asan_runtime="$(gcc -print-file-name=libasan.so)"
export LD_PRELOAD="$asan_runtime"
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:allocator_may_return_null=1"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
export PYTHONPATH="$scratch"
export PYTHONFAULTHANDLER=1

"$python" -c "import fastnorm; fastnorm.show_config()"
if [[ $# -eq 0 ]]; then
    # test_benchmarks times runs and imports matplotlib, whose import aborts under the
    # preloaded ASan runtime (not fastnorm code): left out of the default run
    set -- tests -m "not slow and not mpi" --ignore=tests/test_benchmarks.py
fi
echo "== pytest $*"
start=$SECONDS
"$python" -m pytest -q -p no:cacheprovider "$@"
echo "== sanitizer run clean: tests took $((SECONDS - start)) s"
