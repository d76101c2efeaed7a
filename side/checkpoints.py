"""Checkpoints, written atomically, and exact resume: out_dir/last/state.pt holds all that --resume needs.

save_checkpoint / keep_recent   weights + config.json + tokenizer + train_config.json, each renamed into place
atomic_torch_save / remove_debris   a write is whole or absent, whenever a kill comes (side/files.py); one that
    fails (disk full, permission denied) raises files.WriteFailed naming the path
full_state / unsharded   whole state dicts (also under FSDP) and a plain model to save from them
rng_state / set_rng_state / all_rng_states   every rank's random generators
save_training_state -> load_training_state -> restore_training_state   the resume state, checked before use
data_fingerprints   size and sha256 of the files a run trains on: --resume refuses changed data
"""
import hashlib
import json
import os
import pickle
import random
import shutil

import numpy as np
import torch

from side.distributed import all_rng_gather, rank_and_world
from side import files
from side.files import TEMP_PREFIX, writing

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")
RESUME_MAY_CHANGE = {"resume", "out_dir", "log_every", "device", "compile", "keep_checkpoints", "max_bad_steps",
                     "test_file", "config", "grad_checkpointing", "pack", "overwrite",
                     "calibrate", "keep_state"}  # they leave the training as it was (calibrate acts after it)


def save_checkpoint(model, folder, model_dir, options):
    """Weights + config.json (labels, thresholds) + tokenizer files + the exact training options.
    They are written into a temp folder inside `folder`, then each file is renamed over the old one
    (files.replacing_files): a kill mid-write leaves the previous model.safetensors whole, never a torn one."""
    with writing(folder, "the model to"):
        os.makedirs(folder, exist_ok=True)
        remove_debris(folder)
    with files.replacing_files(folder, "the model to") as tmp:
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(model_dir, name)):
                shutil.copy(os.path.join(model_dir, name), tmp)
        with open(os.path.join(tmp, "train_config.json"), "w") as f:
            json.dump(options, f, indent=2)


def keep_recent(model, out_dir, keep, step, model_dir, options):
    """out_dir/checkpoints/step-N for the last `keep` evaluations (--keep-checkpoints)."""
    folder = os.path.join(out_dir, "checkpoints")
    save_checkpoint(model, os.path.join(folder, f"step-{step}"), model_dir, options)
    with writing(folder, "the checkpoints folder"):
        saved = sorted(os.listdir(folder), key=lambda name: int(name.split("-")[1]))
        for old in saved[:-keep]:
            shutil.rmtree(os.path.join(folder, old))


def atomic_torch_save(obj, path):
    """torch.save through files.replacing: whenever a kill comes, path holds the previous state or the new one,
    whole."""
    folder = os.path.dirname(path)
    with writing(path, "the training state"):
        os.makedirs(folder, exist_ok=True)
        remove_debris(folder)
    with files.replacing(path, "the training state") as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


