"""Programs: the only layer that composes datasets, the model, sharding and metrics.

`trainer.train_and_evaluate` (scripts/train.py), `evaluator.evaluate_split` (scripts/eval.py) and
`predictor.load_checkpoint` (notebooks, scripts/predict.py); `launch` holds the scripts' flags that
start JAX's distributed runtime and their restart onto huge pages. The library below (`ops`,
`modeling`, `data`, `train`, `evaluation`, `convert`) never imports this package; see
docs/CONTRACTS.md.
"""
