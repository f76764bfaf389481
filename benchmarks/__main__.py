"""``python -m benchmarks {models,data,train,validate,checkpoint,gpu} [options]`` (``--help`` on each)."""
import importlib
import sys

NAMES = ("models", "data", "train", "validate", "checkpoint", "gpu")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in NAMES:
        print(f"usage: python -m benchmarks {{{','.join(NAMES)}}} [options]  (--help on each)", file=sys.stderr)
        return 2
    return importlib.import_module(f"benchmarks.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
