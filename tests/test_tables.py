"""Radius tables: the lookup rule never overstates, and the disk cache survives corruption and races."""

from __future__ import annotations

import multiprocessing
import warnings

import numpy as np
import pytest

from rslib.core.noises import make_noise
from rslib.core.noises import tables as T


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RSLIB_CACHE_DIR", str(tmp_path / "cache"))
    T.clear_memory_cache()
    yield
    T.clear_memory_cache()


def log_table(nodes: np.ndarray) -> T.RadiusTable:
    """Nodes of the convex curve R = log(1 / (2 (1 - rho))) with its exact derivative as slopes."""
    return T.RadiusTable(nodes, -np.log(2 * (1 - nodes)), 1 / (1 - nodes))


def test_lookup_is_a_tight_lower_bound_between_and_beyond_nodes():
    table = log_table(np.concatenate([[0.5], np.linspace(0.55, 0.99, 45)]))
    rho = np.linspace(0.5, 0.9999, 5001)
    truth = -np.log(2 * (1 - rho))
    got = table.lookup(rho)
    assert np.all(got <= truth + 1e-15)
    inside = rho <= 0.9
    assert np.max(truth[inside] - got[inside]) < 0.01  # coarse nodes (0.01 apart): still close
    assert np.all(np.diff(got) >= 0)  # past the last node: its tangent, a valid (loose) bound
    assert np.all(table.lookup(np.array([0.0, 0.2, 0.5])) == 0)


@pytest.mark.parametrize(("rho", "radius", "slope", "problem"), [
    ([0.5, 0.6], [0.0, -1.0], [1.0, 1.0], "nondecreasing"),
    ([0.5, 0.5], [0.0, 1.0], [1.0, 1.0], "increase"),
    ([0.4, 0.6], [0.0, 1.0], [1.0, 1.0], "first node"),
    ([0.5, 0.6], [0.0, np.nan], [1.0, 1.0], "non-finite"),
])
def test_invalid_tables_are_rejected(rho, radius, slope, problem):
    with pytest.raises(ValueError, match=problem):
        T.RadiusTable(np.array(rho), np.array(radius), np.array(slope))


def _build_laplace_linf_table(_: int) -> float:
    noise = make_noise("Laplace", 257, lambd=1.0)
    return float(noise.certify(0.9, float("inf")))


def test_table_is_cached_on_disk_without_leftovers(tmp_path):
    first = _build_laplace_linf_table(0)
    files = list((tmp_path / "cache" / "tables").iterdir())
    assert [f.suffix for f in files] == [".npz"]
    T.clear_memory_cache()
    assert _build_laplace_linf_table(0) == first


@pytest.mark.parametrize("damage", ["garbage", "truncated", "foreign key"])
def test_corrupt_cache_file_is_rebuilt_not_trusted(tmp_path, damage):
    first = _build_laplace_linf_table(0)
    (path,) = (tmp_path / "cache" / "tables").iterdir()
    if damage == "garbage":
        path.write_bytes(b"not a numpy file")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
    else:
        fake = T.RadiusTable(np.array([0.5, 0.9]), np.array([0.0, 99.0]), np.array([1.0, 1.0]))
        path.write_bytes(fake.to_bytes(T.table_key("other", dim=1)))
    T.clear_memory_cache()
    with pytest.warns(UserWarning, match="rebuilding radius table"):
        assert _build_laplace_linf_table(0) == first
    T.clear_memory_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _build_laplace_linf_table(0) == first  # the rebuilt file is valid again


def test_concurrent_builders_agree(tmp_path):
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        results = pool.map(_build_laplace_linf_table, range(4))
    assert len(set(results)) == 1
    assert len(list((tmp_path / "cache" / "tables").iterdir())) == 1


def test_unwritable_cache_still_certifies(tmp_path, monkeypatch):
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    monkeypatch.setenv("RSLIB_CACHE_DIR", str(blocker))
    with pytest.warns(UserWarning, match="could not cache"):
        assert _build_laplace_linf_table(0) > 0


def test_keys_separate_parameters_and_versions():
    a = T.table_key("gamma_radial", dim=64, k=2.0)
    assert a != T.table_key("gamma_radial", dim=64, k=3.0)
    assert a != T.table_key("gamma_radial", dim=65, k=2.0)
    assert str(T.TABLE_FORMAT_VERSION) in a
