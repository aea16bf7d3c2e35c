"""OUTPUT/hub: timm's Hugging Face Hub layout (config.json as timm's save_config_for_hf writes it,
model.safetensors timm loads strictly), loaded back by timm (`local-dir:`) and beit-jax, and
`beit-jax push` up to the Hub call."""
from __future__ import annotations

import json

import numpy as np
import pytest

import beit_jax
from beit_jax import finetune, publish
from tests.support import TINY, cli, digits_folder


def _timm_config(model, labels, tmp_path):
    """What timm's own save_config_for_hf writes for the timm model of the same parameters."""
    import timm
    from timm.models._hub import save_config_for_hf

    arch, args = publish.timm_model_args(model)
    tm = timm.create_model(f"{arch}.{model.pretrained_cfg.tag}", **args)
    save_config_for_hf(tm, tmp_path / "timm.json", model_config={"label_names": labels})
    return json.loads((tmp_path / "timm.json").read_text())


def _timm_logits(folder, x):
    import timm
    import torch

    tm = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    with torch.no_grad():
        return tm(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))).numpy()


@pytest.mark.parametrize("name,kw", [
    ("beitv2_base_patch16_224.in1k_ft_in1k", dict(global_pool="token", depth=1, embed_dim=64, num_heads=2, img_size=32)),
    ("beit3_base_patch16_224", dict(depth=1, embed_dim=64, num_heads=2)),
])
def test_hub_folder_config_is_timms_and_loads_in_timm_and_beit_jax(name, kw, tmp_path, imagenet_dir):
    model, variables = beit_jax.create_model(name, num_classes=3, rng=1, **kw)
    labels = ["cat", "dog", "fish"]
    folder = publish.save_hub_folder(tmp_path / "hub", model, variables, label_names=labels)
    written = (tmp_path / "hub" / "config.json").read_text()
    ours, ref = json.loads(written), _timm_config(model, labels, tmp_path)
    assert ours == ref and list(ours) == list(ref) and list(ours["pretrained_cfg"]) == list(ref["pretrained_cfg"])
    assert written == json.dumps(ref, indent=2)  # key order and format too (as timm orders model_args here)
    tf = beit_jax.create_transform(**beit_jax.resolve_data_config(model))
    x = tf(beit_jax.load_image(sorted(imagenet_dir.iterdir())[3]))[None]
    want = np.asarray(model.apply(variables, x))
    np.testing.assert_allclose(_timm_logits(folder, x), want, rtol=1e-5, atol=1e-5)
    for spec in (f"local-dir:{folder}", str(folder)):
        m2, v2 = beit_jax.create_model(spec)
        assert beit_jax.resolve_data_config(m2) == beit_jax.resolve_data_config(model)
        np.testing.assert_array_equal(np.asarray(m2.apply(v2, x)), want)


def test_finetune_writes_a_hub_folder_of_the_ema_that_timm_loads(tmp_path, imagenet_dir):
    """finetune.train on the cheapest setup (2 blocks, width 64, 32 px, 2 steps) with an EMA: hub/
    holds the EMA's weights; timm's logits equal beit-jax's on a real photo."""
    train = digits_folder(tmp_path / "train", n_per_class=1, size=32)
    model, variables = beit_jax.create_model("beit_base_patch16_224", num_classes=10, img_size=32, depth=2,
                                             embed_dim=64, num_heads=2)
    cfg = finetune.TrainConfig(lr=1e-2, warmup_steps=1, total_steps=2, model_ema_decay=0.5)
    out = tmp_path / "run"
    finetune.train(model, variables, str(train), output_dir=str(out), batch_size=8, cfg=cfg, progress=False,
                   log=lambda *a, **k: None)
    hub = out / "hub"
    assert sorted(p.name for p in hub.iterdir()) == sorted(publish.HUB_FILES)
    classes = json.loads((out / "classes.json").read_text())
    assert json.loads((hub / "config.json").read_text()) == _timm_config(model, classes, tmp_path)
    card = (hub / "README.md").read_text()
    assert card.startswith("---\ntags:\n- image-classification\n- timm") and "EMA" in card and "decay 0.5" in card
    tf = beit_jax.create_transform(**beit_jax.resolve_data_config(model))
    x = tf(beit_jax.load_image(sorted(imagenet_dir.iterdir())[0]))[None]
    ema_m, ema_v = beit_jax.create_model("beit_base_patch16_224", checkpoint_path=str(out / "model_ema.msgpack"))
    raw_m, raw_v = beit_jax.create_model("beit_base_patch16_224", checkpoint_path=str(out / "model.msgpack"))
    want = np.asarray(ema_m.apply(ema_v, x))
    assert not np.allclose(want, np.asarray(raw_m.apply(raw_v, x)), atol=1e-4)  # the EMA is not the raw weights
    np.testing.assert_allclose(_timm_logits(hub, x), want, rtol=1e-5, atol=1e-5)
    m2, v2 = beit_jax.create_model(f"local-dir:{hub}")
    np.testing.assert_array_equal(np.asarray(m2.apply(v2, x)), want)


