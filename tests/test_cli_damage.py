"""Damaged files and messages (hardening II, 6–7): one clear line and a non-zero exit everywhere;
a bug inside acnet keeps its traceback (architecture II, 8)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from acnet.cli import main

TINY = ["--model", "cifar_quick", "--dataset", "synthetic", "--epochs", "1", "--train-limit",
        "64", "--test-limit", "32", "--batch-size", "32", "--quiet"]


def run(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line(rc: int, err: str, message: str) -> None:
    assert rc == 2, err
    assert message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.fixture(scope="module")
def deployed(tmp_path_factory) -> Path:
    """A finished tiny run's deployed.safetensors."""
    out = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out / "deployed.safetensors"


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())


def _rewrite(src: Path, dst: Path, **metadata: str | None) -> Path:
    meta = {k: v for k, v in {**_metadata(src), **metadata}.items() if v is not None}
    save_file(load_file(str(src)), str(dst), metadata=meta)
    return dst


@pytest.mark.parametrize("keep", [0, 7, 100, -16])
def test_truncated_safetensors_is_one_line(deployed, tmp_path, capsys, keep):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(deployed.read_bytes()[:keep])
    for args in (["eval", bad], ["export", bad, "--onnx", tmp_path / "m.onnx"],
                 ["analyze", "kernels", bad]):
        rc, _, err = run(capsys, *args)
        one_line(rc, err, str(bad))


@pytest.mark.parametrize("aliases", ["{not json", "[1, 2]", '{"a": "no.such.tensor"}',
                                     '{"a": 3}'])
def test_damaged_alias_metadata_is_one_line(deployed, tmp_path, capsys, aliases):
    bad = _rewrite(deployed, tmp_path / "bad.safetensors", acnet_aliases=aliases)
    rc, _, err = run(capsys, "eval", bad)
    one_line(rc, err, "bad.safetensors")


def test_config_metadata_missing_keys_names_them(deployed, tmp_path, capsys):
    cfg = json.loads(_metadata(deployed)["acnet_config"])
    for key in ("in_channels", "num_classes"):
        cfg.pop(key)
    bad = _rewrite(deployed, tmp_path / "bad.safetensors", acnet_config=json.dumps(cfg))
    rc, _, err = run(capsys, "eval", bad)
    one_line(rc, err, "lacks in_channels, num_classes")
    assert "None" not in err


@pytest.mark.parametrize("config,message", [("{oops", "not valid JSON"),
                                            ("[1]", "not a JSON object"),
                                            ('{"no_such_field": 1}', "not valid")])
def test_malformed_config_metadata_names_the_file(deployed, tmp_path, capsys, config, message):
    bad = _rewrite(deployed, tmp_path / "bad.safetensors", acnet_config=config)
    rc, _, err = run(capsys, "eval", bad)
    one_line(rc, err, message)
    assert "bad.safetensors" in err


def test_no_config_metadata_is_one_line(deployed, tmp_path, capsys):
    bad = tmp_path / "plain.safetensors"
    save_file(load_file(str(deployed)), str(bad))
    rc, _, err = run(capsys, "eval", bad)
    one_line(rc, err, "no acnet config")


def test_non_finite_weights_are_refused(deployed, tmp_path, capsys):
    state = load_file(str(deployed))
    name = next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 4)
    state[name] = state[name].clone()
    state[name][0] = float("nan")
    bad = tmp_path / "nan.safetensors"
    save_file(state, str(bad), metadata=_metadata(deployed))
    rc, out, err = run(capsys, "eval", bad)
    one_line(rc, err, "not finite")
    assert out == ""


def test_a_bug_inside_acnet_keeps_its_traceback(deployed, capsys, monkeypatch):
    import acnet.cli

    def broken(*_a, **_k):
        raise TypeError("unsupported operand type(s)")  # what a bug raises

    monkeypatch.setattr(acnet.cli, "evaluate_run", broken)
    with pytest.raises(TypeError, match="unsupported operand"):
        main(["eval", str(deployed)])


def test_a_missing_extra_is_one_line(deployed, tmp_path, capsys, monkeypatch):
    import acnet.export
    from acnet.errors import require

    def missing(module, extra, what):
        return require("acnet_no_such_module", extra, what)

    monkeypatch.setattr(acnet.export, "require", missing)
    rc, _, err = run(capsys, "export", deployed, "--onnx", tmp_path / "m.onnx")
    one_line(rc, err, "pip install 'acnet[export]'")


def test_library_errors_are_still_builtin_types():
    """Python callers catch ValueError/TypeError as before; the CLI catches acnet's own."""
    from acnet import ACBlock
    from acnet.errors import ACNetError

    with pytest.raises(ValueError) as info:
        ACBlock(4, 4, 1)
    assert isinstance(info.value, ACNetError)
    with pytest.raises(TypeError) as info:
        ACBlock(4, 4, 3.0)
    assert isinstance(info.value, ACNetError)


@pytest.mark.parametrize("args,message", [
    (["train", "--epochs", "0", "--out", "x"], "argument --epochs"),
    (["train", "--classes", "5,,6", "--out", "x"], "argument --classes"),
    (["eval", "run", "--transform", "bogus"], "argument --transform"),
    (["export", "run"], "--onnx"),
])
def test_argument_errors_are_one_line(capsys, args, message):
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2
    one_line(2, err, message)
    assert "--help" in err


@pytest.mark.parametrize("flags,named", [(["--no-branch-bn"], "--no-branch-bn"),
                                         (["--position", "corner"], "--position"),
                                         (["--no-horizontal"], "--no-horizontal")])
def test_acb_options_with_the_baseline_are_refused(tmp_path, capsys, flags, named):
    rc, _, err = run(capsys, "train", *TINY, "--block", "base", *flags, "--out", tmp_path / "x")
    one_line(rc, err, "block='acb'")
    assert named in err and not (tmp_path / "x").exists()


def test_files_acnet_writes_follow_the_umask(deployed):
    import os
    import stat

    mask = os.umask(0)
    os.umask(mask)
    for f in deployed.parent.iterdir():
        if f.is_file():
            assert stat.S_IMODE(f.stat().st_mode) == 0o666 & ~mask, f


def test_a_diverged_run_says_how_to_go_on(tmp_path, capsys):
    rc, _, err = run(capsys, "train", *TINY, "--lr", "50", "--epochs", "2", "--out",
                     tmp_path / "div")
    if rc == 0:
        pytest.skip("lr 50 did not diverge on this data")
    one_line(rc, err, "training diverged")
    assert "new output directory" in err and "(set by --lr)" in err


def test_messages_name_the_subcommand_and_defaults_not_given(deployed, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--bogus", "--out", str(tmp_path / "x")])
    one_line(exc.value.code, capsys.readouterr().err,
             "acnet train: error: unrecognized arguments: --bogus")
    i = TINY.index("--batch-size")
    tiny = TINY[:i] + TINY[i + 2:]
    rc, _, err = run(capsys, "train", *tiny, "--out", tmp_path / "y")
    one_line(rc, err, "larger than the 64 training images (--batch-size's default)")
    rc, _, err = run(capsys, "train", *tiny, "--batch-size", "128", "--out", tmp_path / "z")
    one_line(rc, err, "(set by --batch-size)")
    for path in (deployed, tmp_path / "missing"):
        rc, _, err = run(capsys, "deploy", path)
        one_line(rc, err, "is not a run directory")
