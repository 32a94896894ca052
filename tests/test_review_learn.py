"""`review` and `learn` through the real CLI: the workbook a person fills, and what is refused.

The round trip tags sample_catalog/ with the bundled model, writes a review workbook,
fills correct_label with openpyxl the way a person types into cells, learns a model with
small settings, and tags with it. Each bad workbook must stop `learn` with exit code 3
and a sentence naming the problem, before any training.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest
import torch

from catalog_tagger.config import LearnConfig
from catalog_tagger.errors import DataError
from catalog_tagger.learn import ReviewedSet, bounded_table, clopper_pearson_lower
from catalog_tagger.model import FASHION_MNIST_CLASSES
from catalog_tagger.new_classes import ClassPlan
from catalog_tagger.review import OTHER
from catalog_tagger.workbook import CLASSES_SHEET, REVIEW_SHEET, read_review_rows

from .conftest import SAMPLE

BUDGET = 30
LEARN_FAST = ("--epochs", "3", "--folds", "3", "--workers", "0", "--device", "cpu")


def truth() -> dict[str, str]:
    with open(SAMPLE / "labels.csv", newline="") as fh:
        return {os.path.abspath(SAMPLE / r["path"]): r["label_name"] for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def tags(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from click.testing import CliRunner

    from catalog_tagger.cli import cli

    out = tmp_path_factory.mktemp("review") / "tags.parquet"
    result = CliRunner().invoke(cli, ["-q", "tag", str(SAMPLE / "images"), "--out", str(out), "--workers", "0"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def workbook(tags: Path) -> Path:
    from click.testing import CliRunner

    from catalog_tagger.cli import cli

    out = tags.parent / "review.xlsx"
    result = CliRunner().invoke(cli, ["review", str(tags), "--budget", str(BUDGET), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "kB" in result.output or "MB" in result.output  # the file size is reported
    return out


def columns(ws) -> dict[str, int]:
    return {c.value: c.column for c in ws[2]}


def fill(src: Path, dst: Path, labels: dict[str, str] | None = None, limit: int | None = None) -> None:
    """Type labels into correct_label as a person would: open, edit cells, save."""
    labels = truth() if labels is None else labels
    wb = openpyxl.load_workbook(src)
    ws = wb[REVIEW_SHEET]
    col = columns(ws)
    filled = 0
    for r in range(3, ws.max_row + 1):
        path = ws.cell(r, col["path"]).value
        if path in labels and (limit is None or filled < limit):
            ws.cell(r, col["correct_label"]).value = labels[path]
            filled += 1
    wb.save(dst)


def test_review_workbook_has_thumbnails_dropdown_and_frozen_header(workbook: Path, tags: Path) -> None:
    wb = openpyxl.load_workbook(workbook)
    ws = wb[REVIEW_SHEET]
    assert ws.freeze_panes == "A3"
    assert "correct_label" in str(ws["A1"].value)  # the instruction line
    col = columns(ws)
    for name in ("image_id", "path", "label", "confidence", "label_2", "score_2", "why", "correct_label"):
        assert name in col
    rows = list(ws.iter_rows(min_row=3, values_only=True))
    assert len(rows) == BUDGET
    assert all(r[col["correct_label"] - 1] is None for r in rows)
    assert len(ws._images) == BUDGET
    assert {img.anchor._from.row for img in ws._images} == set(range(2, BUDGET + 2))  # 0-based: one per row

    (validation,) = ws.data_validations.dataValidation
    assert validation.type == "list"
    assert validation.formula1 == f"={CLASSES_SHEET}!$A$1:$A${len(FASHION_MNIST_CLASSES) + 1}"
    letter = openpyxl.utils.get_column_letter(col["correct_label"])
    assert str(validation.sqref) == f"{letter}3:{letter}{BUDGET + 2}"
    listed = [c.value for c in wb[CLASSES_SHEET]["A"]]
    assert listed == [*FASHION_MNIST_CLASSES, OTHER]
    assert wb[CLASSES_SHEET].sheet_state == "hidden"


def test_review_takes_a_random_slice_and_typical_photos(workbook: Path, tags: Path) -> None:
    frame = pd.read_excel(workbook, header=1)
    assert (frame["why"] == "random").sum() == round(BUDGET * 0.25)
    assert (frame["why"] == "typical").sum() == BUDGET - round(BUDGET * 0.25)
    assert frame["path"].is_unique


def clustered(sizes: list[int], seed: int = 0) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Features in tight clusters of the given sizes around orthogonal directions."""
    rng = np.random.default_rng(seed)
    cluster = np.repeat(np.arange(len(sizes)), sizes)
    features = np.eye(len(sizes), 16)[cluster] + rng.normal(0, 0.01, (len(cluster), 16))
    frame = pd.DataFrame({"label": "Shirt", "confidence": rng.random(len(cluster))})
    return frame, features.astype(np.float32), cluster


def test_typical_part_asks_one_central_photo_of_each_kind() -> None:
    from catalog_tagger.review import choose

    sizes = [900, 60, 30, 6, 4]  # one common look, rarer ones: a random draw of 5 would miss most
    frame, features, cluster = clustered(sizes)
    picks = choose(frame, 5, 0.0, 0, features)
    assert [why for _, why in picks] == ["typical"] * 5
    chosen = [i for i, _ in picks]
    assert sorted(cluster[chosen]) == [0, 1, 2, 3, 4]  # every kind of photo, each once
    assert list(cluster[chosen]) == [0, 1, 2, 3, 4]  # the largest kind first
    # Typical: the photo nearest its cluster's centre, not an odd one at the edge.
    for i in chosen:
        members = np.flatnonzero(cluster == cluster[i])
        centre = features[members].mean(0)
        spread = np.linalg.norm(features[members] - centre, axis=1)
        assert np.linalg.norm(features[i] - centre) <= np.quantile(spread, 0.2)
    assert choose(frame, 5, 0.0, 0, features) == picks  # seeded


def test_random_slice_is_uniform_and_typical_part_skips_what_cannot_be_grouped() -> None:
    from catalog_tagger.review import choose

    frame, features, cluster = clustered([500, 500])
    features[::2] = np.nan  # photos that no longer decode: never typical, still in the random draw
    picks = choose(frame, 40, 0.5, 3, features)
    random = [i for i, why in picks if why == "random"]
    typical = [i for i, why in picks if why == "typical"]
    assert len(random) == 20 and len(typical) == 20 and not set(random) & set(typical)
    assert all(i % 2 == 1 for i in typical)
    assert any(i % 2 == 0 for i in random)
    # A budget as large as the catalog asks every photo once (no clustering needed).
    picks = choose(frame, 1000, 0.25, 3, clustered([500, 500])[1])
    assert sorted(i for i, _ in picks) == list(range(1000))

    # The same photo twice (same sha256, tag --hash) is asked once.
    twins = frame.iloc[:20].copy()
    twins["sha256"] = ["a" * 64] * 10 + [None] * 10
    picks = choose(twins.reset_index(drop=True), 20, 0.0, 0, np.random.default_rng(0).random((20, 4)))
    assert len(picks) == 11


