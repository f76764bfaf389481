"""``python -m hrnet_cls.bench gpu``: the GPU check in one command (``--smoke``: the same code, tiny, on a CPU).

Sections (``--sections 1,4`` runs some of them):

1. train step: timm ``hrnet_w18`` (eager, NCHW) against ours (NHWC, eager and compiled), plus
   ``hrnet_w44_c`` and ``hrnet_w48_c``: images/s, peak memory, model FLOP utilisation;
2. gradient checkpointing: its memory saving and its time cost;
3. fp16 with GradScaler through the training engine: finite loss, host syncs per step;
4. validation at batch 1024: ours (BatchNorm folded, NHWC, compiled) against timm's eager model,
   and both validate.py paths end to end on the synthetic shards;
5. the input pipeline with every core against the train step's demand, and nvJPEG decoding;
6. a short real ``train.py`` run (bf16, channels_last, compile) on the synthetic shards.

Each section has a time budget and the whole command a time limit; a row that fails or runs out
of time records its error and the command goes on. Results: ``OUT/gpu.json`` (written after every
section) and ``OUT/gpu.md``.
"""
from hrnet_cls.bench.gpu.run import main

__all__ = ["main"]
