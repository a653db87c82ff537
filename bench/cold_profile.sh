#!/usr/bin/env bash
# Cold start of `kiln generate --max-tokens 1` on one GGUF file: three timed fresh processes (the first also
# writes bytecode caches), then one under -X importtime and one under cProfile. Output under $OUT:
# cold_times.txt, importtime.txt (the 30 slowest imports), cold_profile.txt (top 70 by cumulative time),
# cold_tottime.txt (top 40 by own time) and cold.prof (the whole profile, for pstats).
# Usage (repo root): OUT=dir bash bench/cold_profile.sh FILE.gguf
set -u
M=$1; OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GEN=(-m kiln.cli generate --model "$M" --max-tokens 1 --prompt Hello)
for i in 1 2 3; do
  python -c 'import subprocess, sys, time; t = time.perf_counter(); r = subprocess.run([sys.executable] + sys.argv[1:], capture_output=True); print(f"cold run: {time.perf_counter() - t:.2f} s rc {r.returncode}")' "${GEN[@]}"
done | tee "$OUT/cold_times.txt"
python -X importtime "${GEN[@]}" 2>&1 >/dev/null | grep "import time" | sort -t'|' -k2 -n | tail -30 > "$OUT/importtime.txt"
tail -12 "$OUT/importtime.txt"
# main() under the profiler, not the entry point: its quick exit (kiln/startup.py) would end before the profile is
# written. sys.orig_argv says `-m kiln`, so the GPU's context begins beside torch's import as the command's does;
# the import itself is outside the profile (cold_timeline.py and importtime.txt time it).
python -c "import sys; sys.orig_argv = [sys.executable, '-m', 'kiln'] + sys.argv[1:]; import cProfile
from kiln.cli import main; cProfile.run('main(sys.argv[1:])', '/tmp/cold.prof')" "${GEN[@]:2}" > /dev/null 2>&1
cp /tmp/cold.prof "$OUT/cold.prof"
python -c "import pstats; pstats.Stats('/tmp/cold.prof').sort_stats('cumulative').print_stats(70)" > "$OUT/cold_profile.txt"
python -c "import pstats; pstats.Stats('/tmp/cold.prof').sort_stats('tottime').print_stats(40)" > "$OUT/cold_tottime.txt"
grep -E "function calls|kiln/|cuda|triton" "$OUT/cold_profile.txt" | head -45
