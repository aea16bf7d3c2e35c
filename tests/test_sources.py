"""What SRC names becomes rows: webdataset tar members, cut shards, table columns, folders of tables.

Every input a source names gives a row or a failed.jsonl entry; none disappears. Runs in-process on
the tiny model (no process boundary is under test)."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import beit_jax
from beit_jax.extract import AllInputsFailedError, extract, read_failures, read_features
from beit_jax.sources import list_inputs
from tests.support import TINY, cli, extract_cli, sample_photos, subprocess_env


@pytest.fixture(scope="module")
def tiny():
    return beit_jax.create_model(TINY, num_classes=0)


@pytest.fixture(scope="module")
def photos(imagenet_dir):
    return sorted(imagenet_dir.iterdir())[:6]


def _tar(path, members):
    """A tar of (member name, file) pairs, in that order."""
    with tarfile.open(path, "w") as tf:
        for name, src in members:
            data = src.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _run(tiny, src, out, **kw):
    model, variables = tiny
    summary = extract(src, str(out), model, variables, batch_size=4, progress=False, **kw)
    paths, feats = read_features(out)
    return summary, paths, feats, read_failures(out)


# ---- webdataset tar members ---------------------------------------------------------------------
def test_images_sharing_a_key_are_a_row_each(tiny, photos, tmp_path):
    """`frame.0001.jpg, frame.0002.jpg` share webdataset's key `frame`, and `000.jpg` + `000.png` are
    one sample with two image members: a row per image member, ids naming the member (N images in
    were 1 row out, silently)."""
    shard = _tar(tmp_path / "s.tar", [("frame.0001.jpg", photos[0]), ("frame.0002.jpg", photos[1]),
                                      ("000.jpg", photos[2]), ("000.png", photos[3]), ("000.cls", photos[4]),
                                      ("001.jpg", photos[5])])
    _, paths, feats, failed = _run(tiny, str(shard), tmp_path / "o")
    assert [p.split("/")[-1] for p in paths] == ["frame.0001.jpg", "frame.0002.jpg", "000.jpg", "000.png", "001"]
    assert failed == []
    _, _, f1, _ = _run(tiny, [str(photos[i]) for i in (0, 1, 2, 3, 5)], tmp_path / "files")
    np.testing.assert_array_equal(feats, f1)  # each row is its own image


def test_a_repeated_member_name_is_recorded_not_dropped(tiny, photos, tmp_path):
    shard = _tar(tmp_path / "d.tar", [("000.jpg", photos[0]), ("000.jpg", photos[1]), ("001.jpg", photos[2])])
    _, paths, _, failed = _run(tiny, str(shard), tmp_path / "o")
    assert [p.split("/")[-1] for p in paths] == ["000", "001"]
    assert len(failed) == 1 and failed[0]["path"].endswith("/000.jpg#2")
    assert "appears again in the same sample" in failed[0]["error"]


@pytest.mark.parametrize("where,kept", [
    ("inside a header", 2), ("at a member boundary", 2), ("inside the padding", 2), ("inside a member", 1),
    ("before the end blocks", 3),
])
def test_a_cut_shard_keeps_every_complete_sample_and_records_the_cut(where, kept, tiny, photos, tmp_path):
    """A shard cut inside a header lost its tail with no failed.jsonl entry; one cut inside a
    member's padding dropped the complete sample before the cut."""
    good = _tar(tmp_path / "good.tar", [(f"{i:03d}.jpg", photos[i]) for i in range(3)])
    with tarfile.open(good) as tf:
        m = tf.getmembers()
    end_of = [x.offset_data + x.size + (-x.size % 512) for x in m]
    cut = {"inside a header": m[2].offset + 100, "at a member boundary": m[2].offset,
           "inside the padding": m[1].offset_data + m[1].size + 3, "inside a member": m[1].offset_data + 10,
           "before the end blocks": end_of[2]}[where]
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "cut.tar").write_bytes(good.read_bytes()[:cut])
    _, paths, _, failed = _run(tiny, str(tmp_path / "shards" / "cut.tar"), tmp_path / "o")
    assert [p.split("/")[-1] for p in paths] == [f"{i:03d}" for i in range(kept)]
    assert len(failed) == 1 and failed[0]["path"].endswith("cut.tar#unreadable"), failed
    assert "the complete samples before it were kept" in failed[0]["error"]


