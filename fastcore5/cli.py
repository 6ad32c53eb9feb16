"""The `fastcore5` command (also `python -m fastcore5`): `demo` and `bench`."""
from __future__ import annotations

import argparse
import sys

from .backends import BackendConfigError, check_environment
from .demo import DemoError, DemoOptions, RatingsFileError
from .demo.collab import CollabSettings
from .demo.digits import DigitsSettings

_COLLAB, _DIGITS = CollabSettings(), DigitsSettings()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcore5",
        description="fastcore5: fused GPU kernels for the fast.ai lesson-5 building blocks.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser(
        "demo",
        help="train the lesson-5 models with the fused ops (works without a GPU and without downloads)",
        description=(
            "Part 1 (collab): fastcore5.nn.EmbeddingDotBias trained with fastcore5.optim.SGD (momentum, weight "
            "decay, one-cycle schedule) on MovieLens-style ratings, train and validation MSE per epoch, then the "
            "lesson's interpretation (highest/lowest item biases, principal components of the item factors). "
            "Part 2 (digits): an MLP of fastcore5.nn.LinearReLU layers on scikit-learn's 8x8 digits, body frozen "
            "for one epoch then discriminative learning rates per layer group. Reports which backend ran each op "
            "and how long each part took."
        ),
        epilog=(
            "Without a CUDA GPU every op runs its plain-PyTorch reference. To run the Triton kernels on a CPU, "
            "start with TRITON_INTERPRET=1 in the environment (Triton's interpreter: correct but seconds per "
            "step, so use small settings, e.g. TRITON_INTERPRET=1 fastcore5 demo --part digits --epochs 1)."
        ),
    )
    demo.add_argument("--part", choices=("all", "collab", "digits"), default="all", help="which part to run (default: all)")
    demo.add_argument(
        "--epochs", type=_positive_int, metavar="N",
        help=f"training epochs of every part that runs (default: collab {_COLLAB.epochs}; digits {_DIGITS.epochs} "
        f"after {_DIGITS.freeze_epochs} frozen)",
    )
    demo.add_argument(
        "--batch-size", type=_positive_int, metavar="N",
        help=f"mini-batch size of every part that runs (default: collab {_COLLAB.batch_size}, digits {_DIGITS.batch_size})",
    )
    demo.add_argument(
        "--lr", type=_positive_float, metavar="LR",
        help=f"peak learning rate of the one-cycle schedule (default: collab {_COLLAB.lr:g}; digits {_DIGITS.lr:g} for "
        f"the head, down to lr/{_DIGITS.lr_spread:g} for the first layer). The two models want rates an order of "
        "magnitude apart, so pair a custom --lr with --part",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for the synthetic ratings, the splits, the init and the shuffling (default: 0)")
    demo.add_argument(
        "--device", default="auto",
        help="where to train: auto (cuda when a GPU is visible, else cpu), cpu, cuda or cuda:N (default: auto)",
    )
    demo.add_argument(
        "--backend", choices=("auto", "triton", "cuda", "cpu", "torch"), default="auto",
        help="force one backend for every op: triton (fused Triton kernels; on a CPU only under TRITON_INTERPRET=1), "
        "cuda (fused CUDA C++ kernels, if the extension was built), cpu (fused C++ CPU kernels, where an op has "
        "one), torch (the plain-PyTorch reference); auto picks "
        "the fastest available per op (default: auto, or $FASTCORE5_BACKEND)",
    )
    demo.add_argument(
        "--ratings", metavar="PATH",
        help="train part 1 on real MovieLens data instead of the built-in synthetic set: an ml-100k folder (or its "
        "u.data; titles from u.item) or an ml-latest(-small) folder (or its ratings.csv; titles from movies.csv)",
    )
    demo.add_argument(
        "--plots", metavar="DIR",
        help="also save PNG plots in DIR: learning curves of both parts, item biases, the item factors' principal components",
    )

    commands.add_parser(
        "bench",
        add_help=False,
        help="run the benchmarks (the same as `python -m bench` in a checkout; see `fastcore5 bench --help`)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # Progress shows as it happens when the output goes to a pipe or a log file too.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    options = DemoOptions(
        part=args.part, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        device=args.device, backend=args.backend, ratings=args.ratings, plots=args.plots,
    )
    from .demo import run_demo

    try:
        check_environment()
        run_demo(options)
    except (DemoError, RatingsFileError, BackendConfigError) as err:
        print(f"fastcore5 demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def _bench(argv: list[str]) -> int:
    from .bench.runner import main as bench_main  # imported on demand: the demo does not need it

    return bench_main(argv, prog="fastcore5 bench")