def test_review_excludes_photos_already_reviewed(run_cli, workbook: Path, tags: Path, tmp_path: Path) -> None:
    out = tmp_path / "second.xlsx"
    result = run_cli("review", tags, "--budget", 100, "--out", out, "--exclude", workbook)
    assert result.exit_code == 0, result.output
    first = set(pd.read_excel(workbook, header=1)["path"])
    second = set(pd.read_excel(out, header=1)["path"])
    assert len(second) == 40 - BUDGET and not first & second


def test_review_refuses_to_overwrite(run_cli, workbook: Path, tags: Path, tmp_path: Path) -> None:
    before = workbook.read_bytes()
    result = run_cli("review", tags, "--budget", 5, "--out", workbook)
    assert result.exit_code == 6 and "--overwrite" in result.output
    assert workbook.read_bytes() == before
    # the workbook it is told to exclude holds a person's answers: never replaced, even when asked
    result = run_cli("review", tags, "--budget", 5, "--exclude", workbook, "--out", workbook, "--overwrite")
    assert result.exit_code == 2 and "same file as --exclude" in result.output
    assert workbook.read_bytes() == before
    result = run_cli("review", tags, "--budget", 5, "--out", tmp_path / "typo" / "next.xlsx")
    assert result.exit_code == 6 and "does not exist" in result.output and not (tmp_path / "typo").exists()
    result = run_cli("review", tags, "--budget", 5, "--exclude", workbook, "--out", tmp_path / "next.xlsx")
    assert result.exit_code == 0, result.output


def test_round_trip_review_fill_learn_tag(run_cli, workbook: Path, tmp_path: Path) -> None:
    labels = truth()
    wb = openpyxl.load_workbook(workbook)
    ws = wb[REVIEW_SHEET]
    col = columns(ws)
    paths = [ws.cell(r, col["path"]).value for r in range(3, ws.max_row + 1)]
    typed = {p: labels[p] for p in paths}
    typed[paths[0]] = " " + labels[paths[0]].upper() + "  "  # case and spaces are accepted
    typed[paths[1]] = "Other"  # not one of these: kept out of training
    del typed[paths[2]]  # left empty: not reviewed
    filled = tmp_path / "filled.xlsx"
    fill(workbook, filled, typed)
    # A photo deleted since the review is skipped and counted.
    gone = tmp_path / "gone.png"
    shutil.copy(paths[3], gone)
    extra = tmp_path / "extra.csv"
    extra.write_text(f"path,correct_label\n{gone},Coat\n")
    gone.unlink()

    model = tmp_path / "learned"
    result = run_cli("learn", filled, extra, "--out", model, *LEARN_FAST)
    assert result.exit_code == 0, result.output
    card = json.loads((model / "model.json").read_text())
    assert card["training"]["labels"] == BUDGET - 2
    assert card["training"]["jittered_views"] == LearnConfig().views * (BUDGET - 2)  # the learned photos' only
    assert card["training"]["other"] == 1 and card["training"]["missing_photos"] == 1
    assert sum(card["training"]["labels_per_class"].values()) == BUDGET - 2
    cal = card["calibration"]
    assert cal["fitted_on"] == "reviewed photos" and cal["source"] == "own_photos"
    assert cal["folds"] == 3 and cal["n"] == BUDGET - 2
    assert len(cal["review_table"]) == 101 and all(len(row) == 3 for row in cal["review_table"])
    for row in cal["review_table_bounds"]:
        assert 0 <= row["precision_lower_bound"] <= row["precision"] <= 1
    # tag --target-precision reads the lower bound, never the optimistic point estimate.
    assert [row[1] for row in cal["review_table"]] == [row["precision_lower_bound"]
                                                        for row in cal["review_table_bounds"]]
    assert any(row["precision_lower_bound"] < row["precision"] for row in cal["review_table_bounds"])
    whys = dict(zip(paths, [ws.cell(r, col["why"]).value for r in range(3, ws.max_row + 1)]))
    learned = [p for p in typed if typed[p] != "Other"]
    assert cal["random_slice"]["n"] == sum(whys[p] == "random" for p in learned)
    assert 0 <= card["metrics"]["cv_accuracy"] <= 1

    out = tmp_path / "tags.parquet"
    result = run_cli("tag", SAMPLE / "images", "--model", model, "--out", out, "--workers", "0",
                     "--target-precision", "0.5")
    assert result.exit_code == 0, result.output
    tagged = pd.read_parquet(out)
    assert tagged["model"].str.startswith("learned@sha256:" + card["weights_sha256"][:12]).any()

    result = run_cli("learn", filled, "--out", model, *LEARN_FAST)
    assert result.exit_code == 6 and "--overwrite" in result.output


def test_learn_never_replaces_a_folder_that_holds_more_than_a_model(run_cli, workbook: Path, tmp_path: Path,
                                                                    monkeypatch) -> None:
    mine = tmp_path / "mine"
    (mine / "v1").mkdir(parents=True)
    (mine / "notes.txt").write_text("keep")
    fill(workbook, mine / "filled.xlsx")
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    # learn swaps in a whole folder: --overwrite replaces a model, never the user's files
    result = run_cli("learn", mine / "filled.xlsx", "--out", mine, *LEARN_FAST, "--overwrite")
    assert result.exit_code == 6 and "not a model (filled.xlsx, notes.txt, v1)" in result.output
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before and (mine / "v1").is_dir()
    # "--out ." is the folder itself
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = run_cli("learn", mine / "filled.xlsx", "--out", ".", *LEARN_FAST)
    assert result.exit_code == 0, result.output
    assert json.loads((here / "model.json").read_text())["training"]["labels"] == BUDGET


def test_calibrate_keeps_the_calibration_learn_fitted_on_reviewed_photos(run_cli, workbook: Path,
                                                                           tmp_path: Path) -> None:
    filled = tmp_path / "filled.xlsx"
    fill(workbook, filled)
    assert run_cli("learn", filled, "--out", tmp_path / "model", *LEARN_FAST, "--views", "0").exit_code == 0
    card = tmp_path / "model" / "model.json"
    before = card.read_bytes()
    result = run_cli("calibrate", "--model", tmp_path / "model")
    assert result.exit_code == 2 and "run learn again" in result.output
    assert card.read_bytes() == before