# ---- tables -------------------------------------------------------------------------------------
def test_table_columns_of_different_types_get_one_type(tiny, photos, tmp_path):
    """A CSV whose captions are all numbers beside one with text crashed the parquet writer after
    the model ran (and on --resume): one type per column for the run, said loudly."""
    with open(tmp_path / "a.csv", "w", newline="") as f:
        csv.writer(f).writerows([["url", "caption", "score"], [photos[0], 123, 1], [photos[1], 456, 2]])
    with open(tmp_path / "b.csv", "w", newline="") as f:
        csv.writer(f).writerows([["url", "caption", "score"], [photos[2], "a cat", 0.5], [photos[3], "", 0.25]])
    with pytest.warns(UserWarning, match=r"column 'caption' is string in .*b\.csv but int64 in an earlier "
                                         r"table: it is written as string"):
        _, paths, _, _ = _run(tiny, str(tmp_path / "*.csv"), tmp_path / "o", shard_size=2)
    assert len(paths) == 4
    tables = [pq.read_table(p) for p in sorted((tmp_path / "o" / "metadata").iterdir())]
    assert all(t.schema == tables[0].schema for t in tables)  # one schema, as the consumers need
    assert tables[0].schema.field("caption").type == pa.string()
    assert tables[0].schema.field("score").type == pa.float64()
    assert pa.concat_tables(tables).column("caption").to_pylist() == ["123", "456", "a cat", ""]
    assert pa.concat_tables(tables).column("score").to_pylist() == [1.0, 2.0, 0.5, 0.25]


def test_a_folder_of_tables_reads_the_tables(tiny, photos, tmp_path):
    """`beit-jax extract dir_of_parquets/` (an img2dataset URL-table folder) found 'no images'."""
    (tmp_path / "tables").mkdir()
    for i, part in enumerate((photos[:2], photos[2:5])):
        pq.write_table(pa.table({"url": [str(p) for p in part], "n": list(range(len(part)))}),
                       tmp_path / "tables" / f"part-{i:05d}.parquet")
    res = cli("extract", tmp_path / "tables", "--output", tmp_path / "o", "--model", TINY, "--random-weights",
              "--no-progress")
    assert res.returncode == 0, res.stderr
    assert read_features(tmp_path / "o")[0] == [str(p) for p in photos[:5]]
    assert list_inputs(str(tmp_path / "tables")).columns == ["n"]
    (tmp_path / "empty").mkdir()
    res = cli("extract", tmp_path / "empty", "--output", tmp_path / "o2", "--model", TINY, "--random-weights")
    assert res.returncode == 2 and f"no images found in {tmp_path / 'empty'} (looked for" in res.stderr
    (tmp_path / "empty-tables").mkdir()  # tables without a row: said so, nothing written
    pq.write_table(pa.table({"url": pa.array([], pa.string())}), tmp_path / "empty-tables" / "t.parquet")
    (tmp_path / "empty-tables" / "t.csv").write_text("url\n")
    res = extract_cli(tmp_path / "empty-tables", "--output", tmp_path / "o3")
    assert res.returncode == 2 and "its 2 tables and lists hold no rows" in res.stderr, res.stderr
    assert not (tmp_path / "o3").exists()