def remove_debris(folder):
    """Temp files and folders left by a killed save (only rank 0 writes: none is still being written)."""
    for name in os.listdir(folder):
        if name.startswith(TEMP_PREFIX):
            path = os.path.join(folder, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def full_state(model, optimizer, sharded):
    """Model and optimizer state dicts with whole tensors; under FSDP a collective, filled on rank 0."""
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def unsharded(model, weights):
    """A plain copy of an FSDP model, to save. Built on the meta device: no memory, no random draws."""
    with torch.device("meta"):
        copy = type(model)(model.config)
    copy.load_state_dict(weights, assign=True)
    return copy


def rng_state():
    """This process's random generators (dropout draws from torch's) in types torch.load(weights_only) reads."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss)}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))


def save_training_state(out_dir, learner, progress, weights, optim, options, data):
    """The progress (a dict), weights and optimizer state (full_state), schedule, grad scale, every rank's random
    generators, the options and the data's fingerprints into out_dir/last/state.pt, as types
    torch.load(weights_only=True) reads. A collective."""
    rank, world = rank_and_world()
    rngs = all_rng_gather(rng_state())
    if rank == 0:
        atomic_torch_save({
            **progress, "model": weights, "optimizer": optim, "scheduler": learner.scheduler.state_dict(),
            "scaler": learner.scaler.state_dict(), "rng": rngs, "thresholds": learner.model.config.thresholds,
            "world_size": world, "id2label": learner.model.config.id2label, "options": options,
            "data": data}, os.path.join(out_dir, "last", "state.pt"))


def as_flag(name, value):
    """The command-line words that set an option to value: --x / --no-x for a switch, none for None (its
    default), else --x VALUE."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"no --{flag}" if value is None else f"--{flag} {value if value != '' else repr(value)}"


def load_training_state(out_dir, options, id2label, data):
    """out_dir/last/state.pt, checked against this run's options (a dict), data and labels (None: no labels) before
    the model is loaded; None when there is none yet (start afresh)."""
    path = os.path.join(out_dir, "last", "state.pt")
    if not os.path.isfile(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise SystemExit(f"--resume: {path} is damaged ({e}); start a new run with --overwrite") from None
    saved = state["options"]
    differ = [k for k in sorted(saved) if k not in RESUME_MAY_CHANGE and k in options and options[k] != saved[k]]
    if differ:
        changed = ", ".join(f"--{k.replace('_', '-')} {saved[k]!r} (now {options[k]!r})" for k in differ)
        raise SystemExit(f"--resume: {path} was written with other options: {changed}; resume with the options of "
                         f"the interrupted run ({' '.join(as_flag(k, saved[k]) for k in differ)})")
    was = state.get("data", {})
    changed = [f"{options[k]} ({describe_file(was.get(k))}, now {describe_file(data.get(k))})"
               for k in sorted(set(was) | set(data)) if was.get(k) != data.get(k)]
    if changed:
        raise SystemExit(f"--resume: the data changed since {path} was written: {', '.join(changed)}; resume "
                         "with the files the interrupted run trained on, or start a new run (--overwrite)")
    world = rank_and_world()[1]
    if state["world_size"] != world:
        raise SystemExit(f"--resume: {path} was written by {state['world_size']} process(es), this run has "
                         f"{world}; resume with the same --nproc_per_node")
    if id2label is not None and state["id2label"] != id2label:
        raise SystemExit(f"--resume: the training data's labels {list(id2label.values())} are not those of {path} "
                         f"{list(state['id2label'].values())}; did the data change?")
    return state


def restore_training_state(state, learner, sharded, rank):
    """Put weights, optimizer moments, schedule, grad scale and this rank's random generators back."""
    model, optimizer = learner.model, learner.optimizer
    if state["model"] is None:  # a finished run's (finished_state): nothing is left to train, the report reloads
        model.config.thresholds = state["thresholds"]  # the best model from the out-dir
        return
    saved, now = set(state["model"]), set(model.state_dict())
    if saved != now:  # written by another model.py, e.g. the fused attn.qkv before query, key and value
        raise SystemExit(f"--resume: the saved state holds other weights than this model.py's (saved: "
                         f"{sorted(saved - now)[:3]}, now: {sorted(now - saved)[:3]}); resume with the code that "
                         "wrote it, or start a new run (--overwrite)")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    model.config.thresholds = state["thresholds"]
    learner.scheduler.load_state_dict(state["scheduler"])
    learner.scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"][rank])


def data_fingerprints(paths):
    """{option: size and sha256} of the files the run trains and selects on (train_file, val_file): --resume
    refuses data that changed under the same path (the test file may change, as its option may)."""
    return {name: file_fingerprint(path) for name, path in paths.items() if path}


def file_fingerprint(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"size": os.path.getsize(path), "sha256": digest.hexdigest()}


def describe_file(fingerprint):
    return f"{fingerprint['size']} bytes, sha256 {fingerprint['sha256'][:12]}" if fingerprint else "none"


def finished_state(out_dir, keep, validated=True):
    """Once a run has finished: out_dir/last/state.pt without the weights and optimizer moments, which only more
    training would read (a finished run's --resume trains no step, and the best model is out_dir's own), unless
    keep (--keep-state); its options, progress and fingerprints stay, so --resume --calibrate temperature still
    reports again (validated: the run had validation data to fit a temperature on). Returns the line that says what
    became of it, with its size."""
    path = os.path.join(out_dir, "last", "state.pt")
    if not os.path.isfile(path):
        return f"{out_dir}: no last/state.pt"
    before = os.path.getsize(path)
    if keep:
        return f"{path}: {before / 2**20:,.1f} MiB kept whole (--keep-state); remove it once you are done with it"
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # mmap: the weights are not read
    if state["model"] is None:  # a finished run resumed again
        return f"{path}: {before / 2**10:,.0f} KiB, its weights and optimizer moments dropped when the run finished"
    atomic_torch_save({**state, "model": None, "optimizer": None}, path)
    return (f"{path}: {before / 2**20:,.1f} MiB -> {os.path.getsize(path) / 2**10:,.0f} KiB: the finished run's "
            "weights and optimizer moments are dropped (the best model is in the out-dir)"
            + ("; --resume --calibrate temperature still works" if validated else ""))