def test_learn_without_views(run_cli, workbook: Path, tmp_path: Path) -> None:
    filled = tmp_path / "filled.xlsx"
    fill(workbook, filled)
    result = run_cli("learn", filled, "--out", tmp_path / "model", *LEARN_FAST, "--views", "0")
    assert result.exit_code == 0, result.output
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["training"]["jittered_views"] == 0 and card["training"]["labels"] == BUDGET


def test_learn_from_the_catalog_photos_nobody_reviewed(run_cli, workbook: Path, tags: Path, tmp_path: Path) -> None:
    """--catalog: every photo of the tag output that was neither reviewed nor flagged out of
    scope is in the pool; with --pseudo-share 1 each of them is learned."""
    filled = tmp_path / "filled.xlsx"
    fill(workbook, filled)
    tagged = pd.read_parquet(tags)
    reviewed = {os.path.abspath(p) for p in pd.read_excel(workbook, header=1)["path"]}
    free = tagged.index[(tagged["status"] == "ok") & ~tagged["path"].map(os.path.abspath).isin(reviewed)]
    tagged.loc[free[0], ["status", "label"]] = ["out_of_scope", None]  # as tag writes a photo of something else
    catalog = tmp_path / "catalog.parquet"
    tagged.to_parquet(catalog)
    expected = free[1:]
    assert len(expected) > 0
    result = run_cli("learn", filled, "--out", tmp_path / "model", *LEARN_FAST, "--catalog", catalog,
                     "--pseudo-share", "1")
    assert result.exit_code == 0, result.output
    assert f"{len(expected)} of {len(expected)} catalog photos not reviewed" in result.output
    st = json.loads((tmp_path / "model" / "model.json").read_text())["training"]["self_training"]
    assert st["pool"] == st["pseudo_labeled"] == len(expected)
    assert st["flagged_left_out"] == 1
    assert len(st["pseudo_labeled_per_fold"]) == 3 and st["share"] == 1

    # Without --catalog nothing changes; a catalog with nothing left to learn is refused.
    result = run_cli("learn", filled, "--out", tmp_path / "plain", *LEARN_FAST)
    assert json.loads((tmp_path / "plain" / "model.json").read_text())["training"]["self_training"] is None
    only_reviewed = tmp_path / "reviewed-tags.parquet"
    tagged[tagged["path"].map(os.path.abspath).isin(reviewed)].to_parquet(only_reviewed)
    result = run_cli("learn", filled, "--out", tmp_path / "none", *LEARN_FAST, "--catalog", only_reviewed)
    assert result.exit_code == 3 and "not already reviewed" in result.output
    assert not (tmp_path / "none").exists()


def test_pseudo_labels_take_the_surest_share_of_photos_and_their_views() -> None:
    from catalog_tagger.self_training import CatalogPool, pseudo_labels

    class Fixed(torch.nn.Module):  # logits from the image's single pixel value
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            v = (x.flatten(1)[:, 0] * 255).round().long()
            table = torch.tensor([[5.0, 0.0], [0.0, 5.0], [0.1, 0.0]])  # sure 0, sure 1, unsure
            return table[v % 3]

    images = np.array([0, 1, 2, 4], np.uint8).reshape(4, 1, 1, 1)  # photo 3 (value 4) is sure of class 1
    view_of = np.array([0, 2, 3, 3])
    views = images[view_of] + np.uint8(3)  # same class by construction (value % 3 unchanged)
    pool = CatalogPool([f"p{i}" for i in range(4)], images, views, view_of, tagged=6, flagged=2, sampled_out=0)
    sure = pseudo_labels(Fixed(), pool, 0.75, torch.device("cpu"))
    assert sure.photos == 3
    assert sorted(zip(sure.images.ravel().tolist(), sure.labels.tolist())) == [
        (0, 0), (1, 1), (3, 0), (4, 1), (7, 1), (7, 1)]  # photo 2 and its view are out: unsure


def test_held_out_photos_join_a_pool_with_as_many_views_as_its_photos() -> None:
    from catalog_tagger.self_training import CatalogPool, with_photos

    images = np.array([0, 1], np.uint8).reshape(2, 1, 1, 1)
    pool = CatalogPool(["a", "b"], images, images[[0, 0, 1, 1]] + np.uint8(10), np.array([0, 0, 1, 1]), 2, 0, 0)
    held = np.array([5, 6], np.uint8).reshape(2, 1, 1, 1)
    held_views = np.array([50, 51, 52, 60], np.uint8).reshape(4, 1, 1, 1)  # 3 views of photo 5, 1 of photo 6
    joined = with_photos(pool, held, held_views, np.array([0, 0, 0, 1]))
    assert joined.images.ravel().tolist() == [0, 1, 5, 6]
    assert joined.views.ravel().tolist() == [10, 10, 11, 11, 50, 51, 60]  # at most 2 views a photo, as the pool's
    assert joined.view_of.tolist() == [0, 0, 1, 1, 2, 2, 3]
    assert joined.paths == pool.paths and joined.tagged == 2


def test_jittered_views_train_only_with_their_own_photo() -> None:
    """A fold trains on the views of its own photos, never on a view of a photo it predicts."""
    labels = np.array([0, 1, -1, 2, 1])  # -1: marked other
    images = np.arange(5, dtype=np.uint8).reshape(5, 1, 1, 1)
    view_of = np.array([0, 1, 2, 3, 4, 0, 1, 2, 3])  # photo 4's second view did not decode
    views = (100 + view_of).astype(np.uint8).reshape(-1, 1, 1, 1)
    plan = ClassPlan(FASHION_MNIST_CLASSES, {}, {})
    reviewed = ReviewedSet([f"p{i}" for i in range(5)], labels, np.zeros(5, bool), images, 1, [], [], views, view_of,
                           plan)
    x, y = reviewed.training_set(np.array([True, False, True, True, False]))
    assert sorted(x.ravel().tolist()) == [0, 3, 100, 100, 103, 103]  # photos 0 and 3, twice each; not `other`
    assert dict(zip(x.ravel().tolist(), y.tolist())) == {0: 0, 3: 2, 100: 0, 103: 2}
    inside = reviewed.in_scope()
    assert inside.view_of.tolist() == [0, 1, 2, 3, 0, 1, 2]  # renumbered past the `other` row
    assert (inside.views.ravel() - 100 == np.array([0, 1, 3, 4, 0, 1, 3])).all()
    x, y = inside.training_set(np.ones(4, bool))
    assert len(x) == 4 + 7 and (y == np.concatenate([inside.labels, inside.labels[inside.view_of]])).all()


