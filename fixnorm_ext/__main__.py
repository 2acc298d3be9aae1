"""Command line of fixnorm_ext: ``python -m fixnorm_ext <command> --help``."""
import argparse
import sys

from fixnorm_ext import bench, experiment, tune_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fixnorm_ext",
                                     description="FixNorm optimizer tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    bench_parser = commands.add_parser(
        "bench", help="time one optimizer step: FusedFixNorm backends against SGD",
        description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.main)
    tune_parser = commands.add_parser(
        "tune", help="tune lr and fc_norm on a real-data example in a few trials",
        description=tune_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tune_cli.add_arguments(tune_parser)
    tune_parser.set_defaults(run=tune_cli.main)
    experiment_parser = commands.add_parser(
        "experiment", help="FixNorm vs weight decay and the tuner vs its baselines on real data, into docs/",
        description=experiment.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    experiment.add_arguments(experiment_parser)
    experiment_parser.set_defaults(run=experiment.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
