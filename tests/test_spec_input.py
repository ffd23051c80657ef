"""Spec input a tired or hostile user really produces: files that are not YAML text, YAML that is
structurally odd, numbers that are not finite, seeds numpy refuses, devices this machine lacks. Each is
one SpecError line naming the file or field, and through the CLI exit status 2 with no run made."""
from __future__ import annotations

import os

import pytest
import torch

from conftest import all_runs, run_cli
from harness.errors import SpecError
from harness.spec import load_spec

BOMB = "a: &a [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 10)}]\n" for p, c in zip("abcdefg", "bcdefgh"))

# (id, how to make the file at `path`, the words the one line must hold)
FILES = [
    ("binary", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe"), "not UTF-8 text (byte 0x89 at offset 0)"),
    ("latin-1", lambda p: p.write_bytes("name: caf\xe9\n".encode("latin-1")), "not UTF-8 text (byte 0xe9 at offset 9)"),
    ("nul-bytes", lambda p: p.write_bytes(b"name: x\x00y\n"), "holds NUL bytes"),
    ("directory", lambda p: p.mkdir(), "is a directory"),
    ("fifo", lambda p: os.mkfifo(p), "not a regular file"),
    ("too-large", lambda p: p.write_text("# pad\n" * 200_000), "too large for a spec"),
    ("repeated-key", lambda p: p.write_text("optimizer:\n  lr: 0.1\n  momentum: 0.5\n  lr: 0.2\n"),
     "line 4, column 3: key 'lr' appears twice in one mapping (first at line 2)"),
    ("repeated-section", lambda p: p.write_text("train:\n  epochs: 2\nseed: 1\ntrain:\n  epochs: 3\n"),
     "key 'train' appears twice"),
    ("alias-bomb", lambda p: p.write_text(BOMB), "expands to more than 10000 values"),
    ("self-alias", lambda p: p.write_text("a: &a [*a]\n"), "expands to more than 10000 values"),
]


@pytest.mark.parametrize("make, words", [f[1:] for f in FILES], ids=[f[0] for f in FILES])
def test_unusable_spec_file_is_one_line(tmp_path, make, words):
    path = tmp_path / "spec.yaml"
    make(path)
    with pytest.raises(SpecError) as e:
        load_spec(path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: ") and words in msg, msg
    assert len(msg) < 300


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_spec_file(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: x\n")
    path.chmod(0)
    with pytest.raises(SpecError, match="cannot read the spec file"):
        load_spec(path)


def test_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text("name: m\noptimizer: &opt\n  lr: 0.1\n  momentum: 0.5\n"
                    "search:\n  params:\n    optimizer.lr: {<<: {low: 0.01, high: 0.5}, high: 0.2}\n")
    s = load_spec(path)
    assert s.search.params["optimizer.lr"].high == 0.2 and s.optimizer.momentum == 0.5


# (id, overrides, the field the line must name, words it must hold)
FIELDS = [
    ("lr-inf-yaml", ["optimizer.lr=.inf"], "optimizer.lr", "finite number"),
    ("lr-inf-text", ["optimizer.lr=inf"], "optimizer.lr", "finite number"),
    ("noise-nan", ["model.noise_std=.nan"], "model.noise_std", "finite number"),
    ("weight-decay-inf", ["optimizer.weight_decay=1e999"], "optimizer.weight_decay", "finite number"),
    ("val-fraction-nan", ["data.val_fraction=nan"], "data.val_fraction", "finite number"),
    ("search-low-nan", ["search.params.optimizer.lr.low=.nan"], "search.params.optimizer.lr.low", "finite number"),
    ("search-high-inf", ["search.params.optimizer.momentum.high=.inf"], "search.params.optimizer.momentum.high",
     "finite number"),
    ("search-step-nan", ["search.params.optimizer.momentum.step=.nan"], "search.params.optimizer.momentum.step",
     "finite number"),
    ("search-step-negative", ["search.params.optimizer.momentum.step=-0.1"], "search.params.optimizer.momentum",
     "'step' (-0.1) must be positive"),
    ("choices-nan", ["search.params.model.dropout={type: categorical, choices: [0.1, .nan]}"],
     "search.params.model.dropout.choices", "choice nan is not a finite number"),
    ("args-inf", ["model.arch=resnet20", "model.args={x: .inf}"], "model.args", "not a finite number"),
    ("seed-negative", ["seed=-1"], "seed", "0 <= seed < 2**32"),
    ("seed-too-big", ["seed=4294967296"], "seed", "0 <= seed < 2**32"),
    ("split-seed-negative", ["data.split_seed=-3"], "data.split_seed", "0 <= seed < 2**32"),
    ("device-garbage", ["train.device=cuda:x"], "train.device", "unknown device"),
    ("long-input-echo", ["train.epochs=" + "x" * 5000], "train.epochs", "(5002 chars)"),
    ("long-key-echo", ["a" * 3000 + "=1"], "aaaa", "unknown key"),
    ("args-name-not-identifier", ["model.arch=resnet20", "model.args={'my width': 3}"], "model.args",
     "not a keyword argument name"),
    ("args-name-too-long", ["model.arch=resnet20", "model.args={" + "w" * 300 + ": 3}"], "model.args",
     "at most 64 characters"),
    ("args-nested-key", ["model.arch=resnet20", "model.args={block: {'a-b': 1}}"], "model.args",
     "key 'a-b' must be 1-64 letters, digits and _"),
    ("args-on-builtin-model", ["model.args={width: 3}"], "model.args", "lenet has no such option"),
    ("batchnorm-on-resnet", ["model.arch=resnet18", "model.batchnorm=true"], "model.batchnorm",
     "resnet18 has no such option (it takes dropout, noise_std)"),
    ("args-on-builtin-data", ["data.args={n: 3}"], "data.args", "only for a dataset factory"),
    ("num-classes-on-builtin", ["data.num_classes=3"], "data.num_classes", "only for a dataset factory"),
    ("freeze-not-a-path", ["model.freeze=['features; rm -rf']"], "model.freeze", "not a submodule path"),
]


@pytest.mark.parametrize("overrides, field, words", [f[1:] for f in FIELDS], ids=[f[0] for f in FIELDS])
def test_bad_value_is_one_short_line_naming_the_field(overrides, field, words):
    with pytest.raises(SpecError) as e:
        load_spec(None, overrides)
    msg = str(e.value)
    assert "\n" not in msg and f": {field}" in msg and words in msg, msg
    assert len(msg) < 400, len(msg)


def test_yaml_bomb_in_an_override_is_refused():
    with pytest.raises(SpecError, match="expands to more than 10000 values"):
        load_spec(None, ["model.args=" + "{" + BOMB.replace("\n", ", ").rstrip(", ") + "}"])


DEVICES = [
    pytest.param("cuda", "no CUDA device", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
    pytest.param(f"cuda:{torch.cuda.device_count() + 2}", "CUDA device" if torch.cuda.is_available() else "no CUDA"),
    pytest.param("mps", "MPS (Apple GPUs) is not available", marks=pytest.mark.skipif(
        torch.backends.mps.is_available(), reason="has MPS")),
]


@pytest.mark.parametrize("device, words", DEVICES)
def test_a_device_this_machine_lacks_is_refused_with_the_spec(device, words):
    with pytest.raises(SpecError) as e:
        load_spec(None, [f"train.device={device}"])
    assert "train.device" in str(e.value) and words in str(e.value), str(e.value)


@pytest.mark.parametrize("command", ["harness.train", "harness.sweep", "analysis.ablation"])
def test_every_command_refuses_before_any_run(fast_store, tmp_path, command):
    # One bad file per command, through the real CLI: exit 2, one line, no run, no store written.
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\ntrain:\n  epochs: 2\n  epochs: 3\n")
    target = spec
    if command == "analysis.ablation":
        target = tmp_path / "ablation.yaml"
        target.write_text(f"name: a\nbase: {spec}\nseeds: 2\narms:\n  - name: none\n")
    r = run_cli(command, str(target), "--quiet" if command != "analysis.ablation" else "--seeds=2",
                cwd=tmp_path, timeout=180)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "key 'epochs' appears twice" in lines[0], r.stderr
    assert all_runs(fast_store) == []


def test_a_fifo_does_not_hang_the_cli(fast_store, tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    r = run_cli("harness.train", str(fifo), "--quiet", cwd=tmp_path, timeout=60)
    assert r.returncode == 2 and "not a regular file" in r.stderr