def _rows(path: Path) -> list[list]:
    ws = openpyxl.load_workbook(path)[REVIEW_SHEET]
    return [list(r) for r in ws.iter_rows(values_only=True)]


def _edit(workbook: Path, dst: Path, change) -> Path:
    wb = openpyxl.load_workbook(workbook)
    change(wb[REVIEW_SHEET], columns(wb[REVIEW_SHEET]))
    wb.save(dst)
    return dst


def _label_all(ws, col) -> None:
    labels = truth()
    for r in range(3, ws.max_row + 1):
        ws.cell(r, col["correct_label"]).value = labels[ws.cell(r, col["path"]).value]


def bad_header_renamed(ws, col) -> None:
    _label_all(ws, col)
    ws.cell(2, col["correct_label"]).value = "answer"


def bad_header_deleted(ws, col) -> None:
    _label_all(ws, col)
    ws.delete_rows(2)


def bad_unknown_label(ws, col) -> None:
    _label_all(ws, col)
    ws.cell(7, col["correct_label"]).value = "Jacket"


def bad_conflicting_duplicate(ws, col) -> None:
    _label_all(ws, col)
    ws.append([ws.cell(3, c).value for c in range(1, ws.max_column + 1)])
    last = ws.max_row
    ws.cell(last, col["correct_label"]).value = "Bag" if ws.cell(3, col["correct_label"]).value != "Bag" else "Coat"


def bad_merged_cells(ws, col) -> None:
    _label_all(ws, col)
    letter = openpyxl.utils.get_column_letter(col["correct_label"])
    ws.merge_cells(f"{letter}5:{letter}7")


def bad_nothing_filled(ws, col) -> None:
    pass


def bad_second_answer_column(ws, col) -> None:
    # A second reviewer adds their own answer column at the right; the first has one answer.
    ws.cell(3, col["correct_label"]).value = "Coat"
    second = ws.max_column + 1
    ws.cell(2, second).value = "Correct label"
    _label_all(ws, {**col, "correct_label": second})


def bad_formula_without_saved_value(ws, col) -> None:
    # A script (openpyxl, pandas) writes formulas but never their values.
    _label_all(ws, col)
    label = openpyxl.utils.get_column_letter(col["label"])
    for r in range(5, 8):
        ws.cell(r, col["correct_label"]).value = f"={label}{r}"


def bad_merged_why(ws, col) -> None:
    _label_all(ws, col)
    letter = openpyxl.utils.get_column_letter(col["why"])
    ws.merge_cells(f"{letter}3:{letter}10")


def bad_merged_image_id(ws, col) -> None:
    _label_all(ws, col)
    letter = openpyxl.utils.get_column_letter(col["image_id"])
    ws.merge_cells(f"{letter}4:{letter}5")


@pytest.mark.parametrize("change, words", [
    (bad_header_renamed, "no header row"),
    (bad_header_deleted, "no header row"),
    (bad_unknown_label, "row 7: 'Jacket' is not one of the model's classes"),
    (bad_conflicting_duplicate, "label the same photo"),
    (bad_merged_cells, "are merged"),
    (bad_nothing_filled, "no row of"),
    (bad_second_answer_column, "columns B ('correct_label') and "),
    (bad_second_answer_column, "('Correct label') both read as correct_label; keep one of them"),
    (bad_formula_without_saved_value, "row 5: correct_label holds a formula with no saved value; open and save"),
    (bad_merged_why, "are merged; unmerge them so that every photo has its own why"),
    (bad_merged_image_id, "are merged; unmerge them so that every photo has its own image_id"),
], ids=lambda v: v.__name__ if callable(v) else None)
def test_learn_refuses_bad_workbook(run_cli, workbook: Path, tmp_path: Path, change, words: str) -> None:
    bad = _edit(workbook, tmp_path / "bad.xlsx", change)
    result = run_cli("learn", bad, "--out", tmp_path / "model", *LEARN_FAST)
    assert result.exit_code == 3, result.output
    assert words in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "model").exists()


def test_learn_refuses_files_that_are_not_what_they_say(run_cli, workbook: Path, tmp_path: Path) -> None:
    cases = {
        "csv-named.xlsx": (b"path,correct_label\n/x.png,Coat\n", "is a CSV file named .xlsx"),
        "truncated.xlsx": (workbook.read_bytes()[:3000], "not a readable .xlsx workbook"),
        "encrypted.xlsx": (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(2000), "password-protected"),
        "workbook-named.csv": (workbook.read_bytes(), "is a workbook named .csv"),
        "empty.csv": (b"", "no header row"),
    }
    for name, (data, words) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        result = run_cli("learn", path, "--out", tmp_path / "model", *LEARN_FAST)
        assert result.exit_code == 3, (name, result.output)
        assert words in result.output, (name, result.output)


