"""Side rooms of the spine (model.py, train.py, data.py, metrics.py, predict.py): one concern per file, which the
spine calls by name. Read the spine first; open a side room when its concern is the one you change. A side room
imports the spine, never an entry point (train.py, predict.py, bench.py), takes plain values (the model config at
most), and the spine's math does not import the side rooms that import it: no import cycles.
"""
