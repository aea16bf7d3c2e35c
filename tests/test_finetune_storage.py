"""Fine-tuning where the data lives (a real S3 server, moto, on 127.0.0.1): an ImageFolder under an
S3 prefix and a parquet table of S3 URLs and class names train the same model as the local
ImageFolder; the run folder on S3 (checkpoint, metrics, exports) resumes exactly, also after a
SIGKILL; webdataset shards on S3 stream in an order that is the same on any number of processes
and resume exactly from their checkpointed position."""
from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import subprocess
import time

import jax
import numpy as np
import pytest
from flax import serialization

import beit_jax
from beit_jax import finetune
from beit_jax.sources import list_image_folder, list_labelled
from beit_jax.storage import read_whole
from tests.support import TINY, cli, cli_command, digits_folder, run_process_pair, subprocess_env

STEPS = dict(total_steps=6, warmup_steps=1, lr=1e-3)


@pytest.fixture(scope="module")
def digits_s3(s3fs_client, tmp_path_factory):
    """30 digits (3 per class) as a local ImageFolder, the same files under s3://ftune/train/, and
    s3://ftune/train.parquet listing them (S3 URLs, class names) in the local folder's order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = digits_folder(tmp_path_factory.mktemp("ftdigits") / "train", n_per_class=3, size=32)
    fs = s3fs_client
    fs.mkdir("ftune")
    refs, labels, classes = list_image_folder(local)
    for r in refs:
        fs.put_file(r.path, f"ftune/train/{r.path[len(str(local)) + 1:]}")
    table = pa.table({"url": [f"s3://ftune/train/{r.path[len(str(local)) + 1:]}" for r in refs],
                      "label": [classes[k] for k in labels], "width": [32] * len(refs)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=7)  # several row groups
    fs.pipe_file("ftune/train.parquet", buf.getvalue())
    fs.invalidate_cache()
    return local


@pytest.fixture(scope="module")
def shards_s3(digits_s3, s3fs_client, tmp_path_factory):
    """The 30 digits as 6 webdataset shards of 5 samples (png + cls + json {"label": name}), written
    with tarfile as webdataset's TarWriter lays them out, on local disk and under s3://ftune/shards/."""
    refs, labels, classes = list_image_folder(digits_s3)
    out = tmp_path_factory.mktemp("shards")
    for k in range(6):
        with tarfile.open(out / f"d-{k:05d}.tar", "w") as tf:
            for i in range(5 * k, 5 * k + 5):
                with open(refs[i].path, "rb") as f:
                    png = f.read()
                for ext, data in (("png", png), ("cls", str(int(labels[i])).encode()),
                                  ("json", json.dumps({"label": classes[labels[i]]}).encode())):
                    info = tarfile.TarInfo(f"sample{i:04d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        s3fs_client.put_file(str(out / f"d-{k:05d}.tar"), f"ftune/shards/d-{k:05d}.tar")
    (out / "classes.txt").write_text("".join(c + "\n" for c in classes))
    s3fs_client.invalidate_cache()
    return out


def _model():
    return beit_jax.create_model(TINY, num_classes=10, img_size=32)


def _params(url):
    data = read_whole(url)
    return jax.tree_util.tree_leaves(serialization.msgpack_restore(data)["params"])


def _train(src, out, **kw):
    model, variables = _model()
    return finetune.train(model, variables, src, output_dir=out, batch_size=8, cfg=finetune.TrainConfig(**STEPS),
                          checkpoint_every=2, progress=False, log=lambda *a, **k: None, **kw)


def test_s3_prefix_and_parquet_table_train_the_local_model_and_the_s3_run_resumes(digits_s3, s3fs_client, tmp_path):
    local = digits_s3
    refs, labels, classes = list_labelled("s3://ftune/train")
    lrefs, llabels, lclasses = list_image_folder(local)
    assert classes == lclasses and list(labels) == list(llabels)
    assert [r.id for r in refs] == [f"s3://ftune/train/{r.path[len(str(local)) + 1:]}" for r in lrefs]
    trefs, tlabels, tclasses = list_labelled("s3://ftune/train.parquet")  # label: found by name; url: the path column
    assert tclasses == classes and list(tlabels) == list(labels) and [r.id for r in trefs] == [r.id for r in refs]

    _train(str(local), str(tmp_path / "local"))
    _train("s3://ftune/train", "s3://ftune/runs/prefix")
    _train("s3://ftune/train.parquet", "s3://ftune/runs/table", val_dir=str(local))
    want = [np.asarray(x) for x in _params(str(tmp_path / "local" / "model.msgpack"))]
    for run in ("prefix", "table"):
        got = _params(f"s3://ftune/runs/{run}/model.msgpack")
        assert len(got) == len(want)
        for a, b in zip(got, want):
            np.testing.assert_array_equal(a, b)  # the same bytes decoded in the same order: the same model
        names = {p.split(f"ftune/runs/{run}/", 1)[1] for p in s3fs_client.find(f"ftune/runs/{run}")}
        assert {"checkpoint.msgpack", "metrics.jsonl", "model.msgpack", "model.json", "classes.json",
                "hub/config.json", "hub/model.safetensors", "hub/README.md"} <= names, names
    local_curve = (tmp_path / "local" / "metrics.jsonl").read_text()
    assert s3fs_client.cat_file("ftune/runs/prefix/metrics.jsonl").decode() == local_curve
    assert json.loads(s3fs_client.cat_file("ftune/runs/table/hub/config.json"))["label_names"] == classes

    # stopped after step 3 (as a crash after its checkpoint), resumed from the bucket: the same run
    part = _train("s3://ftune/train.parquet", "s3://ftune/runs/part", max_steps=3)
    assert part["step"] == 3
    assert len(s3fs_client.cat_file("ftune/runs/part/metrics.jsonl").decode().splitlines()) == 3
    with pytest.raises(ValueError, match="already holds a fine-tuning run"):
        _train("s3://ftune/train.parquet", "s3://ftune/runs/part")  # nothing overwritten without resume
    _train("s3://ftune/train.parquet", "s3://ftune/runs/part", resume=True)
    assert s3fs_client.cat_file("ftune/runs/part/metrics.jsonl").decode() == local_curve
    for a, b in zip(_params("s3://ftune/runs/part/model.msgpack"), want):
        np.testing.assert_array_equal(a, b)


def test_table_labels_and_refusals_name_the_file_and_column(s3fs_client, digits_s3, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    local = digits_s3
    refs, labels, _ = list_image_folder(local)
    ints = tmp_path / "ints.csv"
    ints.write_text("image,y\n" + "".join(f"{r.path},{int(k)}\n" for r, k in zip(refs, labels)))
    r2, l2, c2 = list_labelled(str(ints), label_column="y", path_column="image")
    assert list(l2) == list(labels) and c2 == [str(i) for i in range(10)]
    with pytest.raises(ValueError, match=r"ints.csv: no label, labels, class or target column .*\(it has y\)"):
        list_labelled(str(ints), path_column="image")
    holes = tmp_path / "holes.parquet"
    pq.write_table(pa.table({"path": [r.path for r in refs[:3]], "label": ["a", None, "b"]}), holes)
    with pytest.raises(ValueError, match=r"holes.parquet: 1 rows have no 'label' value \(first: .*\.png\)"):
        list_labelled(str(holes))
    s3fs_client.pipe_file("ftune/shards/a-00000.tar", b"")
    with pytest.raises(ValueError, match="is webdataset shards: they are streamed"):
        list_labelled("s3://ftune/shards/a-00000.tar")
    with pytest.raises(FileNotFoundError, match="s3://ftune/nothing"):
        list_labelled("s3://ftune/nothing")


def test_sigkilled_run_on_s3_resumes_from_the_bucket_exactly(digits_s3, s3fs_client, s3_env, tmp_path):
    args = ["--model", TINY, "--random-weights", "--img-size", "32", "--batch-size", "8", "--steps", "60",
            "--warmup-steps", "2", "--lr", "1e-3", "--checkpoint-every", "3", "--no-progress"]
    ref = cli("finetune", "--train", str(digits_s3), "--output", str(tmp_path / "ref"), *args)
    assert ref.returncode == 0, ref.stderr
    cmd = cli_command("finetune", "--train", "s3://ftune/train.parquet", "--output", "s3://ftune/runs/killed", *args)
    proc = subprocess.Popen(cmd, env=subprocess_env(1, **s3_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not s3fs_client.exists("ftune/runs/killed/checkpoint.msgpack"):
        s3fs_client.invalidate_cache()
        assert time.time() < deadline and proc.poll() is None, proc.stderr.read()[-3000:] if proc.poll() else "slow"
        time.sleep(0.2)
    assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    time.sleep(1)  # an upload sent in full just before the kill may still land
    s3fs_client.invalidate_cache()
    assert not s3fs_client.exists("ftune/runs/killed/model.msgpack")
    resumed = cli("finetune", "--train", "s3://ftune/train.parquet", "--output", "s3://ftune/runs/killed", "--resume", *args)
    assert resumed.returncode == 0, resumed.stderr
    step = int(resumed.stdout.split("resumed from s3://ftune/runs/killed/checkpoint.msgpack at step ")[1].split()[0])
    assert 3 <= step < 60 and step % 3 == 0
    assert s3fs_client.cat_file("ftune/runs/killed/metrics.jsonl").decode() == (tmp_path / "ref" / "metrics.jsonl").read_text()
    for a, b in zip(_params("s3://ftune/runs/killed/model.msgpack"), _params(str(tmp_path / "ref" / "model.msgpack"))):
        np.testing.assert_array_equal(a, b)


def test_shard_stream_is_the_same_on_any_process_count_covers_each_epoch_and_resumes(shards_s3):
    from beit_jax.data import Decoder
    from beit_jax.finetune.stream import SHARD_STRIDE, StreamedSource, streamed_train_batches
    from beit_jax.sources import shard_urls
    from beit_jax.transforms import create_transform

    src = StreamedSource(tuple(shard_urls(str(shards_s3 / "d-{00000..00005}.tar"))), num_classes=10)
    tf = create_transform(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bicubic")

    def steps(n, processes, process, positions=None):
        with Decoder(tf, workers=1) as dec:
            it = streamed_train_batches(src, 8, 0, 4, 1, np.zeros((4, 3), np.int64) if positions is None else positions,
                                        dec, (32, 32, 3), process, processes)
            return [next(it) for _ in range(n)]

    one = steps(10, 1, 0)
    two = list(zip(steps(10, 2, 0), steps(10, 2, 1)))
    for a, (b0, b1) in zip(one, two):  # process p of 2 serves rows [4p, 4p + 4): the same global batch
        np.testing.assert_array_equal(a.images, np.concatenate([b0.images, b1.images]))
        np.testing.assert_array_equal(a.labels, np.concatenate([b0.labels, b1.labels]))
        np.testing.assert_array_equal(a.seeds, np.concatenate([b0.seeds, b1.seeds]))
    # 4 streams over 6 shards: each epoch, streams 0 and 1 get 2 shards (10 samples), 2 and 3 one (5);
    # their first epochs together hold every sample once, and every epoch draws new seeds
    rows = np.stack([b.seeds for b in one])  # (step, 8): stream s fills columns 2s, 2s + 1
    labels = np.stack([b.labels for b in one])
    first_seeds, first_labels = [], []
    for s_, per_epoch in ((0, 10), (1, 10), (2, 5), (3, 5)):
        seeds, labs = rows[:, 2 * s_:2 * s_ + 2].reshape(-1), labels[:, 2 * s_:2 * s_ + 2].reshape(-1)
        first_seeds += seeds[:per_epoch].tolist()
        first_labels += labs[:per_epoch].tolist()
        assert set(seeds[:per_epoch].tolist()).isdisjoint(seeds[per_epoch:2 * per_epoch].tolist())
    assert len(set(first_seeds)) == 30 and sorted(first_labels) == sorted(list(range(10)) * 3)
    # a resume from the positions after step 4 continues with step 5's batch exactly, on 1 or 2 processes
    at4 = np.concatenate([b0.positions for b0, _ in two[3:4]] + [b1.positions for _, b1 in two[3:4]])
    np.testing.assert_array_equal(at4, one[3].positions)
    again = steps(6, 1, 0, positions=at4)
    for a, b in zip(one[4:], again):
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.seeds, b.seeds)
    assert SHARD_STRIDE > 5


def test_finetune_from_s3_shards_resumes_exactly_and_json_labels_equal_cls(shards_s3, s3fs_client, tmp_path):
    common = ["--train", "s3://ftune/shards/d-{00000..00005}.tar", "--model", TINY, "--random-weights",
              "--img-size", "32", "--batch-size", "8", "--steps", "8", "--warmup-steps", "1", "--lr", "1e-3",
              "--checkpoint-every", "3", "--no-progress", "--streams", "2", "--shuffle-shards", "2"]
    no_classes = cli("finetune", *common, "--output", str(tmp_path / "x"))
    assert no_classes.returncode == 2 and "pass --num-classes K" in no_classes.stderr
    cls = cli("finetune", *common, "--num-classes", "10", "--output", "s3://ftune/runs/shards-cls")
    assert cls.returncode == 0, cls.stderr
    by_name = cli("finetune", *common, "--label-key", "label", "--classes", str(shards_s3 / "classes.txt"),
                  "--output", "s3://ftune/runs/shards-json")
    assert by_name.returncode == 0, by_name.stderr
    part = cli("finetune", *common, "--num-classes", "10", "--output", "s3://ftune/runs/shards-part", "--max-steps", "4")
    assert part.returncode == 0, part.stderr
    other = cli("finetune", *common, "--num-classes", "10", "--output", "s3://ftune/runs/shards-part", "--resume",
                "--shuffle-shards", "3")
    assert other.returncode == 2 and "shuffle_shards: checkpoint 2, now 3" in other.stderr
    resumed = cli("finetune", *common, "--num-classes", "10", "--output", "s3://ftune/runs/shards-part", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    local = cli("finetune", *common[2:], "--train", str(shards_s3 / "d-{00000..00005}.tar"), "--num-classes", "10",
                "--output", str(tmp_path / "local"))  # the same shards read from disk: the same stream
    assert local.returncode == 0, local.stderr
    want = _params("s3://ftune/runs/shards-cls/model.msgpack")
    for a, b in zip(_params(str(tmp_path / "local" / "model.msgpack")), want):
        np.testing.assert_array_equal(a, b)
    for run in ("shards-json", "shards-part"):
        for a, b in zip(_params(f"s3://ftune/runs/{run}/model.msgpack"), want):
            np.testing.assert_array_equal(a, b)
    curve = s3fs_client.cat_file("ftune/runs/shards-cls/metrics.jsonl")
    assert s3fs_client.cat_file("ftune/runs/shards-part/metrics.jsonl") == curve
    names = json.loads(s3fs_client.cat_file("ftune/runs/shards-json/classes.json"))
    assert names == [f"digit_{i}" for i in range(10)]


def test_two_processes_from_s3_shards_train_like_one(shards_s3, s3_env, tmp_path):
    """2 processes x 4 devices (each reading only its streams' shards) vs one process (this one, on
    its one device: 1 device == 8 is test_multi_device_train_step_equals_single_device)."""
    common = ["--train", "s3://ftune/shards/d-{00000..00005}.tar", "--num-classes", "10", "--model", TINY,
              "--random-weights", "--img-size", "32", "--batch-size", "8", "--steps", "4", "--warmup-steps", "1",
              "--lr", "1e-3", "--checkpoint-every", "2", "--workers", "1", "--no-progress", "--streams", "2"]
    single = cli("finetune", *common, "--output", "s3://ftune/runs/mh-single")
    assert single.returncode == 0, single.stderr
    run_process_pair(lambda i: ["finetune", *common, "--output",
                                "s3://ftune/runs/mh-multi" if i == 0 else str(tmp_path / "p1")], tmp_path, "shards",
                     env_extra=s3_env)
    for a, b in zip(_params("s3://ftune/runs/mh-multi/model.msgpack"), _params("s3://ftune/runs/mh-single/model.msgpack")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not os.path.exists(tmp_path / "p1") or not os.listdir(tmp_path / "p1")


def test_refusals_name_what_changed_or_what_is_wrong(digits_s3, shards_s3, s3_env, tmp_path):
    """What a newcomer met: a resume that changed the model or the data, a run folder of the other
    kind, unreadable training data, bad label files, a missing bucket: each one clear line, exit 2."""
    import shutil

    run = ["--model", TINY, "--random-weights", "--img-size", "32", "--batch-size", "8", "--steps", "4",
           "--warmup-steps", "1", "--no-progress"]
    out = str(tmp_path / "run")
    first = cli("finetune", "--train", str(digits_s3), "--output", out, "--max-steps", "2", *run)
    assert first.returncode == 0, first.stderr
    for extra, said in ((["--drop-path", "0.3"], "model.drop_path_rate: checkpoint 0.1, now 0.3"),
                        (["--img-size", "64"], "model.img_size: checkpoint 32, now 64"),
                        (["--grad-accum", "2"], "grad_accum: checkpoint 1, now 2"),
                        (["--dtype", "bfloat16"], "model.dtype: checkpoint 'float32', now 'bfloat16'")):
        again = cli("finetune", "--train", str(digits_s3), "--output", out, "--resume", *run, *extra)
        assert again.returncode == 2 and "was written with other settings" in again.stderr and said in again.stderr, \
            (extra, again.stderr)
    more = tmp_path / "more"
    shutil.copytree(digits_s3, more)
    shutil.copy(next((more / "digit_0").iterdir()), more / "digit_0" / "extra.png")
    changed = cli("finetune", "--train", str(more), "--output", out, "--resume", *run)
    assert changed.returncode == 2 and "data.images: checkpoint 30, now 31" in changed.stderr, changed.stderr
    moved = tmp_path / "moved"
    shutil.copytree(digits_s3, moved)  # the same images elsewhere: the same run
    assert cli("finetune", "--train", str(moved), "--output", out, "--resume", *run).returncode == 0
    from beit_jax.finetune.seg import SegTrainConfig
    from beit_jax.finetune.state import _settings_mismatch, read_checkpoint

    saved = read_checkpoint(f"{out}/checkpoint.msgpack")["extra"]["settings"]  # a segmentation run resuming here
    seg_now = dict(vars(SegTrainConfig()), scale_range=[0.5, 2.0], batch_size=8)
    assert "belongs to a classification fine-tuning run, and this is segmentation" in _settings_mismatch(out, saved,
                                                                                                        seg_now)

    nolabel = tmp_path / "nolabel"
    nolabel.mkdir()
    with tarfile.open(nolabel / "a-00000.tar", "w") as tf:
        for i, p in enumerate(sorted((digits_s3 / "digit_1").iterdir())):
            tf.add(p, arcname=f"s{i}.png")
    dead = cli("finetune", "--train", str(nolabel), "--num-classes", "10", "--output", str(tmp_path / "dead"), *run)
    assert dead.returncode == 2 and "every one of the 8 samples of global batch 1 failed" in dead.stderr, dead.stderr
    assert not (tmp_path / "dead" / "model.msgpack").exists()

    table = tmp_path / "t.csv"
    table.write_text("path,label\n" + "".join(f"{p},{'' if i == 2 else 'x'}\n"
                                             for i, p in enumerate(sorted((digits_s3 / "digit_1").iterdir()))))
    blank = cli("finetune", "--train", str(table), "--output", str(tmp_path / "t"), *run)
    assert blank.returncode == 2 and "1 rows have no 'label' value" in blank.stderr, blank.stderr
    empty_class = tmp_path / "ec"
    shutil.copytree(digits_s3, empty_class)
    (empty_class / "digit_9x").mkdir()
    (empty_class / ".ipynb_checkpoints").mkdir()
    ec = cli("finetune", "--train", str(empty_class), "--output", str(tmp_path / "ec-run"), *run)
    assert ec.returncode == 2 and "class folders without images: ['digit_9x']" in ec.stderr, ec.stderr
    dup = tmp_path / "dup.txt"
    dup.write_text("a\nb\na\n")
    d = cli("finetune", "--train", str(shards_s3 / "d-{00000..00005}.tar"), "--classes", str(dup),
            "--output", str(tmp_path / "d"), *run)
    assert d.returncode == 2 and "names ['a'] more than once" in d.stderr, d.stderr
    flags = cli("finetune", "--train", str(digits_s3), "--classes", str(dup), "--output", str(tmp_path / "f"), *run)
    assert flags.returncode == 2 and "are for webdataset shards" in flags.stderr
    bucket = cli("finetune", "--train", str(digits_s3), "--output", "s3://no-such-bucket/run", *run)
    assert bucket.returncode == 2 and "bucket s3://no-such-bucket does not exist" in bucket.stderr, bucket.stderr
    assert "--output" in bucket.stderr