def test_learn_reads_csv_with_loose_labels(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("image_id,path,correct_label\na,img/a.png, t-shirt/TOP \nb,img/b.png,\n")
    rows = read_review_rows(path, require_filled=False)
    assert [r.correct_label for r in rows] == ["t-shirt/TOP", ""]
    assert rows[0].path == str(tmp_path / "img" / "a.png")  # relative to the CSV's folder


@pytest.mark.parametrize("delimiter", [";", "\t"])
def test_learn_reads_a_csv_separated_by_semicolons_or_tabs(delimiter: str, tmp_path: Path) -> None:
    # European-locale Excel saves "CSV" with ';'; the header says which delimiter it is.
    path = tmp_path / "labels.csv"
    path.write_text(delimiter.join(["image_id", "path", "correct_label", "confidence"]) + "\n"
                    + delimiter.join(["a", "img/a.png", "Coat", "0,93"]) + "\n"
                    + delimiter.join(["b", '"img/b;c.png"', "", "0,5"]) + "\n")
    rows = read_review_rows(path, require_filled=False)
    assert [(r.image_id, r.correct_label) for r in rows] == [("a", "Coat"), ("b", "")]
    assert rows[1].path == str(tmp_path / "img" / "b;c.png")


def test_learn_refuses_a_csv_with_two_answer_columns(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    # pandas would read the second as correct_label.1 and drop its answers without a word
    path.write_text("image_id,path,correct_label,correct_label\na,img/a.png,,Coat\n")
    with pytest.raises(DataError, match=r"columns 3 \('correct_label'\) and 4 \('correct_label'\) both read as "
                                        "correct_label"):
        read_review_rows(path)
    path.write_text("path,correct_label, Path\nimg/a.png,Coat,img/b.png\n")  # which photo is Coat?
    with pytest.raises(DataError, match=r"columns 1 \('path'\) and 3 \('Path'\) both read as path"):
        read_review_rows(path)


def test_learn_reads_formulas_whose_values_a_spreadsheet_saved_and_nothing_else(workbook: Path,
                                                                                  tmp_path: Path) -> None:
    def formulas(ws, col) -> None:
        label = openpyxl.utils.get_column_letter(col["label"])
        for r in range(3, 6):
            ws.cell(r, col["correct_label"]).value = f"={label}{r}"
        ws.cell(6, col["correct_label"]).value = '=IF(FALSE,"Coat","")'  # an empty answer: not reviewed
        ws.cell(7, col["correct_label"]).value = "Bag"  # typed

    scripted = _edit(workbook, tmp_path / "scripted.xlsx", formulas)
    with pytest.raises(DataError, match="row 3: correct_label holds a formula with no saved value"):
        read_review_rows(scripted)
    # An unfilled workbook with a formula elsewhere is read as before (review --exclude).
    other = _edit(workbook, tmp_path / "other.xlsx", lambda ws, col: ws.cell(1, 30, "=1+1"))
    assert not any(r.correct_label for r in read_review_rows(other, require_filled=False))
    if SOFFICE is None:
        pytest.skip("LibreOffice is not installed (apt-get install libreoffice-calc)")
    env = {**os.environ, "HOME": str(tmp_path)}  # a fresh profile; no clash with a running instance
    subprocess.run([SOFFICE, "--headless", "--convert-to", "xlsx", "--outdir", str(tmp_path / "saved"),
                    str(scripted)], check=True, capture_output=True, timeout=180, env=env)
    rows = read_review_rows(tmp_path / "saved" / scripted.name)
    model = {r[-1]: r[2] for r in _rows(scripted)[2:]}
    assert [r.correct_label for r in rows[:5]] == [model[r.path] for r in rows[:3]] + ["", "Bag"]
    assert not any(r.correct_label for r in rows[5:])


def test_answers_typed_into_a_copy_of_the_sheet_are_read(workbook: Path, tmp_path: Path) -> None:
    # People duplicate the sheet ("review (2)") and answer there; the original stays empty.
    from catalog_tagger.learn import collect_labels

    labels = truth()

    def answered_in_a_copy(dst: Path, first_answer: str | None = None) -> str:
        wb = openpyxl.load_workbook(workbook)
        copy = wb.copy_worksheet(wb[REVIEW_SHEET])
        col = columns(copy)
        for r in range(3, 6):
            copy.cell(r, col["correct_label"]).value = labels[copy.cell(r, col["path"]).value]
        if first_answer is not None:
            wb[REVIEW_SHEET].cell(3, col["correct_label"]).value = first_answer
        wb.save(dst)
        return str(copy.title)

    title = answered_in_a_copy(tmp_path / "copied.xlsx")
    got = collect_labels([tmp_path / "copied.xlsx"], FASHION_MNIST_CLASSES)
    assert len(got.rows) == 3 and all(labels[r.path] == r.correct_label for r in got.rows)
    assert all(f"sheet '{title}' row" in r.where for r in got.rows)
    # Two sheets that answer one photo differently: learn asks which to keep.
    answered_in_a_copy(tmp_path / "two-answers.xlsx", first_answer="Bag")
    rows = read_review_rows(tmp_path / "two-answers.xlsx")
    assert rows[0].correct_label == "Bag" and labels[rows[0].path] != "Bag"
    with pytest.raises(DataError, match="label the same photo .* differently"):
        collect_labels([tmp_path / "two-answers.xlsx"], FASHION_MNIST_CLASSES)


def test_clopper_pearson_lower_bound_is_exact() -> None:
    # Known values: 10/10 at 90% one-sided is 0.1 ** (1/10); 0 successes bound 0.
    assert clopper_pearson_lower(10, 10) == pytest.approx(0.1 ** 0.1, abs=1e-5)
    assert clopper_pearson_lower(0, 10) == 0.0
    assert 0.82 < clopper_pearson_lower(45, 50) < 0.83
    table = bounded_table(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, True, False, True]), points=5)
    assert [r["accepted"] for r in table] == [1, 1, 2, 3, 4]
    assert table[-1]["precision"] == 0.75


# --- Real programs: a browser for the page, a spreadsheet program for the workbook ---------------

def _program(*names: str) -> str | None:
    return next((shutil.which(n) for n in names if shutil.which(n)), None)


CHROMIUM = _program("chromium", "chromium-browser", "google-chrome")
SOFFICE = _program("soffice", "libreoffice")


