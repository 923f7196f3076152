"""adapterd.trainer: trains LoRA and P-Tuning v2 adapters for the daemon (``adapterd train``).

config.py      TrainConfig: every option, its help text, defaults from the reference recipes, validation
data.py        Alpaca JSON / JSON lines -> checked records -> prompt-masked token ids -> batches
model.py       the frozen base (int8 / nf4 / none), the PEFT adapter, the forward pass (own prefix forward)
loop.py        the training loop: steps, schedule, eval, stop requests, torchrun data parallel
checkpoint.py  RUN_DIR/checkpoint-N (PEFT adapter + exact-resume state), atomic writes, keep-last-K, export
status.py      RUN_DIR/status.json, rewritten atomically every step; NVML readings when a GPU is there
resume.py      what a starting trainer finds: a completed run, a stale STOP, metrics lines to drop
runlock.py     RUN_DIR/trainer.lock and pid + start time: whether a run's trainer lives (shared with the daemon)
cli.py         the ``adapterd train`` command
examples/      gitclone.json, the reference tutorial's three examples (the demo's data)
"""
