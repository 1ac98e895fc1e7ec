"""grain batches: the contract with training, determinism, restore from state, process sharding, padding."""

import dataclasses
import json

import numpy as np
import pytest

from mtp_jax.data.config import DataConfig
from mtp_jax.data.pipeline import make_batches, plan_epoch, prepare


@pytest.fixture(scope="module")
def tok():
    from mtp_jax.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("pipe")
    r = np.random.default_rng(0)
    with open(d / "d.jsonl", "w") as f:
        for i in range(300):
            f.write(json.dumps({"input": f"q{i} " + "word " * int(r.integers(1, 80)),
                                "output": "x y " * int(r.integers(1, 150))}) + "\n")
    cfg = DataConfig(train_file=str(d / "d.jsonl"), eval_file=str(d / "d.jsonl"), cache_dir=str(d / "cache"),
                     max_prompt_tokens=128, max_total_tokens=512, batch_size=4, group_window=64)
    return cfg, prepare(cfg, tok, draft_length=4)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(a[k].shape == b[k].shape and (a[k] == b[k]).all() for k in a)


def test_batch_contract(setup):
    cfg, cache = setup
    batch = next(iter(make_batches(cache, cfg)))
    assert set(batch) == {"tokens", "positions", "segment_ids", "response_mask"}
    assert {k: v.dtype.name for k, v in batch.items()} == {"tokens": "int32", "positions": "int32",
                                                           "segment_ids": "int32", "response_mask": "bool"}
    B, L = batch["tokens"].shape
    assert B == cfg.batch_size and L % cfg.bucket_multiple == 0 and L <= cfg.max_total_tokens
    seg, pos = batch["segment_ids"], batch["positions"]
    assert (batch["tokens"][seg == 0] == cache.pad_id).all() and not batch["response_mask"][seg == 0].any()
    for row in range(B):
        for s in np.unique(seg[row][seg[row] > 0]):
            idx = np.nonzero(seg[row] == s)[0]
            assert (np.diff(idx) == 1).all(), "an example is not contiguous"
            assert (pos[row, idx] == np.arange(len(idx))).all(), "positions do not restart at 0 per example"
            mask = batch["response_mask"][row, idx]
            assert not mask[0] and mask[-1] and (np.diff(mask.astype(int)) >= 0).all(), "response is not a suffix"
    assert seg.max() > 1, "no row packs several examples"


def test_eval_covers_every_example_once(setup):
    cfg, cache = setup
    batches = list(make_batches(cache, cfg, train=False))
    n_examples = sum(len(np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0])) for b in batches
                     for r in range(b["tokens"].shape[0]))
    assert n_examples == len(cache)
    assert sum(int((b["segment_ids"] > 0).sum()) for b in batches) == int(cache.lengths.sum())
    assert sum(int(b["response_mask"].sum()) for b in batches) == int(cache.anchors.sum())


def test_deterministic_by_seed(setup):
    cfg, cache = setup
    a = take(iter(make_batches(cache, cfg)), 5)
    b = take(iter(make_batches(cache, cfg)), 5)
    c = take(iter(make_batches(cache, dataclasses.replace(cfg, shuffle_seed=1))), 5)
    assert all(same(x, y) for x, y in zip(a, b)), "same seed, different batches"
    assert not all(same(x, y) for x, y in zip(a, c)), "seed has no effect"


def test_restored_iterator_yields_same_next_batches(setup):
    cfg, cache = setup
    it = iter(make_batches(cache, cfg))
    per_epoch = len(plan_epoch(cache.lengths, batch_size=4, capacity=512,
                               buckets=np.asarray([512]), seed=0, epoch=0, group_window=64))
    take(it, per_epoch - 2)  # the restored run crosses an epoch boundary
    state = json.loads(json.dumps(it.get_state()))  # survives a JSON round trip, as in a checkpoint
    expected = take(it, 5)
    fresh = iter(make_batches(cache, cfg))
    fresh.set_state(state)
    assert all(same(x, y) for x, y in zip(expected, take(fresh, 5))), "restored iterator diverged"


def test_epochs_of_fewer_batches_than_the_first(setup):
    """Packing varies the batch count per epoch; an epoch shorter than epoch 0 must not end the run
    (it raised IndexError at its last batch, seen at step ~270 of a GPU run)."""
    cfg, cache = setup

    def counts(seed):
        return [len(plan_epoch(cache.lengths, batch_size=4, capacity=512, buckets=np.asarray([512]), seed=seed,
                               epoch=e, group_window=64)) for e in range(4)]

    seed, counts = next(((s, c) for s in range(20) if min(c := counts(s)) < c[0]), (None, None))
    assert seed is not None, "no seed in 0..19 gives an epoch shorter than the first"
    short = next(e for e, n in enumerate(counts) if n < counts[0])
    ds = make_batches(cache, dataclasses.replace(cfg, num_epochs=short + 1, shuffle_seed=seed))
    batches = list(ds)
    assert len(batches) == (short + 1) * counts[0]
    assert all(b["tokens"].shape[0] == cfg.batch_size for b in batches)
    first = batches[short * counts[0]]  # the short epoch's first batch comes back as its top-up
    assert same(batches[short * counts[0] + counts[short]], first)


