"""Fixtures shared by every test layer: a few events made by the project's own generator.

``generated_event_dir`` holds HDF5 files in our format (PF candidates, pixels, truth) written by
``jetssd generate``'s engine (Pythia 8, pileup, fast simulation): WW, tt and HH, two events each, μ = 10,
seconds to make. ``generated_events`` are their pixels in file order.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from jetssd.event import SparsePixels


@pytest.fixture(scope="session")
def generated_event_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """HDF5 files (our format) written by the project's generator: WW, tt, HH, two events each, μ = 10."""
    pytest.importorskip("pythia8mc")
    from jetssd.datagen.generate import GenerationSettings, run_generation

    out = tmp_path_factory.mktemp("events")
    settings = GenerationSettings(channels=("WW", "tt", "HH"), events=2, pileup=10.0, seed=11, format="jetssd",
                                  shard_size=2, pool_size=12, baseline=False)
    run_generation(settings, out, workers=1, cache_dir=tmp_path_factory.mktemp("generator-cache"))
    return out


@pytest.fixture(scope="session")
def generated_events(generated_event_dir: Path) -> list[SparsePixels]:
    """The pixels of the generated events, in file order (six events)."""
    from jetssd.io import open_events

    pixels: list[SparsePixels] = []
    for path in sorted(generated_event_dir.glob("*.h5")):
        with open_events(path) as f:
            for chunk in f.iter_chunks():
                pixels.extend(event.pixels for event in chunk)
    return pixels
