"""Op microbenchmark (same as `autoft-fast bench ops`). Run: python benchmarks/bench_ops.py --help"""

from autoft_fast.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
