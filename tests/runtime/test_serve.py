"""`ddpm-serve` on Triton, loopback only: exact images under concurrent load, batching, bad requests refused alone
and in one line, the per-request limit, clean shutdown. The request handling itself
(`runtime.serving.sampler.Sampler`) is also checked without Triton."""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from runtime.backends import open_model
from runtime.run.cli import main as ddpm_run
from runtime.errors import DDPMError
from runtime.sampling import Chain, sample
from runtime.serving.sampler import DEFAULT_MAX_CALLS, Sampler
from benchmarks.serving import LEAK, MALFORMED, free_ports, mixed_load, start_server

STEPS = 8
MAX_BATCH = 4  # tiny_export_dir's largest batch
DDIM = {"sampler": "ddim", "steps": "ddim8", "eta": 0.5}


def reference(export_dir: Path, tmp_path: Path, seed: int, n: int, *chain: object) -> np.ndarray:
    """Images 0..n-1 of `ddpm-run --seed seed [chain options]` (the real CLI, its default batching)."""
    out = tmp_path / f"ref-{seed}-{n}-{len(chain)}.npz"
    ddpm_run([str(a) for a in (export_dir / "model.onnx", "--n", n, "--seed", seed, "--out", out, "--threads", 1,
                               *(chain or ("--steps", STEPS)))])
    with np.load(out) as f:
        return f["samples"]


def test_sampler_groups_mixed_chains_and_matches_sample(tiny_export_dir):
    """One call with rows of two chains and two seeds in any order gives each image as `sample` does."""
    backend = open_model(tiny_export_dir / "model.onnx", threads=1)
    sampler = Sampler(backend, "ddpm", str(STEPS))
    ddim = {"sampler": np.array([[b"ddim"]] * 2, dtype=object), "steps": np.array([[b"ddim8"]] * 2, dtype=object),
            "eta": np.full((2, 1), 0.5)}
    solver = {"sampler": np.array([[b"sde-dpm++2m"]], dtype=object)}
    requests = [{"seed": np.array([[7], [2]]), "index": np.array([[3], [0]])},
                {"seed": np.array([[7], [7]]), "index": np.array([[1], [3]]), **ddim},
                {"seed": np.array([[2]]), "index": np.array([[2]]), **solver}]
    got = sampler.run([sampler.rows(r) for r in requests])
    ddpm_chain = Chain.build(backend.info.diffusion, "ddpm", STEPS)
    ddim_chain = Chain.build(backend.info.diffusion, "ddim", "ddim8", 0.5)
    seven, two = sample(backend, ddpm_chain, 4, seed=7), sample(backend, ddpm_chain, 1, seed=2)
    seven_ddim = sample(backend, ddim_chain, 4, seed=7)
    assert np.array_equal(got[0], np.stack([seven[3], two[0]]))
    assert np.array_equal(got[1], seven_ddim[[1, 3]])
    solver_chain = Chain.build(backend.info.diffusion, "sde-dpm++2m", STEPS)  # a solver: no eta, the server's steps
    assert np.array_equal(got[2], sample(backend, solver_chain, 3, seed=2)[[2]])
    two = {"seed": np.array([[1], [1]]), "index": np.array([[0], [0]])}
    for bad, message in (({**two, "index": np.array([[0], [-2]])}, "row 2 of 2: seed and index must be >= 0"),
                         ({**two, "steps": np.array([[b"8"], [b"abc"]], dtype=object)}, "row 2 of 2: .*'abc'"),
                         ({**two, "sampler": np.array([[b"ddpm"]] * 2, dtype=object),
                           "steps": np.array([[b"1000"]] * 2, dtype=object)},
                          f"row 1 of 2: this chain takes 1000 model calls per image and this server allows "
                          f"{DEFAULT_MAX_CALLS}; ask for fewer steps")):
        with pytest.raises(DDPMError, match=message):
            sampler.rows(bad)
    for bad in ({"seed": np.array([[-1]]), "index": np.array([[0]])},
                {"seed": np.array([[0]]), "index": np.array([[0]]), "sampler": np.array([[b"euler"]], dtype=object)},
                {"seed": np.array([[0]]), "index": np.array([[0]]), "steps": np.array([[b"many"]], dtype=object)},
                {"seed": np.array([[0]]), "index": np.array([[0]]), "eta": np.array([[1.5]])},
                {"seed": np.array([[0]]), "index": np.array([[0]]), "eta": np.array([[0.5]]), **solver},
                {"seed": np.array([[0]]), "index": np.array([[0]]), "spacing": np.array([[b"odd"]], dtype=object)}):
        with pytest.raises(DDPMError):
            sampler.rows(bad)