def test_parquet_rows_are_read_by_row_group_when_their_unit_runs(tiny, photos, tmp_path):
    """A parquet table is listed from its footer (a TableFile: row count, schema), its rows read
    when their unit runs; units cross row groups and files, ids stay input indices."""
    from beit_jax.extract import Plan
    from beit_jax.sources import TableFile

    urls = [str(photos[i % len(photos)]) for i in range(10)]
    pq.write_table(pa.table({"url": urls[:7], "n": list(range(7))}), tmp_path / "a.parquet", row_group_size=3)
    pq.write_table(pa.table({"url": urls[7:], "n": [7.5, 8.5, 9.5]}), tmp_path / "b.parquet")
    with pytest.warns(UserWarning, match="column 'n' is double"):
        inputs = list_inputs([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")])
    assert [type(i) for i in inputs.items] == [TableFile, TableFile] and [len(i) for i in inputs.items] == [7, 3]
    plan = Plan(inputs, 4)
    assert [(u.start, u.count) for u in plan.units] == [(0, 4), (4, 4), (8, 2)]
    refs = [r for u in plan.units for r in plan.refs_of(u)]
    assert [r.index for r in refs] == list(range(10)) and [r.id for r in refs] == urls
    assert [r.meta["n"] for r in refs] == [float(i) for i in range(7)] + [7.5, 8.5, 9.5]  # one type per column
    _, paths, _, failed = _run(tiny, inputs, tmp_path / "o", shard_size=4)
    assert paths == urls and failed == []
    # a table rewritten after the run listed it: its rows fail, saying why (never other rows read
    # under the listed identity); the other table's rows are read
    with pytest.warns(UserWarning):
        plan = Plan(list_inputs([str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")]), 4)
    time.sleep(0.01)
    pq.write_table(pa.table({"url": urls[:3], "n": [1.0, 2.0, 3.0]}), tmp_path / "b.parquet")
    rows = [r for u in plan.units for r in plan.refs_of(u)]
    assert [r.error is None for r in rows] == [True] * 7 + [False] * 3
    assert "b.parquet: rows 0-0 could not be read (ValueError: the file changed since the run listed it" in rows[7].error


def test_a_folder_of_images_reads_its_images_and_says_what_it_skipped(photos, tmp_path):
    """Images beside a table: the folder's images (the table is not read, and a warning says so)."""
    (tmp_path / "mixed").mkdir()
    for p in photos[:2]:
        (tmp_path / "mixed" / p.name).write_bytes(p.read_bytes())
    pq.write_table(pa.table({"url": [str(photos[3])]}), tmp_path / "mixed" / "other.parquet")
    with pytest.warns(UserWarning, match=r"1 files were not read \(other\.parquet\): 2 images were read"):
        items = list(list_inputs(str(tmp_path / "mixed")).refs())
    assert sorted(r.id.split("/")[-1] for r in items) == sorted(p.name for p in photos[:2])


def test_a_webdataset_folder_reads_the_shards_not_their_metadata_tables(tiny, photos, tmp_path):
    """img2dataset writes NNNNN.parquet (with the url column) beside each NNNNN.tar: reading both
    did every image twice (once from the tar, once by fetching its URL again)."""
    (tmp_path / "wds").mkdir()
    _tar(tmp_path / "wds" / "00000.tar", [(f"{i:03d}.jpg", photos[i]) for i in range(3)])
    pq.write_table(pa.table({"url": [str(p) for p in photos[:3]]}), tmp_path / "wds" / "00000.parquet")
    with pytest.warns(UserWarning, match=r"00000\.parquet\): its 1 tar shards were read"):
        _, paths, _, failed = _run(tiny, str(tmp_path / "wds"), tmp_path / "o")
    assert [p.split("/")[-1] for p in paths] == ["000", "001", "002"] and failed == []


def test_links_compressed_shards_and_repeated_keys(tiny, photos, tmp_path):
    """A symlink or hard link member vanished without a trace; a key seen again later in a shard
    gave two rows with one id; a gzip shard was 'unreadable at its start'."""
    data = photos[0].read_bytes()
    with tarfile.open(tmp_path / "links.tar", "w") as tf:
        for name in ("000.jpg", "002.jpg"):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, kind in (("001.jpg", tarfile.SYMTYPE), ("003.jpg", tarfile.LNKTYPE)):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "000.jpg"
            tf.addfile(info)
        info = tarfile.TarInfo("000.jpg")  # the key 000 again, after others
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    _, paths, _, failed = _run(tiny, str(tmp_path / "links.tar"), tmp_path / "o")
    assert [p.split("/")[-1] for p in paths] == ["000", "002", "000#2"]
    assert sorted((f["path"].split("/")[-1], "not followed" in f["error"]) for f in failed) == \
        [("001.jpg", True), ("003.jpg", True)]
    with tarfile.open(tmp_path / "gz.tar", "w:gz") as tf:  # gzip, under a plain .tar name
        tf.add(photos[1], arcname="000.jpg")
    _tar(tmp_path / "raw.tar", [("000.jpg", photos[2])])
    import gzip
    (tmp_path / "x.tar.gz").write_bytes(gzip.compress((tmp_path / "raw.tar").read_bytes()))
    _, paths, _, failed = _run(tiny, [str(tmp_path / "gz.tar"), str(tmp_path / "x.tar.gz")], tmp_path / "c")
    assert [p.split("/")[-1] for p in paths] == ["000", "000"] and failed == []
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    model, variables = tiny
    with pytest.raises(AllInputsFailedError, match="the 1 tar shards of SRC hold no samples"):
        extract(str(tmp_path / "empty.tar"), str(tmp_path / "e"), model, variables, progress=False)
    (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 64)
    _, _, _, failed = _run(tiny, [str(tmp_path / "junk.tar"), str(photos[0])], tmp_path / "j")
    assert "not a tar archive (plain, gzip, bz2 or xz), or empty; nothing of it was read" in failed[0]["error"]


# ---- odd folders never hang or multiply ---------------------------------------------------------
def test_symlink_loops_fifos_and_truncated_shards(imagenet_dir, tmp_path):
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    photos = sample_photos(imagenet_dir, 3)
    for p in photos:
        shutil.copy(p, root / "a" / p.name)
    (root / "a" / "b" / "up").symlink_to(root / "a")  # a loop: a/b/up -> a
    os.mkfifo(root / "a" / "pipe.jpg")  # a FIFO named like an image: reading it would block forever
    model, variables = beit_jax.create_model(TINY, num_classes=0)
    summary = extract(str(root), str(tmp_path / "o"), model, variables, batch_size=4, progress=False)
    paths, _ = read_features(tmp_path / "o")
    assert sorted(Path(p).name for p in paths) == sorted(p.name for p in photos)  # each photo once
    errors = {Path(f["path"]).name: f["error"] for f in read_failures(tmp_path / "o")}
    assert "not a regular file" in errors["pipe.jpg"] and "symlink loop" in errors["up"]
    assert summary["images"] == 3

    import tarfile
    shard = tmp_path / "good.tar"
    with tarfile.open(shard, "w") as tf:
        for p in photos:
            tf.add(p, arcname=p.stem + ".jpg")
    with tarfile.open(shard) as tf:
        second = tf.getmembers()[1]
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[: second.offset_data + second.size // 2])  # inside the 2nd image
    extract(str(tmp_path / "*.tar"), str(tmp_path / "t"), model, variables, batch_size=4, progress=False)
    paths, _ = read_features(tmp_path / "t")
    kept_from_cut = [p for p in paths if "/cut.tar/" in p]
    assert len([p for p in paths if "/good.tar/" in p]) == 3 and len(kept_from_cut) == 1
    assert any("cut.tar" in f["path"] and "unreadable after member" in f["error"]
               for f in read_failures(tmp_path / "t"))


def test_unreadable_folder_is_recorded(imagenet_dir, tmp_path):
    """A sub-folder the user cannot list. Root reads anything, so as root the listing runs without
    the capabilities that let it (setpriv drops CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH, still uid 0:
    the checkout and the venv stay readable wherever they sit, even under a 0700 folder)."""
    base = tmp_path / "tree"
    (base / "ok").mkdir(parents=True)
    (base / "secret").mkdir()
    for p in sample_photos(imagenet_dir, 2):
        shutil.copy(p, base / "ok" / p.name)
    shutil.copy(sample_photos(imagenet_dir, 3)[2], base / "secret" / "hidden.jpg")
    os.chmod(base / "secret", 0)
    code = ("import json, sys; from beit_jax.sources import list_inputs; i = list_inputs(sys.argv[1]); "
            "print(json.dumps([[r.id for r in i.refs()], [p.error for p in i.problems]]))")
    cmd = [sys.executable, "-c", code, str(base)]
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot test an unreadable folder")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] + cmd
    try:
        res = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    finally:
        os.chmod(base / "secret", stat.S_IRWXU)
    assert res.returncode == 0, res.stderr[-2000:]
    items, problems = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(items) == 2 and len(problems) == 1 and "cannot list folder" in problems[0] and "secret" in problems[0]