@pytest.fixture(scope="module")
def page(tags: Path) -> Path:
    from click.testing import CliRunner

    from catalog_tagger.cli import cli

    out = tags.parent / "review.html"
    result = CliRunner().invoke(cli, ["review", str(tags), "--budget", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def test_review_page_is_self_contained(page: Path) -> None:
    text = page.read_text()
    assert text.count("data:image/jpeg;base64,") == 10
    assert "http://" not in text and "https://" not in text and "src=\"/" not in text
    assert text.count('<select class="label">') == 10


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_review_page_in_a_real_browser_gives_back_labels(page: Path, tmp_path: Path) -> None:
    # Choose labels the way a click does (value + change event), then let the page's own
    # CSV function write its result where --dump-dom shows it.
    script = """<script>
const sels = document.querySelectorAll("select.label");
sels[0].value = "Coat"; sels[0].dispatchEvent(new Event("change"));
sels[2].value = "other"; sels[2].dispatchEvent(new Event("change"));
// A class of the reviewer's own: the last entry asks for its name, which every menu then offers.
window.prompt = () => "  Watch ";
sels[3].value = sels[3].options[sels[3].options.length - 1].value; sels[3].dispatchEvent(new Event("change"));
sels[4].value = "Watch"; sels[4].dispatchEvent(new Event("change"));
const pre = document.createElement("pre"); pre.id = "csv-out"; pre.textContent = labelsCsv();
document.body.appendChild(pre);
</script></body>"""
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace("</body>", script))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                          probe.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'id="csv-out"' in dom, dom[-2000:]
    import html

    text = html.unescape(dom.split('id="csv-out">', 1)[1].split("</pre>", 1)[0])
    downloaded = tmp_path / "labels.csv"
    downloaded.write_text(text)
    rows = read_review_rows(downloaded)
    assert len(rows) == 10
    assert [r.correct_label for r in rows][:6] == ["Coat", "", "other", "Watch", "Watch", ""]
    assert {r.why for r in rows} == {"random", "typical"}  # learn knows the random slice
    assert {r.path for r in rows} <= set(pd.read_parquet(page.parent / "tags.parquet")["path"])


@pytest.mark.skipif(SOFFICE is None, reason="LibreOffice is not installed (apt-get install libreoffice-calc)")
def test_workbook_opens_in_libreoffice_with_thumbnails_and_dropdown(workbook: Path, tmp_path: Path) -> None:
    # LibreOffice reads the workbook and writes it out again: what survives is what it understood.
    env = {**os.environ, "HOME": str(tmp_path)}  # a fresh profile; no clash with a running instance
    for fmt in ("xlsx", "csv"):
        subprocess.run([SOFFICE, "--headless", "--convert-to", fmt, "--outdir", str(tmp_path / fmt), str(workbook)],
                       check=True, capture_output=True, timeout=180, env=env)
    again = openpyxl.load_workbook(tmp_path / "xlsx" / workbook.name)
    ws = again[REVIEW_SHEET]
    assert len(ws._images) == BUDGET
    (validation,) = ws.data_validations.dataValidation
    assert validation.type == "list" and CLASSES_SHEET in validation.formula1
    assert validation.errorStyle == "warning"  # a name of one's own can be typed (learn --new-classes)
    with open(tmp_path / "csv" / workbook.with_suffix(".csv").name, newline="") as fh:
        lines = list(csv.reader(fh))
    assert "correct_label" in lines[1] and len(lines) == BUDGET + 2


# --- The nightly review and weekly learn jobs --------------------------------------------------

REPO = SAMPLE.parent
TAGGER_EXE = str(Path(__import__("sys").executable).parent / "catalog-tagger")


def _job(name: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "jobs" / name)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TAGGER": TAGGER_EXE, **env})


def test_nightly_review_job_never_asks_twice(tags: Path, tmp_path: Path) -> None:
    shutil.copy(tags, tmp_path / "tags.parquet")
    env = {"OUTPUT_DIR": str(tmp_path), "BUDGET": "25"}
    done = _job("nightly-review.sh", **env)
    assert done.returncode == 0, done.stderr
    (first,) = (tmp_path / "review").glob("review-*.xlsx")
    first.rename(first.with_name("handed-out-1.xlsx"))
    done = _job("nightly-review.sh", **env)
    assert done.returncode == 0, done.stderr
    (second,) = (tmp_path / "review").glob("review-*.xlsx")
    a = set(pd.read_excel(first.with_name("handed-out-1.xlsx"), header=1)["path"])
    b = set(pd.read_excel(second, header=1)["path"])
    assert len(a) == 25 and len(b) == 40 - 25 and not a & b


def test_nightly_review_job_never_asks_twice_in_html_either(tags: Path, tmp_path: Path) -> None:
    from catalog_tagger.review_html import read_review_html

    shutil.copy(tags, tmp_path / "tags.parquet")
    env = {"OUTPUT_DIR": str(tmp_path), "BUDGET": "25", "FORMAT": "html"}
    assert _job("nightly-review.sh", **env).returncode == 0
    (first,) = (tmp_path / "review").glob("review-*.html")
    first.rename(first.with_name("handed-out-1.html"))
    done = _job("nightly-review.sh", **env)
    assert done.returncode == 0, done.stderr
    (second,) = (tmp_path / "review").glob("review-*.html")
    a = {p for _, p in read_review_html(first.with_name("handed-out-1.html"))}
    b = {p for _, p in read_review_html(second)}
    assert len(a) == 25 and len(b) == 40 - 25 and not a & b


def test_weekly_learn_job_publishes_only_a_better_model(workbook: Path, tags: Path, tmp_path: Path) -> None:
    filled, models = tmp_path / "filled", tmp_path / "published"
    filled.mkdir()
    env = {"FILLED_DIR": str(filled), "MODEL_DIR": str(models), "RUNS_DIR": str(tmp_path / "runs"),
           "EXTRA_ARGS": " ".join(LEARN_FAST), "TAGS_FILE": str(tags)}
    assert _job("weekly-learn.sh", **env).returncode == 2  # MODEL_DIR not there: a typo or an unmounted share
    models.mkdir()  # made once, empty until the first model is published
    done = _job("weekly-learn.sh", **env)  # nothing filled yet: nothing happens
    assert done.returncode == 0 and "kept" in done.stdout and not any(models.iterdir())

    fill(workbook, filled / "week1.xlsx")
    done = _job("weekly-learn.sh", **env)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "runs").iterdir()
    card = json.loads((run / "model.json").read_text())
    assert card["training"]["self_training"]["catalog"] == str(tags)  # the nightly tags taught it too
    comparison = card["metrics"]["comparison"]
    better = comparison["cv_accuracy"] > comparison["init_accuracy"]
    assert "bundled model" in done.stdout  # nothing published yet: it says what it starts from
    verdict = done.stdout.splitlines()[1]
    assert verdict.startswith("publish" if better else "keep"), done.stdout
    assert (models / "model.json").exists() == better
    published = (models / "model.json").read_bytes() if better else None

    # A broken file makes learn fail: the published model (or its absence) stays as it was.
    (filled / "week2.xlsx").write_bytes(b"not a workbook")
    done = _job("weekly-learn.sh", **env)
    assert done.returncode == 3
    assert ((models / "model.json").read_bytes() if better else None) == published
    assert better or not any(models.iterdir())


# ---------------------------------------------------------------- "none of these" (issue 18)

def _chessboard(rng: np.random.Generator):
    """A photo of no garment that the bundled detector mostly misses (a Sandal at 0.9)."""
    from PIL import Image, ImageDraw

    cell, n = int(rng.integers(25, 60)), int(rng.integers(5, 9))
    img = Image.new("RGB", (cell * n + 40, cell * n + 40), "white")
    draw, colour = ImageDraw.Draw(img), tuple(int(c) for c in rng.integers(0, 120, 3))
    for a in range(n):
        for b in range(n):
            if (a + b) % 2:
                draw.rectangle((20 + a * cell, 20 + b * cell, 20 + (a + 1) * cell, 20 + (b + 1) * cell), fill=colour)
    return img


