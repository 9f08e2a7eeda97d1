"""Wall time of executing HumanEval's 164 canonical solutions the way `evaluate_pass_at_k` does.

``python bench/sandbox_wall.py [ROUNDS]``: each round runs `check_completion` over all problems with the
evaluation's default two workers; prints each round's seconds, the median and how many passed.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from wmtp_lib.data.sources import load_humaneval
from wmtp_lib.eval.execution import check_completion, isolation


def one_round(problems) -> tuple[float, int]:
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda p: check_completion(p.completion, p.tests, p.io_tests, p.exec_prefix, 20.0),
                                problems))
    return time.perf_counter() - start, sum(r.passed for r in results)


def main(rounds: int) -> None:
    problems = load_humaneval()
    print(f"sandbox level {isolation()}, {len(problems)} problems")
    times = []
    for i in range(rounds):
        seconds, passed = one_round(problems)
        times.append(seconds)
        print(f"round {i}: {seconds:.2f} s, {passed}/{len(problems)} passed", flush=True)
    print(f"median {statistics.median(times):.2f} s over {rounds} rounds")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