def test_threaded_prefetch_gives_same_batches(setup):
    cfg, cache = setup
    a = take(iter(make_batches(cache, cfg)), 4)
    b = take(iter(make_batches(cache, dataclasses.replace(cfg, num_workers=2))), 4)
    assert all(same(x, y) for x, y in zip(a, b))


def test_process_shards_split_the_global_batch(setup):
    cfg, cache = setup
    whole = take(iter(make_batches(cache, cfg)), 3)
    parts = [take(iter(make_batches(cache, cfg, process_index=i, process_count=2)), 3) for i in range(2)]
    for step in range(3):
        assert parts[0][step]["tokens"].shape == parts[1][step]["tokens"].shape, "processes disagree on L"
        for k in whole[step]:
            assert (np.concatenate([parts[0][step][k], parts[1][step][k]]) == whole[step][k]).all()


def test_epoch_visits_each_example_once(setup):
    cfg, cache = setup
    plan = plan_epoch(cache.lengths, batch_size=1, capacity=512, buckets=np.asarray([512]), seed=3, epoch=0,
                      drop_remainder=False)
    seen = sorted(i for _, rows in plan for row in rows for i in row)
    assert seen == list(range(len(cache)))
    assert all(sum(int(cache.lengths[i]) for i in row) <= 512 for _, rows in plan for row in rows)


def test_rows_pack_at_most_max_examples(setup):
    """data.max_examples_per_row bounds each packed row (the packed prefix_split on cuDNN takes at most
    mtp.max_segments examples a row); every example still comes once, and the unbounded plan packs more."""
    cfg, cache = setup
    kw = dict(batch_size=1, capacity=512, buckets=np.asarray([512]), seed=3, epoch=0, drop_remainder=False)
    free = plan_epoch(cache.lengths, **kw)
    assert max(len(row) for _, rows in free for row in rows) > 2
    bounded = plan_epoch(cache.lengths, **kw, max_examples=2)
    assert max(len(row) for _, rows in bounded for row in rows) == 2
    assert sorted(i for _, rows in bounded for row in rows for i in row) == list(range(len(cache)))
    batch = next(iter(make_batches(cache, dataclasses.replace(cfg, max_examples_per_row=2))))
    assert batch["segment_ids"].max() == 2


def padding_fraction(batches):
    return 1 - sum(int((b["segment_ids"] > 0).sum()) for b in batches) / sum(b["tokens"].size for b in batches)


def test_length_grouping_reduces_padding(setup):
    cfg, cache = setup
    plain = dataclasses.replace(cfg, packing=False)
    grouped = padding_fraction(list(make_batches(cache, plain, train=False)))
    random_ = padding_fraction(list(make_batches(cache, dataclasses.replace(plain, length_grouping=False),
                                                 train=False)))
    packed = padding_fraction(list(make_batches(cache, cfg, train=False)))
    print(f"padding: random {random_:.3f}, length-grouped {grouped:.3f}, grouped+packed {packed:.3f}")
    assert grouped < random_ and packed < random_


def test_bad_process_split(setup):
    cfg, cache = setup
    with pytest.raises(ValueError, match="must divide by the process count"):
        make_batches(cache, cfg, process_index=0, process_count=3)


def test_config_validation():
    with pytest.raises(ValueError, match="max_total_tokens .* must exceed max_prompt_tokens"):
        DataConfig(max_prompt_tokens=512, max_total_tokens=512)
    with pytest.raises(ValueError, match="max_tokens_per_row"):
        DataConfig(max_tokens_per_row=100)
    from mtp_jax.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="prompt_format"):
        from_dict(DataConfig, {"prompt_format": "markdown"})


def test_builtin_default_data_builds(tmp_path, tok):
    cfg = DataConfig(cache_dir=str(tmp_path / "cache"))
    train, evaluation = prepare(cfg, tok, 4, "train"), prepare(cfg, tok, 4, "eval")
    assert len(train) >= 300 and len(evaluation) >= 20
    batch = next(iter(make_batches(train, cfg)))
    assert batch["response_mask"].any()


def test_heldout_prompts_never_in_training_data():
    from mtp_jax.data.readers import read_records

    held = {r.input for r in read_records("builtin:heldout_prompts.jsonl", require_output=False)}
    train_prompts = {r.input for r in read_records("builtin:train_prompts.jsonl", require_output=False)}
    distilled = {r.input for r in read_records("builtin:smollm2_distill_train.jsonl")}
    assert not held & train_prompts and not held & distilled
    assert distilled == train_prompts, "the distilled set does not cover the training prompts"
    assert {r.input for r in read_records("builtin:smollm2_distill_eval.jsonl")} <= held