def _rings_or_stripes(rng: np.random.Generator, stripes: bool):
    """Photos of no garment that the bundled detector flags (its ink and grain bounds)."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (400, 400), "white")
    draw, colour = ImageDraw.Draw(img), tuple(int(c) for c in rng.integers(0, 120, 3))
    if stripes:
        w = int(rng.integers(10, 25))
        for x in range(-400, 400, 2 * w):
            draw.polygon([(x, 0), (x + w, 0), (x + w + 400, 400), (x + 400, 400)], fill=colour)
    else:
        for r in range(180, 10, -int(rng.integers(15, 30))):
            draw.ellipse((200 - r, 200 - r, 200 + r, 200 + r), outline=colour, width=int(rng.integers(4, 9)))
    return img


@pytest.fixture(scope="module")
def mixed_catalog(tmp_path_factory: pytest.TempPathFactory, fmnist_test) -> tuple[Path, dict[str, str]]:
    """Garments rendered as catalog photos (6 per class), 12 chessboards, 8 rings and stripes
    and an unreadable file; the truth a person would type (``other`` for no garment)."""
    from catalog_tagger.synth import render_catalog_photo

    folder = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    truth: dict[str, str] = {}
    for c, name in enumerate(FASHION_MNIST_CLASSES):
        for i in np.flatnonzero(fmnist_test.labels == c)[:6]:
            path = folder / f"item{i:05d}.jpg"
            render_catalog_photo(fmnist_test.images[i], int(rng.integers(3, 8)), rng=rng).save(path)
            truth[str(path)] = name
    for i in range(12):
        _chessboard(rng).save(folder / f"chess{i:02d}.png")
        truth[str(folder / f"chess{i:02d}.png")] = OTHER
    for i in range(8):
        _rings_or_stripes(rng, stripes=i % 2 == 1).save(folder / f"shape{i:02d}.png")
        truth[str(folder / f"shape{i:02d}.png")] = OTHER
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder, truth


@pytest.fixture(scope="module")
def mixed_review(mixed_catalog) -> tuple[Path, pd.DataFrame]:
    """The mixed catalog tagged by the bundled model, and a review of 70 of its 80 readable photos."""
    from click.testing import CliRunner

    from catalog_tagger.cli import cli

    catalog, _ = mixed_catalog
    tags = catalog.parent / f"{catalog.name}-tags.parquet"
    for args in (["-q", "tag", str(catalog), "--out", str(tags), "--workers", "0"],
                 ["review", str(tags), "--budget", "70", "--out", str(tags.with_suffix(".xlsx"))]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    return tags, pd.read_excel(tags.with_suffix(".xlsx"), header=1)


def _fill_and_learn(run_cli, mixed_review, truth: dict[str, str], work: Path,
                    keep_other: int | None = None) -> tuple[dict, str]:
    """Fill the review (at most ``keep_other`` rows typed 'other') and learn; the card and learn's output."""
    tags, rows = mixed_review
    others = [p for p in rows["path"] if truth[p] == OTHER]
    typed = {p: truth[p] for p in rows["path"] if truth[p] != OTHER or p in others[:keep_other]}
    fill(tags.with_suffix(".xlsx"), work / "filled.xlsx", typed)
    result = run_cli("learn", work / "filled.xlsx", "--out", work / "model", "--epochs", "20", "--folds", "3",
                     "--workers", "0", "--device", "cpu")
    assert result.exit_code == 0, result.output
    return json.loads((work / "model" / "model.json").read_text()), result.output


def test_photos_marked_other_tune_the_learned_models_reject_threshold(run_cli, mixed_catalog, mixed_review,
                                                                      tmp_path) -> None:
    catalog, truth = mixed_catalog
    tags, rows = mixed_review
    card, said = _fill_and_learn(run_cli, mixed_review, truth, tmp_path)
    # review offers flagged photos as such, draws its random slice from flagged and labeled
    # photos alike, and never offers the file that could not be read
    flagged = rows[rows["why"] == "out_of_scope"]
    assert len(flagged) >= 5 and flagged["label"].str.startswith("out of scope (nearest: ").all()
    assert not rows["path"].str.endswith("broken.jpg").any()
    assert set(rows["why"]) == {"random", "out_of_scope", "typical"}
    marked = [p for p in rows["path"] if truth[p] == OTHER]
    assert len(marked) >= 10
    entry = card["out_of_scope"]
    assert entry["method"] == "energy" and entry["chosen"]["source"] == "reviewed photos"
    assert entry["chosen"]["other"] == len(marked) and entry["chosen"]["out_of_fold"]
    assert entry["chosen"]["in_scope"] == card["training"]["labels"]
    measured = entry["chosen"]["in_scope_flagged"]  # LearnConfig.max_in_scope_flagged, out of fold
    assert measured["share"] <= 0.10 and measured["share"] <= measured["upper_bound"]
    assert entry["chosen"]["other_caught"]["lower_bound"] <= entry["chosen"]["other_caught"]["share"]
    assert "catches" in said and "marked other" in said

    # the new model flags the photos marked other and keeps the garments, reviewed or not
    out = tmp_path / "again.parquet"
    assert run_cli("-q", "tag", catalog, "--model", tmp_path / "model", "--out", out, "--workers", "0").exit_code == 0
    again = pd.read_parquet(out).set_index("path")
    assert (again.loc[marked, "status"] == "out_of_scope").all()
    garments = [p for p, t in truth.items() if t != OTHER]
    assert (again.loc[garments, "status"] == "ok").mean() >= 0.85
    # the bundled model caught few of the chessboards; the new one catches them
    chess = [p for p in truth if "chess" in p]
    before = pd.read_parquet(tags).set_index("path")
    assert (before.loc[chess, "status"] == "out_of_scope").mean() <= 0.5
    assert (again.loc[chess, "status"] == "out_of_scope").mean() >= 0.9


def test_too_few_photos_marked_other_fall_back_to_a_small_in_scope_share(run_cli, mixed_catalog, mixed_review,
                                                                          tmp_path) -> None:
    card, said = _fill_and_learn(run_cli, mixed_review, mixed_catalog[1], tmp_path, keep_other=3)
    chosen = card["out_of_scope"]["chosen"]
    assert chosen["other"] == 3 and chosen["source"] == "reviewed in-scope photos only (fallback)"
    assert card["out_of_scope"]["flag_share"] == chosen["fallback_flag_share"] == 0.02
    assert "fallback" in chosen["rule"] and "fallback" in said
    assert chosen["in_scope_flagged"]["share"] <= 0.05


@pytest.mark.parametrize("n_other, share", [(0, 0.02), (9, 0.02), (10, 0.10), (40, 0.10)])
def test_reject_threshold_flags_at_most_its_share_of_in_scope_photos(n_other: int, share: float) -> None:
    from catalog_tagger.reject import ReviewedScores, tune_detector

    rng = np.random.default_rng(0)
    n_in = 137  # 10% is 13.7 photos: an interpolated quantile would flag 14
    in_logits = rng.normal(0, 1, (n_in, 10)) + 6 * np.eye(10)[rng.integers(0, 10, n_in)]
    other_logits = rng.normal(0, 1, (n_other, 10))  # flat: high energy
    images = np.full((n_in + n_other, 1, 28, 28), 0, np.uint8)
    images[:, :, 4:24, 8:20] = 160  # a plain garment-sized blob: no bound flags it
    entry = tune_detector(ReviewedScores(in_logits, images[:n_in], np.arange(n_in) < 30, other_logits,
                                         images[n_in:], np.arange(n_other) < 3),
                          None, max_in_scope_flagged=0.10, min_other=10, fallback_flag_share=0.02)
    chosen = entry["chosen"]
    assert entry["flag_share"] == share and chosen["other"] == n_other
    assert (chosen["source"] == "reviewed photos") == (n_other >= 10)
    flagged = chosen["in_scope_flagged"]
    assert flagged["share"] <= share and int(round(flagged["share"] * n_in)) == int(share * n_in)
    assert flagged["share"] <= flagged["upper_bound"] <= 1
    if n_other:
        caught = chosen["other_caught"]  # flat logits are far above every peaked one
        assert caught["share"] >= 0.9 and caught["lower_bound"] <= caught["share"]
    assert chosen["random_slice"]["in_scope_flagged"]["n"] == 30


