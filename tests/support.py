"""What the tests share: the real reference (perturbed timm models), real images from ../shared,
and subprocesses started the way a user starts them (the installed `beit-jax` command)."""
from __future__ import annotations

import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"
ODD_IMAGES = SHARED / "data" / "odd-images"
HELPERS = ROOT / "tests" / "helpers"
TINY = "test_beit"  # 64x64, 2 blocks, width 64: for everything but full-size numerics


def shared_dir(path: Path) -> Path:
    """The shared data folder, or skip (fail under CI=true, where it must be present)."""
    if not path.is_dir():
        msg = f"{path} not found: the shared test images live beside the checkout (../shared)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " and CI=true requires them")
        pytest.skip(msg)
    return path


# ---- subprocesses ---------------------------------------------------------------------------
def subprocess_env(devices: Optional[int] = None, **extra) -> dict:
    """The caller's environment (a user's shell), plus a CPU device count when a test needs one."""
    env = dict(os.environ, **extra)
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


def cli_command(*args) -> list:
    """`beit-jax ARGS` as installed by `pip install -e .` beside this interpreter."""
    exe = shutil.which("beit-jax", path=str(Path(sys.executable).parent))
    prefix = [exe] if exe else [sys.executable, "-m", "beit_jax.cli"]
    return prefix + [str(a) for a in args]


def run_cli(*args, devices: Optional[int] = None, env_extra=None, timeout=900, cwd=None) -> subprocess.CompletedProcess:
    """`beit-jax ARGS` in a real process: for what crosses a process boundary (device counts,
    signals, kills, several hosts, the installed entry point)."""
    return subprocess.run(cli_command(*args), env=subprocess_env(devices, **(env_extra or {})),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def cli(*args) -> subprocess.CompletedProcess:
    """`beit-jax ARGS` in this process (`beit_jax.cli.main`, the code the entry point calls), with
    its exit code, stdout and stderr as run_cli returns them: for refusals and parsing, where no
    process boundary is under test (a process start costs seconds of imports)."""
    import contextlib
    import io

    from beit_jax import cli as beit_cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = beit_cli.main([str(a) for a in args])
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["beit-jax", *map(str, args)], rc, out.getvalue(), err.getvalue())


def run_module(module: str, *args, timeout=900, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout, cwd=cwd)


