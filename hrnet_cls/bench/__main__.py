"""Benchmarks: ``python -m hrnet_cls.bench {models,data,train,val,validate,checkpoint,gpu} [options]`` (``--help`` on each)."""
import importlib
import sys

BENCHMARKS = {
    'models': 'hrnet_cls.bench.models',  # train step speed / memory against timm's implementation
    'data': 'hrnet_cls.bench.data',  # train input pipeline from shards against timm's wds reader
    'train': 'hrnet_cls.bench.train',  # train-loop overhead against a bare loop, end-to-end images/s
    'val': 'hrnet_cls.bench.val',  # a 4-checkpoint validation sweep against 4 separate runs
    'validate': 'hrnet_cls.bench.validate',  # validate.py against timm's validate.py, images/s on the same data
    'checkpoint': 'hrnet_cls.bench.checkpoint',  # what verified (sha256) checkpoints cost to save, check, load
    'gpu': 'hrnet_cls.bench.gpu',  # the one-command GPU check (--smoke: the same code, tiny, on a CPU)
}


def main(argv: list) -> int:
    if not argv or argv[0] not in BENCHMARKS:
        print(f"usage: python -m hrnet_cls.bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    return importlib.import_module(BENCHMARKS[argv[0]]).main(argv[1:])


if __name__ == '__main__':
    raise SystemExit(main(sys.argv[1:]))