@pytest.fixture
def hub_folder(tmp_path):
    model, variables = beit_jax.create_model(TINY, num_classes=2)
    return publish.save_hub_folder(tmp_path / "hub", model, variables, label_names=["a", "b"])


@pytest.fixture
def hub_calls(monkeypatch):
    """huggingface_hub.HfApi's create_repo / create_branch / upload_folder, recorded, not sent."""
    import huggingface_hub

    calls = []

    def record(name, result=None):
        def method(self, *args, **kwargs):
            calls.append((name, args, kwargs))
            return result
        return method

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", record("create_repo", huggingface_hub.RepoUrl(
        "https://huggingface.co/me/tiny")))
    monkeypatch.setattr(huggingface_hub.HfApi, "create_branch", record("create_branch"))
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", record("upload_folder"))
    return calls


def test_push_uploads_the_folder_as_timm_does(hub_folder, hub_calls):
    res = cli("push", hub_folder, "me/tiny", "--private", "--revision", "v1", "--commit-message", "first model")
    assert res.returncode == 0, res.stderr
    assert hub_calls == [
        ("create_repo", ("me/tiny",), {"private": True, "exist_ok": True}),
        ("create_branch", ("me/tiny",), {"branch": "v1", "exist_ok": True}),
        ("upload_folder", (), {"repo_id": "me/tiny", "folder_path": hub_folder, "revision": "v1",
                               "commit_message": "first model"}),
    ]
    hub_calls.clear()
    assert cli("push", hub_folder, "me/tiny").returncode == 0
    assert [c[0] for c in hub_calls] == ["create_repo", "upload_folder"]
    assert hub_calls[0][2]["private"] is False and hub_calls[1][2]["revision"] is None
    assert hub_calls[1][2]["commit_message"] == "Add model"


@pytest.mark.parametrize("damage,message", [
    ("model.safetensors", "model.safetensors missing"),
    ("README.md", "README.md missing"),
    ("config.json", "config.json missing"),
])
def test_push_refuses_an_incomplete_export(hub_folder, hub_calls, damage, message, tmp_path):
    import os

    os.remove(os.path.join(hub_folder, damage))
    res = cli("push", hub_folder, "me/tiny")
    assert res.returncode == 2 and "is not a complete model export" in res.stderr and message in res.stderr
    assert hub_calls == []  # nothing was sent


def test_push_refusals_and_hub_errors_are_one_line(hub_folder, hub_calls, tmp_path, monkeypatch):
    res = cli("push", tmp_path / "nowhere", "me/tiny")
    assert res.returncode == 2 and "no such folder" in res.stderr
    (tmp_path / "hub" / "config.json").write_text('{"num_classes": 2}')
    res = cli("push", hub_folder, "me/tiny")
    assert res.returncode == 2 and "is not a timm model config" in res.stderr and hub_calls == []
    import huggingface_hub

    def offline(self, *a, **k):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", offline)
    publish.save_hub_folder(tmp_path / "hub2", *beit_jax.create_model(TINY, num_classes=2))
    res = cli("push", tmp_path / "hub2", "me/tiny")
    assert res.returncode == 2 and "could not push" in res.stderr and "no route to host" in res.stderr
    assert "HF_TOKEN" in res.stderr and "Traceback" not in res.stderr


def test_export_and_load_without_torch(tmp_path):
    """save_hub_folder and create_model('local-dir:...') are numpy + safetensors: no torch, no timm."""
    import subprocess
    import sys

    from tests.support import subprocess_env

    code = ("import sys, beit_jax\n"
            f"m, v = beit_jax.create_model({TINY!r}, num_classes=2)\n"
            f"beit_jax.publish.save_hub_folder(r'{tmp_path / 'hub'}', m, v, label_names=['a', 'b'])\n"
            f"m2, v2 = beit_jax.create_model(r'local-dir:{tmp_path / 'hub'}')\n"
            "print('loaded', m2.num_classes, sorted({k.split('.')[0] for k in sys.modules} & {'torch', 'timm'}))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env())
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("loaded 2 []")