def run_helper(script: str, *args, devices: Optional[int] = None, timeout=900, **env) -> subprocess.CompletedProcess:
    """A script of tests/helpers/ in a fresh interpreter (its own device count)."""
    return subprocess.run([sys.executable, str(HELPERS / script), *map(str, args)],
                          env=subprocess_env(devices, **env), capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_process_pair(args_of, log_dir: Path, tag: str, env_extra=None) -> tuple:
    """The two processes of run_process_pair, started: ([Popen] * 2, [(stdout file, stderr file)] * 2)."""
    port = free_port()
    logs = [(log_dir / f"{tag}{i}.out", log_dir / f"{tag}{i}.err") for i in range(2)]
    procs = []
    for i, (out, err) in enumerate(logs):
        with open(out, "w") as so, open(err, "w") as se:  # files: a full pipe must not stall one of the pair
            procs.append(subprocess.Popen(
                cli_command(*args_of(i), "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                            "--process-id", i, "--cpu-collectives", "gloo"),
                env=subprocess_env(4, PYTHONUNBUFFERED="1", **(env_extra or {})), stdout=so, stderr=se, text=True))
    return procs, logs


def run_process_pair(args_of, log_dir: Path, tag: str, env_extra=None, timeout=900) -> list:
    """`beit-jax *args_of(i), --coordinator ...` as 2 real processes on loopback (jax.distributed,
    gloo CPU collectives, 4 devices each), as two hosts of a pod run it. Both must exit 0; a failure
    shows both processes' stderr (one stalls when the other dies). Returns [(stdout, stderr)] * 2."""
    procs, logs = start_process_pair(args_of, log_dir, tag, env_extra)
    try:
        for p in procs:
            p.wait(timeout=timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    outs = [(out.read_text(), err.read_text()) for out, err in logs]
    if any(p.returncode != 0 for p in procs):
        raise AssertionError("\n".join(f"process {i} exited {p.returncode}; its stderr ends:\n{err[-3000:]}"
                                        for i, (p, (_, err)) in enumerate(zip(procs, outs))))
    return outs


def probe_new_outputs(base: str, rounds: int, barrier, errors) -> None:
    """One host of a pod run probing --output: round i probes BASE/i/out, released at the same
    moment as the other host by `barrier` (a spawned process's target, hence here)."""
    from beit_jax.storage import Folder

    for i in range(rounds):
        barrier.wait()
        try:
            Folder(os.path.join(base, str(i), "out")).check_writable()
        except OSError as e:
            errors.put(f"round {i}: {e}")


# ---- the reference --------------------------------------------------------------------------
def perturb_(model, seed: int = 0):
    """Make a random-init timm model's weights non-trivial: no zero biases, no unit norms.

    timm inits biases, q/v biases and relative position tables to zero and norm weights to one,
    which would hide a swapped or dropped mapping. Position tables get a large perturbation so a
    wrong index or resize shows in the logits.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 if "relative_position_bias_table" in name else 0.02
            if name.endswith(("q_bias", "v_bias")):
                scale = 0.1
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


@functools.lru_cache(maxsize=4)
def _timm_model_cached(name: str, kwargs_items: tuple, seed: int):
    import timm

    from beit_jax.models import ARCHITECTURES

    arch = ARCHITECTURES.get(name)
    timm_name, kwargs = (arch.timm_name, dict(arch.timm_kwargs)) if arch else (name, {})
    model = timm.create_model(timm_name, pretrained=False, **dict(kwargs, **dict(kwargs_items))).eval()
    return perturb_(model, seed)


def timm_model(name: str, seed: int = 0, **kwargs):
    """A perturbed random-init timm model for a beit-jax architecture (cached: treat as read-only).
    Large and giant ones are built fresh each time: four cached would hold ~5 GB in one xdist worker."""
    if "large" in name or "giant" in name:
        return _timm_model_cached.__wrapped__(name, tuple(sorted(kwargs.items())), seed)
    return _timm_model_cached(name, tuple(sorted(kwargs.items())), seed)


def timm_state_dict(model) -> dict:
    """The model's weights as read-only numpy views (no copy: a large model's 1.2 GB copied is seconds
    of page faults on these machines, and the cached models must not change under a test). A test
    that edits a weight copies it first; `as_tensors` gives torch tensors of such a dict."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.detach().numpy()
        out[k].flags.writeable = False
    return out


def as_tensors(state_dict: dict) -> dict:
    """torch tensors of a numpy state dict (copies: timm_state_dict's arrays are read-only)."""
    import torch

    return {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}


def timm_and_flax(name, timm_kwargs=None, **flax_kwargs):
    """(perturbed timm model, Flax model, Flax variables converted from the timm weights, on the
    device: once, not again at each call)."""
    import jax

    import beit_jax

    tm = timm_model(name, **(flax_kwargs if timm_kwargs is None else timm_kwargs))
    model = beit_jax.build_model(name, **flax_kwargs)
    return tm, model, jax.device_put(beit_jax.convert_timm_state_dict(timm_state_dict(tm), model))


def timm_attention_probs(tm, block: int, x: np.ndarray) -> np.ndarray:
    """(B, heads, N, N) softmax attention of timm block `block` on NHWC x: its non-fused path's
    probabilities, captured at the attention dropout's input."""
    import torch

    captured = {}
    attn = tm.blocks[block].attn
    hook = attn.attn_drop.register_forward_hook(lambda mod, inp, out: captured.setdefault("attn", inp[0].detach()))
    attn.fused_attn = False
    try:
        with torch.no_grad():
            tm(to_nchw(x))
    finally:
        attn.fused_attn = True
        hook.remove()
    return captured["attn"].numpy()


def assert_round_trip_is_identity(name: str) -> None:
    """timm -> Flax -> timm gives the perturbed timm weights back bit for bit, in timm's key order and
    dtypes, and a fresh timm model loads them strictly and computes the same output."""
    import timm
    import torch

    import beit_jax

    tm = timm_model(name)
    sd = timm_state_dict(tm)
    model = beit_jax.build_model(name)
    back = beit_jax.to_timm_state_dict(beit_jax.convert_timm_state_dict(sd, model), model)
    assert list(back) == list(tm.state_dict())  # timm's own key order
    for k, v in sd.items():
        assert back[k].shape == v.shape and back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    fresh = timm.create_model(name).eval()  # a timm name (the BEiT and BEiT-3 tags are)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()}, strict=True)
    x = to_nchw(random_images(1, 224))
    with torch.no_grad():
        assert max_abs(fresh(x).numpy(), tm(x).numpy()) == 0.0


def to_nchw(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def random_images(batch: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randn(batch, size, size, 3).astype(np.float32)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def digits_folder(root, n_per_class=None, size=64, offset=0):
    """scikit-learn's bundled 8x8 digits as an ImageFolder of upscaled RGB PNGs."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    idx = np.arange(len(d.target))[offset::2]  # even / odd split: train / val
    counts = {}
    for i in idx:
        label = int(d.target[i])
        if n_per_class and counts.get(label, 0) >= n_per_class:
            continue
        counts[label] = counts.get(label, 0) + 1
        img = Image.fromarray((d.images[i] * (255 / 16)).astype(np.uint8)).resize((size, size), Image.NEAREST)
        out = root / f"digit_{label}"
        out.mkdir(parents=True, exist_ok=True)
        img.convert("RGB").save(out / f"{i:04d}.png")
    return root


def extract_cli(*args) -> subprocess.CompletedProcess:
    """`beit-jax extract ... --model test_beit --random-weights --no-progress`, in-process."""
    return cli("extract", *args, "--model", TINY, "--random-weights", "--no-progress")


def sample_photos(imagenet_dir: Path, n: int) -> list:
    """The first n photos of ../shared/data/imagenet-sample, sorted."""
    return sorted(imagenet_dir.iterdir())[:n]


def elastic_fleet(src, out: str, args, log_dir: Path, env_extra=None, lease: float = 3.0, timeout: float = 600):
    """Three `beit-jax extract --elastic` workers on one output, as a fleet of preemptible boxes
    runs them: A and B start together, C once the run has begun (its manifest exists), and A is
    SIGKILLed once it has finished two units (holding the claims of the units it had started).
    Returns (A's pid, B, C) with B and C finished (their return codes, with their output in
    log_dir/<name>.log)."""
    from beit_jax.storage import Folder

    cmd = cli_command("extract", src, *args, "--output", out, "--elastic", "--lease-seconds", lease,
                      "--model", TINY, "--random-weights", "--no-progress")
    env = subprocess_env(1, **(env_extra or {}))

    def start(name):
        log = open(log_dir / f"{name}.log", "w")
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    a, b, c = start("a"), start("b"), None
    folder, by_a, seen = Folder(out), 0, set()
    deadline = time.time() + timeout
    try:
        while not folder.exists("manifest.json"):
            assert time.time() < deadline and a.poll() is None and b.poll() is None, "the workers did not start"
            time.sleep(0.05 if folder.local else 0.2)
        c = start("c")
        while by_a < 2:
            assert time.time() < deadline, "worker A finished no unit in time"
            assert a.poll() is None, f"worker A finished before it could be killed: {(log_dir / 'a.log').read_text()[-3000:]}"
            for name in folder.listdir("units"):
                if name.endswith(".json") and not name.startswith(".") and name not in seen:
                    seen.add(name)
                    by_a += f":{a.pid}:" in json.loads(folder.read(f"units/{name}"))["worker"]
            time.sleep(0.05 if folder.local else 0.2)
        a.kill()
        a.wait()
        for p in (b, c):
            p.wait(timeout=max(1, deadline - time.time()))
    finally:
        for p in (a, b, c):
            if p is not None and p.poll() is None:
                p.kill()
    return a.pid, b, c


def assert_exactly_the_rows_of(out, ref) -> None:
    """`out` holds exactly the rows, vectors and failures of `ref`, and no part file that its markers
    do not list (embedding-reader and autofaiss read every file in the folder)."""
    from beit_jax.extract import read_failures, read_features
    from beit_jax.storage import Folder

    p_ref, f_ref, i_ref = read_features(ref, with_ids=True)
    p_out, f_out, i_out = read_features(out, with_ids=True)
    assert p_out == p_ref and len(set(i_out.tolist())) == len(i_out)
    np.testing.assert_array_equal(i_out, i_ref)
    np.testing.assert_array_equal(f_out, f_ref)
    assert read_failures(out) == read_failures(ref)
    folder = Folder(str(out))
    listed = {f for name in folder.listdir("units") if name.endswith(".json")
              for p in json.loads(folder.read(f"units/{name}"))["parts"] for f in p["files"]}
    parts = {rel for rel in folder.sizes() if rel.split("/")[0] in ("pooled", "metadata")}
    assert parts == listed, f"files no marker lists: {sorted(parts - listed)[:5]}"


# ---- servers on loopback (storage tests) ------------------------------------------------------------
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_server(cmd, port: int, log: Path) -> subprocess.Popen:
    """A server process on loopback, its log to a file (a full pipe would stall it), once it listens."""
    out = open(log, "w")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + 60
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{cmd[0]} did not listen on 127.0.0.1:{port}: {log.read_text()[-2000:]}")