def test_call_limit_is_the_servers_choice_and_fits_its_default_chain(tiny_export_dir):
    """--max-model-calls caps each request's chain; the default cap leaves room for the server's own default chain,
    and a cap below it is refused at start."""
    backend = open_model(tiny_export_dir / "model.onnx", threads=1)
    one = {"seed": np.array([[0]]), "index": np.array([[0]])}

    def steps(k: int) -> dict[str, np.ndarray]:
        return {**one, "sampler": np.array([[b"ddpm"]], dtype=object), "steps": np.array([[str(k).encode()]], object)}

    capped = Sampler(backend, "ddpm", "10", max_model_calls=12)
    assert capped.rows(steps(12))[0].options.steps == "12"
    with pytest.raises(DDPMError, match="this chain takes 13 model calls per image and this server allows 12"):
        capped.rows(steps(13))
    assert Sampler(backend, "ddpm", None).max_model_calls == 1000  # all T steps by default: the cap follows
    assert Sampler(backend, "ddpm", "20").max_model_calls == DEFAULT_MAX_CALLS
    with pytest.raises(DDPMError, match=r"max_model_calls 10 is below the 20 model calls of the default chain"):
        Sampler(backend, "ddpm", "20", max_model_calls=10)


# ---- against a running server (needs the serve extra) ----

def port_free(port: int) -> bool:
    """Nothing listens on `port` and a new server could bind it (SO_REUSEADDR, as servers do: the closed
    connections of the test's clients may still sit in TIME_WAIT)."""
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def server(tiny_export_dir, tmp_path_factory):
    pytest.importorskip("pytriton", reason="needs the serve extra: pip install 'ddpm-deploy[serve]'")
    pytest.importorskip("tritonclient.grpc", reason="needs the serve extra: pip install 'ddpm-deploy[serve]'")
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    # A long queue delay makes the concurrent tests' requests meet in one model batch.
    try:
        proc, ports = start_server(tiny_export_dir / "model.onnx", "--steps", str(STEPS), "--max-batch",
                                   str(MAX_BATCH), "--queue-delay-us", "300000", "--threads", "1", log=log)
    except DDPMError:
        pytest.fail(f"ddpm-serve did not become ready:\n{log.read_text()[-3000:]}")
    yield {"proc": proc, **ports, "log": log}
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def client(server, protocol: str = "http"):
    from runtime.serving.client import ImageClient

    return ImageClient(f"127.0.0.1:{server[protocol]}", protocol)


@pytest.mark.slow
def test_concurrent_requests_are_exact_and_batched(server, tiny_export_dir, tmp_path):
    """8 client threads (HTTP and gRPC, two chains, two seeds) at once: every image equals ddpm-run's, and Triton
    merged requests into model batches larger than any single request."""
    jobs = [(p, seed, idx, opts) for p in ("http", "grpc") for seed, idx, opts in
            ((3, [0, 5], {}), (3, [2], {}), (11, [1], {}), (3, [4], DDIM))]
    before = client(server).batch_sizes()
    clients = [client(server, protocol) for protocol, *_ in jobs]  # connected first, so the requests start together
    start = threading.Barrier(len(jobs))

    def one(i):
        _, seed, indices, options = jobs[i]
        start.wait()
        return clients[i].request([seed] * len(indices), indices, **options)

    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(one, range(len(jobs))))
    finally:
        for c in clients:
            c.close()
    refs = {(3, False): reference(tiny_export_dir, tmp_path, 3, 6),
            (11, False): reference(tiny_export_dir, tmp_path, 11, 2),
            (3, True): reference(tiny_export_dir, tmp_path, 3, 6, "--sampler", "ddim", "--steps", "ddim8",
                                   "--eta", 0.5)}
    for (_, seed, indices, options), got in zip(jobs, results):
        assert got.dtype == np.float32 and got.shape == (len(indices), 1, 32, 32)
        want = refs[(seed, bool(options))][indices]
        assert np.array_equal(got, want), (seed, indices, options)
    after = client(server, "grpc").batch_sizes()
    merged = {size: n - before.get(size, 0) for size, n in after.items() if n > before.get(size, 0)}
    assert max(merged) > 2, merged  # 2 rows is the largest request


