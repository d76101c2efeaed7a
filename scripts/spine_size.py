"""Lines, top-level definitions and the longest function or class of each spine file and side room: the budgets the
spine keeps (train.py <= 600 lines, model.py and the other spine files <= 750, side rooms about 300, no
definition over 80 lines). python scripts/spine_size.py [FILE ...]"""
import ast
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPINE = ["model.py", "data.py", "metrics.py", "train.py", "predict.py"]


def size(path):
    """(lines, top-level definitions, (length, name) of the longest function or class at any depth)."""
    source = open(path).read()
    tree = ast.parse(source)
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    top = sum(isinstance(node, definitions) for node in tree.body)
    longest = max(((node.end_lineno - node.lineno + 1, node.name) for node in ast.walk(tree)
                   if isinstance(node, definitions)), default=(0, "-"))
    return len(source.splitlines()), top, longest


def main(files):
    files = files or SPINE + ["bench.py"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/side/*.py"))
    print(f"{'file':24s}{'lines':>7s}{'top-level':>11s}  longest definition")
    for name in files:
        lines, top, (length, longest) = size(os.path.join(ROOT, name))
        print(f"{name:24s}{lines:7d}{top:11d}  {longest} ({length} lines)")


if __name__ == "__main__":
    main(sys.argv[1:])
