"""Making hivis drafters: target-generated data, training recipes, baselines, offline evaluation.

    data.py       prompt sources, the target's answers + hidden states, sharded storage
    generate.py   data generation as a Ray Data pipeline (one target actor per device), resumable
    examples.py   per-drafter-kind model inputs (hivis, text-only, EAGLE with image rows, ViSpec-style)
    losses.py     the recipe: single-step distillation, self-feedback unroll, data selection, ...
    trainer.py    the training loop (Ray Train TorchTrainer, DDP), checkpoints, loss curves
    evaluate.py   offline acceptance replay (plain torch) in vLLM's counting convention
"""