@pytest.mark.slow
def test_bad_requests_fail_alone_under_concurrent_load(server, tiny_export_dir, tmp_path):
    """Rounds of 8 good one-image requests and 4 malformed ones sent at once (HTTP and gRPC), so that Triton merges
    them into model batches: every good one comes back equal to ddpm-run's image, every malformed one is refused
    with one line (HTTP 400 / gRPC INVALID_ARGUMENT), no traceback or path; the server serves on."""
    result = mixed_load(f"127.0.0.1:{server['http']}", f"127.0.0.1:{server['grpc']}", rounds=4)
    assert not result.good_failed, result.summary() + f"; {result.good_failed[0]}"
    assert not result.bad_accepted and len(result.refusals) == 16, result.summary()
    assert {what for what, _, _ in result.refusals} == set(MALFORMED)
    assert {status for _, status, _ in result.refusals} == {"400", "StatusCode.INVALID_ARGUMENT"}
    assert not result.leaks and all("\n" not in message for _, _, message in result.refusals), result.refusals
    want = reference(tiny_export_dir, tmp_path, 5, 32)
    assert sorted(result.images) == [(5, i) for i in range(32)]
    for (_, index), image in result.images.items():
        assert np.array_equal(image, want[index]), index
    merged = client(server, "grpc").batch_sizes()
    assert max(merged) > 1, merged  # requests did meet in model batches
    assert client(server).request([5], [0]).tobytes() == want[0].tobytes()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_malformed_requests_get_one_line_and_server_keeps_serving(server, protocol):
    from tritonclient.utils import InferenceServerException

    c = client(server, protocol)
    one = {"seed": np.zeros((1, 1), np.int64), "index": np.zeros((1, 1), np.int64)}
    refused_by_triton = {  # types, shapes, missing inputs, rows: Triton's own checks
        "too many images": {"seed": np.zeros((MAX_BATCH + 1, 1), np.int64),
                            "index": np.arange(MAX_BATCH + 1, dtype=np.int64).reshape(-1, 1)},
        "no images": {"seed": np.zeros((0, 1), np.int64), "index": np.zeros((0, 1), np.int64)},
        "float seed": {**one, "seed": np.zeros((1, 1), np.float32)},
        "missing index": {"seed": one["seed"]},
    }
    refused_by_the_model = {
        **MALFORMED,
        "unknown sampler": {**one, "sampler": np.array([[b"euler"]], dtype=object)},
        "bad steps": {**one, "steps": np.array([[b"lots"]], dtype=object)},
        "eta out of range": {**one, "eta": np.full((1, 1), 3.0)},
        "eta for a solver": {**one, "sampler": np.array([[b"dpm++2m"]], dtype=object), "eta": np.full((1, 1), 0.5)},
        "bad spacing": {**one, "spacing": np.array([[b"sideways"]], dtype=object)},
        "chain over the limit": {**one, "sampler": np.array([[b"ddpm"]], dtype=object),
                                 "steps": np.array([[b"1000"]], dtype=object)},
    }
    invalid = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    for what, arrays in {**refused_by_triton, **refused_by_the_model}.items():
        with pytest.raises(DDPMError, match="server refused the request") as exc:
            c.infer(arrays)
            pytest.fail(f"{what}: accepted")
        cause = exc.value.__cause__
        assert isinstance(cause, InferenceServerException), what
        assert "\n" not in cause.message() and not LEAK.search(cause.message()), (what, cause.message())
        assert what in refused_by_triton or str(cause.status()) == invalid, (what, cause.status())
    with pytest.raises(DDPMError, match="unknown sampler 'euler'; use one of"):
        c.request([0], [0], sampler="euler")
    with pytest.raises(DDPMError, match=r"this chain takes 1000 model calls per image and this server allows "
                                        rf"{DEFAULT_MAX_CALLS}; ask for fewer steps"):
        c.request([0], [0], sampler="ddpm", steps=1000)
    assert c.ready()
    assert c.request([0], [1]).shape == (1, 1, 32, 32)