def test_review_reads_flagged_rows_of_a_csv_tag_output_and_leaves_failed_ones_out(tmp_path: Path) -> None:
    from catalog_tagger.review import read_tags

    tags = tmp_path / "tags.csv"
    tags.write_text("image_id,path,status,label,confidence,label_2,score_2\n"
                    "a.jpg,/x/a.jpg,ok,Coat,0.9,Shirt,0.05\n"
                    "b.jpg,/x/b.jpg,out_of_scope,,,Bag,0.2\n"  # CSV: top-1 of a flagged row is not kept
                    "c.jpg,/x/c.jpg,unreadable,,,,\n")
    frame, _ = read_tags(tags)
    assert list(frame["image_id"]) == ["a.jpg", "b.jpg"] and list(frame["flagged"]) == [False, True]
    assert list(frame["label"]) == ["Coat", "out of scope"]  # no "nearest": label_2 is the second nearest


# ---------------------------------------------------------------- classes of one's own (issue 18)

def test_a_name_typed_for_photos_of_no_class_becomes_a_class_of_its_own(run_cli, mixed_catalog, mixed_review,
                                                                       tmp_path) -> None:
    catalog, truth = mixed_catalog
    tags, rows = mixed_review
    typed = {p: ("Chessboard" if "chess" in p else truth[p]) for p in rows["path"]}
    watches = [p for p in rows["path"] if "shape" in p][:2]
    typed.update({p: "Watch" for p in watches})  # too few photos for a class yet
    fill(tags.with_suffix(".xlsx"), tmp_path / "filled.xlsx", typed)
    learn = ("learn", tmp_path / "filled.xlsx", "--out", tmp_path / "model", "--epochs", "20", "--folds", "3",
             "--workers", "0", "--device", "cpu")
    refused = run_cli(*learn)
    assert refused.exit_code == 3 and "pass --new-classes" in refused.output
    result = run_cli(*learn, "--new-classes")
    assert result.exit_code == 0, result.output
    chess = [p for p in rows["path"] if "chess" in p]
    assert f"classes of your own: Chessboard ({len(chess)} photos)" in result.output
    assert "learned as 'other' until each has 5 photos: Watch (2)" in result.output
    card = json.loads((tmp_path / "model" / "model.json").read_text())
    assert card["classes"] == card["model_config"]["classes"] == [*FASHION_MNIST_CLASSES, "Chessboard"]
    assert card["training"]["new_classes"] == {"Chessboard": len(chess)}
    assert card["training"]["too_few_for_a_class"] == {"Watch": 2}
    assert card["metrics"]["cv_per_class_accuracy"]["Chessboard"] >= 0.8  # out of fold

    # tag names them, the photos nobody reviewed included, and keeps the garments
    out = tmp_path / "again.parquet"
    assert run_cli("-q", "tag", catalog, "--model", tmp_path / "model", "--out", out, "--workers", "0").exit_code == 0
    again = pd.read_parquet(out).set_index("path")
    boards = [p for p in truth if "chess" in p]
    assert (again.loc[boards, "label"] == "Chessboard").mean() >= 0.8
    garments = [p for p, t in truth.items() if t != OTHER]
    assert (again.loc[garments, "label"] == pd.Series(truth)[garments]).mean() >= 0.7
    # the next review offers the new class in its drop-down
    book = tmp_path / "next.xlsx"
    assert run_cli("review", out, "--budget", "5", "--out", book).exit_code == 0
    names = [c.value for c in openpyxl.load_workbook(book)[CLASSES_SHEET]["A"]]
    assert names == [*FASHION_MNIST_CLASSES, "Chessboard", OTHER]
    # its classes begin with Fashion-MNIST's, so it still evaluates there (a Chessboard is a mistake)
    result = run_cli("-q", "evaluate", "--model", tmp_path / "model", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["accuracy"] > 0.5


def test_a_typo_of_a_class_is_not_a_class_of_its_own(run_cli, workbook: Path, tmp_path: Path) -> None:
    def typo(ws, col) -> None:
        _label_all(ws, col)
        ws.cell(5, col["correct_label"]).value = "Shrit"

    bad = _edit(workbook, tmp_path / "bad.xlsx", typo)
    result = run_cli("learn", bad, "--out", tmp_path / "model", "--new-classes", *LEARN_FAST)
    assert result.exit_code == 3 and "row 5: 'Shrit' is not one of the model's classes; did you mean 'Shirt'?" \
        in result.output, result.output
    assert not (tmp_path / "model").exists()


def test_a_new_class_starts_imprinted_and_leaves_the_old_ones_alone() -> None:
    from catalog_tagger.checkpoint import load_model
    from catalog_tagger.new_classes import extend_model, plan_classes

    plan = plan_classes(FASHION_MNIST_CLASSES, ["Watch"] * 6 + ["watch "] + ["Belt"] * 4, min_labels=5)
    assert plan.new == {"Watch": 7} and plan.too_few == {"Belt": 4}
    start = load_model(None)
    rng = np.random.default_rng(0)
    rings = np.zeros((6, 1, 28, 28), np.uint8)
    yy, xx = np.mgrid[:28, :28]
    for i, r in enumerate(rng.integers(6, 11, 6)):
        rings[i, 0][np.abs(np.hypot(yy - 14, xx - 14) - r) < 1.5] = 220
    grown = extend_model(start, plan.classes, rings, np.full(6, 10))
    assert grown.classes == (*FASHION_MNIST_CLASSES, "Watch") and start.classes == FASHION_MNIST_CLASSES
    x = torch.from_numpy(rings).float() / 255
    with torch.no_grad():
        old, new = start.model.eval()(x), grown.model.eval()(x)
    assert torch.allclose(new[:, :10], old, atol=1e-5)  # the garments score as before
    assert (new.argmax(1) == 10).all()  # the class's own photos score it highest before any training
