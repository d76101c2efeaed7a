"""Side rooms: one concern per file, beside the spine (model.py, data.py, metrics.py, train.py, predict.py). They import the spine, never an entry point (train.py, predict.py, bench.py)."""