def test_metrics_endpoint_counts_requests(server):
    import urllib.request

    client(server).request([1], [0])
    text = urllib.request.urlopen(f"http://127.0.0.1:{server['metrics']}/metrics", timeout=10).read().decode()
    counts = {line.split("{")[0]: float(line.split()[-1]) for line in text.splitlines()
              if line.startswith("nv_inference_") and 'model="ddpm"' in line and "reason" not in line}
    assert counts["nv_inference_request_success"] >= 1 and counts["nv_inference_exec_count"] >= 1


@pytest.mark.slow
def test_sigterm_stops_cleanly(server):
    """Runs last in this module: SIGTERM -> exit 0 within seconds, every port released."""
    proc = server["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, server["log"].read_text()[-3000:]
    deadline = time.monotonic() + 10
    ports = [server[k] for k in ("http", "grpc", "metrics")]
    while not all(port_free(p) for p in ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert all(port_free(p) for p in ports)
    assert not _tritonservers_on(server["http"])


def _tritonservers_on(port: int) -> list[str]:
    """Command lines of live tritonserver processes started for `port` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode() if entry.name.isdigit() else ""
        except OSError:
            continue
        if "tritonserver" in cmd and f"http-port={port}" in cmd.replace(" ", "=").replace("==", "="):
            found.append(cmd)
    return found


def test_missing_extra_is_one_line_error(tiny_export_dir, monkeypatch, capsys):
    """Without PyTriton, ddpm-serve says which extra to install (checked by hiding the module)."""
    from runtime.serving.cli import main

    monkeypatch.setitem(sys.modules, "pytriton", None)
    monkeypatch.setitem(sys.modules, "pytriton.triton", None)
    with pytest.raises(SystemExit) as exc:
        main([str(tiny_export_dir / "model.onnx")])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and err == ["error: ddpm-serve needs PyTriton: pip install 'ddpm-deploy[serve]'"]


@pytest.mark.slow
def test_model_triton_cannot_load_is_one_line(tiny_export_dir):
    """Checked here, the model is opened again in Triton's model process; when that fails, Triton's reason comes
    back as one DDPMError line within seconds, not a PyTriton timeout."""
    pytest.importorskip("pytriton", reason="needs the serve extra: pip install 'ddpm-deploy[serve]'")
    from runtime.serving.server import model_config, serve

    config, summary = model_config(tiny_export_dir / "model.onnx", {}, provider="cpu", precision="auto", threads=1,
                                   sampler=None, steps=str(STEPS), spacing=None, eta=None, max_model_calls=None,
                                   max_batch=None, queue_delay_us=100, model_name="ddpm")
    assert {"key": "source", "value": {"string_value": str(tiny_export_dir / "model.onnx")}} in config["parameters"]
    gone = str(tiny_export_dir / "moved-away.onnx")
    config["parameters"] = [{"key": p["key"], "value": {"string_value": gone}} if p["key"] == "source" else p
                            for p in config["parameters"]]
    http, grpc, metrics = free_ports(3)
    before = signal.getsignal(signal.SIGTERM)  # whatever an earlier test in this process left
    start = time.monotonic()
    with pytest.raises(DDPMError, match=r"Triton could not load the model: .*moved-away\.onnx not found$"):
        serve(config, summary, host="127.0.0.1", http_port=http, grpc_port=grpc, metrics_port=metrics)
    assert time.monotonic() - start < 60
    assert signal.getsignal(signal.SIGTERM) is before  # the caller's handlers are back


def test_busy_port_is_one_line_error(tiny_export_dir, capsys):
    """A port already in use is refused before Triton starts (Triton would exit and leave PyTriton waiting)."""
    from runtime.serving.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        http, grpc = free_ports(2)
        with pytest.raises(SystemExit) as exc:
            main([str(tiny_export_dir / "model.onnx"), "--http-port", str(http), "--grpc-port", str(grpc),
                  "--metrics-port", str(port)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]
    assert "--metrics-port" in err[0]
