"""Soft-CE block-size config and its autotune cache (no GPU: a fake bench times configs)."""

import json

import pytest

from mtp_kernels.soft_ce import SoftCEConfig
from mtp_kernels.soft_ce import config


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("MTP_SOFT_CE_AUTOTUNE", raising=False)
    monkeypatch.setattr(config, "_MEMO", {})
    return tmp_path


def _fake_bench(calls):
    def bench(cfg, which):  # fastest: fwd block 8192 with 8 warps, bwd block 2048
        calls.append((cfg, which))
        if which == "fwd":
            return abs(cfg.block_v - 8192) + abs(cfg.num_warps - 8) + cfg.num_stages
        return abs(cfg.bwd_block_v - 2048) + cfg.bwd_num_warps
    return bench


def test_autotune_picks_fastest_and_caches_on_disk(fresh_cache):
    calls = []
    cfg = config.get_config("GPU-X", "bfloat16", 100000, bench=_fake_bench(calls))
    assert (cfg.block_v, cfg.num_warps, cfg.num_stages) == (8192, 8, 1)
    assert (cfg.bwd_block_v, cfg.bwd_num_warps) == (2048, 4)
    assert len(calls) == len(config.FWD_CANDIDATES) + len(config.BWD_CANDIDATES)
    table = json.loads((fresh_cache / "soft_ce.json").read_text())
    assert table[config.cache_key("GPU-X", "bfloat16", 100000)] == {
        "block_v": 8192, "num_warps": 8, "num_stages": 1, "bwd_block_v": 2048, "bwd_num_warps": 4}
    config._MEMO.clear()  # a new process: read from disk, no timing
    assert config.get_config("GPU-X", "bfloat16", 100000, bench=_fake_bench(calls)) == cfg
    assert len(calls) == len(config.FWD_CANDIDATES) + len(config.BWD_CANDIDATES)


def test_tuned_table_and_small_vocab_skip_timing(fresh_cache):
    def never(cfg, which):
        raise AssertionError("should not time")

    (device, dtype, vocab), want = next(iter(config.TUNED.items()))
    assert config.get_config(device, dtype, vocab, bench=never) == want
    assert config.get_config("GPU-X", "bfloat16", 1000, bench=never) == config.DEFAULT.fitted(1000)


def test_autotune_can_be_switched_off(fresh_cache, monkeypatch):
    monkeypatch.setenv("MTP_SOFT_CE_AUTOTUNE", "0")
    assert config.get_config("GPU-X", "float32", 100000, bench=_fake_bench([])) == config.DEFAULT


def test_every_candidate_failing_is_an_error(fresh_cache):
    def broken(cfg, which):
        raise RuntimeError("compile failed")

    with pytest.raises(RuntimeError, match="every fwd candidate failed"):
        config.get_config("GPU-X", "bfloat16", 100000, bench=broken)
    assert not (fresh_cache / "soft_ce.json").exists(), "a failed tuning must not be cached"


def test_config_validation_and_fitting():
    with pytest.raises(ValueError, match="power of two"):
        SoftCEConfig(block_v=1000)
    small = SoftCEConfig().fitted(7)
    assert small.block_v == 16 and small.bwd_block_v == 16
    assert SoftCEConfig().fitted(151936) == SoftCEConfig()
