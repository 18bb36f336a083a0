"""The job-file fuzz of tests/reliability/test_fuzz_jobs.py at full size (10,000+ documents), with figures.

    python -m benchmarks.fuzz_jobs [--per-generator 2600]

Runs each of the suite's four generators `--per-generator` times (CI runs 150 each) and prints how many
documents were checked, how they ended, and the time taken. Any document that makes loading raise
something other than JobSpecError fails the run with hypothesis's minimal example.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

SUITE = Path(__file__).resolve().parents[1] / "tests" / "reliability"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-generator", type=int, default=2600, help="examples per generator (4 generators)")
    args = parser.parse_args()
    os.environ["LANCE_RAY_FUZZ_EXAMPLES"] = str(args.per_generator)  # read when the suite module is imported
    sys.path.insert(0, str(SUITE))
    import test_fuzz_jobs as suite

    generators = [suite.test_yaml_token_soup, suite.test_arbitrary_text, suite.test_valid_job_with_random_values,
                  suite.test_random_prompt_templates]
    started = time.perf_counter()
    for generator in generators:
        before = sum(suite.OUTCOMES.values())
        t0 = time.perf_counter()
        generator()
        print(f"{generator.__name__:<36} {sum(suite.OUTCOMES.values()) - before:>6} checks "
              f"{time.perf_counter() - t0:7.1f} s", flush=True)
    documents = suite.OUTCOMES["loaded"] + suite.OUTCOMES["refused"]
    print(f"job documents: {documents:,} ({suite.OUTCOMES['loaded']:,} loaded, {suite.OUTCOMES['refused']:,} "
          "refused with JobSpecError, 0 other exceptions)")
    templates = {k: v for k, v in suite.OUTCOMES.items() if k.startswith("template")}
    print(f"templates rendered against rows: {templates}")
    print(f"total {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
