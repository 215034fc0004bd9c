"""``validate --data``: every item read once, each unreadable one listed, bugs not hidden."""

from __future__ import annotations

import pytest

import branchadapt as ba
from branchadapt.datacheck import check_data


def test_every_item_is_read_once_and_each_user_error_is_listed(small_experiment, monkeypatch):
    exp = ba.load_experiment(small_experiment())
    source_cls = exp.data.cls
    read: list[tuple[str, str, int]] = []
    plain_get = source_cls.get

    def get(self, group, stream, index, rng):
        read.append((group, stream, index))
        if group == "b" and index in (2, 5):
            raise ba.UserError(f"b/{index}: cannot decode")
        return plain_get(self, group, stream, index, rng)

    monkeypatch.setattr(source_cls, "get", get)
    progress: list[tuple[int, int]] = []
    report = check_data(exp, "train", lambda done, total: progress.append((done, total)))
    sizes = {"a": 64, "b": 8, "c": 8}  # the clusters source's counts in the small experiment
    assert {g: sum(s.values()) for g, s in report.sizes.items()} == sizes and report.items == 80
    assert sorted(read) == sorted(set(read)) and len(read) == 80  # each item once
    assert report.problems == ["b/2: cannot decode", "b/5: cannot decode"]
    assert progress[-1] == (80, 80) and len(progress) == 80


def test_a_bug_in_the_source_is_not_reported_as_bad_data(small_experiment, monkeypatch):
    exp = ba.load_experiment(small_experiment())

    def get(self, group, stream, index, rng):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(exp.data.cls, "get", get)
    with pytest.raises(ZeroDivisionError):
        check_data(exp)


def test_validate_data_on_the_command_line(small_experiment, run_cli):
    path = small_experiment()
    ok = run_cli("validate", str(path), "--data")
    assert ok.returncode == 0, ok.stderr
    assert "data (train): 80 items read (a 64, b 8, c 8), all usable" in ok.stdout
    both = run_cli("validate", str(path), "--data", "train,test")
    assert both.returncode == 0 and "data (test): " in both.stdout
    for value, expected in [("valid", "no split 'valid' in data source 'clusters'"), (",", "expected split")]:
        bad = run_cli("validate", str(path), "--data", value)
        assert bad.returncode == 2 and expected in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("flags", [[], ["--data"]])
def test_a_source_that_cannot_be_built_names_the_experiment_file(
    flags, small_experiment, monkeypatch, capsys
):
    from branchadapt.cli import main

    path = small_experiment()

    def gone(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise ba.UserError("data.root: /gone is not a folder")

    monkeypatch.setattr(ba.load_experiment(path).data.cls, "__init__", gone)
    assert main(["validate", str(path), *flags]) == 2
    assert capsys.readouterr().err.startswith(f"error: {path}: data.root: /gone is not a folder")
