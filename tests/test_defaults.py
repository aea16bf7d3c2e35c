"""What inference runs with when the user leaves it open (`parallel.inference_defaults`), decided
from the platform and device count: here with the platforms given, since this machine has one."""
from __future__ import annotations

from beit_jax.cli.options import to_cli
from beit_jax.parallel import inference_defaults


def test_cpu_keeps_float32_and_a_cpu_sized_batch():
    d = inference_defaults(platform="cpu", num_devices=1)
    assert (d.dtype, d.batch_size, d.donate, d.hint) == ("float32", 64, False, None)
    assert d.dtype_note() == "float32"
    assert inference_defaults(platform="cpu", num_devices=3).batch_size == 66  # a multiple of the devices
    assert inference_defaults(platform="cpu", num_devices=1, batch_size=4).hint is None  # CPU micro-batches


def test_accelerators_default_to_bf16_a_full_batch_and_donation():
    d = inference_defaults(platform="cuda", num_devices=8)
    assert (d.dtype, d.dtype_is_default, d.batch_size, d.donate, d.hint) == ("bfloat16", True, 2048, True, None)
    assert d.dtype_note() == "bfloat16 (default on cuda; `dtype=float32` for full precision)"
    assert to_cli(d.dtype_note()) == "bfloat16 (default on cuda; --dtype float32 for full precision)"  # the CLI
    tpu = inference_defaults("float32", 1024, platform="tpu", num_devices=4)
    assert (tpu.dtype, tpu.dtype_note(), tpu.batch_size, tpu.hint) == ("float32", "float32", 1024, None)


def test_too_small_a_batch_for_the_devices_gets_one_hint_line():
    hint = inference_defaults(batch_size=64, platform="cuda", num_devices=8).hint
    assert "8 images per device on 8 cuda device(s)" in hint and "`batch_size=2048`" in hint
    assert "--batch-size 2048 (256 per device)" in to_cli(hint)  # what the command prints
    assert "\n" not in hint
    assert inference_defaults(batch_size=512, platform="cuda", num_devices=8).hint is None
