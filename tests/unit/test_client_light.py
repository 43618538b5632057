"""jetssd_client is light: it imports, reads event files (both layouts) and encodes requests with torch,
onnxruntime and the service code made unimportable, and never imports them on the way."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from jetssd.event import Event, PFCandidates, SparsePixels
from jetssd.io import write_events

SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    BLOCKED = ("torch", "onnxruntime", "jetssd_service", "onnx", "fastapi", "tritonclient")

    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())

    import jetssd_client
    from jetssd_client import Client, AsyncClient, encode_event, request_body
    from jetssd_client import cli, hlt, monitor, reprocess, journal, outputs, prom, testing  # every module
    from jetssd.io import open_events

    out = {}
    for path in sys.argv[1:]:
        with open_events(path) as f:
            events = next(f.iter_chunks(10))
        encoded = [encode_event(e, f"{i}") for i, e in enumerate(events)]
        body = json.loads(request_body(encoded, "triton", "twn"))
        out[path] = sorted({k for e in body["events"] for k in e if k != "id"})
    fake = testing.FakeGateway()
    with Client("http://x", transport=fake.transport()) as c:
        out["jets"] = len(c.detect(events).events)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(json.dumps({"forms": out, "loaded": loaded}))
""")


def test_client_works_without_torch_onnxruntime_and_the_service(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pf = [Event(SparsePixels.empty(), pf=PFCandidates.from_arrays(rng.uniform(0, 9, 5), rng.uniform(-2, 2, 5),
                                                                  rng.uniform(-3, 3, 5), rng.integers(0, 3, 5)))]
    px = [Event(SparsePixels.from_arrays([0], [3], [4], [1.5]))]
    write_events(tmp_path / "ours.h5", pf * 3, format="jetssd")
    write_events(tmp_path / "ref.h5", px * 3, format="reference")
    script = tmp_path / "light.py"
    script.write_text(SCRIPT)
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "ours.h5"), str(tmp_path / "ref.h5")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    import json

    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["forms"][str(tmp_path / "ours.h5")] == ["pf_candidates"]
    assert report["forms"][str(tmp_path / "ref.h5")] == ["pixels"]
    assert report["forms"]["jets"] == 3
    assert report["loaded"] == []
