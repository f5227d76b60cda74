import os

if os.environ.get("CONSISTENT_DIFFUSION_BENCH_PARENT"):  # a `bench --workers` process: before the heavy imports
    from consistent_diffusion.bench.workers import die_with_parent

    die_with_parent()

from consistent_diffusion.cli.main import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
